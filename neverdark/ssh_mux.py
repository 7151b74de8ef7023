"""Use a kept OpenSSH connection without starting an ssh process: the client half of OpenSSH's
connection-sharing protocol (its PROTOCOL.mux, version 4, unchanged since OpenSSH 5.x), spoken to
the master from a thread of this process. Two requests, each after a hello each way:
- run(): a passenger-mode session whose stdin, stdout and stderr this process passes to the
  master as file descriptors, then the master's exit message (what `ssh host command` does);
- forward(): a stdio forward, sshd's direct-tcpip channel to a port the host reaches (what
  `ssh -W 127.0.0.1:port host` does): the host starts no session and no process for it.

Why: `neverdark status` over kept connections spent most of its per-host cost on the operator's
side starting one `ssh` per host (exec, config and key files read, the hello; about 7 ms of CPU
each), the one thing that grew with the fleet; and on the host, an sshd session child and a
bash per read (a Pi polled by the panel every few seconds feels each).

Only for a master neverdark.remote keeps (its socket in a directory only this user may enter).
Anything short of an opened session or channel raises Unavailable (nothing ran, nothing was
sent), and the caller reads another way. Once a session is open, the answer is the command's,
as ssh would give it: its output, and its exit status, or 255 when the master went away before
saying one (ssh's own "the connection failed")."""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import time
from pathlib import Path

VERSION = 4
HELLO = 0x00000001
NEW_SESSION = 0x10000002
NEW_STDIO_FWD = 0x10000008
PERMISSION_DENIED = 0x80000002
FAILURE = 0x80000003
EXIT_MESSAGE = 0x80000004
SESSION_OPENED = 0x80000006
NO_ESCAPE = 0xFFFFFFFF
_RID = 1                     # one request per control connection
_MAX_PACKET = 256 * 1024     # the master's replies are a few bytes; anything larger is not one


class Unavailable(Exception):
    """The master could not run the command (no master, an old or odd one, a session refused);
    nothing ran on the host."""


class Unanswered(Exception):
    """A forward was made and its request sent, but no whole answer came back within the time
    given for one; the host itself answered (its sshd opened the channel)."""


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _packet(*fields: bytes) -> bytes:
    body = b"".join(fields)
    return struct.pack(">I", len(body)) + body


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _split(buf: bytes) -> tuple[bytes, bytes] | None:
    """(the first whole packet's body, the rest) of `buf`, or None while it is incomplete;
    Unavailable for a length no master sends."""
    if len(buf) < 4:
        return None
    (n,) = struct.unpack(">I", buf[:4])
    if n < 4 or n > _MAX_PACKET:
        raise Unavailable(f"the master sent a packet of {n} bytes")
    if len(buf) < 4 + n:
        return None
    return buf[4:4 + n], buf[4 + n:]


class _Reader:
    """The master's packets off the control socket, each read bounded by the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def packet(self) -> bytes | None:
        """One packet's body, or None when the master closed the socket."""
        while (whole := _split(self.buf)) is None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        body, self.buf = whole
        return body


def _message(body: bytes) -> str:
    """The text of a PERMISSION_DENIED or FAILURE reply (type, request id, string)."""
    if len(body) >= 12:
        (n,) = struct.unpack(">I", body[8:12])
        return body[12:12 + n].decode("utf-8", "replace")
    return ""


def _text(data: bytes) -> str:
    # as subprocess's text mode reads a pipe: universal newlines
    return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


def _session(control: Path, deadline: float, request: bytes, fds: list[int],
             what: str) -> tuple[socket.socket, _Reader, int]:
    """Connect to the master, say hello, send `request` (request id 1) and its `fds`, one per
    message as the master receives them; (the control socket, its reader, the session id) once
    the master says the session is open. TimeoutError when the master does not answer in time;
    Unavailable (nothing ran) for anything else."""
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        reader = _Reader(ctl, deadline)
        try:
            ctl.settimeout(max(0.001, deadline - time.monotonic()))
            ctl.connect(str(control))
            ctl.sendall(_packet(_u32(HELLO), _u32(VERSION)))
            hello = reader.packet()
        except TimeoutError:
            raise       # a master that says nothing holds every way to the host: no fallback
        except OSError as e:
            raise Unavailable(f"no master at {control}: {e.strerror or e}") from None
        if hello is None or len(hello) < 8 or struct.unpack(">II", hello[:8]) != (HELLO, VERSION):
            raise Unavailable("the master speaks another protocol version")
        try:
            ctl.sendall(request)
            for fd in fds:
                socket.send_fds(ctl, [b"\0"], [fd])
            reply = reader.packet()
        except TimeoutError:
            raise       # the host does not answer the master: as unreachable as it gets
        except OSError as e:
            raise Unavailable(f"the master dropped the request: {e.strerror or e}") from None
        if reply is None or len(reply) < 8:
            raise Unavailable(f"the master closed without opening {what}")
        kind, got = struct.unpack(">II", reply[:8])
        if kind in (PERMISSION_DENIED, FAILURE):
            raise Unavailable(f"the master refused {what}: {_message(reply)}")
        if kind != SESSION_OPENED or got != _RID or len(reply) < 12:
            raise Unavailable(f"the master answered 0x{kind:08x} to a request for {what}")
        return ctl, reader, struct.unpack(">I", reply[8:12])[0]
    except BaseException:
        ctl.close()
        raise


def _drain(socks: list[socket.socket], sinks: dict, deadline: float, on_timeout) -> None:
    """Read every socket in `socks` to its EOF, each chunk into `sinks[sock]` (a bytearray, or
    a callable for the control socket); `on_timeout()` raises when the deadline passes."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = len(socks)
    try:
        while open_:
            left = deadline - time.monotonic()
            if left <= 0:
                on_timeout()
            for key, _ in sel.select(left):
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(s)
                    open_ -= 1
                elif callable(sinks[s]):
                    sinks[s](chunk)
                else:
                    sinks[s] += chunk
    finally:
        sel.close()


def run(control: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    """`command` on the master's host, as `ssh -o ControlPath=control -- host command` would run
    it with stdin from /dev/null. Raises Unavailable (nothing ran), or subprocess.TimeoutExpired
    after `timeout` s (the session is dropped, as when ssh is killed)."""
    deadline = time.monotonic() + timeout
    argv = ["ssh-mux", str(control), command]
    out_r, out_w = socket.socketpair()
    err_r, err_w = socket.socketpair()
    devnull = os.open(os.devnull, os.O_RDONLY)
    request = _packet(_u32(NEW_SESSION), _u32(_RID), _string(b""),
                      _u32(0), _u32(0), _u32(0), _u32(0),   # tty, X11, agent, subsystem
                      _u32(NO_ESCAPE), _string(b""), _string(command.encode()))
    try:
        try:
            ctl, reader, sid = _session(control, deadline, request,
                                        [devnull, out_w.fileno(), err_w.fileno()], "a session")
        except TimeoutError:
            raise subprocess.TimeoutExpired(argv, timeout) from None
        finally:
            # the master holds its own copies now; ours closed, its closing them is our EOF
            os.close(devnull)
            out_w.close()
            err_w.close()
        # The session runs: the command's output arrives on our socketpairs, its exit status
        # on the control socket, which the master closes when the session is over.
        out, err = bytearray(), bytearray()

        def late():
            raise subprocess.TimeoutExpired(argv, timeout, bytes(out), bytes(err))

        def more(chunk: bytes) -> None:
            reader.buf += chunk

        try:
            _drain([out_r, err_r, ctl], {out_r: out, err_r: err, ctl: more}, deadline, late)
        finally:
            ctl.close()
        status, buf = None, reader.buf  # the master's messages, all read now: the exit status
        try:
            while (whole := _split(buf)) is not None:
                body, buf = whole
                if len(body) >= 12 and struct.unpack(">II", body[:8]) == (EXIT_MESSAGE, sid):
                    status = struct.unpack(">I", body[8:12])[0]
        except Unavailable:
            pass            # a garbled message after the output: no exit status, ssh's 255
        code = 255 if status is None else status
        return subprocess.CompletedProcess(argv, code, _text(bytes(out)), _text(bytes(err)))
    finally:
        out_r.close()
        err_r.close()


def forward(control: Path, host: str, port: int, data: bytes, timeout: float,
            answer_within: float | None = None) -> bytes:
    """Send `data` to `host`:`port` as the master's host connects to it (sshd's direct-tcpip
    channel, what `ssh -W host:port` does), then end our side; everything that comes back
    until the far end closes. The host starts no session and no process for it. Unavailable:
    no connection was made (no master; forwarding off in sshd; nothing listening there);
    Unanswered: the channel opened, but no whole answer came within `answer_within` s of it;
    TimeoutError: no answer at all within `timeout` s."""
    deadline = time.monotonic() + timeout
    in_r, in_w = socket.socketpair()
    out_r, out_w = socket.socketpair()
    request = _packet(_u32(NEW_STDIO_FWD), _u32(_RID), _string(b""),
                      _string(host.encode()), _u32(int(port)))
    try:
        try:
            ctl, _, _ = _session(control, deadline, request, [in_r.fileno(), out_w.fileno()],
                                 f"a connection to {host}:{port}")
        finally:
            in_r.close()
            out_w.close()
        try:
            # The request and then our end of it (the master passes the EOF on: sshd shuts
            # its side for writing); the answer is all that comes back until its EOF.
            answer_by = deadline if answer_within is None else min(
                deadline, time.monotonic() + answer_within)
            in_w.settimeout(max(0.001, answer_by - time.monotonic()))
            answer = bytearray()

            def late():
                if answer_by < deadline:
                    raise Unanswered(f"{host}:{port} sent {len(answer)} bytes and no end "
                                     f"within {answer_within:.0f} s")
                raise TimeoutError(f"no whole answer from {host}:{port} within {timeout:.0f} s")

            try:
                in_w.sendall(data)
            except TimeoutError:
                late()
            in_w.close()
            _drain([out_r], {out_r: answer}, answer_by, late)
            return bytes(answer)
        finally:
            ctl.close()
    finally:
        for s in (in_w, out_r):
            s.close()
