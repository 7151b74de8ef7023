"""Run a command on an inventory host over SSH, as pyinfra would reach it.

Nothing from the inventory can become an ssh option: the user goes after `-l`, paths after
`-i` or inside `-o NAME=VALUE`, and the address after `--`, so even a value that slipped past
validation (`-oProxyCommand=...`) is a user name, a file name or a host name to ssh, never an
option it obeys.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from neverdark.inventory import Fleet

SIDECAR_PYTHON = ("env PYTHONPATH=/opt/neverdark/sidecar/lib "
                  "/opt/neverdark/sidecar/venv/bin/python")
CONNECT_TIMEOUT = 20  # s: an unreachable host says so (ssh's own error) well before any timeout


def ssh_argv(fleet: Fleet, host: str) -> list[str]:
    """ssh's argv up to and including the destination; the remote command follows."""
    h = fleet.hosts[host]
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-p", str(int(h.ssh.port)), "-l", h.ssh.user]
    if h.ssh.key:
        argv += ["-i", os.path.expanduser(h.ssh.key), "-o", "IdentitiesOnly=yes"]
    if h.ssh.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(h.ssh.known_hosts)}",
                 "-o", "StrictHostKeyChecking=yes"]
    return argv + ["--", h.address]


def run(fleet: Fleet, host: str, command: str, timeout: float = 700) -> subprocess.CompletedProcess:
    """`command` as root on the host (through sudo for a non-root login, as the deploy does)."""
    if fleet.hosts[host].ssh.sudo:
        command = f"sudo -n -- sh -c {shlex.quote(command)}"
    return subprocess.run([*ssh_argv(fleet, host), command], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def sidecar_ctl(fleet: Fleet, host: str, *args: str, timeout: float = 700):
    return run(fleet, host, f"{SIDECAR_PYTHON} -m sidecar.ctl {shlex.join(args)}", timeout)
