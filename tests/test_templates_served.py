"""Each model served with its own chat template (issue 17), on the real engines started with the
units' own command lines (neverdark.engines through testbed.localserver), the requests those of
the real Hermes gateway configured as the deploy configures a wizard (testbed.template_serving).

The models are copies of the test model with a published template in their GGUF
(testbed.template_models): Gemma 3's (no system role: the system prompt is folded into the
first user turn; no tools) and Qwen 2.5's (a system turn, tools in <tools></tools>, Hermes-style
<tool_call> answers). What reaches the model is read from the engine's own rendering
(llama-server's POST /apply-template) and its own token counts, not from our template code.
"""

from __future__ import annotations

import json

import httpx
import pytest

from neverdark import hermes_config as hc
from testbed import template_serving as ts
from testbed.wait import NotReady
from tests.test_hermes_config import require_hermes

GEMMA, QWEN = "gemma3-it", "qwen2.5-instruct"


@pytest.fixture(scope="module")
def bodies(tmp_path_factory):
    require_hermes()
    return ts.hermes_bodies(tmp_path_factory.mktemp("templates-hermes"))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs, started = tmp_path_factory.mktemp("templates-engines"), {}
    try:
        for key in (("llama-server", GEMMA), ("llama-server", QWEN), ("llama-server", None),
                    ("llama-cpp-python", GEMMA)):
            started[key] = ts.serve(*key, logs)
        yield started
    except NotReady as e:
        pytest.fail(str(e))
    finally:
        for s in started.values():
            s.stop()


def assert_lean_system_prompt(text: str) -> None:
    assert ts.PERSONA in text                             # the persona
    assert hc.DEFAULT_NOTICE in text                      # the degraded-mode notice
    assert hc.BREVITY_HINT in text and hc.LEAN_PLATFORM_HINTS["api_server"] in text   # lean


def test_gemma_folds_the_system_prompt_into_the_first_user_turn(bodies, servers):
    body = bodies["local"]
    assert not body.get("tools") and body["messages"][0]["role"] == "system"
    prompt = ts.rendered(servers[("llama-server", GEMMA)], body)
    # (the template's <bos> is the BOS token llama-server adds itself, not text)
    assert prompt.startswith("<start_of_turn>user\n"), prompt[:200]
    assert "<start_of_turn>system" not in prompt and prompt.count("<start_of_turn>user") == 1
    user_turn = prompt[:prompt.index("<end_of_turn>")]
    assert_lean_system_prompt(user_turn)
    assert user_turn.rstrip().endswith(ts.QUESTION)
    assert prompt.endswith("<start_of_turn>model\n")
    assert "<|im_start|>" not in prompt                   # not chatml


def test_qwen_renders_the_chosen_toolsets_and_no_others(bodies, servers):
    body, full = bodies["tools"], bodies["full"]
    chosen = ts.tool_names(body)
    assert chosen and chosen < ts.tool_names(full), (chosen, ts.tool_names(full))
    prompt = ts.rendered(servers[("llama-server", QWEN)], body)
    system = prompt[:prompt.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\n")
    assert_lean_system_prompt(system)
    # (the block follows its own mention of "<tools></tools> XML tags")
    tools = system[system.rindex("<tools>"):system.rindex("</tools>")]
    for t in body["tools"]:
        assert f'"name": "{t["function"]["name"]}"' in tools
        assert json.dumps(t["function"]["description"])[:80] in tools   # the schema itself
    for other in ts.tool_names(full) - chosen:
        assert f'"name": "{other}"' not in prompt, other
    assert "<tool_call>" in system                            # how it is asked to call them


def test_tools_reach_a_model_only_through_jinja_and_a_tools_template(bodies, servers):
    body = ts.one_token_body(bodies["tools"])
    # Qwen's own template under --jinja takes them (and parses <tool_call> answers back)
    r = httpx.post(f"{servers[('llama-server', QWEN)].base_url}/chat/completions", json=body,
                   timeout=600)
    assert r.status_code == 200, r.text
    # chatml, for a GGUF without a template, runs without Jinja: llama-server refuses the
    # tools (as a server error, 500) rather than have them reach the model in a format nothing
    # parses back; validate refuses such a backend's `tools` before any request is sent
    chatml = servers[("llama-server", None)]
    r = httpx.post(f"{chatml.base_url}/chat/completions", json=body, timeout=600)
    assert r.status_code == 500 and "tools param requires --jinja flag" in r.text, r.text
    # and serves the lean request (no tools)
    prompt = ts.rendered(chatml, bodies["local"])
    assert prompt.startswith("<|im_start|>system\n") and "<tools>" not in prompt
    assert_lean_system_prompt(prompt[:prompt.index("<|im_end|>")])


def test_llama_cpp_python_serves_the_ggufs_own_template(bodies, servers):
    """It has no /apply-template: the prompt it counts is the Gemma rendering's, token for
    token, not chatml's."""
    body = ts.one_token_body(bodies["local"])
    native = servers[("llama-server", GEMMA)]
    gemma = ts.token_count(native, ts.rendered(native, body))
    chatml = ts.token_count(native, ts.rendered(servers[("llama-server", None)], body))
    r = httpx.post(f"{servers[('llama-cpp-python', GEMMA)].base_url}/chat/completions",
                   json=body, timeout=600)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == gemma != chatml, (gemma, chatml)
