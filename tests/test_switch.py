"""switch() and gateway.verify against a real Hermes 0.19.0 gateway on loopback.

Real: the Hermes gateway (API server platform on a free 127.0.0.1 port) from the hermes venv;
two `llmock serve` processes, one answering on its OpenAI route and one on its Anthropic route;
the managed config.yaml flipped between their variants; a real supervisor restarting the gateway
on exit 75 after SIGUSR1 (standing in for systemd, which is not PID 1 here). Which backend
answered is checked independently through each LLMock's request journal.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sidecar.config import ProbeSettings
from sidecar.flip import atomic_install, read_active_backend
from sidecar.gateway import verify
from sidecar.policy import Policy
from sidecar.switch import check, switch
from testbed.hermes_gateway import Gateway, variant
from testbed.llmock import LLMock


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    mocks = [LLMock(root), LLMock(root)]
    gw = None
    try:
        a, b = mocks
        variants = root / "backends"
        variants.mkdir()
        backends = (
            SimpleNamespace(name="gpt", kind="openai", base_url=a.openai_base, model="mock-gpt",
                            api_key="k", variant=variant(variants / "gpt.yaml", provider="custom",
                                                         model="mock-gpt", base_url=a.openai_base)),
            SimpleNamespace(name="claude", kind="anthropic", base_url=b.anthropic_base,
                            model="claude-mock", api_key="k",
                            variant=variant(variants / "claude.yaml", provider="anthropic",
                                            model="claude-mock", base_url=b.anthropic_base)),
        )
        active = root / "managed" / "config.yaml"
        active.parent.mkdir()
        atomic_install(backends[0].variant, active)
        gw = Gateway.bare(root / "gw", active, supervised=True)
        yield SimpleNamespace(gw=gw, mocks=mocks, backends=backends, active=active, root=root)
    finally:
        if gw:
            gw.stop()
        for m in mocks:
            m.stop()


def wizard(fleet, unit: str):
    return SimpleNamespace(name="merlin", unit=unit, api_port=fleet.gw.port, api_key=fleet.gw.key,
                           home=fleet.gw.home, active_config=fleet.active, probe=None,
                           backends=fleet.backends)


def chats(mock: LLMock) -> list[dict]:
    return [r for r in mock.requests() if r["method"] == "POST"]


def run(coro):
    return asyncio.run(coro)


async def do_switch(fleet, w, to, previous, permit=None):
    async with httpx.AsyncClient() as client:
        return await switch(w, to, previous, client, ["systemctl"], control=fleet.gw,
                            restart_permit=permit, ready_timeout=90, verify_timeout=120)


class Permits:
    """The daemon's restart permit: the wizard's policy and its restart budget, on the real
    monotonic clock; `asked` counts the questions."""

    def __init__(self, w):
        self.policy = Policy([b.name for b in w.backends], ProbeSettings(), None, time.monotonic(),
                             gateway=w.unit)
        self.asked = 0

    def __call__(self):
        self.asked += 1
        return self.policy.take_restart(time.monotonic())


def test_switch_openai_to_anthropic_and_back(fleet):
    gpt_mock, claude_mock = fleet.mocks
    w = wizard(fleet, "u-roundtrip")
    for m in fleet.mocks:
        m.reset()
    before = fleet.gw.gateway_pid()
    r = run(do_switch(fleet, w, "claude", "gpt"))
    assert r.ok and not r.rolled_back, r.detail
    assert fleet.gw.gateway_pid() != before  # it really restarted
    assert read_active_backend(fleet.active, w) == "claude"
    assert {"install", "restart", "ready", "first_turn", "total"} <= set(r.timings)
    # The answer came from the Anthropic LLMock, through its Messages route, and nothing else.
    assert any(q["path"] == "/anthropic/v1/messages" and q["status"] == 200 for q in chats(claude_mock))
    assert chats(gpt_mock) == []

    for m in fleet.mocks:
        m.reset()
    r = run(do_switch(fleet, w, "gpt", "claude"))
    assert r.ok, r.detail
    assert any(q["path"] == "/v1/chat/completions" and q["model"] == "mock-gpt" for q in chats(gpt_mock))
    assert chats(claude_mock) == []


def test_api_only_gateway_switches_without_a_restart(fleet):
    """restart: false (no messaging platform): the flip is live, the same process answers."""
    gpt_mock, claude_mock = fleet.mocks
    w = wizard(fleet, "u-norestart")
    w.restart = False
    atomic_install(fleet.backends[0].variant, fleet.active)
    for m in fleet.mocks:
        m.reset()
    before = fleet.gw.gateway_pid()
    permits = Permits(w)
    r = run(do_switch(fleet, w, "claude", "gpt", permits))
    assert r.ok, r.detail
    assert fleet.gw.gateway_pid() == before
    assert "restart" not in r.timings and {"install", "ready", "first_turn"} <= set(r.timings)
    assert any(q["path"] == "/anthropic/v1/messages" and q["status"] == 200 for q in chats(claude_mock))
    assert chats(gpt_mock) == []
    assert permits.asked == 0  # no restart, so nothing taken from the budget
    atomic_install(fleet.backends[0].variant, fleet.active)


def test_failed_verify_rolls_back(fleet):
    gpt_mock, claude_mock = fleet.mocks
    w = wizard(fleet, "u-rollback")
    atomic_install(fleet.backends[0].variant, fleet.active)
    for m in fleet.mocks:
        m.reset()
    # The target's key is rejected: Hermes answers HTTP 200 with finish_reason "error".
    claude_mock.fault({"type": "fail", "status": 401, "times": None})
    r = run(do_switch(fleet, w, "claude", "gpt"))
    claude_mock.reset()
    assert not r.ok and r.rolled_back, r.detail
    assert "agent error" in r.detail and "rolled back to gpt" in r.detail
    assert read_active_backend(fleet.active, w) == "gpt"
    assert "rollback_first_turn" in r.timings
    assert any(q["status"] == 200 for q in chats(gpt_mock))  # the rollback verify answered


def test_verify_tells_which_backend_answered(fleet):
    """The config says claude, but the verify expects gpt: the session's model gives it away."""
    w = wizard(fleet, "u-verify")
    atomic_install(fleet.backends[1].variant, fleet.active)  # live: Hermes re-reads per request

    async def go():
        async with httpx.AsyncClient() as client:
            wrong = await verify(w, fleet.backends[0], client, 120)
            right = await verify(w, fleet.backends[1], client, 120)
        return wrong, right
    wrong, right = run(go())
    assert not wrong.ok and wrong.answered_model == "claude-mock", wrong.detail
    assert right.ok and right.answered_model == "claude-mock", right.detail
    atomic_install(fleet.backends[0].variant, fleet.active)


@pytest.fixture
def fresh_gateway(fleet):
    """Its own HERMES_HOME: Hermes counts starts per home (gateway-starts.log) and backs off after
    more than 5 in 120 s, so sharing the module's gateway would measure Hermes' brake, not ours."""
    atomic_install(fleet.backends[0].variant, fleet.active)
    gw = Gateway.bare(fleet.root / "gw-storm", fleet.active, supervised=True)
    try:
        yield SimpleNamespace(**{**vars(fleet), "gw": gw})
    finally:
        gw.stop()


def test_fifth_restart_in_window_is_refused(fresh_gateway):
    fleet = fresh_gateway
    w = wizard(fleet, "u-storm")
    for m in fleet.mocks:
        m.reset()
    names = ["claude", "gpt", "claude", "gpt"]
    permits = Permits(w)
    for i, name in enumerate(names):
        r = run(do_switch(fleet, w, name, names[i - 1] if i else "gpt", permits))
        assert r.ok, r.detail
        # Well inside the window, and no Hermes back-off slowed any of them down.
        assert r.timings["ready"] < 9, r.timings
    pid = fleet.gw.gateway_pid()
    r = run(do_switch(fleet, w, "claude", "gpt", permits))
    assert not r.ok and not r.rolled_back
    assert r.detail == ("switch to claude refused: u-storm already restarted 4 times in 120s "
                        "(Hermes' respawn-storm brake and systemd's start limit)")
    assert fleet.gw.gateway_pid() == pid  # no restart happened
    assert read_active_backend(fleet.active, w) == "gpt"  # and the file was left alone


def test_restart_command_failure_rolls_back_the_file(tmp_path):
    """systemctl is replaced by the real /bin/false: the restart fails, the old variant returns."""
    a = variant(tmp_path / "a.yaml", provider="custom", model="m-a", base_url="http://127.0.0.1:9/v1")
    b = variant(tmp_path / "b.yaml", provider="custom", model="m-b", base_url="http://127.0.0.1:9/v1")
    active = tmp_path / "config.yaml"
    atomic_install(a, active)
    w = SimpleNamespace(name="w", unit="u-false", api_port=9, api_key="x", home=tmp_path,
                        active_config=active, probe=None,
                        backends=(SimpleNamespace(name="a", model="m-a", variant=a),
                                  SimpleNamespace(name="b", model="m-b", variant=b)))

    async def go():
        async with httpx.AsyncClient() as client:
            return await switch(w, "b", "a", client, ["false"])
    r = run(go())
    assert not r.ok and r.rolled_back
    assert "restart failed: systemctl restart u-false failed" in r.detail
    assert active.read_bytes() == a.read_bytes()


def test_invalid_target_variant_touches_nothing(tmp_path):
    good = variant(tmp_path / "a.yaml", provider="custom", model="m-a", base_url="http://127.0.0.1:9/v1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [not, a, mapping]\n")
    active = tmp_path / "config.yaml"
    atomic_install(good, active)
    w = SimpleNamespace(name="w", unit="u-bad", api_port=9, api_key="x", home=tmp_path,
                        active_config=active, probe=None,
                        backends=(SimpleNamespace(name="a", model="m-a", variant=good),
                                  SimpleNamespace(name="b", model="m-b", variant=bad)))

    async def go():
        async with httpx.AsyncClient() as client:
            return await switch(w, "b", "a", client, ["false"])
    r = run(go())
    assert not r.ok and not r.rolled_back and "install of b failed" in r.detail
    assert active.read_bytes() == good.read_bytes()


@pytest.fixture
def own_gateway(fleet, tmp_path):
    """A gateway with a HERMES_HOME of its own (Hermes' start counting is per home)."""
    atomic_install(fleet.backends[0].variant, fleet.active)
    gw = Gateway.bare(tmp_path / "gw", fleet.active, supervised=True)
    try:
        yield SimpleNamespace(**{**vars(fleet), "gw": gw})
    finally:
        gw.stop()
        atomic_install(fleet.backends[0].variant, fleet.active)


def test_rollback_whose_restart_is_refused_still_restores_the_file(own_gateway):
    """One slot left: the switch's restart takes it, the rollback's is refused; the old variant
    is back in place anyway (Hermes re-reads it per request) and the detail says so."""
    fleet = own_gateway
    gpt_mock, claude_mock = fleet.mocks
    w = wizard(fleet, "u-one-slot")
    permits = Permits(w)
    now = time.monotonic()
    permits.policy.restarts.extend([now - 1, now - 1, now - 1])
    claude_mock.fault({"type": "fail", "status": 401, "times": None})
    try:
        r = run(do_switch(fleet, w, "claude", "gpt", permits))
    finally:
        claude_mock.reset()
    assert not r.ok and r.rolled_back and permits.asked == 2
    assert "rollback unverified (restart refused: u-one-slot already restarted 4 times" in r.detail
    assert read_active_backend(fleet.active, w) == "gpt"
    assert "rollback_restart" not in r.timings


def test_check_turn_confirms_only_the_backend_that_answers(fleet):
    """The check a restarted sidecar runs: ready, then a real turn, judged by the session's model."""
    w = wizard(fleet, "u-check")
    atomic_install(fleet.backends[0].variant, fleet.active)   # gpt

    async def go():
        async with httpx.AsyncClient() as client:
            good = await check(w, "gpt", client, ["systemctl"], control=fleet.gw, verify_timeout=120)
            bad = await check(w, "claude", client, ["systemctl"], control=fleet.gw, verify_timeout=120)
        return good, bad
    good, bad = run(go())
    assert good.ok and {"ready", "check_turn"} <= set(good.timings), good.detail
    assert not bad.ok and "answered by model 'mock-gpt'" in bad.detail
