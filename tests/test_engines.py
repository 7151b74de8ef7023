"""The engine choice per model: what each engine serves, what the inventory must say for
llama-server, the GGUF header it is checked against, and the units the plan renders."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from neverdark import contract, engines, gguf, model_sources, plan, topology
from neverdark.inventory import InventoryError, validate
from tests.test_inventory import GEMMA_SHA, line_of, write_inventory

BASE = f"""secrets: {{file: secrets.env}}
hosts:
  vps: {{address: 10.0.0.2, profile: vps, memory_mb: 4096, cores: 2}}
models:
  gemma:
    engine: ENGINE
    source: SOURCE
    size_mb: 253
    server: SERVER
    kv: {{layers: 18, kv_heads: 1, head_dim: 256, sliding_window_layers: 15, sliding_window: 512}}
wizards:
  merlin:
    host: vps
    backends:
      - {{name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {{secret: ANTHROPIC_API_KEY}}, context_length: 200000}}
      - {{name: local, local: gemma}}
  gandalf:
    host: vps
    backends:
      - {{name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {{secret: ANTHROPIC_API_KEY}}, context_length: 200000}}
      - {{name: local, local: gemma}}
"""
URL = f"{{url: 'https://example.net/gemma.gguf', sha256: {GEMMA_SHA}}}"
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-0123456789", "NEVERDARK_API_KEY_MERLIN": "m" * 20,
           "NEVERDARK_API_KEY_GANDALF": "g" * 20}


def inventory(engine="llama-server", source=URL, server="{threads: 2}", extra="") -> str:
    text = BASE.replace("ENGINE", engine).replace("SOURCE", source).replace("SERVER", server)
    return text.replace("    size_mb: 253\n", f"    size_mb: 253\n{extra}")


def problems(tmp_path, text) -> list[str]:
    path = write_inventory(tmp_path, text, SECRETS)
    with pytest.raises(InventoryError) as exc:
        validate(path, env={})
    return [str(p) for p in exc.value.problems]


def fake_gguf(path: Path, **meta) -> Path:
    """A GGUF header only (no tensors): what the checks read."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()
    items = b""
    kv = {"general.architecture": "gemma3", "gemma3.context_length": 32768,
          "gemma3.block_count": 18, "gemma3.attention.head_count_kv": 1,
          "gemma3.attention.key_length": 256, "gemma3.attention.sliding_window": 512, **meta}
    for k, v in kv.items():
        if isinstance(v, str):
            items += s(k) + struct.pack("<I", 8) + s(v)
        else:
            items += s(k) + struct.pack("<I", 4) + struct.pack("<I", v)
    # and an array the reader must skip: tokenizer strings
    items += s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("<bos>") + s("<eos>")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv) + 1) + items)
    return path


def test_gguf_header_is_read_without_the_tensors(tmp_path):
    info = gguf.read(fake_gguf(tmp_path / "m.gguf"))
    assert (info.architecture, info.context_length, info.block_count, info.head_count_kv,
            info.key_length, info.sliding_window) == ("gemma3", 32768, 18, 1, 256, 512)
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(gguf.GGUFError):
        gguf.read(tmp_path / "bad.gguf")


def test_llama_server_needs_a_context_hermes_accepts(tmp_path):
    """Gemma 3 270M was trained for 32K: llama-server caps each slot there, Hermes wants 64K."""
    text = inventory(extra="    training_context: 32768\n")
    found = problems(tmp_path, text)
    line = line_of(text, "engine: llama-server")
    assert len(found) == 1 and found[0].startswith(
        f"{tmp_path}/fleet.yaml:{line}: models.gemma.engine: llama-server serves at most 32768"), found
    assert "extend_context" in found[0] and "llama-cpp-python" in found[0]


def test_llama_server_context_unknown_for_a_url_source(tmp_path, monkeypatch):
    # a url source is read only when its file is already in the model cache: here it is not
    monkeypatch.setattr(model_sources, "CACHE", tmp_path / "cache")
    found = problems(tmp_path, inventory())
    assert any("models.gemma.training_context: unknown" in p for p in found), found


def test_extend_context_serves_n_ctx_with_an_override(tmp_path):
    text = inventory(server="{threads: 2, extend_context: true}",
                     extra="    training_context: 32768\n    architecture: gemma3\n")
    fleet = validate(write_inventory(tmp_path, text, SECRETS), env={})
    s, = topology.llama_servers(fleet, "vps")
    argv = engines.argv(s)
    assert argv[0] == engines.NATIVE_BINARY
    assert ["--ctx-size", "131072"] == argv[argv.index("--ctx-size"):][:2]
    assert ["--parallel", "2"] == argv[argv.index("--parallel"):][:2]
    assert "--override-kv" in argv and "gemma3.context_length=int:65536" in argv
    assert ["--cache-ram", "0"] == argv[argv.index("--cache-ram"):][:2]
    # chatml's end marker is text to Gemma's vocabulary: without it every answer runs to
    # max_tokens (measured on the fleet: 30 s turns)
    assert ["--reverse-prompt", "<|im_end|>"] == argv[argv.index("--reverse-prompt"):][:2]


def test_the_model_file_header_fills_in_and_checks_the_inventory(tmp_path):
    model = fake_gguf(tmp_path / "gemma.gguf")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    text = inventory(source=f"{{file: {model}, sha256: {sha}}}",
                     server="{threads: 2, extend_context: true}").replace("    size_mb: 253\n", "")
    fleet = validate(write_inventory(tmp_path, text, SECRETS), env={})
    assert (fleet.models["gemma"].training_context, fleet.models["gemma"].architecture) == (
        32768, "gemma3")
    wrong = text.replace("kv: {layers: 18", "kv: {layers: 26")
    found = problems(tmp_path, wrong)
    assert any("models.gemma.kv.layers: 26 does not match the model file's GGUF header (18)"
               in p for p in found), found


def test_llama_cpp_python_serves_n_ctx_whatever_the_training_context(tmp_path):
    text = inventory(engine="llama-cpp-python", extra="    training_context: 32768\n")
    fleet = validate(write_inventory(tmp_path, text, SECRETS), env={})
    s, = topology.llama_servers(fleet, "vps")
    argv = engines.argv(s)
    # The launcher package, found on the PYTHONPATH the unit's environment sets.
    assert argv[:3] == [engines.PYTHON, "-m", "llama_launcher"] and "--n_ctx" in argv
    env = engines.environment(s)
    assert env["PYTHONPATH"] == contract.LLAMA_LIB
    assert env["NEVERDARK_CACHE_BYTES"] == str(s.prompt_cache_bytes)


def test_the_plan_ships_the_verified_native_build(tmp_path, monkeypatch):
    build = tmp_path / "build"
    (build / "llama-server").mkdir(parents=True)
    stamp = {"files": {"llama-server/llama-server": {"sha256": "a" * 64, "bytes": 1},
                       "llama-server/libllama.so.0": {"sha256": "b" * 64, "bytes": 1},
                       "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl": {"sha256": "c" * 64,
                                                                             "bytes": 1}}}
    fake = types.SimpleNamespace(cached=lambda arch, parts: types.SimpleNamespace(
        dir=build, stamp=stamp) if arch == "x86_64" else None)
    monkeypatch.setitem(sys.modules, "neverdark.artifacts", fake)
    import neverdark
    monkeypatch.setattr(neverdark, "artifacts", fake, raising=False)
    text = inventory(server="{threads: 2, extend_context: true}",
                     extra="    training_context: 32768\n    architecture: gemma3\n")
    fleet = validate(write_inventory(tmp_path, text, SECRETS), env={})
    p = plan.host_plan(fleet, "vps")
    native = p["llama"]["native"]
    assert not p["llama"]["python"]
    assert [(f["name"], f["mode"]) for f in native["files"]] == [("libllama.so.0", "0644"),
                                                                  ("llama-server", "0755")]
    assert native["dir"].startswith(f"{contract.LLAMA_DIR}/{contract.LLAMA_SERVER_BUILD_PREFIX}")
    server, = p["llama"]["servers"]
    assert server["argv"][0] == native["binary"] and "--slot-save-path" not in server["argv"]
    # Nothing of the model server's is the sidecar's to read: not in its group.
    assert contract.LLAMA_USER not in p["sidecar"]["groups"]
    # A host whose arch has no build is told how to make one.
    fleet.hosts["vps"] = fleet.hosts["vps"].model_copy(update={"arch": "aarch64"})
    with pytest.raises(RuntimeError, match="neverdark.artifacts build --arch aarch64"):
        plan.host_plan(fleet, "vps")


def test_the_plan_uploads_the_llama_cpp_python_wheel_built_for_the_hosts_arch(tmp_path,
                                                                             monkeypatch):
    # llama-cpp-python has no wheel on any package index: a host left to pip would compile it
    # (or fail without a compiler). The plan uploads the operator's build for the host's arch.
    wheels = {arch: f"llama_cpp_python-0.3.36-py3-none-linux_{arch}.whl"
              for arch in ("x86_64", "aarch64")}
    sha = {"x86_64": "c" * 64, "aarch64": "d" * 64}

    def cached(arch, parts):
        return types.SimpleNamespace(dir=tmp_path, wheel=tmp_path / wheels[arch],
                                     stamp={"files": {wheels[arch]: {"sha256": sha[arch]}}})
    fake = types.SimpleNamespace(cached=cached)
    monkeypatch.setitem(sys.modules, "neverdark.artifacts", fake)
    import neverdark
    monkeypatch.setattr(neverdark, "artifacts", fake, raising=False)
    fleet = validate(write_inventory(tmp_path, inventory("llama-cpp-python"), SECRETS), env={})
    for arch in ("x86_64", "aarch64"):
        fleet.hosts["vps"] = fleet.hosts["vps"].model_copy(update={"arch": arch})
        llama = plan.host_plan(fleet, "vps")["llama"]
        wheel = llama["wheel"]
        assert llama["python"] and wheel["name"] == wheels[arch] and wheel["sha256"] == sha[arch]
        assert wheel["dir"] == f"{contract.LLAMA_DIR}/{contract.LLAMA_WHEEL_PREFIX}{sha[arch][:16]}"
        assert llama["requirements"] == [
            f"llama-cpp-python[server] @ file://{wheel['dir']}/{wheels[arch]}"]
    fake.cached = lambda arch, parts: None
    with pytest.raises(RuntimeError, match="no llama-cpp-python wheel built for aarch64"):
        plan.host_plan(fleet, "vps")


# --- the chat template each engine is started with ----------------------------------------------

@pytest.fixture
def no_model_cache(tmp_path, monkeypatch):
    # the url source is not on this machine, so its typed gguf_template is taken as it is
    monkeypatch.setattr(model_sources, "CACHE", tmp_path / "cache")


def served(tmp_path, engine: str, extra: str):
    text = inventory(engine=engine, server="{threads: 2, extend_context: true}",
                     extra="    training_context: 32768\n    architecture: gemma3\n" + extra)
    fleet = validate(write_inventory(tmp_path, text, SECRETS), env={})
    s, = topology.llama_servers(fleet, "vps")
    return s, engines.argv(s)


def test_a_models_own_template_runs_as_jinja_on_both_engines(tmp_path, no_model_cache):
    s, argv = served(tmp_path, "llama-server", "    gguf_template: chat\n")
    assert s.template == "model" and "--jinja" in argv
    for flag in ("--no-jinja", "--chat-template", "--reverse-prompt"):
        assert flag not in argv, argv
    # llama-cpp-python takes the GGUF's tokenizer.chat_template when given no chat format
    s, argv = served(tmp_path, "llama-cpp-python", "    gguf_template: tools\n")
    assert s.template == "model" and "--chat_format" not in argv, argv


def test_a_gguf_without_a_template_gets_chatml_explicitly(tmp_path, no_model_cache):
    s, argv = served(tmp_path, "llama-server", "    gguf_template: none\n")
    assert s.template == "chatml"
    assert argv[argv.index("--no-jinja"):][:3] == ["--no-jinja", "--chat-template", "chatml"]
    assert "--jinja" not in argv
    # Gemma's vocabulary has no <|im_end|>: the stop keeps chatml turns short
    assert ["--reverse-prompt", "<|im_end|>"] == argv[argv.index("--reverse-prompt"):][:2]
    s, argv = served(tmp_path, "llama-cpp-python", "    gguf_template: none\n")
    assert ["--chat_format", "chatml"] == argv[argv.index("--chat_format"):][:2]


def test_an_override_is_a_built_in_template_not_jinja_text(tmp_path, no_model_cache):
    # Under --jinja llama-server would take "llama3" as the template's own text.
    s, argv = served(tmp_path, "llama-server", "    gguf_template: tools\n    chat_format: llama3\n")
    assert (s.template, s.tools) == ("llama3", False)
    assert argv[argv.index("--no-jinja"):][:3] == ["--no-jinja", "--chat-template", "llama3"]
    assert "--jinja" not in argv and "--reverse-prompt" not in argv
    s, argv = served(tmp_path, "llama-cpp-python",
                     "    gguf_template: chat\n    chat_format: chatml-function-calling\n")
    assert ["--chat_format", "chatml-function-calling"] == argv[argv.index("--chat_format"):][:2]
