"""Hermes gateways: one shared pinned venv, per wizard a user, home, config, secrets and unit.

Who owns what (see docs/CONTRACTS.md): the deploy owns each wizard's base config, backend
variants, `.env` and unit; the sidecar owns the active override in HERMES_MANAGED_DIR, which
the deploy only seeds when it is missing, so a deploy never moves a wizard back to its primary.
"""

from __future__ import annotations

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import Deployer, Dir, Owns, User, Venv, each, render
from neverdark import contract
from neverdark.plan import File



class HermesDeployer(Deployer):
    """The shared Hermes venv; disabled (no wizard on the host) it removes it."""

    name = "hermes"

    def owns(self) -> Owns:
        return Owns(venv=Venv("hermes", tuple(self.p["hermes"]["requirements"])))



class WizardDeployer(Deployer):
    """One wizard's gateway. Disabled (a wizard gone from the inventory) it stops and removes
    the unit, archives the wizard's data, removes its deploy-owned config and its user."""

    def __init__(self, p: dict, name: str, w: dict | None = None,
                 hermes: HermesDeployer | None = None, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.wizard, self.w, self.hermes = name, w, hermes
        self.name = f"wizard {name}"
        self.unit = contract.wizard_unit(name)
        self.variant_ops: list = []   # the sidecar reloads when a variant changed

    def owns(self) -> Owns:
        n = self.wizard
        user = contract.wizard_user(n)
        return Owns(
            users=[User(user, home=contract.wizard_home(n))],
            dirs=[Dir(contract.wizard_etc(n)),
                  Dir(f"{contract.wizard_etc(n)}/backends", "root", contract.SIDECAR_USER,
                      "0750"),
                  # Sessions and memories: archived, never deleted, when the wizard goes.
                  Dir(contract.wizard_var(n), archive=True),
                  # 0700, as Hermes itself sets it at every start (a looser mode would be
                  # undone and never converge); the sidecar reads the gateway's errors from the
                  # journal instead.
                  Dir(contract.wizard_home(n), user, user, "0700"),
                  # setgid: the active config the sidecar writes here is the wizard's group's
                  # to read, without the sidecar being a member of it.
                  Dir(contract.wizard_managed_dir(n), contract.SIDECAR_USER, user, "2750")],
            units=[self.unit])

    def unit_file(self) -> File:
        return File(f"{contract.UNIT_DIR}/{self.unit}",
                    render("hermes", "neverdark-wizard.service.j2", w=self.w,
                           hermes=f"{contract.venv('hermes')}/bin/hermes"))

    def files(self) -> list[File]:
        w = self.w
        return [*w["variants"].values(), w["base_config"], w["env"], w["soul"], self.unit_file()]

    def effect(self, f: File) -> str | None:
        # Hermes reads the active copy, not the variants: a variant change is the sidecar's news.
        quiet = {v.path for v in self.w["variants"].values()}
        return None if f.path in quiet else "restart"

    def configure(self) -> None:
        super().configure()   # its directories, then variants, base config, .env, SOUL.md, unit
        if not self.enabled:
            return
        w = self.w
        self.variant_ops = [self.uploaded[f.path] for f in w["variants"].values()]
        for stale in each(ops.listed_names(f"{w['etc']}/backends")):
            if stale.removesuffix(".yaml") not in w["variants"]:
                self.variant_ops.append(self.remove(f"{w['etc']}/backends/{stale}"))
        ops.write_if_missing(name=f"{self.name}: seed the active config (primary)",
                             path=w["active_config"], source=w["variants"][w["primary"]].path,
                             user=contract.SIDECAR_USER, group=w["user"], mode="0640")
        base = self.uploaded[w["base_config"].path]
        # Hermes rewrites the config in its home at runtime; ours is copied over only when ours
        # changed, or a deploy would fight the gateway and never reach zero changes.
        self.track(ops.copy_on_change(name=f"{self.name}: HERMES_HOME/config.yaml",
                                      source=w["base_config"].path,
                                      dest=f"{w['home']}/config.yaml", user=w["user"],
                                      mode="0600", changed=base.did_change),
                   f"{w['home']}/config.yaml")

    def start(self) -> None:
        self.run_unit(self.unit, also_restart_on=self.hermes.restart_ops if self.hermes else [])


def stale_wizards(wanted: set[str]) -> list[str]:
    """Wizards deployed on the host that the plan no longer has (read, never assumed)."""
    return [n for n in ops.listed_names(contract.WIZARDS_ETC) if n not in wanted]
