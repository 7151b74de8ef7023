"""Where each completion's time went: per-request `timings` with native llama-server's keys,
one `neverdark-timings {json}` line per completion on stderr, and the totals as `/metrics`
(llama.cpp's `llamacpp:*` names, `neverdark_engine_*` for what only this engine counts).

`install()` wraps the server's lock dependency and llama_cpp.Llama's methods, after
cache.install() has patched them (the wrappers time the patched methods).
"""

from __future__ import annotations

import contextvars
import functools
import json
import sys
import threading
import time

import llama_cpp
import llama_cpp.server.app as server_app

GENERATION = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings",
              "/v1/engines/copilot-codex/completions")


class Completion:
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


class Stats:
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

    def gauges(self) -> dict:
        with self.lock:
            return {"requests_processing": self.processing, "requests_deferred": self.deferred}

    def metrics(self):
        with self.lock:
            t = dict(self.totals)
        gauges = self.gauges()
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


STATS = Stats()
# The request's own record holder, set by TimingsMiddleware: a response that is not streamed
# goes through the library's response model, which drops `timings`; the middleware adds it.
REQUEST: contextvars.ContextVar[dict | None] = contextvars.ContextVar("neverdark_request",
                                                                    default=None)


def timed_proxy(get_llama_proxy):
    """The server's lock dependency (looked up by name at each completion request), timing the
    wait for the lock and closing the completion's record when the request ends."""
    async def timed_llama_proxy():
        arrived = time.monotonic()
        with STATS.lock:
            STATS.deferred += 1
        locked = False
        rec = None
        try:
            async for proxy in get_llama_proxy():
                locked = True
                rec = Completion(queue_ms=(time.monotonic() - arrived) * 1000)
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
                holder = REQUEST.get()
                if holder is not None:
                    holder["timings"] = rec.timings()
    return timed_llama_proxy


def _record():
    rec = STATS.current
    if rec is None or rec.done:   # a completion outside the HTTP routes (none today)
        rec = Completion()
        STATS.current = rec
    return rec


def timed_eval(method):
    @functools.wraps(method)
    def wrapper(self, tokens):
        rec = STATS.current
        if rec is not None and rec.prompt_n is not None and rec.predicted_n == 0:
            rec.prompt_n += len(tokens)   # the prompt's uncached suffix (before any token is out)
        return method(self, tokens)
    return wrapper


def timed_generate(method):
    @functools.wraps(method)
    def wrapper(self, tokens, *args, **kwargs):
        rec = _record()
        tokens = list(tokens)
        rec.prompt_total = len(tokens)
        rec.prompt_n = 0
        started = time.monotonic()
        first = None
        inner = method(self, tokens, *args, **kwargs)
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
    return wrapper


def timed(method, field):
    """Adds the call's duration to the current completion's `field`."""
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


def with_timings(method, text_of):
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


def chat_text(choice, streamed):
    msg = choice.get("delta" if streamed else "message") or {}
    return msg.get("content") or ""


def text(choice, streamed):
    return choice.get("text") or ""


def install() -> None:
    Llama = llama_cpp.Llama
    server_app.get_llama_proxy = timed_proxy(server_app.get_llama_proxy)
    Llama.eval = timed_eval(Llama.eval)
    Llama.generate = timed_generate(Llama.generate)
    Llama.save_state = timed(Llama.save_state, "cache_save_ms")
    Llama.load_state = timed(Llama.load_state, "cache_load_ms")
    Llama.create_chat_completion = with_timings(Llama.create_chat_completion, chat_text)
    Llama.__call__ = with_timings(Llama.__call__, text)


class TimingsMiddleware:
    """Puts the completion's `timings` into a generation response that is not streamed (the
    library's response model drops every key it does not name)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path") in GENERATION):
            await self.app(scope, receive, send)
            return
        holder: dict = {}
        token = REQUEST.set(holder)
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

        try:
            await self.app(scope, receive, relay)
        finally:
            REQUEST.reset(token)
