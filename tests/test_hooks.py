"""notify() against real receivers on loopback.

Real: the hook command is a real child process; the webhook goes to a real HTTP server on
127.0.0.1. Telegram's servers cannot be reached from here, so a loopback HTTP server stands in for
api.telegram.org (the one stand-in): it sees the exact path and JSON a real bot API call carries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx
import pytest

from sidecar.hooks import notify
from testbed.llmock import free_port

TOKEN = "123456:AAH-secret-bot-token-never-logged"
EVENT = {"event": "failover", "wizard": "merlin", "from": "claude", "to": "local",
         "reason": "http_5xx", "at": 1795420090.5}


class Receiver:
    def __init__(self, status: int = 200) -> None:
        self.seen: list[tuple[str, dict, dict]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.seen.append((self.path, dict(self.headers), json.loads(body)))
                out = b'{"ok": true}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(status=200):
        made.append(Receiver(status))
        return made[-1]
    yield make
    for r in made:
        r.close()


def hooks(command=None, webhook=None, telegram=None):
    return SimpleNamespace(command=command, webhook=webhook, telegram=telegram)


def send(h, secrets=None, **kw):
    async def go():
        async with httpx.AsyncClient() as client:
            await notify(EVENT, h, secrets or {}, client, **kw)
    asyncio.run(go())


def test_all_three_hooks_deliver(tmp_path, receiver, caplog):
    caplog.set_level(logging.DEBUG)  # httpx logs request URLs at INFO: the token must not show
    out = tmp_path / "payload.json"
    web, tg = receiver(), receiver()
    cmd = f"{sys.executable} -c 'import sys; open(sys.argv[1], \"w\").write(sys.stdin.read())' {out}"
    send(hooks(cmd, f"{web.url}/hook", {"token_env": "TG_TOKEN", "chat_id": "-1001"}),
         {"TG_TOKEN": TOKEN}, telegram_base=tg.url)
    assert json.loads(out.read_text()) == EVENT
    [(path, headers, body)] = web.seen
    assert path == "/hook" and body == EVENT and headers["Content-Type"] == "application/json"
    [(path, _, body)] = tg.seen
    assert path == f"/bot{TOKEN}/sendMessage"
    assert body["chat_id"] == "-1001" and "failover" in body["text"] and "merlin" in body["text"]
    assert any("/bot***/sendMessage" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_failures_are_logged_not_raised(tmp_path, receiver, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.hooks")
    bad = receiver(500)
    send(hooks("/nonexistent/hook-binary", f"{bad.url}/hook",
               {"token_env": "TG_TOKEN", "chat_id": "1"}),
         {"TG_TOKEN": TOKEN}, telegram_base=f"http://127.0.0.1:{free_port()}")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "command hook failed" in text
    assert "webhook hook failed" in text and "HTTP 500" in text
    assert "telegram hook failed" in text
    assert TOKEN not in text


def test_command_exit_status_and_timeout(caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.hooks")
    send(hooks(f"{sys.executable} -c 'import sys; sys.exit(3)'"))
    assert "exited 3" in caplog.text
    started = time.monotonic()
    send(hooks("sleep 30"), timeout=0.5)
    assert time.monotonic() - started < 5
    assert "killed after" in caplog.text


def test_missing_telegram_token_is_reported(receiver, caplog):
    caplog.set_level(logging.WARNING, logger="sidecar.hooks")
    tg = receiver()
    send(hooks(telegram={"token_env": "NOPE", "chat_id": "1"}), {}, telegram_base=tg.url)
    assert tg.seen == [] and "'NOPE' not in the secrets file" in caplog.text


def test_no_hooks_configured_does_nothing():
    send(hooks())
    send(None)
