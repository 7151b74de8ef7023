"""Which layers of a model use sliding-window attention, as the pinned llama.cpp loads it.

A GGUF header says the window (`<arch>.attention.sliding_window`) but usually not which layers
use it: llama.cpp decides per architecture in its model loader (src/models/<arch>.cpp,
`load_swa_pattern(ml, n, dense_first)`), and reads `<arch>.attention.sliding_window_pattern`
(an array of booleans, or the period) where the header has one. The table below is that code
for the llama.cpp vendored by llama-cpp-python 0.3.36 (commit 0c1e570), the one both engines are
built from (neverdark.versions): re-read it when the pin moves. An architecture the table lacks
gets no sliding-window layers, as in llama.cpp (Mistral 7B v0.1's window, Phi-3's: all layers
are sized for the full context).
"""

from __future__ import annotations

from dataclasses import dataclass

from neverdark.gguf import GGUFError, GGUFInfo


@dataclass(frozen=True)
class SwaRule:
    period: int                 # every `period` layers, one is full attention
    dense_first: bool = False   # the full layer is the first of each period (else the last)
    needs_window: bool = True   # only when the header's window is > 0 (else: always)
    default_window: int | None = None   # llama.cpp's own default when the header has none
    only_blocks: int | None = None      # only for this block count (EXAONE 4 32B)
    array_required: bool = False        # the header must carry the per-layer array (Gemma 4)


SWA_RULES: dict[str, SwaRule] = {
    "gemma2": SwaRule(2, needs_window=False, default_window=4096),
    "gemma3": SwaRule(6),
    "gemma3n": SwaRule(5, needs_window=False),
    "gemma-embedding": SwaRule(6, needs_window=False),
    "gemma4": SwaRule(0, needs_window=False, array_required=True),
    "cohere2": SwaRule(4, needs_window=False),
    "cohere2moe": SwaRule(4, dense_first=True, needs_window=False),
    "gpt-oss": SwaRule(2, needs_window=False),
    "llama4": SwaRule(4, needs_window=False, default_window=8192),   # chunked attention
    "olmo2": SwaRule(4),
    "exaone4": SwaRule(4, needs_window=False, default_window=4096, only_blocks=64),
    "exaone-moe": SwaRule(4, needs_window=False, default_window=128),
    "afmoe": SwaRule(4),
    "mellum": SwaRule(4),
    "plamo3": SwaRule(8),
    "smallthinker": SwaRule(4, dense_first=True),
    "laguna": SwaRule(4, dense_first=True),
    "muse-glimmer": SwaRule(4, needs_window=False),
}


@dataclass(frozen=True)
class KV:
    """The memory fit's view of a model (schema.KVLayout's fields)."""

    layers: int
    kv_heads: int
    head_dim: int
    sliding_window_layers: int
    sliding_window: int | None
    notes: tuple[str, ...] = ()


def _periodic(layers: int, period: int, dense_first: bool) -> list[bool]:
    """llama_hparams::set_swa_pattern."""
    if period == 0:
        return [True] * layers
    if dense_first:
        return [il % period != 0 for il in range(layers)]
    return [il % period < period - 1 for il in range(layers)]


def swa_layers(info: GGUFInfo) -> tuple[int, int | None]:
    """(how many layers use the sliding window, the window in tokens) for this file."""
    rule = SWA_RULES.get(info.architecture)
    layers = info.block_count or 0
    window = info.sliding_window
    if rule is None or (rule.only_blocks is not None and layers != rule.only_blocks):
        return 0, None
    if info.architecture == "llama4" and window == 0:
        return 0, None
    if window is None:
        window = rule.default_window
    if rule.needs_window and not window:
        return 0, None
    if not window:
        raise GGUFError(f"{info.path}: {info.architecture} uses sliding-window layers but the "
                        f"header has no {info.architecture}.attention.sliding_window")
    pattern = info.sliding_window_pattern
    if isinstance(pattern, tuple):
        if len(pattern) < layers:
            raise GGUFError(f"{info.path}: {info.architecture}.attention.sliding_window_pattern "
                            f"has {len(pattern)} entries for {layers} layers")
        flags = list(pattern[:layers])
    elif rule.array_required:
        raise GGUFError(f"{info.path}: {info.architecture} needs the per-layer "
                        f"{info.architecture}.attention.sliding_window_pattern array, which "
                        "the header lacks")
    else:
        flags = _periodic(layers, pattern if isinstance(pattern, int) else rule.period,
                          rule.dense_first)
    n = sum(flags)
    return n, (window if n else None)


def kv_layout(info: GGUFInfo) -> KV:
    """The KV layout the memory fit prices, from the header; GGUFError when it lacks a part."""
    missing = [k for k, v in (("block_count", info.block_count),
                              ("attention.head_count_kv", info.head_count_kv),
                              ("attention.key_length", info.head_dim)) if not v]
    if missing:
        raise GGUFError(f"{info.path}: the header has no {', '.join(info.architecture + '.' + m for m in missing)}")
    n_swa, window = swa_layers(info)
    # The memory fit has one head size per model: take the largest the header names (keys,
    # values, sliding-window layers' keys), so it never undercounts.
    sizes = {"keys": info.head_dim, "values": info.value_length,
             "sliding-window keys": info.key_length_swa}
    head_dim = max(v for v in sizes.values() if v)
    notes = []
    if len({v for v in sizes.values() if v}) > 1:
        notes.append("head sizes differ (" + ", ".join(f"{k} {v}" for k, v in sizes.items() if v)
                     + f"): the memory fit counts {head_dim} for all")
    return KV(info.block_count, info.head_count_kv, head_dim, n_swa, window, tuple(notes))
