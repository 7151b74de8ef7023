"""The real sidecar daemon against real LLMock servers on loopback.

Real: the config file and secrets file (loaded by sidecar.config), two `llmock serve` processes
(the primary on its Anthropic route, the fallback on its OpenAI route as a `local` backend), the
probes, the policy, the state files, the atomic flip of the active config (sidecar.flip), the
hook command (a real subprocess), the HTTP API, the control socket, the JSON logs and the
sd_notify datagrams (to a socket this test listens on, standing in for systemd).

Not real: the switch does not restart a gateway or verify a turn through it. There is no Hermes
gateway or systemd here, so `switch_fn` is replaced by one that performs only the real atomic flip
of the active config (sidecar.switch, which restarts and verifies, is tested against a real
Hermes gateway in tests/test_switch.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar import config, flip, jsonlog, sdnotify, state
from sidecar.control import control_request
from sidecar.daemon import Daemon
from sidecar import switch as switch_mod
from sidecar.switch import SwitchResult
from testbed.llmock import LLMock, free_port, variant

PRIMARY_KEY = "sk-ant-neverdark-daemon-test-0001"
API_KEY = "nd-api-key-daemon-test-000000001"

HOOK = r"""
import os, sys, uuid
data = sys.stdin.buffer.read()
out = sys.argv[1]
tmp = os.path.join(out, "." + uuid.uuid4().hex)
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, os.path.join(out, uuid.uuid4().hex + ".json"))
"""


@pytest.fixture(scope="module")
def mocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmocks")
    pair = [LLMock(root), LLMock(root)]
    try:
        yield pair
    finally:
        for m in pair:
            m.stop()


@pytest.fixture
def site(tmp_path, mocks):
    """A sidecar.yaml for one wizard whose chain is [claude (mock 0), local (mock 1)]."""
    for m in mocks:
        m.reset()
    primary, fallback = mocks
    variants = tmp_path / "backends"
    variants.mkdir()
    claude_v = variant(variants / "claude.yaml", provider="anthropic", model="claude-mock",
                       base_url=primary.anthropic_base)
    local_v = variant(variants / "local.yaml", provider="custom", model="gemma-mock",
                      base_url=fallback.openai_base)
    active = tmp_path / "managed" / "config.yaml"
    active.parent.mkdir()
    flip.atomic_install(claude_v, active)
    (tmp_path / "hook-out").mkdir()
    hook_script = tmp_path / "hook.py"
    hook_script.write_text(HOOK)
    env = tmp_path / "sidecar.env"
    env.write_text(f"ANTHROPIC_KEY_MERLIN={PRIMARY_KEY}\nWIZARD_MERLIN_API_KEY={API_KEY}\n")
    os.chmod(env, 0o600)
    doc = {
        "listen": f"127.0.0.1:{free_port()}",
        "control_socket": str(tmp_path / "run" / "control.sock"),
        "state_dir": str(tmp_path / "state"),
        "secrets_file": str(env),
        "probe": {"interval": 0.2, "timeout": 2, "fall": 2, "rise": 2, "min_dwell": 1.5,
                  "cooldown_429": 5, "damping_base": 0.5, "damping_cap": 2},
        "hooks": {"command": f"{sys.executable} {hook_script} {tmp_path / 'hook-out'}"},
        "wizards": {"merlin": {
            "unit": "neverdark-wizard-merlin.service", "api_port": 9, "api_key_env": "WIZARD_MERLIN_API_KEY",
            "home": str(tmp_path / "home"), "active_config": str(active), "restart": True,
            "backends": [
                {"name": "claude", "kind": "anthropic", "base_url": primary.anthropic_base,
                 "model": "claude-mock", "api_key_env": "ANTHROPIC_KEY_MERLIN", "variant": str(claude_v)},
                {"name": "local", "kind": "local", "base_url": fallback.openai_base,
                 "model": "gemma-mock", "variant": str(local_v)},
            ]}},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def flip_only(wizard, to, previous, client, systemctl):
    """The real atomic flip of the active config; no gateway restart (see module docstring)."""
    started = time.monotonic()
    await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
    return SwitchResult(True, False, "flipped (no gateway restart in this test)",
                        {"install": time.monotonic() - started, "total": time.monotonic() - started})


async def until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Systemd:
    """The manager's end of NOTIFY_SOCKET: a datagram socket read by a thread, as systemd would."""

    def __init__(self, path: str, bind_to) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.path = path
        self._run = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self._run:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass

    def close(self):
        self._run = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    manager = Systemd(path, path)
    monkeypatch.setenv("NOTIFY_SOCKET", manager.path)
    monkeypatch.setenv("WATCHDOG_USEC", "300000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield manager
    manager.close()


@pytest.fixture
def json_logs():
    buf = io.StringIO()
    yield buf
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "stream", None) is buf:
            root.removeHandler(h)


def test_outage_fails_over_and_back(site, mocks, notify_socket, json_logs):
    cfg = config.load(site)
    jsonlog.setup(cfg.secrets, stream=json_logs)
    primary, _ = mocks
    w = cfg.wizards["merlin"]
    base = f"http://127.0.0.1:{cfg.listen[1]}"

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        try:
            policy = d.runners["merlin"].policy
            await until(lambda: policy.health["claude"].healthy and policy.health["local"].healthy,
                        what="both backends healthy")
            assert policy.active == "claude"

            await asyncio.to_thread(primary.fault, {"type": "fail", "status": 503, "times": None})
            t0 = time.monotonic()
            await until(lambda: policy.active == "local", what="failover to local")
            failover_s = time.monotonic() - t0
            assert flip.read_active_backend(w.active_config, w) == "local"
            async with httpx.AsyncClient() as c:
                status = (await c.get(f"{base}/status")).json()["wizards"]["merlin"]
                metrics = (await c.get(f"{base}/metrics")).text
                healthz = (await c.get(f"{base}/healthz")).status_code
            assert status["active"] == "local" and status["backends"]["claude"]["healthy"] is False
            assert status["transitions"][-1]["kind"] == "failover"
            assert 'neverdark_active_backend{wizard="merlin",backend="local"} 1' in metrics
            assert 'neverdark_probe_failures_total{wizard="merlin",backend="claude",reason="http_5xx"}' in metrics
            assert healthz == 200

            # Recovery: failback only after rise passes and the minimum dwell.
            await asyncio.to_thread(primary.reset)
            await until(lambda: policy.active == "claude", what="failback to claude")
            failover, failback = list(policy.transitions)[-2:]
            assert failback["kind"] == "failback"
            assert failback["at"] - failover["at"] >= cfg.probe.min_dwell
            assert flip.read_active_backend(w.active_config, w) == "claude"

            # An operator drill through the control socket, waiting for the switch.
            reply = await asyncio.to_thread(control_request, cfg.control_socket,
                                            {"op": "failover", "wizard": "merlin", "to": "local",
                                             "timeout": 20})
            assert reply["ok"] and reply["active"] == "local", reply
            assert reply["transition"]["kind"] == "manual"
            reply = await asyncio.to_thread(control_request, cfg.control_socket,
                                            {"op": "pin", "wizard": "merlin"})
            assert reply["ok"] and reply["pinned"] == "local"
            await asyncio.sleep(cfg.probe.min_dwell + 1.0)
            assert policy.active == "local", "pinned: no failback"
            reply = await asyncio.to_thread(control_request, cfg.control_socket,
                                            {"op": "release", "wizard": "merlin"})
            assert reply["ok"]
            await until(lambda: policy.active == "claude", what="failback after release")
            refused = await asyncio.to_thread(control_request, cfg.control_socket,
                                              {"op": "failover", "wizard": "nope"})
            assert not refused["ok"] and "unknown wizard" in refused["error"]
            await until(lambda: len(list((site.parent / "hook-out").glob("*.json"))) >= 4,
                        what="hook payloads")
            return failover_s, [t["kind"] for t in policy.transitions]
        finally:
            await d.close()

    failover_s, kinds = asyncio.run(scenario())
    # fall=2 at 0.2 s intervals: detected within a few probe rounds, not seconds of outage.
    assert failover_s < 5
    assert kinds == ["failover", "failback", "manual", "failback"]

    saved = state.load(cfg.state_dir, "merlin")
    assert saved["active"] == "claude" and [t["kind"] for t in saved["transitions"]] == kinds

    events = [json.loads(p.read_text()) for p in (site.parent / "hook-out").glob("*.json")]
    transitions = sorted((e for e in events if e["event"] == "transition"), key=lambda e: e["at"])
    assert {e["kind"] for e in transitions} == {"failover", "failback", "manual"}
    fo = next(e for e in transitions if e["kind"] == "failover")
    assert fo["wizard"] == "merlin" and fo["from"] == "claude" and fo["to"] == "local" and fo["ok"]
    assert "http_5xx" in fo["reason"] and "total" in fo["timings"] and fo["at"].endswith("+00:00")

    time.sleep(0.3)
    messages = notify_socket.messages
    assert messages[0].startswith("READY=1\nSTATUS=merlin:")
    assert any(m.startswith("WATCHDOG=1") for m in messages)
    assert messages[-1] == "STOPPING=1"

    lines = json_logs.getvalue().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(doc["msg"] == "switch done" and doc["to"] == "local" for doc in docs)
    for secret in (PRIMARY_KEY, API_KEY):
        assert secret not in json_logs.getvalue()


def test_start_trusts_the_active_config_over_state(site, mocks):
    """The state file says claude, the active config says local: the daemon starts on local."""
    cfg = config.load(site)
    w = cfg.wizards["merlin"]
    flip.atomic_install(w.backend("local").variant, w.active_config)
    snap = {"active": "claude", "since": 1.0, "why": "old", "pinned": None, "forced": None,
            "streak": 0, "last_switch_at": None, "dark": False, "health": {}, "transitions": []}
    state.save(cfg.state_dir, "merlin", snap)

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            assert p.active == "local" and "state file said claude" in p.why
            assert state.load(cfg.state_dir, "merlin")["active"] == "local"
        finally:
            await d.close()

    asyncio.run(scenario())


def test_cli_check_and_bad_config(site, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    ok = subprocess.run([sys.executable, "-m", "sidecar", "--config", str(site), "--check"],
                        capture_output=True, text=True, cwd=repo, timeout=60)
    assert ok.returncode == 0 and "valid (1 wizards: merlin)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(site.read_text())
    doc["wizards"]["merlin"]["backends"][1]["kind"] = "ollama"
    bad.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "sidecar", "--config", str(bad)],
                         capture_output=True, text=True, cwd=repo, timeout=60)
    assert out.returncode == 2
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert "wizards.merlin.backends[1].kind: must be one of" in line["msg"]
    assert str(bad) in line["msg"]


def test_sd_notify_abstract_namespace_and_watchdog_pid(monkeypatch):
    name = f"neverdark-test-{os.getpid()}-{time.monotonic_ns()}"
    manager = Systemd("@" + name, "\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        deadline = time.monotonic() + 5
        while not manager.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.messages == ["READY=1"]
    finally:
        manager.close()
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False


def test_switch_waits_for_the_restart_budget(site, mocks):
    """A gateway restarted STORM_MAX times in the window: a forced switch waits for a free slot
    (reported as `deferred`) instead of failing, and no failed transition is recorded."""
    cfg = config.load(site)
    w = cfg.wizards["merlin"]
    assert w.restart
    slot_in = 2.0

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        runner = d.runners["merlin"]
        try:
            await until(lambda: runner.policy.health["local"].healthy, what="local healthy")
            before = len(runner.policy.transitions)
            start = time.monotonic()
            switch_mod._restarts[w.unit].extend(
                [start - switch_mod.STORM_WINDOW + slot_in] * switch_mod.STORM_MAX)
            reply_task = asyncio.create_task(asyncio.to_thread(
                control_request, cfg.control_socket,
                {"op": "failover", "wizard": "merlin", "to": "local", "timeout": 30}))
            await until(lambda: runner.deferred == "local", what="switch deferred")
            assert runner.status()["deferred"] == "local"
            reply = await reply_task
            took = time.monotonic() - start
            assert reply["ok"] and reply["active"] == "local", reply
            assert took >= slot_in - 0.1, took
            new = list(runner.policy.transitions)[before:]
            assert [(t["kind"], t["ok"]) for t in new] == [("manual", True)], new
            assert runner.deferred is None
        finally:
            switch_mod._restarts.pop(w.unit, None)
            await d.close()

    asyncio.run(scenario())
