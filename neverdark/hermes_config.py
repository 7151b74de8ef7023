"""What neverdark writes for a Hermes 0.19.0 gateway: pure functions that return file contents.

Measured on the real gateway (docs/hermes.md has the evidence); the choices below follow from it:

- HERMES_MANAGED_DIR/config.yaml is merged over HERMES_HOME/config.yaml leaf by leaf, live. So
  every variant sets every `model.*` leaf the base config sets: a leaf a variant leaves out
  silently keeps the base (primary) value, e.g. the primary's api_key reaching a local server.
- `${VAR}` in either config is expanded from the process environment, into which Hermes loads
  HERMES_HOME/.env (and reloads it every turn). Files other than .env hold only `${VAR}` names.
- Which key a provider sends: `anthropic` and `gemini` ignore `model.api_key` and read fixed
  environment names (ANTHROPIC_API_KEY; GOOGLE_API_KEY before GEMINI_API_KEY); `custom` sends
  `model.api_key`. A fallback_providers entry sends its own key for every provider, but that list
  is read without `${VAR}` expansion, so its entries name the variable in `key_env` instead.
- The API server reads its key from API_SERVER_KEY only (`${VAR}` is not expanded there, and an
  inline key would sit in a config file), and Telegram its token from TELEGRAM_BOT_TOKEN.
- `agent.environment_hint` goes into the system prompt and is read through the managed overlay
  whenever an agent is built, so a variant carries its own degraded-mode notice: one atomic file
  swap moves model and notice together.
- The same holds for what the prompt carries (tools, guidance blocks, probe, platform hint,
  memory): each backend's variant carries its profile, `lean` (a small local model: no tool
  schemas unless chosen, no tool guidance, a short platform hint, no memory injection) or `full`
  (Hermes' own behaviour). Every variant sets every profile key, the full one to Hermes' defaults,
  so the merged config never depends on what a previous variant or the base said.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from neverdark import contract

DEFAULT_NOTICE = (
    "I'm running on a smaller brain right now: my usual model is unreachable, so a backup model "
    "is answering. I can still help, but I'm not as sharp as usual, so please double-check "
    "anything important. Mention this briefly when it matters to the answer."
)

HERMES_MIN_CONTEXT = contract.HERMES_MIN_CONTEXT
API_SERVER_HOST = contract.LOOPBACK
# llama-cpp-python's server takes no key; any non-empty value keeps Hermes from substituting
# another backend's key (leaf merge, fallback entries without api_key).
LOCAL_API_KEY = "no-key-required"

# Hermes' provider per neverdark backend kind, and the environment name it reads the key from
# (None: per-backend name, sent through `model.api_key: ${NAME}`).
PROVIDER = {"anthropic": "anthropic", "openai": "custom", "google": "gemini", "ollama": "custom",
            "local": "custom"}
FIXED_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "google": "GOOGLE_API_KEY"}

# --- prompt profiles ---------------------------------------------------------------------------
# What a wizard's prompt carries on one backend. Measured through the real gateway (docs/hermes.md,
# "What the small model gets"): Hermes 0.19.0 sends a local backend a ~1,700-token system prompt
# plus 16 tool schemas (~11,000 tokens) that llama-cpp-python's chatml format drops unseen.
PROFILES = ("lean", "full")
DEFAULT_PROFILE = {"local": "lean", "ollama": "lean", "anthropic": "full", "openai": "full",
                   "google": "full"}
# The platforms a wizard talks on (platform_toolsets.<platform>, platform_hints.<platform>).
PLATFORMS = ("api_server", "telegram")

# Hermes 0.19.0's configurable toolsets (hermes_cli/tools_config.py CONFIGURABLE_TOOLSETS): the
# names `platform_toolsets.<platform>` takes. tests/test_hermes_config.py checks this tuple against
# the installed Hermes.
HERMES_TOOLSETS = (
    "web", "browser", "terminal", "file", "code_execution", "vision", "video", "image_gen",
    "video_gen", "x_search", "tts", "skills", "todo", "memory", "context_engine",
    "session_search", "clarify", "delegation", "cronjob", "homeassistant", "spotify", "discord",
    "discord_admin", "yuanbao", "computer_use",
)
# What a user notices missing when these toolsets are absent, for the notice (the five Hermes
# uses most; the rest would only lengthen the prompt).
ABILITIES = (
    ("memory", "remember things between conversations"),
    ("file", "read or write files"),
    ("terminal", "run commands"),
    ("cronjob", "schedule tasks"),
    ("web", "search the web"),
)

# Hermes 0.19.0's defaults (hermes_cli/config.py DEFAULT_CONFIG), which the full profile writes
# explicitly, and what the lean profile writes instead. api_max_retries: app-level attempts per
# API call; on a local server a second attempt covers a restart, a third would only add another
# read timeout (minutes on a Pi) before the turn fails.
FULL_AGENT = {"tool_use_enforcement": "auto", "task_completion_guidance": True,
              "parallel_tool_call_guidance": True, "environment_probe": True,
              "api_max_retries": 3}
LEAN_AGENT = {"tool_use_enforcement": False, "task_completion_guidance": False,
              "parallel_tool_call_guidance": False, "environment_probe": False,
              "api_max_retries": 2}
FULL_MEMORY = {"memory_enabled": True, "user_profile_enabled": True}
LEAN_MEMORY = {"memory_enabled": False, "user_profile_enabled": False}
# Replaces Hermes' platform hint (API server: 57 tokens; Telegram: ~150 about markdown and media).
LEAN_PLATFORM_HINTS = {
    "api_server": "Plain text, no markdown.",
    "telegram": "You are chatting on Telegram. Plain text, no markdown.",
}
BREVITY_HINT = "Answer briefly: one to three sentences."

API_SERVER_KEY_ENV = "API_SERVER_KEY"
TELEGRAM_TOKEN_ENV = "TELEGRAM_BOT_TOKEN"
TELEGRAM_USERS_ENV = "TELEGRAM_ALLOWED_USERS"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _backends(wizard) -> list:
    backends = list(_get(wizard, "backends") or [])
    if not backends:
        raise ValueError(f"wizard {_get(wizard, 'name')!r} has no backends")
    return backends


def key_env(wizard, backend) -> str | None:
    """The environment name the wizard's .env holds this backend's key under."""
    kind = _get(backend, "kind")
    if kind in ("local", "openai", "ollama") and not _get(backend, "api_key_secret"):
        # neverdark's own server on loopback, or one that wants no key (Ollama, a local vLLM)
        return None
    if kind in FIXED_KEY_ENV:
        return FIXED_KEY_ENV[kind]
    if kind in ("openai", "ollama", "local"):
        # (local: a server other hosts of the fleet reach, which takes its key)
        # Never OPENAI_API_KEY: Hermes hands that to any entry lacking a key of its own.
        return contract.backend_key_env(str(_get(wizard, "name")), str(_get(backend, "name")))
    raise ValueError(f"backend {_get(backend, 'name')!r}: unknown kind {kind!r}")


def _api_key_ref(wizard, backend) -> str:
    env = key_env(wizard, backend)
    return LOCAL_API_KEY if env is None else "${%s}" % env


def _context_length(wizard, backend) -> int:
    n = int(_get(backend, "context_length"))
    if n < HERMES_MIN_CONTEXT:
        raise ValueError(
            f"wizard {_get(wizard, 'name')!r} backend {_get(backend, 'name')!r}: context_length "
            f"{n} < {HERMES_MIN_CONTEXT}; Hermes 0.19.0 refuses such a model on every request")
    return n


def _model_section(wizard, backend) -> dict:
    return {
        "provider": PROVIDER[_get(backend, "kind")],
        "default": _get(backend, "model"),
        "base_url": _get(backend, "base_url"),
        "api_key": _api_key_ref(wizard, backend),
        "context_length": _context_length(wizard, backend),
        "max_tokens": int(_get(backend, "max_tokens")),
    }


def _fallback_entry(wizard, backend) -> dict:
    # Hermes reads fallback_providers as raw YAML: a `${VAR}` api_key would be sent literally.
    # `key_env` is looked up in the environment (.env included); a local entry gets the
    # placeholder, since one with neither is handed the primary's key.
    entry = {"provider": PROVIDER[_get(backend, "kind")], "model": _get(backend, "model"),
             "base_url": _get(backend, "base_url")}
    env = key_env(wizard, backend)
    if env is None:
        entry["api_key"] = LOCAL_API_KEY
    else:
        entry["key_env"] = env
    return entry


def provider_key(backend) -> str:
    """The `providers.<name>` entry that pins a backend's context window."""
    return "neverdark-" + re.sub(r"[^a-z0-9-]", "-", str(_get(backend, "name")).lower())


def secret_names(wizard) -> list[str]:
    """Every secret the wizard's .env needs, by inventory name."""
    names = [_get(wizard, "api_key_secret")]
    if _get(wizard, "telegram_token_secret"):
        names.append(_get(wizard, "telegram_token_secret"))
    names += [_get(b, "api_key_secret") for b in _backends(wizard) if _get(b, "api_key_secret")]
    return list(dict.fromkeys(names))


def _dump(doc: dict, header: str) -> str:
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)


def render_base_config(wizard) -> str:
    """HERMES_HOME/config.yaml: the deploy-owned content (see docs/hermes.md on ownership)."""
    backends = _backends(wizard)
    primary = backends[0]
    platforms: dict = {"api_server": {"enabled": True, "extra": {
        "host": API_SERVER_HOST, "port": int(_get(wizard, "api_port"))}}}
    if _get(wizard, "telegram_token_secret"):
        platforms["telegram"] = {"enabled": True}
        if _get(wizard, "telegram_api_url"):
            platforms["telegram"]["extra"] = {"base_url": _get(wizard, "telegram_api_url")}
    doc = {
        "model": _model_section(wizard, primary),
        # Hermes' own per-turn fallback. Read from this file only (never from the managed
        # override), so it lists the whole chain below the primary; Hermes skips the entry that
        # matches the active provider+model when the sidecar has moved the wizard down.
        "fallback_providers": [_fallback_entry(wizard, b) for b in backends[1:]],
        # A switch to a fallback drops model.context_length; Hermes then looks the window up by
        # base_url+model here instead of online (or in its built-in table: gemma -> 8192).
        "providers": {provider_key(b): {
            "base_url": _get(b, "base_url"),
            "models": {_get(b, "model"): {"context_length": _context_length(wizard, b)}},
        } for b in backends},
        "platforms": platforms,
        "security": {"tirith_enabled": False, "allow_lazy_installs": False},
    }
    return _dump(doc, f"# Managed by neverdark for wizard {_get(wizard, 'name')}; "
                      "secrets are ${VAR} names resolved from .env.\n")


def profile(backend) -> str:
    """The backend's prompt profile: `lean` or `full` (default by kind: local backends lean)."""
    value = _get(backend, "profile") or DEFAULT_PROFILE[_get(backend, "kind")]
    if value not in PROFILES:
        raise ValueError(f"backend {_get(backend, 'name')!r}: profile {value!r} is not one of "
                         f"{', '.join(PROFILES)}")
    return value


def toolsets(backend) -> list[str] | None:
    """The Hermes toolsets a backend's turns offer: None for Hermes' own per-platform defaults
    (full profile without a list), else the list ([] on a lean backend unless one is given)."""
    tools = _get(backend, "tools")
    if tools is None:
        return [] if profile(backend) == "lean" else None
    unknown = [t for t in tools if t not in HERMES_TOOLSETS]
    if unknown:
        raise ValueError(f"backend {_get(backend, 'name')!r}: unknown Hermes toolset(s) "
                         f"{', '.join(map(repr, unknown))} (Hermes 0.19.0 has: "
                         f"{', '.join(HERMES_TOOLSETS)})")
    return list(tools)


def missing_abilities(backend) -> list[str]:
    """What the user loses on this backend, in words, for the notice (empty on a full profile
    with Hermes' default toolsets)."""
    tools = toolsets(backend)
    if tools is None:
        return []
    return [words for name, words in ABILITIES if name not in tools]


def _sentence_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def environment_hint(wizard, backend) -> str:
    """agent.environment_hint for one backend: the degraded notice on fallbacks; on a lean
    profile also what the backend cannot do and the brevity hint."""
    b = contract.find_backend(wizard, backend)   # a backend of the wizard, or its name
    degraded = _get(b, "name") != _get(_backends(wizard)[0], "name")
    parts = [(_get(wizard, "notice") or DEFAULT_NOTICE).strip()] if degraded else []
    if profile(b) == "lean":
        missing = missing_abilities(b)
        if missing:
            parts.append(f"Right now you cannot {_sentence_list(missing)}: if asked, say so "
                         "and offer to help once your usual model is back." if degraded else
                         f"You cannot {_sentence_list(missing)}: if asked, say so.")
        parts.append(BREVITY_HINT)
    return " ".join(parts)


def profile_sections(backend) -> dict:
    """The config sections a backend's profile sets, every key on every profile: the managed
    override is merged leaf by leaf, so a key one variant set and the next left out would keep
    whatever the base config says instead of the backend's own value."""
    lean = profile(backend) == "lean"
    tools = toolsets(backend)
    memory = dict(LEAN_MEMORY if lean else FULL_MEMORY)
    if lean and tools and "memory" in tools:
        memory = dict(FULL_MEMORY)   # the memory tool without its notes would write blind
    return {
        "agent": dict(LEAN_AGENT if lean else FULL_AGENT),
        # null: Hermes' default toolset for the platform (hermes-api-server, hermes-telegram).
        "platform_toolsets": {p: None if tools is None else list(tools) for p in PLATFORMS},
        # An empty `replace` keeps Hermes' own hint.
        "platform_hints": {p: {"replace": LEAN_PLATFORM_HINTS[p] if lean else ""}
                           for p in PLATFORMS},
        "memory": memory,
    }


def render_variant(wizard, backend) -> str:
    """One backend's override for HERMES_MANAGED_DIR/config.yaml (0640: names, never values)."""
    b = contract.find_backend(wizard, backend)   # a backend of the wizard, or its name
    degraded = _get(b, "name") != _get(_backends(wizard)[0], "name")
    sections = profile_sections(b)
    doc = {"model": _model_section(wizard, b),
           # Set on the primary too (empty) so the merged config never depends on the base.
           "agent": {"environment_hint": environment_hint(wizard, b), **sections.pop("agent")},
           **sections}
    return _dump(doc, f"# neverdark backend variant {_get(b, 'name')} of wizard "
                      f"{_get(wizard, 'name')} ({'fallback' if degraded else 'primary'}, "
                      f"{profile(b)} profile).\n")


def render_env(wizard, secrets: Mapping[str, str]) -> str:
    """HERMES_HOME/.env (0600): exactly the keys the wizard needs, under Hermes' names."""
    def value(secret: str) -> str:
        if secret not in secrets:
            raise KeyError(f"wizard {_get(wizard, 'name')!r}: secret {secret!r} not provided")
        return secrets[secret]

    env: dict[str, str] = {API_SERVER_KEY_ENV: value(_get(wizard, "api_key_secret"))}
    for b in _backends(wizard):
        name = key_env(wizard, b)
        if name is None:
            continue
        v = value(_get(b, "api_key_secret"))
        if env.get(name, v) != v:
            raise ValueError(
                f"wizard {_get(wizard, 'name')!r}: two {_get(b, 'kind')} backends need different "
                f"keys, but Hermes reads every {_get(b, 'kind')} key from {name}")
        env[name] = v
    if _get(wizard, "telegram_token_secret"):
        env[TELEGRAM_TOKEN_ENV] = value(_get(wizard, "telegram_token_secret"))
        users = [str(u) for u in _get(wizard, "telegram_allowed_users") or []]
        if users:
            # Not a secret, but Hermes reads the allowlist from the environment only.
            env[TELEGRAM_USERS_ENV] = ",".join(users)
    return contract.dotenv_dumps(env)


def render_soul(wizard, degraded: bool = False) -> str:
    """HERMES_HOME/SOUL.md. Empty without a persona: Hermes then uses its built-in identity and
    leaves the file alone (it seeds its default only where SOUL.md is missing).

    The degraded notice normally travels in the variant (agent.environment_hint); `degraded`
    is for callers that want it in the persona itself.
    """
    persona = (_get(wizard, "persona") or "").strip()
    parts = [persona] if persona else []
    if degraded:
        parts.append(_get(wizard, "notice") or DEFAULT_NOTICE)
    return "\n\n".join(parts) + ("\n" if parts else "")


def session_path(headers: Mapping[str, str]) -> str | None:
    """Where the API server tells which model answered a chat completion: its session record.

    `headers` are the chat completion's response headers (case-insensitive mapping, e.g. httpx's);
    GET the returned path on the same API server with the same Bearer key.
    """
    sid = headers.get("X-Hermes-Session-Id") or headers.get("x-hermes-session-id")
    return f"/api/sessions/{sid}" if sid else None


def answered_by(response_json: Any) -> str | None:
    """The model that answered, from the JSON of `GET /api/sessions/<X-Hermes-Session-Id>`.

    The chat completion itself cannot tell: Hermes 0.19.0 echoes the request's `model` field
    there, with no header naming the backend. The session record's `model` is the model that
    produced the last answer, updated when Hermes' own per-turn fallback took over. A chat
    completion body (or anything else) gives None rather than the echoed name.
    """
    if not isinstance(response_json, Mapping) or response_json.get("object") != "hermes.session":
        return None
    model = (response_json.get("session") or {}).get("model")
    return model or None


def backend_for_model(wizard, model: str | None) -> str | None:
    """The backend name answered_by's model belongs to (None when unknown or ambiguous)."""
    names = [_get(b, "name") for b in _backends(wizard) if _get(b, "model") == model]
    return names[0] if len(names) == 1 else None


def variant_summary(text: str) -> dict:
    """The model section a rendered variant selects (for the sidecar's logs and checks)."""
    return dict((yaml.safe_load(text) or {}).get("model") or {})


__all__ = [
    "DEFAULT_NOTICE", "HERMES_MIN_CONTEXT", "PROVIDER", "FIXED_KEY_ENV", "key_env",
    "secret_names", "render_base_config", "render_variant", "render_env", "render_soul",
    "answered_by", "session_path", "backend_for_model", "provider_key", "variant_summary",
    "PROFILES", "HERMES_TOOLSETS", "profile", "toolsets", "environment_hint", "profile_sections",
]
