"""Which backend one wizard should be on, and when it may move: the failure policy, pure.

No I/O, no asyncio, no clock reads. The daemon feeds observations (`observe`), asks for a `plan`
each probe round and does what it says (a pre-switch deep probe, or the switch), announcing a
switch before it touches the active config (`begin`, persisted first) and reporting back
(`commit`). Queries (`describe`, `fingerprint`, `snapshot`, `held`, ...) never change the policy:
only observations, requests, the tick (`decide`/`plan`) and switches do.

Two clocks, passed in: `now` (monotonic) runs every timer, so NTP stepping the wall clock changes
no decision; `wall` only stamps records and the state file (sidecar/persistence.py, which also
carries the memory across a reload). Per-backend health: sidecar/health.py; the restart budget:
sidecar/budget.py.

Rules (thresholds from ProbeSettings):
- a backend turns unhealthy after `fall` consecutive failures and healthy after `rise` passes;
- a 429 makes it unavailable at once until its Retry-After (else `cooldown_429`), never longer than
  `max_hold`: the status and the alert name a provider's hint that was capped;
- a 401/403 makes it unavailable at once ("key rejected") until `rise` passes;
- failover (the active one is unusable) happens at once, to the highest-priority eligible backend;
- failback to a higher-priority backend needs `rise` passes and a dwell of `min_dwell` plus the
  flap-damping hold; the hold doubles with each switch that follows soon after another;
- the target of any switch must have a fresh passing observation, and just before the switch a
  passing deep probe (a real generation): `plan` asks for one ("confirm") before it says "switch";
- a switch that restarts the gateway needs a slot in the restart budget; until there is one it
  is deferred ("defer");
- nothing eligible while the active is unusable: stay, and raise "dark";
- a switch leaves an intent until its commit; a sidecar that died mid-switch finds it on start
  (`reconcile`), and `recovered` records how that switch ended once the daemon's check turn says
  whether the backend the wizard is on answers;
- a reload (`reconfigure`) keeps all of this memory that still means the same under the new config.

Why one module: the rules above act on one another (a failover moves the dwell, the damping hold
and the restart budget's deferral at once; a reload re-keys all of them), and `plan` reads them
as one state. What stands alone is already apart (health, budget, persistence); split further,
one decision would be spread over several files.
"""

from __future__ import annotations

from collections import deque
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from sidecar import persistence
from sidecar.budget import STORM_MAX, STORM_WINDOW, RestartBudget
from sidecar.health import Health, finite_seconds
from sidecar.persistence import COMPLETED, MAX_TRANSITIONS, ROLLED_BACK

__all__ = ["Alert", "COMPLETED", "Decision", "Plan", "Policy", "PolicyError", "ROLLED_BACK",
           "STORM_MAX", "STORM_WINDOW"]   # the daemon and the tests import these from here


class PolicyError(ValueError):
    """A manual request the policy refuses; the message says why, for the operator."""


@dataclass(frozen=True)
class Decision:
    target: str
    reason: str
    kind: str  # 'failover' | 'failback' | 'manual'


@dataclass(frozen=True)
class Plan:
    """What the daemon should do next about a decision."""
    action: str   # 'defer' (restart budget spent) | 'confirm' (deep-probe the target) | 'switch'
    decision: Decision
    wait: float = 0.0   # 'defer': seconds until the budget has a slot


@dataclass(frozen=True)
class Alert:
    kind: str  # 'dark' | 'undark' | 'key_rejected' | 'rate_limited'
    backend: str | None
    detail: str
    at: float  # monotonic


class Policy:
    def __init__(self, backends: Sequence[str], settings, active: str | None, now: float,
                 why: str = "found on start", *, gateway: str | None = None) -> None:
        """`gateway`: the unit a switch restarts (its restarts are budgeted), None when switches
        restart nothing."""
        self.order = self._chain(backends)
        if active is not None and active not in backends:
            raise ValueError(f"active backend {active!r} is not configured")
        self.s = settings
        self.budget = RestartBudget(gateway)
        self.health = {b: Health() for b in self.order}
        self.active = active
        self.since = now
        self.why = why
        self.pinned: str | None = None
        self.forced: str | None = None
        # A drill's hold: no failback before `stay_until` (monotonic), so the turns a drill sends
        # reach the fallback it asked for; asked at `stay_from`, at most max_hold long. A
        # failover still happens.
        self.stay_until: float | None = None
        self.stay_from: float | None = None
        self.streak = 0           # switches in a row, each soon after the one before
        self.last_switch_at: float | None = None
        self.dark = False
        # The switch in flight: from, to, kind, reason, at (wall). After a restart `reconcile`
        # adds outcome and check (the backend the check turn must confirm).
        self.intent: dict | None = None
        self.deferred: str | None = None       # target of a switch waiting for the restart budget
        self.transitions: deque[dict] = deque(maxlen=MAX_TRANSITIONS)
        self.events: list[Alert] = []

    @staticmethod
    def _chain(backends: Sequence[str]) -> tuple[str, ...]:
        if len(set(backends)) != len(backends) or not backends:
            raise ValueError("backends must be distinct and non-empty")
        return tuple(backends)

    @property
    def gateway(self) -> str | None:
        return self.budget.unit

    @property
    def restarts(self) -> deque[float]:
        """Recent gateway restarts (monotonic), oldest first."""
        return self.budget.times

    @restarts.setter
    def restarts(self, times: Iterable[float]) -> None:
        self.budget.times = deque(times)

    # --- derived ------------------------------------------------------------------------------

    @property
    def fresh_window(self) -> float:
        # Two missed probe rounds make an observation too old to switch on.
        return 2 * self.s.interval + self.s.timeout

    @property
    def confirm_window(self) -> float:
        # A deep pass confirms a switch only if it was made in this probe round.
        return self.s.interval

    @property
    def quiet_period(self) -> float:
        # Longer than the longest damped dwell, so a streak at the cap does not reset itself.
        return 2 * (self.s.min_dwell + self.s.damping_cap)

    def damping_hold(self) -> float:
        if self.streak == 0:
            return 0.0
        return min(self.s.damping_cap, self.s.damping_base * 2 ** (self.streak - 1))

    def held(self, backend: str, now: float) -> bool:
        return self.health[backend].held(now)

    def usable(self, backend: str | None, now: float) -> bool:
        return backend is not None and self.health[backend].usable(now)

    def eligible(self, backend: str, now: float) -> bool:
        """May be switched onto now: usable, and its latest observation is a fresh pass."""
        return self.health[backend].fresh_pass(now, self.fresh_window)

    def confirmed(self, backend: str, now: float) -> bool:
        """Its latest observation passed and a deep probe passed within this probe round."""
        return self.health[backend].confirmed(now, self.confirm_window)

    def _why_unusable(self, backend: str | None, now: float) -> str:
        if backend is None:
            return "active config matches no configured backend"
        return self.health[backend].why_unusable(backend, now)

    # --- inputs -------------------------------------------------------------------------------

    def observe(self, backend: str, ok: bool, reason: str, now: float, *,
                status: int | None = None, retry_after: float | None = None,
                deep: bool = False) -> None:
        h = self.health.get(backend)
        if h is None:
            return  # a passive error the watcher could not attribute to a configured backend
        for kind, detail in h.observe(ok, reason, now, self.s, status=status,
                                      retry_after=retry_after, deep=deep):
            self._alert(kind, backend, detail, now)
        self._refresh_dark(now)

    def observe_result(self, result, now: float) -> None:
        """Feed a probes.ProbeResult (or anything with its fields)."""
        self.observe(result.backend, result.ok, result.reason, now, status=result.status,
                     retry_after=result.retry_after, deep=getattr(result, "deep", False))

    def _mark_failed(self, backend: str, now: float, reason: str) -> None:
        self.health[backend].mark_failed(now, reason, self.s.fall)

    # --- manual controls ----------------------------------------------------------------------

    def _check_backend(self, backend: str) -> None:
        if backend not in self.health:
            raise PolicyError(f"unknown backend {backend!r} (configured: {', '.join(self.order)})")

    def _check_switchable(self, backend: str, now: float) -> None:
        h = self.health[backend]
        if not self.usable(backend, now) or h.last_ok is not True:
            why = self._why_unusable(backend, now) if not self.usable(backend, now) else (
                f"{backend}: not probed yet" if h.last_ok is None
                else f"{backend}: last probe failed ({h.last_reason})")
            raise PolicyError(f"refusing to switch onto an unhealthy backend: {why}")

    def force(self, backend: str | None, now: float, stay: float | None = None) -> str:
        """Ask for a switch now (drills); returns the chosen target. Failback rules apply again
        once it is there, or `stay` seconds from now when given (at most max_hold)."""
        if backend is None:
            candidates = [b for b in self.order if b != self.active and self.usable(b, now)
                          and self.health[b].last_ok is True]
            if not candidates:
                raise PolicyError("no healthy backend to fail over to")
            backend = candidates[0]
        self._check_backend(backend)
        if self.pinned is not None and backend != self.pinned:
            raise PolicyError(f"pinned to {self.pinned}; release it first")
        if backend == self.active:
            raise PolicyError(f"already on {backend}")
        self._check_switchable(backend, now)
        self.forced = backend
        self.stay_from = now if stay else None
        self.stay_until = now + min(stay, self.s.max_hold) if stay else None
        return backend

    def pin(self, backend: str | None, now: float) -> str:
        """Stay on `backend` (default: the active one), switching there first if need be."""
        backend = backend or self.active
        if backend is None:
            raise PolicyError("no active backend to pin; name one")
        self._check_backend(backend)
        if backend != self.active:
            self._check_switchable(backend, now)
        self.pinned = backend
        self.forced = None
        return backend

    def release(self) -> None:
        self.pinned = None
        self.stay_until = self.stay_from = None

    # --- decisions ----------------------------------------------------------------------------

    def decide(self, now: float) -> Decision | None:
        """Where the wizard should be now, by the health rules alone (see `plan`). The tick: time
        passing is applied here (dark, a stay or a forced switch over, old restarts dropped)."""
        self._refresh_dark(now)
        self.budget.prune(now)
        if self.intent is not None:
            return None  # a switch is in flight, or awaits its check after a restart
        if self.pinned is not None:
            if self.pinned != self.active and self.eligible(self.pinned, now):
                return Decision(self.pinned, f"pinned to {self.pinned} by operator", "manual")
            return None
        if self.forced is not None:
            target = self.forced
            if target != self.active and self.eligible(target, now):
                return Decision(target, f"switch to {target} requested by operator", "manual")
            if target == self.active or self.health[target].last_ok is False or not self.usable(target, now):
                self.forced = None  # done already, or the target went bad: drop the request
        if not self.usable(self.active, now):
            for b in self.order:
                if b != self.active and self.eligible(b, now):
                    return Decision(b, self._why_unusable(self.active, now), "failover")
            return None
        if self.stay_until is not None:
            if now < self.stay_until:
                return None   # a drill holds its fallback; a failover above still happens
            self.stay_until = self.stay_from = None
        dwell = self.s.min_dwell + self.damping_hold()
        for b in self.order[:self.order.index(self.active)]:
            if self.eligible(b, now) and self.health[b].passes >= self.s.rise:
                if now - self.since >= dwell:
                    return Decision(b, f"{b} healthy again ({self.health[b].passes} passes)",
                                    "failback")
                return None
        return None

    def plan(self, now: float) -> Plan | None:
        """The next step: nothing, wait for the restart budget, confirm the target, or switch."""
        decision = self.decide(now)
        self.deferred = None
        if decision is None:
            return None
        # A switch that could not restart the gateway would fail and count as a transition; the
        # decision (a forced drill or failback included) waits for the budget instead.
        wait = self.budget.wait(now)
        if wait > 0:
            self.deferred = decision.target
            return Plan("defer", decision, wait)
        # Never onto a backend on the strength of a list-models answer alone: a real generation.
        if not self.confirmed(decision.target, now):
            return Plan("confirm", decision)
        return Plan("switch", decision)

    # --- the restart budget (sidecar/budget.py) -----------------------------------------------

    def restart_wait(self, now: float) -> float:
        """Seconds before a switch could restart the gateway (0: now, or never needed)."""
        return self.budget.wait(now)

    def take_restart(self, now: float) -> str | None:
        """Count a gateway restart about to happen; the refusal text instead if the budget is spent."""
        return self.budget.take(now)

    # --- switches -----------------------------------------------------------------------------

    def begin(self, decision: Decision, wall: float) -> dict:
        """A switch is about to touch the active config; the caller persists this first."""
        self.intent = {"from": self.active, "to": decision.target, "kind": decision.kind,
                       "reason": decision.reason, "at": wall}
        return dict(self.intent)

    def abandon(self) -> None:
        """The switch announced by `begin` never started (its intent could not be saved)."""
        self.intent = None

    def _switched(self, target: str, reason: str, now: float) -> None:
        soon = self.last_switch_at is not None and now - self.last_switch_at < self.quiet_period
        self.streak = self.streak + 1 if soon else 0
        self.last_switch_at = now
        self.active, self.since, self.why = target, now, reason
        if self.forced == target:
            self.forced = None

    @staticmethod
    def _timings(timings: dict | None) -> dict:
        return {k: round(v, 2) for k, v in (timings or {}).items() if finite_seconds(v) is not None}

    def commit(self, decision: Decision, now: float, ok: bool, detail: str = "", *,
               wall: float | None = None, timings: dict | None = None) -> dict:
        """Record a finished switch; a failed (rolled back) one counts against its target.

        `wall` stamps the record (default `now`, for callers with one clock); returns a copy.
        """
        record = {"at": now if wall is None else wall, "from": self.active,
                  "to": decision.target, "kind": decision.kind, "reason": decision.reason,
                  "ok": ok, "detail": detail, "timings": self._timings(timings)}
        if ok:
            self._switched(decision.target, decision.reason, now)
        else:
            self._mark_failed(decision.target, now, "switch_failed")
            if self.forced == decision.target:
                self.forced = None
        self.intent = None
        self.transitions.append(record)
        self._refresh_dark(now)
        return deepcopy(record)

    # --- start: what the state file says against where the active config is -----------------

    def reconcile(self, actual: str | None, now: float, wall: float) -> str | None:
        """After `restore` (or a reload): the active config (`actual`) wins. Returns a note for
        the log. A switch that was in flight, or an active config other than the saved one,
        leaves `intent` set with its outcome and the backend to check: `needs_check` until the
        daemon's check turn reports through `recovered`. (persistence.reconcile)"""
        return persistence.reconcile(self, actual, now, wall)

    @property
    def needs_check(self) -> bool:
        return self.intent is not None and "outcome" in self.intent

    def recovered(self, now: float, wall: float, ok: bool, detail: str,
                  timings: dict | None = None) -> dict:
        """The check turn on the backend `reconcile` found ran: record the interrupted switch.

        A backend that failed its check counts as failed, so `plan` moves to a healthy one.
        """
        intent, self.intent = self.intent or {}, None
        checked, outcome = intent.get("check"), intent.get("outcome", ROLLED_BACK)
        completed = outcome == COMPLETED
        record = {"at": wall, "from": intent.get("from"), "to": intent.get("to"),
                  "kind": intent.get("kind"), "reason": f"{intent.get('reason')}; {outcome}",
                  "ok": completed and ok, "detail": f"check turn on {checked}: {detail}",
                  "timings": self._timings(timings), "recovered": outcome,
                  "check": {"backend": checked, "ok": ok}}
        if completed and self.active is not None:
            # It was a switch: damping counts it, from when the check confirmed it.
            self._switched(self.active, self.why, now)
        if checked in self.health:
            if ok:
                self.observe(checked, True, "ok", now, deep=True)
            else:
                self._mark_failed(checked, now, "check_failed")
        self.transitions.append(record)
        self._refresh_dark(now)
        return deepcopy(record)

    # --- alerts -------------------------------------------------------------------------------

    def _alert(self, kind: str, backend: str | None, detail: str, now: float) -> None:
        self.events.append(Alert(kind, backend, detail, now))

    def drain_events(self) -> list[Alert]:
        events, self.events = self.events, []
        return events

    def _refresh_dark(self, now: float) -> None:
        dark = not self.usable(self.active, now) and not any(
            self.eligible(b, now) for b in self.order if b != self.active)
        if dark and not self.dark:
            self._alert("dark", self.active,
                        f"no healthy backend: {self._why_unusable(self.active, now)}", now)
        elif self.dark and not dark:
            self._alert("undark", self.active, "a healthy backend is available again", now)
        self.dark = dark

    # --- a reload -----------------------------------------------------------------------------

    def reconfigure(self, backends: Sequence[str], settings, now: float, *,
                    gateway: str | None, fresh: Iterable[str] = ()) -> None:
        """A reload changed this wizard's config; see persistence.reconfigure for what is kept.
        The caller reconciles with the active config when the chain's names changed."""
        persistence.reconfigure(self, self._chain(backends), settings, now, gateway=gateway,
                                fresh=set(fresh))
        self._refresh_dark(now)

    # --- persistence (sidecar/persistence.py) and reporting -----------------------------------

    def fingerprint(self) -> tuple:
        """What, when it changes, is worth an fsync of the state file: not per-probe counters."""
        return persistence.fingerprint(self)

    def snapshot(self, now: float, wall: float, boot: str | None = None) -> dict:
        """JSON-able state for the file: every instant as wall time, plus the clock readings."""
        return persistence.snapshot(self, now, wall, boot)

    def restore(self, snap: dict, now: float, wall: float, boot: str | None = None) -> None:
        """Load a snapshot, keeping only what still fits the configured backends."""
        persistence.restore(self, snap, now, wall, boot)

    def describe(self, now: float, wall: float) -> dict:
        """JSON-able view for /status: instants as wall time, holds as seconds left. A read."""
        def w(t: float | None) -> float | None:
            return None if t is None else wall - (now - t)
        return {
            "active": self.active, "since": w(self.since), "why": self.why, "dark": self.dark,
            "pinned": self.pinned, "forced": self.forced, "deferred": self.deferred,
            "stay_for": None if self.stay_until is None else round(max(0.0, self.stay_until - now), 1),
            "intent": dict(self.intent) if self.intent else None,
            "damping_hold": self.damping_hold(), "restart_budget": self.budget.describe(now),
            "settings": asdict(self.s),
            "backends": {b: h.describe(now, w) for b, h in self.health.items()},
            "transitions": deepcopy(list(self.transitions)[-10:]),
        }
