"""Cross-checks over the entries that passed their schema: names, references, models, probes,
Telegram bots, secrets and the memory fit. Each adds problems to the report; none raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from neverdark import contract, engines, memory_fit
from neverdark.models import template
from neverdark.problems import Report, dotted
from neverdark.schema import CloudBackend, Fleet, LocalBackend, secret_refs
from neverdark.secrets import SecretRef, SecretStore, load_store, secrets_path

def check_names(report: Report, fleet: Fleet, names: dict[str, set]) -> set:
    """One rule (neverdark.contract) for every name that becomes a path, a user or a unit.
    Returns the wizards whose name is unusable, which later steps skip."""
    bad = set()
    for section, what in (("hosts", "host"), ("models", "model"), ("wizards", "wizard")):
        for name in names[section]:
            problem = contract.name_problem(name, what)
            if problem:
                report.add((section, name), problem)
                if section == "wizards":
                    bad.add(name)
    for w, wz in fleet.wizards.items():
        seen: dict[str, int] = {}
        for i, b in enumerate(wz.backends):
            problem = contract.name_problem(b.name, "backend")
            if problem:
                report.add(("wizards", w, "backends", i, "name"), problem)
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

    return bad

def check_references(report: Report, fleet: Fleet, host_names: set, model_names: set) -> set:
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
                if b.context_length < contract.HERMES_MIN_CONTEXT:
                    report.add(here + ("context_length",),
                               f"{b.context_length} is below {contract.HERMES_MIN_CONTEXT}: Hermes "
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
            serving = b.host or wz.host
            if b.host is not None and not _check_serving_host(report, fleet, here, w, b,
                                                              host_names):
                continue
            if model.hosts is not None and serving in host_names and serving not in model.hosts:
                report.add(here + ("host" if b.host else "local",),
                           f"model '{b.local}' is not served on host '{serving}' (its hosts: "
                           f"{', '.join(model.hosts)}); a local backend uses the model served "
                           + ("on the host it names" if b.host else
                              "on the wizard's own host, or on the one its `host` names"))
            _check_max_tokens(report, fleet, here, b.max_tokens, model.context_length)
            if b.tools:
                problem = tools_problem(model, b.local)
                if problem:
                    report.add(here + ("tools",), problem)
    return unsure


def _check_serving_host(report: Report, fleet: Fleet, here: tuple, wizard: str,
                        b: LocalBackend, host_names: set) -> bool:
    """A backend served by another host (`host:`): that host exists and both hosts have a
    private_address (the server listens on the serving host's, and admits the wizard's host's
    through its firewall). False: the backend cannot be checked further."""
    wz = fleet.wizards[wizard]
    if b.host not in host_names:
        report.add(here + ("host",), f"unknown host '{b.host}'" + _known(host_names))
        return False
    if b.host == wz.host or b.host not in fleet.hosts or wz.host not in fleet.hosts:
        return True
    if fleet.hosts[b.host].private_address is None:
        report.add(here + ("host",),
                   f"host '{b.host}' has no private_address: a model server other hosts reach "
                   f"listens there, never on a public address (set hosts.{b.host}."
                   "private_address: its LAN, WireGuard or Tailscale address)")
    if fleet.hosts[wz.host].private_address is None:
        report.add(here + ("host",),
                   f"the wizard's host '{wz.host}' has no private_address: host '{b.host}' "
                   f"admits only the fleet's private addresses to its model server (set "
                   f"hosts.{wz.host}.private_address)")
    return True


def tools_problem(model, name: str) -> str | None:
    """Why this model's server cannot carry tool schemas to the model (None: it can)."""
    return template.tools_problem(model.engine, model.chat_format, model.gguf_template, name)


def default_api_keys(fleet: Fleet) -> None:
    """A wizard without `api_server_key` gets {secret: NEVERDARK_API_KEY_<NAME>}."""
    for w, wz in fleet.wizards.items():
        if wz.api_server_key is None:
            ref = SecretRef(secret=contract.api_key_secret_default(w))
            fleet.wizards[w] = wz.model_copy(update={"api_server_key": ref})


def check_key_variables(report: Report, fleet: Fleet) -> None:
    """Each backend key gets its own variable in the host's sidecar env file: two names that
    spell the same variable (gpt.4 and gpt-4) would overwrite each other's key."""
    for h in fleet.hosts:
        seen: dict[str, tuple] = {}
        for w in fleet.wizards_on(h):
            for i, b in enumerate(fleet.wizards[w].backends):
                if isinstance(b, LocalBackend) and (
                        b.local not in fleet.models or (b.host or h) not in fleet.hosts
                        or fleet.model_key_secret(b.host or h, b.local) is None):
                    continue   # keyless: neverdark's own server on loopback
                env = contract.backend_key_env(w, b.name)
                here = ("wizards", w, "backends", i, "name")
                if env in seen:
                    report.add(here, f"its key variable {env} is also that of "
                                     f"{dotted(seen[env])}: rename one of the two")
                seen.setdefault(env, here)


def _known(names: set) -> str:
    if not names:
        return " (none defined)"
    shown = [n if len(n) <= 40 else n[:37] + "..." for n in sorted(map(str, names))[:10]]
    more = f", and {len(names) - 10} more" if len(names) > 10 else ""
    return f" (known: {', '.join(shown)}{more})"


def _check_max_tokens(report: Report, fleet: Fleet, here: tuple, max_tokens: int,
                      context: int) -> None:
    room = context - fleet.memory.prompt_tokens
    if max_tokens > room:
        report.add(here + ("max_tokens",),
                   f"{max_tokens} leaves no room for a Hermes prompt (~"
                   f"{fleet.memory.prompt_tokens} tokens) in {context} tokens of context: "
                   f"use at most {max(room, 0)}")


def check_models(report: Report, fleet: Fleet) -> None:
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
        if n_ctx < contract.MIN_N_CTX:
            report.add(("models", m, "server", "n_ctx"),
                       f"{n_ctx} is below {contract.MIN_N_CTX}: wizards {who} use this model and Hermes "
                       "refuses models with under 64K context (every request fails)")
        elif model.context_length < contract.HERMES_MIN_CONTEXT:
            report.add(("models", m, "context_length"),
                       f"{model.context_length} is below {contract.HERMES_MIN_CONTEXT}: wizards {who} use "
                       "this model and Hermes refuses models with under 64K context")


def check_engines(report: Report, fleet: Fleet) -> None:
    """What each model's engine really serves (the header-derived fields are filled in by
    neverdark.models.facts first): Hermes must be told a context the server really serves, and
    at least 64,000 tokens of it."""
    for m, model in fleet.models.items():
        here = ("models", m)
        if model.engine != "llama-server":
            continue
        if model.chat_format is not None and model.chat_format not in engines.NATIVE_TEMPLATES:
            report.add(here + ("chat_format",),
                       f"'{model.chat_format}' is not a chat template llama-server knows "
                       f"(it has: {', '.join(sorted(engines.NATIVE_TEMPLATES))})")
        s = model.server
        if model.training_context is None:
            report.add(here + ("training_context",),
                       "unknown: llama-server caps every slot at the model's training context, "
                       "and the model file is not on this machine to read it from: declare "
                       "training_context (its GGUF <arch>.context_length)")
            continue
        if s.extend_context and model.architecture is None:
            report.add(here + ("architecture",), "extend_context needs the GGUF architecture "
                       "(general.architecture, e.g. gemma3): declare it")
        ctx = engines.served_context(model.engine, s.n_ctx, model.training_context,
                                     s.extend_context)
        if ctx.served is not None and ctx.served < contract.HERMES_MIN_CONTEXT:
            report.add(here + ("engine",),
                       f"llama-server serves at most {ctx.served} tokens per wizard here "
                       f"({ctx.limit}) and Hermes refuses a model under "
                       f"{contract.HERMES_MIN_CONTEXT}: use engine llama-cpp-python, a model "
                       "trained for 64K or more, or server.extend_context: true (the model then "
                       f"answers past {model.training_context} tokens it was not trained on)")
        elif ctx.served is not None and model.context_length > ctx.served:
            report.add(here + ("context_length",),
                       f"{model.context_length} exceeds what llama-server serves per wizard "
                       f"({ctx.served}: {ctx.limit}): Hermes would send prompts it cannot hold")


def check_probes(report: Report, fleet: Fleet) -> None:
    targets = [(("sidecar", "probe"), fleet.sidecar.probe)]
    targets += [(("wizards", w, "probe"), fleet.probe(w)) for w in fleet.wizards]
    for path, p in targets:
        if p.timeout >= p.interval:
            report.add(path + ("timeout",), f"timeout {p.timeout} s must be shorter than "
                                            f"interval {p.interval} s, or probes overlap")
        if p.damping_base > p.damping_cap:
            report.add(path + ("damping_cap",), f"damping_cap {p.damping_cap} s is below "
                                                f"damping_base {p.damping_base} s")


def check_metrics(report: Report, fleet: Fleet) -> None:
    """`sidecar: {metrics: private}` listens on each sidecar host's private address."""
    if fleet.sidecar.metrics != "private":
        return
    for host, h in sorted(fleet.hosts.items()):
        if fleet.wizards_on(host) and not h.private_address:
            report.add(("hosts", host, "private_address"),
                       "required with sidecar.metrics: private (the sidecar's /metrics listens "
                       "there for Prometheus)")


def check_telegram(report: Report, fleet: Fleet) -> None:
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


def load_secrets(report: Report, fleet: Fleet, inventory: Path,
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


def check_secrets(report: Report, fleet: Fleet, store: SecretStore) -> None:
    where = f"secrets file {store.path}" if store.path else "no secrets file"
    for path, ref in secret_refs(fleet):
        value = store.get(ref.secret)
        api_key = path[-1] == "api_server_key"
        what = " (the wizard's API-server key, 16+ characters)" if api_key else ""
        if value is None:
            report.add(path + ("secret",), f"secret {ref.secret}{what} is not set ({where}, "
                                           "nor the environment)")
        elif (problem := _carriable(ref.secret, value)):
            report.add(path + ("secret",), problem)
        elif api_key and len(value) < contract.API_KEY_MIN_LENGTH:
            report.add(path + ("secret",), f"secret {ref.secret} is shorter than "
                                           f"{contract.API_KEY_MIN_LENGTH} characters: Hermes' API "
                                           "server refuses to start with it")


def _carriable(name: str, value: str) -> str | None:
    """Why the value cannot reach a host's .env intact (never quoting the value)."""
    try:
        contract.dotenv_value(name, value)
    except contract.DotenvError as e:
        return f"secret {e}"
    return None


def check_memory(report: Report, fleet: Fleet, unsure: set) -> None:
    for h in fleet.hosts:
        if h in unsure:
            continue
        msg = memory_fit.misfit(fleet, h)
        if msg:
            report.add(("hosts", h, "memory_mb"), msg)

