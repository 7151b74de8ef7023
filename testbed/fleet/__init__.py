"""The test fleet: Debian 12 hosts with real systemd and sshd, booted with systemd-nspawn.

Each host is an overlay over a cached mmdebstrap image of its architecture (a `cp -a` copy where
overlayfs is not available), booted with its own network namespace and a /30 link to the runner
(`ve-<machine>` here, `host0` inside), reached over SSH with a key made for the run. `vps` hosts
take SSH as root; `pi` hosts as a `pi` user with passwordless sudo, as on a real Pi. A host of
another architecture than the runner's (aarch64 on x86_64) runs under qemu-user through
binfmt_misc: real arm64 Debian, 10-20x slower. Each host is held to its memory_mb by a memory
cgroup around its whole container, as a real host's RAM holds it. The hosts have no route to a
package index: the runner serves them files over HTTP on each link's runner-side address.

The hosts of one run reach each other at their own addresses (`fleet.address(name)`), routed
through the runner with their source addresses kept (no NAT), so a host's firewall can tell the
fleet's hosts from others; the runner forwards between the run's links only, within the run's
/24 (`fleet.subnet`), and nothing else (net.py says how). A host reaches nothing outside its
run: no default route, and the runner refuses to forward it anywhere else.

Library (tests, demo, benchmarks)::

    with fleet_context(hosts=["vps1:vps", "pi1:pi:aarch64:2048"], run_dir=tmp,
                       serve_dirs={"wheels": wheelhouse_dir}) as fleet:
        fleet.ssh("pi1", "systemctl is-active ssh")        # as root (sudo on a pi host)
        fleet.exec("vps1", "journalctl -b -n 20")          # nsenter, no SSH
        fleet.files_url("vps1") + "/wheels/"               # pip --find-links for that host
        fleet.memory_peak("vps1"), fleet.oom_events("vps1")
        fleet.ssh("vps1", f"curl http://{fleet.address('pi1')}:8080/")   # host to host

An outsider (a host the deploy must not trust, e.g. to prove a firewall refuses it): boot it in
the same run and leave it out of the inventory the test writes; it is an ordinary host with an
address of its own in the run's /24, so a firewall that admits the fleet's hosts by their own
addresses (not by the /24) refuses it::

    with fleet_context(hosts=["vps1:vps", "pi1:pi:aarch64", "out1:vps:256"], ...) as fleet:
        admitted = [fleet.address(n) for n in ("vps1", "pi1")]     # the inventory's hosts
        fleet.ssh("out1", f"python3 -c '...connect to {fleet.address('pi1')}...'")  # refused

(testbed.bed.Testbed(..., outsiders=["out1:vps:256"]) boots them beside the inventory's hosts.)

Many light hosts (issue 18's status benchmark): up to MAX_HOSTS (60) in one run, e.g.
`fleet_context(hosts=[f"h{i:02d}:vps:256" for i in range(20)], ...)` (or `bench/testfleet_bench.py
--many 20`). Measured: 20 hosts up in 13.4 s (overlay roots, cached image, boot to SSH 6.5-7.7 s
each), each idling at 18 MB as its cgroup counts it (peak 23-25 MB: systemd, journald, dbus,
sshd), so memory_mb 256 leaves room for a small daemon.

CLI (run dir defaults to `.run/testfleet`, or `--run-dir` / `$NEVERDARK_TESTFLEET_DIR`)::

    python -m testbed.fleet up vps1:vps pi1:pi:aarch64 [--serve wheels=/var/cache/neverdark/wheels]
    python -m testbed.fleet status
    python -m testbed.fleet ssh pi1 -- sudo systemctl is-system-running
    python -m testbed.fleet down        # power off, keep the host roots
    python -m testbed.fleet destroy     # power off and remove everything of the run

Everything a run creates is named with its run id (`nd<4 hex>`): machines `nd<id>-<host>`,
links `ve-nd<id>-<host>`, memory cgroups `neverdark-nd<id>/<host>`, routing table
`0x6e640000 + <id>` with one rule per link, a registry entry in
/run/neverdark-testfleet/<id>.json. Each run starts by clearing what dead runs left behind
(processes, links, routing, overlay mounts, host roots, cgroups), and never touches a run whose
owner is still alive.

The package, by concern: base (names, limits, FleetError, sh), spec (HostSpec), image
(mmdebstrap images, binfmt), roots (host roots and mounts), cgroups (memory), net (links,
addresses, routing), fileserver, procs (nspawn processes), access (exec, SSH, pyinfra and
testinfra files), context (FleetContext, fleet_context), stale (clearing dead runs), cli.
"""

from testbed.fleet.base import (BOOT_TIMEOUT, DEBIAN_ARCH, DEFAULT_HOSTS, DEFAULT_MEMORY_MB,
                                DEFAULT_RUN_DIR, EMULATED_SLOWDOWN, MAX_HOSTS, NATIVE_ARCH, NET,
                                PREFIX, PROFILES, REGISTRY, FleetError, sh)
from testbed.fleet.cgroups import CGROUP_PREFIX, _memory_cgroup_of_runner
from testbed.fleet.context import FleetContext, fleet_context
from testbed.fleet.fileserver import serve
from testbed.fleet.image import (INCLUDE, build_image, ensure_binfmt, ensure_image,
                                 ensure_runner_packages, image_dir, image_key)
from testbed.fleet.net import _links
from testbed.fleet.procs import _nspawn_pids
from testbed.fleet.roots import _mounts_under
from testbed.fleet.spec import HostSpec
from testbed.fleet.stale import clear_stale
from testbed.fleet.cli import cli  # noqa: E402 -- last: `cli` is the click group, not the module

# What the tests, the test bed, the demo, the benchmarks and `neverdark testfleet` import from
# here; everything else is imported from its module (testbed.fleet.<module>).
__all__ = ["BOOT_TIMEOUT", "CGROUP_PREFIX", "DEBIAN_ARCH", "DEFAULT_HOSTS", "DEFAULT_MEMORY_MB",
           "DEFAULT_RUN_DIR", "EMULATED_SLOWDOWN", "INCLUDE", "MAX_HOSTS", "NATIVE_ARCH", "NET",
           "PREFIX", "PROFILES", "REGISTRY", "FleetContext", "FleetError", "HostSpec",
           "build_image", "clear_stale", "cli", "ensure_binfmt", "ensure_image",
           "ensure_runner_packages", "fleet_context", "image_dir", "image_key", "serve", "sh",
           "_links", "_memory_cgroup_of_runner", "_mounts_under", "_nspawn_pids"]
