"""Loading /etc/neverdark/sidecar.yaml: defaults, secrets resolution, and one clear error per
kind of mistake, naming the file and the field."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, ProbeSettings, load, read_dotenv

SECRET = "sk-ant-very-secret-value-1234"


def base_doc(tmp: Path) -> dict:
    return {
        "listen": "127.0.0.1:9470",
        "control_socket": str(tmp / "run" / "control.sock"),
        "state_dir": str(tmp / "state"),
        "secrets_file": str(tmp / "sidecar.env"),
        "probe": {"interval": 5},
        "hooks": {"command": "/usr/local/bin/page-me", "webhook": "http://127.0.0.1:9/hook",
                  "telegram": {"token_env": "TG_TOKEN", "chat_id": -100123}},
        "wizards": {
            "merlin": {
                "unit": "neverdark-wizard-merlin.service",
                "api_port": 8642,
                "api_key_env": "WIZARD_MERLIN_API_KEY",
                "home": "/var/lib/neverdark/wizards/merlin/home",
                "active_config": "/var/lib/neverdark/wizards/merlin/managed/config.yaml",
                "probe": {"fall": 5},
                "backends": [
                    {"name": "claude", "kind": "anthropic", "base_url": "https://api.anthropic.com",
                     "model": "claude-sonnet-4-5", "api_key_env": "ANTHROPIC_KEY_MERLIN",
                     "variant": "/etc/neverdark/wizards/merlin/backends/claude.yaml"},
                    {"name": "local", "kind": "local", "base_url": "http://127.0.0.1:8081/v1",
                     "model": "gemma3-270m", "api_key_env": None,
                     "variant": "/etc/neverdark/wizards/merlin/backends/local.yaml"},
                ],
            }
        },
    }


def write(tmp: Path, doc, secrets: str | None = None) -> Path:
    env = tmp / "sidecar.env"
    env.write_text(secrets if secrets is not None else (
        f"# probe keys\nANTHROPIC_KEY_MERLIN={SECRET}\n"
        "export WIZARD_MERLIN_API_KEY='nd-api-key-0123456789abcdef'\n"
        'TG_TOKEN="123:abc\\"def" # bot\n'))
    os.chmod(env, 0o600)
    path = tmp / "sidecar.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_valid_config_loads_with_defaults_and_overrides(tmp_path):
    cfg = load(write(tmp_path, base_doc(tmp_path)))
    assert cfg.listen == ("127.0.0.1", 9470)
    assert cfg.probe == ProbeSettings(interval=5.0)
    w = cfg.wizards["merlin"]
    assert w.probe.fall == 5 and w.probe.interval == 5.0 and w.probe.rise == 2
    assert w.api_key == "nd-api-key-0123456789abcdef"
    assert [b.name for b in w.backends] == ["claude", "local"]
    assert w.backends[0].api_key == SECRET and w.backends[1].api_key is None
    assert w.backends[0].variant == Path("/etc/neverdark/wizards/merlin/backends/claude.yaml")
    assert cfg.hooks.telegram == {"token_env": "TG_TOKEN", "chat_id": "-100123"}
    assert cfg.secrets["TG_TOKEN"] == '123:abc"def'


def test_defaults_match_the_documented_anchors():
    d = ProbeSettings()
    assert (d.interval, d.timeout, d.fall, d.rise, d.min_dwell, d.cooldown_429, d.damping_base,
            d.damping_cap, d.paid_probe) == (10, 5, 3, 2, 60, 60, 30, 300, False)


def test_secrets_never_in_repr(tmp_path):
    cfg = load(write(tmp_path, base_doc(tmp_path)))
    text = repr(cfg) + str(cfg.wizards["merlin"]) + repr(cfg.wizards["merlin"].backends)
    assert SECRET not in text and "nd-api-key-0123456789abcdef" not in text and "abc" not in text


def mutate(tmp, fn):
    doc = copy.deepcopy(base_doc(tmp))
    fn(doc)
    return doc


M = "wizards.merlin"
CASES = [
    ("unknown top key", lambda d: d.update(lisen="x"), "lisen: unknown key"),
    ("unknown probe key", lambda d: d["probe"].update(intervall=3), "probe.intervall: unknown key"),
    ("wrong type", lambda d: d["probe"].update(fall="3"), "probe.fall: must be an integer, got str"),
    ("bool is not a number", lambda d: d["probe"].update(interval=True), "probe.interval: must be a number"),
    ("negative", lambda d: d["probe"].update(min_dwell=-1), "probe.min_dwell: must be >= 0"),
    ("zero rise", lambda d: d["wizards"]["merlin"]["probe"].update(rise=0), f"{M}.probe.rise: must be >= 1"),
    ("cap below base", lambda d: d["probe"].update(damping_base=50, damping_cap=10), "probe.damping_cap"),
    ("paid_probe type", lambda d: d["probe"].update(paid_probe="yes"), "probe.paid_probe: must be true or false"),
    ("missing top field", lambda d: d.pop("state_dir"), "state_dir: missing"),
    ("missing wizard field", lambda d: d["wizards"]["merlin"].pop("unit"), f"{M}.unit: missing"),
    ("missing backend field", lambda d: d["wizards"]["merlin"]["backends"][1].pop("variant"),
     f"{M}.backends[1].variant: missing"),
    ("unknown kind", lambda d: d["wizards"]["merlin"]["backends"][1].update(kind="bedrock"),
     f"{M}.backends[1].kind: must be one of anthropic, openai, google, ollama, local"),
    ("duplicate backend", lambda d: d["wizards"]["merlin"]["backends"][1].update(name="claude"),
     f"{M}.backends[1].name: duplicate backend name"),
    ("one backend", lambda d: d["wizards"]["merlin"]["backends"].pop(), f"{M}.backends: needs at least 2"),
    ("backends not a list", lambda d: d["wizards"]["merlin"].update(backends={}), f"{M}.backends: must be a list"),
    ("secret not in file", lambda d: d["wizards"]["merlin"]["backends"][0].update(api_key_env="NOPE"),
     f"{M}.backends[0].api_key_env: secret NOPE is not defined"),
    ("keyed kind without key", lambda d: d["wizards"]["merlin"]["backends"][0].update(api_key_env=None),
     f"{M}.backends[0].api_key_env: required for kind anthropic"),
    ("telegram token missing", lambda d: d["hooks"]["telegram"].update(token_env="TG_OTHER"),
     "hooks.telegram.token_env: secret TG_OTHER is not defined"),
    ("telegram chat missing", lambda d: d["hooks"]["telegram"].pop("chat_id"), "hooks.telegram.chat_id: missing"),
    ("webhook not a url", lambda d: d["hooks"].update(webhook="hooks.example"), "hooks.webhook: must be an http(s) URL"),
    ("listen not loopback", lambda d: d.update(listen="0.0.0.0:9470"), "listen: must be a loopback address"),
    ("listen no port", lambda d: d.update(listen="127.0.0.1"), "listen: must be HOST:PORT"),
    ("relative path", lambda d: d["wizards"]["merlin"].update(home="wizards/merlin"), f"{M}.home: must be an absolute path"),
    ("bad wizard name", lambda d: d["wizards"].update({"../evil": d["wizards"]["merlin"]}), "wizards.../evil: '../evil' is not a valid wizard name"),
    ("bad port", lambda d: d["wizards"]["merlin"].update(api_port=0), f"{M}.api_port: must be >= 1"),
    ("no wizards", lambda d: d.update(wizards={}), "wizards: must be a non-empty mapping"),
    ("base_url", lambda d: d["wizards"]["merlin"]["backends"][1].update(base_url="127.0.0.1:8081"),
     f"{M}.backends[1].base_url: must be an http(s) URL"),
]


@pytest.mark.parametrize("name,fn,fragment", CASES, ids=[c[0] for c in CASES])
def test_each_mistake_names_file_and_field(tmp_path, name, fn, fragment):
    path = write(tmp_path, mutate(tmp_path, fn))
    with pytest.raises(ConfigError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    assert fragment in msg, msg
    assert SECRET not in msg


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    text = yaml.safe_dump(base_doc(tmp_path)) + "listen: 127.0.0.1:1\n"
    with pytest.raises(ConfigError, match=r"sidecar.yaml: line \d+: duplicate key 'listen'"):
        load(write(tmp_path, text))


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "listen: [unclosed\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load(tmp_path / "nope.yaml")


def test_world_readable_secrets_file_is_refused(tmp_path):
    path = write(tmp_path, base_doc(tmp_path))
    os.chmod(tmp_path / "sidecar.env", 0o644)
    with pytest.raises(ConfigError, match="accessible to other users"):
        load(path)


@pytest.mark.parametrize("line,fragment", [("NOT A LINE", "line 2: expected NAME=VALUE"),
                                           ("1BAD=x", "line 2: expected NAME=VALUE"),
                                           ("K='open", "line 2: K: unterminated"),
                                           ("ANTHROPIC_KEY_MERLIN=again", "line 2: ANTHROPIC_KEY_MERLIN: defined twice")])
def test_dotenv_errors_name_the_line_not_the_value(tmp_path, line, fragment):
    env = tmp_path / "x.env"
    env.write_text(f"ANTHROPIC_KEY_MERLIN={SECRET}\n{line}\n")
    with pytest.raises(ConfigError) as err:
        read_dotenv(env)
    assert fragment in str(err.value) and SECRET not in str(err.value)


def test_dotenv_values(tmp_path):
    env = tmp_path / "x.env"
    env.write_text("A=plain # comment\nB='single # not comment'\nC=\"line\\nbreak\"\n\n# c\nexport D=\nE=x#y\n")
    assert read_dotenv(env) == {"A": "plain", "B": "single # not comment", "C": "line\nbreak",
                                "D": "", "E": "x#y"}
