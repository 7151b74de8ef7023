"""neverdark.ssh_mux, the client half of OpenSSH's connection-sharing protocol, against a master
played here (its side of PROTOCOL.mux version 4: hello, a session request with three file
descriptors, the reply, the command's output on the passed descriptors, the exit message);
and neverdark.remote choosing it, or ssh, for a fleet read. Real OpenSSH masters over real
sshd answer it in tests/test_testfleet.py and bench/status_bench.py."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from neverdark import remote, ssh_mux
from tests.test_ssh_reuse import fake_ssh, fleet_of, runtime  # noqa: F401 (fixtures)


def packet(*words: int, strings: tuple[bytes, ...] = ()) -> bytes:
    body = b"".join(struct.pack(">I", w) for w in words) + b"".join(
        struct.pack(">I", len(s)) + s for s in strings)
    return struct.pack(">I", len(body)) + body


def read_packet(conn: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        head += conn.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += conn.recv(n - len(body))
    return body


class FakeMaster:
    """One connection's worth of a ControlMaster at `path`, behaving as `how` says."""

    def __init__(self, path: Path, how: str = "answer", output: bytes = b"out\r\nline two\n",
                 status: int = 3):
        self.path, self.how, self.output, self.status = path, how, output, status
        self.command: bytes | None = None
        self.stdin_data: bytes | None = None
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        fds: list[int] = []
        try:
            version = 3 if self.how == "old version" else ssh_mux.VERSION
            conn.sendall(packet(ssh_mux.HELLO, version))
            assert struct.unpack(">II", read_packet(conn)) == (ssh_mux.HELLO, ssh_mux.VERSION)
            if self.how == "old version":
                return
            req = read_packet(conn)
            kind, rid = struct.unpack(">II", req[:8])
            if kind == ssh_mux.NEW_STDIO_FWD:
                return self.forward(conn, rid, req, fds)
            assert kind == ssh_mux.NEW_SESSION
            # reserved string, four flags, the escape char, terminal type, then the command
            off = 8
            (n,) = struct.unpack(">I", req[off:off + 4]); off += 4 + n
            flags = struct.unpack(">IIIII", req[off:off + 20]); off += 20
            assert flags == (0, 0, 0, 0, ssh_mux.NO_ESCAPE)
            (n,) = struct.unpack(">I", req[off:off + 4]); off += 4 + n
            (n,) = struct.unpack(">I", req[off:off + 4])
            self.command = req[off + 4:off + 4 + n]
            for _ in range(3):
                _, got, _, _ = socket.recv_fds(conn, 1, 1)
                fds += got
            if self.how == "silent":        # its host does not open the channel
                time.sleep(3)
                return
            if self.how == "refuse":
                conn.sendall(packet(ssh_mux.FAILURE, rid, strings=(b"Multiple sessions",)))
                return
            conn.sendall(packet(ssh_mux.SESSION_OPENED, rid, 7))
            self.stdin_data = os.read(fds[0], 100)
            if self.how == "hang":
                time.sleep(3)
                return
            os.write(fds[2], b"a warning\n")
            view = memoryview(self.output)
            while view:
                view = view[os.write(fds[1], view[:65536]):]
            if self.how == "die":
                return                      # no exit message: the master went away
            conn.sendall(packet(ssh_mux.EXIT_MESSAGE, 7, self.status))
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def forward(self, conn: socket.socket, rid: int, req: bytes, fds: list[int]) -> None:
        """A stdio forward: reserved string, host, port, then stdin's and stdout's fds; the
        reply once the far end accepted; what was sent until its EOF; the answer; both closed."""
        (n,) = struct.unpack(">I", req[8:12])
        off = 12 + n
        (n,) = struct.unpack(">I", req[off:off + 4])
        host = req[off + 4:off + 4 + n]
        (port,) = struct.unpack(">I", req[off + 4 + n:off + 8 + n])
        self.command = b"%s:%d" % (host, port)
        for _ in range(2):
            _, got, _, _ = socket.recv_fds(conn, 1, 1)
            fds += got
        if self.how == "silent":
            time.sleep(3)
            return
        if self.how == "refuse":        # sshd said no: forwarding off, nothing listening
            conn.sendall(packet(ssh_mux.FAILURE, rid, strings=(b"Session open refused by peer",)))
            return
        conn.sendall(packet(ssh_mux.SESSION_OPENED, rid, 7))
        data = b""
        while chunk := os.read(fds[0], 65536):
            data += chunk
        self.stdin_data = data
        if self.how == "hang":
            time.sleep(3)
            return
        view = memoryview(self.output)
        while view:
            view = view[os.write(fds[1], view[:65536]):]

    def stop(self) -> None:
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture
def sock_path(tmp_path) -> Path:
    short = Path("/tmp") / f"nd-mux-{os.getpid()}-{tmp_path.name[-8:]}"
    yield short
    short.unlink(missing_ok=True)


def test_a_command_runs_over_the_master_with_its_output_and_exit_status(sock_path):
    master = FakeMaster(sock_path)
    proc = ssh_mux.run(sock_path, "echo 'hi there'; exit 3", timeout=10)
    master.stop()
    assert master.command == b"echo 'hi there'; exit 3"
    assert master.stdin_data == b""                     # stdin is /dev/null, as ssh -n
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\nline two\n", "a warning\n")


def test_a_large_answer_arrives_whole(sock_path):
    big = os.urandom(3000).hex().encode() * 200          # 1.2 MB, far past a socket's buffer
    master = FakeMaster(sock_path, output=big, status=0)
    proc = ssh_mux.run(sock_path, "cat big", timeout=20)
    master.stop()
    assert proc.returncode == 0 and proc.stdout == big.decode()


@pytest.mark.parametrize("how", ["refuse", "old version", "no master", "not a socket"])
def test_a_master_that_cannot_run_it_says_unavailable(sock_path, how):
    master = None
    if how == "not a socket":
        sock_path.write_text("")
    elif how != "no master":
        master = FakeMaster(sock_path, how)
    with pytest.raises(ssh_mux.Unavailable):
        ssh_mux.run(sock_path, "true", timeout=10)
    if master:
        master.stop()


def test_a_master_that_goes_away_mid_command_is_ssh_s_255(sock_path):
    master = FakeMaster(sock_path, "die")
    proc = ssh_mux.run(sock_path, "true", timeout=10)
    master.stop()
    assert proc.returncode == 255 and proc.stdout == "out\nline two\n"


def test_a_command_that_does_not_finish_times_out(sock_path):
    master = FakeMaster(sock_path, "hang")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        ssh_mux.run(sock_path, "sleep 60", timeout=1.0)
    assert time.monotonic() - started < 3
    master.stop()


# --- a forwarded channel (ssh -W): the host starts no session for it --------------------------

def test_a_forward_sends_its_request_and_reads_the_answer_to_its_end(sock_path):
    big = b"HTTP/1.1 200 OK\r\n\r\n" + os.urandom(3000).hex().encode() * 100   # 600 kB
    master = FakeMaster(sock_path, output=big)
    answer = ssh_mux.forward(sock_path, "127.0.0.1", 9470, b"GET /status HTTP/1.0\r\n\r\n", 10)
    master.stop()
    assert master.command == b"127.0.0.1:9470"
    assert master.stdin_data == b"GET /status HTTP/1.0\r\n\r\n"    # then our side's EOF
    assert answer == big                                            # bytes, untranslated


@pytest.mark.parametrize("how", ["refuse", "old version", "no master"])
def test_a_forward_that_cannot_be_made_says_unavailable(sock_path, how):
    master = None if how == "no master" else FakeMaster(sock_path, how)
    with pytest.raises(ssh_mux.Unavailable):
        ssh_mux.forward(sock_path, "127.0.0.1", 9470, b"GET / HTTP/1.0\r\n\r\n", 10)
    if master:
        master.stop()


def test_a_forward_whose_answer_does_not_end_times_out(sock_path):
    master = FakeMaster(sock_path, "hang")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        ssh_mux.forward(sock_path, "127.0.0.1", 9470, b"GET / HTTP/1.0\r\n\r\n", 1.0)
    assert time.monotonic() - started < 3
    master.stop()


def test_a_forward_opened_but_unanswered_in_its_own_time_says_so(sock_path):
    """The channel opened (the host is there) but the far end says nothing: Unanswered after
    `answer_within`, well before the read's whole time, so the caller can ask another way."""
    master = FakeMaster(sock_path, "hang")
    started = time.monotonic()
    with pytest.raises(ssh_mux.Unanswered):
        ssh_mux.forward(sock_path, "127.0.0.1", 9470, b"GET / HTTP/1.0\r\n\r\n", 20,
                        answer_within=0.5)
    assert time.monotonic() - started < 2
    master.stop()


@pytest.mark.parametrize("what", ["forward", "session"])
def test_a_master_whose_host_does_not_answer_is_a_timeout_not_a_fallback(sock_path, what):
    """The master takes the request and its host never opens the channel (a wedged host, a
    master not yet dead of its keepalives): a timeout within the read's time, not Unavailable
    (ssh over the same master would wait the same again)."""
    master = FakeMaster(sock_path, "silent")
    started = time.monotonic()
    if what == "forward":
        with pytest.raises(TimeoutError):
            ssh_mux.forward(sock_path, "127.0.0.1", 9470, b"x", 1.0)
    else:
        with pytest.raises(subprocess.TimeoutExpired):
            ssh_mux.run(sock_path, "true", 1.0)
    assert time.monotonic() - started < 2.5
    master.stop()


def test_remote_forward_needs_a_kept_connection_and_the_mux(runtime, tmp_path, monkeypatch):
    fleet = fleet_of(tmp_path)
    with pytest.raises(ssh_mux.Unavailable):          # no master yet: nothing to forward over
        remote.forward(fleet, "h", 9470, b"x", 5)
    master = FakeMaster(remote.control_path(fleet, "h"), output=b"answer")
    monkeypatch.setenv(remote.MUX_ENV, "0")
    with pytest.raises(ssh_mux.Unavailable):
        remote.forward(fleet, "h", 9470, b"x", 5)
    monkeypatch.delenv(remote.MUX_ENV)
    assert remote.forward(fleet, "h", 9470, b"x", 5) == b"answer"
    master.stop()
    assert master.command == b"127.0.0.1:9470"


# --- neverdark.remote: a fleet read over a kept connection starts no ssh ----------------------

def test_a_fleet_read_over_a_kept_connection_starts_no_ssh(runtime, tmp_path, fake_ssh):
    _, calls = fake_ssh
    fleet = fleet_of(tmp_path)
    master = FakeMaster(remote.control_path(fleet, "h"), status=0)
    proc = remote.run(fleet, "h", "status-read", timeout=10, fleet_read=True)
    master.stop()
    assert master.command == b"status-read"
    assert proc.stdout == "out\nline two\n" and calls() == []


def test_with_the_mux_off_a_kept_connection_is_used_through_ssh(runtime, tmp_path, fake_ssh,
                                                                monkeypatch):
    _, calls = fake_ssh
    monkeypatch.setenv(remote.MUX_ENV, "0")
    fleet = fleet_of(tmp_path)
    remote.control_path(fleet, "h").write_text("")
    proc = remote.run(fleet, "h", "true", timeout=10, fleet_read=True)
    assert proc.stdout.strip() == "over-the-master" and len(calls()) == 1


def test_a_refused_session_falls_back_to_ssh_over_the_master(runtime, tmp_path, fake_ssh):
    _, calls = fake_ssh
    fleet = fleet_of(tmp_path)
    master = FakeMaster(remote.control_path(fleet, "h"), "refuse")
    proc = remote.run(fleet, "h", "true", timeout=10, fleet_read=True)
    master.stop()
    assert proc.stdout.strip() == "over-the-master"
    assert any(a.startswith("ControlPath=") for a in calls()[0]) and len(calls()) == 1


def test_a_master_dying_mid_read_is_retried_once_on_a_connection_of_its_own(
        runtime, tmp_path, fake_ssh):
    _, calls = fake_ssh
    fleet = fleet_of(tmp_path)
    master = FakeMaster(remote.control_path(fleet, "h"), "die")
    proc = remote.run(fleet, "h", "true", timeout=10, fleet_read=True)
    master.stop()
    assert (proc.returncode, proc.stdout.strip()) == (0, "own-connection")
    (only,) = calls()
    assert not any(a.startswith("Control") for a in only)
