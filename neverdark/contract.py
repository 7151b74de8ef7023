"""What the inventory, the plan, the deployers, the sidecar and the testinfra suite agree on.

One source for each fact that crosses the plan/sidecar boundary: which names are allowed, what
they become on a host (paths, users, units, environment names), backend kinds, probe defaults,
the context floor, and the one dotenv codec every file neverdark writes is read back with.

Standard library only: the sidecar imports this module on hosts where nothing else of neverdark
is installed (the deploy ships it beside the sidecar's code).

Why one module: it is the one source for these facts on both sides, and the deploy ships it to
hosts as this single file beside the sidecar's code; split, that one source would be several,
each to be shipped and kept in step.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

# --- names -----------------------------------------------------------------------------------
# Every name in the inventory becomes part of a path, a Linux user, a systemd unit, a metric
# label or an environment variable on a host. One rule for all of them, matched in full (a
# trailing newline is not a name): lowercase letters and digits, then also '.', '_' and '-'.
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
USER_MAX = 32            # useradd's limit on Linux user names
UNIT_MAX = 255           # systemd's limit on unit names
NAME_MAX = 64            # any name: short enough for logs, labels and file names
WIZARD_USER_PREFIX = "hermes-"
WIZARD_MAX = USER_MAX - len(WIZARD_USER_PREFIX)   # it becomes the user hermes-<wizard>


def name_problem(value: object, what: str = "name") -> str | None:
    """Why `value` cannot be a neverdark name (None: it can). `what` is 'wizard', 'backend',
    'model', 'host' or 'name', for the length limit and the message."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not _NAME.fullmatch(value):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"{shown!r} is not a valid {what} name: use {NAME_RULE}"
    limit = WIZARD_MAX if what == "wizard" else NAME_MAX
    if len(value) > limit:
        why = f" (it becomes the Linux user {WIZARD_USER_PREFIX}<name>)" if what == "wizard" else ""
        return f"is {len(value)} characters long; at most {limit}{why}"
    for unit in _units_named_by(value, what):
        if len(unit) > UNIT_MAX:
            return f"makes the unit name {unit[:40]}... longer than systemd's {UNIT_MAX}"
    return None


# --- what reaches ssh, pyinfra and testinfra on the operator's machine -----------------------
# A host's address, ssh user and key paths end up in ssh's argv (neverdark status, drill,
# failover), in testinfra's ssh command line (run through a shell) and in pyinfra's connector.
# None of them may start with '-' (ssh would read `-oProxyCommand=...` as an option and run it),
# hold whitespace, quotes or shell syntax, or any control character.
SSH_USER_RULE = "letters, digits, '.', '_' or '-', starting with a letter or '_'"
_SSH_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
LOCAL_PATH_RULE = "letters, digits and _ . / ~ + @ : , = -, not starting with '-'"
_LOCAL_PATH = re.compile(r"[A-Za-z0-9_./~+@:,=][A-Za-z0-9_./~+@:,=-]*")
PATH_MAX = 4096


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."


def ssh_user_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not _SSH_USER.fullmatch(value) or len(value) > USER_MAX:
        return (f"{_shown(value)} is not a user name: use {SSH_USER_RULE}, at most {USER_MAX} "
                "characters")
    return None


def address_problem(value: object) -> str | None:
    """An IP address or a DNS name (or an ssh_config alias of the same form)."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    labels = value.split(".")
    if len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return (f"{_shown(value)} is neither an IP address nor a DNS name (labels of letters, "
                "digits, '-' and '_', not starting or ending with '-', joined by '.')")
    return None


def private_address_problem(value: object) -> str | None:
    """A host's address on the fleet's own network (LAN, WireGuard, Tailscale's 100.64.0.0/10):
    an IP literal that is not routed on the internet, so what listens there (a model server
    other hosts fall back onto, the sidecar's metrics) is never on a public address."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return f"{_shown(value)} is not an IP address (a private address is given as one)"
    if ip.is_global or ip.is_multicast or ip.is_unspecified or ip.is_loopback \
            or ip.is_reserved:
        return (f"{_shown(value)} is not a private address: use the host's LAN (10/8, "
                "172.16/12, 192.168/16, fc00::/7), WireGuard or Tailscale (100.64/10) address")
    return None


def local_path_problem(value: object) -> str | None:
    """A file on the operator's machine that ssh, pyinfra or testinfra is handed."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not _LOCAL_PATH.fullmatch(value) or len(value) > PATH_MAX:
        return f"{_shown(value)} is not a usable path here: use {LOCAL_PATH_RULE}"
    return None


def _units_named_by(value: str, what: str) -> list[str]:
    if what == "wizard":
        return [wizard_unit(value)]
    if what == "model":
        return [llama_unit(value)]
    return []


# --- users, units, paths ---------------------------------------------------------------------
ETC = "/etc/neverdark"
VAR = "/var/lib/neverdark"
OPT = "/opt/neverdark"
UNIT_DIR = "/etc/systemd/system"

LLAMA_USER = "neverdark-llama"
SIDECAR_USER = "neverdark-sidecar"
OPS_GROUP = "neverdark-ops"            # operators allowed on the sidecar's control socket

MODELS_DIR = f"{VAR}/models"
WIZARDS_ETC = f"{ETC}/wizards"
WIZARDS_VAR = f"{VAR}/wizards"
ARCHIVE_DIR = f"{VAR}/archive"

SIDECAR_UNIT = "neverdark-sidecar.service"
SIDECAR_DIR = f"{OPT}/sidecar"
SIDECAR_LIB = f"{SIDECAR_DIR}/lib"
SIDECAR_PYTHON = f"{SIDECAR_DIR}/venv/bin/python"
SIDECAR_CONFIG = f"{ETC}/sidecar.yaml"
SIDECAR_ENV = f"{ETC}/sidecar.env"
SIDECAR_STATE_DIR = f"{VAR}/sidecar/state"
SIDECAR_SUDOERS = "/etc/sudoers.d/neverdark-sidecar"
CONTROL_SOCKET = "/run/neverdark-sidecar/control.sock"
# The bearer token Prometheus presents to the sidecar's private listener (`sidecar: {metrics:
# private}`): made on the host by the deploy, 0600, the sidecar user's; never leaves the host
# but through `neverdark prometheus` (over ssh, into a 0600 file).
METRICS_TOKEN_FILE = f"{ETC}/sidecar-metrics.token"
METRICS_TOKEN_MIN = 16        # printable characters the sidecar accepts; the deploy makes 64
METRICS_MODES = ("loopback", "private")
# An operator notice's incident is over once its cause has been quiet this long (s).
NOTICE_SETTLE_DEFAULT = 120.0
LLAMA_DIR = f"{OPT}/llama"
# The llama-cpp-python launcher (the package llama_launcher), run as `python -m llama_launcher`
# with this on its path.
LLAMA_LIB = f"{LLAMA_DIR}/lib"
HERMES_DIR = f"{OPT}/hermes"

# `neverdark model check` (sidecar/modelcheck.py): is a wizard's local model fast enough? A warm
# turn (the conversation's prefix cached, a new message, a brief answer) must fit the interactive
# budget, the Telegram case (issue 17). neverdark.models.speed estimates against the same figures.
INTERACTIVE_BUDGET_S = 10.0
ANSWER_TOKENS = 60               # a brief answer
MODEL_CHECK_DIR = f"{VAR}/model-check"   # <wizard>.json, the latest result; the sidecar exports it

# Model files are written once (hash-named, renamed into place after the check) and never
# again: read-only to everyone, root's. A Pi's SD card wears with every rewrite of gigabytes.
MODEL_FILE_MODE = "0444"

# The journal on `pi` hosts: capped for an SD card (the persistent journal under /var/log) and
# for RAM (the runtime journal under /run, a tmpfs). journald's own defaults are 10% of the
# file system (up to 4 GiB) and 10% of /run; the caps bound what vacuuming keeps, not what is
# written. A drop-in, not journald.conf: the operator's own settings stay.
JOURNALD_DROPIN = "/etc/systemd/journald.conf.d/neverdark.conf"
JOURNALD_LIMITS = {"SystemMaxUse": "64M", "RuntimeMaxUse": "16M"}
JOURNALD_PROFILES = ("pi",)


def venv(component: str) -> str:
    return f"{OPT}/{component}/venv"


def model_file(sha256: str) -> str:
    """Where a verified model lives: named by its hash, renamed into place only once verified."""
    return f"{MODELS_DIR}/{sha256}.gguf"


def model_link(model: str) -> str:
    return f"{MODELS_DIR}/{model}.gguf"


def llama_unit(model: str) -> str:
    return f"neverdark-llama-{model}.service"


# A model server other hosts reach reads its key from here (EnvironmentFile, 0600): never argv.
LLAMA_ETC = f"{ETC}/llama"
LLAMA_KEY_ENV = "LLAMA_API_KEY"     # llama-server's own variable; the launcher reads the same


def llama_key_file(model: str) -> str:
    return f"{LLAMA_ETC}/{model}.env"


# The firewall that admits only the fleet's hosts to those servers (deploys/firewall).
FIREWALL_TABLE = "neverdark"          # nft family inet
FIREWALL_RULES = f"{ETC}/firewall.nft"
FIREWALL_UNIT = "neverdark-firewall.service"


LLAMA_UNIT_PREFIX = "neverdark-llama-"
# The native llama-server and the libraries beside it: one folder per build (named by a digest
# of its files), the link switched to a new build only once every file is verified.
LLAMA_SERVER_LINK = f"{LLAMA_DIR}/server"
LLAMA_SERVER_BUILD_PREFIX = "server-"
# The llama-cpp-python wheel built for the host's arch on the operator's machine, uploaded and
# installed from there (a host never compiles it): one folder per wheel, named by its sha256.
LLAMA_WHEEL_PREFIX = "wheel-"


def llama_server_build(digest: str) -> str:
    return f"{LLAMA_DIR}/{LLAMA_SERVER_BUILD_PREFIX}{digest}"


def llama_wheel_dir(sha256: str) -> str:
    return f"{LLAMA_DIR}/{LLAMA_WHEEL_PREFIX}{sha256[:16]}"


def wizard_user(wizard: str) -> str:
    return WIZARD_USER_PREFIX + wizard


def wizard_unit(wizard: str) -> str:
    return f"neverdark-wizard-{wizard}.service"


def wizard_etc(wizard: str) -> str:
    return f"{WIZARDS_ETC}/{wizard}"


def wizard_base_config(wizard: str) -> str:
    """The deploy's copy of the wizard's Hermes config (Hermes rewrites the one in its home)."""
    return f"{wizard_etc(wizard)}/config.yaml"


def variant_path(wizard: str, backend: str) -> str:
    return f"{wizard_etc(wizard)}/backends/{backend}.yaml"


def wizard_var(wizard: str) -> str:
    return f"{WIZARDS_VAR}/{wizard}"


def wizard_home(wizard: str) -> str:
    return f"{wizard_var(wizard)}/home"


def wizard_managed_dir(wizard: str) -> str:
    return f"{wizard_var(wizard)}/managed"


def active_config(wizard: str) -> str:
    """HERMES_MANAGED_DIR/config.yaml: the sidecar's file, a copy of one variant."""
    return f"{wizard_managed_dir(wizard)}/config.yaml"


# --- network ---------------------------------------------------------------------------------
LOOPBACK = "127.0.0.1"
SIDECAR_PORT = 9470
LLAMA_PORT_BASE = 8081
API_PORT_BASE = 8642


def loopback_url(port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


def local_base_url(port: int) -> str:
    """An OpenAI-compatible local server's base URL, as Hermes and the probes take it."""
    return f"{loopback_url(port)}/v1"


def server_base_url(address: str, port: int) -> str:
    """A model server neverdark runs, at the address it listens on: loopback, or its host's
    private address when other hosts reach it (an IPv6 one in brackets)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/v1"


# --- local model engines ---------------------------------------------------------------------
# llama-cpp-python's server (through neverdark's launcher, the llama_launcher package), or
# llama.cpp's own llama-server (one slot per wizard). neverdark.engines says what each needs
# and how it is run.
ENGINES = ("llama-cpp-python", "llama-server")
DEFAULT_ENGINE = "llama-cpp-python"

# The memory fit's per-process figures, in MiB, measured on the test fleet after the capacity
# drill (every wizard of a host on one local model, turns from all of them for minutes):
# bench/llama_engine_bench.py prints them.
MEMORY_DEFAULTS = {
    "gateway_mb": 230,                 # a Hermes gateway after turns (219 MB peak measured)
    # ... plus this for one with Telegram (python-telegram-bot and its polling): gandalf's
    # gateway peaked at 254-258 MB in the capacity drill beside merlin's 214-219
    "messaging_mb": 40,
    "sidecar_mb": 40,
    "llama_overhead_mb": 300,          # llama-cpp-python beyond model file, KV and its cache
    "llama_server_overhead_mb": 120,   # llama-server beyond model file, KV and checkpoints
}

# --- backends, Hermes ------------------------------------------------------------------------
KINDS = ("anthropic", "openai", "google", "ollama", "local")
# Backends reached at a URL the inventory gives (a cloud API, or a model server neverdark does
# not run: Ollama, vLLM, a llama-server of the operator's own); "local" is neverdark's own.
CLOUD_KINDS = ("anthropic", "openai", "google", "ollama")
KEYED_KINDS = ("anthropic", "google")   # always need a key; an OpenAI-compatible one may not
DEFAULT_BASE_URLS = {
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com/v1beta",
    "ollama": "http://127.0.0.1:11434",
}
# Ollama serves a model with this context unless its Modelfile or the request sets num_ctx
# (the server-wide OLLAMA_CONTEXT_LENGTH is not visible through its API).
OLLAMA_DEFAULT_CONTEXT = 4096


def find_backend(wizard, ref):
    """The backend of `wizard`'s chain named `ref` (a backend already, or None, comes back as
    it is): the one lookup of a backend by name, which the plan's backend view
    (neverdark.backends), the Hermes config and the sidecar share. `wizard` has a name and a
    list of backends, as attributes or as keys (the Hermes config takes plain dicts)."""
    if not isinstance(ref, str):
        return ref
    for b in _field(wizard, "backends"):
        if _field(b, "name") == ref:
            return b
    raise KeyError(f"wizard {_field(wizard, 'name')!r} has no backend {ref!r}")


def _field(obj, key: str):
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key)


def url_root(base_url: str) -> str:
    """A server's root from the base URL its OpenAI-style API is reached at: a trailing '/' and
    then a final '/v1' stripped (http://127.0.0.1:8081/v1/ -> http://127.0.0.1:8081). There a
    local engine answers /health and /metrics, and Ollama its native /api. The one rule for
    it: the plan, the sidecar and the tests all strip /v1 with this."""
    url = base_url.rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


def openai_base_url(kind: str, base_url: str) -> str:
    """Where Hermes and the probes send OpenAI-style requests: an Ollama server's root (as
    Ollama documents it) plus /v1; every other kind's base_url as given."""
    return url_root(base_url) + "/v1" if kind == "ollama" else base_url
# Hermes 0.19.0 refuses a model whose context is under 64,000 tokens (HTTP 500 per request);
# 65536 is the smallest power of two above it, which is what llama.cpp sizes nicely.
HERMES_MIN_CONTEXT = 64_000
MIN_N_CTX = 65_536
API_KEY_MIN_LENGTH = 16   # Hermes' API server refuses shorter keys
# Restart the gateway after a flip? No: Hermes 0.19.0 re-reads the config per API request and
# rebuilds a Telegram chat's agent when the model changes, while a cold start drops the
# Telegram updates queued meanwhile (docs/hermes.md, finding 11).
RESTART_ON_SWITCH_DEFAULT = False


# --- probe and failover defaults (sidecar.probe in the inventory, probe: in sidecar.yaml) -----
PROBE_DEFAULTS = {
    "interval": 10,        # s between probes (Kubernetes periodSeconds 10)
    "timeout": 5,          # s per probe
    "fall": 3,             # consecutive failures -> unhealthy (HAProxy fall 3)
    "rise": 2,             # consecutive passes -> healthy (HAProxy rise 2)
    "min_dwell": 60,       # s on a fallback before failback may happen
    "cooldown_429": 60,    # s the primary is held off after a 429 without Retry-After
    "damping_base": 30,    # s extra hold after a switch soon after another (Envoy 30 s x n)
    "damping_cap": 300,    # s cap (Envoy max ejection 300 s)
    "max_hold": 3600,      # s: the longest any provider hint (Retry-After...) may hold a backend
    "paid_probe": False,   # a real generation probe on cloud backends (billed)
}


# --- environment names -----------------------------------------------------------------------
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_token(name: str) -> str:
    """A neverdark name as part of an environment variable name."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def api_key_secret_default(wizard: str) -> str:
    """The secret holding a wizard's Hermes API-server key when the inventory names none."""
    return f"NEVERDARK_API_KEY_{env_token(wizard)}"


def backend_key_env(wizard: str, backend: str) -> str:
    """The variable a backend's key is kept under, in the sidecar's env file and (for providers
    whose key name Hermes does not fix) in the wizard's .env."""
    return f"NEVERDARK_KEY_{env_token(wizard)}__{env_token(backend)}"


# --- dotenv: the one codec -------------------------------------------------------------------
# Written for python-dotenv, which Hermes loads .env with (interpolation on, quoted or not), and
# read back by the sidecar with the reader below; both are tested against python-dotenv.


class DotenvError(ValueError):
    """A value or a line that the codec cannot carry; the message never holds the value."""


_PLAIN = re.compile(r"[A-Za-z0-9_./:+=@,-]*")


def dotenv_value(name: str, value: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise DotenvError(f"{name}: a secret may not contain a line break or NUL")
    if "${" in value:
        raise DotenvError(f"{name}: a secret may not contain '${{' (python-dotenv, which Hermes "
                          "reads .env with, would expand it)")
    if _PLAIN.fullmatch(value):
        return value
    # python-dotenv: inside single quotes only \\ and \' are escapes.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dotenv_dumps(values: dict[str, str]) -> str:
    lines = []
    for name, value in values.items():
        if not ENV_NAME.fullmatch(name):
            raise DotenvError(f"{name!r} is not an environment variable name")
        lines.append(f"{name}={dotenv_value(name, value)}\n")
    return "".join(lines)


_DOUBLE_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
                   "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unescape(body: str, escapes: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body) and body[i + 1] in escapes:
            out.append(escapes[body[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _quoted(raw: str, quote: str) -> tuple[str, str] | None:
    """(body, rest after the closing quote), honouring backslash escapes; None: unterminated."""
    i = 1
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
            continue
        if raw[i] == quote:
            return raw[1:i], raw[i + 1:]
        i += 1
    return None


def dotenv_loads(text: str, source: str = "dotenv") -> dict[str, str]:
    """NAME=VALUE lines as python-dotenv reads them (no interpolation; `export ` and comments
    allowed; one line per value). Strict: a malformed line is an error naming its line, never
    its value, rather than a silently missing key that later looks like a rejected API key."""
    values: dict[str, str] = {}
    # Lines end at \n only (str.splitlines would also split at \f, \x1c, \u2028... inside a
    # quoted value); spaces around names and values go, as python-dotenv drops them.
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.removesuffix("\r").strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].lstrip()
        name, sep, raw = stripped.partition("=")
        name = name.strip()
        if not sep or not ENV_NAME.fullmatch(name):
            raise DotenvError(f"{source}: line {lineno}: expected NAME=VALUE")
        raw = raw.strip()
        if raw[:1] in ("'", '"'):
            got = _quoted(raw, raw[0])
            if got is None or got[1].strip()[:1] not in ("", "#"):
                raise DotenvError(f"{source}: line {lineno}: {name}: unterminated quoted value")
            body = got[0]
            value = _unescape(body, {"\\": "\\", "'": "'"} if raw[0] == "'" else _DOUBLE_ESCAPES)
        else:
            value = re.sub(r"\s+#.*", "", raw).rstrip()
        if name in values:
            raise DotenvError(f"{source}: line {lineno}: {name}: defined twice")
        values[name] = value
    return values
