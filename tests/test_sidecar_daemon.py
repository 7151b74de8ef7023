"""The real sidecar daemon against real LLMock servers on loopback.

Real: the config file and secrets file (loaded by sidecar.config), two `llmock serve` processes
(the primary on its Anthropic route, the fallback on its OpenAI route as a `local` backend), the
probes, the policy, the state files, the atomic flip of the active config (sidecar.flip), the
hook command (a real subprocess), the HTTP API, the control socket, the JSON logs and the
sd_notify datagrams (to a socket this test listens on, standing in for systemd).

Not real: the switch does not restart a gateway or verify a turn through it. There is no Hermes
gateway or systemd here, so `switch_fn` is replaced by one that performs only the real atomic flip
of the active config (and asks the restart budget as sidecar.switch does), and the check turn a
restarted sidecar runs is replaced by a real deep probe (a one-token generation) of the backend.
sidecar.switch, which restarts and verifies, is tested against a real Hermes gateway in
tests/test_switch.py; the real check turn, SIGKILL and SIGHUP against `python -m sidecar` in
tests/test_sidecar_process.py.

Why one module: the tests share the LLMock processes and the daemon scaffolding above through
module-scoped fixtures; split, each file would start its own servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
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

from sidecar import badge, config, flip, jsonlog, sdnotify, state
from sidecar.control import control_request
from sidecar.daemon import Daemon
from sidecar.policy import STORM_MAX, STORM_WINDOW
from sidecar.probes import probe
from sidecar.switch import SwitchResult
from testbed.metrics_text import value
from testbed.hermes_gateway import variant
from testbed.hook_command import HOOK
from testbed.llmock import LLMock, free_port

PRIMARY_KEY = "sk-ant-neverdark-daemon-test-0001"
API_KEY = "nd-api-key-daemon-test-000000001"



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
        # settle 0: every event a notice of its own, as these tests read them (notices by
        # incident: tests/test_notices.py)
        "hooks": {"command": f"{sys.executable} {hook_script} {tmp_path / 'hook-out'}",
                  "settle": 0},
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


async def flip_only(wizard, to, previous, client, systemctl, *, restart_permit=None):
    """The real atomic flip of the active config; no gateway restart (see module docstring)."""
    started = time.monotonic()
    if wizard.restart and restart_permit is not None and (refusal := restart_permit()):
        return SwitchResult(False, False, f"switch to {to.name} refused: {refusal}", {})
    await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
    return SwitchResult(True, False, "flipped (no gateway restart in this test)",
                        {"install": time.monotonic() - started, "total": time.monotonic() - started})


async def probe_check(wizard, backend, client, systemctl):
    """The check turn's stand-in (no gateway here): a real one-token generation from the backend."""
    r = await probe(backend, client, 10.0, deep=True)
    return SwitchResult(r.ok, False, f"{backend.name} answered" if r.ok else r.detail,
                        {"check_turn": r.latency})


async def healthy_then_503(p, primary) -> None:
    """Both of merlin's backends healthy, then the primary answers 503 until merlin fails over."""
    await until(lambda: p.health["claude"].healthy and p.health["local"].healthy,
                what="both backends healthy")
    await asyncio.to_thread(primary.fault, {"type": "fail", "status": 503, "times": None})
    await until(lambda: p.active == "local", what="failover")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as jq, Go and JavaScript do."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


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
    # jsonlog.setup quiets httpx and sets the root level: both go back afterwards, or later
    # tests in the session (tests/test_hooks.py reads httpx's INFO lines) see them changed.
    loggers = [logging.getLogger(n) for n in ("", "httpx", "httpcore")]
    levels = [lg.level for lg in loggers]
    yield buf
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "stream", None) is buf:
            root.removeHandler(h)
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


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
            # The embeddable view and badge say the same as /status.
            async with httpx.AsyncClient() as c:
                view = (await c.get(f"{base}/wizards/merlin.json")).json()
                svg = await c.get(f"{base}/wizards/merlin.svg")
                unknown = (await c.get(f"{base}/wizards/nobody.json")).status_code
            assert view["state"] == "fallback" and view["active"] == "local", view
            assert view["primary"] == "claude" and view["backends"]["claude"] is False
            assert svg.headers["content-type"] == "image/svg+xml"
            assert "local (fallback)" in svg.text and badge.COLOURS["fallback"] in svg.text
            assert unknown == 404
            assert status["transitions"][-1]["kind"] == "failover"
            assert value(metrics, "neverdark_active_backend", wizard="merlin", backend="local") == 1
            assert value(metrics, "neverdark_probe_failures_total", wizard="merlin", backend="claude", reason="http_5xx") is not None
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


def test_start_checks_an_active_config_other_than_the_saved_one(site, mocks):
    """The state file says claude, the active config says local (a switch the last sidecar did
    not live to record): the daemon starts on local, checks it before trusting it, and records
    the switch in /status, the state file, the metrics and the hooks."""
    cfg = config.load(site)
    w = cfg.wizards["merlin"]
    flip.atomic_install(w.backend("local").variant, w.active_config)
    snap = {"active": "claude", "since": 1.0, "why": "old", "pinned": None, "forced": None,
            "streak": 0, "last_switch_at": None, "dark": False, "health": {}, "transitions": []}
    state.save(cfg.state_dir, "merlin", snap)
    checked = []

    async def check(wizard, backend, client, systemctl):
        checked.append(backend.name)
        return await probe_check(wizard, backend, client, systemctl)

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, check_fn=check, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            assert p.active == "local" and "state file said claude" in p.why
            assert state.load(cfg.state_dir, "merlin")["intent"]["check"] == "local"
            await until(lambda: p.transitions, what="the recovered switch recorded")
            return p.transitions[-1], d.render_metrics()
        finally:
            await d.close()

    record, metrics = asyncio.run(scenario())
    assert checked == ["local"]
    assert record["ok"] and record["from"] == "claude" and record["to"] == "local"
    assert record["reason"].endswith("completed after a sidecar restart")
    assert value(metrics, "neverdark_interrupted_switches_total", wizard="merlin", outcome="completed") == 1
    saved = state.load(cfg.state_dir, "merlin")
    assert saved["active"] == "local" and saved["intent"] is None
    assert saved["transitions"][-1]["recovered"] == "completed after a sidecar restart"
    events = [json.loads(p.read_text()) for p in (site.parent / "hook-out").glob("*.json")]
    assert [(e["event"], e["recovered"], e["to"]) for e in events] == [
        ("transition", "completed after a sidecar restart", "local")]


def test_cli_check_and_bad_config(site, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    ok = subprocess.run([sys.executable, "-m", "sidecar", "--config", str(site), "--check"],
                        capture_output=True, text=True, cwd=repo, timeout=60)
    assert ok.returncode == 0 and "valid (1 wizards: merlin)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load(site.read_text())
    doc["wizards"]["merlin"]["backends"][1]["kind"] = "bedrock"
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
            # Four restarts that leave the window `slot_in` from now (the daemon's clock is
            # time.monotonic, the policy's budget is on it).
            runner.policy.restarts.extend([start - STORM_WINDOW + slot_in] * STORM_MAX)
            reply_task = asyncio.create_task(asyncio.to_thread(
                control_request, cfg.control_socket,
                {"op": "failover", "wizard": "merlin", "to": "local", "timeout": 30}))
            await until(lambda: runner.policy.deferred == "local", what="switch deferred")
            assert runner.status()["deferred"] == "local"
            reply = await reply_task
            took = time.monotonic() - start
            assert reply["ok"] and reply["active"] == "local", reply
            assert took >= slot_in - 0.1, took
            new = list(runner.policy.transitions)[before:]
            assert [(t["kind"], t["ok"]) for t in new] == [("manual", True)], new
            assert runner.policy.deferred is None
            # The four left the window; the switch took a slot, on disk for the next start.
            saved = state.load(cfg.state_dir, "merlin")
            assert len(saved["restarts"]) == 1
            assert abs(saved["restarts"][0] - time.time()) < 10
        finally:
            await d.close()

    asyncio.run(scenario())


# --- two clocks: the wall clock steps, no timer moves ---------------------------------------

def test_wall_clock_steps_move_no_timer(site, mocks):
    """A real daemon whose wall clock is stepped back an hour mid-dwell and forward a day
    mid-429-hold (as NTP does to a Pi at boot): failback still comes after the dwell, not an hour
    later, and the hold still runs its full length instead of being skipped."""
    cfg = config.load(site)
    primary, _ = mocks
    s = cfg.probe
    step = [0.0]

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"],
                   wall=lambda: time.time() + step[0])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await healthy_then_503(p, primary)
            over = time.monotonic()
            step[0] = -3600.0                                    # mid-dwell: back an hour
            await asyncio.to_thread(primary.reset)
            await until(lambda: p.active == "claude", timeout=20, what="failback after the dwell")
            dwell = time.monotonic() - over
            # Held for `retry_after` 3 s by the provider.
            await asyncio.to_thread(primary.fault, {"type": "fail", "status": 429,
                                                    "retry_after": 3, "times": None})
            await until(lambda: p.active == "local", what="failover on 429")
            hit = time.monotonic()
            step[0] = 86400.0                                    # mid-hold: forward a day
            await asyncio.to_thread(primary.reset)
            await asyncio.sleep(2.0)
            still_held = p.active == "local" and p.held("claude", d.clock())
            await until(lambda: p.active == "claude", timeout=20, what="failback after the hold")
            hold = time.monotonic() - hit
            async with httpx.AsyncClient() as c:
                status = strict_json((await c.get(f"http://127.0.0.1:{cfg.listen[1]}/status")).text)
            return dwell, still_held, hold, status
        finally:
            await d.close()

    dwell, still_held, hold, status = asyncio.run(scenario())
    # `over` and `hit` are read when the 50 ms poll sees the switch, a little after it: the
    # lower bounds allow that lag.
    assert s.min_dwell - 0.25 <= dwell < s.min_dwell + s.damping_cap + 3, dwell
    assert still_held
    assert 3.0 - 0.25 <= hold < 3.0 + s.min_dwell + s.damping_cap + 3, hold
    # Records are stamped with the wall clock of their moment: the last one a day ahead.
    last = status["wizards"]["merlin"]["transitions"][-1]
    assert last["kind"] == "failback" and last["at"] > time.time() + 86000


def test_wall_clock_step_across_a_sidecar_restart_mid_dwell(site, mocks):
    """Stopped mid-dwell, the wall clock stepped back an hour, started again (same boot): the
    dwell ends when it would have, measured from the failover: not an hour later, and not a
    whole dwell after the restart either."""
    doc = yaml.safe_load(site.read_text())
    doc["probe"]["min_dwell"] = 6
    site.write_text(yaml.safe_dump(doc))
    cfg = config.load(site)
    primary, _ = mocks
    step = [0.0]

    def daemon():
        return Daemon(cfg, switch_fn=flip_only, check_fn=probe_check, systemctl=["/bin/false"],
                      wall=lambda: time.time() + step[0])

    async def scenario():
        d = daemon()
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await healthy_then_503(p, primary)
            over = time.monotonic()
            await asyncio.sleep(4.0)   # 4 s of the 6 s dwell served before the stop
        finally:
            await d.close()
        step[0] = -3600.0
        await asyncio.to_thread(primary.reset)
        d = daemon()
        await d.start()
        try:
            p = d.runners["merlin"].policy
            assert p.active == "local" and not p.needs_check   # a clean stop: nothing to check
            await until(lambda: p.active == "claude", timeout=30, what="failback")
            return time.monotonic() - over
        finally:
            await d.close()

    dwell = asyncio.run(scenario())
    # One switch so far: no damping hold. A dwell restarted at the restart would end after 10 s.
    # `over` is read when the poll (every 50 ms) first sees the failover, a little after the
    # switch the dwell counts from: the lower bound allows that lag (CI once measured 5.984 s).
    assert 6.0 - 0.25 <= dwell < 8.5, dwell


# --- provider hints: bounded, and strict JSON everywhere ---------------------------------------

class _Throttled(http.server.BaseHTTPRequestHandler):
    """A provider answering every request 429 with the headers and body it was given."""
    headers_out: dict = {}
    body = b"{}"

    def _answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(429)
        for k, v in self.headers_out.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def throttled():
    servers = []

    def start(headers=None, body=b"{}"):
        handler = type("H", (_Throttled,), {"headers_out": headers or {}, "body": body})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_provider_hints_are_bounded_and_every_output_is_strict_json(site, mocks, throttled):
    """Three providers throttle with absurd hints through real HTTP: `Retry-After: inf` (ignored:
    cooldown_429), `Retry-After: 1e9` and Gemini's `retryDelay: "999999999s"` (capped at
    max_hold, and the status and the alert say so). /status, a control reply and the state file
    all parse as strict JSON."""
    doc = yaml.safe_load(site.read_text())
    doc["probe"]["max_hold"] = 50
    merlin = doc["wizards"]["merlin"]
    claude, local = merlin["backends"]
    variants = Path(claude["variant"]).parent
    claude["base_url"] = throttled({"Retry-After": "inf"}) + "/anthropic"
    gemini_body = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "999999999s"}]}})
    merlin["backends"] = [
        claude,
        {"name": "gpt", "kind": "openai", "base_url": throttled({"Retry-After": "1e9"}) + "/v1",
         "model": "gpt-mock", "variant": str(variant(variants / "gpt.yaml", provider="custom",
                                                     model="gpt-mock", base_url="http://x/v1"))},
        {"name": "gemini", "kind": "google", "base_url": throttled(body=gemini_body.encode()),
         "model": "gemini-mock", "api_key_env": "ANTHROPIC_KEY_MERLIN",
         "variant": str(variant(variants / "gemini.yaml", provider="gemini",
                                model="gemini-mock", base_url="http://x"))},
        local]
    site.write_text(yaml.safe_dump(doc))
    cfg = config.load(site)

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await until(lambda: p.active == "local" and all(
                p.held(b, d.clock()) for b in ("claude", "gpt", "gemini")), what="all three held")
            async with httpx.AsyncClient() as c:
                body = (await c.get(f"http://127.0.0.1:{cfg.listen[1]}/status")).text
            reply = await asyncio.to_thread(control_request, cfg.control_socket, {"op": "status"})
            await until(lambda: len(list((site.parent / "hook-out").glob("*.json"))) >= 4,
                        what="hook payloads")
            return body, reply
        finally:
            await d.close()

    body, reply = asyncio.run(scenario())
    backends = strict_json(body)["wizards"]["merlin"]["backends"]
    assert 0 < backends["claude"]["held_for"] <= 5
    assert backends["claude"]["hold_note"] == "no usable Retry-After: cooldown_429"
    assert 40 < backends["gpt"]["held_for"] <= 50
    assert backends["gpt"]["hold_note"] == "provider asked 1000000000 s; capped by max_hold"
    assert 40 < backends["gemini"]["held_for"] <= 50
    assert backends["gemini"]["hold_note"] == "provider asked 999999999 s; capped by max_hold"
    assert reply["ok"] and reply["status"]["wizards"]["merlin"]["backends"]["gpt"]["held_for"] <= 50
    raw = state.path_for(cfg.state_dir, "merlin").read_text()
    saved = strict_json(raw)
    held = saved["health"]["gemini"]["held_until"] - saved["clock"]["wall"]
    assert 0 < held <= 50
    alerts = {e["backend"]: e["detail"] for e in
              (json.loads(p.read_text()) for p in (site.parent / "hook-out").glob("*.json"))
              if e["event"] == "rate_limited"}
    assert alerts["gemini"] == "held 50 s (provider asked 999999999 s; capped by max_hold)"
    assert alerts["gpt"] == "held 50 s (provider asked 1000000000 s; capped by max_hold)"


# --- a switch interrupted by a sidecar stop or crash (in-process; SIGKILL: test_sidecar_process) --

def leave_intent(cfg, to="local", frm="claude", on=None):
    """The files a sidecar killed mid-switch leaves: its state with the intent, and the active
    config on `on` (the target if the flip happened, else the origin)."""
    w = cfg.wizards["merlin"]
    flip.atomic_install(w.backend(on or frm).variant, w.active_config)
    now = time.time()
    state.save(cfg.state_dir, "merlin", {
        "clock": {"wall": now, "monotonic": time.monotonic(), "boot": "a boot long gone"},
        "active": frm, "since": now - 300, "why": "found on start", "pinned": None,
        "forced": to, "streak": 0, "last_switch_at": None, "dark": False, "health": {},
        "restarts": [], "transitions": [],
        "intent": {"from": frm, "to": to, "kind": "manual", "at": now - 1,
                   "reason": f"switch to {to} requested by operator"}})


def recover(cfg, check_fn=probe_check, until_kinds=1):
    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, check_fn=check_fn, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await until(lambda: len(p.transitions) >= until_kinds and not p.intent
                        and not d.runners["merlin"].switching, timeout=30,
                        what="the interrupted switch recorded")
            return list(p.transitions), p.active, d.render_metrics()
        finally:
            await d.close()
    return asyncio.run(scenario())


@pytest.mark.parametrize("flipped", [True, False], ids=["after the flip", "before the flip"])
def test_intent_left_by_a_killed_sidecar_is_recorded_and_finished(site, mocks, flipped):
    cfg = config.load(site)
    leave_intent(cfg, on="local" if flipped else "claude")
    transitions, active, metrics = recover(cfg)
    rec = transitions[-1]
    outcome = "completed after a sidecar restart" if flipped else "interrupted; rolled back"
    assert rec["recovered"] == outcome and rec["reason"].endswith(outcome)
    assert rec["from"] == "claude" and rec["to"] == "local" and rec["kind"] == "manual"
    assert rec["ok"] is flipped and rec["check"] == {"backend": active, "ok": True}
    assert active == ("local" if flipped else "claude")
    label = "completed" if flipped else "rolled_back"
    assert value(metrics, "neverdark_interrupted_switches_total", wizard="merlin",
                 outcome=label) == 1
    assert (value(metrics, "neverdark_transitions_total", wizard="merlin", kind="manual") == 1) is flipped
    saved = state.load(cfg.state_dir, "merlin")
    assert saved["intent"] is None and saved["forced"] is None and saved["active"] == active
    [event] = [json.loads(p.read_text()) for p in (site.parent / "hook-out").glob("*.json")]
    assert event["event"] == "transition" and event["recovered"] == outcome
    assert event["rolled_back"] is (not flipped) and event["active"] == active


def test_a_backend_failing_its_check_is_left_for_a_healthy_one(site, mocks):
    """Found on local after the crash, but local fails the check turn: recorded as failed, and
    the daemon switches to claude (a healthy backend) like any failover."""
    cfg = config.load(site)
    leave_intent(cfg, on="local")
    _, fallback = mocks
    fallback.fault({"type": "fail", "status": 500, "times": 1})   # the check's generation
    transitions, active, _ = recover(cfg, until_kinds=2)
    check, failover = transitions[-2:]
    assert check["recovered"] == "completed after a sidecar restart" and not check["ok"]
    assert check["check"] == {"backend": "local", "ok": False}
    assert failover["kind"] == "failover" and failover["ok"] and failover["to"] == "claude"
    assert active == "claude"
    assert flip.read_active_backend(cfg.wizards["merlin"].active_config,
                                    cfg.wizards["merlin"]) == "claude"


def test_a_stop_mid_switch_keeps_the_intent_for_the_next_start(site, mocks):
    """SIGTERM (Daemon.close) while a switch is in flight: the intent stays in the state file,
    and the next start checks and records the switch."""
    cfg = config.load(site)
    flipped = asyncio.Event()

    async def slow_flip(wizard, to, previous, client, systemctl, *, restart_permit=None):
        await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
        flipped.set()
        await asyncio.sleep(3600)   # the verify turn that never ends

    async def scenario():
        d = Daemon(cfg, switch_fn=slow_flip, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await until(lambda: p.health["local"].healthy, what="local healthy")
            asyncio.get_running_loop().create_task(d.runners["merlin"].request(
                "failover", "local", True, 60))
            await asyncio.wait_for(flipped.wait(), 30)
        finally:
            await d.close()

    asyncio.run(scenario())
    saved = state.load(cfg.state_dir, "merlin")
    assert saved["intent"]["to"] == "local" and saved["transitions"] == []
    transitions, active, _ = recover(cfg)
    assert transitions[-1]["recovered"] == "completed after a sidecar restart" and active == "local"


def test_a_check_answered_by_hermes_own_fallback_counts_as_failed(site, mocks):
    """On the test fleet a check turn whose call to the checked backend failed (HTTP 401) was
    answered by Hermes' own per-turn fallback, and the session record still named the checked
    backend's model, so verify passed. The gateway's log is the second witness: a passing check
    during which Hermes logged a failed call to that backend counts as failed."""
    cfg = config.load(site)
    leave_intent(cfg, on="local")
    w = cfg.wizards["merlin"]
    log = w.home / "logs" / "errors.log"
    log.parent.mkdir(parents=True)
    log.write_text("")
    local = w.backend("local")

    async def answered_by_the_fallback(wizard, backend, client, systemctl):
        # Hermes' line for the failed call (format of hermes-agent 0.19.0, tests/test_passive.py)
        with open(log, "a") as f:
            f.write("2026-11-29 23:22:58,515 WARNING [api-e576ac7499f9ae31] agent.conversation_"
                    "loop: API call failed (attempt 1/3) error_type=AuthenticationError "
                    f"thread=asyncio_0:1 provider=custom base_url={local.base_url}/ "
                    f"model={local.model} summary=HTTP 401: Unauthorized.\n")
        return SwitchResult(True, False, f"{backend.name} answered", {"check_turn": 0.5})

    transitions, active, _ = recover(cfg, check_fn=answered_by_the_fallback, until_kinds=2)
    check, failover = transitions[-2:]
    assert check["check"] == {"backend": "local", "ok": False} and not check["ok"]
    assert "Hermes logged a failed call to it (AuthenticationError: HTTP 401" in check["detail"]
    assert failover["kind"] == "failover" and failover["to"] == "claude" and active == "claude"


def test_a_variant_a_deploy_changed_reaches_the_active_config_on_reload(site, mocks):
    """A deploy rewrites the variant the wizard is on (new notice, profile or model settings) and
    reloads the sidecar: the active config becomes the new variant, same backend, no switch."""
    cfg = config.load(site)
    w = cfg.wizards["merlin"]

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        runner = d.runners["merlin"]
        try:
            claude = w.backend("claude").variant
            doc = yaml.safe_load(claude.read_text())
            doc["agent"] = {"environment_hint": "deploy v2"}
            claude.write_text(yaml.safe_dump(doc))
            assert flip.read_active_backend(w.active_config, w) is None   # now stale
            before = len(runner.policy.transitions)
            assert await d.reload()
            assert yaml.safe_load(w.active_config.read_text()) == doc
            assert flip.read_active_backend(w.active_config, w) == "claude"
            assert runner.policy.active == "claude"
            assert len(runner.policy.transitions) == before
        finally:
            await d.close()

    asyncio.run(scenario())


def test_check_turns_on_a_local_backend_reach_metrics(site, mocks):
    """A switch's check turn on a local backend says where its time went (sidecar.gateway.verify's
    breakdown); the daemon adds it to /metrics for that wizard and backend."""
    cfg = config.load(site)
    primary, _ = mocks
    breakdown = {"wall_s": 2.0, "queue_s": 0.1, "prefill_s": 1.2, "generation_s": 0.5,
                 "cache_save_s": 0.0, "overhead_s": 0.2, "prompt_tokens": 40.0,
                 "cached_tokens": 450.0, "generated_tokens": 6.0}

    async def flip_and_turn(wizard, to, previous, client, systemctl, *, restart_permit=None):
        result = await flip_only(wizard, to, previous, client, systemctl,
                                 restart_permit=restart_permit)
        if to.name == "local":
            result.turns.append(("local", dict(breakdown)))
        return result

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_and_turn, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await healthy_then_503(p, primary)
            metrics = d.metrics.render({"merlin": (["claude", "local"], "local", False)})
        finally:
            await d.close()
            await asyncio.to_thread(primary.reset)
        assert value(metrics, "neverdark_local_check_turns_total", wizard="merlin", backend="local") == 1
        assert value(metrics, "neverdark_local_check_turn_seconds_total", wizard="merlin", backend="local", part="prefill") == pytest.approx(1.2), metrics

    asyncio.run(scenario())


# --- a reload keeps the policy's memory (issue 19 item 6) ---------------------------------------

def add_spare(doc, site):
    """A third backend, on the fallback mock's OpenAI route: the wizard's backend list changes."""
    merlin = doc["wizards"]["merlin"]
    spare = variant(site.parent / "backends" / "spare.yaml", provider="custom", model="spare-mock",
                    base_url=merlin["backends"][1]["base_url"])
    merlin["backends"].append({"name": "spare", "kind": "openai", "model": "spare-mock",
                               "base_url": merlin["backends"][1]["base_url"],
                               "variant": str(spare)})


def new_primary_model(doc, site):
    doc["wizards"]["merlin"]["backends"][0]["model"] = "claude-mock-2"


def restart_off(doc, site):
    doc["wizards"]["merlin"]["restart"] = False


def settings_only(doc, site):
    doc["probe"]["damping_base"] = 0.25


@contextlib.asynccontextmanager
async def running(cfg):
    """A started daemon whose switches only flip the active config, and merlin's runner."""
    d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
    await d.start()
    try:
        yield d, d.runners["merlin"]
    finally:
        await d.close()


async def reload_with(d, site, edit) -> None:
    """Rewrite the config file with `edit`, reload, and wait until merlin's runner took it."""
    doc = yaml.safe_load(site.read_text())
    edit(doc, site)
    site.write_text(yaml.safe_dump(doc))
    want = config.load(site).wizards["merlin"]
    assert await d.reload()
    await until(lambda: d.runners["merlin"].w == want, what="the reloaded config applied")


@pytest.mark.parametrize("edit", [add_spare, new_primary_model, restart_off, settings_only])
def test_a_reload_keeps_a_drills_stay(site, mocks, edit):
    """A drill's failover asks for a 60 s stay; a reload (a backend added, the primary's model
    changed, restarts turned off, or only the settings changed) keeps it: the wizard stays on the
    fallback although the primary is healthy and min_dwell plus the damping hold (3.5 s) passed."""
    cfg = config.load(site)

    async def scenario():
        async with running(cfg) as (d, runner):
            await until(lambda: runner.policy.health["claude"].healthy
                        and runner.policy.health["local"].healthy, what="both backends healthy")
            reply = await runner.request("failover", "local", True, 30.0, stay=60.0)
            assert reply["ok"] and reply["active"] == "local", reply
            await reload_with(d, site, edit)
            stay_for = runner.status()["stay_for"]
            await asyncio.sleep(cfg.probe.min_dwell + cfg.probe.damping_cap + 1.0)
            return stay_for, runner.policy.active, [t["kind"] for t in runner.policy.transitions]

    stay_for, active, kinds = asyncio.run(scenario())
    assert stay_for is not None and 50 < stay_for <= 60, stay_for
    assert active == "local" and kinds[-1] == "manual", kinds


@pytest.mark.parametrize("edit", [settings_only, add_spare], ids=["backends unchanged", "a backend added"])
def test_lowering_max_hold_on_reload_shortens_a_running_hold(site, mocks, throttled, edit):
    """The primary answers 429 with Retry-After 3000 and is held 3000 s; a reload lowers max_hold
    to 2 s: the running hold ends 2 s after it began, and says max_hold capped it."""
    doc = yaml.safe_load(site.read_text())
    doc["wizards"]["merlin"]["backends"][0]["base_url"] = throttled({"Retry-After": "3000"}) + "/anthropic"
    site.write_text(yaml.safe_dump(doc))
    cfg = config.load(site)

    def lower(doc, site):
        edit(doc, site)
        doc["probe"]["max_hold"] = 2

    async def scenario():
        async with running(cfg) as (d, runner):
            await until(lambda: runner.policy.active == "local", what="failover on 429")
            held = runner.status()["backends"]["claude"]["held_for"]
            await reload_with(d, site, lower)
            return held, runner.status()["backends"]["claude"]

    held, after = asyncio.run(scenario())
    assert 2900 < held <= 3000, held
    assert after["held_for"] <= 2, after
    assert after["held_for"] == 0 or after["hold_note"] == "provider asked 3000 s; capped by max_hold", after


def test_reading_status_changes_no_policy_state(site, mocks):
    """GET /status, the control socket's status and /metrics are reads: any number of them leaves
    every wizard's policy snapshot as it was, even with restarts that have left the budget's window
    but were not yet pruned by a probe round."""
    cfg = config.load(site)

    async def scenario():
        async with running(cfg) as (d, runner):
            await until(lambda: runner.policy.health["local"].healthy, what="local healthy")
            now = d.clock()
            runner.policy.restarts.extend([now - STORM_WINDOW - 5, now - STORM_WINDOW - 1, now - 3])
            # Nothing here yields to the loop (a status request answers without awaiting): no
            # probe round runs between the two snapshots.
            before = runner.policy.snapshot(now, 1e9, "boot")
            for _ in range(5):
                d.status()
                d.render_metrics()
                await d.handle_control({"op": "status"}, 0)
            return before, runner.policy.snapshot(now, 1e9, "boot")

    before, after = asyncio.run(scenario())
    assert len(before["restarts"]) == 3
    assert after == before


# --- operator notices by incident (sidecar/notices.py; the pure rules: tests/test_notices.py) --

def test_an_outage_is_one_notice_and_one_recovery(site, mocks):
    """A real outage (failover, then failback once the primary answers): the hooks get one
    notice when it starts and one when it has been over for `settle`, not one per event; each
    delivery, the failing webhook's too, is counted in /metrics."""
    doc = yaml.safe_load(site.read_text())
    doc["hooks"]["settle"] = 1.0
    doc["hooks"]["webhook"] = f"http://127.0.0.1:{free_port()}/closed"   # refused: an error
    site.write_text(yaml.safe_dump(doc))
    cfg = config.load(site)
    primary, _ = mocks
    out = site.parent / "hook-out"

    def notices():
        return sorted((json.loads(p.read_text()) for p in out.glob("*.json")),
                      key=lambda e: e["at"])

    async def scenario():
        d = Daemon(cfg, switch_fn=flip_only, systemctl=["/bin/false"])
        await d.start()
        try:
            p = d.runners["merlin"].policy
            await healthy_then_503(p, primary)
            await until(lambda: len(notices()) == 1, what="the incident's notice")
            await asyncio.to_thread(primary.reset)
            await until(lambda: p.active == "claude", what="failback")
            kinds = [t["kind"] for t in p.transitions]
            assert len(notices()) == 1, "the failback is folded into the incident"
            await until(lambda: len(notices()) == 2, timeout=15, what="the recovery notice")
            await asyncio.sleep(1.5)    # nothing more comes
            await d.events.close()
            return kinds, d.render_metrics()
        finally:
            await d.close()

    kinds, metrics = asyncio.run(scenario())
    assert kinds == ["failover", "failback"]
    first, last = notices()
    assert first["notice"] == "incident" and first["event"] == "transition"
    assert first["kind"] == "failover" and first["to"] == "local"
    assert last["event"] == "recovered" and last["wizard"] == "merlin"
    assert last["incident"]["events"] == {"failover": 1, "failback": 1}
    assert last["incident"]["folded"] == 1 and last["incident"]["first"] == "failover"
    assert value(metrics, "neverdark_hook_deliveries_total", hook="command", outcome="ok") == 2
    assert value(metrics, "neverdark_hook_deliveries_total", hook="webhook", outcome="error") == 2
