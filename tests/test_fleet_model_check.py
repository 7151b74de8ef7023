"""`neverdark model check` on the real test fleet (vps1, x86_64): the operator's command over SSH,
Hermes run as the wizard's user to build its prompt, the host's own llama server measured, the
result file left for the sidecar and exported on its /metrics.

On the same fleet as tests/test_fleet_deploy.py (the `bed` and `first_deploy` fixtures).
"""

from __future__ import annotations

import json

import pytest

from neverdark import contract
from testbed.metrics_text import value

pytestmark = pytest.mark.fleet
MC = "neverdark_model_check_"


def metrics(bed, host: str) -> str:
    return bed.sidecar_get(host, "/metrics")


def test_model_check_measures_merlins_fallback_on_its_host(bed, first_deploy):
    proc = bed.neverdark("model", "check", "merlin", "--budget", "3600", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [r] = json.loads(proc.stdout)
    assert r["ok"] and r["host"] == "vps1" and r["backend"] == "local", r
    assert r["within_budget"] is True and r["budget_s"] == 3600
    c = r["completions"]
    assert c["cold"]["prompt_tokens"] >= 300, c      # the wizard's whole prompt, evaluated
    real = c["prime"]["prompt_tokens"] + c["prime"]["cached_tokens"]
    # its prefix reused: all but the few tokens where the primed answer meets the new turn,
    # which the engine may tokenize again (the fleet measured 465 of 470 reused)
    assert c["warm"]["cached_tokens"] >= real - 32 and c["warm"]["prompt_tokens"] < 150, c
    # The engine's own prefill time (a wait for the engine, which another request on a shared
    # server can cause, is outside it): a few new tokens against the whole prompt.
    assert c["warm"]["prompt_ms"] < c["cold"]["prompt_ms"], c
    assert r["path"] == f"{contract.MODEL_CHECK_DIR}/merlin.json"
    mode = bed.ssh("vps1", f"stat -c '%a %U' {contract.MODEL_CHECK_DIR}/merlin.json").split()
    assert mode == ["644", "root"], mode
    text = metrics(bed, "vps1")
    assert value(text, MC + "within_budget", wizard="merlin", backend="local") == 1.0, text
    assert value(text, MC + "first_token_seconds", wizard="merlin", backend="local",
                 cache="warm") is not None, text
    print("model check vps1:", json.dumps({k: r[k] for k in (
        "prompt_tokens", "first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s",
        "warm_turn_s")}))

    # Over the budget: exit 1, the table says so, and the export follows the newest result.
    over = bed.neverdark("model", "check", "merlin", "--budget", "0.1")
    assert over.returncode == 1, over.stdout + over.stderr
    assert "verdict             OVER the 0.1 s budget" in over.stdout, over.stdout
    assert value(metrics(bed, "vps1"), MC + "within_budget", wizard="merlin",
                 backend="local") == 0.0
