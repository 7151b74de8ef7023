"""A fallback served by another host of the fleet (issue 17 item 4, docs/crosshost.md): the
inventory's `host:` on a local backend, where the server then listens and with which key, what
the wizard and its sidecar get, the memory fit on the serving host, and the firewall."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import subprocess
from pathlib import Path

import pytest

from neverdark import contract, engines, memory_fit, model_keys, plan, topology
from neverdark.inventory import InventoryError, validate
from deploys import firewall
from tests.test_deployers import recorder, run as run_stages  # noqa: F401 (a fixture)
from tests.test_inventory import GEMMA_SHA, line_of, write_inventory

URL = f"{{url: 'https://example.net/gemma.gguf', sha256: {GEMMA_SHA}}}"
FLEET = f"""secrets: {{file: secrets.env}}
hosts:
  a: {{address: 203.0.113.10, private_address: 10.9.0.2, profile: vps, memory_mb: 2048, cores: 2}}
  b: {{address: 203.0.113.11, private_address: 10.9.0.3, profile: vps, memory_mb: 6144, cores: 2}}
models:
  gemma:
    engine: llama-server
    source: {URL}
    size_mb: 253
    training_context: 32768
    architecture: gemma3
    server: {{threads: 2, extend_context: true}}
    kv: {{layers: 18, kv_heads: 1, head_dim: 256, sliding_window_layers: 15, sliding_window: 512}}
wizards:
  merlin:
    host: a
    backends:
      - {{name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {{secret: ANTHROPIC_API_KEY}}, context_length: 200000}}
      - {{name: local, local: gemma, host: b}}   # MERLIN-LOCAL
  gandalf:
    host: b
    backends:
      - {{name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {{secret: ANTHROPIC_API_KEY}}, context_length: 200000}}
      - {{name: local, local: gemma}}
"""
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-0123456789", "NEVERDARK_API_KEY_MERLIN": "m" * 20,
           "NEVERDARK_API_KEY_GANDALF": "g" * 20}
FLEET_KEY = "f" * 64


def fleet_of(tmp_path, text=FLEET, env=None):
    return validate(write_inventory(tmp_path, text, SECRETS),
                    env={"NEVERDARK_FLEET_KEY": FLEET_KEY} if env is None else env)


def problems(tmp_path, text) -> list[str]:
    with pytest.raises(InventoryError) as e:
        fleet_of(tmp_path, text)
    return [str(p) for p in e.value.problems]


def expected_key(host="b", model="gemma") -> str:
    return hmac.new(FLEET_KEY.encode(), f"{host}/{model}".encode(), hashlib.sha256).hexdigest()


# --- the inventory ---------------------------------------------------------------------------

def test_an_unknown_serving_host_is_named_with_file_line_and_field(tmp_path):
    text = FLEET.replace("local: gemma, host: b}", "local: gemma, host: c}")
    found = problems(tmp_path, text)
    line = line_of(text, "MERLIN-LOCAL")
    assert any(f":{line}: wizards.merlin.backends[1].host: unknown host 'c' (known: a, b)" in p
               for p in found), found


def test_the_serving_host_needs_a_private_address(tmp_path):
    text = FLEET.replace("private_address: 10.9.0.3, ", "")
    found = problems(tmp_path, text)
    assert any("wizards.merlin.backends[1].host: host 'b' has no private_address" in p
               for p in found), found


def test_the_wizards_host_needs_a_private_address_to_be_admitted(tmp_path):
    text = FLEET.replace("private_address: 10.9.0.2, ", "")
    found = problems(tmp_path, text)
    assert any("wizards.merlin.backends[1].host: the wizard's host 'a' has no private_address"
               in p for p in found), found


def test_a_model_restricted_to_other_hosts_is_refused_on_the_serving_host(tmp_path):
    text = FLEET.replace("    architecture: gemma3\n", "    architecture: gemma3\n    hosts: [a]\n")
    found = problems(tmp_path, text)
    assert any("wizards.merlin.backends[1].host: model 'gemma' is not served on host 'b'" in p
               for p in found), found


# --- where the server listens, with which key ------------------------------------------------

def test_the_serving_host_runs_the_server_for_both_wizards_on_its_private_address(tmp_path):
    fleet = fleet_of(tmp_path)
    assert topology.llama_servers(fleet, "a") == []        # a serves nothing
    s, = topology.llama_servers(fleet, "b")
    assert (s.wizards, s.remote_wizards, s.listen) == (("gandalf", "merlin"), ("merlin",),
                                                       "10.9.0.3")
    assert s.slots == 2                                      # a slot per wizard, merlin's too
    argv = engines.argv(s)
    assert ["--host", "10.9.0.3"] == argv[argv.index("--host"):][:2]
    key = expected_key()
    # the key is never on the command line (every user of the host reads /proc/PID/cmdline)
    assert key not in " ".join(argv) and not any("api-key" in a for a in argv)
    assert key not in str(engines.environment(s))
    # both wizards reach it at the private address: it no longer listens on loopback
    url = "http://10.9.0.3:8081/v1"
    assert fleet.base_url("merlin", fleet.wizards["merlin"].backends[1]) == url
    assert fleet.base_url("gandalf", fleet.wizards["gandalf"].backends[1]) == url


def test_the_key_is_in_a_0600_environment_file_the_unit_reads(tmp_path):
    from deploys.llama import LlamaServerDeployer

    fleet = fleet_of(tmp_path)
    s, = topology.llama_servers(fleet, "b")
    d = plan.llama_server_plan(fleet, s)
    f = d["key_file"]
    assert (f.path, f.mode, f.user, f.secret) == ("/etc/neverdark/llama/gemma.env", "0600",
                                                  contract.LLAMA_USER, True)
    assert f.content == f"LLAMA_API_KEY={expected_key()}\n"
    assert expected_key() not in repr(f)
    unit = LlamaServerDeployer({}, d, d["unit"]).unit_file().content
    assert "EnvironmentFile=/etc/neverdark/llama/gemma.env\n" in unit
    assert expected_key() not in unit
    assert "After=network-online.target neverdark-firewall.service" in unit


def test_the_wizard_and_its_sidecar_get_the_key(tmp_path):
    fleet = fleet_of(tmp_path)
    key, env_name = expected_key(), contract.backend_key_env("merlin", "local")
    for wizard, host in (("merlin", "a"), ("gandalf", "b")):
        w = plan.wizard_plan(fleet, plan.view(fleet, wizard))
        name = contract.backend_key_env(wizard, "local")
        assert f"{name}={key}\n" in w["env"].content and w["env"].mode == "0600"
        assert "api_key: ${%s}" % name in w["variants"]["local"].content
        assert key not in w["variants"]["local"].content
        cfg = plan.sidecar_config_for(fleet, host)
        b = cfg.wizards[wizard].backend("local")
        assert (b.api_key, b.api_key_env) == (key, name)
        # the host answering: named for merlin (another host's server), not for gandalf
        assert b.host == ("b" if wizard == "merlin" else None)
    assert env_name == "NEVERDARK_KEY_MERLIN__LOCAL"


def test_a_sidecar_config_with_the_serving_host_reads_back(tmp_path):
    from sidecar import config as sidecar_config

    fleet = fleet_of(tmp_path)
    cfg = plan.sidecar_config_for(fleet, "a")
    text, env = sidecar_config.dump(cfg)
    path, secrets = tmp_path / "sidecar.yaml", tmp_path / "sidecar.env"
    secrets.write_text(env)
    secrets.chmod(0o600)
    path.write_text(text.replace(str(cfg.secrets_file), str(secrets)))
    again = sidecar_config.load(path)
    b = again.wizards["merlin"].backend("local")
    assert (b.host, b.base_url, b.api_key) == ("b", "http://10.9.0.3:8081/v1", expected_key())


def test_a_server_no_other_host_uses_stays_on_loopback_without_a_key(tmp_path):
    text = FLEET.replace("local: gemma, host: b}", "local: gemma, host: b}".replace(
        ", host: b", "")).replace("memory_mb: 2048", "memory_mb: 6144")
    fleet = fleet_of(tmp_path, text)
    s, = topology.llama_servers(fleet, "b")
    assert (s.listen, s.key_secret, s.remote_wizards) == ("127.0.0.1", None, ())
    assert plan.llama_server_plan(fleet, s)["key_file"] is None
    assert plan.firewall_plan(fleet, "b") is None
    w = plan.wizard_plan(fleet, plan.view(fleet, "gandalf"))
    assert "NEVERDARK_KEY_GANDALF__LOCAL" not in w["env"].content
    assert "api_key: no-key-required" in w["variants"]["local"].content


# --- the fleet key ---------------------------------------------------------------------------

def test_the_fleet_key_is_made_once_beside_the_secrets_file_0600(tmp_path):
    fleet = fleet_of(tmp_path, env={})
    s, = topology.llama_servers(fleet, "b")
    first = fleet.secret(s.key_secret)
    path = tmp_path / model_keys.FLEET_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fleet_key = path.read_text().strip()
    assert first == model_keys.derive(fleet_key, "b", "gemma") and fleet_key not in first
    again = fleet_of(tmp_path, env={})            # the same key on the next deploy
    assert again.secret(s.key_secret) == first
    os.chmod(path, 0o644)
    with pytest.raises(model_keys.FleetKeyError, match="readable by others"):
        fleet_of(tmp_path, env={}).secret(s.key_secret)


def test_keys_differ_per_server_and_follow_the_fleet_key():
    k = model_keys.derive(FLEET_KEY, "b", "gemma")
    assert k != model_keys.derive(FLEET_KEY, "c", "gemma")
    assert k != model_keys.derive(FLEET_KEY, "b", "qwen")
    assert k != model_keys.derive("g" * 64, "b", "gemma")
    with pytest.raises(model_keys.FleetKeyError, match="shorter"):
        model_keys.load_or_create("short", None)


# --- memory fit on the serving host ----------------------------------------------------------

def test_the_serving_host_budgets_a_slot_for_the_remote_wizard(tmp_path):
    fleet = fleet_of(tmp_path)
    model = fleet.models["gemma"]
    items = dict(memory_fit.memory_budget(fleet, "b"))
    server = sum(mb for name, mb in items.items() if name.startswith("model gemma"))
    assert server == memory_fit.server_mb(model, 2, fleet.memory)
    assert server > memory_fit.server_mb(model, 1, fleet.memory)
    assert not any(name.startswith("model") for name, _ in memory_fit.memory_budget(fleet, "a"))
    # b with room for its own wizard's slot but not for merlin's: validation refuses it
    extra = server - memory_fit.server_mb(model, 1, fleet.memory)
    for mem in range(6144, 0, -8):
        fleet.hosts["b"] = fleet.hosts["b"].model_copy(update={"memory_mb": mem})
        total = sum(mb for _, mb in memory_fit.memory_budget(fleet, "b"))
        if total > mem:
            break
    assert total - extra <= mem < total
    found = problems(tmp_path, FLEET.replace("memory_mb: 6144", f"memory_mb: {mem}"))
    assert any("hosts.b.memory_mb: does not fit" in p for p in found), found


# --- the firewall ----------------------------------------------------------------------------

def test_the_firewall_admits_the_wizards_host_and_drops_the_rest(tmp_path):
    from deploys.firewall import FirewallDeployer

    fleet = fleet_of(tmp_path)
    assert plan.firewall_plan(fleet, "a") is None
    p = {"firewall": plan.firewall_plan(fleet, "b")}
    text = FirewallDeployer(p).ruleset().content
    assert "\ntable inet neverdark\ndelete table inet neverdark\ntable inet neverdark {\n" in text
    rules = [line.strip() for line in text.splitlines() if "dport" in line]
    assert rules == ['iif "lo" tcp dport 8081 accept',
                     "ip saddr { 10.9.0.2 } tcp dport 8081 accept",
                     "tcp dport 8081 drop"]
    assert "policy accept" in text     # the host's other traffic is left alone
    unit = FirewallDeployer(p).files()[1]
    assert unit.path == "/etc/systemd/system/neverdark-firewall.service"
    assert "ExecReload=/usr/sbin/nft -f /etc/neverdark/firewall.nft" in unit.content
    assert "ExecStop=-/usr/sbin/nft delete table inet neverdark" in unit.content
    assert "Before=network-pre.target shutdown.target neverdark-llama-gemma.service" in unit.content
    # nftables.service's flush would drop the table under a unit that still looks active
    assert "PartOf=nftables.service" in unit.content
    assert "ReloadPropagatedFrom=nftables.service" in unit.content


def test_ipv6_private_addresses_get_ip6_rules(tmp_path):
    from deploys.firewall import FirewallDeployer

    text = FLEET.replace("private_address: 10.9.0.2", "private_address: 'fd00::2'")
    fleet = fleet_of(tmp_path, text)
    ruleset = FirewallDeployer({"firewall": plan.firewall_plan(fleet, "b")}).ruleset().content
    assert "ip6 saddr { fd00::2 } tcp dport 8081 accept" in ruleset
    assert "ip saddr" not in ruleset


# --- llama_launcher's key ------------------------------------------------------------------

def _ask(app, path: str, headers: list) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_the_launcher_refuses_a_request_without_its_key():
    from llama_launcher.auth import KeyMiddleware

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = KeyMiddleware(inner, key="k" * 64)
    assert _ask(app, "/v1/models", []) == 401
    assert _ask(app, "/v1/models", [(b"authorization", b"Bearer wrong")]) == 401
    assert _ask(app, "/v1/models", [(b"authorization", b"Bearer " + b"k" * 64)]) == 200
    assert _ask(app, "/metrics", [(b"x-api-key", b"k" * 64)]) == 200
    assert _ask(app, "/health", []) == 200                  # liveness stays open
    assert _ask(KeyMiddleware(inner, key=""), "/v1/models", []) == 200   # loopback: keyless


# --- the deploy's order ----------------------------------------------------------------------

def test_the_firewall_is_up_before_the_server_and_goes_after_it(tmp_path, recorder,
                                                                 monkeypatch):
    """Enabled: loaded (install, configure, activate) before the model server listens beyond
    loopback, a new ruleset reloaded, never stopped; disabled on a host that has it: removed only
    after the servers are back on loopback."""
    from deploys import stages

    fleet = fleet_of(tmp_path)
    p = plan.host_plan(fleet, "b")
    run_stages(stages.host_deployers(p))
    names = [op.kwargs.get("name", "") for op in recorder.ops]
    run_fw = names.index("firewall: run neverdark-firewall.service")
    assert run_fw < names.index("llama server gemma: run neverdark-llama-gemma.service")
    assert "firewall: reload neverdark-firewall.service (its config changed)" in names
    assert any(op.kind == "apt.packages" and op.kwargs["packages"] == ["nftables"]
               for op in recorder.ops)

    recorder.ops.clear()
    p = plan.host_plan(fleet_of(tmp_path, FLEET.replace(", host: b}", "}").replace(
        "memory_mb: 2048", "memory_mb: 6144")), "b")
    assert p["firewall"] is None
    # the host has the firewall from the deploy before
    monkeypatch.setattr(firewall.ops, "host_has_file",
                        lambda path: path == "/etc/systemd/system/neverdark-firewall.service")
    run_stages(stages.host_deployers(p))
    names = [op.kwargs.get("name", "") for op in recorder.ops]
    stop = names.index("firewall: stop neverdark-firewall.service")
    assert stop > names.index("llama server gemma: run neverdark-llama-gemma.service")
    assert "firewall: remove /etc/neverdark/firewall.nft" in names

    # a removal cut short after the unit went, before the rules file: finished next time
    recorder.ops.clear()
    monkeypatch.setattr(firewall.ops, "host_has_file",
                        lambda path: path == "/etc/neverdark/firewall.nft")
    run_stages(stages.host_deployers(p))
    assert "firewall: remove /etc/neverdark/firewall.nft" in [
        op.kwargs.get("name", "") for op in recorder.ops]
    # nothing of it left: nothing to do
    recorder.ops.clear()
    monkeypatch.setattr(firewall.ops, "host_has_file", lambda path: False)
    run_stages(stages.host_deployers(p))
    assert not [op for op in recorder.ops if op.kwargs.get("name", "").startswith("firewall:")]


def test_the_fleet_key_made_beside_a_checkouts_inventory_is_never_committed():
    """The default layout keeps fleet.yaml and secrets.env in the repository root, where the
    fleet key is then made: git must ignore it there and anywhere else in the tree."""
    repo = Path(__file__).resolve().parent.parent
    for where in (repo, repo / "deploys"):
        path = where / model_keys.FLEET_KEY_FILE
        found = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)])
        assert found.returncode == 0, f"{path} is not ignored by .gitignore"
