"""What the sidecar tells: probes, alerts and transitions, to the logs, /metrics and the hooks.

The wizard runners (sidecar/runner.py) report here; the hooks run in the background, so a slow
webhook never holds up a failover, and `close` waits a while for the ones still running. What
reaches the hooks goes through sidecar/notices.py (one notice per incident, one on recovery), and
each delivery's outcome is counted for /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timezone
from typing import Callable

import httpx

from sidecar import hooks
from sidecar.config import SidecarConfig
from sidecar.metrics import Metrics
from sidecar.notices import LOUD, Notices
from sidecar.policy import COMPLETED, ROLLED_BACK, Alert
from sidecar.probes import ProbeResult

log = logging.getLogger("sidecar")

OUTCOMES = {COMPLETED: "completed", ROLLED_BACK: "rolled_back"}


def iso(ts) -> str | None:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


class Events:
    def __init__(self, metrics: Metrics, config: Callable[[], SidecarConfig],
                 client: Callable[[], httpx.AsyncClient | None], wall: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`config` and `client`: the daemon's current ones (a reload replaces the config)."""
        self.metrics = metrics
        self._config = config
        self._client = client
        self._wall = wall
        self._hook_tasks: set[asyncio.Task] = set()
        self.notices = Notices(self.send, clock, wall, lambda: self._config().hooks.settle, iso)

    def fire(self, event: dict) -> None:
        """An event about a wizard: a notice, or folded into the wizard's open incident."""
        self.notices.event(event["wizard"], event)

    def calm(self, wizard: str, calm: bool) -> None:
        """After each probe round: whether the wizard is calm (its incident may be over)."""
        self.notices.calm(wizard, calm)

    def send(self, event: dict) -> None:
        """Run the hooks in the background: a slow webhook must not hold up failover."""
        cfg = self._config()
        task = asyncio.get_running_loop().create_task(self._deliver(event, cfg))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    async def _deliver(self, event: dict, cfg: SidecarConfig) -> None:
        outcomes = await hooks.notify(event, cfg.hooks, cfg.secrets, self._client())
        self.count(outcomes)

    def count(self, outcomes: dict) -> None:
        """Each hook's delivery, for /metrics (neverdark_hook_deliveries_total)."""
        for name, (ok, detail, _) in outcomes.items():
            self.metrics.delivery(name, hooks.outcome(ok, detail))

    async def close(self, timeout: float = 10.0) -> None:
        if self._hook_tasks:
            await asyncio.wait(list(self._hook_tasks), timeout=timeout)

    # --- what the runners report --------------------------------------------------------------

    def probed(self, wizard: str, r: ProbeResult, deep: bool | None = None) -> None:
        """A probe's result (or a passive one, `deep` None: the gateway's log said it)."""
        self.metrics.probe(wizard, r)
        if not r.ok and deep is not None:
            log.info("probe failed", extra={"wizard": wizard, "backend": r.backend,
                                            "reason": r.reason, "status": r.status,
                                            "detail": r.detail, "deep": deep})

    def check_turns(self, wizard: str, result) -> None:
        """Where each check turn on a local backend spent its time, for /metrics."""
        for backend, breakdown in result.turns:
            self.metrics.local_turn(wizard, backend, breakdown)

    def alerts(self, wizard: str, alerts: list[Alert], active: str | None) -> None:
        for alert in alerts:
            (log.error if alert.kind in LOUD else log.warning)(
                f"alert: {alert.kind}", extra={"wizard": wizard, "backend": alert.backend,
                                               "detail": alert.detail})
            self.fire({"event": alert.kind, "wizard": wizard, "backend": alert.backend,
                       "active": active, "detail": alert.detail, "at": iso(self._wall())})

    def _transition(self, wizard: str, record: dict, ok: bool, rolled_back: bool,
                    **extra) -> None:
        self.fire({"event": "transition", "wizard": wizard, "from": record["from"],
                   "to": record["to"], "kind": record["kind"], "reason": record["reason"],
                   "ok": ok, "rolled_back": rolled_back, **extra, "detail": record["detail"],
                   "timings": record["timings"], "at": iso(record["at"])})

    def switched(self, wizard: str, record: dict, result) -> None:
        """A switch finished (`record`: the policy's transition record; `result`: SwitchResult)."""
        if result.ok:
            self.metrics.transition(wizard, record["kind"])
        (log.warning if result.ok else log.error)(
            "switch done" if result.ok else "switch failed",
            extra={"wizard": wizard, "from": record["from"], "to": record["to"],
                   "kind": record["kind"], "ok": result.ok, "rolled_back": result.rolled_back,
                   "detail": result.detail, "timings": record["timings"]})
        self._transition(wizard, record, result.ok, result.rolled_back)

    def recovered(self, wizard: str, record: dict, check_ok: bool, active: str | None) -> None:
        """A switch a stopped sidecar left unfinished was checked and recorded."""
        outcome = OUTCOMES.get(record["recovered"], "interrupted")
        self.metrics.recovery(wizard, outcome)
        if record["ok"]:
            self.metrics.transition(wizard, record["kind"])
        (log.warning if check_ok else log.error)(
            "interrupted switch recorded", extra={
                "wizard": wizard, "from": record["from"], "to": record["to"],
                "outcome": record["recovered"], "check_ok": check_ok, "detail": record["detail"],
                "active": active})
        self._transition(wizard, record, record["ok"], outcome == "rolled_back",
                         recovered=record["recovered"], active=active, check=record["check"])
