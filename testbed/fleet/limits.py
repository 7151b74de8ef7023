"""The runner's kernel limits a run of hosts needs, raised before the hosts boot.

Every host's systemd, journald and logind each open inotify instances, and all of them count
against one per-user limit shared with the runner (the hosts run as the runner's root, in its user
namespace): `fs.inotify.max_user_instances`, 128 on a stock kernel. Twenty light hosts beside the
test fleet's own pass it, and a host's PID 1 then dies at boot with "Failed to create control
group inotify object: Too many open files" (CI, stop 22). The limit is raised (never lowered) to
what the hosts already running use plus what the new ones will, as an operator running many
containers on one box does."""

from __future__ import annotations

import os
from pathlib import Path

from testbed.fleet.base import FleetError

INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
PER_HOST = 16        # a light host's PID 1, journald, logind and sshd use 6-9; twice that for units
MARGIN = 64          # the runner's own watchers (pytest, Chromium, Prometheus) and a late host


def inotify_instances_in_use(uid: int = 0) -> int:
    """inotify instances open now by `uid`'s processes (the count the kernel limits)."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd) == "anon_inode:inotify":
                        count += 1
                except OSError:
                    continue
        except OSError:      # the process ended while it was read
            continue
    return count


def ensure_inotify_for(hosts: int, path: Path = INOTIFY_INSTANCES) -> int:
    """Raise the inotify instance limit to what `hosts` more hosts need; return the limit now.
    FleetError naming the sysctl when it is too low and cannot be raised."""
    current = int(path.read_text())
    need = inotify_instances_in_use(os.getuid()) + PER_HOST * hosts + MARGIN
    if current >= need:
        return current
    try:
        path.write_text(f"{need}\n")
    except OSError as e:
        raise FleetError(f"{hosts} hosts need about {need} inotify instances and "
                         f"fs.inotify.max_user_instances is {current}; raise it "
                         f"(sysctl -w fs.inotify.max_user_instances={need}): {e}") from None
    return need
