"""The sidecar: this repo's `sidecar` package (and the contract it reads), its generated config,
secrets, sudo rule and unit."""

from __future__ import annotations

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import REPO, Deployer, Dir, Owns, User, Venv, each, render
from neverdark import contract
from neverdark.plan import File

SUDOERS_STAGED = f"{contract.ETC}/sidecar.sudoers"


class SidecarDeployer(Deployer):
    """Enabled when the host has wizards; disabled it stops the sidecar and removes it."""

    name = "sidecar"

    def __init__(self, p: dict, wizards: list | None = None, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.wizards = wizards or []   # WizardDeployer objects: their variants are our input

    def owns(self) -> Owns:
        p = self.p["sidecar"]
        # The ops group lets it hand its control socket to the operators.
        return Owns(users=[User(contract.SIDECAR_USER, tuple(p["groups"]))],
                    groups=[contract.OPS_GROUP],
                    venv=Venv("sidecar", tuple(p["requirements"])),
                    dirs=[Dir(contract.SIDECAR_STATE_DIR, contract.SIDECAR_USER,
                              contract.SIDECAR_USER, "0700"),
                          # `neverdark model check` results: root writes them (sidecar.modelcheck
                          # runs as root), the sidecar reads them for /metrics. Figures only.
                          Dir(contract.MODEL_CHECK_DIR, "root", "root", "0755")],
                    units=[contract.SIDECAR_UNIT],
                    files=[contract.SIDECAR_CONFIG, contract.SIDECAR_ENV, SUDOERS_STAGED,
                           contract.SIDECAR_SUDOERS, contract.METRICS_TOKEN_FILE])

    def unit_file(self) -> File:
        p = self.p["sidecar"]
        return File(f"{contract.UNIT_DIR}/{contract.SIDECAR_UNIT}",
                    render("sidecar", "neverdark-sidecar.service.j2",
                           watchdog_sec=p["watchdog_sec"], user=contract.SIDECAR_USER,
                           lib=contract.SIDECAR_LIB, python=contract.SIDECAR_PYTHON,
                           config=contract.SIDECAR_CONFIG))

    def sudoers(self) -> File:
        return File(SUDOERS_STAGED, render("sidecar", "sudoers.j2",
                                           units=self.p["sidecar"]["units"],
                                           user=contract.SIDECAR_USER), "0440")

    def files(self) -> list[File]:
        p = self.p["sidecar"]
        return [p["config"], p["env"], self.sudoers(), self.unit_file()]

    def effect(self, f: File) -> str | None:
        # What the sidecar re-reads on SIGHUP (its config and secrets, and the variants) needs
        # a reload, which keeps every wizard's state and probes in flight; its code, venv, unit,
        # groups and sudo rule need a restart. sudo reads its rules at every call: nothing to
        # restart for the staged copy.
        if f.path in (contract.SIDECAR_CONFIG, contract.SIDECAR_ENV):
            return "reload"
        return None if f.path == SUDOERS_STAGED else "restart"

    def install(self) -> None:
        super().install()   # its group, user (with its groups) and venv
        if not self.enabled:
            return
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
        super().configure()   # its state dir, config, secrets, staged sudo rule and unit
        token = self.p["sidecar"].get("metrics_token")
        if self.enabled and token:
            # Before start(): the reload that takes the private listener reads it.
            ops.token_if_missing(name="sidecar: metrics token (made here, on the host)",
                                 path=token, user=contract.SIDECAR_USER)
            ops.file_mode(name="sidecar: metrics token 0600", path=token, mode="0600",
                          user=contract.SIDECAR_USER, group=contract.SIDECAR_USER)
        elif self.enabled:
            # Back to loopback: the token guards nothing any more and would outlive the
            # listener (a later `private` makes a fresh one). No effect of its own: the config
            # without private_listen is what reloads the sidecar.
            self.remove(contract.METRICS_TOKEN_FILE, effect=None)
        if self.enabled:
            ops.install_if_valid(name="sidecar: may restart its gateways only",
                                 source=SUDOERS_STAGED, dest=contract.SIDECAR_SUDOERS,
                                 check="visudo -cqf", mode="0440")

    def start(self) -> None:
        variants = [op for w in self.wizards for op in w.variant_ops]
        self.run_unit(contract.SIDECAR_UNIT, also_reload_on=variants)
