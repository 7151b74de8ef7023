"""Which backend one wizard should be on: a pure state machine with an injected clock.

No I/O, no asyncio: the daemon feeds observations (`observe`), asks for a `decide`, carries out
the switch itself and reports back (`commit`). Every call takes `now` (seconds, any epoch the
caller keeps consistent), so the tests drive it with a fake clock.

Rules (issue 3, thresholds from ProbeSettings):
- a backend turns unhealthy after `fall` consecutive failures and healthy after `rise` passes;
- a 429 makes it unavailable at once until Retry-After (else `cooldown_429`);
- a 401/403 makes it unavailable at once ("key rejected") until `rise` passes;
- failover (the active one is unusable) happens at once, to the highest-priority eligible backend;
- failback to a higher-priority backend needs `rise` passes and a dwell of `min_dwell` plus the
  flap-damping hold; the hold doubles with each switch that follows soon after another;
- the target of any switch must have a fresh passing observation (the daemon deep-probes it);
- nothing eligible while the active is unusable: stay, and raise "dark".
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Sequence

# Probe reasons that count toward `fall`; 'rate_limited' and 'auth' act at once instead.
FAILURE_REASONS = frozenset({"refused", "reset", "dns", "timeout", "http_5xx", "bad_response",
                             "passive", "switch_failed", "context_too_small"})
# A 429 with "Retry-After: 0" still moves traffic away for at least this long.
MIN_RATE_LIMIT_HOLD = 1.0
MAX_TRANSITIONS = 50


class PolicyError(ValueError):
    """A manual request the policy refuses; the message says why, for the operator."""


@dataclass
class Health:
    healthy: bool | None = None     # None: not enough observations yet to say
    passes: int = 0                 # consecutive
    fails: int = 0                  # consecutive
    held_until: float = 0.0         # 429 hold
    key_rejected: bool = False
    last_ok: bool | None = None
    last_at: float | None = None
    last_reason: str = ""


@dataclass(frozen=True)
class Decision:
    target: str
    reason: str
    kind: str  # 'failover' | 'failback' | 'manual'


@dataclass(frozen=True)
class Alert:
    kind: str  # 'dark' | 'undark' | 'key_rejected' | 'rate_limited'
    backend: str | None
    detail: str
    at: float


class Policy:
    def __init__(self, backends: Sequence[str], settings, active: str | None, now: float,
                 why: str = "found on start") -> None:
        if len(set(backends)) != len(backends) or not backends:
            raise ValueError("backends must be distinct and non-empty")
        if active is not None and active not in backends:
            raise ValueError(f"active backend {active!r} is not configured")
        self.order = tuple(backends)
        self.s = settings
        self.health = {b: Health() for b in self.order}
        self.active = active
        self.since = now
        self.why = why
        self.pinned: str | None = None
        self.forced: str | None = None
        self.streak = 0           # switches in a row, each soon after the one before
        self.last_switch_at: float | None = None
        self.dark = False
        self.transitions: deque[dict] = deque(maxlen=MAX_TRANSITIONS)
        self.events: list[Alert] = []

    # --- derived ------------------------------------------------------------------------------

    @property
    def fresh_window(self) -> float:
        # Two missed probe rounds make an observation too old to switch on.
        return 2 * self.s.interval + self.s.timeout

    @property
    def quiet_period(self) -> float:
        # Longer than the longest damped dwell, so a streak at the cap does not reset itself.
        return 2 * (self.s.min_dwell + self.s.damping_cap)

    def damping_hold(self) -> float:
        if self.streak == 0:
            return 0.0
        return min(self.s.damping_cap, self.s.damping_base * 2 ** (self.streak - 1))

    def usable(self, backend: str | None, now: float) -> bool:
        if backend is None:
            return False
        h = self.health[backend]
        return h.healthy is not False and h.held_until <= now and not h.key_rejected

    def eligible(self, backend: str, now: float) -> bool:
        """May be switched onto now: usable, and its latest observation is a fresh pass."""
        h = self.health[backend]
        return (self.usable(backend, now) and h.last_ok is True and h.last_at is not None
                and now - h.last_at <= self.fresh_window)

    def _why_unusable(self, backend: str | None, now: float) -> str:
        if backend is None:
            return "active config matches no configured backend"
        h = self.health[backend]
        if h.key_rejected:
            return f"{backend}: key rejected"
        if h.held_until > now:
            return f"{backend}: rate limited for {h.held_until - now:.0f}s"
        return f"{backend}: unhealthy ({h.fails} failures, last: {h.last_reason})"

    # --- inputs -------------------------------------------------------------------------------

    def observe(self, backend: str, ok: bool, reason: str, now: float, *,
                status: int | None = None, retry_after: float | None = None) -> None:
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
            if h.passes >= self.s.rise:
                h.healthy = True
                h.key_rejected = False
        else:
            h.passes = 0
            if reason == "rate_limited":
                wait = self.s.cooldown_429 if retry_after is None else retry_after
                until = now + max(MIN_RATE_LIMIT_HOLD, wait)
                if h.held_until <= now:
                    self._alert("rate_limited", backend, f"held off for {until - now:.0f}s", now)
                h.held_until = max(h.held_until, until)
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
        self.observe(result.backend, result.ok, result.reason, now,
                     status=result.status, retry_after=result.retry_after)

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

    def force(self, backend: str | None, now: float) -> str:
        """Ask for a switch now (drills); returns the chosen target. Failback rules still apply later."""
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

    # --- decisions ----------------------------------------------------------------------------

    def decide(self, now: float) -> Decision | None:
        self._refresh_dark(now)
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
        dwell = self.s.min_dwell + self.damping_hold()
        for b in self.order[:self.order.index(self.active)]:
            if self.eligible(b, now) and self.health[b].passes >= self.s.rise:
                if now - self.since >= dwell:
                    return Decision(b, f"{b} healthy again ({self.health[b].passes} passes)",
                                    "failback")
                return None
        return None

    def commit(self, decision: Decision, now: float, ok: bool, detail: str = "") -> dict:
        """Record a finished switch; a failed (rolled back) one counts against its target."""
        record = {"at": now, "from": self.active, "to": decision.target, "kind": decision.kind,
                  "reason": decision.reason, "ok": ok, "detail": detail}
        if ok:
            soon = self.last_switch_at is not None and now - self.last_switch_at < self.quiet_period
            self.streak = self.streak + 1 if soon else 0
            self.last_switch_at = now
            self.active, self.since, self.why = decision.target, now, decision.reason
            if self.forced == decision.target:
                self.forced = None
        else:
            h = self.health[decision.target]
            h.passes = 0
            h.fails = max(h.fails + 1, self.s.fall)
            h.healthy = False
            h.last_ok, h.last_at, h.last_reason = False, now, "switch_failed"
            if self.forced == decision.target:
                self.forced = None
        self.transitions.append(record)
        self._refresh_dark(now)
        return record

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

    def snapshot(self) -> dict:
        return {"active": self.active, "since": self.since, "why": self.why,
                "pinned": self.pinned, "forced": self.forced, "streak": self.streak,
                "last_switch_at": self.last_switch_at, "dark": self.dark,
                "health": {b: asdict(h) for b, h in self.health.items()},
                "transitions": list(self.transitions)}

    def restore(self, snap: dict) -> None:
        """Load a snapshot, keeping only what still fits the configured backends."""
        known = set(self.order)
        if snap.get("active") in known:
            self.active = snap["active"]
            self.since = float(snap.get("since") or self.since)
            self.why = str(snap.get("why", self.why))
        self.pinned = snap.get("pinned") if snap.get("pinned") in known else None
        self.forced = snap.get("forced") if snap.get("forced") in known else None
        self.streak = int(snap.get("streak", 0))
        self.last_switch_at = snap.get("last_switch_at")
        self.dark = bool(snap.get("dark", False))
        names = {f.name for f in fields(Health)}
        for b, h in (snap.get("health") or {}).items():
            if b in known and isinstance(h, dict):
                self.health[b] = Health(**{k: v for k, v in h.items() if k in names})
        self.transitions = deque((t for t in snap.get("transitions") or [] if isinstance(t, dict)),
                                 maxlen=MAX_TRANSITIONS)

    def describe(self, now: float) -> dict:
        """JSON-able view for /status."""
        return {
            "active": self.active, "since": self.since, "why": self.why, "dark": self.dark,
            "pinned": self.pinned, "forced": self.forced,
            "damping_hold": self.damping_hold(),
            "backends": {b: {"healthy": h.healthy, "usable": self.usable(b, now),
                             "passes": h.passes, "fails": h.fails,
                             "held_for": max(0.0, h.held_until - now),
                             "key_rejected": h.key_rejected, "last_ok": h.last_ok,
                             "last_at": h.last_at, "last_reason": h.last_reason}
                         for b, h in self.health.items()},
            "transitions": list(self.transitions)[-10:],
        }
