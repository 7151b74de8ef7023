"""kill -9 of a host's sidecar in the middle of a real switch, on the test fleet.

Everything is real: the fleet deployed by `pyinfra inventory deploys/fleet.py`, the sidecar under
systemd (Restart=always brings it back), gandalf's Hermes gateway, LLMock as each cloud API, the
operator's `neverdark failover` over SSH. A small script on the host waits for a point of the
switch (the intent in the state file; the active config flipped; the verify turn under way),
SIGKILLs the sidecar's main process, waits until it is gone and reports what it left on disk.

The restarted sidecar must: record the interrupted switch (/status, the state file, the metrics,
the webhook), run the check turn through gandalf's gateway on the backend it found before
trusting it, and move gandalf to a healthy backend when that check fails. The operator's
`neverdark failover`, whose connection the kill cut, must report where gandalf ended up.

gandalf (vps1: claude -> gpt-4.1 -> local) is switched to gpt-4.1: gpt is an LLMock on the runner, so
its verify turn can be held: a delay on its next two completions, the sidecar's confirming deep
probe (well inside that probe's 15 s timeout) and then the switch's verify turn through Hermes.
Probe settings (testbed.bed): interval 2 s, fall 2, rise 2, min_dwell 10 s.
"""

from __future__ import annotations

import json
import shlex
import threading
import time

import pytest

from testbed.metrics_text import value
from testbed.wait import wait_until as wait_for

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

HOST, WIZARD, GPT = "vps1", "gandalf", "gpt-4.1"   # GPT: gandalf's OpenAI backend
UNIT = "neverdark-sidecar"
COMPLETIONS = {"path": "/v1/chat/completions"}   # not the listings the probes send every 2 s

KILL_AT = r"""
import json, os, signal, subprocess, sys, time, urllib.request
point, wizard, target = sys.argv[1:4]
then = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None   # an LLMock scenario to set
state = f"/var/lib/neverdark/sidecar/state/{wizard}.json"
active = f"/var/lib/neverdark/wizards/{wizard}/managed/config.yaml"
variant = open(f"/etc/neverdark/wizards/{wizard}/backends/{target}.yaml", "rb").read()

def saved():
    try:
        with open(state) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def flipped():
    with open(active, "rb") as f:
        return f.read() == variant

deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    if point == "intent" and saved().get("intent"):
        break
    if point in ("flip", "verify") and flipped():
        break
    time.sleep(0.005)
else:
    print(json.dumps({"error": f"{point} not reached in 180 s"}))
    sys.exit(1)
if point == "verify":
    time.sleep(2.0)   # past the ready check: the verify turn is held in LLMock
pid = int(subprocess.check_output(["systemctl", "show", "-p", "MainPID", "--value", "neverdark-sidecar"]))
os.kill(pid, signal.SIGKILL)
while os.path.exists(f"/proc/{pid}"):
    time.sleep(0.01)
if then:   # at once, long before systemd's RestartSec=2 brings the sidecar back
    url = then["url"] + "/_llmock/scenario"
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5)
    urllib.request.urlopen(urllib.request.Request(
        url, data=json.dumps({"behaviors": then["behaviors"]}).encode(),
        headers={"Content-Type": "application/json"}), timeout=5)
doc = saved()
print(json.dumps({"point": point, "pid": pid, "flipped": flipped(), "intent": doc.get("intent"),
                  "transitions": len(doc.get("transitions") or []), "killed_wall": time.time()}))
"""


def status(bed) -> dict:
    return bed.sidecar_status(HOST)["wizards"]


def metrics(bed) -> str:
    return bed.sidecar_get(HOST, "/metrics")


def restarts(bed) -> int:
    return int(bed.ssh(HOST, f"systemctl show -p NRestarts --value {UNIT}").strip())


class Failover(threading.Thread):
    """`neverdark failover gandalf --to gpt-4.1`, as the operator runs it, in the background."""

    def __init__(self, bed, to: str) -> None:
        super().__init__(daemon=True)
        self.bed, self.to, self.proc = bed, to, None

    def run(self) -> None:
        self.proc = self.bed.neverdark("failover", WIZARD, "--to", self.to, timeout=1300)

    def answer(self) -> tuple[int, dict, str]:
        self.join(1300)
        return self.proc.returncode, json.loads(self.proc.stdout), self.proc.stderr


@pytest.fixture
def calm(bed, first_deploy):
    """Every cloud healthy and gandalf and merlin on claude, before and after."""
    def settle():
        bed.clouds_up()
        for wizard in (WIZARD, "merlin"):
            bed.wait_active(HOST, wizard, "claude", timeout=300)
        wait_for(lambda: all(b["healthy"] for b in status(bed)[WIZARD]["backends"].values()),
                 120, "gandalf's backends healthy")
    settle()
    yield bed
    settle()


def kill_at(bed, point: str, target: str, then: dict | None = None) -> dict:
    args = [point, WIZARD, target] + ([json.dumps(then)] if then else [])
    out = bed.fleet.ssh(HOST, "python3 - " + " ".join(shlex.quote(a) for a in args),
                        input=KILL_AT, timeout=300)
    report = json.loads(out.strip().splitlines()[-1])
    assert "error" not in report, report
    return report


def interrupted_switch(bed, point: str, target: str = GPT):
    """Start a failover, kill the sidecar at `point`, wait for the restarted sidecar's record."""
    t0, nrestarts = time.monotonic(), restarts(bed)
    merlin_before = status(bed)["merlin"]["transitions"]
    killer: dict = {}
    kt = threading.Thread(target=lambda: killer.update(kill_at(bed, point, target)), daemon=True)
    kt.start()
    time.sleep(1.0)   # the watcher is polling before the switch begins
    op = Failover(bed, target)
    op.start()
    kt.join(300)
    assert killer, "the kill script gave no report"
    killer["after_kill"] = time.monotonic()   # on the runner's clock, which LLMock stamps with
    # The killed sidecar had not finished: its intent was on disk when it died.
    assert killer["intent"] and killer["intent"]["to"] == target, killer

    def recorded():
        w = status(bed)[WIZARD]
        recs = [t for t in w["transitions"]
                if t.get("recovered") and t["at"] >= killer["killed_wall"] - 1]
        return (w, recs[-1]) if recs and not w["switching"] and not w["intent"] else None
    w, rec = wait_for(recorded, 600, "the restarted sidecar's record of the interrupted switch")
    assert restarts(bed) == nrestarts + 1                 # systemd brought it back, once
    assert status(bed)["merlin"]["transitions"] == merlin_before   # merlin: nothing to record
    return t0, killer, w, rec, op


def hold_verify(bed, seconds: float = 6.0) -> None:
    """gpt's next two completions (the deep probe, then the verify turn) wait: the kill lands
    before the switch commits."""
    bed.mocks["vps1/openai"].fault({"type": "delay", "seconds": seconds, "times": 2,
                                    "match": COMPLETIONS})


def test_kill_after_the_intent(calm):
    bed = calm
    hold_verify(bed)
    t0, killer, w, rec, op = interrupted_switch(bed, "intent")
    outcome = ("completed after a sidecar restart" if killer["flipped"]
               else "interrupted; rolled back")
    where = GPT if killer["flipped"] else "claude"
    assert rec["recovered"] == outcome and rec["from"] == "claude" and rec["to"] == GPT
    assert rec["check"] == {"backend": where, "ok": True}, rec
    assert w["active"] == where
    _assert_told(bed, t0, outcome, where)
    rc, answer, err = op.answer()
    assert answer["interrupted"] and answer["active"] == where, answer
    assert rc == (0 if where == GPT else 1) and f"{WIZARD} is now on {where}" in err


def test_kill_after_the_flip(calm):
    bed = calm
    hold_verify(bed)
    t0, killer, w, rec, op = interrupted_switch(bed, "flip")
    assert killer["flipped"]
    assert rec["recovered"] == "completed after a sidecar restart" and rec["ok"], rec
    assert rec["check"] == {"backend": GPT, "ok": True}
    assert w["active"] == GPT
    # The check turn went through gandalf's gateway to gpt's API after the restart.
    assert [r for r in bed.mocks["vps1/openai"].chats(since=killer["after_kill"])
            if r["status"] == 200]
    _assert_told(bed, t0, "completed after a sidecar restart", GPT)
    rc, answer, _ = op.answer()
    assert rc == 0 and answer["ok"] and answer["interrupted"] and answer["active"] == GPT


def test_kill_during_verify_then_the_check_fails(calm):
    """The verify turn is held in gpt's API when the sidecar dies; from that instant gpt refuses
    every call: the restarted sidecar's check turn fails (whether Hermes' own per-turn fallback
    answers it or not: its session then names another model) and the sidecar moves gandalf to
    claude, a healthy backend."""
    bed = calm
    gpt = bed.mocks["vps1/openai"]
    hold_verify(bed, seconds=8.0)
    t0, nrestarts = time.monotonic(), restarts(bed)
    killed: dict = {}

    def kill_then_break_gpt():
        # gpt refuses everything from the kill on (set by the kill script on the host, at once).
        refuse = {"url": gpt.url, "behaviors": [
            {"type": "fail", "status": 401, "times": None},
            {"type": "reply", "text": f"Plain answer from {gpt.name}.", "times": None}]}
        killed.update(kill_at(bed, "verify", GPT, then=refuse))
    killer_t = threading.Thread(target=kill_then_break_gpt, daemon=True)
    killer_t.start()
    time.sleep(1.0)   # the watcher is polling before the switch begins
    op = Failover(bed, GPT)
    op.start()
    killer_t.join(300)
    assert killed["flipped"] and killed["intent"]["to"] == GPT, killed

    def moved():
        st = status(bed)[WIZARD]
        recs = [t for t in st["transitions"] if t["at"] >= killed["killed_wall"] - 1]
        return (st, recs) if st["active"] == "claude" and not st["switching"] and len(recs) >= 2 else None
    st, recs = wait_for(moved, 600, "the check to fail and gandalf to move to claude")
    seen = [(r["path"], r["status"], r.get("fault")) for r in gpt.requests()
            if r["started_at"] >= t0 and r["method"] == "POST"]
    assert [(t.get("recovered"), t["to"], t["ok"]) for t in recs] == [
        ("completed after a sidecar restart", GPT, False), (None, "claude", True)], (recs, seen)
    assert recs[0]["check"] == {"backend": GPT, "ok": False}
    assert recs[1]["kind"] == "failover"
    assert restarts(bed) == nrestarts + 1
    assert [r for r in gpt.chats(since=t0) if r["status"] == 401]      # the failed check turn
    _assert_told(bed, t0, "completed after a sidecar restart", "claude")
    rc, answer, _ = op.answer()
    assert rc == 1 and answer["interrupted"] and answer["active"] == "claude", answer


def _assert_told(bed, t0: float, outcome: str, active: str) -> None:
    """The webhook heard the interrupted switch, and the metrics count it."""
    events = wait_for(lambda: [e for e in bed.hooks.seen(since=t0, event="transition",
                                                         wizard=WIZARD) if e.get("recovered")],
                      60, "the webhook for the interrupted switch")
    assert events[-1]["recovered"] == outcome
    label = "completed" if outcome.startswith("completed") else "rolled_back"
    assert value(metrics(bed), "neverdark_interrupted_switches_total", wizard=WIZARD,
                 outcome=label) == 1
    assert bed.ssh(HOST, f"python3 -c 'import json;print(json.load(open("
                         f"\"/var/lib/neverdark/sidecar/state/{WIZARD}.json\"))[\"intent\"])'"
                   ).strip() == "None"
    wait_for(lambda: status(bed)[WIZARD]["active"] == active or None, 5, f"{WIZARD} on {active}")
