"""The runner's file server: what the hosts download (wheels, models), served over HTTP on each
link's runner-side address, from a process of its own (`python -m testbed.fleet serve`)."""

from __future__ import annotations

import contextlib
import html
import http.server
import io
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

from testbed.fleet.base import FleetError
from testbed.fleet.procs import _alive, _cmdline, _kill, _wait_gone

REPO = Path(__file__).resolve().parents[2]


class _LayeredHandler(http.server.SimpleHTTPRequestHandler):
    """Serves /KEY/... from a list of directories (first match wins); listings merge them, so
    a directory of wheels is a valid pip --find-links page."""
    layers: dict[str, list[str]] = {}

    def _split(self, path: str) -> tuple[str, str]:
        path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
        parts = path.lstrip("/").split("/", 1)
        return parts[0], parts[1] if len(parts) > 1 else ""

    def translate_path(self, path: str) -> str:
        key, rest = self._split(path)
        if key not in self.layers:
            return "/nonexistent" if key else "/"
        first = None
        for root in self.layers[key]:
            root = os.path.realpath(root)
            full = os.path.realpath(os.path.join(root, rest))
            if full != root and not full.startswith(root + "/"):
                return "/nonexistent"
            first = first or full
            if os.path.exists(full):
                return full
        return first or "/nonexistent"

    def list_directory(self, path):
        key, rest = self._split(self.path)
        if not key:
            names = [f"{k}/" for k in sorted(self.layers)]
        else:
            seen = {}
            for root in self.layers.get(key, []):
                d = os.path.join(root, rest)
                with contextlib.suppress(OSError):
                    for n in os.listdir(d):
                        if not n.startswith("."):
                            seen.setdefault(n, n + "/" if os.path.isdir(os.path.join(d, n)) else n)
            names = [seen[n] for n in sorted(seen)]
        body = "<!DOCTYPE html><html><body>\n" + "".join(
            f'<a href="{urllib.parse.quote(n)}">{html.escape(n)}</a><br>\n' for n in names) \
            + "</body></html>\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)

    def log_message(self, fmt, *args) -> None:
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def serve(layers: dict[str, list[str]], binds: list[str], port: int = 0,
          attempts: int = 20) -> tuple[list[http.server.ThreadingHTTPServer], int]:
    """Start threaded HTTP servers on `binds` (never 0.0.0.0), all on one port.

    Port 0: the first address picks a free port and the others take the same one (retried).
    Returns the servers (call .shutdown() to stop) and the port.
    """
    if not binds or any(ipaddress.ip_address(b).is_unspecified for b in binds):
        raise FleetError(f"serve: bind to the hosts' runner addresses, not {binds}")
    handler = type("Handler", (_LayeredHandler,), {"layers": layers})
    for _ in range(attempts):
        servers = []
        try:
            for addr in binds:
                servers.append(http.server.ThreadingHTTPServer(
                    (addr, port if port or not servers else servers[0].server_address[1]),
                    handler))
        except OSError:
            for s in servers:
                s.server_close()
            if port:
                raise
            continue
        for s in servers:
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return servers, servers[0].server_address[1]
    raise FleetError(f"no port free on all of {binds}")


def start_process(binds: list[str], layers: dict[str, list[str]], portfile: Path, logfile: Path,
                  timeout: float = 20) -> tuple[subprocess.Popen, int]:
    """`serve` in a process of its own (it outlives a CLI `up`); (the process, its port)."""
    args = [f"--bind={b}" for b in binds]
    for key, dirs in layers.items():
        args += ["--dir", f"{key}={':'.join(dirs)}"]
    portfile.unlink(missing_ok=True)
    with open(logfile, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.fleet", "serve", "--port-file", str(portfile), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True, cwd=REPO)
    deadline = time.monotonic() + timeout
    while not portfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise FleetError(f"file server did not start; see {logfile}")
        time.sleep(0.05)
    return proc, int(portfile.read_text())


def is_file_server(pid: int | None) -> bool:
    """pid is (still) a file server process of ours, not a recycled pid."""
    argv = _cmdline(pid) if pid and _alive(pid) else []
    return "serve" in argv and "testbed.fleet" in argv


def stop_process(pid: int | None, proc: subprocess.Popen | None = None) -> None:
    if is_file_server(pid):
        _kill(pid, signal.SIGTERM)
        if not _wait_gone([pid], 5):
            _kill(pid)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
