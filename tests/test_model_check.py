"""`neverdark model check`: the wizard's real prompt from real Hermes, measured on a real llama
server (Gemma 3 270M on neverdark's launcher), the result file the sidecar exports, the CLI's
table and verdict.

Needs Hermes (NEVERDARK_HERMES_BIN, default .venv-hermes) and llama-cpp-python[server]: a missing
one fails the test, saying how to install it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from neverdark import contract
from neverdark import hermes_config as hc
from neverdark.models import check, speed
from sidecar import config, model_check_metrics, modelcheck
from sidecar.metrics import Metrics
from testbed import runtimes
from testbed.llmock import free_port
from testbed.metrics_text import value

PERSONA = "You are Merlin, the fleet's wizard. Sign every answer with a star."


def hermes_python() -> str:
    python = runtimes.HERMES_BIN.parent / "python"
    if not python.exists():
        pytest.fail(f"Hermes not found at {runtimes.HERMES_BIN}: set NEVERDARK_HERMES_BIN or "
                    + runtimes.INSTALL_HINT)
    return str(python)


def wizard_doc(local_url: str) -> dict:
    return {"name": "merlin", "api_port": free_port(), "api_key_secret": "MERLIN_API",
            "telegram_token_secret": None, "telegram_allowed_users": [], "persona": PERSONA,
            "notice": None,
            "backends": [
                {"name": "claude", "kind": "anthropic", "model": "claude-test",
                 "base_url": f"http://127.0.0.1:{free_port()}/anthropic",
                 "api_key_secret": "ANTHROPIC_MERLIN", "context_length": 200000, "max_tokens": 512},
                {"name": "local", "kind": "local", "model": "gemma3-270m", "base_url": local_url,
                 "api_key_secret": None, "context_length": 65536, "max_tokens": 256}]}


def write_host(root: Path, local_url: str) -> Path:
    """A wizard's home and variants as the deploy renders them, and the sidecar's config."""
    wizard = wizard_doc(local_url)
    home = root / "home"
    home.mkdir(mode=0o700)
    (home / "config.yaml").write_text(hc.render_base_config(wizard))
    (home / "SOUL.md").write_text(hc.render_soul(wizard))
    variants = root / "backends"
    variants.mkdir()
    for b in wizard["backends"]:
        (variants / f"{b['name']}.yaml").write_text(hc.render_variant(wizard, b["name"]))
    env = root / "sidecar.env"
    env.write_text("API_KEY_MERLIN=nd-api-key-model-check-0000001\n"
                   "KEY_MERLIN__CLAUDE=sk-ant-model-check-test-0001\n")
    os.chmod(env, 0o600)
    doc = {"listen": f"127.0.0.1:{free_port()}", "control_socket": str(root / "control.sock"),
           "state_dir": str(root / "state"), "secrets_file": str(env),
           "model_check_dir": str(root / "model-check"),
           "wizards": {"merlin": {
               "unit": "neverdark-wizard-merlin.service", "api_port": wizard["api_port"],
               "api_key_env": "API_KEY_MERLIN", "home": str(home),
               "active_config": str(root / "managed" / "config.yaml"),
               "backends": [
                   {"name": "claude", "kind": "anthropic", "base_url": wizard["backends"][0]["base_url"],
                    "model": "claude-test", "api_key_env": "KEY_MERLIN__CLAUDE",
                    "variant": str(variants / "claude.yaml")},
                   {"name": "local", "kind": "local", "base_url": local_url, "model": "gemma3-270m",
                    "variant": str(variants / "local.yaml")}]}}}
    path = root / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from testbed.llama_server import LlamaServer, LlamaServerError
    try:
        server = LlamaServer(tmp_path_factory.mktemp("llama"), n_ctx=8192, prompt_tokens=4096)
    except LlamaServerError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def checked(llama, tmp_path_factory):
    """One real check of merlin's local backend, as root would run it (here: as ourselves), with
    a budget no 270M on two shared cores meets in a warm turn (0.05 s): exit 1, over."""
    root = tmp_path_factory.mktemp("host")
    cfg_path = write_host(root, llama.base_url)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = modelcheck.main(["merlin", "--budget", "0.05", "--config", str(cfg_path),
                              "--hermes-python", hermes_python(), "--lib",
                              str(Path(modelcheck.__file__).resolve().parent.parent)])
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.strip()]
    return rc, lines, config.load(cfg_path)


def test_the_check_sends_the_wizards_real_prompt_from_hermes(llama, tmp_path):
    cfg = config.load(write_host(tmp_path, llama.base_url))
    w = cfg.wizards["merlin"]
    body = modelcheck.capture_prompt(w, w.backend("local"), hermes_python=hermes_python(),
                                     lib=str(Path(modelcheck.__file__).resolve().parent.parent))
    system = body["messages"][0]
    assert system["role"] == "system"
    assert PERSONA in system["content"]                  # SOUL.md, as Hermes reads it
    assert hc.DEFAULT_NOTICE.split(".")[0] in system["content"], system["content"][:2000]
    assert body["messages"][-1] == {"role": "user", "content": "Hello, are you there?"}
    assert body["model"] == "gemma3-270m" and body["stream"] is True
    # The wizard's home is only read: Hermes ran on a scratch copy.
    assert sorted(p.name for p in w.home.iterdir()) == ["SOUL.md", "config.yaml"]


def test_a_check_measures_cold_and_warm_on_the_real_engine(checked):
    rc, lines, cfg = checked
    assert rc == 1, lines                               # over the 0.05 s budget
    [r] = lines
    assert r["ok"] and r["wizard"] == "merlin" and r["backend"] == "local", r
    assert r["within_budget"] is False and r["budget_s"] == 0.05
    c = r["completions"]
    # cold: the whole prompt evaluated (the marker made it new); warm: the real prompt, which
    # the prime evaluated, reused from the cache, only the prime's answer and the new turn new.
    assert c["cold"]["prompt_tokens"] >= 300 and c["cold"]["cached_tokens"] == 0, c["cold"]
    real = c["prime"]["prompt_tokens"] + c["prime"]["cached_tokens"]
    assert c["warm"]["cached_tokens"] >= real - 1, c
    assert c["warm"]["prompt_tokens"] < 150, c["warm"]
    assert r["first_token_s"]["warm"] < r["first_token_s"]["cold"], r["first_token_s"]
    assert r["rates_from"] == {"prefill": "engine", "decode": "engine"}
    assert 5 < r["prefill_tokens_per_s"] < 20000 and 0.5 < r["decode_tokens_per_s"] < 2000, r
    # The report rounds the rate to 0.01 tok/s and the turn to 0.01 s: at a slow decode (a
    # loaded runner: 3-5 tok/s) the rate's rounding alone moves ANSWER_TOKENS / rate by more
    # than the turn's, so the tolerance carries both.
    decode = r["decode_tokens_per_s"]
    assert r["warm_turn_s"] == pytest.approx(
        r["first_token_s"]["warm"] + contract.ANSWER_TOKENS / decode,
        abs=0.006 + contract.ANSWER_TOKENS * 0.005 / (decode - 0.005) ** 2)


def test_the_result_is_left_for_the_sidecar_and_exported(checked):
    rc, [r], cfg = checked
    path = cfg.model_check_dir / "merlin.json"
    assert r["path"] == str(path)
    assert path.stat().st_mode & 0o777 == modelcheck.RESULT_MODE
    saved = json.loads(path.read_text())
    assert saved["warm_turn_s"] == r["warm_turn_s"]
    text = Metrics().render({}, model_check_metrics.families(cfg.model_check_dir, ["merlin"]))
    mc = "neverdark_model_check_"
    assert value(text, mc + "first_token_seconds", wizard="merlin", backend="local",
                 cache="cold") == r["first_token_s"]["cold"]
    assert value(text, mc + "within_budget", wizard="merlin", backend="local") == 0
    assert value(text, mc + "timestamp_seconds", wizard="merlin", backend="local") \
        == r["timestamp"]
    # a wizard no longer served here is not exported
    assert model_check_metrics.families(cfg.model_check_dir, ["gandalf"]) == []


def test_unreadable_or_foreign_results_are_not_exported(tmp_path):
    (tmp_path / "merlin.json").write_text("{not json")
    (tmp_path / "gandalf.json").write_text(json.dumps({"wizard": "saruman", "backend": "x"}))
    assert model_check_metrics.families(tmp_path, ["merlin", "gandalf", "absent"]) == []


def test_the_cli_table_and_verdict():
    r = {"ok": True, "wizard": "merlin", "host": "pi1", "backend": "local", "model": "gemma",
         "platform": "telegram", "prompt_tokens": 1735, "answer_tokens": 60, "budget_s": 10.0,
         "first_token_s": {"cold": 512.0, "warm": 26.0}, "prefill_tokens_per_s": 3.4,
         "decode_tokens_per_s": 1.2, "rates_from": {"prefill": "engine", "decode": "engine"},
         "warm_turn_s": 76.0, "within_budget": False}
    lines = check.table(r)
    assert lines[0] == "merlin on pi1: backend local (gemma), telegram prompt of 1735 tokens"
    assert lines[-1].split() == ["verdict", "OVER", "the", "10", "s", "budget"]
    assert not check.passed(r) and check.passed(dict(r, within_budget=True))
    failed = {"ok": False, "wizard": "merlin", "host": "pi1", "error": "unreachable"}
    assert check.table(failed) == ["merlin on pi1: model check FAILED: unreachable"]
    assert not check.passed(failed)
    cmd = check.host_command(["merlin"], 12.5, "local", "telegram")
    assert cmd.endswith("-m sidecar.modelcheck merlin --budget 12.5 --platform telegram "
                        "--backend local")


def test_the_budget_and_answer_length_have_one_source():
    assert speed.BUDGET_S == contract.INTERACTIVE_BUDGET_S == 10.0
    assert speed.ANSWER_TOKENS == contract.ANSWER_TOKENS
    assert config.SidecarConfig.__dataclass_fields__["model_check_dir"].default == \
        Path(contract.MODEL_CHECK_DIR)


def test_the_sidecar_config_carries_a_model_check_dir_only_when_not_the_default(tmp_path):
    cfg = config.load(write_host(tmp_path, "http://127.0.0.1:9/v1"))
    assert cfg.model_check_dir == tmp_path / "model-check"
    text, _ = config.dump(cfg)
    assert yaml.safe_load(text)["model_check_dir"] == str(tmp_path / "model-check")
    text, _ = config.dump(replace(cfg, model_check_dir=Path(contract.MODEL_CHECK_DIR)))
    assert "model_check_dir" not in yaml.safe_load(text)
    bad = tmp_path / "bad.yaml"
    bad.write_text((tmp_path / "sidecar.yaml").read_text().replace(
        str(tmp_path / "model-check"), "relative/dir"))
    with pytest.raises(config.ConfigError, match="model_check_dir: must be an absolute path"):
        config.load(bad)


def test_the_world_readable_result_holds_figures_not_the_models_answers(checked):
    """The answers are to the wizard's real prompt (persona, memories): the file keeps their
    length only."""
    _, [r], cfg = checked
    saved = json.loads((cfg.model_check_dir / "merlin.json").read_text())
    for c in saved["completions"].values():
        assert "text" not in c and c["answer_chars"] >= 0, c
