"""Run llama-cpp-python 0.3.36's OpenAI-compatible server, fixed for a small host.

What llama-cpp-python's own server gets wrong here, and what this launcher does instead (each
measured on the test fleet; docs/FIELD-NOTES.md in the lead's notes):

- Memory. Its RAM prompt cache stores `Llama.save_state()`, which copies `_scores` (n_batch x
  n_vocab floats: 512 MiB for Gemma 3) into every entry while the cache counts only the KV
  state against its capacity: 575 MB grew to 12 GB in a dozen conversations, each save taking
  seconds. With `logits_all` off those scores are never written (sampling reads the context's
  own logits), so here a saved state is the KV state and the prompt's token ids only, and the
  cache (`KVCache`) counts every byte it holds against NEVERDARK_CACHE_BYTES.
- Sliding-window models. Its server has no `swa_full` flag; llama.cpp's default keeps a
  full-size window cache (about 1 GB more at n_ctx 65536 for Gemma 3). NEVERDARK_SWA_FULL
  (default false) sets it. With the window cache small, reusing a prefix is only sound while
  the cells of the window before the reuse point are still held: a prefix is reused from the
  live context or a saved state only when no more than one micro-batch was evaluated past it.
- Routes that need no model take no lock. Every route of its server, `/v1/models` included,
  waits for the generation in flight, and clients probe a lot: Hermes asks `/api/v1/models`,
  `/api/tags`, `/v1/props`, `/props` and `/version` before every local turn until one answers
  like a server it knows. Here `/health`, `/v1/models`, `/props` and `/v1/props` (llama.cpp's
  shape, so Hermes recognises it and stops probing) and `/neverdark/status` answer at once.
- Prefixes computed ahead and kept. `POST /neverdark/warm` evaluates a wizard's stable prompt
  prefix in small chunks, one lock hold per chunk, and gives way at once when a real request
  is waiting (it answers `preempted` and the caller retries later): a user's turn waits for one
  chunk at most. The finished prefix is pinned in the cache (real turns' states are evicted
  first) and written to NEVERDARK_PREFIX_DIR, from which a restarted server restores it.

- Where each completion's time went, the way llama.cpp's own llama-server says it: every chat
  or text completion gets a `timings` object with native llama-server's keys (prompt_n = prompt
  tokens evaluated, cache_n = prompt tokens reused, prompt_ms, predicted_n, predicted_ms) plus
  what only this server has: queue_ms (waiting for the single generation lock), cache_save_ms
  and cache_load_ms (the prompt cache's state copies). It is added to the response (the last
  chunk when streamed), printed to stderr as one `neverdark-timings {json}` line (the journal),
  and summed in `GET /metrics` under native llama-server's metric names, so one scraper reads
  either engine; /metrics takes no lock either.

Everything else is llama-cpp-python's own server, started with the same command line.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import hashlib
import json
import mmap
import os
import struct
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import llama_cpp
import llama_cpp.server.__main__ as server_main
import llama_cpp.server.app as server_app
import numpy as np
from llama_cpp import llama as llama_mod
from llama_cpp.llama_cache import BaseLlamaCache

VERSION = "0.3.36"   # the internals patched below are this release's
if llama_cpp.__version__ != VERSION:
    sys.exit(f"neverdark serve.py is written for llama-cpp-python {VERSION}, "
             f"found {llama_cpp.__version__}")

SWA_FULL = os.environ.get("NEVERDARK_SWA_FULL", "false").lower() == "true"
CACHE_BYTES = int(os.environ.get("NEVERDARK_CACHE_BYTES", str(256 << 20)))
PREFIX_DIR = Path(os.environ["NEVERDARK_PREFIX_DIR"]) if os.environ.get("NEVERDARK_PREFIX_DIR") \
    else None
GENERATION = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/engines/copilot-codex/completions")
STARTED = time.time()


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

    def view(self) -> memoryview:
        return memoryview(self.buf)[:self.size]


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
    """Saved states by token prefix, bounded by the bytes really held. Pinned entries (warm
    prefixes, one per key) are evicted only after every unpinned one."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.entries: OrderedDict[tuple, State] = OrderedDict()
        self.pinned: dict[str, tuple] = {}      # key -> token tuple of its entry
        self.lock = threading.Lock()
        self.loads = 0

    @property
    def cache_size(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def _pinned_keys(self) -> set:
        return set(self.pinned.values())

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
            k, n = self.best(key)
            if k is None:
                raise KeyError("no cached prefix")
            self.entries.move_to_end(k)
            state = self.entries[k]
        # A stand-in whose input_ids let the caller compare prefixes; loading it goes through
        # load_state above (Llama.load_state is patched).
        return _Handle(state)

    def __contains__(self, key) -> bool:
        return self.best(tuple(key))[0] is not None

    # ... and `self.cache[prompt_tokens + completion_tokens] = self.save_state()`
    def __setitem__(self, key, value) -> None:
        state = value.state if isinstance(value, _Handle) else value
        self.put(tuple(key), state)

    def put(self, key: tuple, state: State, pin: str | None = None) -> None:
        with self.lock:
            if pin is not None:
                old = self.pinned.get(pin)
                if old is not None and old != key and old not in (
                        v for p, v in self.pinned.items() if p != pin):
                    self.entries.pop(old, None)
                self.pinned[pin] = key
            self.entries.pop(key, None)
            self.entries[key] = state
            self._trim()

    def _trim(self) -> None:
        keep = self._pinned_keys()
        for phase in (False, True):
            for k in list(self.entries):
                if self.cache_size <= self.capacity_bytes:
                    return
                if (k in keep) == phase:
                    del self.entries[k]
                    if phase:
                        for p in [p for p, v in self.pinned.items() if v == k]:
                            del self.pinned[p]

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.cache_size,
                    "capacity_bytes": self.capacity_bytes, "loads": self.loads,
                    "pinned": {p: len(k) for p, k in self.pinned.items()}}


class _Handle:
    """What llama-cpp-python gets back from the cache: input_ids for its prefix comparison."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.input_ids = state.tokens
        self.n_tokens = state.n_tokens


CACHE = KVCache(CACHE_BYTES)


# --- counters -----------------------------------------------------------------------------

class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending = 0                   # generation requests in flight or waiting
        self.restored: dict[str, int] = {}
        self.warm: dict[str, dict] = {}


COUNTERS = Counters()


# --- patches ------------------------------------------------------------------------------

_init = llama_cpp.Llama.__init__


@functools.wraps(_init)
def _init_patched(self, *args, **kwargs):
    kwargs.setdefault("swa_full", SWA_FULL)
    _init(self, *args, **kwargs)


def _save_state_patched(self) -> _Handle:
    return _Handle(save_state(self))


def _load_state_patched(self, state) -> None:
    load_state(self, state.state if isinstance(state, _Handle) else state)
    with CACHE.lock:
        CACHE.loads += 1


_generate = llama_cpp.Llama.generate


@functools.wraps(_generate)
def _generate_patched(self, tokens, *args, **kwargs):
    tokens = list(tokens)
    # The live context is reused only where that is sound (see `reusable`); otherwise the
    # best saved state, otherwise from scratch.
    common = lcp(self.input_ids[:self.n_tokens], tokens)
    if self.n_tokens and not reusable(self, self.n_tokens, common):
        k, n = CACHE.best(tokens)
        if k is not None and reusable(self, len(k), n):
            self.load_state(CACHE.entries[k])
        else:
            self.reset()
    yield from _generate(self, tokens, *args, **kwargs)


_eval = llama_cpp.Llama.eval


llama_cpp.Llama.__init__ = _init_patched
llama_cpp.Llama.save_state = _save_state_patched
llama_cpp.Llama.load_state = _load_state_patched
llama_cpp.Llama.generate = _generate_patched


# --- timings (the order matters: these wrap the patches above) ------------------------------

class _Completion:
    """One completion's timings; requests run one at a time under the server's lock."""

    def __init__(self, queue_ms=0.0):
        self.queue_ms = queue_ms
        self.prompt_n = None        # prompt tokens evaluated (the rest came from the context)
        self.prompt_total = 0
        self.prompt_ms = 0.0
        self.predicted_n = 0
        self.predicted_ms = 0.0
        self.cache_save_ms = 0.0
        self.cache_load_ms = 0.0
        self.content = None         # the answer's text, to count empty ones
        self.done = False

    def timings(self):
        evaluated = self.prompt_n or 0
        return {"prompt_n": evaluated, "cache_n": max(0, self.prompt_total - evaluated),
                "prompt_ms": round(self.prompt_ms, 3), "predicted_n": self.predicted_n,
                "predicted_ms": round(self.predicted_ms, 3), "queue_ms": round(self.queue_ms, 3),
                "cache_save_ms": round(self.cache_save_ms, 3),
                "cache_load_ms": round(self.cache_load_ms, 3)}


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.totals = dict.fromkeys(("prompt_tokens", "prompt_tokens_cached", "prompt_seconds",
                                     "tokens_predicted", "tokens_predicted_seconds", "requests",
                                     "queue_seconds", "cache_save_seconds", "empty_completions"), 0)
        self.processing = 0
        self.deferred = 0
        self.current = None

    def finish(self, rec):
        if rec.done or rec.prompt_n is None:
            return
        rec.done = True
        t = rec.timings()
        empty = rec.content is not None and not rec.content.strip()
        with self.lock:
            add = self.totals
            add["prompt_tokens"] += t["prompt_n"]
            add["prompt_tokens_cached"] += t["cache_n"]
            add["prompt_seconds"] += t["prompt_ms"] / 1000
            add["tokens_predicted"] += t["predicted_n"]
            add["tokens_predicted_seconds"] += t["predicted_ms"] / 1000
            add["requests"] += 1
            add["queue_seconds"] += t["queue_ms"] / 1000
            add["cache_save_seconds"] += (t["cache_save_ms"] + t["cache_load_ms"]) / 1000
            add["empty_completions"] += int(empty)
        print("neverdark-timings " + json.dumps({**t, "empty": empty}, separators=(",", ":")),
              file=sys.stderr, flush=True)

    def metrics(self):
        with self.lock:
            t = dict(self.totals)
            gauges = {"requests_processing": self.processing, "requests_deferred": self.deferred}
        # Native llama-server's names (tools/server: server_task_result_metrics::to_metrics) for
        # what both engines count; neverdark_engine_* for what only this one does.
        native = [("prompt_tokens_total", "counter", t["prompt_tokens"]),
                  ("prompt_tokens_cached_total", "counter", t["prompt_tokens_cached"]),
                  ("prompt_seconds_total", "counter", t["prompt_seconds"]),
                  ("tokens_predicted_total", "counter", t["tokens_predicted"]),
                  ("tokens_predicted_seconds_total", "counter", t["tokens_predicted_seconds"]),
                  ("requests_processing", "gauge", gauges["requests_processing"]),
                  ("requests_deferred", "gauge", gauges["requests_deferred"])]
        own = [("requests_total", t["requests"]), ("queue_seconds_total", t["queue_seconds"]),
               ("cache_save_seconds_total", t["cache_save_seconds"]),
               ("empty_completions_total", t["empty_completions"])]
        lines = []
        for name, kind, value in native:
            lines += [f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value}"]
        for name, value in own:
            lines += [f"# TYPE neverdark_engine_{name} counter", f"neverdark_engine_{name} {value}"]
        return "\n".join(lines) + "\n"


STATS = _Stats()
_get_llama_proxy = server_app.get_llama_proxy
# The request's own record holder, set by TimingsMiddleware: a response that is not streamed
# goes through the library's response model, which drops `timings`; the middleware adds it.
_REQUEST: contextvars.ContextVar[dict | None] = contextvars.ContextVar("neverdark_request",
                                                                     default=None)


async def _timed_llama_proxy():
    """The server's lock dependency (looked up by name at each completion request), timing the
    wait for the lock and closing the completion's record when the request ends."""
    arrived = time.monotonic()
    with STATS.lock:
        STATS.deferred += 1
    locked = False
    rec = None
    try:
        async for proxy in _get_llama_proxy():
            locked = True
            rec = _Completion(queue_ms=(time.monotonic() - arrived) * 1000)
            with STATS.lock:
                STATS.deferred -= 1
                STATS.processing += 1
                STATS.current = rec
            yield proxy
    finally:
        with STATS.lock:
            if locked:
                STATS.processing -= 1
                if STATS.current is rec:
                    STATS.current = None
            else:
                STATS.deferred -= 1
        if rec is not None:
            STATS.finish(rec)
            holder = _REQUEST.get()
            if holder is not None:
                holder["timings"] = rec.timings()


server_app.get_llama_proxy = _timed_llama_proxy


def _record():
    rec = STATS.current
    if rec is None or rec.done:   # a completion outside the HTTP routes (none today)
        rec = _Completion()
        STATS.current = rec
    return rec


_untimed_generate = llama_cpp.Llama.generate   # ours above: sound prefix reuse
_untimed_eval = llama_cpp.Llama.eval


def _timed_eval(self, tokens):
    rec = STATS.current
    if rec is not None and rec.prompt_n is not None and rec.predicted_n == 0:
        rec.prompt_n += len(tokens)   # the prompt's uncached suffix (before any token is out)
    return _untimed_eval(self, tokens)


@functools.wraps(_untimed_generate)
def _timed_generate(self, tokens, *args, **kwargs):
    rec = _record()
    tokens = list(tokens)
    rec.prompt_total = len(tokens)
    rec.prompt_n = 0
    started = time.monotonic()
    first = None
    inner = _untimed_generate(self, tokens, *args, **kwargs)
    try:
        sent = None
        while True:
            token = inner.send(sent)
            now = time.monotonic()
            if first is None:
                first = now
                rec.prompt_ms = (now - started) * 1000
            rec.predicted_n += 1
            rec.predicted_ms = (now - first) * 1000
            sent = yield token
    except StopIteration:
        return
    finally:
        if first is None:
            rec.prompt_ms = (time.monotonic() - started) * 1000
        inner.close()


llama_cpp.Llama.eval = _timed_eval
llama_cpp.Llama.generate = _timed_generate

_save_state = llama_cpp.Llama.save_state
_load_state = llama_cpp.Llama.load_state


def _timed(method, field):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = time.monotonic()
        try:
            return method(self, *args, **kwargs)
        finally:
            rec = STATS.current
            if rec is not None:
                setattr(rec, field, getattr(rec, field) + (time.monotonic() - started) * 1000)
    return wrapper


llama_cpp.Llama.save_state = _timed(_save_state, "cache_save_ms")
llama_cpp.Llama.load_state = _timed(_load_state, "cache_load_ms")


def _with_timings(method, text_of):
    """Add `timings` to a completion (the chunk carrying finish_reason when streamed)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        rec = STATS.current
        if isinstance(result, dict):
            if rec is not None:
                rec.content = text_of(result["choices"][0], False)
                result["timings"] = rec.timings()
            return result

        def stream():
            parts = []
            for chunk in result:
                choices = chunk.get("choices") or []
                if choices:
                    parts.append(text_of(choices[0], True) or "")
                    if choices[0].get("finish_reason") and rec is not None:
                        rec.content = "".join(parts)
                        chunk["timings"] = rec.timings()
                yield chunk
        return stream()
    return wrapper


def _chat_text(choice, streamed):
    msg = choice.get("delta" if streamed else "message") or {}
    return msg.get("content") or ""


def _text(choice, streamed):
    return choice.get("text") or ""


llama_cpp.Llama.create_chat_completion = _with_timings(llama_cpp.Llama.create_chat_completion,
                                                       _chat_text)
llama_cpp.Llama.__call__ = _with_timings(llama_cpp.Llama.__call__, _text)

# --- prompts, warming, persistence ----------------------------------------------------------

class _Captured(Exception):
    pass


def prompt_tokens(llama: llama_cpp.Llama, messages: list, tools=None) -> list[int]:
    """The tokens a chat request with these messages is evaluated as: the server's own chat
    handler is run and stopped where it hands its prompt to the model."""
    from llama_cpp import llama_chat_format
    handler = (llama.chat_handler or llama._chat_handlers.get(llama.chat_format)
               or llama_chat_format.get_chat_completion_handler(llama.chat_format))
    seen: dict = {}

    class Recorder:
        def __getattr__(self, name):
            return getattr(llama, name)

        def create_completion(self, prompt, **kwargs):
            seen["prompt"] = prompt
            raise _Captured

    try:
        handler(llama=Recorder(), messages=messages, tools=tools, max_tokens=1)
    except _Captured:
        pass
    prompt = seen.get("prompt")
    if isinstance(prompt, str):
        prompt = llama.tokenize(prompt.encode("utf-8"), special=True)
    if not isinstance(prompt, list):
        raise ValueError("the chat handler produced no prompt")
    return prompt


def stable_prefix(llama: llama_cpp.Llama, messages: list, tools=None) -> list[int]:
    """The part of the prompt that does not depend on the last user message: two renderings
    with different user texts, cut where they part."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")

    def with_text(text):
        ms = [dict(m) for m in messages]
        ms[last]["content"] = text
        return prompt_tokens(llama, ms, tools)

    a, b = with_text("a"), with_text("z z")
    return a[:lcp(a, b)]


def warm_step(llama: llama_cpp.Llama, prefix: list[int], chunk: int) -> tuple[int, int]:
    """Move the context one chunk closer to holding exactly `prefix`; (held, evaluated)."""
    held = lcp(llama.input_ids[:llama.n_tokens], prefix)
    if not reusable(llama, llama.n_tokens, held):
        held = 0
    k, n = CACHE.best(prefix)
    if k is not None and n > held and reusable(llama, len(k), n):
        llama.load_state(CACHE.entries[k])
        held = n
    if held == len(prefix) and llama.n_tokens == held:
        return held, 0
    if held == 0:
        llama.reset()
    llama.n_tokens = held              # eval() removes every cell from here on
    step = prefix[held:held + max(1, chunk)]
    _eval(llama, step)
    return llama.n_tokens, len(step)


def _identity(llama: llama_cpp.Llama) -> dict:
    return {"model": os.path.realpath(llama.model_path), "n_ctx": llama.n_ctx(),
            "swa_full": SWA_FULL, "type_k": int(llama.context_params.type_k),
            "type_v": int(llama.context_params.type_v), "version": VERSION}


def _prefix_file(key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return PREFIX_DIR / f"{safe}.prefix"


def persist(llama: llama_cpp.Llama, key: str, state: State) -> None:
    """<json header length><json header><int32 tokens><kv>, written whole or not at all."""
    if PREFIX_DIR is None:
        return
    header = json.dumps({**_identity(llama), "key": key, "n_tokens": state.n_tokens,
                         "seed": state.seed,
                         "sha256": hashlib.sha256(state.view()).hexdigest()}).encode()
    path = _prefix_file(key)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<I", len(header)) + header)
        f.write(state.tokens.astype("<i4").tobytes())
        f.write(state.view())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore_all(llama: llama_cpp.Llama) -> None:
    """Pin every saved prefix made for this model and context; drop the others."""
    if PREFIX_DIR is None or not PREFIX_DIR.is_dir():
        return
    want = _identity(llama)
    for path in sorted(PREFIX_DIR.glob("*.prefix")):
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<I", f.read(4))
                header = json.loads(f.read(n))
                tokens = np.frombuffer(f.read(4 * header["n_tokens"]), "<i4").astype(np.intc)
                size = os.fstat(f.fileno()).st_size - 4 - n - 4 * header["n_tokens"]
                buf = mmap.mmap(-1, max(size, 1))
                got = f.readinto(memoryview(buf)[:size])
            state = State(tokens, buf, size, header["seed"])
            if got != size or len(tokens) != header["n_tokens"] or \
                    any(header.get(k) != v for k, v in want.items()) or \
                    hashlib.sha256(state.view()).hexdigest() != header["sha256"]:
                path.unlink()
                print(f"neverdark: dropped {path.name}: made for another model or context, "
                      "or damaged", file=sys.stderr)
                continue
        except (OSError, ValueError, KeyError, struct.error) as exc:
            print(f"neverdark: cannot read {path.name}: {exc}", file=sys.stderr)
            continue
        CACHE.put(tuple(int(t) for t in tokens), state, pin=header["key"])
        COUNTERS.restored[header["key"]] = int(header["n_tokens"])
    if COUNTERS.restored:
        print(f"neverdark: restored prefixes {COUNTERS.restored}", file=sys.stderr)


# --- routes -------------------------------------------------------------------------------

class TimingsMiddleware:
    """For each generation request: counts it as pending from arrival (waiting for the lock
    included) to the end, and puts the completion's `timings` into a response that is not
    streamed (the library's response model drops every key it does not name)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path") in GENERATION):
            await self.app(scope, receive, send)
            return
        holder: dict = {}
        token = _REQUEST.set(holder)
        start: dict | None = None
        body: list[bytes] = []

        async def relay(message):
            nonlocal start
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers") or []).get(b"content-type", b"")
                if kind.startswith(b"application/json"):
                    start = message          # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                data = b"".join(body)
                try:
                    doc = json.loads(data)
                    if isinstance(doc, dict) and "choices" in doc and "timings" not in doc \
                            and "timings" in holder:
                        doc["timings"] = holder["timings"]
                        data = json.dumps(doc).encode()
                except ValueError:
                    pass
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(data)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": data})
                return
            await send(message)

        with COUNTERS.lock:
            COUNTERS.pending += 1
        try:
            await self.app(scope, receive, relay)
        finally:
            _REQUEST.reset(token)
            with COUNTERS.lock:
                COUNTERS.pending -= 1


def add_routes(app) -> None:
    from fastapi import Body
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    proxy = server_app._llama_proxy
    llama = proxy(None)
    settings = proxy._default_model_settings
    alias = settings.model_alias or settings.model
    n_ctx = llama.n_ctx()
    restore_all(llama)

    async def lock():
        await server_app.llama_outer_lock.acquire()
        try:
            await server_app.llama_inner_lock.acquire()
        finally:
            server_app.llama_outer_lock.release()

    def unlock():
        server_app.llama_inner_lock.release()

    def health():
        return {"status": "ok"}

    def models():
        return {"object": "list", "data": [{"id": alias, "object": "model",
                                            "owned_by": "llamacpp", "permissions": []}]}

    def props():
        # llama.cpp's own shape: Hermes recognises a llama.cpp server by it, reads n_ctx from
        # it and stops probing other servers' routes before every turn.
        return {"default_generation_settings": {"n_ctx": n_ctx}, "model_alias": alias,
                "total_slots": 1, "engine": "llama-cpp-python", "build_info": VERSION}

    def status():
        with COUNTERS.lock:
            counters = {"pending": COUNTERS.pending, "restored": dict(COUNTERS.restored),
                        "warm": dict(COUNTERS.warm)}
        return {"engine": "llama-cpp-python", "model": alias, "n_ctx": n_ctx,
                "swa_full": SWA_FULL, "pid": os.getpid(), "started_at": STARTED,
                "cache": CACHE.stats(), **counters}

    def metrics():   # no lock: answers while a completion runs
        from fastapi.responses import PlainTextResponse
        return PlainTextResponse(STATS.metrics(), media_type="text/plain; version=0.0.4")

    async def warm(body: dict = Body(...)):
        """{key, messages, tools?, chunk?}: compute the prefix, a chunk per lock hold."""
        key, messages = body.get("key"), body.get("messages")
        if not isinstance(key, str) or not key or not isinstance(messages, list):
            return JSONResponse({"error": "need key (a name) and messages (a list)"}, 400)
        chunk = int(body.get("chunk") or 64)
        started = time.monotonic()
        await lock()
        try:
            prefix = await run_in_threadpool(stable_prefix, llama, messages, body.get("tools"))
        finally:
            unlock()
        evaluated = 0
        while True:
            if COUNTERS.pending:
                held = lcp(llama.input_ids[:llama.n_tokens], prefix)
                return {"ok": False, "preempted": True, "key": key, "tokens": len(prefix),
                        "held": held, "evaluated": evaluated}
            await lock()
            try:
                held, n = await run_in_threadpool(warm_step, llama, prefix, chunk)
                evaluated += n
                done = held == len(prefix) and llama.n_tokens == held
                # Already pinned and nothing computed: nothing to save or write again.
                kept = done and not evaluated and CACHE.pinned.get(key) == tuple(prefix)
                state = await run_in_threadpool(save_state, llama) if done and not kept \
                    else None
            finally:
                unlock()
            if done:
                if state is not None:
                    CACHE.put(tuple(prefix), state, pin=key)
                    await run_in_threadpool(persist, llama, key, state)
                result = {"ok": True, "key": key, "tokens": len(prefix),
                          "evaluated": evaluated, "kept": kept,
                          "state_bytes": state.nbytes if state else None,
                          "seconds": round(time.monotonic() - started, 3)}
                with COUNTERS.lock:
                    COUNTERS.warm[key] = {**result, "at": time.time()}
                return result

    mine = [("/health", health, ["GET"]), ("/v1/models", models, ["GET"]),
            ("/props", props, ["GET"]), ("/v1/props", props, ["GET"]),
            ("/metrics", metrics, ["GET"]), ("/neverdark/status", status, ["GET"]),
            ("/neverdark/warm", warm, ["POST"])]
    before = len(app.router.routes)
    for path, fn, methods in mine:
        app.add_api_route(path, fn, methods=methods, include_in_schema=False)
    # First match wins: ours go in front of the library's lock-taking /v1/models.
    app.router.routes[:] = app.router.routes[before:] + app.router.routes[:before]
    app.add_middleware(TimingsMiddleware)


def main() -> int:
    from llama_cpp.server import model as server_model

    create_app = server_main.create_app

    def create_app_patched(*args, **kwargs):
        app = create_app(*args, **kwargs)
        add_routes(app)
        return app

    server_main.create_app = create_app_patched
    # Its server builds LlamaRAMCache(capacity_bytes=cache_size) when --cache is on; ours
    # instead, always (a restored prefix needs it), sized by NEVERDARK_CACHE_BYTES.
    server_model.llama_cpp.LlamaRAMCache = lambda capacity_bytes=0: CACHE
    load = server_model.LlamaProxy.load_llama_from_model_settings

    def load_with_cache(settings):
        llama = load(settings)
        llama.set_cache(CACHE)
        return llama

    server_model.LlamaProxy.load_llama_from_model_settings = staticmethod(load_with_cache)
    return server_main.main() or 0


if __name__ == "__main__":
    sys.exit(main())
