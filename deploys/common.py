"""Helpers shared by the component deployers."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pyinfra import host
from pyinfra.context import state

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"


def template(component: str, name: str) -> str:
    """Absolute template path: pyinfra caches templates by filename per process."""
    return str(TEMPLATES / component / name)


def plan() -> dict:
    """This host's deploy plan, computed from the inventory by neverdark.plan."""
    return host.data.neverdark


@contextlib.contextmanager
def no_diff():
    """Keep secret file contents out of `pyinfra --diff` output."""
    saved = state.config.DIFF
    state.config.DIFF = False
    try:
        yield
    finally:
        state.config.DIFF = saved
