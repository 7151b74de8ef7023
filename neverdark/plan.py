"""From a validated inventory to what each host should have: the deployers' input.

The plan is plain data (pyinfra host data): file contents, unit parameters, versions. All
decisions live here so the deployers stay a list of operations, and so that a test can check a
plan without a host.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import yaml

from neverdark import hermes_config, memory_fit, model_sources
from neverdark.inventory import Fleet, LocalBackend
from neverdark.versions import HERMES_REQUIREMENTS, LLAMA_REQUIREMENTS, SIDECAR_REQUIREMENTS


WIZARDS_VAR = "/var/lib/neverdark/wizards"
WIZARDS_ETC = "/etc/neverdark/wizards"
KV_TYPE_IDS = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type values llama-cpp-python's CLI takes
WATCHDOG_SEC = 30


def api_key_secret(fleet: Fleet, wizard: str) -> str:
    """Name of the secret holding the wizard's API-server key."""
    return fleet.wizards[wizard].api_server_key.secret


def backend_kind(backend) -> str:
    return "local" if isinstance(backend, LocalBackend) else backend.provider


def backend_key_env(wizard: str, backend) -> str | None:
    """The name the sidecar finds a backend's key under in its own secrets file."""
    if isinstance(backend, LocalBackend):
        return None
    return f"KEY_{wizard}_{backend.name}".upper().replace("-", "_").replace(".", "_")


def host_plan(fleet: Fleet, host: str) -> dict:
    h = fleet.hosts[host]
    wheelhouse = h.wheelhouse or fleet.wheelhouse
    pip = {"find_links": wheelhouse.find_links if wheelhouse else None,
           "no_index": bool(wheelhouse and not wheelhouse.index)}
    servers = fleet.llama_servers(host)
    wizards = [wizard_plan(fleet, w) for w in fleet.wizards_on(host)]
    return {
        "host": host,
        "pip": pip,
        "models": [model_plan(fleet, m) for m in fleet.local_models(host)],
        "llama": {"requirements": LLAMA_REQUIREMENTS,
                  "servers": [llama_server_plan(fleet, host, s) for s in servers]},
        "hermes": {"requirements": HERMES_REQUIREMENTS, "wizards": wizards},
        "sidecar": sidecar_plan(fleet, host, wizards),
    }


def model_plan(fleet: Fleet, name: str) -> dict:
    m = fleet.models[name]
    src = m.source
    plan = {"name": name, "sha256": src.sha256, "url": None, "upload": None}
    if src.url:
        plan["url"] = src.url
    elif src.file:
        plan["upload"] = str(model_sources.from_file(src.file, plan["sha256"]))
    else:
        plan["upload"] = str(model_sources.from_pypi(src.pypi, plan["sha256"]))
    return plan


def llama_server_plan(fleet: Fleet, host: str, s) -> dict:
    model = fleet.models[s.model]
    d = asdict(s)
    d["unit"] = f"neverdark-llama-{s.model}.service"
    d["kv_type_id"] = KV_TYPE_IDS[s.kv_type]
    d["cache_bytes"] = s.prompt_cache_mb * 1024 * 1024
    # systemd kills the server, not a gateway, when it outgrows what the memory fit granted it
    granted = memory_fit.server_mb(model, len(s.wizards), fleet.memory)
    d["memory_max_mb"] = int(granted * 1.25) + 64
    d["wizards"] = list(s.wizards)
    return d


def wizard_plan(fleet: Fleet, name: str) -> dict:
    wz = fleet.wizards[name]
    home = f"{WIZARDS_VAR}/{name}/home"
    spec = hermes_spec(fleet, name)
    secrets = {ref: fleet.secret(ref) for ref in hermes_config.secret_names(spec)}
    return {
        "name": name,
        "user": f"hermes-{name}",
        "unit": f"neverdark-wizard-{name}.service",
        "home": home,
        "managed_dir": f"{WIZARDS_VAR}/{name}/managed",
        "api_port": spec["api_port"],
        "primary": wz.backends[0].name,
        "backends": [b.name for b in wz.backends],
        "base_config": hermes_config.render_base_config(spec),
        "variants": {b.name: hermes_config.render_variant(spec, b.name) for b in wz.backends},
        "env": hermes_config.render_env(spec, secrets),
        "soul": hermes_config.render_soul(spec, degraded=False),
    }


def hermes_spec(fleet: Fleet, name: str) -> dict:
    """The wizard as neverdark.hermes_config takes it."""
    wz = fleet.wizards[name]
    return {
        "name": name,
        "api_port": wz.api_port,
        "api_key_secret": api_key_secret(fleet, name),
        "telegram_token_secret": wz.telegram.token.secret if wz.telegram else None,
        "telegram_allowed_users": [str(u) for u in wz.telegram.allowed_users] if wz.telegram else [],
        "telegram_api_url": wz.telegram.api_url if wz.telegram else None,
        "persona": wz.persona,
        "notice": wz.notice,
        "backends": [{
            "name": b.name,
            "kind": backend_kind(b),
            "model": b.local if isinstance(b, LocalBackend) else b.model,
            "base_url": fleet.base_url(name, b),
            "api_key_secret": None if isinstance(b, LocalBackend) else b.api_key.secret,
            "context_length": fleet.context_length(b),
            "max_tokens": b.max_tokens,
        } for b in wz.backends],
    }


def sidecar_plan(fleet: Fleet, host: str, wizards: list[dict]) -> dict:
    env: dict[str, str] = {}
    conf_wizards = {}
    for w in wizards:
        wz = fleet.wizards[w["name"]]
        key_env = api_key_secret(fleet, w["name"])
        env[key_env] = fleet.secret(key_env)
        backends = []
        for b in wz.backends:
            key = backend_key_env(w["name"], b)
            if key:
                env[key] = fleet.secret(b.api_key.secret)
            backends.append({"name": b.name, "kind": backend_kind(b),
                             "base_url": fleet.base_url(w["name"], b),
                             "model": b.local if isinstance(b, LocalBackend) else b.model,
                             "api_key_env": key,
                             "variant": f"{WIZARDS_ETC}/{w['name']}/backends/{b.name}.yaml"})
        conf_wizards[w["name"]] = {
            "unit": w["unit"], "api_port": w["api_port"], "api_key_env": key_env,
            "home": w["home"], "active_config": f"{w['managed_dir']}/config.yaml",
            "probe": wz.probe.overrides(), "restart": wz.restarts_on_switch,
            "backends": backends}
    hooks = fleet.sidecar.hooks
    telegram = None
    if hooks.telegram:
        env["TELEGRAM_HOOK_TOKEN"] = fleet.secret(hooks.telegram.token.secret)
        telegram = {"token_env": "TELEGRAM_HOOK_TOKEN", "chat_id": str(hooks.telegram.chat_id)}
    config = {
        "listen": f"127.0.0.1:{fleet.sidecar.port}",
        "control_socket": "/run/neverdark-sidecar/control.sock",
        "state_dir": "/var/lib/neverdark/sidecar/state",
        "secrets_file": "/etc/neverdark/sidecar.env",
        "probe": fleet.sidecar.probe.model_dump(),
        "hooks": {"command": hooks.command, "webhook": hooks.webhook, "telegram": telegram},
        "wizards": conf_wizards,
    }
    return {
        "requirements": SIDECAR_REQUIREMENTS,
        "config": "# Generated by neverdark from the inventory; edits are overwritten.\n"
                  + yaml.safe_dump(config, sort_keys=False),
        "env": "".join(f"{k}={_dotenv_quote(v)}\n" for k, v in sorted(env.items())),
        "units": [w["unit"] for w in wizards],
        "watchdog_sec": WATCHDOG_SEC,
    }


def _dotenv_quote(value: str) -> str:
    if all(c.isalnum() or c in "-_./:+=@" for c in value):
        return value
    return "'" + value.replace("'", "'\\''") + "'"


def pyinfra_host_data(fleet: Fleet, host: str) -> dict:
    h = fleet.hosts[host]
    data = {"ssh_hostname": h.address, "ssh_user": h.ssh.user, "ssh_port": h.ssh.port,
            "neverdark": host_plan(fleet, host)}
    if h.ssh.key:
        data["ssh_key"] = str(Path(h.ssh.key).expanduser())
    if h.ssh.known_hosts:
        data["ssh_known_hosts_file"] = str(Path(h.ssh.known_hosts).expanduser())
        data["ssh_strict_host_key_checking"] = "yes"
    if h.ssh.sudo:
        data["_sudo"] = True
    return data


def pyinfra_groups(fleet: Fleet) -> dict[str, list]:
    """Inventory groups by profile: `vps` and `pi`."""
    groups: dict[str, list] = {}
    for name, h in sorted(fleet.hosts.items()):
        groups.setdefault(h.profile, []).append((name, pyinfra_host_data(fleet, name)))
    return groups


def summary(fleet: Fleet) -> list[str]:
    """Where each wizard and model runs, for the demo and the deploy's closing lines."""
    lines = []
    for host in sorted(fleet.hosts):
        h = fleet.hosts[host]
        lines.append(f"{host} ({h.profile}, {h.address}, {h.memory_mb} MB):")
        for s in fleet.llama_servers(host):
            lines.append(f"  model {s.model}: 127.0.0.1:{s.port} n_ctx {s.n_ctx}, "
                         f"{s.threads} threads, serving {', '.join(s.wizards)}")
        for w in fleet.wizards_on(host):
            chain = " -> ".join(f"{b.name} ({backend_kind(b)})" for b in fleet.wizards[w].backends)
            lines.append(f"  wizard {w}: API 127.0.0.1:{fleet.wizards[w].api_port}, "
                         f"chain {chain}")
    return lines
