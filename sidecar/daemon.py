"""The sidecar's main loop: probe, decide, switch, remember, tell.

One asyncio task per wizard, so a wizard in the middle of a switch (restart, a local model's cold
first turn: minutes) never delays another wizard's probes. The policy clock is wall time
(time.time()) because its holds and dwell are persisted and must survive a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

import httpx

from sidecar import flip, hooks, sdnotify, state
from sidecar.config import BackendConfig, SidecarConfig, WizardConfig
from sidecar.control import serve as serve_control
from sidecar.http_api import HttpApi
from sidecar.metrics import Metrics
from sidecar.passive import PassiveWatcher
from sidecar.policy import Decision, Policy, PolicyError
from sidecar.probes import ProbeResult, probe
from sidecar.switch import SwitchResult, restart_wait, switch

log = logging.getLogger("sidecar")

DEFAULT_SYSTEMCTL = ("sudo", "-n", "/usr/bin/systemctl")
SYSTEMCTL_ENV = "NEVERDARK_SIDECAR_SYSTEMCTL"
DEFAULT_WAIT = 600.0
PRE_SWITCH_TIMEOUT = 15.0
PRE_SWITCH_TIMEOUT_LOCAL = 180.0

SwitchFn = Callable[[WizardConfig, BackendConfig, BackendConfig | None, httpx.AsyncClient, list[str]],
                    Awaitable[SwitchResult]]


def systemctl_from_env() -> list[str]:
    raw = os.environ.get(SYSTEMCTL_ENV)
    return shlex.split(raw) if raw else list(DEFAULT_SYSTEMCTL)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _significant(snap: dict) -> tuple:
    """The part of a snapshot worth an fsync: not the per-probe counters and timestamps."""
    health = tuple(sorted((b, h["healthy"], h["held_until"], h["key_rejected"])
                          for b, h in snap["health"].items()))
    return (snap["active"], snap["pinned"], snap["forced"], snap["streak"], snap["dark"],
            len(snap["transitions"]), snap["transitions"][-1:] and snap["transitions"][-1]["at"],
            health)


class WizardRunner:
    def __init__(self, wizard: WizardConfig, daemon: "Daemon", clock: Callable[[], float]) -> None:
        self.w = wizard
        self.d = daemon
        self.clock = clock
        self.watcher = PassiveWatcher(wizard)
        self.wake = asyncio.Event()
        self.switching = False
        self.deferred: str | None = None  # the target of a switch waiting for the restart budget
        self.last_tick = time.monotonic()
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self._saved_key: tuple | None = None
        now = clock()
        actual = flip.read_active_backend(wizard.active_config, wizard)
        snap, note = state.reconcile(state.load(daemon.cfg.state_dir, wizard.name), actual, now)
        names = [b.name for b in wizard.backends]
        active = snap.get("active") if snap.get("active") in names else None
        self.policy = Policy(names, wizard.probe, active, now, why=snap.get("why") or "found on start")
        self.policy.restore(snap)
        if note:
            log.warning("reconciled start state", extra={"wizard": wizard.name, "note": note})
        log.info("wizard loaded", extra={"wizard": wizard.name, "active": self.policy.active,
                                         "pinned": self.policy.pinned})
        self.save(force=True)

    # --- persistence --------------------------------------------------------------------------

    def save(self, force: bool = False) -> None:
        snap = self.policy.snapshot()
        key = _significant(snap)
        if force or key != self._saved_key:
            state.save(self.d.cfg.state_dir, self.w.name, snap)
            self._saved_key = key

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 -- log and keep watching; the watchdog sees stalls
                log.exception("wizard tick failed", extra={"wizard": self.w.name})
            self.last_tick = time.monotonic()
            try:
                await asyncio.wait_for(self.wake.wait(), self.w.probe.interval)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    def _probe_now(self, backend: BackendConfig, now: float) -> bool:
        # A provider that asked us to wait is left alone until its Retry-After.
        return self.policy.health[backend.name].held_until <= now

    async def _probe(self, backend: BackendConfig, deep: bool, timeout: float | None = None) -> ProbeResult:
        r = await probe(backend, self.d.client, timeout or self.w.probe.timeout, deep=deep)
        self.d.metrics.probe(self.w.name, r)
        if not r.ok:
            log.info("probe failed", extra={"wizard": self.w.name, "backend": r.backend,
                                            "reason": r.reason, "status": r.status,
                                            "detail": r.detail, "deep": deep})
        return r

    async def tick(self) -> None:
        now = self.clock()
        paid = self.w.probe.paid_probe
        todo = [b for b in self.w.backends if self._probe_now(b, now)]
        # Deep probes on a local model are kept for just before a switch: every one would evict
        # the prompt prefix the wizard's real turns rely on.
        results = await asyncio.gather(*(self._probe(b, deep=paid and b.kind != "local") for b in todo))
        for r in results:
            self.policy.observe_result(r, self.clock())
        for r in await asyncio.to_thread(self.watcher.poll):
            if r.backend:
                self.d.metrics.probe(self.w.name, r)
                self.policy.observe_result(r, self.clock())
        await self._act()
        self._flush_alerts()
        self._settle_waiters()
        self.save()

    async def _act(self) -> None:
        decision = self.policy.decide(self.clock())
        if decision is None:
            self.deferred = None
            return
        target = self.w.backend(decision.target)
        # A switch that could not restart the gateway would fail and count as a transition; the
        # decision (a forced drill or failback included) waits for the budget instead.
        budget = restart_wait(self.w)
        if budget > 0:
            if self.deferred != decision.target:
                log.warning("switch deferred: restart budget", extra={
                    "wizard": self.w.name, "to": decision.target, "seconds": round(budget, 1)})
            self.deferred = decision.target
            return
        self.deferred = None
        # Never onto a backend on the strength of a list-models answer alone: a real generation.
        # A local server answers one request at a time: this probe may queue behind a whole
        # prefill (the wizards' own per-turn fallbacks land there during an outage).
        wait = PRE_SWITCH_TIMEOUT_LOCAL if target.kind == "local" else PRE_SWITCH_TIMEOUT
        self.policy.observe_result(await self._probe(target, deep=True,
                                                     timeout=max(wait, self.w.probe.timeout)),
                                   self.clock())
        confirmed = self.policy.decide(self.clock())
        if confirmed is None or confirmed.target != decision.target:
            log.warning("switch called off: pre-switch deep probe failed",
                        extra={"wizard": self.w.name, "to": decision.target})
            return
        await self._switch(confirmed)

    async def _switch(self, decision: Decision) -> None:
        previous = self.w.backend(self.policy.active) if self.policy.active else None
        target = self.w.backend(decision.target)
        log.warning("switching", extra={"wizard": self.w.name, "from": self.policy.active,
                                        "to": target.name, "kind": decision.kind,
                                        "reason": decision.reason})
        self.switching = True
        try:
            result = await self.d.switch_fn(self.w, target, previous, self.d.client, self.d.systemctl)
        except Exception as exc:  # noqa: BLE001 -- a crashed switch is a failed switch
            log.exception("switch crashed", extra={"wizard": self.w.name})
            result = SwitchResult(False, False, f"switch crashed: {type(exc).__name__}: {exc}", {})
        finally:
            self.switching = False
        record = self.policy.commit(decision, self.clock(), result.ok, result.detail)
        # Kept with the transition (state file, /status, control replies): drills report them.
        record["timings"] = {k: round(v, 2) for k, v in result.timings.items()}
        if result.ok:
            self.d.metrics.transition(self.w.name, decision.kind)
        (log.warning if result.ok else log.error)(
            "switch done" if result.ok else "switch failed",
            extra={"wizard": self.w.name, "from": record["from"], "to": record["to"],
                   "kind": record["kind"], "ok": result.ok, "rolled_back": result.rolled_back,
                   "detail": result.detail, "timings": result.timings})
        self.save()
        self.d.fire({"event": "transition", "wizard": self.w.name, "from": record["from"],
                     "to": record["to"], "kind": record["kind"], "reason": record["reason"],
                     "ok": result.ok, "rolled_back": result.rolled_back, "detail": result.detail,
                     "timings": result.timings, "at": iso(record["at"])})

    def _flush_alerts(self) -> None:
        for alert in self.policy.drain_events():
            loud = alert.kind in ("dark", "key_rejected")
            (log.error if loud else log.warning)(
                f"alert: {alert.kind}", extra={"wizard": self.w.name, "backend": alert.backend,
                                               "detail": alert.detail})
            self.d.fire({"event": alert.kind, "wizard": self.w.name, "backend": alert.backend,
                         "active": self.policy.active, "detail": alert.detail, "at": iso(alert.at)})

    # --- manual requests ----------------------------------------------------------------------

    def _settle_waiters(self) -> None:
        p = self.policy
        pending = p.forced is not None or (p.pinned is not None and p.pinned != p.active)
        if pending:
            return
        for wanted, fut in self._waiters:
            if not fut.done():
                last = p.transitions[-1] if p.transitions else None
                ok = p.active == wanted
                reply = {"ok": ok, "wizard": self.w.name, "active": p.active, "transition": last}
                if not ok:
                    reply["error"] = (f"{self.w.name} is on {p.active}, not {wanted}: "
                                      f"{(last or {}).get('detail') or 'the target failed its pre-switch probe'}")
                fut.set_result(reply)
        self._waiters.clear()

    async def request(self, op: str, to: str | None, wait: bool, timeout: float) -> dict:
        now = self.clock()
        p = self.policy
        try:
            if op == "failover":
                target = p.force(to, now)
            elif op == "pin":
                target = p.pin(to, now)
            else:
                p.release()
                self.save()
                return {"ok": True, "wizard": self.w.name, "active": p.active, "pinned": None}
        except PolicyError as exc:
            return {"ok": False, "wizard": self.w.name, "error": str(exc)}
        self.save()
        self.wake.set()
        if not wait or target == p.active:
            return {"ok": True, "wizard": self.w.name, "active": p.active, "target": target,
                    "pinned": p.pinned, "queued": target != p.active}
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return {"ok": False, "wizard": self.w.name, "active": p.active,
                    "error": f"still not on {target} after {timeout:.0f}s; the request stays queued"}

    def healthy(self) -> bool:
        if self.switching:
            return True  # bounded by switch's own timeouts
        stall = 3 * self.w.probe.interval + 2 * self.w.probe.timeout + 30
        return time.monotonic() - self.last_tick < stall

    def status(self) -> dict:
        now = self.clock()
        view = self.policy.describe(now)
        view["since_iso"] = iso(view["since"])
        view["switching"] = self.switching
        view["deferred"] = self.deferred
        for t in view["transitions"]:
            t["at_iso"] = iso(t.get("at"))
        return view


class Daemon:
    def __init__(self, cfg: SidecarConfig, *, systemctl: list[str] | None = None,
                 switch_fn: SwitchFn | None = None, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.systemctl = list(systemctl) if systemctl else systemctl_from_env()
        self.switch_fn = switch_fn or switch
        self.clock = clock
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None
        self.runners: dict[str, WizardRunner] = {}
        self._tasks: list[asyncio.Task] = []
        self._hook_tasks: set[asyncio.Task] = set()
        self._servers: list[asyncio.Server] = []
        self._stopping = asyncio.Event()

    # --- outputs ------------------------------------------------------------------------------

    def fire(self, event: dict) -> None:
        """Run the hooks in the background: a slow webhook must not hold up failover."""
        task = asyncio.get_running_loop().create_task(
            hooks.notify(event, self.cfg.hooks, self.cfg.secrets, self.client))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    def status(self) -> dict:
        return {"at": iso(self.clock()), "wizards": {n: r.status() for n, r in self.runners.items()}}

    def render_metrics(self) -> str:
        return self.metrics.render({n: ([b.name for b in r.w.backends], r.policy.active, r.policy.dark)
                                    for n, r in self.runners.items()})

    def healthy(self) -> bool:
        return (bool(self._tasks) and all(not t.done() for t in self._tasks)
                and all(r.healthy() for r in self.runners.values()))

    def _status_line(self) -> str:
        parts = [f"{n}:{r.policy.active or '?'}{'(dark)' if r.policy.dark else ''}"
                 f"{'(pinned)' if r.policy.pinned else ''}" for n, r in self.runners.items()]
        return "STATUS=" + " ".join(parts)

    async def handle_control(self, request: dict, peer_uid: int) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": self.status()}
        runner = self.runners.get(request.get("wizard"))
        if runner is None:
            return {"ok": False, "error": f"unknown wizard {request.get('wizard')!r} "
                                          f"(on this host: {', '.join(self.runners)})"}
        to = request.get("to")
        if to is not None and not isinstance(to, str):
            return {"ok": False, "error": "'to' must be a backend name"}
        timeout = request.get("timeout", DEFAULT_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return {"ok": False, "error": "'timeout' must be a positive number of seconds"}
        reply = await runner.request(op, to, bool(request.get("wait", True)), float(timeout))
        log.warning("operator request", extra={"op": op, "wizard": runner.w.name, "to": to,
                                               "peer_uid": peer_uid, "ok": reply.get("ok")})
        return reply

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.client = httpx.AsyncClient(follow_redirects=False)
        self.runners = {n: WizardRunner(w, self, self.clock) for n, w in self.cfg.wizards.items()}
        api = HttpApi(self.status, self.render_metrics, self.healthy)
        self._servers.append(await api.start(*self.cfg.listen))
        self._servers.append(await serve_control(self.cfg.control_socket, self.handle_control))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(r.run(), name=f"wizard-{n}") for n, r in self.runners.items()]
        interval = sdnotify.watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(self._watchdog(interval), name="watchdog"))
        sdnotify.notify("READY=1\n" + self._status_line())
        log.info("sidecar ready", extra={"listen": f"{self.cfg.listen[0]}:{self.cfg.listen[1]}",
                                         "control_socket": str(self.cfg.control_socket),
                                         "wizards": list(self.runners), "watchdog_interval": interval})

    async def _watchdog(self, interval: float) -> None:
        while True:
            # Only a loop that is really working pings: a stalled wizard task lets systemd restart us.
            if self.healthy():
                sdnotify.notify("WATCHDOG=1\n" + self._status_line())
            else:
                log.error("not pinging the watchdog: a wizard loop is stalled or dead")
            await asyncio.sleep(interval)

    def stop(self) -> None:
        self._stopping.set()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        sdnotify.notify("STOPPING=1")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._servers:
            s.close()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        if self._hook_tasks:
            await asyncio.wait(list(self._hook_tasks), timeout=10)
        for r in self.runners.values():
            r.save(force=True)
        try:
            os.unlink(self.cfg.control_socket)
        except FileNotFoundError:
            pass
        if self.client is not None:
            await self.client.aclose()


async def run(cfg: SidecarConfig, **kwargs) -> None:
    daemon = Daemon(cfg, **kwargs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.serve_forever()
