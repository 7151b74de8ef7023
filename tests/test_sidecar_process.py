"""The sidecar as a process: `python -m sidecar` killed with SIGKILL mid-switch, and reloaded
with SIGHUP.

Real: the sidecar process and its files (config, secrets, state, the active config flipped by
sidecar.flip), a Hermes 0.19.0 gateway (API server on loopback, under the small supervisor of
testbed.llmock) that every switch's verify turn and every check turn go through, two LLMock
servers behind it (claude on the Anthropic route, `local` on the OpenAI route), the hook command,
`python -m sidecar.ctl` as an operator runs it, and the signals.

Not real: systemd. `--systemctl` points at a small script standing in for `sudo systemctl`:
`is-active` says active (the gateway runs under the test's supervisor) and `restart` records the
call and, while a hold file exists, hangs as a slow restart does. The sidecar runs in its own
process group and is killed with the group, as systemd kills a unit's control group.

Kill points are made deterministic without hooks in the product: "after the intent" holds the
switch at the read of the target's variant (a named pipe nobody writes: the sidecar has written
its intent and blocks before touching the active config); "after the flip" holds it in the
gateway restart; "during verify" holds the verify turn in LLMock (a delay on requests that carry
tools, which Hermes' turns do and the sidecar's probes do not).

Why one module: the tests share one real Hermes gateway and its LLMocks (the `bench` fixture,
module-scoped: a gateway takes seconds to start); split, each file would start its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar import flip
from sidecar.gateway import CHECK_WORDS
from testbed.metrics_text import value
from testbed.hermes_gateway import Gateway, variant
from testbed.hook_command import HOOK
from testbed.llmock import LLMock, free_port
from testbed.wait import wait_until

REPO = Path(__file__).resolve().parent.parent
CLAUDE_KEY = "sk-ant-neverdark-process-test-0001"


SYSTEMCTL = """#!/bin/sh
# Stands in for `sudo systemctl` (no systemd as PID 1 here).
dir=$(dirname "$0")
case "$1" in
  is-active) exit 0 ;;
  restart)
    echo "$2" >> "$dir/restarts"
    while [ -e "$dir/hold-$2" ]; do sleep 0.1; done
    exit 0 ;;
esac
exit 1
"""


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def until(predicate, timeout: float, what: str, every: float = 0.1):
    return wait_until(predicate, timeout, what, every,
                      tolerate=(httpx.HTTPError, OSError, ValueError, KeyError))


class Sidecar:
    """`python -m sidecar --config PATH` in a process group of its own."""

    def __init__(self, site) -> None:
        self.site = site
        self.log = site.root / "sidecar.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--config", str(site.config),
             "--systemctl", str(site.systemctl)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"), start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")})
        until(lambda: self.proc.poll() is not None or self.status(), 60, "the sidecar's /status")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def status(self) -> dict:
        r = httpx.get(f"{self.site.base}/status", timeout=5)
        return strict_json(r.text)

    def wizard(self, name: str = "merlin") -> dict:
        return self.status()["wizards"][name]

    def metrics(self) -> str:
        return httpx.get(f"{self.site.base}/metrics", timeout=5).text

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def ctl(site, *args: str) -> subprocess.Popen:
    """`python -m sidecar.ctl` as the operator's `neverdark failover` runs it on the host."""
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.ctl", *args, "--socket", str(site.socket),
         "--timeout", "120", "--reconnect", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ctl_answer(proc: subprocess.Popen) -> tuple[int, dict]:
    out, err = proc.communicate(timeout=300)
    lines = out.strip().splitlines()
    assert lines, err
    return proc.returncode, strict_json(lines[-1])


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Two LLMocks and a Hermes gateway whose managed config the sidecar flips."""
    root = tmp_path_factory.mktemp("process")
    # The second plays the local model: its answer repeats any check word, as Gemma does when the
    # check turn asks it to (sidecar.gateway.verify requires that of a local backend).
    mocks = [LLMock(root), LLMock(root, answer="Plain answer: " + " ".join(CHECK_WORDS))]
    gw = None
    try:
        claude_mock, local_mock = mocks
        variants = root / "backends"
        variants.mkdir()
        claude_v = variant(variants / "claude.yaml", provider="anthropic", model="claude-mock",
                           base_url=claude_mock.anthropic_base)
        local_v = variant(variants / "local.yaml", provider="custom", model="gemma-mock",
                          base_url=local_mock.openai_base)
        active = root / "managed" / "config.yaml"
        active.parent.mkdir()
        flip.atomic_install(claude_v, active)
        gw = Gateway.bare(root / "gw", active, supervised=True)
        yield type("Bench", (), {"root": root, "gw": gw, "claude": claude_mock, "local": local_mock,
                                 "claude_v": claude_v, "local_v": local_v, "active": active})
    finally:
        if gw:
            gw.stop()
        for m in mocks:
            m.stop()


class Site:
    """One sidecar's files: config, secrets, hooks, the systemctl stand-in."""

    def __init__(self, root: Path, bench) -> None:
        self.root, self.bench = root, bench
        self.config = root / "sidecar.yaml"
        self.socket = root / "run" / "control.sock"
        self.state_dir = root / "state"
        self.hook_out = root / "hook-out"
        self.hook_out.mkdir()
        (root / "hook.py").write_text(HOOK)
        self.systemctl = root / "bin" / "systemctl"
        self.systemctl.parent.mkdir()
        self.systemctl.write_text(SYSTEMCTL)
        self.systemctl.chmod(0o755)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = root / "sidecar.env"
        env.write_text(f"CLAUDE_KEY={CLAUDE_KEY}\nGATEWAY_KEY={bench.gw.key}\n")
        env.chmod(0o600)
        self.doc = {
            "listen": f"127.0.0.1:{self.port}", "control_socket": str(self.socket),
            "state_dir": str(self.state_dir), "secrets_file": str(env),
            "probe": {"interval": 0.3, "timeout": 2, "fall": 2, "rise": 2, "min_dwell": 30,
                      "cooldown_429": 5, "damping_base": 1, "damping_cap": 4},
            # settle 0: every event its own notice (by incident: tests/test_notices.py)
            "hooks": {"command": f"{sys.executable} {root / 'hook.py'} {self.hook_out}",
                      "settle": 0},
            "wizards": {"merlin": self.wizard(bench.active, bench.claude_v, bench.local_v,
                                              bench.gw.home, restart=False)},
        }
        self.write()

    def wizard(self, active: Path, claude_v: Path, local_v: Path, home: Path, *,
               restart: bool, unit: str = "neverdark-wizard-merlin.service",
               models=("claude-mock", "gemma-mock")) -> dict:
        b = self.bench
        return {"unit": unit, "api_port": b.gw.port, "api_key_env": "GATEWAY_KEY",
                "home": str(home), "active_config": str(active), "restart": restart,
                "backends": [
                    {"name": "claude", "kind": "anthropic", "base_url": b.claude.anthropic_base,
                     "model": models[0], "api_key_env": "CLAUDE_KEY", "variant": str(claude_v)},
                    {"name": "local", "kind": "local", "base_url": b.local.openai_base,
                     "model": models[1], "variant": str(local_v)}]}

    def write(self) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.doc, sort_keys=False))
        os.replace(tmp, self.config)

    def state(self, wizard: str = "merlin") -> dict:
        return strict_json((self.state_dir / f"{wizard}.json").read_text())

    def events(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in self.hook_out.glob("*.json")]

    def restarts(self) -> list[str]:
        path = self.systemctl.parent / "restarts"
        return path.read_text().split() if path.exists() else []


@pytest.fixture
def site(tmp_path, bench):
    for m in (bench.claude, bench.local):
        m.reset()
    flip.atomic_install(bench.claude_v, bench.active)
    s = Site(tmp_path, bench)
    yield s
    for m in (bench.claude, bench.local):
        m.reset()
    flip.atomic_install(bench.claude_v, bench.active)


@pytest.fixture
def sidecars():
    """Every sidecar a test starts is stopped at its end, whatever happened."""
    started: list[Sidecar] = []

    def start(site) -> Sidecar:
        sc = Sidecar(site)
        started.append(sc)
        return sc
    yield start
    for sc in started:
        sc.stop()


def healthy(sc: Sidecar, wizard: str = "merlin") -> dict:
    return until(lambda: (lambda w: w if all(b["healthy"] for b in w["backends"].values())
                          and not w["switching"] else None)(sc.wizard(wizard)),
                 30, f"{wizard}'s backends healthy")


def recovered(sc: Sidecar, wizard: str = "merlin") -> dict:
    """The restarted sidecar's record of the interrupted switch, once its check is done."""
    def done():
        w = sc.wizard(wizard)
        recs = [t for t in w["transitions"] if t.get("recovered")]
        return (w, recs[-1]) if recs and not w["switching"] and not w["intent"] else None
    return until(done, 120, "the interrupted switch recorded")


def chats_since(mock: LLMock, since: float) -> list[dict]:
    return [r for r in mock.requests() if r["method"] == "POST" and r["started_at"] >= since]


# --- SIGKILL mid-switch -----------------------------------------------------------------------

def test_killed_after_the_intent_before_the_flip(site, bench, sidecars):
    """The intent is on disk, the active config untouched: the restarted sidecar records the
    switch as interrupted and rolled back, checks claude with a real turn through Hermes, stays
    there, and tells the hooks; the operator's ctl reconnects and says where merlin is."""
    fifo = site.root / "local-variant.fifo"
    os.mkfifo(fifo)   # read by the switch's install only: blocks it after the intent
    site.doc["wizards"]["merlin"]["backends"][1]["variant"] = str(fifo)
    site.write()
    sc = sidecars(site)
    healthy(sc)
    op = ctl(site, "failover", "merlin", "--to", "local")
    until(lambda: (site.state().get("intent") or {}).get("to") == "local", 30, "the intent on disk")
    time.sleep(0.3)
    assert flip.read_active_backend(bench.active, _wizard(site)) == "claude"
    sc.kill9()
    killed = time.monotonic()
    assert site.state()["intent"]["to"] == "local" and site.state()["transitions"] == []

    sc = sidecars(site)
    status, rec = recovered(sc)
    assert rec["recovered"] == "interrupted; rolled back" and rec["ok"] is False
    assert rec["reason"] == "switch to local requested by operator; interrupted; rolled back"
    assert rec["check"] == {"backend": "claude", "ok": True} and "claude answered" in rec["detail"]
    assert status["active"] == "claude" and status["forced"] is None
    # The check turn went through Hermes to claude's API after the restart.
    assert any(r["path"] == "/anthropic/v1/messages" and r["status"] == 200
               for r in chats_since(bench.claude, killed))
    saved = site.state()
    assert saved["intent"] is None and saved["transitions"][-1]["recovered"] == rec["recovered"]
    assert value(sc.metrics(), "neverdark_interrupted_switches_total", wizard="merlin", outcome="rolled_back") == 1
    until(lambda: [e for e in site.events() if e.get("recovered")], 10, "the hook")
    [event] = [e for e in site.events() if e.get("recovered")]
    assert event["rolled_back"] is True and event["active"] == "claude"
    rc, answer = ctl_answer(op)
    assert rc == 1 and answer["interrupted"] and answer["active"] == "claude", answer
    assert "interrupted; rolled back" in answer["error"]


def _wizard(site):
    from sidecar import config
    return config.load(site.config).wizards["merlin"]


def test_killed_after_the_flip_during_the_restart(site, bench, sidecars):
    """The active config is on local, the gateway restart hangs when the sidecar is killed: the
    restarted sidecar records the switch as completed, checks local with a real turn, keeps the
    restart it had counted, and the ctl reports success."""
    site.doc["wizards"]["merlin"]["restart"] = True
    site.write()
    hold = site.systemctl.parent / "hold-neverdark-wizard-merlin.service"
    hold.touch()
    sc = sidecars(site)
    healthy(sc)
    op = ctl(site, "failover", "merlin", "--to", "local")
    until(lambda: site.restarts(), 30, "the gateway restart under way")
    assert flip.read_active_backend(bench.active, _wizard(site)) == "local"
    assert len(site.state()["restarts"]) == 1     # counted before it began
    sc.kill9()
    killed = time.monotonic()
    hold.unlink()

    sc = sidecars(site)
    status, rec = recovered(sc)
    assert rec["recovered"] == "completed after a sidecar restart" and rec["ok"] is True, json.dumps(rec)
    assert rec["from"] == "claude" and rec["to"] == "local" and rec["kind"] == "manual"
    assert rec["check"] == {"backend": "local", "ok": True}
    assert status["active"] == "local"
    assert status["restart_budget"]["restarts_in_window"] == 1
    assert any(r["path"] == "/v1/chat/completions" and r["status"] == 200 and r["body"].get("tools")
               for r in chats_since(bench.local, killed))
    metrics = sc.metrics()
    assert value(metrics, "neverdark_interrupted_switches_total", wizard="merlin", outcome="completed") == 1
    assert value(metrics, "neverdark_transitions_total", wizard="merlin", kind="manual") == 1
    rc, answer = ctl_answer(op)
    assert rc == 0 and answer["ok"] and answer["interrupted"] and answer["active"] == "local"


def test_killed_during_verify_then_the_check_fails(site, bench, sidecars):
    """Killed while the verify turn waits on the local model; local then rejects Hermes' turns:
    the restarted sidecar records the switch as completed but failed its check, moves merlin to
    claude (healthy) with a verified switch, and tells the hooks both."""
    tools = {"tools": True}   # Hermes' turns carry tools; the sidecar's probes do not
    bench.local.fault({"type": "delay", "seconds": 8, "times": 1, "match": tools})
    sc = sidecars(site)
    healthy(sc)
    op = ctl(site, "failover", "merlin", "--to", "local")
    until(lambda: flip.read_active_backend(bench.active, _wizard(site)) == "local", 30, "the flip")
    time.sleep(1.5)   # ready check done; the verify turn sits in LLMock's delay
    sc.kill9()
    killed = time.monotonic()
    bench.local.reset()
    bench.local.fault({"type": "fail", "status": 401, "times": None, "match": tools})

    sc = sidecars(site)
    status, rec = recovered(sc)
    assert rec["recovered"] == "completed after a sidecar restart" and rec["ok"] is False
    assert rec["check"] == {"backend": "local", "ok": False}
    final = until(lambda: (lambda w: w if w["active"] == "claude" and not w["switching"] else None)(
        sc.wizard()), 60, "the move to a healthy backend")
    after = [t for t in final["transitions"] if t["at"] >= rec["at"]]
    assert [(t.get("recovered"), t["kind"], t["to"], t["ok"]) for t in after] == [
        ("completed after a sidecar restart", "manual", "local", False),
        (None, "failover", "claude", True)]
    assert flip.read_active_backend(bench.active, _wizard(site)) == "claude"
    assert any(r["status"] == 401 for r in chats_since(bench.local, killed))   # the check turn
    until(lambda: len([e for e in site.events() if e["event"] == "transition"]) >= 2, 10, "hooks")
    rc, answer = ctl_answer(op)
    assert rc == 1 and answer["interrupted"] and answer["active"] == "claude", answer


# --- SIGHUP -----------------------------------------------------------------------------------

def _extra_wizard(site, name: str, *, restart: bool = False) -> dict:
    """A wizard with its own active config and variants (model names of its own, so a turn
    through the shared gateway never confirms it: its switches fail and roll back)."""
    b = site.bench
    d = site.root / name
    (d / "managed").mkdir(parents=True)
    claude_v = variant(d / "claude.yaml", provider="anthropic", model=f"{name}-claude",
                       base_url=b.claude.anthropic_base)
    local_v = variant(d / "local.yaml", provider="custom", model=f"{name}-local",
                      base_url=b.local.openai_base)
    flip.atomic_install(claude_v, d / "managed" / "config.yaml")
    return site.wizard(d / "managed" / "config.yaml", claude_v, local_v, d / "home",
                       restart=restart, unit=f"neverdark-wizard-{name}.service",
                       models=(f"{name}-claude", f"{name}-local"))


def test_sighup_applies_a_new_config_and_keeps_the_running_state(site, bench, sidecars):
    site.doc["wizards"]["morgana"] = _extra_wizard(site, "morgana")
    site.doc["wizards"]["vivien"] = _extra_wizard(site, "vivien")
    site.write()
    sc = sidecars(site)
    for w in ("merlin", "morgana", "vivien"):
        healthy(sc, w)
    rc, answer = ctl_answer(ctl(site, "failover", "merlin", "--to", "local"))
    assert rc == 0 and answer["active"] == "local", answer
    before = sc.wizard("merlin")
    pid = sc.proc.pid

    # morgana changed, vivien removed, nimue added, merlin untouched.
    site.doc["wizards"]["morgana"]["probe"] = {"min_dwell": 45, "max_hold": 120}
    del site.doc["wizards"]["vivien"]
    site.doc["wizards"]["nimue"] = _extra_wizard(site, "nimue")
    site.write()
    sc.proc.send_signal(signal.SIGHUP)
    status = until(lambda: (lambda s: s if set(s["wizards"]) == {"merlin", "morgana", "nimue"}
                            else None)(sc.status()), 30, "the reloaded wizards")
    assert sc.proc.pid == pid and sc.proc.poll() is None
    merlin = status["wizards"]["merlin"]
    assert merlin["active"] == "local" and abs(merlin["since"] - before["since"]) < 0.01
    assert merlin["transitions"] == before["transitions"]
    assert merlin["backends"]["local"]["passes"] >= before["backends"]["local"]["passes"]
    morgana = status["wizards"]["morgana"]
    assert morgana["settings"]["min_dwell"] == 45 and morgana["settings"]["max_hold"] == 120
    healthy(sc, "nimue")
    assert (site.state_dir / "vivien.json").exists()   # its memory stays for a comeback
    line = next(d for d in sc.logs() if d["msg"] == "config reloaded")
    assert (line["added"], line["removed"], line["changed"]) == (["nimue"], ["vivien"], ["morgana"])

    # An invalid config is refused, logged with file and field, and the running one kept.
    site.doc["wizards"]["nimue"]["backends"][0]["kind"] = "bedrock"
    site.write()
    sc.proc.send_signal(signal.SIGHUP)
    refused = until(lambda: [d for d in sc.logs() if d["msg"].startswith("reload refused")],
                    30, "the refusal in the log")
    assert "wizards.nimue.backends[0].kind: must be one of" in refused[-1]["error"]
    assert str(site.config) in refused[-1]["error"]
    assert set(sc.status()["wizards"]) == {"merlin", "morgana", "nimue"}
    assert httpx.get(f"{site.base}/healthz", timeout=5).status_code == 200


def test_a_wizard_removed_mid_switch_stops_after_the_switch(site, bench, sidecars):
    """vivien's switch hangs in its gateway restart when a reload removes vivien: vivien stays
    (retiring) until the switch has finished and been recorded, then goes; the operator waiting
    on that switch gets its answer."""
    site.doc["wizards"]["vivien"] = _extra_wizard(site, "vivien", restart=True)
    site.write()
    hold = site.systemctl.parent / "hold-neverdark-wizard-vivien.service"
    hold.touch()
    sc = sidecars(site)
    healthy(sc, "vivien")
    op = ctl(site, "failover", "vivien", "--to", "local")
    until(lambda: "neverdark-wizard-vivien.service" in site.restarts(), 30, "vivien's restart")
    del site.doc["wizards"]["vivien"]
    site.write()
    sc.proc.send_signal(signal.SIGHUP)
    until(lambda: any(d["msg"] == "config reloaded" for d in sc.logs()), 30, "the reload")
    vivien = sc.wizard("vivien")
    assert vivien["retiring"] and vivien["switching"]
    hold.unlink()
    until(lambda: "vivien" not in sc.status()["wizards"], 120, "vivien gone")
    saved = site.state("vivien")
    assert saved["intent"] is None
    [rec] = saved["transitions"]
    assert rec["to"] == "local" and rec["kind"] == "manual" and not rec["ok"]
    assert "rollback unverified" in rec["detail"] and "restart" in rec["timings"]
    rc, answer = ctl_answer(op)
    assert rc == 1 and not answer.get("interrupted") and answer["wizard"] == "vivien", answer
    healthy(sc, "merlin")
