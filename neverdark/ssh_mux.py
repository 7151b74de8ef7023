"""Run a command over a kept OpenSSH connection without starting an ssh process: the client half
of OpenSSH's connection-sharing protocol (its PROTOCOL.mux, version 4, unchanged since OpenSSH
5.x): a hello each way, then a passenger-mode session whose stdin, stdout and stderr this
process passes to the master as file descriptors, then the master's exit message.

Why: `neverdark status` over kept connections spent most of its per-host cost on the operator's
side starting one `ssh` per host (exec, config and key files read, the hello; about 7 ms of CPU
each), the one thing that grew with the fleet. Here a read is a unix-socket round trip from a
thread of the CLI itself.

Only for a master neverdark.remote keeps (its socket in a directory only this user may enter).
Anything short of an opened session raises Unavailable, and the caller runs ssh instead, which
reuses or replaces the master as it always did. Once the session is open, the answer is the
command's, as ssh would give it: its output, and its exit status, or 255 when the master went
away before saying one (ssh's own "the connection failed")."""

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
PERMISSION_DENIED = 0x80000002
FAILURE = 0x80000003
EXIT_MESSAGE = 0x80000004
SESSION_OPENED = 0x80000006
NO_ESCAPE = 0xFFFFFFFF
_MAX_PACKET = 256 * 1024     # the master's replies are a few bytes; anything larger is not one


class Unavailable(Exception):
    """The master could not run the command (no master, an old or odd one, a session refused);
    nothing ran on the host."""


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


def run(control: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
    """`command` on the master's host, as `ssh -o ControlPath=control -- host command` would run
    it with stdin from /dev/null. Raises Unavailable (nothing ran), or subprocess.TimeoutExpired
    after `timeout` s (the session is dropped, as when ssh is killed)."""
    deadline = time.monotonic() + timeout
    argv = ["ssh-mux", str(control), command]
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours: list[socket.socket] = []
    try:
        reader = _Reader(ctl, deadline)
        try:
            ctl.settimeout(max(0.001, deadline - time.monotonic()))
            ctl.connect(str(control))
            ctl.sendall(_packet(_u32(HELLO), _u32(VERSION)))
            hello = reader.packet()
        except TimeoutError:
            raise Unavailable("the master did not say hello in time") from None
        except OSError as e:
            raise Unavailable(f"no master at {control}: {e.strerror or e}") from None
        if hello is None or len(hello) < 8 or struct.unpack(">II", hello[:8]) != (HELLO, VERSION):
            raise Unavailable("the master speaks another protocol version")

        out_r, out_w = socket.socketpair()
        err_r, err_w = socket.socketpair()
        ours += [out_r, err_r]
        rid = 1
        request = _packet(_u32(NEW_SESSION), _u32(rid), _string(b""),
                          _u32(0), _u32(0), _u32(0), _u32(0),   # tty, X11, agent, subsystem
                          _u32(NO_ESCAPE), _string(b""), _string(command.encode()))
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            ctl.sendall(request)
            for fd in (devnull, out_w.fileno(), err_w.fileno()):   # one fd per message, in order
                socket.send_fds(ctl, [b"\0"], [fd])
            reply = reader.packet()
        except TimeoutError:
            raise Unavailable("the master did not open a session in time") from None
        except OSError as e:
            raise Unavailable(f"the master dropped the request: {e.strerror or e}") from None
        finally:
            # the master holds its own copies now; ours closed, its closing them is our EOF
            os.close(devnull)
            out_w.close()
            err_w.close()
        if reply is None or len(reply) < 8:
            raise Unavailable("the master closed without opening a session")
        kind, got = struct.unpack(">II", reply[:8])
        if kind in (PERMISSION_DENIED, FAILURE):
            raise Unavailable(f"the master refused a session: {_message(reply)}")
        if kind != SESSION_OPENED or got != rid or len(reply) < 12:
            raise Unavailable(f"the master answered 0x{kind:08x} to a session request")
        (sid,) = struct.unpack(">I", reply[8:12])

        # The session runs: the command's output arrives on our socketpairs, its exit status
        # on the control socket, which the master closes when the session is over.
        out, err, status = bytearray(), bytearray(), None
        sinks = {out_r: out, err_r: err}
        sel = selectors.DefaultSelector()
        for s in (out_r, err_r, ctl):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_ = 3
        try:
            while open_:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(argv, timeout, bytes(out), bytes(err))
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
                    elif s is ctl:
                        reader.buf += chunk
                    else:
                        sinks[s] += chunk
        finally:
            sel.close()
        buf = reader.buf    # the master's messages, all read now: the exit status, if sent
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
        for s in ours:
            s.close()
        ctl.close()
