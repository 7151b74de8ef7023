"""Both local model engines on the real test fleet (after tests/test_fleet_deploy.py and the
drills, on the same fleet): the capacity drill, each wizard's prefix kept by the engine after
the switch's check turn computed it, and the switch to the other engine, which must deploy,
converge to zero changes and pass the testinfra suite like the first.

The capacity drill: every wizard of vps1 (merlin and gandalf) pinned onto the one local model,
turns from both at once for NEVERDARK_CAPACITY_SECONDS (default 180): each gets answers, the
server's and the gateways' memory stay within what the memory fit granted them, and the host
never runs out of the memory it is held to.

The prefix: a switch onto the local model runs a check turn through the wizard's real gateway,
which computes the wizard's prompt prefix before any user arrives; a user's new conversation
afterwards costs only its own message, asserted from the engine's own counters (prompt tokens
evaluated and reused, /metrics), not wall time, on both engines: llama-server keeps the prefix
in the wizard's slot, llama-cpp-python in its RAM prompt cache while the other wizard uses the
one context.
"""

from __future__ import annotations

import json
import os
import shlex
import time

import pytest

from neverdark import contract, memory_fit
from sidecar.engine import EngineTotals, parse_metrics
from testbed.capacity import Drill

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

HOST, WIZARDS, MODEL = "vps1", ["gandalf", "merlin"], "gemma3-270m"
UNIT = contract.llama_unit(MODEL)
SECONDS = float(os.environ.get("NEVERDARK_CAPACITY_SECONDS", "180"))
FIRST_ENGINE = os.environ.get("NEVERDARK_TEST_ENGINE") or "llama-cpp-python"
OTHER_ENGINE = "llama-server" if FIRST_ENGINE == "llama-cpp-python" else "llama-cpp-python"


def record(bed, name: str, figures: dict) -> None:
    path = bed.run_dir / "engine-report.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=2))
    print(f"\n{name}: {json.dumps(figures)}")


def cli(bed, *args: str) -> dict:
    proc = bed.neverdark(*args)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def engine_totals(bed, port: int = contract.LLAMA_PORT_BASE) -> EngineTotals:
    """The local server's own counters (both engines: llama.cpp's /metrics names)."""
    script = ("import sys,urllib.request as u;"
              "print(u.urlopen(sys.argv[1],timeout=30).read().decode())")
    return parse_metrics(bed.ssh(HOST, f"python3 -c {shlex.quote(script)} "
                                       f"http://127.0.0.1:{port}/metrics"))


def switch_engine(bed, engine: str, **server) -> None:
    path = bed.write_inventory(bed.default_wizards(), bed.default_models(engine, **server))
    result = bed.deploy(path)
    assert result.rc == 0, result.output[-6000:]
    again = bed.deploy(path)
    assert again.rc == 0 and again.changed == 0, again.changed_ops
    unit = bed.ssh(HOST, f"systemctl cat {UNIT}")
    assert f"({MODEL}, {engine})" in unit, unit[:400]


def capacity(bed, engine: str) -> dict:
    fleet = bed.validated()
    for w in WIZARDS:
        answer = cli(bed, "pin", w, "--to", "local")
        assert answer["ok"], answer
    try:
        drill = Drill(bed, HOST, WIZARDS, SECONDS).run()
    finally:
        for w in WIZARDS:
            cli(bed, "release", w)
            cli(bed, "failover", w, "--to", "claude")
    s = drill.summary()
    model = fleet.models[MODEL]
    granted = memory_fit.server_mb(model, len(WIZARDS), fleet.memory)
    s["fit"] = {"server_mb": granted,
                "gateway_mb": {w: memory_fit.gateway_mb(fleet, w) for w in WIZARDS},
                "host_mb": fleet.hosts[HOST].memory_mb,
                "budget": dict(memory_fit.memory_budget(fleet, HOST))}
    record(bed, f"capacity {engine}", s)
    for w in WIZARDS:
        t = s["turns"][w]
        # Gemma 3 270M answers empty now and then and Hermes gives up after four tries: a few
        # turns may fail that way, never most of them.
        assert t["answered"] >= 3 and t["answered"] >= 0.7 * t["sent"], (w, t)
        # The local model answers; where it fails a turn (empty, say) Hermes' own per-turn
        # fallback may answer it from the wizard's chain, never often.
        assert t["by_model"].get(MODEL, 0) >= 0.9 * t["answered"], (w, t)
    assert s["peak_rss_mb"][UNIT] <= granted, (s["peak_rss_mb"][UNIT], granted)
    for w in WIZARDS:
        assert s["peak_rss_mb"][contract.wizard_unit(w)] <= memory_fit.gateway_mb(fleet, w), s
    if "cgroup" in s:
        assert s["cgroup"]["limit_hits"].get("oom_kill", 0) == 0, s["cgroup"]
    else:
        assert s["host_peak_rss_mb"] <= fleet.hosts[HOST].memory_mb, s
    return s


def check_turn_keeps_prefixes(bed, engine: str) -> dict:
    """Each wizard switched onto the local model (its check turn through the gateway), then a
    new conversation from each in turn: the engine evaluates the user's message, not the
    prefix, though the other wizard's check turn and conversation came in between."""
    figures = {}
    for w in WIZARDS:
        answer = cli(bed, "pin", w, "--to", "local")
        assert answer["ok"], answer
    try:
        for w in WIZARDS:
            before = engine_totals(bed)
            turn = bed.client(w).turn(f"{w}: a new conversation. What is the weather like?")
            time.sleep(1)   # the engine's totals close a request as its response ends
            d = engine_totals(bed) - before
            figures[w] = {"ok": turn.ok, "model": turn.model, "evaluated": d.prompt_tokens,
                          "cached": d.cached_tokens, "prefill_s": round(d.prefill_s, 2),
                          "wall_s": round(turn.latency, 2)}
    finally:
        for w in WIZARDS:
            cli(bed, "release", w)
            cli(bed, "failover", w, "--to", "claude")
    record(bed, f"prefix kept {engine}", figures)
    for w, f in figures.items():
        # What the engine did, whatever the small test model answered. The wizards' lean
        # prefix is ~450 tokens: a cold turn evaluates all of it at once. Warm, a turn
        # evaluates its own new part only, once per request (Hermes resends a request the
        # model answered empty, up to 3 times: measured 25-90 tokens a turn).
        assert f["cached"] > 300 and f["evaluated"] < 300, (w, f)
    return figures


def test_capacity_drill_first_engine(bed, first_deploy):
    bed.write_inventory(bed.default_wizards())
    capacity(bed, FIRST_ENGINE)


# Known defect, measured. The sidecar's pre-switch deep probe used to take a slot (a generation
# naming none gets the least recently used one); it no longer generates (sidecar/probes.py,
# tests/test_probes.py). What still makes merlin's next turn cold is not another request: the
# fleet's llama-server journal (2026-12-05) shows merlin's slot selected by its prefix (LCP
# similarity 0.943) and yet 447 tokens evaluated, 28 reused. Gemma 3's sliding-window layers
# (512 tokens, `swa_full: false`) keep too little to roll the slot back from the check turn's
# end to the shared system prompt. On the runner (2 slots, Hermes' lean system prompt, a check
# turn then a new conversation): 440 evaluated, 23 cached; with swa_full true 20 and 443.
# Strict: the day a fix lands this fails, and the marker goes.
SLOT_EVICTED = pytest.mark.xfail(strict=True, reason=(
    "llama-server: without swa_full, Gemma 3's sliding-window cache cannot roll a slot back "
    "from the check turn to the wizard's prefix (the slot is the right one)"))


def known(engine: str):
    return SLOT_EVICTED if engine == "llama-server" else (lambda test: test)


@known(FIRST_ENGINE)
def test_the_check_turn_leaves_each_prefix_cached_first_engine(bed, first_deploy):
    check_turn_keeps_prefixes(bed, FIRST_ENGINE)


def test_other_engine_deploys_converges_and_passes_testinfra(bed, first_deploy):
    switch_engine(bed, OTHER_ENGINE)
    proc = bed.testinfra()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_capacity_drill_other_engine(bed, first_deploy):
    capacity(bed, OTHER_ENGINE)


@known(OTHER_ENGINE)
def test_the_check_turn_leaves_each_prefix_cached_other_engine(bed, first_deploy):
    check_turn_keeps_prefixes(bed, OTHER_ENGINE)
