"""Local model servers: one llama server unit per distinct local model on the host."""

from __future__ import annotations

from pathlib import Path

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import Deployer, component_venv, each, render, system_user
from neverdark import contract
from neverdark.plan import File

HERE = Path(__file__).parent
LAUNCHER = f"{contract.LLAMA_DIR}/serve.py"


class LlamaDeployer(Deployer):
    """The engine: a venv with llama-cpp-python[server] and the launcher; disabled (no local
    model on the host) it removes them."""

    name = "llama"

    def files(self) -> list[File]:
        return [File(LAUNCHER, (HERE / "serve.py").read_text())]

    def install(self) -> None:
        if not self.enabled:
            return
        system_user(contract.LLAMA_USER)
        self.restart_ops.append(component_venv("llama", self.p["llama"]["requirements"],
                                                     self.p["pip"]))
        for f in each(self.files()):
            self.put(f)

    def configure(self) -> None:
        pass

    def activate(self) -> None:
        if not self.enabled:
            files.directory(name="llama: remove the install (no local model on this host)",
                            path=contract.LLAMA_DIR, present=False)


class LlamaServerDeployer(Deployer):
    """One model's server unit; disabled, it stops and removes the unit of a model no longer
    served here."""

    name = "llama server"

    def __init__(self, p: dict, server: dict | None, unit: str,
                 engine: LlamaDeployer | None = None, models=None,
                 enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.server, self.unit = server, unit
        self.engine, self.models = engine, models   # their installs can restart this server

    def files(self) -> list[File]:
        if self.server is None:
            return []
        return [File(f"{contract.UNIT_DIR}/{self.unit}",
                     render(HERE, "neverdark-llama.service.j2", s=self.server,
                            launcher=LAUNCHER, python=f"{contract.venv('llama')}/bin/python",
                            user=contract.LLAMA_USER, models_dir=contract.MODELS_DIR))]

    def configure(self) -> None:
        if self.enabled:
            super().configure()

    def activate(self) -> None:
        if not self.enabled:
            self.stop_unit(self.unit)
            return
        engine = self.engine.restart_ops if self.engine else []
        model = self.models.changes.get(self.server["model"], ()) if self.models else ()
        self.run_unit(self.unit, also_restart_on=[*engine, *model])


def stale_server_units(wanted: set[str]) -> list[str]:
    """Model server units on the host that the plan no longer has (read, never assumed)."""
    return [u for u in ops.listed_names(contract.UNIT_DIR)
            if u.startswith(contract.LLAMA_UNIT_PREFIX) and u not in wanted]
