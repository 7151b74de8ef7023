"""Memory: one cgroup per host, around its whole container, and what it reads.

A host's limit must hold the whole container, as a real host's RAM does. `MemoryMax=` inside
a container is not enforced here (units show MemoryCurrent "[not set]"), so each host's
systemd-nspawn, and so everything it starts, runs in a child cgroup of the runner's own memory
cgroup: <runner's>/neverdark-nd<run id>/<host>. cgroup v1, as on these machines.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from testbed.fleet.base import PREFIX, FleetError
from testbed.fleet.procs import _kill

CGROUP_PREFIX = "neverdark-"


def _memory_mount() -> tuple[Path, str] | None:
    """(mount point, the hierarchy path it shows) of the cgroup v1 memory controller."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fstype, _, options = (post.split() + ["", "", ""])[:3]
            if fstype == "cgroup" and "memory" in options.split(","):
                return Path(pre.split()[4]), pre.split()[3]
    return None


def _memory_cgroup_of_runner() -> Path:
    """The runner's own cgroup in the cgroup v1 memory hierarchy, as a directory."""
    mount = _memory_mount()
    own = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                own = path
    if mount is None or own is None:
        raise FleetError("test hosts' memory limits need the cgroup v1 memory controller "
                         "(a `cgroup` mount with option memory, and a memory line in "
                         "/proc/self/cgroup); this machine has none")
    point, shown = mount
    if shown != "/" and (own == shown or own.startswith(shown + "/")):
        own = own[len(shown):]              # the mount shows only a subtree (in a container)
    return point / own.lstrip("/")


def run_cgroup(run_id: str) -> Path:
    """The run's memory cgroup; one child per host."""
    return _memory_cgroup_of_runner() / f"{CGROUP_PREFIX}{PREFIX}{run_id}"


def _swap_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _cg_read(cg: Path, knob: str) -> str:
    try:
        return (cg / knob).read_text()
    except OSError as e:
        raise FleetError(f"cannot read {cg / knob}: {e}") from None


def _cg_write(cg: Path, knob: str, value: object) -> None:
    try:
        (cg / knob).write_text(str(value))
    except OSError as e:
        raise FleetError(f"cannot write {value} to {cg / knob}: {e}") from None


def _cg_make(cg: Path, limit_bytes: int | None = None) -> None:
    """Create the cgroup; with a limit on memory and, where swap exists, on memory + swap."""
    try:
        cg.mkdir()
    except OSError as e:
        raise FleetError(f"cannot create memory cgroup {cg}: {e}") from None
    if limit_bytes is None:
        return
    _cg_write(cg, "memory.limit_in_bytes", limit_bytes)
    if (cg / "memory.memsw.limit_in_bytes").exists():
        _cg_write(cg, "memory.memsw.limit_in_bytes", limit_bytes)
    elif _swap_bytes():
        # No memsw accounting (swapaccount=0): with swappiness 0 a v1 memory cgroup never swaps
        # its anonymous memory, so swap cannot hide an overrun.
        _cg_write(cg, "memory.swappiness", 0)
    got = int(_cg_read(cg, "memory.limit_in_bytes"))
    if not limit_bytes - 4096 <= got <= limit_bytes:        # the kernel rounds to pages
        raise FleetError(f"{cg}: memory.limit_in_bytes is {got}, not {limit_bytes}")


def _cg_procs(cg: Path) -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for d, _, _ in os.walk(cg):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(d, "cgroup.procs").read_text().split()]
    return pids


def _cg_remove(cg: Path, timeout: float = 10) -> bool:
    """Kill what still runs in the cgroup (and its children), then remove them, deepest first."""
    if not cg.is_dir():
        return True
    deadline = time.monotonic() + timeout
    while (pids := _cg_procs(cg)) and time.monotonic() < deadline:
        for pid in pids:
            _kill(pid)
        time.sleep(0.1)
    dirs = sorted((d for d, _, _ in os.walk(cg)), key=len, reverse=True)
    for d in dirs:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:       # EBUSY for a moment after its last task exits
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    return not cg.exists()


def _in_cgroup(cg: Path, argv: list[str]) -> list[str]:
    """argv, run from a shell that first moves itself into cgroup `cg` (inherited through exec
    and by every child: nspawn, the container's systemd and all it starts)."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg), *argv]


def _stale_cgroups(live_ids: set[str]) -> list[Path]:
    """Our run cgroups (neverdark-nd<id>, anywhere in the memory hierarchy) of runs not live."""
    found: list[Path] = []
    if (mounted := _memory_mount()) is None:
        return found
    mount = mounted[0]
    for d, subdirs, _ in os.walk(mount):
        depth = len(Path(d).relative_to(mount).parts)
        keep = []
        for sub in subdirs:
            m = re.fullmatch(rf"{CGROUP_PREFIX}{PREFIX}([0-9a-f]{{4}})", sub)
            if m:
                if m.group(1) not in live_ids:
                    found.append(Path(d) / sub)
            elif depth < 6:
                keep.append(sub)
        subdirs[:] = keep
    return found


# -- readings (a host's cgroup: every process of the container) ---------------------------------

class HostMemory:
    """Mixed into FleetContext: a host's memory as its cgroup counts it. Needs `hosts`."""

    hosts: dict[str, dict]

    def _cg(self, name: str) -> Path:
        return Path(self.hosts[name]["cgroup"])

    def memory_limit(self, name: str) -> int:
        """Bytes the host may use (its memory_mb), as the kernel enforces it."""
        return int(_cg_read(self._cg(name), "memory.limit_in_bytes"))

    def memory_usage(self, name: str) -> int:
        """Bytes the host uses now: its processes' memory and its page cache."""
        return int(_cg_read(self._cg(name), "memory.usage_in_bytes"))

    def memory_peak(self, name: str) -> int:
        """The most bytes the host has used since boot or reset_memory_peak()."""
        return int(_cg_read(self._cg(name), "memory.max_usage_in_bytes"))

    def reset_memory_peak(self, name: str) -> None:
        _cg_write(self._cg(name), "memory.max_usage_in_bytes", 0)

    def oom_events(self, name: str) -> dict[str, int]:
        """failcnt (memsw_failcnt: memory + swap): times usage hit the limit (reclaim usually
        follows, no kill); under_oom: 1 while the host is out of memory; oom_kill: processes the
        kernel killed for it."""
        cg = self._cg(name)
        events = {"failcnt": int(_cg_read(cg, "memory.failcnt"))}
        if (cg / "memory.memsw.failcnt").exists():
            events["memsw_failcnt"] = int(_cg_read(cg, "memory.memsw.failcnt"))
        for line in _cg_read(cg, "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key in ("under_oom", "oom_kill"):
                events[key] = int(value)
        events.setdefault("oom_kill", 0)    # kernels before 4.13 do not count kills
        return events
