"""One wizard's loop: probe its backends, feed the policy, act on its plan; answer operators.

One asyncio task per wizard (the daemon starts it), so a wizard in the middle of a switch
(restart, a local model's cold first turn: minutes) never delays another wizard's probes. The
runner is the I/O edge around the wizard's pure policy (sidecar/policy.py): it reads the two
clocks and hands them in, a monotonic one for every timer and the wall clock for records only.

A switch saves its intent to the state file before it touches the active config. A runner that
starts and finds an intent (the sidecar died mid-switch) or an active config other than the saved
one runs a check turn through the wizard's gateway on the backend the wizard is on before
trusting it, records how the switch ended, and, if the check failed, lets the policy move the
wizard to a healthy backend. What it reports goes through sidecar/events.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from sidecar import flip, state
from sidecar.config import WizardConfig
from sidecar.events import iso
from sidecar.passive import PassiveWatcher
from sidecar.policy import Decision, Policy, PolicyError
from sidecar.probes import ProbeResult, probe
from sidecar.switch import SwitchResult

if TYPE_CHECKING:
    from sidecar.daemon import Daemon

log = logging.getLogger("sidecar")

PRE_SWITCH_TIMEOUT = 15.0
PRE_SWITCH_TIMEOUT_LOCAL = 180.0


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
        self.pending_fresh: set[str] = set()      # its backends whose probe target changed
        self.last_tick = time.monotonic()
        self._sleep = wizard.probe.interval
        self._deferred_logged: str | None = None
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self._saved_key: tuple | None = None
        now, wall = daemon.clock(), daemon.wall()
        actual = flip.read_active_backend(wizard.active_config, wizard)
        saved = state.load(daemon.cfg.state_dir, wizard.name)
        self.policy = Policy([b.name for b in wizard.backends], wizard.probe, None, now,
                             gateway=wizard.unit if wizard.restart else None)
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

    # --- persistence --------------------------------------------------------------------------

    def save(self, force: bool = False) -> None:
        key = self.policy.fingerprint()
        if force or key != self._saved_key:
            snap = self.policy.snapshot(self.d.clock(), self.d.wall(), self.d.boot_id)
            state.save(self.d.cfg.state_dir, self.w.name, snap)
            self._saved_key = key

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while not self.retiring:
            try:
                if self.pending is not None:
                    self._apply(self.pending)
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
        self.fail_waiters(f"{self.w.name} was removed from the sidecar's config by a reload")

    def _probe_now(self, backend, now: float) -> bool:
        # A provider that asked us to wait is left alone until its Retry-After.
        return not self.policy.held(backend.name, now)

    async def _probe(self, backend, deep: bool, timeout: float | None = None) -> ProbeResult:
        r = await probe(backend, self.d.client, timeout or self.w.probe.timeout, deep=deep)
        self.d.events.probed(self.w.name, r, deep)
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
        await self._passive()
        await self._act()
        self._flush_alerts()
        self.d.events.calm(self.w.name, self.calm())
        self._settle_waiters()
        self.save()

    def calm(self) -> bool:
        """On its primary, not dark, no key rejected: an operator notice's incident may end."""
        p = self.policy
        return (p.active == self.w.backends[0].name and not p.dark and not self.switching
                and not any(h.key_rejected for h in p.health.values()))

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
        self.d.events.check_turns(self.w.name, result)
        record = self.policy.commit(decision, self.d.clock(), result.ok, result.detail,
                                    wall=self.d.wall(), timings=result.timings)
        self.save(force=True)
        self.d.events.switched(self.w.name, record, result)

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
                self.d.events.check_turns(self.w.name, result)
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
        self.save(force=True)
        self.d.events.recovered(self.w.name, record, result.ok, self.policy.active)
        self._flush_alerts()

    async def _passive(self) -> list[ProbeResult]:
        """Feed the policy what the gateway logged since the last look; returns it."""
        results = await asyncio.to_thread(self.watcher.poll)
        for r in results:
            if r.backend:
                self.d.events.probed(self.w.name, r)
                self.policy.observe_result(r, self.d.clock())
        return results

    async def _hermes_failures(self, backend: str) -> list[ProbeResult]:
        """What the gateway logged since the last look (fed to the policy as every round does):
        its failed calls to `backend`."""
        return [r for r in await self._passive() if r.backend == backend and not r.ok]

    def _flush_alerts(self) -> None:
        self.d.events.alerts(self.w.name, self.policy.drain_events(), self.policy.active)

    # --- reload (sidecar/reload.py decides what changed) ---------------------------------------

    def reconfigure(self, wizard: WizardConfig, fresh: set[str]) -> None:
        """Take a reloaded config between two probe rounds (a round in flight finishes first).
        `fresh`: its backends whose probe target changed (what was observed of them is void)."""
        self.pending = wizard
        self.pending_fresh |= fresh
        self.wake.set()

    def _apply(self, new: WizardConfig) -> None:
        fresh, self.pending, self.pending_fresh = self.pending_fresh, None, set()
        old, self.w = self.w, new
        now, wall = self.d.clock(), self.d.wall()
        # The same policy, its memory kept in place (stay, holds, dwell, budget: exact).
        self.policy.reconfigure([b.name for b in new.backends], new.probe, now,
                                gateway=new.unit if new.restart else None, fresh=fresh)
        actual = flip.read_active_backend(new.active_config, new)
        if self.policy.active is None or (actual is not None and actual != self.policy.active):
            note = self.policy.reconcile(actual, now, wall)
            if note:
                log.warning("reconciled after reload", extra={"wizard": new.name, "note": note})
        if (old.home, old.unit) != (new.home, new.unit):
            self.watcher = PassiveWatcher(new)
        else:
            self.watcher.wizard = new
        self.refresh_active()
        log.warning("wizard reconfigured", extra={"wizard": new.name, "active": self.policy.active})
        self.save(force=True)

    def retire(self) -> None:
        self.retiring = True
        self.wake.set()

    # --- manual requests ----------------------------------------------------------------------

    def fail_waiters(self, error: str) -> None:
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
