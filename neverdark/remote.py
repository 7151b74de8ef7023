"""Run a command on an inventory host over SSH, as pyinfra would reach it.

Nothing from the inventory can become an ssh option: the user goes after `-l`, paths after
`-i` or inside `-o NAME=VALUE`, and the address after `--`, so even a value that slipped past
validation (`-oProxyCommand=...`) is a user name, a file name or a host name to ssh, never an
option it obeys.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess

from neverdark.inventory import Fleet
from neverdark.problems import printable

SIDECAR_PYTHON = ("env PYTHONPATH=/opt/neverdark/sidecar/lib "
                  "/opt/neverdark/sidecar/venv/bin/python")
CONNECT_TIMEOUT = 20  # s: an unreachable host says so (ssh's own error) well before any timeout
# Fleet-wide reads (status, the panel's polls) open one connection per host and carry no
# secret. The default key exchange of OpenSSH 9.0-9.8, sntrup761x25519, costs the operator's ssh
# about 130 ms of CPU per connection (Debian 12's OpenSSH 9.2: 144 ms, against 17 ms with
# curve25519-sha256): 3 s of CPU for 20 hosts on every refresh. Those reads put X25519 first;
# the default list follows it, for a server without it. Commands that act keep the default.
FAST_KEX = "KexAlgorithms=^curve25519-sha256,curve25519-sha256@libssh.org"


def ssh_argv(fleet: Fleet, host: str, fast_kex: bool = False) -> list[str]:
    """ssh's argv up to and including the destination; the remote command follows."""
    h = fleet.hosts[host]
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-p", str(int(h.ssh.port)), "-l", h.ssh.user]
    if fast_kex:
        argv += ["-o", FAST_KEX]
    if h.ssh.key:
        argv += ["-i", os.path.expanduser(h.ssh.key), "-o", "IdentitiesOnly=yes"]
    if h.ssh.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(h.ssh.known_hosts)}",
                 "-o", "StrictHostKeyChecking=yes"]
    return argv + ["--", h.address]


def run(fleet: Fleet, host: str, command: str, timeout: float = 700, *, as_root: bool = True,
        fast_kex: bool = False) -> subprocess.CompletedProcess:
    """`command` as root on the host (through sudo for a non-root login, as the deploy does),
    or as the login user with as_root=False."""
    if as_root and fleet.hosts[host].ssh.sudo:
        command = f"sudo -n -- sh -c {shlex.quote(command)}"
    return subprocess.run([*ssh_argv(fleet, host, fast_kex), command], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def sidecar_ctl(fleet: Fleet, host: str, *args: str, timeout: float = 700):
    return run(fleet, host, f"{SIDECAR_PYTHON} -m sidecar.ctl {shlex.join(args)}", timeout)


# --- reading a host-side tool's answer (status, control ops, drills, notify) -----------------

def attempt(run) -> tuple[subprocess.CompletedProcess | None, str | None]:
    """(process, None), or (None, why) when ssh could not run or timed out."""
    try:
        return run(), None
    except subprocess.TimeoutExpired as e:
        return None, f"unreachable: no answer within {e.timeout:.0f} s"
    except OSError as e:
        return None, f"cannot run ssh: {e.strerror or e}"


def last_json(proc) -> dict:
    """The host-side tools end their output with one JSON object line; ValueError when not."""
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ValueError("no output")
    answer = json.loads(lines[-1])
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


def why_no_answer(proc) -> str:
    """ssh's own error (exit 255: the host was not reached), else what the remote command
    said last on stderr."""
    last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
    last = printable(last[-300:])
    if proc.returncode == 255:
        return f"unreachable: {last or 'ssh failed without a message'}"
    return f"no answer from the sidecar (exit {proc.returncode})" + (f": {last}" if last else "")
