"""One backend's health as the policy sees it: fall/rise counting, 429 holds and the key verdict.

Pure, like the policy that owns one `Health` per backend (sidecar/policy.py): every method takes
the monotonic `now` and the thresholds (ProbeSettings) it needs, and none reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Probe reasons that count toward `fall`; 'rate_limited' and 'auth' act at once instead.
FAILURE_REASONS = frozenset({"refused", "reset", "dns", "timeout", "http_5xx", "bad_response",
                             "passive", "switch_failed", "check_failed",
                             "context_too_small"})
# A 429 with "Retry-After: 0" still moves traffic away for at least this long.
MIN_RATE_LIMIT_HOLD = 1.0
CAPPED = "capped by max_hold"


def finite_seconds(value) -> float | None:
    """`value` as seconds if it is a finite number >= 0, else None (inf, nan, negatives, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def secs(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def rate_limit_hold(asked: float | None, s) -> tuple[float, str]:
    """(seconds to hold a rate-limited backend, where that came from) for a provider's hint
    `asked` (None: no usable one), bounded below by MIN_RATE_LIMIT_HOLD and above by max_hold."""
    if asked is None:
        hold, note = s.cooldown_429, "no usable Retry-After: cooldown_429"
    else:
        hold, note = asked, f"provider asked {secs(asked)} s"
    hold = max(MIN_RATE_LIMIT_HOLD, hold)
    if hold > s.max_hold:
        return s.max_hold, f"{note}; {CAPPED}"
    return hold, note


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
    # The 429 that set `held_until`: when (monotonic) and the provider's hint (None: none usable).
    # New settings re-apply to a running hold through them (`fit`).
    held_since: float | None = None
    hold_asked: float | None = None

    def held(self, now: float) -> bool:
        return self.held_until > now

    def usable(self, now: float) -> bool:
        return self.healthy is not False and not self.held(now) and not self.key_rejected

    def fresh_pass(self, now: float, window: float) -> bool:
        """Usable, and its latest observation is a pass at most `window` old."""
        return (self.usable(now) and self.last_ok is True and self.last_at is not None
                and now - self.last_at <= window)

    def confirmed(self, now: float, window: float) -> bool:
        """Its latest observation passed and a deep probe passed within `window`."""
        return (self.last_ok is True and self.deep_ok_at is not None
                and now - self.deep_ok_at <= window)

    def describe(self, now: float, wall_of) -> dict:
        """Its part of /status; `wall_of` turns a monotonic instant into wall time."""
        return {"healthy": self.healthy, "usable": self.usable(now), "passes": self.passes,
                "fails": self.fails, "held_for": max(0.0, self.held_until - now),
                "hold_note": self.hold_note if self.held(now) else "",
                "key_rejected": self.key_rejected, "last_ok": self.last_ok,
                "last_at": wall_of(self.last_at), "last_reason": self.last_reason}

    def why_unusable(self, name: str, now: float) -> str:
        if self.key_rejected:
            return f"{name}: key rejected"
        if self.held(now):
            return f"{name}: rate limited for {self.held_until - now:.0f}s"
        return f"{name}: unhealthy ({self.fails} failures, last: {self.last_reason})"

    def observe(self, ok: bool, reason: str, now: float, s, *, status: int | None = None,
                retry_after=None, deep: bool = False) -> list[tuple[str, str]]:
        """Count one observation; returns the alerts it raises, as (kind, detail)."""
        if reason == "passive" and status == 429:
            reason = "rate_limited"
        elif reason == "passive" and status in (401, 403):
            reason = "auth"
        self.last_ok, self.last_at, self.last_reason = ok, now, reason
        alerts = []
        if ok:
            self.passes += 1
            self.fails = 0
            if deep:
                self.deep_ok_at = now
            if self.passes >= s.rise:
                self.healthy = True
                self.key_rejected = False
        else:
            self.passes = 0
            self.deep_ok_at = None
            if reason == "rate_limited":
                asked = finite_seconds(retry_after)
                hold, note = rate_limit_hold(asked, s)
                if not self.held(now):
                    alerts.append(("rate_limited", f"held {secs(hold)} s ({note})"))
                if now + hold > self.held_until:
                    self.held_until, self.hold_note = now + hold, note
                    self.held_since, self.hold_asked = now, asked
            elif reason == "auth":
                if not self.key_rejected:
                    alerts.append(("key_rejected",
                                   f"key rejected (HTTP {status or '401/403'}): fix the API key"))
                self.key_rejected = True
                self.healthy = False
            else:
                self.fails += 1
                if self.fails >= s.fall:
                    self.healthy = False
        return alerts

    def mark_failed(self, now: float, reason: str, fall: int) -> None:
        """A switch onto it or a check turn on it failed: unhealthy at once."""
        self.passes = 0
        self.fails = max(self.fails + 1, fall)
        self.healthy = False
        self.deep_ok_at = None
        self.last_ok, self.last_at, self.last_reason = False, now, reason

    def fit(self, s, now: float) -> None:
        """Settings changed under this backend (a reload, or a start with a new config): the
        thresholds apply to the counts it has, and a running hold ends no later than the new
        settings would have ended it (lowering max_hold shortens it; raising lengthens none)."""
        if self.passes >= s.rise:
            self.healthy, self.key_rejected = True, False
        elif self.fails >= s.fall:
            self.healthy = False
        if not self.held(now):
            return
        if self.held_since is None:   # from a state file that did not say: max_hold alone
            end, note = now + s.max_hold, CAPPED
        else:
            hold, note = rate_limit_hold(self.hold_asked, s)
            end = self.held_since + hold
        if end < self.held_until:
            self.held_until = end
            if CAPPED in note and CAPPED not in self.hold_note:
                self.hold_note = f"{self.hold_note}; {CAPPED}" if self.hold_note else CAPPED
        if not self.held(now):
            self.hold_note, self.held_since, self.hold_asked = "", None, None
