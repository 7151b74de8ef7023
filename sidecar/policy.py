"""Which backend one wizard should be on, and when it may move: the failure policy, pure.

No I/O, no asyncio, no clock reads. The daemon feeds observations (`observe`), asks for a `plan`
and carries out what it says (a pre-switch deep probe, or the switch), announcing a switch before
it touches the active config (`begin`, which the daemon persists) and reporting back (`commit`).

Two clocks, both passed in:
- `now`: seconds on a monotonic clock (time.monotonic() in the daemon, a counter in tests). Every
  timer runs on it: dwell, 429 holds, flap damping, observation freshness, the restart budget.
  NTP stepping the wall clock (a Raspberry Pi has no RTC and steps it at every boot) changes no
  decision.
- `wall`: seconds since the epoch, only where it is data: the time stamped on a transition record,
  and the state file, where `snapshot` converts monotonic instants to wall time and `restore`
  converts them back. On the same boot the saved pair of clock readings makes that exact whatever
  the wall clock did meanwhile; after a reboot it goes through the wall clock, and values that are
  implausible (a past instant in the future, a hold longer than `max_hold`) are clamped.

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
- a switch that restarts the gateway needs a slot in the restart budget (STORM_MAX restarts per
  STORM_WINDOW); until there is one it is deferred ("defer");
- nothing eligible while the active is unusable: stay, and raise "dark";
- a switch leaves an intent until its commit; a sidecar that died mid-switch finds it on start
  (`reconcile`), and `recovered` records how that switch ended once the daemon's check turn says
  whether the backend the wizard is on answers.
"""

from __future__ import annotations

import math
from collections import deque
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from typing import Sequence

# Probe reasons that count toward `fall`; 'rate_limited' and 'auth' act at once instead.
FAILURE_REASONS = frozenset({"refused", "reset", "dns", "timeout", "http_5xx", "bad_response",
                             "passive", "switch_failed", "check_failed",
                             "context_too_small"})
# A 429 with "Retry-After: 0" still moves traffic away for at least this long.
MIN_RATE_LIMIT_HOLD = 1.0
MAX_TRANSITIONS = 50
# Hermes sleeps with backoff after more than 5 starts in 120 s (gateway.respawn_storm), and
# systemd's default StartLimitBurst is 5 per 10 s: keep every gateway at 4 restarts per window.
STORM_WINDOW = 120.0
STORM_MAX = 4
# How a switch that was in flight when the sidecar died ended, as the transition record says.
COMPLETED = "completed after a sidecar restart"
ROLLED_BACK = "interrupted; rolled back"


def finite_seconds(value) -> float | None:
    """`value` as seconds if it is a finite number >= 0, else None (inf, nan, negatives, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _secs(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


class PolicyError(ValueError):
    """A manual request the policy refuses; the message says why, for the operator."""


@dataclass
class Health:
    healthy: bool | None = None     # None: not enough observations yet to say
    passes: int = 0                 # consecutive
    fails: int = 0                  # consecutive
    held_until: float = 0.0         # end of a 429 hold (monotonic); held while > now
    hold_note: str = ""             # where the hold's length came from, and whether it was capped
    key_rejected: bool = False
    last_ok: bool | None = None
    last_at: float | None = None    # monotonic
    last_reason: str = ""
    deep_ok_at: float | None = None  # latest passing deep probe (monotonic); cleared by a failure


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
        if len(set(backends)) != len(backends) or not backends:
            raise ValueError("backends must be distinct and non-empty")
        if active is not None and active not in backends:
            raise ValueError(f"active backend {active!r} is not configured")
        self.order = tuple(backends)
        self.s = settings
        self.gateway = gateway
        self.health = {b: Health() for b in self.order}
        self.active = active
        self.since = now
        self.why = why
        self.pinned: str | None = None
        self.forced: str | None = None
        # A drill's hold: no failback before this instant (monotonic), so the turns a drill sends
        # reach the fallback it asked for. Bounded by the request; a failover still happens.
        self.stay_until: float | None = None
        self.streak = 0           # switches in a row, each soon after the one before
        self.last_switch_at: float | None = None
        self.dark = False
        self.restarts: deque[float] = deque()   # recent gateway restarts (monotonic), oldest first
        # The switch in flight: from, to, kind, reason, at (wall). After a restart `reconcile`
        # adds outcome and check (the backend the check turn must confirm).
        self.intent: dict | None = None
        self.deferred: str | None = None       # target of a switch waiting for the restart budget
        self.transitions: deque[dict] = deque(maxlen=MAX_TRANSITIONS)
        self.events: list[Alert] = []

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
        return self.health[backend].held_until > now

    def usable(self, backend: str | None, now: float) -> bool:
        if backend is None:
            return False
        h = self.health[backend]
        return h.healthy is not False and not self.held(backend, now) and not h.key_rejected

    def eligible(self, backend: str, now: float) -> bool:
        """May be switched onto now: usable, and its latest observation is a fresh pass."""
        h = self.health[backend]
        return (self.usable(backend, now) and h.last_ok is True and h.last_at is not None
                and now - h.last_at <= self.fresh_window)

    def confirmed(self, backend: str, now: float) -> bool:
        """Its latest observation passed and a deep probe passed within this probe round."""
        h = self.health[backend]
        return (h.last_ok is True and h.deep_ok_at is not None
                and now - h.deep_ok_at <= self.confirm_window)

    def _why_unusable(self, backend: str | None, now: float) -> str:
        if backend is None:
            return "active config matches no configured backend"
        h = self.health[backend]
        if h.key_rejected:
            return f"{backend}: key rejected"
        if self.held(backend, now):
            return f"{backend}: rate limited for {h.held_until - now:.0f}s"
        return f"{backend}: unhealthy ({h.fails} failures, last: {h.last_reason})"

    # --- inputs -------------------------------------------------------------------------------

    def _hold(self, retry_after) -> tuple[float, str]:
        """(seconds to hold a rate-limited backend, where that came from), bounded by max_hold."""
        asked = finite_seconds(retry_after)
        if asked is None:
            hold, note = self.s.cooldown_429, "no usable Retry-After: cooldown_429"
        else:
            hold, note = asked, f"provider asked {_secs(asked)} s"
        hold = max(MIN_RATE_LIMIT_HOLD, hold)
        if hold > self.s.max_hold:
            return self.s.max_hold, f"{note}; capped by max_hold"
        return hold, note

    def observe(self, backend: str, ok: bool, reason: str, now: float, *,
                status: int | None = None, retry_after: float | None = None,
                deep: bool = False) -> None:
        h = self.health.get(backend)
        if h is None:
            return  # a passive error the watcher could not attribute to a configured backend
        if reason == "passive" and status == 429:
            reason = "rate_limited"
        elif reason == "passive" and status in (401, 403):
            reason = "auth"
        h.last_ok, h.last_at, h.last_reason = ok, now, reason
        if ok:
            h.passes += 1
            h.fails = 0
            if deep:
                h.deep_ok_at = now
            if h.passes >= self.s.rise:
                h.healthy = True
                h.key_rejected = False
        else:
            h.passes = 0
            h.deep_ok_at = None
            if reason == "rate_limited":
                hold, note = self._hold(retry_after)
                if not self.held(backend, now):
                    self._alert("rate_limited", backend, f"held {_secs(hold)} s ({note})", now)
                if now + hold > h.held_until:
                    h.held_until, h.hold_note = now + hold, note
            elif reason == "auth":
                if not h.key_rejected:
                    self._alert("key_rejected", backend,
                                f"key rejected (HTTP {status or '401/403'}): fix the API key", now)
                h.key_rejected = True
                h.healthy = False
            else:
                h.fails += 1
                if h.fails >= self.s.fall:
                    h.healthy = False
        self._refresh_dark(now)

    def observe_result(self, result, now: float) -> None:
        """Feed a probes.ProbeResult (or anything with its fields)."""
        self.observe(result.backend, result.ok, result.reason, now, status=result.status,
                     retry_after=result.retry_after, deep=getattr(result, "deep", False))

    def _mark_failed(self, backend: str, now: float, reason: str) -> None:
        h = self.health[backend]
        h.passes = 0
        h.fails = max(h.fails + 1, self.s.fall)
        h.healthy = False
        h.deep_ok_at = None
        h.last_ok, h.last_at, h.last_reason = False, now, reason

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
        self.stay_until = None

    # --- decisions ----------------------------------------------------------------------------

    def decide(self, now: float) -> Decision | None:
        """Where the wizard should be now, by the health rules alone (see `plan`)."""
        self._refresh_dark(now)
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
            self.stay_until = None
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
        wait = self.restart_wait(now)
        if wait > 0:
            self.deferred = decision.target
            return Plan("defer", decision, wait)
        # Never onto a backend on the strength of a list-models answer alone: a real generation.
        if not self.confirmed(decision.target, now):
            return Plan("confirm", decision)
        return Plan("switch", decision)

    # --- the restart budget -------------------------------------------------------------------

    def restart_wait(self, now: float) -> float:
        """Seconds before a switch could restart the gateway (0: now, or never needed)."""
        if self.gateway is None:
            return 0.0
        while self.restarts and now - self.restarts[0] >= STORM_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) < STORM_MAX:
            return 0.0
        return self.restarts[-STORM_MAX] + STORM_WINDOW - now

    def storm_refusal(self) -> str:
        return (f"{self.gateway} already restarted {STORM_MAX} times in {STORM_WINDOW:.0f}s "
                "(Hermes' respawn-storm brake and systemd's start limit)")

    def take_restart(self, now: float) -> str | None:
        """Count a gateway restart about to happen; the refusal text instead if the budget is spent."""
        if self.gateway is None:
            return None
        if self.restart_wait(now) > 0:
            return self.storm_refusal()
        self.restarts.append(now)
        return None

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

    # --- start: what the state file says against where the active config is ---------------------

    def reconcile(self, actual: str | None, now: float, wall: float) -> str | None:
        """After `restore`: the active config (`actual`) wins. Returns a note for the log.

        A switch that was in flight (an intent), or an active config other than the saved one,
        leaves `intent` set with its outcome and the backend to check: `needs_check` until the
        daemon's check turn reports through `recovered`.
        """
        saved = self.active
        intent = self.intent if isinstance(self.intent, dict) else None
        if intent is not None:
            if actual is not None and actual == intent.get("to"):
                outcome = COMPLETED
            elif actual is not None and actual == intent.get("from"):
                outcome = ROLLED_BACK
            else:
                outcome = f"interrupted; found on {actual or 'no configured backend'}"
        elif actual is not None and saved is not None and actual != saved:
            intent = {"from": saved, "to": actual, "kind": "recovered", "at": wall,
                      "reason": f"the active config says {actual}, the state file said {saved}"}
            outcome = COMPLETED
        elif actual is None:
            if saved:
                return f"active config matches no backend; keeping saved {saved}"
            return "active config matches no backend and there is no saved state"
        else:
            if saved is None:
                self.active, self.since, self.why = actual, now, f"found on {actual} at start"
                return f"found on {actual} (no saved state)"
            return None
        if actual is not None:
            self.active, self.since = actual, now
        self.why = f"{intent.get('reason')}; {outcome}"
        # An operator's drill that died with the sidecar is not retried behind their back.
        self.forced = None
        self.intent = {**intent, "outcome": outcome, "check": actual}
        return (f"a switch from {intent.get('from')} to {intent.get('to')} was in flight when the "
                f"sidecar stopped: {outcome}")

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

    # --- persistence and reporting ------------------------------------------------------------

    def fingerprint(self) -> tuple:
        """What, when it changes, is worth an fsync of the state file: not per-probe counters."""
        last = self.transitions[-1]["at"] if self.transitions else None
        return (self.active, self.pinned, self.forced, self.streak, self.dark, self.why,
                len(self.transitions), last, tuple(self.restarts),
                tuple(sorted(self.intent.items())) if self.intent else None,
                tuple((b, h.healthy, h.held_until, h.key_rejected)
                      for b, h in self.health.items()))

    def snapshot(self, now: float, wall: float, boot: str | None = None) -> dict:
        """JSON-able state for the file: every instant as wall time, plus the clock readings."""
        def w(t: float | None) -> float | None:
            return None if t is None else wall + (t - now)
        health = {}
        for b, h in self.health.items():
            doc = asdict(h)
            doc.pop("deep_ok_at")  # a confirmation never outlives the process that probed
            doc["held_until"] = w(h.held_until) if self.held(b, now) else None
            doc["hold_note"] = h.hold_note if self.held(b, now) else ""
            doc["last_at"] = w(h.last_at)
            health[b] = doc
        return {"clock": {"wall": wall, "monotonic": now, "boot": boot},
                "active": self.active, "since": w(self.since), "why": self.why,
                "pinned": self.pinned, "forced": self.forced, "streak": self.streak,
                "last_switch_at": w(self.last_switch_at), "dark": self.dark,
                "restarts": [w(t) for t in self.restarts],
                "intent": dict(self.intent) if self.intent else None,
                "health": health, "transitions": deepcopy(list(self.transitions))}

    def restore(self, snap: dict, now: float, wall: float, boot: str | None = None) -> None:
        """Load a snapshot, keeping only what still fits the configured backends.

        Same boot (the saved boot id is ours and the saved monotonic reading is not ahead of
        ours): instants come back exactly through the saved clock pair. Otherwise through the
        wall clock, clamped: a past instant is never later than now, a hold never longer than
        max_hold, and an observation of unknown age is stale.
        """
        clock = snap.get("clock") if isinstance(snap.get("clock"), dict) else {}
        saved_wall, saved_mono = _num(clock.get("wall")), _num(clock.get("monotonic"))
        if (boot is not None and clock.get("boot") == boot and saved_wall is not None
                and saved_mono is not None and saved_mono <= now):
            base_wall, base_mono = saved_wall, saved_mono   # the monotonic clock ran on: exact
        else:
            base_wall, base_mono = wall, now                # the best a wall clock can do

        def mono(value) -> float | None:
            t = _num(value)
            # (t - base_wall) first: the difference `snapshot` added, recovered without the
            # rounding of adding two large numbers first.
            return None if t is None else (t - base_wall) + base_mono

        def past(value, unknown: float | None = 0.0) -> float | None:
            t = mono(value)
            if t is not None and t > now:  # the wall clock went back: the age is unknown
                return None if unknown is None else now - unknown
            return t

        known = set(self.order)
        if snap.get("active") in known:
            self.active = snap["active"]
            since = past(snap.get("since"))
            self.since = now if since is None else since
            self.why = str(snap.get("why", self.why))
        self.pinned = snap.get("pinned") if snap.get("pinned") in known else None
        self.forced = snap.get("forced") if snap.get("forced") in known else None
        streak = snap.get("streak", 0)
        self.streak = streak if isinstance(streak, int) and not isinstance(streak, bool) and streak >= 0 else 0
        self.last_switch_at = past(snap.get("last_switch_at"))
        self.dark = bool(snap.get("dark", False))
        self.restarts = deque(sorted(t for t in (past(v) for v in snap.get("restarts") or [])
                                     if t is not None and now - t < STORM_WINDOW))
        intent = snap.get("intent")
        self.intent = (dict(intent) if isinstance(intent, dict) and isinstance(intent.get("to"), str)
                       else None)
        stale = self.fresh_window + 1.0
        names = {f.name for f in fields(Health)} - {"held_until", "last_at", "deep_ok_at"}
        for b, h in (snap.get("health") or {}).items():
            if b not in known or not isinstance(h, dict):
                continue
            health = Health(**{k: v for k, v in h.items() if k in names})
            until = mono(h.get("held_until"))
            if until is not None and until > now:
                health.held_until = min(until, now + self.s.max_hold)
            else:
                health.held_until, health.hold_note = min(0.0, now), ""
            health.last_at = past(h.get("last_at"), unknown=stale)
            self.health[b] = health
        self.transitions = deque((deepcopy(t) for t in snap.get("transitions") or [] if isinstance(t, dict)),
                                 maxlen=MAX_TRANSITIONS)

    def describe(self, now: float, wall: float) -> dict:
        """JSON-able view for /status: instants as wall time, holds as seconds left."""
        def w(t: float | None) -> float | None:
            return None if t is None else wall - (now - t)
        budget = None
        if self.gateway is not None:
            wait = self.restart_wait(now)
            budget = {"unit": self.gateway, "restarts_in_window": len(self.restarts),
                      "max": STORM_MAX, "window": STORM_WINDOW, "free_in": round(wait, 1)}
        return {
            "active": self.active, "since": w(self.since), "why": self.why, "dark": self.dark,
            "pinned": self.pinned, "forced": self.forced, "deferred": self.deferred,
            "stay_for": None if self.stay_until is None else round(max(0.0, self.stay_until - now), 1),
            "intent": dict(self.intent) if self.intent else None,
            "damping_hold": self.damping_hold(), "restart_budget": budget,
            "settings": asdict(self.s),
            "backends": {b: {"healthy": h.healthy, "usable": self.usable(b, now),
                             "passes": h.passes, "fails": h.fails,
                             "held_for": max(0.0, h.held_until - now),
                             "hold_note": h.hold_note if self.held(b, now) else "",
                             "key_rejected": h.key_rejected, "last_ok": h.last_ok,
                             "last_at": w(h.last_at), "last_reason": h.last_reason}
                         for b, h in self.health.items()},
            "transitions": deepcopy(list(self.transitions)[-10:]),
        }


def _num(value) -> float | None:
    """A finite number from a state file, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
