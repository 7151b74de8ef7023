"""What every neverdark host needs before any component: the host is what the inventory says,
Python venvs and sudo, neverdark's top directories, and on Pi hosts a journal sized for an SD
card."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.facts.server import Arch
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from deploys.base import resources
from deploys.deployer import Deployer, each, system_user
from neverdark import contract
from neverdark.plan import File

# uname -m on the hosts neverdark knows, as the inventory spells them
ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
JOURNALD = "systemd-journald.service"


class BaseDeployer(Deployer):
    name = "base"

    def files(self) -> list[File]:
        dropin = self.p["base"]["journald"]
        return [dropin] if dropin else []

    def install(self) -> None:
        # Read, never assumed: a Pi image on a VPS (or the reverse) would install wheels and
        # binaries that cannot run, so stop before changing anything.
        real = host.get_fact(Arch)
        wanted = self.p["arch"]
        if ARCH_ALIASES.get((real or "").strip(), real) != wanted:
            raise SystemExit(f"{host.name}: the inventory says arch {wanted}, the host says "
                             f"{real!r} (uname -m): fix hosts.{host.name}.arch; nothing was "
                             "changed on this host")
        # The same for the CPUs and memory the threads and the memory fit were computed from.
        refusals, warnings = resources.check(host.name, self.p,
                                             host.get_fact(resources.HostResources))
        if refusals:
            raise SystemExit("\n".join(refusals) + "\nnothing was changed on this host")
        for text in warnings:
            logger.warning(text)
        # apt.packages only reaches the network when something is missing: offline hosts with
        # these preinstalled converge without an index.
        apt.packages(name="base packages", packages=self.p["base"]["packages"], update=False)
        for path in each((contract.OPT, contract.ETC, contract.VAR)):
            files.directory(name=path, path=path, user="root", group="root", mode="0755")
        if self.p["hermes"]["wizards"]:
            # Users more than one component names: each wizard's managed dir belongs to the
            # sidecar's user, so it exists before any component's own install runs.
            server.group(name="operators group (control socket)", group=contract.OPS_GROUP,
                         system=True)
            system_user(contract.SIDECAR_USER)

    def configure(self) -> None:
        # The journal's caps on Pi hosts; on any other profile the drop-in is removed (a host
        # that was a Pi in an earlier inventory), so the operator's journald settings rule.
        dropin = self.p["base"]["journald"]
        if dropin:
            files.directory(name="base: journald drop-in dir", path=_parent(dropin.path),
                            user="root", group="root", mode="0755")
            self.put(dropin)
        else:
            self.remove(contract.JOURNALD_DROPIN, effect="restart")

    def activate(self) -> None:
        # journald reads its configuration only when it starts; stream connections of running
        # services survive its restart (it keeps them in its file descriptor store).
        systemd.service(name="base: restart systemd-journald (its limits changed)",
                        service=JOURNALD, restarted=True, _if=any_changed(*self.restart_ops))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]
