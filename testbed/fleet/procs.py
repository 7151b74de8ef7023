"""The runner's view of the hosts' processes: systemd-nspawn, each container's PID 1, killing."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from testbed.fleet.base import FleetError


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, names a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    got = _proc_start(pid)
    return got is not None and (start is None or got == start)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _nspawn_pids(machine_prefix: str) -> list[int]:
    """systemd-nspawn processes whose --machine= starts with machine_prefix."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if args and os.path.basename(args[0]) == "systemd-nspawn" and any(
                a.startswith(f"--machine={machine_prefix}") for a in args):
            found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    kids = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _pid1(nspawn_pid: int, timeout: float = 30) -> int:
    """The container's PID 1 (systemd) as the runner sees it: the child of systemd-nspawn."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(nspawn_pid):
            break
        for kid in _children(nspawn_pid):
            comm = Path(f"/proc/{kid}/comm").read_text().strip() if _alive(kid) else ""
            if comm == "systemd":
                return kid
        time.sleep(0.1)
    raise FleetError(f"systemd-nspawn {nspawn_pid} started no PID 1 (systemd) within {timeout}s")


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


def _kill_container(nspawn_pid: int) -> None:
    for kid in _children(nspawn_pid):
        _kill(kid)
    _kill(nspawn_pid)
    _wait_gone([nspawn_pid], 10)
