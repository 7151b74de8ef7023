"""The deployers' base: one component on one host, in three stages (chatmail/relay's cmdeploy).

`deploys/fleet.py` runs every deployer's `install`, then every `configure`, then every
`activate`, so software is in place before any configuration names it and configuration is
complete before any service starts. A deployer records what its uploads changed: a changed unit
file needs a daemon-reload, any other change a restart (or a reload where the service offers
one), and `activate` acts on exactly that.

A deployer declares what it installs once (`owns`: users, groups, venv, directories, units and
files outside its directories), from names and paths alone, so the declaration needs no plan
content. Enabled, the base class creates it (users, groups and the venv in `install`,
directories and uploads in `configure`, units in `activate`); disabled (`enabled=False`: a
component the host no longer needs, a wizard gone from the inventory), the same helpers remove
the same declaration in `activate`: units stopped, files removed, users and groups deleted,
the venv and the directories removed (or archived). An upload outside the declaration is an
error (`uploads`), so nothing a deployer installs can outlive its removal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
# The jinja templates, one folder per component: `templates/<component>/` at the top of the
# checkout (pyinfra's layout, and the design's). `pip install .` ships that folder inside this
# package as deploys/templates (pyproject.toml maps it there with package-dir), where an
# installed `neverdark render` finds it; a checkout has no deploys/templates, so it is the
# top-level folder. The installed place is looked at first: site-packages/templates, where a
# checkout's would be, may be another distribution's.
_INSTALLED_TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATES = _INSTALLED_TEMPLATES if _INSTALLED_TEMPLATES.is_dir() else REPO / "templates"
# StrictUndefined: a missing variable is an error, not a blank.
_JINJA = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                            undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def each(items):
    """Loop over `items` creating operations. pyinfra orders operations by their call site;
    ops from one call site in a loop are told apart by their position (host.loop), so hosts with
    different numbers of wizards, models or files never give pyinfra contradictory orders."""
    return host.loop(list(items))


def plan() -> dict:
    """This host's deploy plan, computed from the inventory by neverdark.plan."""
    return host.data.neverdark


def render(component: str, template: str, **context) -> str:
    """templates/<component>/<template>, rendered on the operator's machine (also for
    `neverdark render`)."""
    return _JINJA.get_template(f"{component}/{template}").render(**context)


@contextlib.contextmanager
def no_diff():
    """Keep secret file contents out of `pyinfra --diff` output."""
    saved = state.config.DIFF
    state.config.DIFF = False
    try:
        yield
    finally:
        state.config.DIFF = saved


# --- what a component installs ---------------------------------------------------------------

@dataclass(frozen=True)
class User:
    """A service user with its own group and no login. `home` is only recorded (HERMES_HOME):
    the user's directories are declared as `Dir`s."""

    name: str
    groups: tuple[str, ...] = ()
    home: str = "/nonexistent"


@dataclass(frozen=True)
class Dir:
    path: str
    user: str = "root"
    group: str = "root"
    mode: str = "0755"
    archive: bool = False   # removal moves it under contract.ARCHIVE_DIR instead (user data)


@dataclass(frozen=True)
class Venv:
    """/opt/neverdark/<component>/venv with exactly `requirements`; removal takes the whole
    /opt/neverdark/<component> (the venv and whatever the component put beside it)."""

    component: str
    requirements: tuple[str, ...]

    @property
    def root(self) -> str:
        return f"{contract.OPT}/{self.component}"


@dataclass
class Owns:
    """A component's declaration: created when its deployer is enabled, removed when disabled.
    `dirs` are created in order and removed whole (a directory inside another declared one goes
    with it); `files` are the paths it uploads outside its directories and unit files."""

    users: list[User] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)   # groups of its own, beyond its users'
    venv: Venv | None = None
    dirs: list[Dir] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def covers(self, path: str) -> bool:
        roots = [d.path for d in self.dirs] + ([self.venv.root] if self.venv else [])
        return (path in self.files
                or path in (unit_path(u) for u in self.units)
                or any(path.startswith(root + "/") for root in roots))

    def top_dirs(self) -> list[Dir]:
        """The declared directories not inside another one, in declaration order."""
        return [d for d in self.dirs
                if not any(d.path.startswith(o.path + "/") for o in self.dirs)]


def unit_path(unit: str) -> str:
    return f"{contract.UNIT_DIR}/{unit}"


class Deployer:
    """Base class: override `owns`, `files` and `effect`, and extend the stages where a
    component does more than its declaration (verified downloads, code syncs)."""

    name = "component"

    def __init__(self, p: dict, enabled: bool = True) -> None:
        self.p = p                       # the host's plan (neverdark.plan.host_plan)
        self.enabled = enabled
        self.restart_ops: list = []      # a change here needs the service restarted
        self.reload_ops: list = []       # ... or only reloaded, where the service can
        self.unit_ops: list = []         # a change here needs systemd's daemon-reload
        self.uploaded: dict = {}         # path -> the op that uploaded it (configure)

    # --- what the component installs (pure: also used by `neverdark render`) ---------------
    def owns(self) -> Owns:
        return Owns()

    def files(self) -> list[File]:
        """What it uploads, with contents from the plan (asked only when enabled)."""
        return []

    def effect(self, f: File) -> str | None:
        """What a change of `f` needs: 'restart' (the default), 'reload' or nothing (None).
        Unit files always need a daemon-reload besides."""
        return "restart"

    def uploads(self) -> list[File]:
        """`files()`, each checked to lie within the declaration, so disabling removes it."""
        owns, found = self.owns(), self.files()
        outside = [f.path for f in found if not owns.covers(f.path)]
        if outside:
            raise RuntimeError(f"{self.name}: uploads outside what it declares (so its removal "
                               f"would leave them): {', '.join(outside)}")
        return found

    # --- the stages ------------------------------------------------------------------------
    def install(self) -> None:
        if not self.enabled:
            return
        owns = self.owns()
        for group in each(owns.groups):
            self.group(group)
        for user in each(owns.users):
            self.restart_ops.append(self.user(user))   # new group memberships need a restart
        if owns.venv:
            self.restart_ops.append(self.venv(owns.venv))

    def configure(self) -> None:
        """Directories here, not in install: they may name another component's user (a
        wizard's managed dir is the sidecar's), and every user exists once install is done."""
        if not self.enabled:
            return
        for d in each(self.owns().dirs):
            self.directory(d)
        for f in each(self.uploads()):
            self.uploaded[f.path] = self.put(f, self.effect(f))

    def activate(self) -> None:
        if self.enabled:
            self.start()
        else:
            self.remove_all()

    def start(self) -> None:
        """Enabled: run each unit, restarted or reloaded when what it reads changed."""
        for unit in each(self.owns().units):
            self.run_unit(unit)

    def remove_all(self) -> None:
        """Disabled: the declaration undone. Units first (userdel refuses a user with running
        processes), directories last and in reverse, so the first one declared (a wizard's
        /etc/neverdark/wizards/<w>, by which the next deploy finds a wizard to remove) goes
        last and a removal cut short is finished by the next deploy."""
        owns = self.owns()
        for unit in each(owns.units):
            self.stop_unit(unit)
        for path in each(owns.files):
            self.remove(path)
        for user in each(owns.users):
            self.user(user)
        for group in each(owns.groups):
            self.group(group)
        if owns.venv:
            self.venv(owns.venv)
        for d in each(reversed(owns.top_dirs())):
            self.directory(d)

    # --- the helpers: each creates when enabled and removes when disabled ------------------
    def put(self, f: File, effect: str | None = "restart"):
        """Upload `f` (or remove it when disabled), recording what its change needs."""
        if not self.enabled:
            return self.remove(f.path, effect)
        kwargs = dict(name=f"{self.name}: {f.path}", src=StringIO(f.content), dest=f.path,
                      user=f.user, group=f.group, mode=f.mode)
        if f.secret:
            with no_diff():
                op = files.put(**kwargs)
        else:
            op = files.put(**kwargs)
        return self.track(op, f.path, effect)

    def remove(self, path: str, effect: str | None = "restart"):
        op = files.file(name=f"{self.name}: remove {path}", path=path, present=False)
        return self.track(op, path, effect)

    def directory(self, d: Dir):
        if self.enabled:
            return files.directory(name=f"{self.name}: {d.path}", path=d.path, user=d.user,
                                   group=d.group, mode=d.mode)
        if d.archive:
            return ops.archive_directory(name=f"{self.name}: archive {d.path}", path=d.path,
                                         archive_root=contract.ARCHIVE_DIR,
                                         prefix=d.path.rstrip("/").rsplit("/", 1)[-1])
        return files.directory(name=f"{self.name}: remove {d.path}", path=d.path,
                               present=False)

    def user(self, u: User):
        """ensure_home=False: pyinfra would otherwise create /nonexistent and hand it to
        whichever service user it saw last, so two such users would flip its owner on every
        deploy. The user's group goes with it (userdel's USERGROUPS_ENAB on Debian)."""
        if not self.enabled:
            return server.user(name=f"{self.name}: remove user {u.name}", user=u.name,
                               present=False)
        server.group(name=f"{self.name}: group {u.name}", group=u.name, system=True)
        return server.user(name=f"{self.name}: user {u.name}", user=u.name, group=u.name,
                           groups=list(u.groups) or None, system=True, home=u.home,
                           create_home=False, ensure_home=False, shell="/usr/sbin/nologin")

    def group(self, group: str):
        return server.group(name=f"{self.name}: {'group' if self.enabled else 'remove group'} "
                                 f"{group}", group=group, system=True, present=self.enabled)

    def venv(self, v: Venv):
        if not self.enabled:
            return files.directory(name=f"{self.name}: remove {v.root}", path=v.root,
                                   present=False)
        files.directory(name=f"{self.name}: {v.root}", path=v.root, mode="0755")
        pip.venv(name=f"{self.name}: venv", path=contract.venv(v.component), python="python3")
        return ops.pip_requirements(name=f"{self.name}: requirements",
                                    venv=contract.venv(v.component),
                                    requirements=list(v.requirements), **self.p["pip"])

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
        """Stop and disable the unit, remove its file, and daemon-reload."""
        systemd.service(name=f"{self.name}: stop {unit}", service=unit, running=False,
                        enabled=False)
        self.remove(unit_path(unit), effect=None)
        self.daemon_reload()
