"""Failover drills on the real test fleet, through real Hermes gateways (issue 4).

Everything is real: the fleet deployed by `pyinfra inventory deploys/fleet.py` (the same fleet as
tests/test_fleet_deploy.py), the sidecars under systemd, Hermes' API servers, LLMock as each
cloud API (faults injected on the runner), llama-cpp-python serving Gemma 3 270M on each host.
Every check sends real chat turns through a wizard's API server (an SSH tunnel to the host's
loopback, where it listens) and checks who answered three ways: Hermes' session record names
the model, LLMock's request log shows what each cloud API received, and the llama server's
access log (the journal) shows what the local model served.

The fleet: merlin (vps1: claude -> local), gandalf (vps1: claude -> gpt-4.1 -> local, with Telegram
through a stand-in Bot API on the runner), radagast (pi1: local -> gemini). All switch live: no
gateway restart (docs/hermes.md, finding 11).
merlin and gandalf share vps1's Anthropic stand-in, so one outage moves both, as a real provider
outage would. Probe settings (testbed.bed): interval 2 s, fall 2, rise 2, min_dwell 10 s,
damping 4 s doubling to 16 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time

import pytest

from neverdark.hermes_config import DEFAULT_NOTICE
from testbed.bed import TELEGRAM_USERS, Turn
from testbed.wait import wait_until as wait_for

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

LOCAL = "gemma3-270m"
MERLIN_CLOUD, GANDALF_CLOUD, GANDALF_GPT, RADAGAST_CLOUD = (
    "claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4.1-mini", "gemini-2.5-flash")
PRIMARY = {"merlin": ("vps1", "claude"), "gandalf": ("vps1", "claude"), "radagast": ("pi1", "local")}
NOTICE_SNIPPET = DEFAULT_NOTICE[:40]
LLAMA_UNIT = "neverdark-llama-gemma3-270m.service"


# --- helpers ------------------------------------------------------------------------------------

def wizard_status(bed, wizard: str) -> dict:
    host, _ = PRIMARY[wizard]
    return bed.sidecar_status(host)["wizards"][wizard]


def wait_active(bed, wizard: str, backend: str, timeout: float = 300) -> dict:
    return bed.wait_active(PRIMARY[wizard][0], wizard, backend, timeout)


def llama_served(bed, host: str, since_wall: float) -> int:
    """Chat completions the host's llama server answered since then (uvicorn's access log)."""
    out = bed.ssh(host, f"journalctl -u {LLAMA_UNIT} --since @{int(since_wall)} -o cat "
                        "| grep -c 'POST /v1/chat/completions HTTP/1.1\" 200' || true")
    return int(out.strip() or 0)


def transitions_since(status: dict, since_wall: float) -> list[dict]:
    return [t for t in status["transitions"] if t["at"] >= since_wall]


def record(bed, name: str, figures: dict) -> None:
    """Measured figures (printed, and kept in the run's drill-report.json), not asserted."""
    path = bed.run_dir / "drill-report.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))
    print(f"\n{name}: {json.dumps(figures)}")


class BackToBack:
    """`step(n)` for n = 1, 2, ... in a thread, half a second apart, until the `with` ends."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def step(self, n: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.step(n)
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(400)


class Stream(BackToBack):
    """Turns sent back to back through one wizard, each a new conversation, until stopped."""

    def __init__(self, client, label: str) -> None:
        super().__init__()
        self.client, self.label = client, label
        self.turns: list[Turn] = []

    def step(self, n: int) -> None:
        self.turns.append(self.client.turn(f"{self.label} turn {n}: say something short."))

    def summary(self) -> dict:
        return {"sent": len(self.turns), "answered": sum(t.ok for t in self.turns),
                "failed": [t.error for t in self.turns if not t.ok],
                "by_model": {m: sum(t.model == m for t in self.turns)
                             for m in sorted({str(t.model) for t in self.turns})},
                "max_latency_s": round(max((t.latency for t in self.turns), default=0), 2)}


class TelegramChat(BackToBack):
    """A private Telegram chat with gandalf through the stand-in Bot API: one message at a time,
    each waiting for its answer (Hermes merges messages that arrive during a turn), back to back
    when used as a context manager."""

    def __init__(self, api, user: int = TELEGRAM_USERS[0]) -> None:
        super().__init__()
        self.api, self.user = api, user
        self.exchanges: list[tuple[str, str | None]] = []  # (sent, answer or None)

    def say(self, text: str, timeout: float = 120) -> str | None:
        before = len(self.api.sent(self.user))
        self.api.push_text(self.user, self.user, text)
        try:
            # The first message of a chat also gets Hermes' "no home channel" notice.
            new = self.api.wait_reply(self.user, before, timeout, settle=0.5,
                                      match="answer from")
        except TimeoutError:
            answer = None
        else:
            answer = next(t for t in new if "answer from" in t)
        self.exchanges.append((text, answer))
        return answer

    def step(self, n: int) -> None:
        self.say(f"telegram message {n}: still there?")

    def summary(self) -> dict:
        answers = [a for _, a in self.exchanges]
        return {"sent": len(answers), "answered": sum(a is not None for a in answers),
                "by_backend": {b: sum(a is not None and b in a for a in answers)
                               for b in ("vps1/anthropic", "vps1/openai")}}


def main_pid(bed, unit: str) -> str:
    return bed.ssh("vps1", f"systemctl show -p MainPID --value {unit}").strip()


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def calm(bed, first_deploy):
    """Every backend healthy and every wizard back on its primary, before and after each drill."""
    def settle():
        bed.clouds_up()
        for host in ("vps1", "pi1"):
            bed.ssh(host, f"systemctl start {LLAMA_UNIT}")
        for wizard, (_, primary) in PRIMARY.items():
            wait_active(bed, wizard, primary, timeout=300)
    settle()
    yield bed
    settle()


# --- drills -------------------------------------------------------------------------------------

def test_outage_503_fails_over_and_back_with_no_lost_turns(calm):
    """503 outage: failover; a conversation under way moves; the notice reaches the fallback; the
    webhook hears it; a deploy keeps the wizards on their fallbacks; recovery: failback after
    rise + dwell; turns sent all along are all answered."""
    bed = calm
    merlin, gandalf = bed.client("merlin"), bed.client("gandalf")
    first = merlin.turn("Hello Merlin, remember the word heron.")
    assert first.ok and first.model == MERLIN_CLOUD, first
    g_first = gandalf.turn("Hello Gandalf.")
    assert g_first.ok and g_first.model == GANDALF_CLOUD, g_first
    claude, gpt = bed.mocks["vps1/anthropic"], bed.mocks["vps1/openai"]

    chat = TelegramChat(bed.telegram)
    hello = chat.say("Hello Gandalf, from Telegram.", timeout=180)
    assert hello is not None and "vps1/anthropic" in hello, bed.telegram.sent(TELEGRAM_USERS[0])
    pid = main_pid(bed, "neverdark-wizard-gandalf.service")

    with Stream(bed.client("merlin"), "merlin") as m_stream, \
            Stream(bed.client("gandalf"), "gandalf") as g_stream, \
            TelegramChat(bed.telegram, TELEGRAM_USERS[1]) as tg_stream:
        time.sleep(3)
        claude.fault({"type": "fail", "status": 503, "times": None})
        # After the fault is in place: a turn that reached LLMock just before it got its 200.
        t0, wall0 = time.monotonic(), time.time()
        wait_active(bed, "merlin", "local")
        wait_active(bed, "gandalf", "gpt-4.1")
        switched = time.monotonic() - t0

        # The conversation under way continues on the fallback, same session. (Hermes' session
        # record keeps the model the session started with, so the answer and the servers' logs
        # are the witnesses here: LLMock answers "Plain answer from <backend>.")
        served = llama_served(bed, "vps1", wall0)
        second = merlin.turn("What word did I ask you to remember?", session=first.session)
        assert second.ok and second.session == first.session, second
        assert not second.content.startswith("Plain answer from"), second
        assert llama_served(bed, "vps1", wall0) > served
        g_second = gandalf.turn("Are you still there?", session=g_first.session)
        assert g_second.ok and g_second.content == "Plain answer from vps1/openai.", g_second
        # The Telegram conversation too: same chat, same gateway process, now on gpt.
        assert "vps1/openai" in (chat.say("Telegram again: are you there?") or ""), chat.exchanges
        assert not [r for r in claude.chats(since=t0) if r["status"] == 200]
        # Degraded mode is in the prompt the fallback gets.
        assert any(NOTICE_SNIPPET in json.dumps(r["body"]) for r in gpt.chats(since=t0))
        events = wait_for(lambda: [e for e in bed.hooks.seen(since=t0, event="transition")
                                   if e["ok"] and e["kind"] == "failover"]
                          if len(bed.hooks.seen(since=t0, event="transition")) >= 2 else None,
                          30, "failover webhooks")
        assert {(e["wizard"], e["from"], e["to"]) for e in events} >= {
            ("merlin", "claude", "local"), ("gandalf", "claude", "gpt-4.1")}

        # A deploy while on the fallbacks changes nothing and moves nobody.
        deploy = bed.deploy()
        assert deploy.rc == 0 and deploy.changed == 0, deploy.changed_ops
        assert wizard_status(bed, "merlin")["active"] == "local"
        assert wizard_status(bed, "gandalf")["active"] == "gpt-4.1"

        t1, wall1 = time.monotonic(), time.time()
        claude.recover()
        m_status = wait_active(bed, "merlin", "claude")
        wait_active(bed, "gandalf", "claude")
        failed_back = time.monotonic() - t1
        third = merlin.turn("And now?", session=first.session)
        assert third.ok and third.session == first.session, third
        assert third.content == "Plain answer from vps1/anthropic.", third
        g_third = gandalf.turn("Back to normal?", session=g_first.session)
        assert g_third.ok and g_third.content == "Plain answer from vps1/anthropic.", g_third
        assert "vps1/anthropic" in (chat.say("Telegram: back to normal?") or ""), chat.exchanges
        assert not any(NOTICE_SNIPPET in json.dumps(r["body"])
                       for r in claude.chats(since=t1) if r["status"] == 200)
        time.sleep(2)

    # Failback waited for rise passes and the dwell on the fallback.
    moves = transitions_since(m_status, wall0)
    over = next(t for t in moves if t["kind"] == "failover" and t["ok"])
    back = next(t for t in moves if t["kind"] == "failback" and t["ok"])
    assert back["at"] - over["at"] >= 10, moves
    # rise 2 at a 2 s interval: the first pass may come right after recovery, the second 2 s on.
    assert back["at"] >= wall1 + (2 - 1) * 2 * 0.9, "failback before rise passes could be seen"

    m, g, tg = m_stream.summary(), g_stream.summary(), tg_stream.summary()
    record(bed, "outage_503", {"to_fallback_s": round(switched, 1), "back_to_primary_s": round(failed_back, 1),
                          "merlin_api": m, "gandalf_api": g, "gandalf_telegram": tg})
    # Live switches: not one turn lost, on the API server or on Telegram, and no restart.
    assert m["sent"] >= 5 and not m["failed"], m
    assert g["sent"] >= 5 and not g["failed"], g
    assert tg["sent"] >= 3 and tg["answered"] == tg["sent"], tg_stream.exchanges
    assert tg["by_backend"]["vps1/openai"] > 0, tg_stream.exchanges
    assert main_pid(bed, "neverdark-wizard-gandalf.service") == pid


def test_429_retry_after_holds_the_primary(calm):
    bed = calm
    claude = bed.mocks["vps1/anthropic"]
    t0 = time.monotonic()
    claude.fault({"type": "fail", "status": 429, "retry_after": 30, "times": None})
    wait_active(bed, "merlin", "local", timeout=120)
    wait_active(bed, "gandalf", "gpt-4.1", timeout=120)
    turn = bed.client("merlin").turn("Busy day?")
    assert turn.ok and turn.model == LOCAL, turn
    status = wizard_status(bed, "merlin")
    assert status["backends"]["claude"]["held_for"] > 0
    wait_for(lambda: time.monotonic() - t0 > 36, 60, "the hold to run out", every=2)
    claude.recover()
    requests = sorted(r["started_at"] for r in claude.requests() if r["started_at"] >= t0)
    first = requests[0]
    # The probes of both wizards met the 429 within one probe interval; then nothing until 30 s.
    burst = [t for t in requests if t <= first + 2 * 2]
    quiet = [t for t in requests if first + 2 * 2 < t < first + 30 - 0.5]
    assert burst and not quiet, [round(t - first, 1) for t in requests]
    wait_active(bed, "merlin", "claude")
    assert bed.client("merlin").turn("Better now?").model == MERLIN_CLOUD


def test_401_fails_over_and_alerts_key_rejected(calm):
    bed = calm
    claude = bed.mocks["vps1/anthropic"]
    t0 = time.monotonic()
    claude.fault({"type": "fail", "status": 401, "times": None})
    wait_active(bed, "merlin", "local", timeout=120)
    alerts = wait_for(lambda: bed.hooks.seen(since=t0, event="key_rejected"), 30,
                      "key_rejected webhooks")
    assert {(a["wizard"], a["backend"]) for a in alerts} <= {("merlin", "claude"), ("gandalf", "claude")}
    assert ("merlin", "claude") in {(a["wizard"], a["backend"]) for a in alerts}
    assert wizard_status(bed, "merlin")["backends"]["claude"]["key_rejected"] is True
    # The operator's table says so too.
    table = neverdark(bed, "status")
    row = next(line for line in table.stdout.splitlines() if line.startswith("merlin"))
    assert "vps1" in row and " local" in row and "claude:key-rejected" in row, table.stdout
    claude.recover()
    wait_active(bed, "merlin", "claude")


def test_hung_primary_times_out_and_fails_over(calm):
    bed = calm
    claude = bed.mocks["vps1/anthropic"]
    claude.fault({"type": "delay", "seconds": 120, "times": None})
    wait_active(bed, "merlin", "local", timeout=120)
    assert wizard_status(bed, "merlin")["backends"]["claude"]["last_reason"] == "timeout"
    turn = bed.client("merlin").turn("Anyone home?", timeout=100)
    assert turn.ok and turn.model == LOCAL and turn.latency < 60, turn
    claude.recover()
    wait_active(bed, "merlin", "claude")


def test_flapping_primary_is_damped_and_gateways_never_fail(calm):
    bed = calm
    claude = bed.mocks["vps1/anthropic"]
    units = "neverdark-wizard-merlin neverdark-wizard-gandalf"
    restarts_before = bed.ssh("vps1", f"systemctl show -p NRestarts --value {units}").split()
    wall0, t0 = time.time(), time.monotonic()
    states = set()
    down = False
    while time.monotonic() - t0 < 60:
        down = not down
        claude.fault({"type": "fail", "status": 503, "times": None}) if down else claude.recover()
        flip_at = time.monotonic()
        while time.monotonic() - flip_at < 4:
            states |= set(bed.ssh("vps1", f"systemctl is-active {units} || true").split())
            time.sleep(0.5)
    claude.recover()
    window = time.time() - wall0
    for wizard in ("merlin", "gandalf"):
        wait_active(bed, wizard, "claude", timeout=300)
    assert "failed" not in states, states
    assert bed.ssh("vps1", f"systemctl show -p NRestarts --value {units}").split() == restarts_before
    figures = {}
    for wizard in ("merlin", "gandalf"):
        moves = [t for t in transitions_since(wizard_status(bed, wizard), wall0) if t["ok"]]
        # Every failback waits min_dwell (10 s) plus the damping hold: at most one per 10 s.
        bound = 2 * math.ceil((time.time() - wall0) / 10) + 1
        figures[wizard] = {"switches": len(moves), "bound": bound,
                           "kinds": [t["kind"] for t in moves]}
        assert 1 <= len(moves) <= bound, moves
        dwell = [b["at"] - a["at"] for a, b in zip(moves, moves[1:]) if b["kind"] == "failback"]
        assert all(d >= 10 for d in dwell), dwell
    record(bed, "flapping_60s", {"window_s": round(window), **figures})


def test_local_first_wizard_dark_then_overflow_then_back(calm):
    """radagast (pi1, local -> gemini): with gemini down too, losing the local model switches
    nothing and raises "dark"; gemini back: overflow to it; the local model back: failback."""
    bed = calm
    gemini = bed.mocks["pi1/google"]
    t0 = time.monotonic()
    gemini.fault({"type": "fail", "status": 503, "times": None})
    wait_for(lambda: wizard_status(bed, "radagast")["backends"]["gemini"]["healthy"] is False, 60,
             "gemini unhealthy")
    wall_kill = time.time()
    bed.ssh("pi1", f"systemctl kill -s KILL {LLAMA_UNIT}; systemctl stop {LLAMA_UNIT}")
    dark = wait_for(lambda: (lambda s: s if s["dark"] else None)(wizard_status(bed, "radagast")),
                    60, "radagast dark")
    assert dark["active"] == "local" and not transitions_since(dark, wall_kill), dark
    wait_for(lambda: bed.hooks.seen(since=t0, event="dark", wizard="radagast"), 30, "dark webhook")
    assert neverdark(bed, "status", check=False).returncode == 1  # a dark wizard fails the table

    gemini.recover()
    wait_active(bed, "radagast", "gemini", timeout=120)
    radagast = bed.client("radagast")
    turn = radagast.turn("Hello from the woods.")
    assert turn.ok and turn.model == RADAGAST_CLOUD, turn
    assert any(r["status"] == 200 and "generateContent" in r["path"] for r in gemini.chats(since=t0))

    wall_back = time.time()
    bed.ssh("pi1", f"systemctl start {LLAMA_UNIT}")
    wait_active(bed, "radagast", "local", timeout=400)
    turn = radagast.turn("And the local brain?")
    assert turn.ok and turn.model == LOCAL, turn
    assert llama_served(bed, "pi1", wall_back) >= 2  # the switch's verify turn and ours


# --- operator tools -----------------------------------------------------------------------------

def neverdark(bed, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = bed.neverdark(*args)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_neverdark_drill_and_status(calm):
    bed = calm
    table = neverdark(bed, "status").stdout
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["WIZARD", "HOST", "ACTIVE", "SINCE", "REASON"], table
    for wizard, (host, primary) in PRIMARY.items():
        row = next(line for line in lines if line.startswith(wizard))
        assert host in row and f" {primary} " in row, row

    t0 = time.monotonic()
    report = json.loads(neverdark(bed, "drill", "merlin", "--turns", "2", "--json").stdout)
    took = time.monotonic() - t0
    assert report["ok"] and report["from"] == "claude" and report["to"] == "local", report
    assert [t["model"] for t in report["fallback_turns"]] == [LOCAL, LOCAL]
    assert [t["model"] for t in report["primary_turns"]] == [MERLIN_CLOUD, MERLIN_CLOUD]
    assert report["failover"]["timings"]["first_turn"] > 0
    record(bed, "drill_merlin", {"total_s": round(took, 1), "failover_s": report["failover"]["seconds"],
                            "failback_s": report["failback"]["seconds"]})
    human = neverdark(bed, "drill", "gandalf", "--turns", "1").stdout
    assert "drill passed" in human and "claude -> gpt-4.1 -> claude" in human, human
