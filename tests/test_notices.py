"""Operator notices by incident (sidecar/notices.py): the rules on a hand-driven clock, the
delivery outcomes /metrics counts, and the `settle` setting from inventory to sidecar config.
A real outage through a real daemon and hooks: tests/test_sidecar_daemon.py
(test_an_outage_is_one_notice_and_one_recovery)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import yaml

from sidecar import config, hooks
from sidecar.events import iso
from sidecar.notices import Notices
from testbed.llmock import free_port
from testbed.metrics_text import value
from testbed.sidecar_outputs import write_config


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(settle: float = 120.0):
    clock, sent = Clock(), []
    n = Notices(sent.append, clock, lambda: 1_800_000_000 + clock.t, lambda: settle, iso)
    return n, clock, sent


def transition(kind: str, ok: bool = True) -> dict:
    return {"event": "transition", "wizard": "merlin", "kind": kind, "ok": ok,
            "from": "claude", "to": "local"}


def test_one_notice_per_incident_and_one_on_recovery():
    n, clock, sent = make(settle=120)
    assert n.event("merlin", {"event": "rate_limited", "wizard": "merlin", "backend": "claude"})
    for kind in ("failover", "failback", "failover"):      # a flapping primary
        clock.t += 10
        assert not n.event("merlin", transition(kind))
    assert len(sent) == 1 and sent[0]["notice"] == "incident"
    assert sent[0]["event"] == "rate_limited" and sent[0]["backend"] == "claude"
    n.calm("merlin", False)                                 # still on the fallback
    clock.t += 500
    assert not n.calm("merlin", True)                       # calm starts now
    clock.t += 119
    assert not n.calm("merlin", True)
    clock.t += 1
    assert n.calm("merlin", True)
    assert len(sent) == 2
    rec = sent[1]
    assert rec["event"] == "recovered" and rec["wizard"] == "merlin"
    assert rec["incident"]["events"] == {"rate_limited": 1, "failover": 2, "failback": 1}
    assert rec["incident"]["folded"] == 3 and rec["incident"]["first"] == "rate_limited"
    assert rec["incident"]["lasted_s"] == 650.0
    assert "after 650 s" in rec["detail"] and "failover x2" in rec["detail"]
    # Over: the next event is a new incident.
    clock.t += 5
    assert n.event("merlin", transition("failover"))
    assert len(sent) == 3 and sent[2]["notice"] == "incident"


def test_an_event_in_the_settle_window_keeps_the_incident_open():
    n, clock, sent = make(settle=60)
    n.event("merlin", transition("failover"))
    n.calm("merlin", True)
    clock.t += 50
    assert not n.event("merlin", transition("failback"))    # folded, window starts again
    clock.t += 20
    assert not n.calm("merlin", True)                       # 20 s calm since: not yet
    clock.t += 40
    assert not n.calm("merlin", True)                       # 60 s since the event, but calm
    clock.t += 60                                           # was only seen again 40 s ago
    assert n.calm("merlin", True)
    assert [e["event"] for e in sent] == ["transition", "recovered"]


def test_a_switch_that_fails_is_named_so():
    n, clock, sent = make()
    n.event("merlin", transition("failover"))
    n.event("merlin", transition("failover", ok=False))
    clock.t += 1
    n.calm("merlin", True)
    clock.t += 200
    n.calm("merlin", True)
    assert sent[-1]["incident"]["events"] == {"failover": 1, "failover (failed)": 1}


def test_it_getting_worse_is_sent_once_per_kind_while_an_incident_is_open():
    """A key rejected on a secondary keeps the wizard from being calm, so its incident stays
    open: a later dark wizard, or a switch that fails, must still reach the operator, once."""
    n, clock, sent = make()
    n.event("merlin", {"event": "key_rejected", "wizard": "merlin", "backend": "gpt"})
    for _ in range(100):                                    # probe rounds, not calm
        clock.t += 2
        n.calm("merlin", False)
        assert not n.event("merlin", {"event": "key_rejected", "wizard": "merlin",
                                      "backend": "gpt"})    # a repeat: folded
    assert not n.event("merlin", transition("failover"))    # an ordinary event: folded
    assert n.event("merlin", {"event": "dark", "wizard": "merlin"})
    assert not n.event("merlin", {"event": "dark", "wizard": "merlin"})
    assert n.event("merlin", transition("failover", ok=False))
    assert [(e["event"], e["notice"]) for e in sent] == [
        ("key_rejected", "incident"), ("dark", "escalation"), ("transition", "escalation")]
    assert sent[2]["ok"] is False


def test_wizards_have_their_own_incidents():
    n, clock, sent = make()
    n.event("merlin", transition("failover"))
    n.event("morgana", {"event": "dark", "wizard": "morgana"})
    n.event("merlin", transition("failback"))
    assert [e["wizard"] for e in sent] == ["merlin", "morgana"]
    n.forget("morgana")                                     # removed by a reload: no recovery
    n.calm("morgana", True)
    clock.t += 500
    n.calm("morgana", True)
    assert len(sent) == 2


def test_settle_zero_sends_every_event_and_no_recovery():
    n, clock, sent = make(settle=0)
    for kind in ("failover", "failback"):
        assert n.event("merlin", transition(kind))
    clock.t += 1000
    assert not n.calm("merlin", True) and not n.calm("merlin", True)
    assert [e["kind"] for e in sent] == ["failover", "failback"]
    assert all("notice" not in e for e in sent)


# --- delivery outcomes, as /metrics counts them ------------------------------------------------

def test_delivery_outcomes_ok_error_timeout(tmp_path):
    """A command that succeeds, a webhook on a closed port, a webhook that never answers."""
    async def main():
        server = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient() as client:
                ok = await hooks.notify({"event": "test"}, {"command": "true"}, {}, client)
                refused = await hooks.notify(
                    {"event": "test"}, {"webhook": f"http://127.0.0.1:{free_port()}/"}, {}, client)
                slow = await hooks.notify({"event": "test"},
                                          {"webhook": f"http://127.0.0.1:{port}/"}, {}, client,
                                          timeout=0.3)
                cmd_slow = await hooks.notify({"event": "test"}, {"command": "sleep 5"}, {},
                                              client, timeout=0.3)
        finally:
            server.close()
        return ok, refused, slow, cmd_slow

    ok, refused, slow, cmd_slow = asyncio.run(main())
    assert hooks.outcome(*ok["command"][:2]) == "ok"
    assert hooks.outcome(*refused["webhook"][:2]) == "error"
    assert hooks.outcome(*slow["webhook"][:2]) == "timeout"
    assert hooks.outcome(*cmd_slow["command"][:2]) == "timeout"


def test_the_metrics_count_each_delivery():
    from sidecar.metrics import Metrics
    m = Metrics()
    for hook, outcome in (("webhook", "ok"), ("webhook", "error"), ("webhook", "error"),
                          ("telegram", "timeout")):
        m.delivery(hook, outcome)
    text = m.render({})
    assert value(text, "neverdark_hook_deliveries_total", hook="webhook", outcome="ok") == 1
    assert value(text, "neverdark_hook_deliveries_total", hook="webhook", outcome="error") == 2
    assert value(text, "neverdark_hook_deliveries_total", hook="telegram", outcome="timeout") == 1


# --- the setting ------------------------------------------------------------------------------

def test_settle_in_the_sidecar_config(tmp_path):
    path = write_config(tmp_path / "a")
    assert config.load(path).hooks.settle == 120.0
    doc = yaml.safe_load(path.read_text())
    doc["hooks"] = {"settle": 30}
    path.write_text(yaml.safe_dump(doc))
    cfg = config.load(path)
    assert cfg.hooks.settle == 30.0
    text, _ = config.dump(cfg)
    path.write_text(text)
    assert config.load(path).hooks.settle == 30.0
    doc["hooks"] = {"settle": -1}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(config.ConfigError, match=r"hooks\.settle: must be >= 0"):
        config.load(path)
