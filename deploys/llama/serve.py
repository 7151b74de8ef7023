"""Run llama-cpp-python's OpenAI-compatible server with a sliding-window KV cache, and say where
each completion's time went, the way llama.cpp's own llama-server does.

- swa_full: the server's CLI has no flag for it; left at llama.cpp's default a Gemma 3 model keeps
  a full-size sliding-window cache, about 1 GB wasted at n_ctx 65536. NEVERDARK_SWA_FULL=true
  keeps llama.cpp's behaviour for models that need it.
- Timings: every chat or text completion gets a `timings` object with native llama-server's keys
  (prompt_n = prompt tokens evaluated, cache_n = prompt tokens reused from the context,
  prompt_ms, predicted_n, predicted_ms) plus what only this server has: queue_ms (waiting for the
  server's single generation lock), cache_save_ms and cache_load_ms (the RAM prompt cache's state
  copies). It is added to the response (the last chunk when streamed), printed to stderr as one
  `neverdark-timings {json}` line (the journal), and summed in `GET /metrics` under native
  llama-server's metric names, so one scraper reads either engine. /metrics does not take the
  generation lock: it answers during a long prefill.
"""
import functools
import json
import os
import sys
import threading
import time

import llama_cpp
import llama_cpp.server.__main__ as server_main
import llama_cpp.server.app as server_app

_swa_full = os.environ.get("NEVERDARK_SWA_FULL", "false").lower() == "true"
_init = llama_cpp.Llama.__init__


@functools.wraps(_init)
def _init_with_swa(self, *args, **kwargs):
    kwargs.setdefault("swa_full", _swa_full)
    _init(self, *args, **kwargs)


llama_cpp.Llama.__init__ = _init_with_swa


# --- timings ---------------------------------------------------------------------------------

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


server_app.get_llama_proxy = _timed_llama_proxy


def _record():
    rec = STATS.current
    if rec is None or rec.done:   # a completion outside the HTTP routes (none today)
        rec = _Completion()
        STATS.current = rec
    return rec


_generate = llama_cpp.Llama.generate
_eval = llama_cpp.Llama.eval


def _timed_eval(self, tokens):
    rec = STATS.current
    if rec is not None and rec.prompt_n is not None and rec.predicted_n == 0:
        rec.prompt_n += len(tokens)   # the prompt's uncached suffix (before any token is out)
    return _eval(self, tokens)


@functools.wraps(_generate)
def _timed_generate(self, tokens, *args, **kwargs):
    rec = _record()
    tokens = list(tokens)
    rec.prompt_total = len(tokens)
    rec.prompt_n = 0
    started = time.monotonic()
    first = None
    inner = _generate(self, tokens, *args, **kwargs)
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

_create_app = server_main.create_app


def _create_app_with_metrics(*args, **kwargs):
    from fastapi.responses import PlainTextResponse
    app = _create_app(*args, **kwargs)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():   # no lock dependency: answers while a completion runs
        return PlainTextResponse(STATS.metrics(), media_type="text/plain; version=0.0.4")

    return app


server_main.create_app = _create_app_with_metrics

if __name__ == "__main__":
    sys.exit(server_main.main())
