"""Per-wizard sidecar state on disk: state_dir/<wizard>.json, written atomically, mode 0600.

The file is a record of what the sidecar did and the policy's memory (health, holds, damping,
pins) across restarts. It is never the authority on where a wizard is: that is the active config,
which `reconcile` lets win.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sidecar.atomic import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1


def path_for(state_dir: Path, wizard: str) -> Path:
    return Path(state_dir) / f"{wizard}.json"


def save(state_dir: Path, wizard: str, snapshot: dict) -> Path:
    """Persist a policy snapshot (which already carries active, since, why, transitions)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"format": FORMAT, "wizard": wizard, **snapshot}
    dest = path_for(state_dir, wizard)
    write_atomic(dest, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return dest


def load(state_dir: Path, wizard: str) -> dict | None:
    """The saved snapshot, or None if there is none or it is unreadable (logged, not fatal:
    the state is a memory, and the active config still says where the wizard is)."""
    path = path_for(state_dir, wizard)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("wizard") != wizard:
        log.warning("ignoring state file %s: not a format-%d state for %s", path, FORMAT, wizard)
        return None
    return doc


def reconcile(saved: dict | None, actual: str | None, now: float) -> tuple[dict, str | None]:
    """Merge the saved snapshot with where the active config says the wizard is.

    Returns (snapshot to restore, a note for the log or None). The active config wins; when it
    matches no backend, the saved active is kept if there is one.
    """
    snap = dict(saved or {})
    saved_active = snap.get("active")
    if actual is not None and actual != saved_active:
        note = (f"active config says {actual}, state file said {saved_active}"
                if saved_active else f"found on {actual} (no saved state)")
        snap.update(active=actual, since=now, why=f"found on start: {note}")
        # A pin or a forced switch meant for the other backend is no longer meaningful.
        snap["forced"] = None
        return snap, note
    if actual is None:
        if saved_active:
            return snap, f"active config matches no backend; keeping saved {saved_active}"
        return snap, "active config matches no backend and there is no saved state"
    return snap, None
