"""The firewall in front of the model servers other hosts of the fleet reach (docs/crosshost.md).

A server a wizard of another host falls back onto listens on its host's private_address, with a
key. nftables (Debian's package) admits the hosts of those wizards, and the host itself, to its
port and drops the rest: table `inet neverdark`, loaded by its own oneshot unit, so the
operator's own rules (/etc/nftables.conf) are left alone. Disabled (no server here is reached
from another host), the unit is stopped, which deletes the table, and its files removed.
"""

from __future__ import annotations

from pyinfra.operations import apt

from deploys import ops
from deploys.deployer import Deployer, Owns, render, unit_path
from neverdark import contract
from neverdark.plan import File


class FirewallDeployer(Deployer):
    name = "firewall"

    def owns(self) -> Owns:
        return Owns(units=[contract.FIREWALL_UNIT], files=[contract.FIREWALL_RULES])

    def ruleset(self) -> File:
        return File(contract.FIREWALL_RULES, render(
            "firewall", "neverdark.nft.j2", rules=self.p["firewall"]["rules"],
            table=contract.FIREWALL_TABLE))

    def files(self) -> list[File]:
        fw = self.p["firewall"]
        return [self.ruleset(), File(unit_path(contract.FIREWALL_UNIT), render(
            "firewall", "neverdark-firewall.service.j2", nft=fw["nft"],
            rules=contract.FIREWALL_RULES, table=contract.FIREWALL_TABLE, units=fw["units"]))]

    def effect(self, f: File) -> str | None:
        # a new ruleset is reloaded (one transaction); a stop and start would open a gap
        return "reload" if f.path == contract.FIREWALL_RULES else "restart"

    def install(self) -> None:
        super().install()
        if self.enabled:
            # only fetched when missing: offline hosts with it preinstalled converge
            apt.packages(name="firewall: nftables", packages=["nftables"], update=False)

    def activate(self) -> None:
        # disabled on a host that never had it: nothing to stop or remove
        # (or a removal cut short after the unit went: its rules file is still there)
        if (self.enabled or ops.host_has_file(unit_path(contract.FIREWALL_UNIT))
                or ops.host_has_file(contract.FIREWALL_RULES)):
            super().activate()
