"""Where things run on each host: the ports, and one local model server per model in use.

What the plan, the memory fit's callers and the testinfra suite all read.
"""

from __future__ import annotations

from dataclasses import dataclass

from neverdark import contract, memory_fit
from neverdark.models import template
from neverdark.problems import Report
from neverdark.schema import Fleet


@dataclass(frozen=True)
class LlamaServer:
    """One local model server on one host, everything resolved."""

    model: str
    engine: str
    port: int
    threads: int
    n_ctx: int                 # per request (per slot on llama-server)
    kv_type: str
    mlock: bool
    swa_full: bool
    template: str              # "model" (the GGUF's own chat template) or the override's name
                               # (chatml for a GGUF without one): neverdark.models.template;
                               # engines.py's command lines serve it
    tools: bool                # engine and template put tool schemas into the prompt and
                               # parse tool calls back (llama-server --jinja, a tools template)
    context_length: int        # what Hermes is told
    wizards: tuple[str, ...]   # every wizard that can fall back onto it, other hosts' too
    prompt_cache_mb: int       # llama-cpp-python's prompt cache (0 on llama-server)
    prompt_cache_bytes: int
    sliding_window: int | None
    training_context: int | None
    architecture: str | None
    extend_context: bool
    cache_reuse: int
    ctx_checkpoints: int
    # Reached by other hosts (docs/crosshost.md): their wizards, where it listens (loopback, or
    # the host's private_address when others reach it) and its key's secret name
    # (neverdark.model_keys; None: keyless).
    remote_wizards: tuple[str, ...] = ()
    listen: str = contract.LOOPBACK
    key_secret: str | None = None

    @property
    def base_url(self) -> str:
        return contract.server_base_url(self.listen, self.port)

    @property
    def key_file(self) -> str | None:
        """Its EnvironmentFile holding the key (None: keyless)."""
        return contract.llama_key_file(self.model) if self.key_secret else None

    @property
    def model_path(self) -> str:
        return contract.model_link(self.model)

    @property
    def slots(self) -> int:
        """llama-server's slots, one per wizard (llama-cpp-python has one context)."""
        return memory_fit.slots(len(self.wizards)) if self.engine == "llama-server" else 1


def llama_servers(fleet: Fleet, host: str) -> list[LlamaServer]:
    """The host's local model servers: one per model some wizard there can fall back onto."""
    out = []
    for m in fleet.local_models(host):
        model, users = fleet.models[m], tuple(fleet.wizards_using(host, m))
        served = template.served(model.engine, model.chat_format, model.gguf_template)
        cache = (memory_fit.prompt_cache_bytes(model, len(users), fleet.memory.prompt_tokens)
                 if model.engine == "llama-cpp-python" else 0)
        out.append(LlamaServer(
            model=m, engine=model.engine, port=fleet.llama_port(host, m),
            threads=model.server.threads or fleet.hosts[host].cores,
            n_ctx=model.server.n_ctx, kv_type=model.server.kv_type,
            mlock=model.server.mlock, swa_full=model.server.swa_full,
            template=served.template, tools=served.tools, context_length=model.context_length,
            wizards=tuple(sorted(users)), remote_wizards=tuple(fleet.remote_wizards(host, m)),
            listen=fleet.listen_address(host, m), key_secret=fleet.model_key_secret(host, m),
            prompt_cache_mb=memory_fit.mb(cache),
            prompt_cache_bytes=int(cache),
            sliding_window=model.kv.sliding_window if model.kv.sliding_window_layers else None,
            training_context=model.training_context, architecture=model.architecture,
            extend_context=model.server.extend_context, cache_reuse=model.server.cache_reuse,
            ctx_checkpoints=model.server.ctx_checkpoints))
    return out


def assign_ports(report: Report, fleet: Fleet) -> None:
    """Llama ports from 8081 and API ports from 8642 per host in name order, for those without
    an explicit port; then every port a host listens on must be distinct."""
    for h in fleet.hosts:
        taken: list[tuple[int, tuple, str]] = [
            (fleet.hosts[h].ssh.port, ("hosts", h, "ssh", "port"), "sshd"),
            (fleet.sidecar.port, ("sidecar", "port"), "the sidecar"
             + ("" if "port" in fleet.sidecar.model_fields_set else " (default)")),
        ]
        nxt = contract.LLAMA_PORT_BASE
        for m in fleet.local_models(h):
            port = fleet.models[m].server.port
            if port is None:
                port, nxt = nxt, nxt + 1
                where, what = ("models", m), f"model {m}'s server (assigned)"
            else:
                where, what = ("models", m, "server", "port"), f"model {m}'s server"
            fleet._llama_ports[(h, m)] = port
            taken.append((port, where, what))
        nxt = contract.API_PORT_BASE
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
