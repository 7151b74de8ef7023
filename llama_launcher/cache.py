"""The prompt cache: saved states without score copies, bounded by the bytes really held, and
prefix reuse only where it is sound for a small sliding-window cache.

`install()` patches llama_cpp.Llama (before timings.install() wraps the same methods).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections import OrderedDict

import llama_cpp
import numpy as np
from llama_cpp import llama as llama_mod
from llama_cpp.llama_cache import BaseLlamaCache

SWA_FULL = os.environ.get("NEVERDARK_SWA_FULL", "false").lower() == "true"
CACHE_BYTES = int(os.environ.get("NEVERDARK_CACHE_BYTES", str(256 << 20)))


# --- saved states without scores ----------------------------------------------------------

class State:
    """A context's KV state and the token ids it holds: what a cache entry needs.

    The bytes live in an anonymous mmap of their own, not on the heap: a 20 MB malloc'd buffer
    raises glibc's mmap threshold and stays in its arenas after it is freed (measured: +170 MB
    of RSS over a dozen turns), while an mmap goes back to the kernel the moment the entry is
    evicted."""

    __slots__ = ("tokens", "buf", "size", "seed")

    def __init__(self, tokens: np.ndarray, buf: mmap.mmap, size: int, seed: int) -> None:
        self.tokens, self.buf, self.size, self.seed = tokens, buf, size, seed

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.size + self.tokens.nbytes


def save_state(llama: llama_cpp.Llama) -> State:
    size = int(llama_cpp.llama_state_get_size(llama._ctx.ctx))
    buf = mmap.mmap(-1, max(size, 1))
    c_buf = (ctypes.c_uint8 * size).from_buffer(buf)
    try:
        n = int(llama_cpp.llama_state_get_data(llama._ctx.ctx, c_buf, size))
    finally:
        del c_buf                      # the mmap can only be closed once nothing points in
    if n > size:
        raise RuntimeError("llama_state_get_data wrote past its buffer")
    return State(llama.input_ids[:llama.n_tokens].copy(), buf, n, llama._seed)


def load_state(llama: llama_cpp.Llama, state: State) -> None:
    c_buf = (ctypes.c_uint8 * state.size).from_buffer(state.buf)
    try:
        got = llama_cpp.llama_state_set_data(llama._ctx.ctx, c_buf, state.size)
    finally:
        del c_buf
    if got != state.size:
        raise RuntimeError("llama_state_set_data rejected a saved state")
    llama.input_ids[:state.n_tokens] = state.tokens
    llama.n_tokens = state.n_tokens
    llama._requires_eval = True
    llama._seed = state.seed


def lcp(a, b) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if len(diff) else n


def reusable(llama: llama_cpp.Llama, held: int, common: int) -> bool:
    """Can a context holding `held` tokens be cut back to its first `common` and continued?
    With a small sliding-window cache, only while the window before `common` is still there."""
    if common <= 0:
        return False
    if SWA_FULL or not llama_cpp.llama_model_n_swa(llama.model):
        return True
    return held - common <= llama_cpp.llama_n_ubatch(llama.ctx)


# --- the cache ----------------------------------------------------------------------------

class KVCache(BaseLlamaCache):
    """Saved states by token prefix, bounded by the bytes really held: the least recently used
    go first. One server's wizards each keep their latest state here (their prefix and
    conversation), so a turn of one does not cost another its prefix."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.entries: OrderedDict[tuple, State] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0

    @property
    def cache_size(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def best(self, tokens) -> tuple[tuple | None, int]:
        """The entry sharing the longest prefix with `tokens` (and that prefix's length)."""
        best, best_n = None, 0
        for k, s in self.entries.items():
            n = lcp(s.tokens, tokens)
            if n > best_n:
                best, best_n = k, n
        return best, best_n

    # llama-cpp-python's _create_completion: `self.cache[prompt_tokens]`
    def __getitem__(self, key) -> llama_mod.LlamaState:
        with self.lock:
            k, _ = self.best(key)
            if k is None:
                raise KeyError("no cached prefix")
            self.entries.move_to_end(k)
            state = self.entries[k]
        # A stand-in whose input_ids let the caller compare prefixes; loading it goes through
        # load_state above (Llama.load_state is patched).
        return Handle(state)

    def __contains__(self, key) -> bool:
        return self.best(tuple(key))[0] is not None

    # ... and `self.cache[prompt_tokens + completion_tokens] = self.save_state()`
    def __setitem__(self, key, value) -> None:
        state = value.state if isinstance(value, Handle) else value
        with self.lock:
            self.entries.pop(tuple(key), None)
            self.entries[tuple(key)] = state
            while self.entries and self.cache_size > self.capacity_bytes:
                self.entries.popitem(last=False)

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.cache_size,
                    "capacity_bytes": self.capacity_bytes, "loads": self.loads}


class Handle:
    """What llama-cpp-python gets back from the cache: input_ids for its prefix comparison."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.input_ids = state.tokens
        self.n_tokens = state.n_tokens


CACHE = KVCache(CACHE_BYTES)


# --- the patches ----------------------------------------------------------------------------

def install() -> None:
    """Llama: swa_full from NEVERDARK_SWA_FULL, states saved and loaded as above, and the live
    context or a saved state reused only where that is sound (see `reusable`)."""
    init, generate = llama_cpp.Llama.__init__, llama_cpp.Llama.generate

    @functools.wraps(init)
    def init_patched(self, *args, **kwargs):
        kwargs.setdefault("swa_full", SWA_FULL)
        init(self, *args, **kwargs)

    def save_state_patched(self) -> Handle:
        return Handle(save_state(self))

    def load_state_patched(self, state) -> None:
        load_state(self, state.state if isinstance(state, Handle) else state)
        with CACHE.lock:
            CACHE.loads += 1

    @functools.wraps(generate)
    def generate_patched(self, tokens, *args, **kwargs):
        tokens = list(tokens)
        common = lcp(self.input_ids[:self.n_tokens], tokens)
        if self.n_tokens and not reusable(self, self.n_tokens, common):
            k, n = CACHE.best(tokens)
            if k is not None and reusable(self, len(k), n):
                self.load_state(CACHE.entries[k])
            else:
                self.reset()
        yield from generate(self, tokens, *args, **kwargs)

    llama_cpp.Llama.__init__ = init_patched
    llama_cpp.Llama.save_state = save_state_patched
    llama_cpp.Llama.load_state = load_state_patched
    llama_cpp.Llama.generate = generate_patched
