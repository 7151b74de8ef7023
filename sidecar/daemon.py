"""The sidecar's main loop: probe, plan, switch, remember, tell; reload; finish an interrupted switch.

One asyncio task per wizard, so a wizard in the middle of a switch (restart, a local model's cold
first turn: minutes) never delays another wizard's probes. The daemon is the I/O edge around the
pure policy (sidecar/policy.py), which decides everything: it reads two clocks and hands them in,
a monotonic one for every timer and the wall clock for records and the state file only.

A switch saves its intent to the state file before it touches the active config. A sidecar that
starts and finds an intent (it died mid-switch) or an active config other than the saved one
runs a check turn through the wizard's gateway on the backend the wizard is on before trusting
it, records how the switch ended (transitions, metrics, hooks) and, if the check failed, lets the
policy move the wizard to a healthy backend.

SIGHUP (`systemctl reload neverdark-sidecar`) reloads the config: a wizard added starts, a wizard
removed stops once any switch in flight has finished, a changed wizard takes its new settings
between two probe rounds, and unchanged wizards are not touched. An invalid config is refused,
logged, and the running one kept.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shlex
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable

import httpx

from sidecar import config as config_mod, flip, hooks, hooktest, jsonlog, sdnotify, state
from sidecar.config import ConfigError, SidecarConfig, WizardConfig
from sidecar.control import serve as serve_control
from sidecar.http_api import HttpApi
from sidecar.metrics import Metrics
from sidecar.passive import PassiveWatcher
from sidecar.policy import COMPLETED, ROLLED_BACK, Decision, Policy, PolicyError
from sidecar.probes import ProbeResult, probe
from sidecar.switch import SwitchResult, check, switch

log = logging.getLogger("sidecar")

DEFAULT_SYSTEMCTL = ("sudo", "-n", "/usr/bin/systemctl")
SYSTEMCTL_ENV = "NEVERDARK_SIDECAR_SYSTEMCTL"
DEFAULT_WAIT = 600.0
PRE_SWITCH_TIMEOUT = 15.0
PRE_SWITCH_TIMEOUT_LOCAL = 180.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# switch_fn(wizard, to, previous, client, systemctl, *, restart_permit) -> SwitchResult
SwitchFn = Callable[..., Awaitable[SwitchResult]]
# check_fn(wizard, backend, client, systemctl) -> SwitchResult (ok, detail, timings)
CheckFn = Callable[..., Awaitable[SwitchResult]]
OUTCOMES = {COMPLETED: "completed", ROLLED_BACK: "rolled_back"}


def systemctl_from_env() -> list[str]:
    raw = os.environ.get(SYSTEMCTL_ENV)
    return shlex.split(raw) if raw else list(DEFAULT_SYSTEMCTL)


def read_boot_id() -> str | None:
    """Tells a sidecar restart (the monotonic clock ran on) from a reboot (it began again)."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def iso(ts) -> str | None:
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return None


class WizardRunner:
    def __init__(self, wizard: WizardConfig, daemon: "Daemon") -> None:
        self.w = wizard
        self.d = daemon
        self.watcher = PassiveWatcher(wizard)
        self.wake = asyncio.Event()
        self.switching = False     # a switch or the check after a restart: bounded by their timeouts
        self.confirming = False    # the pre-switch deep probe: bounded by its timeout
        self.recovering = False    # finishing a switch found interrupted at start
        self.retiring = False      # removed by a reload: stop after the switch in flight
        self.pending: WizardConfig | None = None  # a reloaded config, applied between rounds
        self.last_tick = time.monotonic()
        self._sleep = wizard.probe.interval
        self._deferred_logged: str | None = None
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self._saved_key: tuple | None = None
        now, wall = daemon.clock(), daemon.wall()
        actual = flip.read_active_backend(wizard.active_config, wizard)
        saved = state.load(daemon.cfg.state_dir, wizard.name)
        self.policy = self._new_policy(wizard, now)
        if saved is not None:
            self.policy.restore(saved, now, wall, daemon.boot_id)
        note = self.policy.reconcile(actual, now, wall)
        if note:
            log.warning("reconciled start state", extra={"wizard": wizard.name, "note": note})
        log.info("wizard loaded", extra={"wizard": wizard.name, "active": self.policy.active,
                                         "pinned": self.policy.pinned,
                                         "check_pending": self.policy.needs_check})
        self.refresh_active()
        self.save(force=True)

    def refresh_active(self) -> None:
        """A deploy rewrote the variant the wizard is on (the active config is an older copy):
        bring the active config up to date, same backend, so the change reaches the gateway now
        rather than at the next switch. Never during a switch, which installs a variant itself."""
        if self.switching or self.policy.active is None:
            return
        try:
            if flip.refresh(self.w.active_config, self.w, self.policy.active):
                log.warning("variant changed by a deploy: active config refreshed",
                            extra={"wizard": self.w.name, "backend": self.policy.active})
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot refresh the active config", extra={
                "wizard": self.w.name, "error": f"{type(exc).__name__}: {exc}"})

    @staticmethod
    def _new_policy(wizard: WizardConfig, now: float) -> Policy:
        return Policy([b.name for b in wizard.backends], wizard.probe, None, now,
                      gateway=wizard.unit if wizard.restart else None)

    # --- persistence --------------------------------------------------------------------------

    def _count_turns(self, result) -> None:
        """Where each check turn on a local backend spent its time, for /metrics."""
        for backend, breakdown in result.turns:
            self.d.metrics.local_turn(self.w.name, backend, breakdown)

    def save(self, force: bool = False) -> None:
        key = self.policy.fingerprint()
        if force or key != self._saved_key:
            snap = self.policy.snapshot(self.d.clock(), self.d.wall(), self.d.boot_id)
            state.save(self.d.cfg.state_dir, self.w.name, snap)
            self._saved_key = key

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.retiring:
            if self.pending is not None:
                self._apply(self.pending)
            try:
                if self.policy.needs_check:
                    # Finished only once the wizard is on a backend that answered: the round
                    # after a failed check moves it, so it counts as part of the switch.
                    self.recovering = True
                    try:
                        await self._recover()
                        await self.tick()
                    finally:
                        self.recovering = False
                else:
                    await self.tick()
            except Exception:  # noqa: BLE001 -- log and keep watching; the watchdog sees stalls
                log.exception("wizard tick failed", extra={"wizard": self.w.name})
            self.last_tick = time.monotonic()
            if self.retiring:
                break
            try:
                await asyncio.wait_for(self.wake.wait(), self._sleep)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
        self._fail_waiters(f"{self.w.name} was removed from the sidecar's config by a reload")

    def _probe_now(self, backend, now: float) -> bool:
        # A provider that asked us to wait is left alone until its Retry-After.
        return not self.policy.held(backend.name, now)

    async def _probe(self, backend, deep: bool, timeout: float | None = None) -> ProbeResult:
        r = await probe(backend, self.d.client, timeout or self.w.probe.timeout, deep=deep)
        self.d.metrics.probe(self.w.name, r)
        if not r.ok:
            log.info("probe failed", extra={"wizard": self.w.name, "backend": r.backend,
                                            "reason": r.reason, "status": r.status,
                                            "detail": r.detail, "deep": deep})
        return r

    async def tick(self) -> None:
        now = self.d.clock()
        paid = self.w.probe.paid_probe
        todo = [b for b in self.w.backends if self._probe_now(b, now)]
        # Deep probes on a local model are kept for just before a switch: every one would evict
        # the prompt prefix the wizard's real turns rely on.
        results = await asyncio.gather(*(self._probe(b, deep=paid and b.kind != "local") for b in todo))
        for r in results:
            self.policy.observe_result(r, self.d.clock())
        for r in await asyncio.to_thread(self.watcher.poll):
            if r.backend:
                self.d.metrics.probe(self.w.name, r)
                self.policy.observe_result(r, self.d.clock())
        await self._act()
        self._flush_alerts()
        self._settle_waiters()
        self.save()

    async def _act(self) -> None:
        self._sleep = self.w.probe.interval
        plan = self.policy.plan(self.d.clock())
        if plan is None or plan.action != "defer":
            self._deferred_logged = None
        if plan is None:
            return
        if plan.action == "defer":
            if self._deferred_logged != plan.decision.target:
                log.warning("switch deferred: restart budget", extra={
                    "wizard": self.w.name, "to": plan.decision.target,
                    "seconds": round(plan.wait, 1)})
            self._deferred_logged = plan.decision.target
            self._sleep = min(self._sleep, max(plan.wait, 0.05))
            return
        if plan.action == "confirm":
            target = self.w.backend(plan.decision.target)
            # A local server answers one request at a time: this probe may queue behind a whole
            # prefill (the wizards' own per-turn fallbacks land there during an outage).
            wait = PRE_SWITCH_TIMEOUT_LOCAL if target.kind == "local" else PRE_SWITCH_TIMEOUT
            self.confirming = True
            try:
                r = await self._probe(target, deep=True, timeout=max(wait, self.w.probe.timeout))
            finally:
                self.confirming = False
            self.policy.observe_result(r, self.d.clock())
            plan = self.policy.plan(self.d.clock())
            if plan is None or plan.action != "switch" or plan.decision.target != target.name:
                log.warning("switch called off: pre-switch deep probe failed",
                            extra={"wizard": self.w.name, "to": target.name})
                return
        await self._switch(plan.decision)

    def _restart_permit(self) -> str | None:
        refusal = self.policy.take_restart(self.d.clock())
        if refusal is None:
            self.save(force=True)  # counted on disk before the restart: a crash cannot forget it
        return refusal

    async def _switch(self, decision: Decision) -> None:
        previous = self.w.backend(self.policy.active) if self.policy.active else None
        target = self.w.backend(decision.target)
        log.warning("switching", extra={"wizard": self.w.name, "from": self.policy.active,
                                        "to": target.name, "kind": decision.kind,
                                        "reason": decision.reason})
        self.policy.begin(decision, self.d.wall())
        try:
            self.save(force=True)  # the intent is on disk before the active config is touched
        except BaseException:
            self.policy.abandon()
            raise
        self.switching = True
        try:
            result = await self.d.switch_fn(self.w, target, previous, self.d.client,
                                            self.d.systemctl, restart_permit=self._restart_permit)
        except Exception as exc:  # noqa: BLE001 -- a crashed switch is a failed switch
            log.exception("switch crashed", extra={"wizard": self.w.name})
            result = SwitchResult(False, False, f"switch crashed: {type(exc).__name__}: {exc}", {})
        finally:
            self.switching = False
        self._count_turns(result)
        record = self.policy.commit(decision, self.d.clock(), result.ok, result.detail,
                                    wall=self.d.wall(), timings=result.timings)
        if result.ok:
            self.d.metrics.transition(self.w.name, decision.kind)
        (log.warning if result.ok else log.error)(
            "switch done" if result.ok else "switch failed",
            extra={"wizard": self.w.name, "from": record["from"], "to": record["to"],
                   "kind": record["kind"], "ok": result.ok, "rolled_back": result.rolled_back,
                   "detail": result.detail, "timings": record["timings"]})
        self.save(force=True)
        self.d.fire({"event": "transition", "wizard": self.w.name, "from": record["from"],
                     "to": record["to"], "kind": record["kind"], "reason": record["reason"],
                     "ok": result.ok, "rolled_back": result.rolled_back, "detail": result.detail,
                     "timings": record["timings"], "at": iso(record["at"])})

    async def _recover(self) -> None:
        """Finish a switch a stopped sidecar left unfinished: check, record, tell."""
        intent = self.policy.intent or {}
        name = intent.get("check")
        log.warning("checking the backend found after an interrupted switch", extra={
            "wizard": self.w.name, "from": intent.get("from"), "to": intent.get("to"),
            "outcome": intent.get("outcome"), "check": name})
        self.switching = True
        try:
            if name not in {b.name for b in self.w.backends}:
                result = SwitchResult(False, False, "the active config matches no configured backend", {})
            else:
                await self._hermes_failures(name)  # logged before the check: not the check's
                result = await self.d.check_fn(self.w, self.w.backend(name), self.d.client,
                                               self.d.systemctl)
                self._count_turns(result)
                # Hermes' own per-turn fallback can answer a turn whose call to `name` failed,
                # and its session record may still name `name`'s model (seen on the test fleet:
                # the failed call was counted first, so the fallback's usage never became the
                # session's route). What Hermes logged meanwhile is the second witness.
                failed = await self._hermes_failures(name) if result.ok else []
                if failed:
                    result = SwitchResult(False, False, (
                        f"the turn was answered, but not by {name}: Hermes logged a failed call "
                        f"to it ({failed[-1].detail}) and its own fallback answered"),
                        result.timings)
        except Exception as exc:  # noqa: BLE001 -- a crashed check is a failed check
            log.exception("check crashed", extra={"wizard": self.w.name})
            result = SwitchResult(False, False, f"check crashed: {type(exc).__name__}: {exc}", {})
        finally:
            self.switching = False
        record = self.policy.recovered(self.d.clock(), self.d.wall(), result.ok, result.detail,
                                       result.timings)
        outcome = OUTCOMES.get(record["recovered"], "interrupted")
        self.d.metrics.recovery(self.w.name, outcome)
        if record["ok"]:
            self.d.metrics.transition(self.w.name, record["kind"])
        (log.warning if result.ok else log.error)(
            "interrupted switch recorded", extra={
                "wizard": self.w.name, "from": record["from"], "to": record["to"],
                "outcome": record["recovered"], "check_ok": result.ok, "detail": record["detail"],
                "active": self.policy.active})
        self.save(force=True)
        self.d.fire({"event": "transition", "wizard": self.w.name, "from": record["from"],
                     "to": record["to"], "kind": record["kind"], "reason": record["reason"],
                     "ok": record["ok"], "rolled_back": outcome == "rolled_back",
                     "recovered": record["recovered"], "active": self.policy.active,
                     "check": record["check"], "detail": record["detail"],
                     "timings": record["timings"], "at": iso(record["at"])})
        self._flush_alerts()

    async def _hermes_failures(self, backend: str) -> list[ProbeResult]:
        """Read what the gateway logged since the last look (fed to the policy as every round
        does) and return its failed calls to `backend`."""
        results = await asyncio.to_thread(self.watcher.poll)
        for r in results:
            if r.backend:
                self.d.metrics.probe(self.w.name, r)
                self.policy.observe_result(r, self.d.clock())
        return [r for r in results if r.backend == backend and not r.ok]

    def _flush_alerts(self) -> None:
        for alert in self.policy.drain_events():
            loud = alert.kind in ("dark", "key_rejected")
            (log.error if loud else log.warning)(
                f"alert: {alert.kind}", extra={"wizard": self.w.name, "backend": alert.backend,
                                               "detail": alert.detail})
            self.d.fire({"event": alert.kind, "wizard": self.w.name, "backend": alert.backend,
                         "active": self.policy.active, "detail": alert.detail,
                         "at": iso(self.d.wall())})

    # --- reload -------------------------------------------------------------------------------

    def reconfigure(self, wizard: WizardConfig) -> None:
        """Take a reloaded config between two probe rounds (a round in flight finishes first)."""
        self.pending = wizard
        self.wake.set()

    def _apply(self, new: WizardConfig) -> None:
        self.pending = None
        old, self.w = self.w, new
        if ([b.name for b in old.backends] != [b.name for b in new.backends]
                or (old.unit, old.restart, old.active_config) != (new.unit, new.restart, new.active_config)):
            # A new chain: a new policy, fed this one's memory (same process: exact).
            now, wall = self.d.clock(), self.d.wall()
            snap = self.policy.snapshot(now, wall, self.d.boot_id)
            policy = self._new_policy(new, now)
            policy.restore(snap, now, wall, self.d.boot_id)
            note = policy.reconcile(flip.read_active_backend(new.active_config, new), now, wall)
            self.policy = policy
            if note:
                log.warning("reconciled after reload", extra={"wizard": new.name, "note": note})
        else:
            self.policy.s = new.probe
        if (old.home, old.unit) != (new.home, new.unit):
            self.watcher = PassiveWatcher(new)
        else:
            self.watcher.wizard = new
        log.warning("wizard reconfigured", extra={"wizard": new.name, "active": self.policy.active})
        self.save(force=True)

    def retire(self) -> None:
        self.retiring = True
        self.wake.set()

    # --- manual requests ----------------------------------------------------------------------

    def _fail_waiters(self, error: str) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result({"ok": False, "wizard": self.w.name, "active": self.policy.active,
                                "error": error})
        self._waiters.clear()

    def _settle_waiters(self) -> None:
        p = self.policy
        pending = p.forced is not None or (p.pinned is not None and p.pinned != p.active)
        if pending:
            return
        for wanted, fut in self._waiters:
            if not fut.done():
                last = p.transitions[-1] if p.transitions else None
                ok = p.active == wanted
                reply = {"ok": ok, "wizard": self.w.name, "active": p.active,
                         "transition": dict(last) if last else None}
                if not ok:
                    reply["error"] = (f"{self.w.name} is on {p.active}, not {wanted}: "
                                      f"{(last or {}).get('detail') or 'the target failed its pre-switch probe'}")
                fut.set_result(reply)
        self._waiters.clear()

    async def request(self, op: str, to: str | None, wait: bool, timeout: float,
                      stay: float | None = None) -> dict:
        now = self.d.clock()
        p = self.policy
        try:
            if op == "failover":
                target = p.force(to, now, stay)
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
        if self.switching or self.confirming or self.recovering:
            return True  # bounded by the switch's, the check's or the probe's own timeouts
        stall = 3 * self.w.probe.interval + 2 * self.w.probe.timeout + 30
        return time.monotonic() - self.last_tick < stall

    def status(self) -> dict:
        view = self.policy.describe(self.d.clock(), self.d.wall())
        view["since_iso"] = iso(view["since"])
        view["switching"] = self.switching or self.recovering
        view["retiring"] = self.retiring
        for t in view["transitions"]:
            t["at_iso"] = iso(t.get("at"))
        return view


class Daemon:
    def __init__(self, cfg: SidecarConfig, *, systemctl: list[str] | None = None,
                 switch_fn: SwitchFn | None = None, check_fn: CheckFn | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, boot_id: str | None = None) -> None:
        """`clock`: the monotonic clock every timer runs on; `wall`: the time of day, for records
        and the state file; `boot_id`: which boot `clock` counts from (default: the kernel's)."""
        self.cfg = cfg
        self.systemctl = list(systemctl) if systemctl else systemctl_from_env()
        self.switch_fn = switch_fn or switch
        self.check_fn = check_fn or check
        self.clock = clock
        self.wall = wall
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None
        self.runners: dict[str, WizardRunner] = {}
        self._runner_tasks: dict[str, asyncio.Task] = {}
        self._retiring: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._hook_tasks: set[asyncio.Task] = set()
        self._http: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # start and reloads, one at a time

    # --- outputs ------------------------------------------------------------------------------

    def fire(self, event: dict) -> None:
        """Run the hooks in the background: a slow webhook must not hold up failover."""
        task = asyncio.get_running_loop().create_task(
            hooks.notify(event, self.cfg.hooks, self.cfg.secrets, self.client))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    def status(self) -> dict:
        return {"at": iso(self.wall()), "wizards": {n: r.status() for n, r in self.runners.items()}}

    def render_metrics(self) -> str:
        return self.metrics.render({n: ([b.name for b in r.w.backends], r.policy.active, r.policy.dark)
                                    for n, r in self.runners.items()})

    def healthy(self) -> bool:
        tasks = [*self._runner_tasks.values(), *self._tasks]
        return (bool(self._runner_tasks) and all(not t.done() for t in tasks)
                and all(r.healthy() for r in self.runners.values()))

    def _status_line(self) -> str:
        parts = [f"{n}:{r.policy.active or '?'}{'(dark)' if r.policy.dark else ''}"
                 f"{'(pinned)' if r.policy.pinned else ''}" for n, r in self.runners.items()]
        return "STATUS=" + " ".join(parts)

    async def handle_control(self, request: dict, peer_uid: int) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == hooktest.OP:
            return await hooktest.handle(self, request)
        runner = self.runners.get(request.get("wizard"))
        if runner is None or runner.retiring:
            return {"ok": False, "error": f"unknown wizard {request.get('wizard')!r} "
                                          f"(on this host: {', '.join(self._serving())})"}
        to = request.get("to")
        if to is not None and not isinstance(to, str):
            return {"ok": False, "error": "'to' must be a backend name"}
        timeout = request.get("timeout", DEFAULT_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return {"ok": False, "error": "'timeout' must be a positive number of seconds"}
        stay = request.get("stay")
        if stay is not None and (isinstance(stay, bool) or not isinstance(stay, (int, float))
                                 or not 0 < stay < float("inf")):
            return {"ok": False, "error": "'stay' must be a positive number of seconds"}
        reply = await runner.request(op, to, bool(request.get("wait", True)), float(timeout),
                                     None if stay is None else float(stay))
        log.warning("operator request", extra={"op": op, "wizard": runner.w.name, "to": to,
                                               "peer_uid": peer_uid, "ok": reply.get("ok")})
        return reply

    def _serving(self) -> list[str]:
        return [n for n, r in self.runners.items() if not r.retiring]

    # --- lifecycle ----------------------------------------------------------------------------

    def _api(self) -> HttpApi:
        return HttpApi(self.status, self.render_metrics, self.healthy)

    def _start_runner(self, name: str, runner: WizardRunner) -> None:
        self.runners[name] = runner
        self._runner_tasks[name] = asyncio.get_running_loop().create_task(
            runner.run(), name=f"wizard-{name}")

    async def start(self) -> None:
        async with self._lock:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.client = httpx.AsyncClient(follow_redirects=False)
            runners = {n: WizardRunner(w, self) for n, w in self.cfg.wizards.items()}
            self._http = await self._api().start(*self.cfg.listen)
            self._control = await serve_control(self.cfg.control_socket, self.handle_control)
            for name, runner in runners.items():
                self._start_runner(name, runner)
            interval = sdnotify.watchdog_interval()
            if interval:
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self._watchdog(interval), name="watchdog"))
            sdnotify.notify("READY=1\n" + self._status_line())
            log.info("sidecar ready", extra={"listen": f"{self.cfg.listen[0]}:{self.cfg.listen[1]}",
                                             "control_socket": str(self.cfg.control_socket),
                                             "wizards": list(self.runners),
                                             "watchdog_interval": interval})

    async def _watchdog(self, interval: float) -> None:
        while True:
            # Only a loop that is really working pings: a stalled wizard task lets systemd restart us.
            if self.healthy():
                sdnotify.notify("WATCHDOG=1\n" + self._status_line())
            else:
                log.error("not pinging the watchdog: a wizard loop is stalled or dead")
            await asyncio.sleep(interval)

    def request_reload(self) -> None:
        """The SIGHUP handler: reload in the background (the signal handler must not block)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> bool:
        """Load the config file again and apply it; False (and nothing changed) if it is invalid."""
        async with self._lock:
            sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                return await self._reload()
            finally:
                sdnotify.notify("READY=1\n" + self._status_line())

    async def _reload(self) -> bool:
        try:
            new = await asyncio.to_thread(config_mod.load, self.cfg.path)
        except ConfigError as exc:
            log.error("reload refused: invalid config; the running one is kept",
                      extra={"error": str(exc)})
            return False
        # New listeners first: if one cannot be had, nothing has changed yet.
        http = control = None
        try:
            if new.listen != self.cfg.listen:
                http = await self._api().start(*new.listen)
            if new.control_socket != self.cfg.control_socket:
                control = await serve_control(new.control_socket, self.handle_control)
            new.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            for server in (http, control):
                if server is not None:
                    server.close()
            log.error("reload refused: cannot apply it; the running config is kept",
                      extra={"error": f"{type(exc).__name__}: {exc}"})
            return False
        old, self.cfg = self.cfg, new
        jsonlog.add_secrets(new.secrets)
        if http is not None:
            self._http.close()
            self._http = http
        if control is not None:
            self._control.close()
            try:
                os.unlink(old.control_socket)
            except FileNotFoundError:
                pass
            self._control = control
        removed = [n for n, r in self.runners.items() if n not in new.wizards and not r.retiring]
        changed = [n for n, w in new.wizards.items() if n in self.runners
                   and not self.runners[n].retiring and self.runners[n].w != w]
        added = [n for n in new.wizards if n not in self.runners or self.runners[n].retiring]
        for name in removed:
            self._retire(name)
        for name in changed:
            self.runners[name].reconfigure(new.wizards[name])
        for name in added:
            if name in self._retiring:  # removed and added back: the old task finishes first
                await asyncio.gather(self._retiring[name], return_exceptions=True)
            try:
                runner = WizardRunner(new.wizards[name], self)
            except Exception:  # noqa: BLE001 -- one wizard's files must not stop the others
                log.exception("cannot start wizard after reload", extra={"wizard": name})
                continue
            self._start_runner(name, runner)
        for name, runner in self.runners.items():
            if name not in added and not runner.retiring:
                runner.refresh_active()
        log.warning("config reloaded", extra={
            "added": added, "removed": removed, "changed": changed,
            "unchanged": [n for n in new.wizards if n not in added and n not in changed]})
        return True

    def _retire(self, name: str) -> None:
        runner, task = self.runners[name], self._runner_tasks.pop(name)
        runner.retire()
        if not runner.switching:
            task.cancel()  # between rounds, probing or confirming: nothing to finish

        async def finish() -> None:
            await asyncio.gather(task, return_exceptions=True)
            runner._fail_waiters(f"{name} was removed from the sidecar's config by a reload")
            runner.save(force=True)
            if self.runners.get(name) is runner:
                del self.runners[name]
            log.warning("wizard removed", extra={"wizard": name, "active": runner.policy.active})

        done = asyncio.get_running_loop().create_task(finish(), name=f"retire-{name}")
        self._retiring[name] = done
        done.add_done_callback(lambda _t: self._retiring.pop(name, None))

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
        tasks = [*self._runner_tasks.values(), *self._retiring.values(), *self._tasks,
                 *self._background]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        servers = [s for s in (self._http, self._control) if s is not None]
        for s in servers:
            s.close()
        for s in servers:
            await s.wait_closed()
        self._http = self._control = None
        if self._hook_tasks:
            await asyncio.wait(list(self._hook_tasks), timeout=10)
        # A switch cancelled here keeps its intent in the file: the next start finishes it.
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
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    await daemon.serve_forever()
