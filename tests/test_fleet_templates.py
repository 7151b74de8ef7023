"""Each model served with its own chat template on the real test fleet (issue 17).

vps1 serves two copies of the test model with a published template in their GGUF
(testbed.template_models): Gemma 3's on llama-cpp-python for merlin's local fallback, Qwen
2.5's (Hermes-style <tool_call>) on llama-server for gandalf's, which offers the memory and todo
toolsets. Deployed by the real deploy from `file` sources; checked from the units' command
lines, the engines' own renderings and counters on the host, and real turns through the
wizards' gateways: `neverdark drill merlin` answered by the Gemma copy, and a turn of gandalf's
pinned onto the Qwen copy, whose prompt (the engine's own count) carries the two toolsets'
schemas. What the renderings hold, token for token, is tests/test_templates_served.py's (the
same Hermes configuration, on the runner): here, that the deployed fleet serves it.
At the end the default inventory is deployed again.
"""

from __future__ import annotations

import json
import shlex

import pytest

from neverdark import contract
from testbed import template_models

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

HOST = "vps1"
GEMMA, QWEN = "gemma-it", "qwen-tools"
CHOSEN = ["memory", "todo"]


def models(bed) -> dict:
    out = bed.default_models()      # the test model stays for radagast on pi1
    for name, family, engine in ((GEMMA, "gemma3-it", "llama-cpp-python"),
                                 (QWEN, "qwen2.5-instruct", "llama-server")):
        m = template_models.build(family)
        server = {"threads": 2, **({"extend_context": True} if engine == "llama-server" else {})}
        out[name] = {"engine": engine, "source": {"file": str(m.path), "sha256": m.sha256},
                     "server": server, "hosts": [HOST]}
    return out


def wizards(bed) -> dict:
    w = bed.default_wizards()
    for wizard, model, tools in (("merlin", GEMMA, None), ("gandalf", QWEN, CHOSEN)):
        local = next(b for b in w[wizard]["backends"] if "local" in b)
        local["local"] = model
        if tools:
            local["tools"] = list(tools)
    return w


def neverdark_json(bed, *args: str) -> dict:
    proc = bed.neverdark(*args)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def host_http(bed, method: str, url: str, body: dict | None = None) -> str:
    """A request from the host itself (the servers listen on its loopback only)."""
    script = ("import sys,json,urllib.request as u;"
              "d=sys.argv[3].encode() if sys.argv[3] else None;"
              "r=u.Request(sys.argv[2],data=d,method=sys.argv[1],"
              "headers={'Content-Type':'application/json'});"
              "print(u.urlopen(r,timeout=120).read().decode())")
    return bed.ssh(HOST, f"python3 -c {shlex.quote(script)} {method} {shlex.quote(url)} "
                         f"{shlex.quote(json.dumps(body) if body else '')}")


@pytest.fixture(scope="module")
def templated(bed, first_deploy):
    path = bed.write_inventory(wizards(bed), models(bed))
    result = bed.deploy(path)
    assert result.rc == 0, result.output[-6000:]
    try:
        yield bed.validated(path)
    finally:
        restore = bed.deploy(bed.write_inventory(bed.default_wizards()))
        assert restore.rc == 0, restore.output[-6000:]


def test_the_units_serve_each_ggufs_own_template(bed, templated):
    ports = {m: templated.llama_port(HOST, m) for m in (GEMMA, QWEN)}
    qwen = bed.ssh(HOST, f"systemctl cat {contract.llama_unit(QWEN)}")
    assert "--jinja" in qwen and "--chat-template" not in qwen, qwen[-1500:]
    gemma = bed.ssh(HOST, f"systemctl cat {contract.llama_unit(GEMMA)}")
    assert "llama_launcher" in gemma and "--chat_format" not in gemma, gemma[-1500:]
    # llama-server's own rendering: Qwen's template (a system turn) with its tools block
    probe = {"messages": [{"role": "system", "content": "MARKER-SYSTEM"},
                          {"role": "user", "content": "hi"}],
             "tools": [{"type": "function", "function": {
                 "name": "probe_tool", "description": "d",
                 "parameters": {"type": "object", "properties": {}}}}]}
    prompt = json.loads(host_http(bed, "POST", f"http://127.0.0.1:{ports[QWEN]}/apply-template",
                                  probe))["prompt"]
    assert prompt.startswith("<|im_start|>system\nMARKER-SYSTEM") and "<tools>" in prompt
    assert '"name": "probe_tool"' in prompt and "<tool_call>" in prompt, prompt


def test_a_drill_onto_the_gemma_template_is_answered_by_the_model(bed, templated):
    bed.wait_healthy(HOST, "merlin", "local")     # the redeployed server may still be loading
    report = neverdark_json(bed, "drill", "merlin", "--turns", "1", "--json")
    assert report["ok"] and report["to"] == "local", json.dumps(report)[-4000:]
    assert [t["model"] for t in report["fallback_turns"]] == [GEMMA], report


def test_the_chosen_toolsets_reach_the_qwen_template_on_llama_server(bed, templated):
    port = templated.llama_port(HOST, QWEN)
    answer = neverdark_json(bed, "pin", "gandalf", "--to", "local")
    assert answer["ok"], answer
    try:
        turn = bed.client("gandalf").turn("gandalf: what can you do for me?")
        slots = json.loads(host_http(bed, "GET", f"http://127.0.0.1:{port}/slots"))
    finally:
        neverdark_json(bed, "release", "gandalf")
        neverdark_json(bed, "failover", "gandalf", "--to", "claude")
    # A request with tools to llama-server: without --jinja it would be refused (HTTP 500).
    assert turn.ok and turn.model == QWEN, turn
    # The engine's own count of the last request's prompt (gandalf's slot): the lean prompt
    # alone is ~500 tokens on this template; with the memory and todo schemas and Hermes' tool
    # guidance ~2,070 (docs/templates.md); with all 26 default schemas ~14,400.
    seen = [s["n_prompt_tokens"] for s in slots if s.get("n_prompt_tokens")]
    assert seen and 1500 < max(seen) < 5000, slots
