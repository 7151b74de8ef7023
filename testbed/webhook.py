"""The sidecars' webhook target on the runner, for the test bed's fleet."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time

from testbed import fleet as testfleet


class HookReceiver:
    """The sidecars' webhook target: records each POSTed event (JSON) with its arrival time.

    Listens on the runner's address on the first host's link, which every host of the run
    reaches through its own link (the fleet routes the run's /24 via the runner), so one
    fleet-wide `hooks.webhook` URL serves every host.
    """

    def __init__(self, fleet: testfleet.FleetContext) -> None:
        self.fleet = fleet
        self.events: list[dict] = []
        self._lock = threading.Lock()
        first = next(iter(fleet.hosts))
        self.address = fleet.runner_address(first)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 -- http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with contextlib.suppress(ValueError):
                    event = json.loads(body)
                    with receiver._lock:
                        receiver.events.append({**event, "received_at": time.monotonic()})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((self.address, 0), Handler)
        self.url = f"http://{self.address}:{self.server.server_address[1]}/neverdark-events"

    def __enter__(self) -> HookReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, since: float = 0.0, **match) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["received_at"] >= since
                    and all(e.get(k) == v for k, v in match.items())]
