"""Per-wizard state files: round trip, atomic replacement, mode 0600, strict JSON both ways.
(Which of the file and the active config wins at start is the policy's: tests/test_policy.py.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

from sidecar import state
from sidecar.config import ProbeSettings
from sidecar.policy import Policy

CHAIN = ("claude", "local")
WALL = 1_700_000_000.0


def busy_policy() -> Policy:
    p = Policy(CHAIN, ProbeSettings(fall=1), "claude", 100.0)
    for b in CHAIN:
        p.observe(b, True, "ok", 101.0)
        p.observe(b, True, "ok", 102.0)
    p.observe("claude", False, "rate_limited", 103.0, retry_after=30)
    p.commit(p.decide(103.0), 103.0, True, "ok", wall=WALL + 103)
    p.pin("local", 104.0)
    return p


def snap(p: Policy) -> dict:
    return p.snapshot(104.0, WALL + 104, "boot")


def test_round_trip_restores_the_same_policy(tmp_path):
    p = busy_policy()
    path = state.save(tmp_path / "state", "merlin", snap(p))
    assert path == tmp_path / "state" / "merlin.json"
    doc = state.load(tmp_path / "state", "merlin")
    assert doc["active"] == "local" and doc["why"].startswith("claude: rate limited")
    q = Policy(CHAIN, ProbeSettings(fall=1), "claude", 0.0)
    q.restore(doc, 104.0, WALL + 104, "boot")
    assert snap(q) == snap(p)


def test_file_is_0600_and_leaves_no_temp_files(tmp_path):
    d = tmp_path / "state"
    for i in range(3):
        state.save(d, "merlin", snap(busy_policy()))
    assert [p.name for p in d.iterdir()] == ["merlin.json"]
    assert stat.S_IMODE((d / "merlin.json").stat().st_mode) == 0o600


def test_transitions_kept_to_the_last_50(tmp_path):
    p = Policy(CHAIN, ProbeSettings(fall=1, rise=1, min_dwell=0, damping_base=0, damping_cap=0),
               "claude", 0.0)
    now = 0.0
    for i in range(80):
        now += 1
        bad, good = ("claude", "local") if i % 2 == 0 else ("local", "claude")
        p.observe(bad, False, "refused", now)
        p.observe(good, True, "ok", now)
        d = p.decide(now)
        p.commit(d, now, True)
    state.save(tmp_path, "w", p.snapshot(now, now, None))
    doc = state.load(tmp_path, "w")
    assert len(doc["transitions"]) == 50 and doc["transitions"][-1]["at"] == now


def _hammer(d, n):
    for i in range(n):
        doc = snap(busy_policy())
        doc["why"] = "x" * (i * 997 % 20000)  # sizes vary, so a torn write would show
        state.save(d, "merlin", doc)


def test_readers_never_see_a_partial_file(tmp_path):
    state.save(tmp_path, "merlin", snap(busy_policy()))
    writer = multiprocessing.get_context("fork").Process(target=_hammer, args=(tmp_path, 300))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        doc = json.loads((tmp_path / "merlin.json").read_bytes())  # raises on a torn file
        assert doc["wizard"] == "merlin"
        reads += 1
    writer.join()
    assert writer.exitcode == 0 and reads > 0


def test_unreadable_or_foreign_state_is_ignored(tmp_path):
    (tmp_path / "merlin.json").write_text("{not json")
    assert state.load(tmp_path, "merlin") is None
    (tmp_path / "merlin.json").write_text(json.dumps({"format": 1, "wizard": "morgana"}))
    assert state.load(tmp_path, "merlin") is None
    assert state.load(tmp_path, "absent") is None


def test_strict_json_both_ways(tmp_path):
    """NaN and Infinity are never written (the write fails, the old file stays), and a file
    holding them (or a number out of range) reads as unreadable, not as a policy with inf in it."""
    state.save(tmp_path, "merlin", snap(busy_policy()))
    before = (tmp_path / "merlin.json").read_bytes()
    bad = snap(busy_policy())
    bad["health"]["claude"]["held_until"] = float("inf")
    try:
        state.save(tmp_path, "merlin", bad)
    except ValueError:
        pass
    else:
        raise AssertionError("an Infinity was written")
    assert (tmp_path / "merlin.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["merlin.json"]
    assert state.load(tmp_path, "merlin") is not None
    for token in ("NaN", "Infinity", "-Infinity", "1e999"):
        text = before.decode().replace('"streak": 0', f'"streak": {token}')
        assert token in text
        (tmp_path / "merlin.json").write_text(text)
        assert state.load(tmp_path, "merlin") is None, token
