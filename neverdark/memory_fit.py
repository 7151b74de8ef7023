"""Will a host's wizards and local models fit in its memory? Arithmetic, in MiB ("MB").

Per distinct local model served on the host, by engine (`models.<m>.engine`):

llama-cpp-python (one context, requests one at a time):
  file size + KV cache at n_ctx + runtime overhead
  + its prompt cache: a saved state (prefix and conversation) per wizard that can fall back onto
    the model, and room for one more (the llama_launcher package counts every byte of it)
llama-server (one slot per wizard that can fall back onto the model, all at once):
  file size + slots x KV cache at n_ctx + slots x window checkpoints + runtime overhead
  (its RAM prompt cache is off: each slot keeps its own prefix)
Plus one Hermes gateway per wizard, the sidecar, and headroom for the OS and page cache. The
per-process figures (gateway, runtimes) are measured after the capacity drill
(neverdark.contract.MEMORY_DEFAULTS, bench/llama_engine_bench.py).

The KV arithmetic follows llama.cpp: each layer stores K and V (2 x kv_heads x head_dim elements
per token). Full-attention layers hold n_ctx tokens; sliding-window layers hold only the window
plus one micro-batch unless swa_full is set, in which case they are sized like full layers. For
Gemma 3 270M at n_ctx 65536 that is 207 MB per context (swa_full false) and 1152 MB (true).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neverdark.schema import Fleet, MemoryPolicy, Model

MIB = 1024 * 1024

# ggml block sizes: q8_0 stores 32 values in 34 bytes, q4_0 in 18 bytes.
BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# llama.cpp sizes a sliding-window cache as window + n_ubatch so a whole micro-batch can be
# written while the window is still visible; both engines' default n_ubatch is 512.
UBATCH = 512
# A saved state also holds the last logits row (n_vocab floats: 1 MiB for Gemma 3's 262K
# vocabulary) and its token ids; a little slack covers both for any vocabulary in use.
STATE_SLACK = 2 * MIB


def kv_bytes_per_token_layer(model: Model) -> float:
    kv = model.kv
    return 2 * kv.kv_heads * kv.head_dim * BYTES_PER_ELEMENT[model.server.kv_type]


def kv_bytes_per_token(model: Model) -> float:
    """Every layer, as if all were full attention: what one cached prompt token costs."""
    return kv_bytes_per_token_layer(model) * model.kv.layers


def _cells(model: Model, tokens: int) -> float:
    """KV cells (token x layer) a context of `tokens` positions holds."""
    kv = model.kv
    swa_layers = kv.sliding_window_layers
    full_layers = kv.layers - swa_layers
    swa = tokens if model.server.swa_full else min(tokens, (kv.sliding_window or 0) + UBATCH)
    return full_layers * tokens + swa_layers * swa


def kv_cache_bytes(model: Model) -> float:
    """One context (one llama-server slot) at n_ctx."""
    return kv_bytes_per_token_layer(model) * _cells(model, model.server.n_ctx)


def state_bytes(model: Model, tokens: int) -> float:
    """A saved context holding `tokens` tokens (llama_state_get_data's size)."""
    return kv_bytes_per_token_layer(model) * _cells(model, tokens) + STATE_SLACK


def prompt_cache_bytes(model: Model, wizards: int, prompt_tokens: int) -> float:
    """llama-cpp-python's cache: a saved state per wizard sharing the server and one more, so
    while each wizard's prompt stays within `prompt_tokens` no wizard's turn evicts another's
    prefix (the least recently used state goes first). The launcher gets exactly this many
    bytes (NEVERDARK_CACHE_BYTES) and never holds more."""
    return (max(wizards, 1) + 1) * state_bytes(model, prompt_tokens)


def checkpoint_bytes(model: Model) -> float:
    """One llama-server window checkpoint: the sliding-window layers' cells of one window
    (nothing for a model without sliding-window layers, or with swa_full)."""
    kv = model.kv
    if not kv.sliding_window_layers or model.server.swa_full:
        return 0.0
    return kv_bytes_per_token_layer(model) * kv.sliding_window_layers * kv.sliding_window


def slots(wizards: int) -> int:
    return max(wizards, 1)


def mb(n_bytes: float) -> int:
    return math.ceil(n_bytes / MIB)


def headroom_for(policy: MemoryPolicy, memory_mb: int) -> int:
    return max(math.ceil(memory_mb * policy.headroom_percent / 100), policy.headroom_min_mb)


def headroom_mb(fleet: Fleet, host: str) -> int:
    return headroom_for(fleet.memory, fleet.hosts[host].memory_mb)


def min_memory_mb(fleet: Fleet, host: str) -> int:
    """The smallest memory_mb with which this host's budget fits (its headroom grows with
    memory_mb, so it is not simply the sum): what a board's MemTotal must reach."""
    processes = sum(mb for _, mb in memory_budget(fleet, host)[:-1])   # all but the headroom
    need = processes + fleet.memory.headroom_min_mb
    while processes + headroom_for(fleet.memory, need) > need:
        need = processes + headroom_for(fleet.memory, need)
    return need


def _kv_label(model: Model) -> str:
    s = model.server
    if model.kv.sliding_window_layers and not s.swa_full:
        swa = f", sliding window {model.kv.sliding_window}"
    else:
        swa = ", swa_full" if model.kv.sliding_window_layers else ""
    return f"n_ctx {s.n_ctx}, {s.kv_type}{swa}"


def server_items(name: str, model: Model, wizards: int,
                 policy: MemoryPolicy) -> list[tuple[str, int]]:
    """One model server's share of the budget, item by item; `wizards` is how many wizards on
    the host can fall back onto it."""
    items = [(f"model {name}: file", model.size_mb)]
    if model.engine == "llama-server":
        n = slots(wizards)
        items.append((f"model {name}: KV cache ({n} slot{'s' * (n > 1)} x {_kv_label(model)})",
                      mb(n * kv_cache_bytes(model))))
        ckpt = n * model.server.ctx_checkpoints * checkpoint_bytes(model)
        if ckpt:
            items.append((f"model {name}: window checkpoints ({n} x "
                          f"{model.server.ctx_checkpoints})", mb(ckpt)))
        items.append((f"model {name}: llama-server runtime", policy.llama_server_overhead_mb))
        return items
    items += [
        (f"model {name}: KV cache ({_kv_label(model)})", mb(kv_cache_bytes(model))),
        (f"model {name}: llama-cpp-python runtime", policy.llama_overhead_mb),
        (f"model {name}: prompt cache ({max(wizards, 1)} prefix{'es' * (wizards > 1)} + 1 turn "
         f"x {policy.prompt_tokens} tokens)",
         mb(prompt_cache_bytes(model, wizards, policy.prompt_tokens))),
    ]
    return items


def server_mb(model: Model, wizards: int, policy: MemoryPolicy) -> int:
    return sum(mb for _, mb in server_items("", model, wizards, policy))


def external_server_items(fleet: Fleet, host: str) -> list[tuple[str, int]]:
    """Model servers neverdark does not run but the host holds (an Ollama beside the wizards):
    each backend with `memory_mb` declares one, counted once per server URL (the largest
    figure any backend gives for it)."""
    servers: dict[str, int] = {}
    for wizard in fleet.wizards_on(host):
        for b in fleet.wizards[wizard].backends:
            mb_ = getattr(b, "memory_mb", None)
            if mb_:
                servers[b.base_url] = max(servers.get(b.base_url, 0), mb_)
    return [(f"model server at {url} (declared)", mb_) for url, mb_ in sorted(servers.items())]


def gateway_mb(fleet: Fleet, wizard: str) -> int:
    """A wizard's Hermes gateway: more with a messaging platform (Telegram) than API-only."""
    return fleet.memory.gateway_mb + (fleet.memory.messaging_mb
                                      if fleet.wizards[wizard].telegram else 0)


def memory_budget(fleet: Fleet, host: str) -> list[tuple[str, int]]:
    """What the host must hold, in MB, headroom last; the sum must not exceed memory_mb."""
    items: list[tuple[str, int]] = []
    for name in fleet.local_models(host):
        items += server_items(name, fleet.models[name], len(fleet.wizards_using(host, name)),
                              fleet.memory)
    items += external_server_items(fleet, host)
    for wizard in fleet.wizards_on(host):
        telegram = " (with Telegram)" if fleet.wizards[wizard].telegram else ""
        items.append((f"hermes gateway {wizard}{telegram}", gateway_mb(fleet, wizard)))
    items.append(("neverdark sidecar", fleet.memory.sidecar_mb))
    items.append((f"headroom ({fleet.memory.headroom_percent:g}%, at least "
                  f"{fleet.memory.headroom_min_mb} MB)", headroom_mb(fleet, host)))
    return items


def format_budget(items: list[tuple[str, int]], memory_mb: int) -> str:
    width = max(len(name) for name, _ in items)
    lines = [f"  {name:<{width}}  {mb:>6} MB" for name, mb in items]
    total = sum(mb for _, mb in items)
    lines.append(f"  {'total':<{width}}  {total:>6} MB of {memory_mb} MB")
    return "\n".join(lines)


def _with_server(model: Model, **change) -> Model:
    return model.model_copy(update={"server": model.server.model_copy(update=change)})


def hints(fleet: Fleet, host: str) -> list[str]:
    """What would shrink this host's budget, each only where it applies, with what it saves."""
    from neverdark.contract import MIN_N_CTX
    out = []
    for name in fleet.local_models(host):
        model, users = fleet.models[name], len(fleet.wizards_using(host, name))
        now = server_mb(model, users, fleet.memory)
        where = f"models.{name}.server"
        changes = []
        if model.server.swa_full and model.kv.sliding_window_layers:
            changes.append((f"set {where}.swa_full false", {"swa_full": False}))
        if model.server.n_ctx > MIN_N_CTX:
            changes.append((f"lower {where}.n_ctx to {MIN_N_CTX} (Hermes' floor)",
                            {"n_ctx": MIN_N_CTX}))
        smaller = {"f16": "q8_0", "q8_0": "q4_0"}.get(model.server.kv_type)
        if smaller:
            changes.append((f"set {where}.kv_type {smaller}", {"kv_type": smaller}))
        for text, change in changes:
            saved = now - server_mb(_with_server(model, **change), users, fleet.memory)
            if saved > 0:
                out.append(f"{text} (saves {saved} MB)")
        out.append(f"serve a smaller model than {name} (it takes {now} MB)")
    wizards = fleet.wizards_on(host)
    if wizards:
        out.append(f"move {'a' if len(wizards) > 1 else 'the'} wizard to another host "
                   f"({fleet.memory.gateway_mb} MB per gateway"
                   + (", more where wizards share a model's prompt cache)"
                      if any(len(fleet.wizards_using(host, m)) > 1
                             for m in fleet.local_models(host)) else ")"))
    return out


def misfit(fleet: Fleet, host: str) -> str | None:
    """None when the host fits, else a message with what would help and the whole breakdown."""
    items = memory_budget(fleet, host)
    total = sum(mb for _, mb in items)
    memory_mb = fleet.hosts[host].memory_mb
    if total <= memory_mb:
        return None
    options = hints(fleet, host)
    advice = ("Options: " + "; ".join(options) if options else
              "Nothing runs here but the sidecar: is memory_mb right?")
    return (f"does not fit: needs {total} MB, host has {memory_mb} MB "
            f"({total - memory_mb} MB over). {advice}:\n" + format_budget(items, memory_mb))
