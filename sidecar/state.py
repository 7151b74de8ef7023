"""Per-wizard sidecar state on disk: state_dir/<wizard>.json, written atomically, mode 0600.

The file is the policy's memory across restarts (health, holds, damping, pins, the restart budget,
transitions) and the intent of a switch in flight, written before the switch touches the active
config. Instants are wall time plus the clock readings of the save (Policy.snapshot). It is never
the authority on where a wizard is: that is the active config, which Policy.reconcile lets win.
Strict JSON both ways: NaN or Infinity is never written, and a file holding one is unreadable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from sidecar.atomic import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):   # 1e999 is valid JSON syntax but no number a state can hold
        raise ValueError(f"{text} is out of range")
    return value


def path_for(state_dir: Path, wizard: str) -> Path:
    return Path(state_dir) / f"{wizard}.json"


def save(state_dir: Path, wizard: str, snapshot: dict) -> Path:
    """Persist a policy snapshot (which already carries active, since, why, transitions)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"format": FORMAT, "wizard": wizard, **snapshot}
    dest = path_for(state_dir, wizard)
    write_atomic(dest, (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())
    return dest


def load(state_dir: Path, wizard: str) -> dict | None:
    """The saved snapshot, or None if there is none or it is unreadable (logged, not fatal:
    the state is a memory, and the active config still says where the wizard is)."""
    path = path_for(state_dir, wizard)
    try:
        doc = json.loads(path.read_bytes(), parse_constant=_no_constants,
                         parse_float=_finite)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("wizard") != wizard:
        log.warning("ignoring state file %s: not a format-%d state for %s", path, FORMAT, wizard)
        return None
    return doc
