"""The gateway restart budget: at most STORM_MAX restarts of a wizard's gateway per STORM_WINDOW.

Pure (monotonic `now` passed in). Reads (`wait`, `describe`) never change it: what left the
window is dropped by `prune`, on the policy's tick path, and by `take`.
"""

from __future__ import annotations

from collections import deque

# Hermes sleeps with backoff after more than 5 starts in 120 s (gateway.respawn_storm), and
# systemd's default StartLimitBurst is 5 per 10 s: keep every gateway at 4 restarts per window.
STORM_WINDOW = 120.0
STORM_MAX = 4


class RestartBudget:
    def __init__(self, unit: str | None) -> None:
        """`unit`: the gateway a switch restarts; None when switches restart nothing."""
        self.unit = unit
        self.times: deque[float] = deque()   # recent restarts (monotonic), oldest first

    def _recent(self, now: float) -> list[float]:
        return [t for t in self.times if now - t < STORM_WINDOW]

    def wait(self, now: float) -> float:
        """Seconds before a switch could restart the gateway (0: now, or never needed)."""
        if self.unit is None:
            return 0.0
        recent = self._recent(now)
        if len(recent) < STORM_MAX:
            return 0.0
        return recent[-STORM_MAX] + STORM_WINDOW - now

    def prune(self, now: float) -> None:
        while self.times and now - self.times[0] >= STORM_WINDOW:
            self.times.popleft()

    def refusal(self) -> str:
        return (f"{self.unit} already restarted {STORM_MAX} times in {STORM_WINDOW:.0f}s "
                "(Hermes' respawn-storm brake and systemd's start limit)")

    def take(self, now: float) -> str | None:
        """Count a restart about to happen; the refusal text instead if the budget is spent."""
        if self.unit is None:
            return None
        self.prune(now)
        if self.wait(now) > 0:
            return self.refusal()
        self.times.append(now)
        return None

    def describe(self, now: float) -> dict | None:
        if self.unit is None:
            return None
        return {"unit": self.unit, "restarts_in_window": len(self._recent(now)),
                "max": STORM_MAX, "window": STORM_WINDOW, "free_in": round(self.wait(now), 1)}
