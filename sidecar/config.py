"""The sidecar's YAML config (format in docs/CONTRACTS.md) as frozen dataclasses.

The deploy builds these same classes from the inventory (neverdark.plan) and writes them with
`dump`; the daemon reads them back with `load`. Names, kinds, defaults and the dotenv codec come
from neverdark.contract, so anything `neverdark validate` accepts, the sidecar accepts.

Loading is all-or-nothing: any problem raises ConfigError naming the file and the field path, so
the daemon never starts half-configured. Secret values are resolved here from the dotenv secrets
file and kept out of every repr.

Why one module (past 400 lines): the classes, the reader and the writer are one format; `dump`
must write exactly what `load` reads back (tests/test_contract.py renders every host and loads
the result), which is easiest to keep true with both beside the classes they share.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from neverdark import contract

KINDS = contract.KINDS
KEYED_KINDS = contract.KEYED_KINDS
_P = contract.PROBE_DEFAULTS


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ProbeSettings:
    interval: float = float(_P["interval"])
    timeout: float = float(_P["timeout"])
    fall: int = _P["fall"]
    rise: int = _P["rise"]
    min_dwell: float = float(_P["min_dwell"])
    cooldown_429: float = float(_P["cooldown_429"])
    damping_base: float = float(_P["damping_base"])
    damping_cap: float = float(_P["damping_cap"])
    max_hold: float = float(_P["max_hold"])
    paid_probe: bool = _P["paid_probe"]


@dataclass(frozen=True)
class HooksConfig:
    command: str | None = None
    webhook: str | None = None
    # {"token_env": NAME, "chat_id": "..."}: a mapping because hooks.notify reads it with .get
    telegram: dict | None = field(default=None, hash=False)
    # Seconds an incident must stay quiet before its recovery is told (sidecar/notices.py).
    settle: float = contract.NOTICE_SETTLE_DEFAULT


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str
    base_url: str
    model: str
    api_key: str | None = field(repr=False)
    variant: Path
    api_key_env: str | None = None
    # The context Hermes is told; a server that serves less (an Ollama model at its default
    # num_ctx) is probed unhealthy rather than left to truncate prompts.
    context_length: int | None = None
    # The fleet host serving a local model when it is another host's (reached across the
    # network at its private address, with a key): what status and drill name as the answerer.
    host: str | None = None


@dataclass(frozen=True)
class WizardConfig:
    name: str
    unit: str
    api_port: int
    api_key: str = field(repr=False)
    home: Path
    active_config: Path
    probe: ProbeSettings
    backends: tuple[BackendConfig, ...]
    # Restart the gateway after a flip (contract.RESTART_ON_SWITCH_DEFAULT says why not).
    restart: bool = contract.RESTART_ON_SWITCH_DEFAULT
    api_key_env: str = ""

    def backend(self, name: str) -> BackendConfig:
        return contract.find_backend(self, name)


@dataclass(frozen=True)
class SidecarConfig:
    path: Path
    listen: tuple[str, int]
    control_socket: Path
    state_dir: Path
    secrets_file: Path | None
    probe: ProbeSettings
    hooks: HooksConfig
    wizards: dict[str, WizardConfig] = field(hash=False)
    secrets: dict[str, str] = field(default_factory=dict, repr=False, hash=False)
    # A second listener on the host's private address for Prometheus (/metrics, /status, the
    # badges), every request bearing the token in `metrics_token_file`. None: loopback only.
    private_listen: tuple[str, int] | None = None
    metrics_token_file: Path | None = None
    # Units whose memory, OOM kills and restarts /metrics reports besides the wizards' gateways
    # (the model servers).
    units: tuple[str, ...] = ()

    def watched_units(self) -> list[str]:
        """The units /metrics reports: these and every wizard's gateway, each once."""
        return list(dict.fromkeys([*self.units, *(w.unit for w in self.wizards.values())]))
    # Where `python -m sidecar.modelcheck` leaves each wizard's latest result (/metrics reads it).
    model_check_dir: Path = Path(contract.MODEL_CHECK_DIR)


# --- dotenv ----------------------------------------------------------------------------------

def read_dotenv(path: Path) -> dict[str, str]:
    """The sidecar's secrets file, read with the contract's codec (the one the deploy wrote)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read secrets file: {reason}") from None
    try:
        return contract.dotenv_loads(text, str(path))
    except contract.DotenvError as exc:
        raise ConfigError(str(exc)) from None


# --- YAML ------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping_no_dupes(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_dupes)


class _Reader:
    """Typed access to the parsed YAML that reports errors as `file: field.path: problem`."""

    def __init__(self, path: Path, secrets: dict[str, str] | None = None) -> None:
        self.path = path
        self.secrets = secrets

    def fail(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {msg}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required=()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_typename(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(_join(where, key), f"unknown key (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                raise self.fail(_join(where, key), "missing")
        return value

    def string(self, value: Any, where: str, *, optional=False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, got {_typename(value)}")
        return value

    def number(self, value: Any, where: str, *, minimum: float, integer=False) -> float | int:
        ok_types = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            want = "an integer" if integer else "a number"
            raise self.fail(where, f"must be {want}, got {_typename(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            # .inf or .nan would make /status (strict JSON) unanswerable
            raise self.fail(where, f"must be a finite number, got {value}")
        if value < minimum:
            raise self.fail(where, f"must be >= {minimum}, got {value}")
        return value

    def abspath(self, value: Any, where: str, *, optional=False) -> Path | None:
        text = self.string(value, where, optional=optional)
        if text is None:
            return None
        if not os.path.isabs(text):
            raise self.fail(where, f"must be an absolute path, got {text!r}")
        return Path(text)

    def name(self, value: Any, where: str, what: str) -> str:
        problem = contract.name_problem(value, what)
        if problem:
            raise self.fail(where, problem)
        return value

    def secret(self, value: Any, where: str, *, optional=False) -> tuple[str | None, str | None]:
        """(env name, resolved value)."""
        env = self.string(value, where, optional=optional)
        if env is None:
            return None, None
        if not contract.ENV_NAME.fullmatch(env):
            raise self.fail(where, f"must be an environment-style name, got {env!r}")
        if self.secrets is None:
            raise self.fail(where, f"names secret {env} but no secrets_file is configured")
        if env not in self.secrets:
            raise self.fail(where, f"secret {env} is not defined in the secrets file")
        return env, self.secrets[env]


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_PROBE_KEYS = tuple(f.name for f in fields(ProbeSettings))


def _probe(r: _Reader, raw: Any, where: str, base: ProbeSettings) -> ProbeSettings:
    raw = r.mapping(raw, where, _PROBE_KEYS)
    values = {f.name: getattr(base, f.name) for f in fields(ProbeSettings)}
    for key, value in raw.items():
        at = _join(where, key)
        if key == "paid_probe":
            if not isinstance(value, bool):
                raise r.fail(at, f"must be true or false, got {_typename(value)}")
            values[key] = value
        elif key in ("fall", "rise"):
            values[key] = r.number(value, at, minimum=1, integer=True)
        elif key in ("interval", "timeout"):
            values[key] = float(r.number(value, at, minimum=0.01))
        elif key == "max_hold":
            values[key] = float(r.number(value, at, minimum=1))
        else:
            values[key] = float(r.number(value, at, minimum=0))
    if values["damping_cap"] < values["damping_base"]:
        raise r.fail(_join(where, "damping_cap"),
                     f"must be >= damping_base ({values['damping_base']}), got {values['damping_cap']}")
    return ProbeSettings(**values)


def _host_port(r: _Reader, raw: Any, where: str) -> tuple[str, int]:
    text = r.string(raw, where)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise r.fail(where, f"must be HOST:PORT, got {text!r}")
    return host, int(port)


def host_port(pair: tuple[str, int]) -> str:
    """A listen address as the config writes it (what _host_port reads back)."""
    return f"{pair[0]}:{pair[1]}"


def _private_listen(r: _Reader, raw: Any) -> tuple[str, int] | None:
    if raw is None:
        return None
    host, port = _host_port(r, raw, "private_listen")
    problem = contract.private_address_problem(host)
    if problem:
        raise r.fail("private_listen", problem)
    return host, port


def _listen(r: _Reader, raw: Any) -> tuple[str, int]:
    host, port = _host_port(r, raw, "listen")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # /status and the metrics name every backend and wizard: they stay on this host.
        raise r.fail("listen", f"must be a loopback address such as 127.0.0.1, got {host!r}")
    return host, port


def _url(r: _Reader, raw: Any, where: str) -> str:
    text = r.string(raw, where)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.fail(where, f"must be an http(s) URL, got {text!r}")
    return text


def _hooks(r: _Reader, raw: Any) -> HooksConfig:
    raw = r.mapping(raw, "hooks", ("command", "webhook", "telegram", "settle"))
    command = r.string(raw.get("command"), "hooks.command", optional=True)
    webhook = raw.get("webhook")
    if webhook is not None:
        webhook = _url(r, webhook, "hooks.webhook")
    telegram = raw.get("telegram")
    if telegram is not None:
        tg = r.mapping(telegram, "hooks.telegram", ("token_env", "chat_id"),
                       required=("token_env", "chat_id"))
        r.secret(tg["token_env"], "hooks.telegram.token_env")
        chat = tg["chat_id"]
        if isinstance(chat, bool) or not isinstance(chat, (str, int)) or chat == "":
            raise r.fail("hooks.telegram.chat_id", f"must be a string or integer, got {_typename(chat)}")
        telegram = {"token_env": tg["token_env"], "chat_id": str(chat)}
    settle = float(r.number(raw.get("settle", contract.NOTICE_SETTLE_DEFAULT), "hooks.settle",
                            minimum=0))
    return HooksConfig(command=command, webhook=webhook, telegram=telegram, settle=settle)


_BACKEND_KEYS = ("name", "kind", "base_url", "model", "api_key_env", "variant", "context_length",
                 "host")


def _backend(r: _Reader, raw: Any, where: str) -> BackendConfig:
    raw = r.mapping(raw, where, _BACKEND_KEYS, required=("name", "kind", "base_url", "model", "variant"))
    name = r.name(raw["name"], f"{where}.name", "backend")
    kind = raw["kind"]
    if kind not in KINDS:
        raise r.fail(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    key_where = f"{where}.api_key_env"
    if kind in KEYED_KINDS and raw.get("api_key_env") is None:
        raise r.fail(key_where, f"required for kind {kind}")
    env, key = r.secret(raw.get("api_key_env"), key_where, optional=True)
    return BackendConfig(
        name=name, kind=kind, base_url=_url(r, raw["base_url"], f"{where}.base_url"),
        model=r.string(raw["model"], f"{where}.model"), api_key=key,
        variant=r.abspath(raw["variant"], f"{where}.variant"), api_key_env=env,
        context_length=(None if raw.get("context_length") is None else r.number(
            raw["context_length"], f"{where}.context_length", minimum=1, integer=True)),
        host=None if raw.get("host") is None else r.string(raw["host"], f"{where}.host"))


_WIZARD_KEYS = ("unit", "api_port", "api_key_env", "home", "active_config", "probe", "backends",
                "restart")


def _wizard(r: _Reader, name: Any, raw: Any, defaults: ProbeSettings) -> WizardConfig:
    where = f"wizards.{name}"
    r.name(name, where, "wizard")
    raw = r.mapping(raw, where, _WIZARD_KEYS,
                    required=("unit", "api_port", "api_key_env", "home", "active_config", "backends"))
    backends_raw = raw["backends"]
    if not isinstance(backends_raw, list):
        raise r.fail(f"{where}.backends", f"must be a list, got {_typename(backends_raw)}")
    if len(backends_raw) < 2:
        raise r.fail(f"{where}.backends",
                     f"needs at least 2 backends to fail over between, got {len(backends_raw)}")
    backends, seen = [], set()
    for i, b in enumerate(backends_raw):
        backend = _backend(r, b, f"{where}.backends[{i}]")
        if backend.name in seen:
            raise r.fail(f"{where}.backends[{i}].name", f"duplicate backend name {backend.name!r}")
        seen.add(backend.name)
        backends.append(backend)
    api_key_env, api_key = r.secret(raw["api_key_env"], f"{where}.api_key_env")
    return WizardConfig(
        name=name, unit=r.string(raw["unit"], f"{where}.unit"),
        api_port=r.number(raw["api_port"], f"{where}.api_port", minimum=1, integer=True),
        api_key=api_key, home=r.abspath(raw["home"], f"{where}.home"),
        active_config=r.abspath(raw["active_config"], f"{where}.active_config"),
        probe=_probe(r, raw.get("probe"), f"{where}.probe", defaults),
        backends=tuple(backends), api_key_env=api_key_env,
        restart=_flag(r, raw.get("restart", contract.RESTART_ON_SWITCH_DEFAULT), f"{where}.restart"))


def _flag(r: _Reader, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise r.fail(where, f"must be true or false, got {_typename(value)}")
    return value


_TOP_KEYS = ("listen", "control_socket", "state_dir", "secrets_file", "probe", "hooks", "wizards",
             "private_listen", "metrics_token_file", "units",
             "model_check_dir")


def _units(r: _Reader, raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.fail("units", f"must be a list of unit names, got {_typename(raw)}")
    return tuple(r.string(u, f"units[{i}]") for i, u in enumerate(raw))


def _check_secrets_mode(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # read_dotenv reports it
    if mode & stat.S_IRWXO:
        raise ConfigError(f"{path}: secrets file is accessible to other users "
                          f"(mode {stat.S_IMODE(mode):04o}); chmod o-rwx it")


def _under(root: Path | None, path: Path) -> Path:
    """`path` as found under `root` (a rendered host tree), or itself on the host."""
    return path if root is None else Path(root) / path.relative_to(path.anchor)


def load(path: str | os.PathLike, root: str | os.PathLike | None = None) -> SidecarConfig:
    """Load and check the config. `root`: the paths it names are taken relative to this
    directory (a tree written by `neverdark render`), and every variant must exist there."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    r = _Reader(path)
    doc = r.mapping(doc, "", _TOP_KEYS, required=("listen", "control_socket", "state_dir", "wizards"))
    secrets_file = r.abspath(doc.get("secrets_file"), "secrets_file", optional=True)
    if secrets_file is not None:
        _check_secrets_mode(_under(root, secrets_file))
        r.secrets = read_dotenv(_under(root, secrets_file))
    probe = _probe(r, doc.get("probe"), "probe", ProbeSettings())
    wizards_raw = doc["wizards"]
    if not isinstance(wizards_raw, dict) or not wizards_raw:
        raise r.fail("wizards", "must be a non-empty mapping of wizard name to settings")
    wizards = {name: _wizard(r, name, raw, probe) for name, raw in wizards_raw.items()}
    private = _private_listen(r, doc.get("private_listen"))
    token_file = r.abspath(doc.get("metrics_token_file"), "metrics_token_file", optional=True)
    if private is not None and token_file is None:
        raise r.fail("metrics_token_file", "required with private_listen (its requests must "
                                           "bear the token)")
    if root is not None:
        for w in wizards.values():
            for i, b in enumerate(w.backends):
                if not _under(root, b.variant).is_file():
                    raise r.fail(f"wizards.{w.name}.backends[{i}].variant",
                                 f"{b.variant} is not in {root}")
    return SidecarConfig(
        path=path, listen=_listen(r, doc["listen"]),
        control_socket=r.abspath(doc["control_socket"], "control_socket"),
        state_dir=r.abspath(doc["state_dir"], "state_dir"), secrets_file=secrets_file,
        probe=probe, hooks=_hooks(r, doc.get("hooks")), wizards=wizards,
        secrets=dict(r.secrets or {}), private_listen=private, metrics_token_file=token_file,
        units=_units(r, doc.get("units")),
        model_check_dir=r.abspath(doc.get("model_check_dir", contract.MODEL_CHECK_DIR),
                                  "model_check_dir"))


# --- writing (the deploy) --------------------------------------------------------------------

def _probe_doc(p: ProbeSettings, base: ProbeSettings | None = None) -> dict:
    """Every setting (top level), or only those that differ from `base` (a wizard's)."""
    out = {}
    for f in fields(ProbeSettings):
        value = getattr(p, f.name)
        if base is None or value != getattr(base, f.name):
            out[f.name] = value
    return out


def dump(cfg: SidecarConfig) -> tuple[str, str]:
    """(sidecar.yaml, its secrets file): what `load` reads back as an equal config."""
    secrets: dict[str, str] = {}

    def ref(env: str | None, value: str | None) -> str | None:
        if env is None:
            return None
        if secrets.get(env, value) != value:
            raise ConfigError(f"{env}: two different secrets would share this variable")
        secrets[env] = value
        return env

    wizards = {}
    for name, w in cfg.wizards.items():
        wizards[name] = {
            "unit": w.unit, "api_port": w.api_port, "api_key_env": ref(w.api_key_env, w.api_key),
            "home": str(w.home), "active_config": str(w.active_config),
            "probe": _probe_doc(w.probe, cfg.probe), "restart": w.restart,
            "backends": [{"name": b.name, "kind": b.kind, "base_url": b.base_url,
                          "model": b.model, "api_key_env": ref(b.api_key_env, b.api_key),
                          "variant": str(b.variant), "context_length": b.context_length,
                          **({"host": b.host} if b.host else {})}
                         for b in w.backends]}
    telegram = None
    if cfg.hooks.telegram:
        env = cfg.hooks.telegram["token_env"]
        ref(env, cfg.secrets[env])
        telegram = {"token_env": env, "chat_id": str(cfg.hooks.telegram["chat_id"])}
    doc = {
        "listen": host_port(cfg.listen),
        "control_socket": str(cfg.control_socket),
        "state_dir": str(cfg.state_dir),
        "secrets_file": str(cfg.secrets_file) if cfg.secrets_file else None,
        "probe": _probe_doc(cfg.probe),
        "hooks": {"command": cfg.hooks.command, "webhook": cfg.hooks.webhook,
                  "telegram": telegram, "settle": cfg.hooks.settle},
        "units": list(cfg.units),
        "wizards": wizards,
    }
    if cfg.private_listen is not None:
        doc["private_listen"] = host_port(cfg.private_listen)
        doc["metrics_token_file"] = str(cfg.metrics_token_file)
    if cfg.model_check_dir != Path(contract.MODEL_CHECK_DIR):   # the default stays implicit
        doc["model_check_dir"] = str(cfg.model_check_dir)
    text = ("# Generated by neverdark from the inventory; edits are overwritten.\n"
            + yaml.safe_dump(doc, sort_keys=False))
    try:
        env_text = contract.dotenv_dumps(dict(sorted(secrets.items())))
    except contract.DotenvError as exc:
        raise ConfigError(str(exc)) from None
    return text, env_text
