"""`neverdark notify --test`: the sidecar sends a test notice through each configured hook and
reports each outcome (sidecar/hooktest.py, the control socket's `notify-test`).

Real: the hook command (a child process), a webhook receiver and, for Telegram (whose servers
cannot be reached from here), a loopback server that sees the exact bot-API call; a real
sidecar daemon answering the control op, asked with `python -m sidecar.hooktest` as the CLI
runs it on each host.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx

from sidecar.hooktest import try_hooks
from testbed.hook_command import HOOK
from testbed.llmock import free_port
from testbed.sidecar_outputs import sidecar_outputs
from tests.test_hooks import Receiver

TOKEN = "123456:AAH-secret-bot-token-hooktest"
REPO = Path(__file__).resolve().parent.parent


def hooks(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"command": None, "webhook": None, "telegram": None, **kw})


def run(hooks_, secrets=None, **kw) -> dict:
    async def go():
        async with httpx.AsyncClient() as client:
            return await try_hooks(hooks_, secrets or {}, client, **kw)
    return asyncio.run(go())


def test_every_hook_delivers_and_says_so(tmp_path):
    web, tg = Receiver(200), Receiver(200)
    out = tmp_path / "hook-out"
    out.mkdir()
    (tmp_path / "hook.py").write_text(HOOK)
    try:
        reply = run(hooks(command=f"{sys.executable} {tmp_path / 'hook.py'} {out}",
                          webhook=web.url + "/hook",
                          telegram={"token_env": "TG", "chat_id": "42"}),
                    {"TG": TOKEN}, telegram_base=tg.url)
    finally:
        web.close()
        tg.close()
    assert reply["ok"] is True, reply
    assert {n: (h["ok"], h["detail"]) for n, h in reply["hooks"].items()} == {
        "command": (True, "exit 0"), "webhook": (True, "HTTP 200"), "telegram": (True, "HTTP 200")}
    assert web.seen[0][2]["event"] == "test" and web.seen[0][2]["host"] == reply["host"]
    assert tg.seen[0][0] == f"/bot{TOKEN}/sendMessage" and "event=test" in tg.seen[0][2]["text"]
    assert json.loads(next(out.iterdir()).read_text())["event"] == "test"


def test_failed_deliveries_are_reported_each_and_keep_the_secret(tmp_path):
    web = Receiver(500)
    try:
        reply = run(hooks(command="false", webhook=web.url + "/hook",
                          telegram={"token_env": "TG", "chat_id": "42"}),
                    {"TG": TOKEN}, telegram_base=f"http://127.0.0.1:{free_port()}", timeout=5)
    finally:
        web.close()
    assert reply["ok"] is False
    h = reply["hooks"]
    assert not any(x["ok"] for x in h.values())
    assert h["command"]["detail"] == "RuntimeError: hook command exited 1"
    assert h["webhook"]["detail"] == "RuntimeError: webhook answered HTTP 500"
    assert h["telegram"]["detail"].startswith("ConnectError")
    assert TOKEN not in json.dumps(reply)


def test_no_hooks_is_no_success():
    reply = run(hooks())
    assert reply["ok"] is False and reply["hooks"] == {}
    assert reply["error"] == "no hooks configured (the inventory's sidecar.hooks)"


def test_the_sidecar_answers_the_control_op(tmp_path):
    web = Receiver(200)

    def ask(cfg):
        return subprocess.run([sys.executable, "-m", "sidecar.hooktest", "--socket",
                               str(cfg.control_socket)], capture_output=True, text=True,
                              timeout=60, cwd=REPO)
    try:
        _, _, proc = sidecar_outputs(tmp_path / "sidecar", rounds=1, during=ask,
                                     hooks={"webhook": web.url + "/hook", "command": "false"})
    finally:
        web.close()
    assert proc.returncode == 1, proc.stderr             # one of the two hooks failed
    reply = json.loads(proc.stdout.splitlines()[-1])
    assert reply["hooks"]["webhook"] == {**reply["hooks"]["webhook"], "ok": True,
                                         "detail": "HTTP 200"}
    assert reply["hooks"]["command"]["ok"] is False
    # (the daemon's dark wizard sends its own "dark" notice too)
    assert [s[2]["event"] for s in web.seen if s[2]["event"] == "test"] == ["test"]


def test_no_sidecar_listening(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sidecar.hooktest", "--socket",
                           str(tmp_path / "none.sock")], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "no sidecar listening" in json.loads(proc.stdout)["error"]


def test_the_operator_report(tmp_path):
    from neverdark import notify
    web = Receiver(200)
    try:
        reply = run(hooks(webhook=web.url + "/hook", command="false"))
    finally:
        web.close()
    results = {"vps1": reply, "pi1": {"ok": False, "hooks": {},
                                      "error": "unreachable: ssh: connect to host pi1 port 22: "
                                               "Connection refused"}}
    out, err = notify.report_lines(results)
    assert out[0].startswith("vps1  command   FAILED") and "hook command exited 1" in out[0]
    assert out[1].startswith("vps1  webhook   delivered") and out[1].endswith("HTTP 200")
    assert out[-1] == "1 of 2 deliveries made from 2 hosts"
    assert err == ["pi1: unreachable: ssh: connect to host pi1 port 22: Connection refused"]
    assert notify.failing(results) and not notify.failing({"vps1": {**reply, "ok": True}})
