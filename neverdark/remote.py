"""Run a command on an inventory host over SSH, as pyinfra would reach it."""

from __future__ import annotations

import os
import shlex
import subprocess

from neverdark.inventory import Fleet

SIDECAR_PYTHON = ("env PYTHONPATH=/opt/neverdark/sidecar/lib "
                  "/opt/neverdark/sidecar/venv/bin/python")


def ssh_argv(fleet: Fleet, host: str) -> list[str]:
    h = fleet.hosts[host]
    argv = ["ssh", "-o", "BatchMode=yes", "-p", str(h.ssh.port)]
    if h.ssh.key:
        argv += ["-i", os.path.expanduser(h.ssh.key), "-o", "IdentitiesOnly=yes"]
    if h.ssh.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(h.ssh.known_hosts)}",
                 "-o", "StrictHostKeyChecking=yes"]
    return argv + [f"{h.ssh.user}@{h.address}"]


def run(fleet: Fleet, host: str, command: str, timeout: float = 700) -> subprocess.CompletedProcess:
    """`command` as root on the host (through sudo for a non-root login, as the deploy does)."""
    if fleet.hosts[host].ssh.sudo:
        command = f"sudo -n sh -c {shlex.quote(command)}"
    return subprocess.run([*ssh_argv(fleet, host), command], capture_output=True, text=True,
                          timeout=timeout)


def sidecar_ctl(fleet: Fleet, host: str, *args: str, timeout: float = 700):
    return run(fleet, host, f"{SIDECAR_PYTHON} -m sidecar.ctl {shlex.join(args)}", timeout)
