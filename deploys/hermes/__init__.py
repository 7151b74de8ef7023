"""Hermes gateways: one shared pinned venv, per wizard a user, home, config, secrets and unit.

Who owns what (see docs/CONTRACTS.md): the deploy owns each wizard's base config, backend
variants, `.env` and unit; the sidecar owns the active override in HERMES_MANAGED_DIR, which
the deploy only seeds when it is missing, so a deploy never moves a wizard back to its primary.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra.operations import files, server

from deploys import ops
from deploys.deployer import Deployer, component_venv, each, render
from neverdark import contract
from neverdark.plan import File

HERE = Path(__file__).parent


class HermesDeployer(Deployer):
    """The shared Hermes venv; disabled (no wizard on the host) it removes it."""

    name = "hermes"

    def install(self) -> None:
        if self.enabled:
            self.restart_ops.append(component_venv("hermes", self.p["hermes"]["requirements"],
                                                     self.p["pip"]))

    def activate(self) -> None:
        if not self.enabled:
            files.directory(name="hermes: remove the install (no wizard on this host)",
                            path=contract.HERMES_DIR, present=False)


class WizardDeployer(Deployer):
    """One wizard's gateway. Disabled (a wizard gone from the inventory) it stops and removes
    the unit, archives the wizard's data and removes its deploy-owned config."""

    def __init__(self, p: dict, name: str, w: dict | None = None,
                 hermes: HermesDeployer | None = None, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.wizard, self.w, self.hermes = name, w, hermes
        self.name = f"wizard {name}"
        self.unit = contract.wizard_unit(name)
        self.variant_ops: list = []   # the sidecar reloads when a variant changed

    def unit_file(self) -> File:
        return File(f"{contract.UNIT_DIR}/{self.unit}",
                    render(HERE, "neverdark-wizard.service.j2", w=self.w,
                           hermes=f"{contract.venv('hermes')}/bin/hermes"))

    def files(self) -> list[File]:
        w = self.w
        return [*w["variants"].values(), w["base_config"], w["env"], w["soul"], self.unit_file()]

    def install(self) -> None:
        if not self.enabled:
            return
        w, user = self.w, self.w["user"]
        server.group(name=f"{user} group", group=user, system=True)
        server.user(name=f"{user} user", user=user, group=user, system=True, home=w["home"],
                    create_home=False, ensure_home=False, shell="/usr/sbin/nologin")
        files.directory(name=f"{self.name}: etc", path=f"{w['etc']}/backends", user="root",
                        group=contract.SIDECAR_USER, mode="0750")
        files.directory(name=f"{self.name}: var", path=w["var"], user="root", group="root",
                        mode="0755")
        # 0700, as Hermes itself sets it at every start (a looser mode would be undone and never
        # converge); the sidecar reads the gateway's errors from the journal instead.
        files.directory(name=f"{self.name}: home", path=w["home"], user=user, group=user,
                        mode="0700")
        # setgid: the active config the sidecar writes here is the wizard's group's to read,
        # without the sidecar being a member of it.
        files.directory(name=f"{self.name}: managed dir", path=w["managed_dir"],
                        user=contract.SIDECAR_USER, group=user, mode="2750")

    def configure(self) -> None:
        if not self.enabled:
            return
        w = self.w
        for f in each(w["variants"].values()):
            # Hermes reads the active copy, not these: a variant change is the sidecar's news.
            self.variant_ops.append(self.put(f, effect=None))
        for stale in each(ops.listed_names(f"{w['etc']}/backends")):
            if stale.removesuffix(".yaml") not in w["variants"]:
                self.variant_ops.append(self.remove(f"{w['etc']}/backends/{stale}"))
        ops.write_if_missing(name=f"{self.name}: seed the active config (primary)",
                             path=w["active_config"], source=w["variants"][w["primary"]].path,
                             user=contract.SIDECAR_USER, group=w["user"], mode="0640")
        base = self.put(w["base_config"])
        # Hermes rewrites the config in its home at runtime; ours is copied over only when ours
        # changed, or a deploy would fight the gateway and never reach zero changes.
        self.track(ops.copy_on_change(name=f"{self.name}: HERMES_HOME/config.yaml",
                                      source=w["base_config"].path,
                                      dest=f"{w['home']}/config.yaml", user=w["user"],
                                      mode="0600", changed=base.did_change),
                   f"{w['home']}/config.yaml")
        self.put(w["env"])
        self.put(w["soul"])
        self.put(self.unit_file())

    def activate(self) -> None:
        if not self.enabled:
            self.stop_unit(self.unit)
            ops.archive_directory(name=f"{self.name}: archive sessions and memories",
                                  path=contract.wizard_var(self.wizard),
                                  archive_root=contract.ARCHIVE_DIR, prefix=self.wizard)
            files.directory(name=f"{self.name}: remove config",
                            path=contract.wizard_etc(self.wizard), present=False)
            return
        self.run_unit(self.unit, also_restart_on=self.hermes.restart_ops if self.hermes else [])


def stale_wizards(wanted: set[str]) -> list[str]:
    """Wizards deployed on the host that the plan no longer has (read, never assumed)."""
    return [n for n in ops.listed_names(contract.WIZARDS_ETC) if n not in wanted]
