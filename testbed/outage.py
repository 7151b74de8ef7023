"""Timing an outage from the user's side: turns through a wizard until the answer changes hands.

Shared by the demo and bench/failover_bench.py. A "client" is testbed.bed.WizardClient (a
real Hermes API server behind an SSH tunnel); who answered comes from Hermes' session record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from testbed.bed import Turn


@dataclass
class Handover:
    seconds: float | None          # from `start` to the first answer by the wanted model
    turns: list[Turn] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(not t.ok for t in self.turns)


def first_answer_from(client, model: str, start: float, timeout: float = 600,
                      pause: float = 0.5, text: str = "Still with me?") -> Handover:
    """Send turns back to back until one is answered by `model`; time it from `start`
    (time.monotonic()). Every turn counts, answered or not."""
    result = Handover(None)
    while time.monotonic() - start < timeout:
        turn = client.turn(text, timeout=max(30.0, timeout - (time.monotonic() - start)))
        result.turns.append(turn)
        if turn.ok and turn.model == model:
            result.seconds = time.monotonic() - start
            return result
        time.sleep(pause)
    return result


def steady_turns(client, seconds: float, pause: float = 0.0, text: str = "One more?") -> list[Turn]:
    """Turns back to back for `seconds`."""
    turns: list[Turn] = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        turns.append(client.turn(f"{text} ({n})", timeout=120))
        if pause:
            time.sleep(pause)
    return turns


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
