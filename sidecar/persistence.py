"""The policy's memory across a restart (the state file: snapshot and restore, with the clock
rules) and across a reload (`reconfigure`, in memory).

Timers run on the monotonic clock, which means nothing to another process. `snapshot` writes every
instant as wall time, with the pair of clock readings (wall, monotonic) and the boot id at save;
`restore` converts them back. On the same boot the saved pair makes that exact whatever the wall
clock did meanwhile; after a reboot it goes through the wall clock, and values that are
implausible (a past instant in the future, a hold longer than the settings allow) are clamped.
What lives only as long as the process is not saved: a deep probe's confirmation, a drill's
stay (a restarted sidecar applies the health rules at once), a deferral, undelivered alerts.
"""

from __future__ import annotations

import math
from collections import deque
from copy import deepcopy
from dataclasses import asdict, fields
from typing import TYPE_CHECKING

from sidecar.budget import STORM_WINDOW, RestartBudget
from sidecar.health import Health, finite_seconds

if TYPE_CHECKING:
    from sidecar.policy import Policy

MAX_TRANSITIONS = 50
# How a switch that was in flight when the sidecar died ended, as the transition record says.
COMPLETED = "completed after a sidecar restart"
ROLLED_BACK = "interrupted; rolled back"
# Health fields that are instants (converted), or never saved.
_INSTANTS = ("held_until", "last_at", "held_since")
_UNSAVED = ("deep_ok_at",)
_DEFAULTS = Health()


def _num(value) -> float | None:
    """A finite number from a state file, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fingerprint(p: "Policy") -> tuple:
    """What, when it changes, is worth an fsync of the state file: not per-probe counters."""
    last = p.transitions[-1]["at"] if p.transitions else None
    return (p.active, p.pinned, p.forced, p.streak, p.dark, p.why,
            len(p.transitions), last, tuple(p.restarts),
            tuple(sorted(p.intent.items())) if p.intent else None,
            tuple((b, h.healthy, h.held_until, h.key_rejected) for b, h in p.health.items()))


def snapshot(p: "Policy", now: float, wall: float, boot: str | None = None) -> dict:
    """JSON-able state for the file: every instant as wall time, plus the clock readings."""
    def w(t: float | None) -> float | None:
        return None if t is None else wall + (t - now)
    health = {}
    for b, h in p.health.items():
        doc = asdict(h)
        for k in _UNSAVED:
            doc.pop(k)   # a confirmation never outlives the process that probed
        held = h.held(now)
        doc["held_until"] = w(h.held_until) if held else None
        doc["held_since"] = w(h.held_since) if held else None
        doc["hold_asked"] = h.hold_asked if held else None
        doc["hold_note"] = h.hold_note if held else ""
        doc["last_at"] = w(h.last_at)
        health[b] = doc
    return {"clock": {"wall": wall, "monotonic": now, "boot": boot},
            "active": p.active, "since": w(p.since), "why": p.why,
            "pinned": p.pinned, "forced": p.forced, "streak": p.streak,
            "last_switch_at": w(p.last_switch_at), "dark": p.dark,
            "restarts": [w(t) for t in p.restarts],
            "intent": dict(p.intent) if p.intent else None,
            "health": health, "transitions": deepcopy(list(p.transitions))}


def _health(doc: dict, mono, past, now: float, stale: float, s) -> Health:
    """One backend's saved health; a field of the wrong type keeps its default."""
    h = Health()
    for f in fields(Health):
        name = f.name
        if name in _INSTANTS or name in _UNSAVED or name not in doc:
            continue
        value = doc[name]
        if name == "hold_asked":
            h.hold_asked = finite_seconds(value)
        elif (value is None or type(value) is bool) if name in ("healthy", "last_ok") else (
                type(value) is type(getattr(_DEFAULTS, name))):
            setattr(h, name, value)
    until = mono(doc.get("held_until"))
    if until is not None and until > now:
        h.held_until = until
        h.held_since = past(doc.get("held_since"), unknown=None)
    else:
        h.held_until, h.hold_note, h.hold_asked = min(0.0, now), "", None
    h.last_at = past(doc.get("last_at"), unknown=stale)
    h.fit(s, now)
    return h


def restore(p: "Policy", snap: dict, now: float, wall: float, boot: str | None = None) -> None:
    """Load a snapshot into `p`, keeping only what still fits its configured backends.

    Same boot (the saved boot id is ours and the saved monotonic reading is not ahead of
    ours): instants come back exactly through the saved clock pair. Otherwise through the
    wall clock, clamped: a past instant is never later than now, a hold never longer than
    the settings allow, and an observation of unknown age is stale.
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

    known = set(p.order)
    if snap.get("active") in known:
        p.active = snap["active"]
        since = past(snap.get("since"))
        p.since = now if since is None else since
        p.why = str(snap.get("why", p.why))
    p.pinned = snap.get("pinned") if snap.get("pinned") in known else None
    p.forced = snap.get("forced") if snap.get("forced") in known else None
    streak = snap.get("streak", 0)
    p.streak = streak if isinstance(streak, int) and not isinstance(streak, bool) and streak >= 0 else 0
    p.last_switch_at = past(snap.get("last_switch_at"))
    p.dark = bool(snap.get("dark", False))
    p.restarts = deque(sorted(t for t in (past(v) for v in snap.get("restarts") or [])
                              if t is not None and now - t < STORM_WINDOW))
    intent = snap.get("intent")
    p.intent = (dict(intent) if isinstance(intent, dict) and isinstance(intent.get("to"), str)
                else None)
    stale = p.fresh_window + 1.0
    for b, h in (snap.get("health") or {}).items():
        if b in known and isinstance(h, dict):
            p.health[b] = _health(h, mono, past, now, stale, p.s)
    p.transitions = deque((deepcopy(t) for t in snap.get("transitions") or [] if isinstance(t, dict)),
                          maxlen=MAX_TRANSITIONS)


def reconfigure(p: "Policy", order: tuple[str, ...], settings, now: float, *,
                gateway: str | None, fresh: set[str]) -> None:
    """A reload changed the wizard's config: keep, in memory and exactly (no clock rules: the
    same process), all that still means the same. `fresh`: backends kept by name whose probe
    target changed (URL, model, key...): what was observed of them was about something else.

    Kept: where the wizard is and since when (the dwell), the damping streak, the transitions, an
    intent, undelivered alerts; health, holds, a pin and a forced switch for backends still
    configured; a drill's stay; the restart budget while the gateway unit is the same one. New
    settings apply to what is kept: the thresholds to the counts, and a running hold or stay ends
    no later than the new max_hold (or cooldown_429) would have ended it."""
    p.order, p.s = order, settings
    p.health = {b: Health() if b in fresh or b not in p.health else p.health[b] for b in order}
    for h in p.health.values():
        h.fit(settings, now)
    if p.active not in order:
        p.active = None
    p.pinned = p.pinned if p.pinned in order else None
    p.forced = p.forced if p.forced in order else None
    if p.stay_until is not None and p.stay_from is not None:
        p.stay_until = min(p.stay_until, p.stay_from + settings.max_hold)
    if gateway != p.budget.unit:
        p.budget = RestartBudget(gateway)   # another unit's restarts are not this one's
    p.deferred = None


def reconcile(p: "Policy", actual: str | None, now: float, wall: float) -> str | None:
    """What was remembered against where the wizard is (`actual`, from its active config), which
    wins: Policy.reconcile."""
    saved = p.active
    intent = p.intent if isinstance(p.intent, dict) else None
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
            p.active, p.since, p.why = actual, now, f"found on {actual} at start"
            return f"found on {actual} (no saved state)"
        return None
    if actual is not None:
        p.active, p.since = actual, now
    p.why = f"{intent.get('reason')}; {outcome}"
    # An operator's drill that died with the sidecar is not retried behind their back.
    p.forced = None
    p.intent = {**intent, "outcome": outcome, "check": actual}
    return (f"a switch from {intent.get('from')} to {intent.get('to')} was in flight when the "
            f"sidecar stopped: {outcome}")
