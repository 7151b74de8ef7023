"""Model servers neverdark does not run, as first-class backends: `provider: ollama` (and
`openai` against any OpenAI-compatible local URL) with no key, an optional memory_mb counted in
the host's budget, and a probe that checks the model is there and really serves the context
Hermes is told. Against a stand-in that speaks Ollama's real API on loopback, and the real
Hermes gateway."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from neverdark import memory_fit
from neverdark.inventory import InventoryError, validate
from neverdark.plan import hermes_spec, sidecar_config_for
from sidecar.config import BackendConfig
from sidecar.probes import probe
from testbed.ollama_standin import OllamaStandIn

INVENTORY = """\
secrets: {file: secrets.env}
hosts:
  box: {address: 10.0.0.7, profile: pi, ssh: {user: pi, sudo: true}, memory_mb: 8192, cores: 4}
wizards:
  merlin:
    host: box
    backends:
      - {name: claude, provider: anthropic, model: claude-sonnet-4-5,
         api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}
      - {name: qwen, provider: ollama, model: "qwen2.5:0.5b", context_length: 65536,
         memory_mb: 900}
      - {name: vllm, provider: openai, model: small, base_url: "http://127.0.0.1:8000/v1",
         context_length: 65536, memory_mb: 1200}
"""
SECRETS = "ANTHROPIC_API_KEY=sk-ant-api03-test-0123456789\nNEVERDARK_API_KEY_MERLIN=merlin-api-key-0123456789\n"


def write(tmp_path: Path, text: str = INVENTORY) -> Path:
    (tmp_path / "secrets.env").write_text(SECRETS)
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_keyless_external_servers_validate_and_count_in_the_budget(tmp_path):
    fleet = validate(write(tmp_path), env={})
    qwen, vllm = fleet.wizards["merlin"].backends[1:]
    assert qwen.api_key is None and vllm.api_key is None
    assert qwen.base_url == "http://127.0.0.1:11434"          # Ollama's documented default
    assert fleet.base_url("merlin", qwen) == "http://127.0.0.1:11434/v1"
    budget = dict(memory_fit.memory_budget(fleet, "box"))
    assert budget["model server at http://127.0.0.1:11434 (declared)"] == 900
    assert budget["model server at http://127.0.0.1:8000/v1 (declared)"] == 1200


def test_a_cloud_api_still_needs_its_key(tmp_path):
    path = write(tmp_path, INVENTORY.replace("         api_key: {secret: ANTHROPIC_API_KEY}, ",
                                             "         "))
    with pytest.raises(InventoryError) as err:
        validate(path, env={})
    assert "wizards.merlin.backends[0].api_key: required for provider anthropic" in str(err.value)


def test_hermes_and_the_sidecar_get_the_openai_url_and_no_key(tmp_path):
    fleet = validate(write(tmp_path), env={})
    spec = hermes_spec(fleet, "merlin")
    from neverdark import hermes_config as hc
    variant = yaml.safe_load(hc.render_variant(spec, "qwen"))["model"]
    assert variant["provider"] == "custom" and variant["base_url"] == "http://127.0.0.1:11434/v1"
    assert variant["api_key"] == hc.LOCAL_API_KEY
    env = hc.render_env(spec, {n: fleet.secret(n) for n in hc.secret_names(spec)})
    assert "QWEN" not in env and "VLLM" not in env
    b = sidecar_config_for(fleet, "box").wizards["merlin"].backend("qwen")
    assert (b.kind, b.api_key, b.api_key_env, b.context_length) == ("ollama", None, None, 65536)


def backend(root: str, model: str = "qwen2.5:0.5b", context: int = 65536) -> BackendConfig:
    return BackendConfig(name="qwen", kind="ollama", base_url=f"{root}/v1", model=model,
                         api_key=None, variant=Path("/x.yaml"), context_length=context)


def run_probe(b: BackendConfig, deep: bool = False):
    async def go():
        async with httpx.AsyncClient() as client:
            return await probe(b, client, 5.0, deep=deep)
    return asyncio.run(go())


def test_probe_refuses_an_ollama_model_at_its_default_context():
    with OllamaStandIn({"qwen2.5:0.5b": {}}) as ollama:
        r = run_probe(backend(ollama.root))
        assert not r.ok and r.reason == "context_too_small", r
        assert "4096" in r.detail and "65536" in r.detail and "num_ctx" in r.detail


def test_probe_reads_num_ctx_and_what_the_loaded_model_really_has():
    with OllamaStandIn({"qwen2.5:0.5b": {"num_ctx": 65536}}) as ollama:
        r = run_probe(backend(ollama.root))
        assert r.ok, r
        ollama.load("qwen2.5:0.5b", context=8192)     # loaded smaller by someone's request
        r = run_probe(backend(ollama.root))
        assert not r.ok and r.reason == "context_too_small" and "/api/ps" in r.detail, r


def test_probe_says_when_the_model_is_not_pulled():
    with OllamaStandIn({"llama3.2:1b": {"num_ctx": 131072}}) as ollama:
        r = run_probe(backend(ollama.root))
        assert not r.ok and "not pulled" in r.detail and "ollama pull qwen2.5:0.5b" in r.detail


def test_deep_probe_is_a_real_generation_and_gone_server_is_refused():
    with OllamaStandIn({"qwen2.5:0.5b": {"num_ctx": 65536}}) as ollama:
        r = run_probe(backend(ollama.root), deep=True)
        assert r.ok and ollama.chats and ollama.chats[-1]["max_tokens"] == 1
        root = ollama.root
    r = run_probe(backend(root))
    assert not r.ok and r.reason == "refused"


def test_openai_compatible_server_that_says_its_context_is_checked():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class VLLM(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            body = json.dumps({"object": "list", "data": [
                {"id": "small", "object": "model", "max_model_len": 32768}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), VLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        b = BackendConfig(name="vllm", kind="openai",
                          base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                          model="small", api_key=None, variant=Path("/x"), context_length=65536)
        r = run_probe(b)
        assert not r.ok and r.reason == "context_too_small" and "max_model_len" in r.detail
        r = run_probe(BackendConfig(**{**b.__dict__, "context_length": 32768}))
        assert r.ok, r
    finally:
        server.shutdown()
        server.server_close()


def test_real_gateway_answers_through_ollama_with_no_key(tmp_path):
    """The deployed variant for an Ollama backend, through the real Hermes gateway: the turn
    reaches the stand-in's OpenAI route, with no key of any other backend."""
    from testbed.hermes_gateway import Gateway
    from testbed.llmock import LLMock, free_port
    with OllamaStandIn({"qwen2.5:0.5b": {"num_ctx": 65536}}) as ollama:
        mock = LLMock(tmp_path)
        try:
            text = INVENTORY.replace("memory_mb: 900}", f"memory_mb: 900, base_url: "
                                     f"\"{ollama.root}\"}}")
            text = text.replace("      - {name: claude, provider: anthropic, model: claude-sonnet-4-5,",
                                f"      - {{name: claude, provider: anthropic, base_url: "
                                f"\"{mock.anthropic_base}\", model: claude-sonnet-4-5,")
            fleet = validate(write(tmp_path, text), env={})
            spec = {**hermes_spec(fleet, "merlin"), "api_port": free_port()}
            secrets = {"ANTHROPIC_API_KEY": fleet.secret("ANTHROPIC_API_KEY"),
                       "NEVERDARK_API_KEY_MERLIN": fleet.secret("NEVERDARK_API_KEY_MERLIN")}
            gw = Gateway.for_wizard(tmp_path / "gw", spec, secrets)
            try:
                gw.activate("qwen")
                r = gw.post([{"role": "user", "content": "Hello?"}],
                            session=f"nd-{uuid.uuid4().hex[:12]}")
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == ollama.answer
                assert ollama.chats and ollama.chats[-1]["model"] == "qwen2.5:0.5b"
                assert not [q for q in mock.requests() if q["method"] == "POST"]
            finally:
                gw.stop()
        finally:
            mock.stop()

