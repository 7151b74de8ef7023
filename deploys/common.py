"""Helpers shared by the component deployers."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pyinfra import host
from pyinfra.context import state
from pyinfra.operations import files, pip, server

from deploys import ops

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


def system_user(user: str, groups: list[str] | None = None, label: str | None = None):
    """A service user with its own group, no login and no home.

    ensure_home=False: pyinfra would otherwise create /nonexistent and hand it to whichever
    service user it saw last, so two such users would flip its owner on every deploy.
    """
    server.group(name=f"{user} group", group=user, system=True)
    return server.user(name=label or f"{user} user", user=user, group=user, groups=groups,
                       system=True, home="/nonexistent", create_home=False, ensure_home=False,
                       shell="/usr/sbin/nologin")


def component_venv(component: str, requirements: list[str]):
    """/opt/neverdark/<component>/venv with exactly `requirements`; returns the install op."""
    base = f"/opt/neverdark/{component}"
    files.directory(name=f"{component} dir", path=base, mode="0755")
    pip.venv(name=f"{component} venv", path=f"{base}/venv", python="python3")
    return ops.pip_requirements(name=f"{component} requirements", venv=f"{base}/venv",
                                requirements=requirements, **plan()["pip"])
