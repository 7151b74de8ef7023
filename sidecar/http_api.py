"""GET /status, /metrics, /healthz and /wizards/<name>.{json,svg} on a loopback address, with
asyncio streams only; and, with `sidecar: {metrics: private}`, /status, /metrics and the badges on
the host's private address, every request bearing `Authorization: Bearer <token>` (401 without).

One request per connection (Connection: close): the callers are curl, Prometheus and the CLI,
and keeping the server this small keeps the sidecar free of a web framework.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import stat
from typing import Callable

from neverdark import contract
from sidecar import badge

log = logging.getLogger(__name__)

WIZARDS = "/wizards/"
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bearer(head: bytes) -> bytes | None:
    """The token of the request head's `Authorization: Bearer` header, if it has one."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


class HttpApi:
    def __init__(self, status: Callable[[], dict], metrics: Callable[[], str],
                 healthy: Callable[[], bool],
                 wizard: Callable[[str], dict | None] | None = None,
                 token: Callable[[], bytes | None] | None = None) -> None:
        """`token`: the private listener's, read at each request (a reload may replace it);
        None for the loopback listener, which asks for none."""
        self.status, self.metrics, self.healthy = status, metrics, healthy
        self.wizard = wizard    # a wizard's embeddable view (sidecar/badge.py), None if unknown
        self.token = token

    def authorized(self, head: bytes) -> bool:
        if self.token is None:
            return True
        want, given = self.token(), bearer(head)
        # Constant-time: how long the compare takes says nothing about how much of it matched.
        return bool(want) and given is not None and hmac.compare_digest(want, given)

    def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path.startswith(WIZARDS) and self.wizard is not None:
            if method not in ("GET", "HEAD"):
                return 405, "text/plain", b"only GET\n"
            return self._wizard(path[len(WIZARDS):])
        served = ("/status", "/metrics") if self.token is not None else \
            ("/status", "/metrics", "/healthz")
        if path not in served:
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/status":
            # Strict JSON: a NaN or Infinity that slipped through is an error here, not a
            # document that strict parsers (jq, Go, JavaScript) refuse.
            body = json.dumps(self.status(), default=str, allow_nan=False)
            return 200, "application/json", (body + "\n").encode()
        if path == "/metrics":
            return 200, METRICS_CONTENT_TYPE, self.metrics().encode()
        ok = self.healthy()
        return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"unhealthy\n"

    def _wizard(self, leaf: str) -> tuple[int, str, bytes]:
        name, dot, kind = leaf.rpartition(".")
        view = self.wizard(name) if dot and kind in ("json", "svg") else None
        if view is None:
            return 404, "text/plain", b"not found\n"
        if kind == "svg":
            return 200, "image/svg+xml", badge.svg(view)
        return 200, "application/json", (json.dumps(view, allow_nan=False) + "\n").encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            elif not self.authorized(head):
                method = parts[0]
                status, ctype, body = 401, "text/plain", b"a bearer token is required\n"
            else:
                method = parts[0]
                try:
                    status, ctype, body = self.route(method, parts[1])
                except Exception:  # noqa: BLE001 -- a bug in one view must not kill the server
                    log.exception("http view failed")
                    status, ctype, body = 503, "text/plain", b"internal error\n"
            challenge = 'WWW-Authenticate: Bearer realm="neverdark"\r\n' if status == 401 else ""
            headers = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n{challenge}"
                       f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                       "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode()
            writer.write(headers + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=MAX_HEAD,
                                          reuse_address=True)


class TokenError(ValueError):
    pass


def read_token(path) -> bytes:
    """The private listener's bearer token: a file only its owner may read (0600), one line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise TokenError(f"{path}: cannot read the metrics token: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"{path}: the metrics token is not a regular file")
        if st.st_mode & 0o077:
            raise TokenError(f"{path}: the metrics token is readable by others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}); it must be 0600")
        token = f.read(4096).strip()
    if len(token) < contract.METRICS_TOKEN_MIN or any(c <= 32 or c > 126 for c in token):
        raise TokenError(f"{path}: the metrics token must be one line of at least "
                         f"{contract.METRICS_TOKEN_MIN} printable characters")
    return token
