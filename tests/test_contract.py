"""One contract from inventory to sidecar: anything `neverdark validate` accepts, the sidecar
accepts, with every secret byte-for-byte what the operator's secrets file holds.

Every valid inventory in the test data is rendered host by host (`neverdark render`, the same
deployer code the deploy runs) and loaded back with the sidecar's own loader; the Hermes `.env`
files are read back with python-dotenv, as Hermes reads them.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from dotenv import dotenv_values
from hypothesis import given, settings
from hypothesis import strategies as st

from neverdark import contract, plan
from neverdark.backends import view
from neverdark.cli import main as cli
from neverdark.inventory import InventoryError, validate
from neverdark.render import render
from sidecar import config as sidecar_config

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "inventories"


def valid_inventories() -> list[tuple[Path, dict]]:
    """Every inventory in the test data (and the example) that validates, with its env."""
    found = []
    for path in sorted(DATA.glob("*.yaml")) + [REPO / "fleet.example.yaml"]:
        env = {}
        if path.name == "fleet.example.yaml" or path.name == "minimal.yaml":
            env = {"NEVERDARK_SECRETS": str(DATA / "contract_names.env")}
            env.update({n: "x" * 20 + n for n in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY",
                                                   "GOOGLE_API_KEY", "TELEGRAM_TOKEN_RADAGAST",
                                                   "TELEGRAM_TOKEN_ALERTS",
                                                   "NEVERDARK_API_KEY_MERLIN",
                                                   "NEVERDARK_API_KEY_GANDALF",
                                                   "NEVERDARK_API_KEY_RADAGAST")})
        try:
            validate(path, env=env)
        except InventoryError:
            continue
        found.append((path, env))
    return found


INVENTORIES = valid_inventories()


def test_the_test_data_has_the_hard_cases():
    names = [p.name for p, _ in INVENTORIES]
    assert "contract_names.yaml" in names and "fleet.example.yaml" in names, names


def file_secrets(env: dict, path: Path) -> dict[str, str]:
    fleet = validate(path, env=env)
    return {n: fleet.secret(n) for n in fleet.secret_names()}


@pytest.mark.parametrize("path,env", INVENTORIES, ids=[p.name for p, _ in INVENTORIES])
def test_every_rendered_host_loads_in_the_sidecar_with_exact_secrets(path, env, tmp_path,
                                                                     monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fleet = validate(path, env=os.environ)
    operator = {n: fleet.secret(n) for n in fleet.secret_names()}
    for host in fleet.hosts:
        out = tmp_path / host
        render(fleet, host, out)
        if not fleet.wizards_on(host):
            assert not (out / contract.SIDECAR_CONFIG.lstrip("/")).exists()
            continue
        cfg = sidecar_config.load(out / contract.SIDECAR_CONFIG.lstrip("/"), root=out)
        assert set(cfg.wizards) == set(fleet.wizards_on(host))
        for w in fleet.wizards_on(host):
            wz, got = fleet.wizards[w], cfg.wizards[w]
            assert got.api_key == operator[wz.api_server_key.secret]
            assert got.restart == wz.restart_on_switch
            assert got.unit == contract.wizard_unit(w)
            assert [b.name for b in got.backends] == [b.name for b in wz.backends]
            for b, gb in zip(wz.backends, got.backends):
                want = operator[b.api_key.secret] if hasattr(b, "api_key") else None
                assert gb.api_key == want, (w, b.name)
                assert (out / str(gb.variant).lstrip("/")).is_file()
            # Hermes reads .env with python-dotenv, interpolation on: the same bytes come out.
            env_file = out / f"{contract.wizard_home(w)}/.env".lstrip("/")
            assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
            hermes_env = dotenv_values(stream=io.StringIO(env_file.read_text()),
                                       interpolate=True)
            assert hermes_env["API_SERVER_KEY"] == operator[wz.api_server_key.secret]
            for b in wz.backends:
                if hasattr(b, "api_key") and b.provider == "openai":
                    assert hermes_env[contract.backend_key_env(w, b.name)] == \
                        operator[b.api_key.secret]
        if fleet.sidecar.hooks.telegram:
            assert cfg.secrets[cfg.hooks.telegram["token_env"]] == \
                operator[fleet.sidecar.hooks.telegram.token.secret]


def test_plan_builds_the_sidecar_classes_and_they_round_trip(tmp_path, monkeypatch):
    path = DATA / "contract_names.yaml"
    fleet = validate(path, env={})
    built = plan.sidecar_config_for(fleet, "vps.fra-1")
    out = tmp_path / "h"
    render(fleet, "vps.fra-1", out)
    loaded = sidecar_config.load(out / contract.SIDECAR_CONFIG.lstrip("/"), root=out)
    assert loaded.wizards == built.wizards
    assert loaded.probe == built.probe and loaded.hooks == built.hooks
    assert {k: loaded.secrets[k] for k in built.secrets} == built.secrets


def test_render_command_and_sidecar_check(tmp_path):
    out = tmp_path / "vps"
    env = {"NEVERDARK_INVENTORY": str(DATA / "contract_names.yaml"), "NEVERDARK_SECRETS": ""}
    result = CliRunner().invoke(cli, ["render", "vps.fra-1", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    manifest = (out / "MANIFEST").read_text()
    for needle in ("/etc/systemd/system/neverdark-wizard-merlin.service",
                   "/etc/systemd/system/neverdark-llama-gemma3-270m.q4_k_m.service",
                   "/etc/neverdark/wizards/merlin/backends/gpt-4.1.yaml",
                   "0600 hermes-merlin:hermes-merlin /var/lib/neverdark/wizards/merlin/home/.env",
                   "0600 neverdark-sidecar:neverdark-sidecar /etc/neverdark/sidecar.env",
                   "/opt/neverdark/llama/lib/llama_launcher/__main__.py",
                   "/opt/neverdark/llama/lib/llama_launcher/cache.py",
                   "/etc/neverdark/sidecar.sudoers"):
        assert needle in manifest, needle
    check = subprocess.run([sys.executable, "-m", "sidecar", "--check", "--config",
                            str(out / "etc/neverdark/sidecar.yaml"), "--root", str(out)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "valid (2 wizards" in check.stdout
    # A variant missing from the tree is an error naming the field.
    (out / "etc/neverdark/wizards/merlin/backends/gpt-4.1.yaml").unlink()
    check = subprocess.run([sys.executable, "-m", "sidecar", "--check", "--config",
                            str(out / "etc/neverdark/sidecar.yaml"), "--root", str(out)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 2 and "wizards.merlin.backends[0].variant" in check.stderr


# --- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt-4.1", "claude_s4.5", "a", "0day", "x" * 64])
def test_names_the_contract_accepts(name):
    assert contract.name_problem(name, "backend") is None


@pytest.mark.parametrize("name", ["", "Claude", "gpt 4", "../x", "-x", ".x", "a\n", "a/b", "ä",
                                  "$(id)", "x" * 65, 42, None])
def test_names_the_contract_refuses(name):
    assert contract.name_problem(name, "backend")


def test_wizard_names_fit_a_linux_user_and_units_fit_systemd():
    assert contract.name_problem("w" * contract.WIZARD_MAX, "wizard") is None
    assert "Linux user" in contract.name_problem("w" * (contract.WIZARD_MAX + 1), "wizard")
    assert len(contract.wizard_user("w" * contract.WIZARD_MAX)) <= contract.USER_MAX
    assert len(contract.llama_unit("m" * contract.NAME_MAX)) <= contract.UNIT_MAX


# --- the dotenv codec, against python-dotenv --------------------------------------------------

carriable = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0"),
                    max_size=60).filter(lambda v: "${" not in v)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True), carriable,
                       max_size=5))
def test_dotenv_writer_round_trips_through_python_dotenv_and_our_reader(values):
    text = contract.dotenv_dumps(values)
    assert dict(dotenv_values(stream=io.StringIO(text), interpolate=True)) == values
    assert contract.dotenv_loads(text) == values


@pytest.mark.parametrize("text", [
    "A=plain # comment\n", "B='single # not comment'\n", 'C="line\\nbreak"\n', "export D=\n",
    "E=x#y\n", "F='it\\'s'\n", 'G="dq \\"q\\" \\\\ \\t"\n', "H=  spaced  \n", "I='a\\\\b'\n",
    'J="back\\\\slash"\n', "# just a comment\n\nK=v\n"])
def test_our_reader_reads_what_python_dotenv_reads(text):
    assert contract.dotenv_loads(text) == dict(dotenv_values(stream=io.StringIO(text),
                                                              interpolate=False))


@pytest.mark.parametrize("value", ["two\nlines", "nul\0", "cr\r", "sk-${HOME}"])
def test_dotenv_writer_refuses_what_it_cannot_carry_without_echoing_it(value):
    with pytest.raises(contract.DotenvError) as err:
        contract.dotenv_dumps({"K": value})
    assert value not in str(err.value)


def test_validate_refuses_a_secret_hermes_would_expand(tmp_path):
    inv = (DATA / "minimal.yaml").read_text()
    (tmp_path / "fleet.yaml").write_text(inv)
    (tmp_path / "secrets.env").write_text(
        "ANTHROPIC_API_KEY='sk-${HOME}'\nNEVERDARK_API_KEY_MERLIN=0123456789abcdef0123\n")
    with pytest.raises(InventoryError) as err:
        validate(tmp_path / "fleet.yaml", env={})
    assert "ANTHROPIC_API_KEY" in str(err.value) and "sk-${HOME}" not in str(err.value)


# --- the URL-root rule ------------------------------------------------------------------------

@pytest.mark.parametrize("base_url,root", [
    ("http://127.0.0.1:8081/v1", "http://127.0.0.1:8081"),
    ("http://127.0.0.1:8081/v1/", "http://127.0.0.1:8081"),
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
    ("http://10.0.0.9:8080/api/v1", "http://10.0.0.9:8080/api"),
    ("https://generativelanguage.googleapis.com/v1beta",
     "https://generativelanguage.googleapis.com/v1beta"),
])
def test_url_root_strips_a_trailing_slash_and_v1(base_url, root):
    assert contract.url_root(base_url) == root


def test_an_ollama_url_gets_v1_once():
    for given in ("http://127.0.0.1:11434", "http://127.0.0.1:11434/", "http://127.0.0.1:11434/v1"):
        assert contract.openai_base_url("ollama", given) == "http://127.0.0.1:11434/v1"


# --- one backend view, one lookup -------------------------------------------------------------

@pytest.mark.parametrize("path,env", INVENTORIES, ids=[p.name for p, _ in INVENTORIES])
def test_each_sidecar_backend_names_the_variant_rendered_for_it(path, env, monkeypatch):
    """The sidecar config and the Hermes variants come from one backend view per wizard: the
    variant a sidecar backend names selects that backend's own model and URL."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fleet = validate(path, env=os.environ)
    for host in fleet.hosts:
        p = plan.host_plan(fleet, host)
        cfg = plan.sidecar_config_for(fleet, host)
        for w in p["hermes"]["wizards"]:
            variants = {f.path: f for f in w["variants"].values()}
            for b in cfg.wizards[w["name"]].backends:
                model = yaml.safe_load(variants[str(b.variant)].content)["model"]
                assert (model["default"], model["base_url"]) == (b.model, b.base_url)


def test_a_backend_is_found_by_name_in_any_shape():
    chain = [{"name": "claude", "model": "c"}, {"name": "local", "model": "gemma"}]
    assert contract.find_backend({"name": "merlin", "backends": chain}, "local")["model"] == "gemma"
    given = chain[0]   # a backend already: returned as it is
    assert contract.find_backend({"name": "merlin", "backends": chain}, given) is given
    assert contract.find_backend({"name": "merlin", "backends": chain}, None) is None
    with pytest.raises(KeyError, match="wizard 'merlin' has no backend 'gpt'"):
        contract.find_backend({"name": "merlin", "backends": chain}, "gpt")
    # The sidecar's config and the plan's view take the same lookup.
    fleet = validate(DATA / "contract_names.yaml", env={})
    cfg = plan.sidecar_config_for(fleet, "vps.fra-1").wizards["merlin"]
    assert cfg.backend("local.small").kind == "local"
    assert view(fleet, "merlin").backend("claude_s4.5").kind == "anthropic"
    with pytest.raises(KeyError, match="no backend 'nope'"):
        cfg.backend("nope")


@pytest.mark.parametrize("value", ["10.1.2.3", "172.16.0.9", "192.168.1.5", "100.100.1.1",
                                   "fd12:3456::1", "fe80::1"])
def test_a_private_address_is_a_non_global_ip(value):
    assert contract.private_address_problem(value) is None


@pytest.mark.parametrize("value", ["8.8.8.8", "2a00:1450::1", "127.0.0.1", "0.0.0.0", "::",
                                   "224.0.0.1", "pi.lan", "10.1.2", 7])
def test_a_public_loopback_or_named_private_address_is_refused(value):
    assert contract.private_address_problem(value)
