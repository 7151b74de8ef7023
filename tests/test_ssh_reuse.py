"""Fleet-wide reads reuse one SSH connection per host (neverdark.remote): where the sockets live
and who may enter there, which host and key a socket speaks for, and the one retry when a kept
connection fails. A real master over real sshd runs in tests/test_testfleet.py."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from neverdark import remote
from neverdark.schema import Fleet, Host, Ssh


@pytest.fixture
def runtime(tmp_path, monkeypatch) -> Path:
    """A private XDG_RUNTIME_DIR, short enough for a socket path."""
    short = Path(os.path.realpath("/tmp")) / f"nd-t{os.getpid()}-{tmp_path.name[-6:]}"
    short.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
    monkeypatch.delenv(remote.REUSE_ENV, raising=False)
    yield short
    subprocess.run(["rm", "-rf", str(short)], check=False)


def fleet_of(tmp_path: Path, **ssh) -> Fleet:
    key = tmp_path / "key"
    known = tmp_path / "known_hosts"
    if not key.exists():
        key.write_text("private key one\n")
        known.write_text("10.0.0.5 ssh-ed25519 AAAAone\n")
    host = Host.model_construct(address=ssh.pop("address", "10.0.0.5"), ssh=Ssh.model_construct(
        **{"user": "root", "port": 22, "key": str(key), "known_hosts": str(known),
           "sudo": False, **ssh}))
    return Fleet.model_construct(hosts={"h": host})


def test_the_socket_directory_is_made_private(runtime):
    where = remote.control_dir()
    assert where == runtime / f"neverdark-ssh-{os.getuid()}"
    st = where.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()


@pytest.mark.parametrize("how", ["group-writable", "world-readable", "symlink", "a file",
                                 "another owner"])
def test_a_directory_others_could_enter_turns_reuse_off(runtime, tmp_path, how):
    """In a shared /tmp another user may have made the directory first: a socket there would be
    a login to the host for them, so neverdark keeps no connection at all."""
    path = runtime / f"neverdark-ssh-{os.getuid()}"
    if how == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    elif how == "a file":
        path.write_text("")
    else:
        path.mkdir(mode=0o700)
        if how == "group-writable":
            path.chmod(0o770)
        elif how == "world-readable":
            path.chmod(0o705)
        else:
            if os.getuid() != 0:
                pytest.fail("this case needs root to give the directory away (CI runs as root)")
            os.chown(path, 65534, 65534)
    assert remote.control_dir() is None
    fleet = fleet_of(tmp_path)
    assert remote.control_path(fleet, "h") is None
    assert not any("ControlPath" in a for a in remote.ssh_argv(fleet, "h", True, None))


def test_reuse_can_be_turned_off(runtime, monkeypatch, tmp_path):
    monkeypatch.setenv(remote.REUSE_ENV, "0")
    assert remote.control_dir() is None
    assert remote.control_path(fleet_of(tmp_path), "h") is None


def test_a_directory_too_long_for_a_socket_turns_reuse_off(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / ("x" * 60)))
    assert remote.control_dir() is None


def test_the_socket_name_changes_with_anything_that_decides_the_host_or_key(runtime, tmp_path):
    base = remote.control_path(fleet_of(tmp_path), "h")
    assert base.parent == remote.control_dir() and len(base.name) == 32
    assert remote.control_path(fleet_of(tmp_path), "h") == base        # stable
    others = [remote.control_path(fleet_of(tmp_path, **change), "h") for change in (
        {"address": "10.0.0.6"}, {"port": 2222}, {"user": "pi"},
        {"key": str(tmp_path / "other-key")}, {"known_hosts": str(tmp_path / "other-known")})]
    (tmp_path / "known_hosts").write_text("10.0.0.5 ssh-ed25519 AAAArebuilt\n")  # re-keyed host
    others.append(remote.control_path(fleet_of(tmp_path), "h"))
    (tmp_path / "known_hosts").write_text("10.0.0.5 ssh-ed25519 AAAAone\n")
    (tmp_path / "key").write_text("private key two\n")                         # new key, same file
    others.append(remote.control_path(fleet_of(tmp_path), "h"))
    assert base not in others and len(set(others)) == len(others)


def test_only_fleet_reads_keep_connections(runtime, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(remote.subprocess, "run", lambda argv, **kw: (
        seen.append(argv), subprocess.CompletedProcess(argv, 0, "ok", ""))[1])
    fleet = fleet_of(tmp_path)
    remote.run(fleet, "h", "true", fleet_read=True)
    remote.run(fleet, "h", "true")
    read, act = seen
    path = remote.control_path(fleet, "h")
    assert f"ControlPath={path}" in read and "ControlMaster=auto" in read
    assert f"ControlPersist={remote.CONTROL_PERSIST}" in read
    assert "ServerAliveInterval=5" in read and remote.FAST_KEX in read
    assert read.index(f"ControlPath={path}") < read.index("--")
    assert not any(a.startswith("Control") for a in act) and remote.FAST_KEX not in act


def test_a_percent_in_the_directory_is_not_an_ssh_token(tmp_path, monkeypatch):
    short = Path("/tmp") / f"nd%h{os.getpid()}"
    short.mkdir(mode=0o700)
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short))
        fleet = fleet_of(tmp_path)
        path = remote.control_path(fleet, "h")
        argv = remote.ssh_argv(fleet, "h", True, path)
        assert f"ControlPath={str(path).replace('%', '%%')}" in argv
    finally:
        subprocess.run(["rm", "-rf", str(short)], check=False)


FAKE_SSH = """#!/bin/sh
# argv, one per line, then a blank line; a kept connection fails as a dropped master does
for a in "$@"; do echo "$a"; done >> {log}
echo >> {log}
case "$*" in
    *ControlPath=*) [ -e {fail} ] && {{ echo "mux_client_request_session: read from master failed: Broken pipe" >&2; exit 255; }} ;;
esac
case "$*" in *ControlPath=*) echo over-the-master ;; *) echo own-connection ;; esac
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, fail = tmp_path / "ssh.log", tmp_path / "fail"
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH.format(log=log, fail=fail))
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def calls() -> list[list[str]]:
        text = log.read_text() if log.exists() else ""
        return [c.splitlines() for c in text.split("\n\n") if c.strip()]
    return fail, calls


def test_a_failed_kept_connection_is_retried_once_on_a_connection_of_its_own(
        runtime, tmp_path, fake_ssh):
    fail, calls = fake_ssh
    fleet = fleet_of(tmp_path)
    remote.control_path(fleet, "h").write_text("")     # a master's socket is there
    fail.write_text("")
    proc = remote.run(fleet, "h", "true", timeout=30, fleet_read=True)
    assert (proc.returncode, proc.stdout.strip()) == (0, "own-connection")
    first, second = calls()
    assert any(a.startswith("ControlPath=") for a in first)
    assert not any(a.startswith("Control") for a in second) and remote.FAST_KEX in second


def test_no_retry_without_a_kept_connection_or_when_it_answers(runtime, tmp_path, fake_ssh):
    """A host that cannot be reached is not asked twice (each try may wait out ConnectTimeout),
    and an answer over the master is taken as it is."""
    fail, calls = fake_ssh
    fleet = fleet_of(tmp_path)
    fail.write_text("")
    assert remote.run(fleet, "h", "true", timeout=30, fleet_read=True).returncode == 255
    assert len(calls()) == 1
    fail.unlink()
    remote.control_path(fleet, "h").write_text("")
    proc = remote.run(fleet, "h", "true", timeout=30, fleet_read=True)
    assert proc.stdout.strip() == "over-the-master" and len(calls()) == 2
