"""From a validated inventory to what each host should have: the deployers' input.

The plan is plain data (pyinfra host data): file contents, unit parameters, versions. All
decisions live here so the deployers stay a list of operations, and so that a test (or
`neverdark render`) can see what a host gets without touching it. Paths, users and unit names
come from neverdark.contract; the sidecar's config is built as the sidecar's own classes and
written with the sidecar's own `dump`, so the two sides cannot disagree.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path

from neverdark import contract, engines, hermes_config, memory_fit, model_sources, topology
from neverdark.backends import WizardBackends, backend_kind, view
from neverdark.schema import CloudBackend, Fleet
from neverdark.versions import HERMES_REQUIREMENTS, LLAMA_REQUIREMENTS, SIDECAR_REQUIREMENTS
from sidecar import config as sidecar_config

WATCHDOG_SEC = 30
BASE_PACKAGES = ["python3", "python3-venv", "sudo"]


@dataclass(frozen=True)
class File:
    """One file the deploy installs: where, what, and who may read it."""

    path: str
    content: str
    mode: str = "0644"
    user: str = "root"
    group: str = "root"
    secret: bool = False   # kept out of `pyinfra --diff`

    def __repr__(self) -> str:  # never print a secret file's content
        return f"File({self.path!r}, mode={self.mode}, {self.user}:{self.group})"


def host_plan(fleet: Fleet, host: str) -> dict:
    h = fleet.hosts[host]
    wheelhouse = h.wheelhouse or fleet.wheelhouse
    pip = {"find_links": wheelhouse.find_links if wheelhouse else None,
           "no_index": bool(wheelhouse and not wheelhouse.index)}
    # Each wizard's backend chain, viewed once: its Hermes variants and the sidecar's config
    # are both derived from it.
    chains = [view(fleet, w) for w in fleet.wizards_on(host)]
    wizards = [wizard_plan(fleet, chain) for chain in chains]
    return {
        "host": host,
        "arch": h.arch,
        "profile": h.profile,
        # What the deploy compares with the host's real CPUs and memory before changing it.
        "resources": {"cores": h.cores, "memory_mb": h.memory_mb,
                      "headroom_mb": memory_fit.headroom_mb(fleet, host)},
        "pip": pip,
        "base": {"packages": BASE_PACKAGES,
                 "journald": journald_dropin() if h.profile in contract.JOURNALD_PROFILES
                 else None},
        "models": [model_plan(fleet, m) for m in fleet.local_models(host)],
        "llama": llama_plan(fleet, host),
        "hermes": {"requirements": HERMES_REQUIREMENTS, "wizards": wizards},
        "sidecar": sidecar_plan(fleet, host, wizards, chains),
        "firewall": firewall_plan(fleet, host),
    }


NFT = "/usr/sbin/nft"


def firewall_plan(fleet: Fleet, host: str) -> dict | None:
    """The nftables ruleset that admits only the hosts of the wizards using each model server
    other hosts reach (None: no such server here, no firewall)."""
    rules = []
    for s in topology.llama_servers(fleet, host):
        if not s.remote_wizards:
            continue
        addresses = sorted({ipaddress.ip_address(fleet.hosts[fleet.wizards[w].host]
                                                 .private_address)
                            for w in s.remote_wizards}, key=lambda a: (a.version, a))
        rules.append({"model": s.model, "port": s.port, "wizards": list(s.remote_wizards),
                      "ipv4": [str(a) for a in addresses if a.version == 4],
                      "ipv6": [str(a) for a in addresses if a.version == 6]})
    if not rules:
        return None
    return {"rules": rules, "nft": NFT,
            "units": [contract.llama_unit(r["model"]) for r in rules]}


def journald_dropin() -> File:
    """The journal's caps on hosts of a profile in contract.JOURNALD_PROFILES."""
    lines = [f"{k}={v}" for k, v in contract.JOURNALD_LIMITS.items()]
    return File(contract.JOURNALD_DROPIN,
                "# neverdark: the journal kept small on an SD card (neverdark/contract.py)\n"
                "[Journal]\n" + "\n".join(lines) + "\n")


def llama_plan(fleet: Fleet, host: str) -> dict:
    servers = topology.llama_servers(fleet, host)
    engines_used = {s.engine for s in servers}
    python = "llama-cpp-python" in engines_used
    wheel = llama_wheel_plan(fleet.hosts[host].arch) if python else None
    return {"requirements": [llama_requirement(wheel)] if wheel else LLAMA_REQUIREMENTS,
            "python": python,
            "wheel": wheel,
            "native": (native_server_plan(fleet.hosts[host].arch)
                       if "llama-server" in engines_used else None),
            "servers": [llama_server_plan(fleet, s) for s in servers]}


def model_plan(fleet: Fleet, name: str) -> dict:
    src = fleet.models[name].source
    plan = {"name": name, "sha256": src.sha256, "url": None, "upload": None,
            "path": contract.model_file(src.sha256), "link": contract.model_link(name)}
    if src.url:
        plan["url"] = src.url
    elif src.file:
        plan["upload"] = str(model_sources.from_file(src.file, src.sha256))
    else:
        plan["upload"] = str(model_sources.from_pypi(src.pypi, src.sha256))
    return plan


def llama_server_plan(fleet: Fleet, s: topology.LlamaServer) -> dict:
    model = fleet.models[s.model]
    d = asdict(s)
    d["unit"] = contract.llama_unit(s.model)
    d["model_path"] = s.model_path
    d["slots"] = s.slots
    d["argv"] = engines.argv(s)
    d["env"] = engines.environment(s)
    # systemd kills the server, not a gateway, when it outgrows what the memory fit granted it
    granted = memory_fit.server_mb(model, len(s.wizards), fleet.memory)
    d["memory_max_mb"] = int(granted * 1.25) + 64
    d["wizards"] = list(s.wizards)
    d["remote_wizards"] = list(s.remote_wizards)
    # The key of a server other hosts reach, in its EnvironmentFile (root reads it for the
    # unit; 0600, never argv): llama-server takes LLAMA_API_KEY, the launcher reads the same.
    d["key_file"] = (File(s.key_file, contract.dotenv_dumps(
        {contract.LLAMA_KEY_ENV: fleet.secret(s.key_secret)}), "0600", contract.LLAMA_USER,
        contract.LLAMA_USER, secret=True) if s.key_secret else None)
    return d


def built_artifacts(arch: str, what: str, part: str):
    """The artifacts for `arch` with `part` ("wheel", "server") built on this machine by
    neverdark.artifacts; never built here (minutes): a missing build is an error saying how to
    make it."""
    from neverdark import artifacts   # the operator's build tooling, not needed on hosts
    built = artifacts.cached(arch, (part,))
    if built is None:
        raise RuntimeError(f"no {what} built for {arch}: run `python -m neverdark.artifacts "
                           f"build --arch {arch}` on this machine first (minutes)")
    return built


def llama_wheel_plan(arch: str) -> dict:
    """The llama-cpp-python wheel for `arch`, uploaded from this machine and checked against the
    sha256 recorded when it was built. llama-cpp-python has no wheels on PyPI: a host left to
    the index would compile it (a toolchain and minutes on a VPS, far longer on a Pi), or fail
    without a compiler. Its pure dependencies still come from the host's index or wheelhouse."""
    built = built_artifacts(arch, "llama-cpp-python wheel", "wheel")
    sha = built.stamp["files"][built.wheel.name]["sha256"]
    d = contract.llama_wheel_dir(sha)
    return {"name": built.wheel.name, "src": str(built.wheel), "sha256": sha, "dir": d,
            "path": f"{d}/{built.wheel.name}"}


def llama_requirement(wheel: dict) -> str:
    """The llama venv's requirement: the uploaded wheel by path (a new wheel is a new path, so
    the venv's requirement stamp changes and pip reinstalls)."""
    return f"llama-cpp-python[server] @ file://{wheel['path']}"


def native_server_plan(arch: str) -> dict:
    """llama-server and its libraries for `arch`, as built on this machine by neverdark.artifacts.
    Each file is uploaded and checked against the sha256 recorded when it was built; the folder
    is named by a digest of all of them, so a new build lands beside the old one and is switched
    to by a link."""
    built = built_artifacts(arch, "llama-server", "server")
    found = []
    for rel, rec in sorted(built.stamp["files"].items()):
        if rel.startswith("llama-server/"):
            name = rel.split("/", 1)[1]
            found.append({"name": name, "src": str(built.dir / rel), "sha256": rec["sha256"],
                          "mode": "0755" if name == "llama-server" else "0644"})
    digest = hashlib.sha256("".join(f"{f['name']} {f['sha256']}\n" for f in found)
                            .encode()).hexdigest()[:16]
    return {"files": found, "dir": contract.llama_server_build(digest),
            "link": contract.LLAMA_SERVER_LINK, "binary": engines.NATIVE_BINARY}


def wizard_plan(fleet: Fleet, chain: WizardBackends) -> dict:
    name = chain.name
    spec = hermes_spec(fleet, name, chain)
    user = contract.wizard_user(name)
    secrets = {ref: fleet.secret(ref) for ref in hermes_config.secret_names(spec)}
    return {
        "name": name,
        "user": user,
        "unit": contract.wizard_unit(name),
        "etc": contract.wizard_etc(name),
        "var": contract.wizard_var(name),
        "home": contract.wizard_home(name),
        "managed_dir": contract.wizard_managed_dir(name),
        "active_config": contract.active_config(name),
        "api_port": spec["api_port"],
        "primary": chain.primary.name,
        "backends": [b.name for b in chain.backends],
        "base_config": File(contract.wizard_base_config(name),
                            hermes_config.render_base_config(spec), "0640", "root", user),
        # Only the sidecar reads these (it copies one into the managed dir, whose setgid group
        # makes the copy the wizard's); so a new wizard needs no new group for the sidecar.
        "variants": {b.name: File(b.variant, hermes_config.render_variant(spec, b), "0640",
                                  "root", contract.SIDECAR_USER)
                     for b in chain.backends},
        "env": File(f"{contract.wizard_home(name)}/.env", hermes_config.render_env(spec, secrets),
                    "0600", user, user, secret=True),
        "soul": File(f"{contract.wizard_home(name)}/SOUL.md",
                     hermes_config.render_soul(spec, degraded=False), "0600", user, user),
    }


def hermes_spec(fleet: Fleet, name: str, chain: WizardBackends | None = None) -> dict:
    """The wizard as neverdark.hermes_config takes it (plain data): its chain is the plan's
    backend view (`chain`, built here when not given)."""
    wz = fleet.wizards[name]
    return {
        "name": name,
        "api_port": wz.api_port,
        "api_key_secret": wz.api_server_key.secret,
        "telegram_token_secret": wz.telegram.token.secret if wz.telegram else None,
        "telegram_allowed_users": [str(u) for u in wz.telegram.allowed_users] if wz.telegram else [],
        "telegram_api_url": wz.telegram.api_url if wz.telegram else None,
        "persona": wz.persona,
        "notice": wz.notice,
        "backends": [asdict(b) for b in (chain or view(fleet, name)).backends],
    }


def _probe_settings(probe) -> sidecar_config.ProbeSettings:
    """The inventory's probe settings as the sidecar's (same keys, the sidecar's types)."""
    defaults = sidecar_config.ProbeSettings()
    return sidecar_config.ProbeSettings(**{k: type(getattr(defaults, k))(v)
                                           for k, v in probe.model_dump().items()})


def sidecar_config_for(fleet: Fleet, host: str, chains: list[WizardBackends] | None = None
                       ) -> sidecar_config.SidecarConfig | None:
    """The host's sidecar config, as the sidecar's own classes (None: no wizard here); each
    wizard's backends from the plan's backend view (`chains`, built here when not given)."""
    wizards = {}
    secrets: dict[str, str] = {}
    for chain in chains if chains is not None else [view(fleet, w)
                                                    for w in fleet.wizards_on(host)]:
        name, wz = chain.name, fleet.wizards[chain.name]
        backends = tuple(sidecar_config.BackendConfig(
            name=b.name, kind=b.kind, base_url=b.base_url, model=b.model,
            api_key=fleet.secret(b.api_key_secret) if b.api_key_secret else None,
            variant=Path(b.variant), api_key_env=b.key_env, context_length=b.context_length,
            host=b.host if b.host and b.host != host else None)
            for b in chain.backends)
        api_env = wz.api_server_key.secret
        secrets[api_env] = fleet.secret(api_env)
        wizards[name] = sidecar_config.WizardConfig(
            name=name, unit=contract.wizard_unit(name), api_port=wz.api_port,
            api_key=secrets[api_env], api_key_env=api_env,
            home=Path(contract.wizard_home(name)),
            active_config=Path(contract.active_config(name)),
            probe=_probe_settings(fleet.probe(name)), backends=backends,
            restart=wz.restart_on_switch)
    if not wizards:
        return None
    hooks = fleet.sidecar.hooks
    telegram = None
    if hooks.telegram:
        secrets["TELEGRAM_HOOK_TOKEN"] = fleet.secret(hooks.telegram.token.secret)
        telegram = {"token_env": "TELEGRAM_HOOK_TOKEN", "chat_id": str(hooks.telegram.chat_id)}
    private = None
    if fleet.sidecar.metrics == "private":
        private = (fleet.hosts[host].private_address, fleet.sidecar.port)
    return sidecar_config.SidecarConfig(
        path=Path(contract.SIDECAR_CONFIG), listen=(contract.LOOPBACK, fleet.sidecar.port),
        private_listen=private,
        metrics_token_file=Path(contract.METRICS_TOKEN_FILE) if private else None,
        units=tuple(contract.llama_unit(s.model) for s in topology.llama_servers(fleet, host)),
        control_socket=Path(contract.CONTROL_SOCKET), state_dir=Path(contract.SIDECAR_STATE_DIR),
        secrets_file=Path(contract.SIDECAR_ENV), probe=_probe_settings(fleet.sidecar.probe),
        hooks=sidecar_config.HooksConfig(command=hooks.command, webhook=hooks.webhook,
                                         telegram=telegram, settle=float(hooks.settle)),
        wizards=wizards, secrets=secrets)


def sidecar_plan(fleet: Fleet, host: str, wizards: list[dict],
                 chains: list[WizardBackends]) -> dict:
    cfg = sidecar_config_for(fleet, host, chains)
    if cfg is None:
        return {"requirements": SIDECAR_REQUIREMENTS, "config": None, "env": None,
                "metrics_token": None,
                "units": [], "groups": [], "watchdog_sec": WATCHDOG_SEC}
    text, env = sidecar_config.dump(cfg)
    user = contract.SIDECAR_USER
    return {
        "requirements": SIDECAR_REQUIREMENTS,
        "config": File(contract.SIDECAR_CONFIG, text, "0640", "root", user),
        "env": File(contract.SIDECAR_ENV, env, "0600", user, user, secret=True),
        "units": [w["unit"] for w in wizards],
        # The ops group lets it hand its control socket to the operators; systemd-journal lets
        # it read the gateways' logged provider errors (Hermes keeps its own log directory
        # 0700). No wizard's group: it never reads a wizard's files (a wizard added or removed
        # is a reload, not a restart for new group membership).
        "groups": [contract.OPS_GROUP, "systemd-journal"],
        "watchdog_sec": WATCHDOG_SEC,
        # Made on the host by the deploy when absent (deploys/ops.py), never here.
        "metrics_token": str(cfg.metrics_token_file) if cfg.metrics_token_file else None,
    }


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
        for s in topology.llama_servers(fleet, host):
            remote = f" (and {', '.join(s.remote_wizards)} of other hosts, with a key)" \
                if s.remote_wizards else ""
            lines.append(f"  model {s.model} ({s.engine}): {s.listen}:{s.port} n_ctx {s.n_ctx}"
                         f"{f' x {s.slots} slots' if s.engine == 'llama-server' else ''}, "
                         f"{s.threads} threads, serving {', '.join(s.wizards)}{remote}")
        for w in fleet.wizards_on(host):
            chain = " -> ".join(f"{b.name} ({backend_kind(b)})" for b in fleet.wizards[w].backends)
            lines.append(f"  wizard {w}: API 127.0.0.1:{fleet.wizards[w].api_port}, "
                         f"chain {chain}")
    return lines


__all__ = ["File", "CloudBackend", "host_plan", "pyinfra_groups", "sidecar_config_for", "summary"]
