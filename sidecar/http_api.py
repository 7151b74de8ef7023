"""GET /status, /metrics, /healthz and /wizards/<name>.{json,svg} on a loopback address, with
asyncio streams only.

One request per connection (Connection: close): the callers are curl, Prometheus and the CLI,
and keeping the server this small keeps the sidecar free of a web framework.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

from sidecar import badge

log = logging.getLogger(__name__)

WIZARDS = "/wizards/"
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


class HttpApi:
    def __init__(self, status: Callable[[], dict], metrics: Callable[[], str],
                 healthy: Callable[[], bool],
                 wizard: Callable[[str], dict | None] | None = None) -> None:
        self.status, self.metrics, self.healthy = status, metrics, healthy
        self.wizard = wizard    # a wizard's embeddable view (sidecar/badge.py), None if unknown

    def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path.startswith(WIZARDS) and self.wizard is not None:
            if method not in ("GET", "HEAD"):
                return 405, "text/plain", b"only GET\n"
            return self._wizard(path[len(WIZARDS):])
        if path not in ("/status", "/metrics", "/healthz"):
            return 404, "text/plain", b"not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/status":
            # Strict JSON: a NaN or Infinity that slipped through is an error here, not a
            # document that strict parsers (jq, Go, JavaScript) refuse.
            body = json.dumps(self.status(), default=str, allow_nan=False)
            return 200, "application/json", (body + "\n").encode()
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics().encode()
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
            else:
                method = parts[0]
                try:
                    status, ctype, body = self.route(method, parts[1])
                except Exception:  # noqa: BLE001 -- a bug in one view must not kill the server
                    log.exception("http view failed")
                    status, ctype, body = 503, "text/plain", b"internal error\n"
            headers = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
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
