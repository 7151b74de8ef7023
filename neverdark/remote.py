"""Run a command on an inventory host over SSH, as pyinfra would reach it.

Nothing from the inventory can become an ssh option: the user goes after `-l`, paths after
`-i` or inside `-o NAME=VALUE`, and the address after `--`, so even a value that slipped past
validation (`-oProxyCommand=...`) is a user name, a file name or a host name to ssh, never an
option it obeys.

Fleet-wide reads (`status`, `--watch`, the panel's polls; `fleet_read=True`) reuse one
connection per host, OpenSSH's own ControlMaster: the first read opens it, later reads in the
next CONTROL_PERSIST seconds run over it, from this or another neverdark process. A new
connection costs the host a key exchange, a login and a PAM session, and the operator's ssh the
client half of them: bench/status_bench.py measured a host's read inside a 20-host run at 0.27 s
median over a new connection, 0.07 s over a kept one through an ssh process, 0.01 s through a
forwarded channel with none: a read over a kept connection speaks to the master from this
process (neverdark.ssh_mux, `forward` for /status), and starts ssh only when the master cannot
run it. The masters' sockets
live in a directory only this user can enter (a socket there is a login to the host); the
socket's name hashes everything that decides which host and key it speaks for, so a re-keyed or
rebuilt host never gets an old master. Commands that act (deploy steps, drills, control ops)
open their own connection as before."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from neverdark import contract, ssh_mux
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


CONTROL_PERSIST = 60   # s a kept connection outlives its last read (the panel polls every few s)
# A master whose host went away (no RST: a powered-off Pi, a dropped link) exits after two
# unanswered keepalives instead of holding every later read until its timeout.
CONTROL_ALIVE = ("ServerAliveInterval=5", "ServerAliveCountMax=2")
REUSE_ENV = "NEVERDARK_SSH_REUSE"       # "0": every read opens its own connection
MUX_ENV = "NEVERDARK_SSH_MUX"           # "0": reads over a kept connection start ssh each
FORWARD_ENV = "NEVERDARK_SSH_FORWARD"   # "0": and run a command, not a forwarded channel
# A unix socket's path has at most 107 bytes, and ssh first binds a name 17 characters longer
# than ControlPath; the socket's own name is 32.
_MAX_CONTROL_DIR = 50


def _turned_off(*envs: str) -> bool:
    """Any of these switches set to "0" by the operator."""
    return any(os.environ.get(env, "1").strip() == "0" for env in envs)


def control_dir() -> Path | None:
    """The directory for the kept connections' sockets, made 0700 if new; None (no reuse) when
    reuse is off, or the directory is not a real directory of this user's that no one else
    may enter (in a shared /tmp another user could have made it first)."""
    if _turned_off(REUSE_ENV):
        return None
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"neverdark-ssh-{os.getuid()}"
    if len(str(path)) > _MAX_CONTROL_DIR:
        return None
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def _content_hash(path: str | None) -> str:
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(os.path.expanduser(path)).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def control_path(fleet: Fleet, host: str) -> Path | None:
    """Where `host`'s kept connection listens (None: no reuse). Its name hashes the address,
    port, user, key (path and content) and known_hosts (path and content): any change, a new
    master."""
    where = control_dir()
    if where is None:
        return None
    h = fleet.hosts[host]
    ident = [h.address, str(int(h.ssh.port)), h.ssh.user, h.ssh.key or "",
             _content_hash(h.ssh.key), h.ssh.known_hosts or "", _content_hash(h.ssh.known_hosts)]
    return where / hashlib.sha256("\0".join(ident).encode()).hexdigest()[:32]


def control_options(path: Path) -> list[str]:
    """ssh's options for a kept connection at `path`."""
    escaped = str(path).replace("%", "%%")      # ssh expands %-tokens in ControlPath
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={escaped}",
            "-o", f"ControlPersist={CONTROL_PERSIST}",
            *(x for opt in CONTROL_ALIVE for x in ("-o", opt))]


def ssh_argv(fleet: Fleet, host: str, fast_kex: bool = False,
             control: Path | None = None) -> list[str]:
    """ssh's argv up to and including the destination; the remote command follows. With
    `control`, the read reuses (or opens) the kept connection there."""
    h = fleet.hosts[host]
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-p", str(int(h.ssh.port)), "-l", h.ssh.user]
    if fast_kex:
        argv += ["-o", FAST_KEX]
    if control is not None:
        argv += control_options(control)
    if h.ssh.key:
        argv += ["-i", os.path.expanduser(h.ssh.key), "-o", "IdentitiesOnly=yes"]
    if h.ssh.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(h.ssh.known_hosts)}",
                 "-o", "StrictHostKeyChecking=yes"]
    return argv + ["--", h.address]


def run(fleet: Fleet, host: str, command: str, timeout: float = 700, *, as_root: bool = True,
        fleet_read: bool = False) -> subprocess.CompletedProcess:
    """`command` as root on the host (through sudo for a non-root login, as the deploy does),
    or as the login user with as_root=False. A `fleet_read` (a read every host gets, carrying
    no secret) puts X25519 first and runs over the host's kept connection."""
    if as_root and fleet.hosts[host].ssh.sudo:
        command = f"sudo -n -- sh -c {shlex.quote(command)}"
    control = control_path(fleet, host) if fleet_read else None
    kept = control is not None and control.exists()
    deadline = time.monotonic() + timeout
    proc = None
    if kept and not _turned_off(MUX_ENV):
        try:        # over the kept connection with no ssh process: neverdark.ssh_mux
            proc = ssh_mux.run(control, command, timeout)
        except ssh_mux.Unavailable:
            pass    # nothing ran: ssh reuses the master, or replaces one that is gone
    if proc is None:
        proc = subprocess.run([*ssh_argv(fleet, host, fleet_read, control), command],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    if proc.returncode == 255 and kept:
        # ssh's own failure over a kept connection: its host may have rebooted or its sshd
        # dropped it. Once more on a connection of its own, within the same time; the next
        # read opens a new master.
        proc = subprocess.run([*ssh_argv(fleet, host, fleet_read), command],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=max(1.0, deadline - time.monotonic()))
    return proc


def forward(fleet: Fleet, host: str, port: int, data: bytes, timeout: float,
            answer_within: float | None = None) -> bytes:
    """`data` to `port` on the host's loopback over its kept connection, and the whole answer
    (neverdark.ssh_mux.forward): the host starts no session and no process for it. Raises
    ssh_mux.Unavailable when that cannot be done (no kept connection, reuse or the mux turned
    off, forwarding refused, nothing listening) and ssh_mux.Unanswered when the port gave no
    whole answer within `answer_within` s: the caller reads another way; TimeoutExpired when
    the host did not answer in `timeout` s. A fleet read: carries no secret."""
    control = control_path(fleet, host)
    if control is None or not control.exists() or _turned_off(MUX_ENV, FORWARD_ENV):
        raise ssh_mux.Unavailable("no kept connection to forward over")
    try:
        return ssh_mux.forward(control, contract.LOOPBACK, port, data, timeout, answer_within)
    except TimeoutError:
        raise subprocess.TimeoutExpired(["ssh-mux", str(control), f"-W {port}"], timeout) from None


def close_kept(fleet: Fleet, host: str) -> bool:
    """Close `host`'s kept connection, if there is one; True if one was closed."""
    control = control_path(fleet, host)
    if control is None or not control.exists():
        return False
    proc = subprocess.run([*ssh_argv(fleet, host, control=control)[:-2], "-O", "exit", "--",
                           fleet.hosts[host].address], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def sidecar_ctl(fleet: Fleet, host: str, *args: str, timeout: float = 700):
    return run(fleet, host, f"{SIDECAR_PYTHON} -m sidecar.ctl {shlex.join(args)}", timeout)


# --- reading a host-side tool's answer (status, control ops, drills, notify) -----------------

def attempt(run, limit: float | None = None) -> tuple[subprocess.CompletedProcess | None,
                                                      str | None]:
    """(process, None), or (None, why) when ssh could not run or timed out (within `limit` s,
    when the read had more time than its last try)."""
    try:
        return run(), None
    except subprocess.TimeoutExpired as e:
        return None, f"unreachable: no answer within {limit or e.timeout:.0f} s"
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
