"""The sidecar: this repo's `sidecar` package (and the contract it reads), its generated config,
secrets, sudo rule and unit."""

from __future__ import annotations

from pathlib import Path

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import REPO, Deployer, component_venv, each, render, system_user
from neverdark import contract
from neverdark.plan import File

HERE = Path(__file__).parent
SUDOERS_STAGED = f"{contract.ETC}/sidecar.sudoers"


class SidecarDeployer(Deployer):
    """Enabled when the host has wizards; disabled it stops the sidecar and removes it."""

    name = "sidecar"

    def __init__(self, p: dict, wizards: list | None = None, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.wizards = wizards or []   # WizardDeployer objects: their variants are our input

    def unit_file(self) -> File:
        p = self.p["sidecar"]
        return File(f"{contract.UNIT_DIR}/{contract.SIDECAR_UNIT}",
                    render(HERE, "neverdark-sidecar.service.j2", watchdog_sec=p["watchdog_sec"],
                           user=contract.SIDECAR_USER, lib=contract.SIDECAR_LIB,
                           python=contract.SIDECAR_PYTHON, config=contract.SIDECAR_CONFIG))

    def sudoers(self) -> File:
        return File(SUDOERS_STAGED, render(HERE, "sudoers.j2", units=self.p["sidecar"]["units"],
                                           user=contract.SIDECAR_USER), "0440")

    def files(self) -> list[File]:
        p = self.p["sidecar"]
        return [p["config"], p["env"], self.sudoers(), self.unit_file()]

    def install(self) -> None:
        if not self.enabled:
            return
        self.restart_ops.append(component_venv("sidecar", self.p["sidecar"]["requirements"],
                                                     self.p["pip"]))
        self.restart_ops.append(files.sync(
            name="sidecar: code", src=str(REPO / "sidecar"), dest=f"{contract.SIDECAR_LIB}/sidecar",
            mode="0644", dir_mode="0755", delete=True, exclude=["*.pyc"],
            exclude_dir=["__pycache__"]))
        # The contract the sidecar reads its config with, and nothing else of neverdark.
        files.directory(name="sidecar: contract package", path=f"{contract.SIDECAR_LIB}/neverdark",
                        mode="0755")
        for name in each(("__init__.py", "contract.py")):
            self.restart_ops.append(files.put(
                name=f"sidecar: neverdark/{name}", src=str(REPO / "neverdark" / name),
                dest=f"{contract.SIDECAR_LIB}/neverdark/{name}", mode="0644"))

    def configure(self) -> None:
        if not self.enabled:
            return
        p = self.p["sidecar"]
        self.restart_ops.append(system_user(contract.SIDECAR_USER, groups=p["groups"],
                                            label="sidecar reads wizard variants"))
        files.directory(name="sidecar: state", path=contract.SIDECAR_STATE_DIR,
                        user=contract.SIDECAR_USER, group=contract.SIDECAR_USER, mode="0700")
        # What the sidecar re-reads on SIGHUP (its config and secrets, and the variants) needs
        # a reload, which keeps every wizard's state and probes in flight; its code, venv, unit,
        # groups and sudo rule need a restart.
        self.put(p["config"], effect="reload")
        self.put(p["env"], effect="reload")
        self.put(self.sudoers(), effect=None)
        # sudo reads its rules at every call: nothing to restart.
        ops.install_if_valid(name="sidecar: may restart its gateways only",
                             source=SUDOERS_STAGED, dest=contract.SIDECAR_SUDOERS,
                             check="visudo -cqf", mode="0440")
        self.put(self.unit_file())

    def activate(self) -> None:
        if not self.enabled:
            self.stop_unit(contract.SIDECAR_UNIT)
            for path in each((contract.SIDECAR_SUDOERS, SUDOERS_STAGED, contract.SIDECAR_CONFIG,
                              contract.SIDECAR_ENV)):
                self.remove(path)
            files.directory(name="sidecar: remove the install", path=contract.SIDECAR_DIR,
                            present=False)
            return
        variants = [op for w in self.wizards for op in w.variant_ops]
        self.run_unit(contract.SIDECAR_UNIT, also_reload_on=variants)
