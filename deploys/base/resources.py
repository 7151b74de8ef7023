"""What a host really has (architecture, cores, memory, time sync), read in one fact, and what
the deploy makes of it against the inventory: refuse before any change, or warn.

Pure apart from the fact class, so the decisions are unit-tested (tests/test_host_resources.py)
and the fact's command is run there against this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinfra.api import FactBase

from neverdark.artifacts import ARCHES, arch_spec

# NTP clients whose unit an enabled time sync shows up as (Debian's names; `ntp` is ntpsec's
# transitional name in Debian 12).
TIME_SYNC_UNITS = ("systemd-timesyncd.service", "chrony.service", "ntpsec.service",
                   "ntp.service", "openntpd.service")

# One round trip. `nproc` counts the CPUs this shell may run on (sched_getaffinity), so a
# cgroup cpuset or a taskset is honoured; GNU nproc also obeys OMP_NUM_THREADS and
# OMP_THREAD_LIMIT, which an ssh session may carry in from a login profile, so both are unset.
# MemTotal is what the kernel manages: a little under the board's nominal size (firmware,
# kernel and, on a Pi, the GPU's share are taken first). In a container it is the machine's
# unless the container runtime fakes it (lxcfs); a cgroup memory limit is not read here.
# The architecture twice: the kernel's (`uname -m`) and the packages' (`dpkg
# --print-architecture`). They differ on a Raspberry Pi running the 32-bit Raspberry Pi OS,
# whose Bookworm images boot a 64-bit kernel on a Pi 4 or 5 (uname -m: aarch64) over an armhf
# userland, where neither the aarch64 wheel nor llama-server can run.
COMMAND = (
    "echo \"machine $(uname -m)\"; "
    "echo \"userland $(dpkg --print-architecture 2>/dev/null)\"; "
    "echo \"cores $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)\"; "
    "awk '$1 == \"MemTotal:\" {print \"memtotal_kb\", $2}' /proc/meminfo; "
    "echo \"container $(systemd-detect-virt --container 2>/dev/null | head -n 1)\"; "
    f"for u in {' '.join(TIME_SYNC_UNITS)}; do "
    "echo \"timesync $u $(systemctl is-enabled $u 2>/dev/null || true)\"; done"
)


# `uname -m` as the inventory spells it (a few kernels say arm64 or amd64): from the arches
# neverdark builds for, and their Debian names
MACHINES = {**{a: a for a in ARCHES}, **{spec.debian: a for a, spec in ARCHES.items()}}
# What a 32-bit system says, in uname -m and in dpkg: neverdark builds no engine for it
BITS32 = ("armv6l", "armv7l", "armv8l", "armhf", "armel", "i386", "i686")


@dataclass(frozen=True)
class Resources:
    cores: int | None
    memory_mb: int | None
    container: str | None                     # systemd-detect-virt's name, None on bare metal/VM
    time_sync: tuple[str, ...] = field(default=())   # the NTP units enabled
    machine: str | None = None                # uname -m
    userland: str | None = None               # dpkg --print-architecture; None without dpkg


def parse(lines: list[str]) -> Resources:
    cores = memory_mb = None
    container = machine = userland = None
    sync = []
    for line in lines:
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if key == "machine":
            machine = value or None
        elif key == "userland":
            userland = value or None
        elif key == "cores" and value.isdigit():
            cores = int(value)
        elif key == "memtotal_kb" and value.isdigit():
            memory_mb = int(value) // 1024
        elif key == "container":
            container = None if value in ("", "none") else value
        elif key == "timesync":
            unit, _, state = value.partition(" ")
            # `static`: pulled in by something else. disabled, masked or nothing (not
            # installed) do not count.
            if state.strip() in ("enabled", "enabled-runtime", "alias", "static"):
                sync.append(unit)
    return Resources(cores, memory_mb, container, tuple(sync), machine, userland)


class HostResources(FactBase):
    """uname -m, dpkg's architecture, cores (nproc), MemTotal in MB, container or not, enabled
    NTP units."""

    def command(self) -> str:
        return COMMAND

    def process(self, output) -> Resources:
        return parse(list(output))


def arch_problem(host: str, wanted: str, real: Resources) -> str | None:
    """Why a host cannot take the engines built for the inventory's `arch` (None: it can).

    Both the kernel and the userland must be `wanted`: the wheel is installed by the host's
    python3 (an armhf python takes no aarch64 wheel) and llama-server is loaded by its dynamic
    loader (an armhf system has no /lib/ld-linux-aarch64.so.1)."""
    machine = MACHINES.get(real.machine or "", real.machine)
    bits32 = ("; a 32-bit system cannot run neverdark's engines, which are built for x86_64 and "
              "aarch64 only: install a 64-bit OS (Raspberry Pi OS 64-bit, Debian arm64 or "
              "amd64)")
    if machine != wanted:
        return (f"{host}: the inventory says arch {wanted}, the host says {real.machine!r} "
                f"(uname -m): fix hosts.{host}.arch"
                + (bits32 if real.machine in BITS32 else ""))
    userland = arch_spec(wanted).debian
    if real.userland is not None and real.userland != userland:
        return (f"{host}: the kernel is {real.machine} (uname -m) but the installed system is "
                f"{real.userland} (dpkg --print-architecture), not {userland}: a 64-bit "
                "kernel under a 32-bit userland, as the 32-bit Raspberry Pi OS boots on a Pi 4 "
                f"or 5, cannot install the {wanted} wheel or run the {wanted} llama-server"
                + (bits32 if real.userland in BITS32 else ""))
    return None


def check(host: str, plan: dict, real: Resources) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for the host whose plan (neverdark.plan.host_plan) is `plan`.

    Cores: the inventory's `cores` sets every model server's default threads; more threads than
    CPUs makes llama.cpp's threads wait on each other (a spin-wait per token), so an inventory
    that claims more than the host runs on is refused. Fewer is the operator's choice.

    Memory: refused when `memory_mb` exceeds MemTotal by more than the memory fit's headroom
    for this host, only warned when by less. The fit approved processes adding up to at most
    memory_mb minus that headroom: while the overstatement is within the headroom those
    processes still fit in the real memory (with less room left for the OS and page cache), so
    the nominal size of a board (4096 for a "4 GB" Pi, whose MemTotal is lower) deploys with a
    warning; beyond it the fit's answer is void, and the OOM killer would settle it later.
    """
    want = plan["resources"]
    refusals, warnings = [], []
    if real.cores is None or real.memory_mb is None:
        refusals.append(f"{host}: could not read the host's CPU count (nproc) or MemTotal "
                        "(/proc/meminfo)")
        return refusals, warnings
    if want["cores"] > real.cores:
        refusals.append(f"{host}: the inventory says cores {want['cores']}, the host runs on "
                        f"{real.cores} (nproc): fix hosts.{host}.cores (it sets the model "
                        "servers' default threads)")
    over = want["memory_mb"] - real.memory_mb
    if over > want["headroom_mb"]:
        refusals.append(f"{host}: the inventory says memory_mb {want['memory_mb']}, the host "
                        f"has {real.memory_mb} MB (MemTotal): {over} MB more than it has, beyond "
                        f"the memory fit's {want['headroom_mb']} MB headroom; fix "
                        f"hosts.{host}.memory_mb (at most {real.memory_mb})")
    elif over > 0:
        warnings.append(f"{host}: memory_mb {want['memory_mb']} is {over} MB above the host's "
                        f"MemTotal ({real.memory_mb} MB); the memory fit's headroom shrinks from "
                        f"{want['headroom_mb']} to {want['headroom_mb'] - over} MB. Set "
                        f"hosts.{host}.memory_mb: {real.memory_mb} for an exact fit")
    if plan["profile"] == "pi" and real.container is None and not real.time_sync:
        # A Pi has no RTC. The sidecar's timers do not need wall time (sidecar/policy.py), but
        # TLS to the cloud APIs does: until the clock is set, cloud probes fail and the wizards
        # stay on their local model. Not installed here: the operator may run another client.
        warnings.append(f"{host}: no time sync service is enabled (looked for "
                        f"{', '.join(u.removesuffix('.service') for u in TIME_SYNC_UNITS)}); "
                        "a Pi has no real-time clock, and TLS to the cloud APIs fails while "
                        "the clock is wrong: apt-get install systemd-timesyncd")
    return refusals, warnings
