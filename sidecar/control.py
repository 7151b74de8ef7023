"""The local control channel: a unix socket, one JSON request and one JSON reply per connection.

Requests: {"op": "failover"|"pin"|"release"|"status", "wizard": W, "to": BACKEND, "wait": bool,
"timeout": seconds, "stay": seconds (failover only: no failback before then, for a drill's turns)};
{"op": "notify-test"} (sidecar/hooktest.py: a test notice through every hook, each outcome).
Who may use it is checked twice: the socket file is 0660 with group neverdark-ops (connect needs
write permission), and each peer's kernel-reported credentials (SO_PEERCRED) must be root, the
sidecar's own user, or a member of neverdark-ops.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import secrets
import socket
import struct
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

OPS_GROUP = "neverdark-ops"
MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0
OPS = ("failover", "pin", "release", "status", "notify-test")

Handler = Callable[[dict, int], Awaitable[dict]]


class ControlError(RuntimeError):
    pass


class ControlInterrupted(ControlError):
    """The sidecar closed the connection without a whole reply: it stopped or was killed while
    handling the request (what it did with it can be asked once it is back)."""


def _ops_group() -> grp.struct_group | None:
    try:
        return grp.getgrnam(OPS_GROUP)
    except KeyError:
        return None


def peer_allowed(uid: int, gid: int, own_uid: int, ops: grp.struct_group | None) -> bool:
    if uid == 0 or uid == own_uid:
        return True
    if ops is None:
        return False
    if gid == ops.gr_gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return user.pw_gid == ops.gr_gid or user.pw_name in ops.gr_mem


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def bind_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0660, group neverdark-ops if it exists.

    Bound under a temporary name and renamed into place, so the path never exists with looser
    permissions than 0660 and a stale socket from a crashed run is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        try:
            ops = _ops_group()
            if ops is not None:
                os.chown(tmp, -1, ops.gr_gid)
            os.chmod(tmp, 0o660)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """Everything up to the client's SHUT_WR, at most MAX_REQUEST + 1 bytes."""
    data = b""
    while len(data) <= MAX_REQUEST:
        chunk = await reader.read(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def _respond(writer: asyncio.StreamWriter, reply: dict) -> None:
    try:
        text = json.dumps(reply, default=str, allow_nan=False)
    except ValueError as exc:   # NaN/Infinity: strict JSON or an error, never a broken document
        log.error("control reply is not strict JSON: %s", exc)
        text = json.dumps({"ok": False, "error": f"internal error: reply not representable as JSON ({exc})"})
    writer.write((text + "\n").encode())
    await writer.drain()


async def serve(path: Path, handler: Handler) -> asyncio.Server:
    own_uid = os.geteuid()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            try:
                # Read before judging the peer: closing with its request unread would reset the
                # connection, and the refused caller would see ECONNRESET instead of the reason.
                raw = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT)
                if not peer_allowed(uid, gid, own_uid, _ops_group()):
                    log.warning("control request refused", extra={"peer_uid": uid, "peer_pid": pid})
                    await _respond(writer, {"ok": False, "error": f"uid {uid} may not control the "
                                            f"sidecar (root, its own user or group {OPS_GROUP} only)"})
                    return
                if len(raw) > MAX_REQUEST:
                    raise ValueError("request too large")
                request = json.loads(raw)
                if not isinstance(request, dict) or request.get("op") not in OPS:
                    raise ValueError(f"expected a JSON object with op one of {', '.join(OPS)}")
            except (ValueError, asyncio.TimeoutError) as exc:
                await _respond(writer, {"ok": False, "error": f"bad request: {exc}"})
                return
            log.info("control request", extra={"op": request.get("op"), "wizard": request.get("wizard"),
                                               "to": request.get("to"), "peer_uid": uid})
            try:
                reply = await handler(request, uid)
            except Exception as exc:  # noqa: BLE001 -- the operator gets the error, the daemon lives
                log.exception("control handler failed")
                reply = {"ok": False, "error": f"internal error: {exc}"}
            await _respond(writer, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    sock = bind_socket(path)
    return await asyncio.start_unix_server(on_connect, sock=sock)


def control_request(socket_path: str | os.PathLike, payload: dict, timeout: float = 660.0) -> dict:
    """Send one request to a running sidecar and return its reply (the CLI's entry point).

    `timeout` covers a `wait`ed switch, whose first turn on a cold local model can take minutes.
    Raises ControlError when the sidecar cannot be reached or answers garbage.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(socket_path))
            s.sendall(json.dumps(payload).encode())
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except FileNotFoundError:
            raise ControlError(f"{socket_path}: no sidecar listening (is neverdark-sidecar running?)") from None
        except PermissionError:
            raise ControlError(f"{socket_path}: permission denied (root or group {OPS_GROUP} only)") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ControlInterrupted(f"{socket_path}: the sidecar closed the connection before "
                                     "replying (stopped or killed mid-request)") from None
        except OSError as exc:
            raise ControlError(f"{socket_path}: {exc}") from None
    data = b"".join(chunks)
    if not data.endswith(b"\n"):
        # Every reply ends with a newline: anything less was cut off by the sidecar's end.
        raise ControlInterrupted(f"{socket_path}: the sidecar closed the connection before "
                                 "replying (stopped or killed mid-request)")
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"{socket_path}: the sidecar's reply is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{socket_path}: the sidecar's reply is not a JSON object")
    return reply
