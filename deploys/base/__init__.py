"""What every neverdark host needs before any component: the host is what the inventory says,
Python venvs and sudo, neverdark's top directories, and on Pi hosts a journal sized for an SD
card."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.operations import apt, files, systemd
from pyinfra.operations.util import any_changed

from deploys.base import resources
from deploys.deployer import Deployer, Owns, each
from neverdark import contract
from neverdark.plan import File

JOURNALD = "systemd-journald.service"


class BaseDeployer(Deployer):
    name = "base"

    def install(self) -> None:
        # Read, never assumed, in one round trip: a Pi image on a VPS (or the reverse, or a
        # 32-bit Pi OS) would install wheels and binaries that cannot run, and threads and the
        # memory fit come from the CPUs and memory the inventory claims; so stop before
        # changing anything.
        real = host.get_fact(resources.HostResources)
        wrong_arch = resources.arch_problem(host.name, self.p["arch"], real)
        refusals, warnings = resources.check(host.name, self.p, real)
        refusals = [wrong_arch, *refusals] if wrong_arch else refusals
        if refusals:
            raise SystemExit("\n".join(refusals) + "\nnothing was changed on this host")
        for text in warnings:
            logger.warning(text)
        # apt.packages only reaches the network when something is missing: offline hosts with
        # these preinstalled converge without an index.
        apt.packages(name="base packages", packages=self.p["base"]["packages"], update=False)
        for path in each((contract.OPT, contract.ETC, contract.VAR)):
            files.directory(name=path, path=path, user="root", group="root", mode="0755")


class JournaldDeployer(Deployer):
    """The journal's caps, on hosts of a profile that wants them (contract.JOURNALD_PROFILES);
    disabled on any other profile, it removes the drop-in (a host that was a Pi in an earlier
    inventory), so the operator's journald settings rule."""

    name = "journald"

    def owns(self) -> Owns:
        return Owns(files=[contract.JOURNALD_DROPIN])

    def files(self) -> list[File]:
        return [self.p["base"]["journald"]]

    def configure(self) -> None:
        if self.enabled:   # systemd's own directory: created, never removed
            files.directory(name="journald: drop-in dir", path=_parent(contract.JOURNALD_DROPIN),
                            user="root", group="root", mode="0755")
        super().configure()

    def activate(self) -> None:
        super().activate()
        # journald reads its configuration only when it starts; stream connections of running
        # services survive its restart (it keeps them in its file descriptor store).
        systemd.service(name="journald: restart systemd-journald (its limits changed)",
                        service=JOURNALD, restarted=True, _if=any_changed(*self.restart_ops))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]
