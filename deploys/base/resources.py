"""What a host really has (cores, memory, time sync), read in one fact, and what the deploy
makes of it against the inventory: refuse before any change, or warn.

Pure apart from the fact class, so the decisions are unit-tested (tests/test_host_resources.py)
and the fact's command is run there against this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyinfra.api import FactBase

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
COMMAND = (
    "echo \"cores $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)\"; "
    "awk '$1 == \"MemTotal:\" {print \"memtotal_kb\", $2}' /proc/meminfo; "
    "echo \"container $(systemd-detect-virt --container 2>/dev/null | head -n 1)\"; "
    f"for u in {' '.join(TIME_SYNC_UNITS)}; do "
    "echo \"timesync $u $(systemctl is-enabled $u 2>/dev/null || true)\"; done"
)


@dataclass(frozen=True)
class Resources:
    cores: int | None
    memory_mb: int | None
    container: str | None                     # systemd-detect-virt's name, None on bare metal/VM
    time_sync: tuple[str, ...] = field(default=())   # the NTP units enabled


def parse(lines: list[str]) -> Resources:
    cores = memory_mb = None
    container = None
    sync = []
    for line in lines:
        key, _, value = line.strip().partition(" ")
        value = value.strip()
        if key == "cores" and value.isdigit():
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
    return Resources(cores, memory_mb, container, tuple(sync))


class HostResources(FactBase):
    """cores (nproc), MemTotal in MB, container or not, enabled NTP units."""

    def command(self) -> str:
        return COMMAND

    def process(self, output) -> Resources:
        return parse(list(output))


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
