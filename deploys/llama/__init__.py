"""Local model servers: the engines, and one server unit per distinct local model on the host.

Two engines (neverdark.engines): llama-cpp-python in a venv with neverdark's launcher (the
llama_launcher package, its modules uploaded to /opt/neverdark/llama/lib), and llama.cpp's own
llama-server, uploaded from the operator's machine (neverdark.artifacts builds
it), each file checked against its recorded sha256 before the `server` link is switched to the
new build. A host gets only the engines its models use; the other is removed.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import REPO, Deployer, Dir, Owns, User, Venv, each, render
from neverdark import contract, engines
from neverdark.plan import File

HERE = Path(__file__).parent
LAUNCHER_SRC = REPO / engines.LAUNCHER
LAUNCHER_DIR = f"{contract.LLAMA_LIB}/{engines.LAUNCHER}"


def systemd_quote(arg: str) -> str:
    """One ExecStart argument as systemd reads it ('%' is its specifier character)."""
    arg = arg.replace("%", "%%")
    if arg and not any(c in arg for c in ' \t"\'\\;$'):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_start(argv: list[str]) -> str:
    """The command, an option and its value per line."""
    lines, i = [systemd_quote(argv[0])], 1
    while i < len(argv):
        part = [argv[i]]
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            part.append(argv[i + 1])
        i += len(part)
        lines.append(" ".join(systemd_quote(a) for a in part))
    return " \\\n    ".join(lines)


class LlamaDeployer(Deployer):
    """The engines the host's models use; disabled (no local model on the host) it removes
    both and their user."""

    name = "llama"

    def __init__(self, p: dict, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        llama = p["llama"]
        self.python = enabled and llama.get("python", True)
        self.native = llama.get("native") if enabled else None
        self.python_ops: list = []    # a change restarts the llama-cpp-python servers
        self.native_ops: list = []    # ... the llama-server ones

    def owns(self) -> Owns:
        # The engines' files (venv, wheel, launcher, llama-server builds) all live in LLAMA_DIR,
        # installed by `install` below as the models ask.
        return Owns(users=[User(contract.LLAMA_USER)],
                    dirs=[Dir(contract.LLAMA_DIR), Dir(contract.LLAMA_ETC, mode="0750")])

    def files(self) -> list[File]:
        """The launcher package, module by module (a change to any restarts the
        llama-cpp-python servers)."""
        if not self.python:
            return []
        return [File(f"{LAUNCHER_DIR}/{m.name}", m.read_text())
                for m in sorted(LAUNCHER_SRC.glob("*.py"))]

    def install(self) -> None:
        super().install()
        if not self.enabled:
            return
        # Here, not in configure: the servers' key files go in it, and their deployers
        # configure before this one.
        files.directory(name=f"llama: {contract.LLAMA_ETC}", path=contract.LLAMA_ETC,
                        user="root", group="root", mode="0750")
        if self.python:
            wheel = self.p["llama"]["wheel"]
            files.directory(name="llama: wheel dir", path=wheel["dir"], user="root",
                            group="root", mode="0755")
            self.python_ops += self._upload_verified("llama-cpp-python wheel", wheel["dir"], [
                {"name": wheel["name"], "sha256": wheel["sha256"], "src": wheel["src"],
                 "mode": "0644"}])
            self.python_ops.append(self.venv(Venv("llama", tuple(self.p["llama"]["requirements"]))))
            self._remove_old(contract.LLAMA_WHEEL_PREFIX, keep=wheel["dir"], what="wheel")
            self._launcher()
        else:
            files.directory(name="llama: remove the llama-cpp-python venv (no model uses it)",
                            path=contract.venv("llama"), present=False)
            files.directory(name="llama: remove the launcher", path=contract.LLAMA_LIB,
                            present=False)
            self._remove_old(contract.LLAMA_WHEEL_PREFIX, keep=None, what="wheel")
        if self.native:
            self.native_ops += self._native(self.native)
        else:
            self._remove_native_builds(keep=None)

    def _upload_verified(self, what: str, d: str, uploads: list[dict]) -> list:
        """Upload each file to a staging name and keep it only once its sha256 matches (a file
        already at its final name was verified when it got there)."""
        out = []
        for f in each(uploads):
            final, staged = f"{d}/{f['name']}", f"{d}/{f['name']}.upload"
            files.put(name=f"{what}: upload {f['name']}", src=f["src"], dest=staged,
                      mode="0600", _if=lambda final=final: not ops.host_has_file(final))
            out.append(ops.verified_file(name=f"{what}: verify {f['name']} (sha256)",
                                         path=final, sha256=f["sha256"], staged=staged,
                                         mode=f["mode"]))
            files.file(name=f"{what}: drop staged {f['name']}", path=staged, present=False)
        return out

    def _native(self, native: dict) -> list:
        """Every file verified before the link is switched; builds no longer linked are
        removed."""
        d = native["dir"]
        files.directory(name="llama-server: build dir", path=d, user="root", group="root",
                        mode="0755")
        out = self._upload_verified("llama-server", d, native["files"])
        out.append(ops.atomic_symlink(name="llama-server: activate", path=native["link"],
                                      target=d))
        self._remove_native_builds(keep=d)
        return out

    def _remove_old(self, prefix: str, keep: str | None, what: str) -> None:
        for name in each(ops.listed_names(contract.LLAMA_DIR)):
            path = f"{contract.LLAMA_DIR}/{name}"
            if name.startswith(prefix) and path != keep:
                files.directory(name=f"llama: remove old {what} {name}", path=path,
                                present=False)

    def _remove_native_builds(self, keep: str | None) -> None:
        self._remove_old(contract.LLAMA_SERVER_BUILD_PREFIX, keep, "llama-server build")
        if keep is None:
            files.link(name="llama-server: remove the link", path=contract.LLAMA_SERVER_LINK,
                       present=False)

    def _launcher(self) -> None:
        for d in each((contract.LLAMA_LIB, LAUNCHER_DIR)):
            files.directory(name=f"llama: {d}", path=d, user="root", group="root", mode="0755")
        wanted = self.files()
        for f in each(wanted):
            self.python_ops.append(self.put(f))
        keep = {f.path for f in wanted}
        for name in each(ops.listed_names(LAUNCHER_DIR)):
            path = f"{LAUNCHER_DIR}/{name}"
            if name.endswith(".py") and path not in keep:   # a module it no longer has
                self.python_ops.append(self.remove(path))

    def configure(self) -> None:
        """The directories only: the launcher is uploaded in install, with the engine."""
        if self.enabled:
            for d in each(self.owns().dirs[:1]):
                self.directory(d)

    def restart_ops_for(self, engine: str) -> list:
        return self.native_ops if engine == "llama-server" else self.python_ops


class LlamaServerDeployer(Deployer):
    """One model's server unit; disabled, it stops and removes the unit of a model no longer
    served here."""

    def __init__(self, p: dict, server: dict | None, unit: str,
                 engine: LlamaDeployer | None = None, models=None,
                 enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.server, self.unit = server, unit
        self.engine, self.models = engine, models   # their installs can restart this server
        self.model = unit.removeprefix(contract.LLAMA_UNIT_PREFIX).removesuffix(".service")
        self.name = f"llama server {self.model}"

    def owns(self) -> Owns:
        return Owns(units=[self.unit], files=[contract.llama_key_file(self.model)])

    def unit_file(self) -> File:
        key = self.server["key_file"]
        return File(f"{contract.UNIT_DIR}/{self.unit}",
                    render("llama", "neverdark-llama.service.j2", s=self.server,
                           exec_start=exec_start(self.server["argv"]),
                           key_file=key.path if key else None,
                           firewall_unit=contract.FIREWALL_UNIT,
                           user=contract.LLAMA_USER, models_dir=contract.MODELS_DIR))

    def files(self) -> list[File]:
        key = self.server["key_file"]
        return [self.unit_file(), *([key] if key else [])]

    def configure(self) -> None:
        super().configure()
        if self.enabled and not self.server["key_file"]:
            # a server no other host reaches any more keeps no key
            self.remove(contract.llama_key_file(self.model))

    def start(self) -> None:
        engine = self.engine.restart_ops_for(self.server["engine"]) if self.engine else []
        model = self.models.changes.get(self.server["model"], ()) if self.models else ()
        self.run_unit(self.unit, also_restart_on=[*engine, *model])


def stale_server_units(wanted: set[str]) -> list[str]:
    """Model server units on the host that the plan no longer has (read, never assumed)."""
    return [u for u in ops.listed_names(contract.UNIT_DIR)
            if u.startswith(contract.LLAMA_UNIT_PREFIX) and u not in wanted]
