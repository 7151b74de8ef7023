"""`neverdark panel`: the fleet's status as a web page on the operator's machine.

One poller thread asks every host as `neverdark status` does (neverdark.status, in parallel,
bounded) every `interval` seconds and keeps the latest snapshot; the page (static files in
neverdark/panel/static, no CDN, no framework) gets each new snapshot pushed over server-sent
events (`/api/events`) the moment the poller has it, and can read it (`/api/status`) too. So a
switch shows on the page within one poll interval plus one round trip.

The server binds 127.0.0.1 by default and answers only requests whose Host header names the
address it listens on (a web page elsewhere cannot read it through DNS rebinding). It has no
login: listening on another address shows the fleet's status to whoever reaches it.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from neverdark import status, status_read

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9471"
DEFAULT_INTERVAL = 3.0
HEARTBEAT = 15.0          # s between SSE comments, so proxies and browsers keep the stream
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/panel.js": ("panel.js", "text/javascript; charset=utf-8"),
          "/panel.css": ("panel.css", "text/css; charset=utf-8"),
          "/favicon.svg": ("favicon.svg", "image/svg+xml")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{text!r}: HOST must be an IP address or localhost") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def public_view(snap: dict) -> dict:
    """The snapshot without each sidecar's raw status document (the page does not use it)."""
    return {**snap, "hosts": {h: {k: v for k, v in view.items() if k != "sidecar"}
                              for h, view in snap["hosts"].items()}}


class Poller:
    """Keeps the latest snapshot; `wait_newer(version)` blocks until there is a newer one."""

    def __init__(self, fleet, interval: float = DEFAULT_INTERVAL, **ask) -> None:
        self.fleet, self.interval, self.ask = fleet, interval, ask
        self.snapshot: dict | None = None
        self.version = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="panel-poller", daemon=True)

    def start(self) -> "Poller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=self.ask.get("timeout", status_read.DEFAULT_TIMEOUT) + 5)

    def _run(self) -> None:
        parallel = self.ask.get("parallel", status_read.DEFAULT_PARALLEL)
        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(self.fleet.hosts))),
                                thread_name_prefix="panel-ask") as pool:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    snap = public_view(status.fleet_snapshot(self.fleet, pool=pool, **self.ask))
                except Exception:  # noqa: BLE001 -- the page shows the last one; try again
                    log.exception("status round failed")
                else:
                    with self._cond:
                        self.version += 1
                        self.snapshot = {**snap, "version": self.version}
                        self._cond.notify_all()
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def wait_newer(self, version: int, timeout: float) -> tuple[int, dict | None]:
        with self._cond:
            self._cond.wait_for(lambda: self.version > version or self._stop.is_set(), timeout)
            return self.version, self.snapshot

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "neverdark-panel"
    poller: Poller            # set on the subclass that serve() makes
    hosts_allowed: set[str]

    def log_message(self, fmt, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: dict) -> None:
        self._send(code, "application/json", (json.dumps(doc, allow_nan=False) + "\n").encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if (self.headers.get("Host") or "").lower() not in self.hosts_allowed:
            self._send(421, "text/plain", b"unknown Host: use the address the panel listens on\n")
            return
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            name, ctype = STATIC[path]
            body = resources.files("neverdark.panel").joinpath("static", name).read_bytes()
            self._send(200, ctype, body)
        elif path == "/api/status":
            snap = self.poller.snapshot
            if snap is None:
                self._json(503, {"error": "the first round of status is still being asked"})
            else:
                self._json(200, snap)
        elif path == "/api/events":
            self._events()
        else:
            self._send(404, "text/plain", b"not found\n")

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        version = 0
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not self.poller.stopped:
                new, snap = self.poller.wait_newer(version, HEARTBEAT)
                if new > version and snap is not None:
                    version = new
                    data = json.dumps(snap, allow_nan=False, separators=(",", ":"))
                    self.wfile.write(f"id: {new}\ndata: {data}\n\n".encode())
                else:
                    self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
        except (ConnectionError, OSError):
            pass   # the page went away


def allowed_hosts(host: str, port: int) -> set[str]:
    names = {host, f"[{host}]"} if ":" in host else {host}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    return {f"{n}:{port}".lower() for n in names} | {n.lower() for n in names if port == 80}


class PanelServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(fleet, listen: str = DEFAULT_LISTEN, interval: float = DEFAULT_INTERVAL,
          **ask) -> tuple[PanelServer, Poller]:
    """A started poller and a bound server (call serve_forever(); port 0 picks one)."""
    host, port = parse_listen(listen)
    poller = Poller(fleet, interval, **ask)
    handler = type("PanelHandler", (Handler,), {"poller": poller, "hosts_allowed": set()})
    cls = PanelServer
    if ":" in host:
        cls = type("PanelServer6", (PanelServer,), {"address_family": socket.AF_INET6})
    server = cls((host, port), handler)
    handler.hosts_allowed = allowed_hosts(host, server.server_address[1])
    poller.start()
    return server, poller
