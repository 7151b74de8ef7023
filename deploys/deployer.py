"""The deployers' base: one component on one host, in three stages (chatmail/relay's cmdeploy).

`deploys/fleet.py` runs every deployer's `install`, then every `configure`, then every
`activate`, so software is in place before any configuration names it and configuration is
complete before any service starts. A deployer records what its uploads changed: a changed unit
file needs a daemon-reload, any other change a restart (or a reload where the service offers
one), and `activate` acts on exactly that. `enabled=False` turns the same deployer into the
removal of what it installs: its files are removed instead of uploaded and its service stopped.
"""

from __future__ import annotations

import contextlib
from io import StringIO
from pathlib import Path

import jinja2
from pyinfra import host
from pyinfra.context import state
from pyinfra.operations import files, pip, server, systemd
from pyinfra.operations.util import any_changed

from deploys import ops
from neverdark import contract
from neverdark.plan import File

REPO = Path(__file__).resolve().parent.parent

def each(items):
    """Loop over `items` creating operations. pyinfra orders operations by their call site;
    ops from one call site in a loop are told apart by their position (host.loop), so hosts with
    different numbers of wizards, models or files never give pyinfra contradictory orders."""
    return host.loop(list(items))


def plan() -> dict:
    """This host's deploy plan, computed from the inventory by neverdark.plan."""
    return host.data.neverdark


def render(component_dir: Path, template: str, **context) -> str:
    """A template beside its deployer, rendered on the operator's machine (also for
    `neverdark render`): StrictUndefined, so a missing variable is an error, not a blank."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(component_dir)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(template).render(**context)


@contextlib.contextmanager
def no_diff():
    """Keep secret file contents out of `pyinfra --diff` output."""
    saved = state.config.DIFF
    state.config.DIFF = False
    try:
        yield
    finally:
        state.config.DIFF = saved


class Deployer:
    """Base class: override `files`, `install`, `configure` and `activate` as needed."""

    name = "component"

    def __init__(self, p: dict, enabled: bool = True) -> None:
        self.p = p                       # the host's plan (neverdark.plan.host_plan)
        self.enabled = enabled
        self.restart_ops: list = []      # a change here needs the service restarted
        self.reload_ops: list = []       # ... or only reloaded, where the service can
        self.unit_ops: list = []         # a change here needs systemd's daemon-reload

    # --- what the component installs (pure: also used by `neverdark render`) ---------------
    def files(self) -> list[File]:
        return []

    # --- the stages ------------------------------------------------------------------------
    def install(self) -> None:
        pass

    def configure(self) -> None:
        for f in each(self.files()):
            self.put(f)

    def activate(self) -> None:
        pass

    # --- helpers ---------------------------------------------------------------------------
    def put(self, f: File, effect: str = "restart"):
        """Upload `f` (or remove it when disabled), recording what its change needs:
        'restart', 'reload' or nothing (None). Unit files always need a daemon-reload."""
        if self.enabled:
            kwargs = dict(name=f"{self.name}: {f.path}", src=StringIO(f.content), dest=f.path,
                          user=f.user, group=f.group, mode=f.mode)
            if f.secret:
                with no_diff():
                    op = files.put(**kwargs)
            else:
                op = files.put(**kwargs)
        else:
            op = files.file(name=f"{self.name}: remove {f.path}", path=f.path, present=False)
        return self.track(op, f.path, effect)

    def remove(self, path: str, effect: str | None = None):
        op = files.file(name=f"{self.name}: remove {path}", path=path, present=False)
        return self.track(op, path, effect)

    def track(self, op, path: str, effect: str | None = "restart"):
        if path.startswith(contract.UNIT_DIR + "/"):
            self.unit_ops.append(op)
        if effect == "restart":
            self.restart_ops.append(op)
        elif effect == "reload":
            self.reload_ops.append(op)
        return op

    def daemon_reload(self) -> None:
        if self.unit_ops:
            systemd.daemon_reload(name=f"{self.name}: daemon-reload",
                                  _if=any_changed(*self.unit_ops))

    def run_unit(self, unit: str, also_restart_on=(), also_reload_on=()) -> None:
        """daemon-reload if a unit changed, restart if an input changed (else reload if only
        what the service re-reads changed), then keep it running and enabled (restart also
        starts a stopped unit, so a fresh one starts once)."""
        self.daemon_reload()
        inputs = [*self.restart_ops, *also_restart_on]
        reloads = [*self.reload_ops, *also_reload_on]
        if inputs:
            systemd.service(name=f"{self.name}: restart {unit} (its inputs changed)",
                            service=unit, restarted=True, _if=any_changed(*inputs))
        if reloads:
            systemd.service(name=f"{self.name}: reload {unit} (its config changed)",
                            service=unit, reloaded=True,
                            _if=lambda: any_changed(*reloads)() and not any_changed(*inputs)())
        systemd.service(name=f"{self.name}: run {unit}", service=unit, running=True,
                        enabled=True)

    def stop_unit(self, unit: str) -> None:
        """The disabled mode's activate: stop and disable the unit, remove its file."""
        systemd.service(name=f"{self.name}: stop {unit}", service=unit, running=False,
                        enabled=False)
        self.remove(f"{contract.UNIT_DIR}/{unit}", effect=None)
        self.daemon_reload()


def system_user(user: str, groups: list[str] | None = None, label: str | None = None):
    """A service user with its own group, no login and no home.

    ensure_home=False: pyinfra would otherwise create /nonexistent and hand it to whichever
    service user it saw last, so two such users would flip its owner on every deploy.
    """
    server.group(name=f"{user} group", group=user, system=True)
    return server.user(name=label or f"{user} user", user=user, group=user, groups=groups,
                       system=True, home="/nonexistent", create_home=False, ensure_home=False,
                       shell="/usr/sbin/nologin")


def component_venv(component: str, requirements: list[str], pip_settings: dict):
    """/opt/neverdark/<component>/venv with exactly `requirements`; returns the install op."""
    base = f"{contract.OPT}/{component}"
    files.directory(name=f"{component} dir", path=base, mode="0755")
    pip.venv(name=f"{component} venv", path=contract.venv(component), python="python3")
    return ops.pip_requirements(name=f"{component} requirements", venv=contract.venv(component),
                                requirements=requirements, **pip_settings)
