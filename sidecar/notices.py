"""Operator notices by incident: one message when a wizard's trouble starts, one when it is over.

An outage makes many events: alerts for each backend, a failover, perhaps a switch that fails and
a second failover, a failback that does not hold. Each would be a message; an operator woken by
the first needs none of the others until it is over. So, per wizard:

- the first event while the wizard has no open incident opens one and is sent at once, as it is
  (its fields, plus `notice: "incident"`);
- every later event while the incident is open is folded in: counted and remembered, not sent;
  except that it gets worse: the first event of a loud kind (the wizard dark, a key rejected) or
  a switch that failed, each once per incident, is sent at once (`notice: "escalation"`), so an
  incident opened by a small trouble never hides a dark wizard;
- the incident is over once the wizard has been calm (on its primary, not dark, no key rejected:
  the runner says so each probe round) for `settle` seconds with no new event; then one
  `recovered` message says how long it lasted and what was folded into it. An event during the
  settle window folds in and starts the window again, so a flapping failback stays one incident.

`settle` 0 turns folding off: every event is sent as it comes (the hooks' behaviour before
notices), and no recovery message is made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

FOLDED_KINDS_SHOWN = 8
LOUD = ("dark", "key_rejected")      # alert kinds logged as errors, and escalations here


@dataclass
class Incident:
    opened_at: float            # monotonic
    opened_wall: float
    first: str                  # the event that opened it
    events: Counter = field(default_factory=Counter)   # every event's kind, the first included
    last_event_at: float = 0.0
    calm_since: float | None = None


def kind_of(event: dict) -> str:
    if event.get("event") == "transition":
        return f"{event.get('kind', 'transition')}{'' if event.get('ok', True) else ' (failed)'}"
    return str(event.get("event"))


class Notices:
    def __init__(self, send: Callable[[dict], None], clock: Callable[[], float],
                 wall: Callable[[], float], settle: Callable[[], float],
                 iso: Callable[[float], str | None]) -> None:
        """`send`: deliver one notice (in the background); `settle`: the current setting (a
        reload may change it)."""
        self._send, self._clock, self._wall, self._settle, self._iso = send, clock, wall, settle, iso
        self.open: dict[str, Incident] = {}

    def event(self, wizard: str, event: dict) -> bool:
        """An event about `wizard`; True if it was sent, False if folded into an incident."""
        if self._settle() <= 0:
            self._send(event)
            return True
        now = self._clock()
        incident = self.open.get(wizard)
        if incident is None:
            incident = self.open[wizard] = Incident(now, self._wall(), kind_of(event))
            incident.events[kind_of(event)] += 1
            incident.last_event_at = now
            self._send({**event, "notice": "incident"})
            return True
        kind = kind_of(event)
        worse = kind not in incident.events and (kind in LOUD or kind.endswith("(failed)"))
        incident.events[kind] += 1
        incident.last_event_at = now
        incident.calm_since = None
        if worse:
            self._send({**event, "notice": "escalation"})
        return worse

    def calm(self, wizard: str, calm: bool) -> bool:
        """The wizard's state after a probe round; True if this closed its incident."""
        incident = self.open.get(wizard)
        if incident is None:
            return False
        now = self._clock()
        if not calm:
            incident.calm_since = None
            return False
        if incident.calm_since is None:
            incident.calm_since = max(now, incident.last_event_at)
            return False
        settle = self._settle()
        if now - max(incident.calm_since, incident.last_event_at) < settle:
            return False
        del self.open[wizard]
        self._send(self.recovery(wizard, incident, now))
        return True

    def forget(self, wizard: str) -> None:
        """A wizard removed by a reload: no recovery to tell."""
        self.open.pop(wizard, None)

    def recovery(self, wizard: str, incident: Incident, now: float) -> dict:
        total = sum(incident.events.values())
        folded = total - 1
        kinds = ", ".join(f"{k} x{n}" if n > 1 else k
                          for k, n in incident.events.most_common(FOLDED_KINDS_SHOWN))
        lasted = now - incident.opened_at
        return {"event": "recovered", "notice": "recovered", "wizard": wizard,
                "detail": (f"{wizard} is back on its primary after {lasted:.0f} s; "
                           f"{total} event{'s' if total != 1 else ''} ({kinds}), "
                           f"{folded} not sent on their own"),
                "incident": {"started": self._iso(incident.opened_wall), "first": incident.first,
                             "events": dict(incident.events), "folded": folded,
                             "lasted_s": round(lasted, 1)},
                "at": self._iso(self._wall())}
