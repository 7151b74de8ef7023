"""Where a local turn's time goes, from the llama engine's own counters: either engine.

Both engines neverdark runs speak llama.cpp's vocabulary:

- native `llama-server` (with `--metrics`): `GET /metrics` has counters `llamacpp:prompt_tokens_total`
  (prompt tokens evaluated, cached ones excluded), `llamacpp:prompt_tokens_cached_total`,
  `llamacpp:prompt_seconds_total`, `llamacpp:tokens_predicted_total`,
  `llamacpp:tokens_predicted_seconds_total` and gauges `requests_processing`/`requests_deferred`;
  every completion response carries `timings` {cache_n, prompt_n, prompt_ms, predicted_n,
  predicted_ms, ...}; each finished task logs a block ending in "prompt eval time = ... ms / N
  tokens", "eval time = ...", "total time = ..." (tools/server/server-context.cpp print_timings).
- llama-cpp-python through neverdark's launcher (llama_launcher): the same /metrics names
  and `timings` keys, plus what only it has: `queue_ms` (waiting for its single lock),
  `cache_save_ms`/`cache_load_ms` (RAM prompt cache) and `neverdark_engine_*` counters; one
  `neverdark-timings {json}` line per completion on stderr.

A turn's breakdown is the difference of two scrapes around it (exact while the engine serves no
one else; `requests` tells), the turn's wall time as the client saw it, and Hermes' session record
(how many API calls the turn took: empty answers are resent). Gateway overhead is what is left.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

import httpx

from neverdark import contract

# Prometheus names -> EngineTotals fields. None-valued fields: the engine does not count it.
_METRICS = {
    "llamacpp:prompt_tokens_total": "prompt_tokens",
    "llamacpp:prompt_tokens_cached_total": "cached_tokens",
    "llamacpp:prompt_seconds_total": "prefill_s",
    "llamacpp:tokens_predicted_total": "generated_tokens",
    "llamacpp:tokens_predicted_seconds_total": "generation_s",
    "neverdark_engine_requests_total": "requests",
    "neverdark_engine_queue_seconds_total": "queue_s",
    "neverdark_engine_cache_save_seconds_total": "cache_save_s",
    "neverdark_engine_empty_completions_total": "empty",
}
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True)
class EngineTotals:
    """Counters since the engine started (or a difference of two scrapes)."""

    prompt_tokens: float = 0.0       # evaluated, cache hits excluded
    cached_tokens: float | None = None
    prefill_s: float = 0.0
    generated_tokens: float = 0.0
    generation_s: float = 0.0
    requests: float | None = None
    queue_s: float | None = None
    cache_save_s: float | None = None
    empty: float | None = None

    def __sub__(self, before: "EngineTotals") -> "EngineTotals":
        def d(a, b):
            return None if a is None or b is None else a - b
        return EngineTotals(**{f.name: d(getattr(self, f.name), getattr(before, f.name))
                               for f in fields(self)})

    def engine_seconds(self) -> float:
        return (self.queue_s or 0.0) + self.prefill_s + self.generation_s + (self.cache_save_s or 0.0)


def parse_metrics(text: str) -> EngineTotals:
    """EngineTotals from either engine's Prometheus text; ValueError if it has none of them."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m and m.group(1) in _METRICS:
            found[_METRICS[m.group(1)]] = float(m.group(2))
    if "prompt_tokens" not in found:
        raise ValueError("no llamacpp:prompt_tokens_total: not a llama engine's /metrics "
                         "(native llama-server needs --metrics)")
    return EngineTotals(**found)


def auth_headers(key: str | None) -> dict[str, str]:
    """What a request to a local engine carries: its key when it has one (a server other hosts
    of the fleet reach; /health alone is open there)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


async def scrape(client: httpx.AsyncClient, base_url: str, timeout: float = 5.0,
                 key: str | None = None) -> EngineTotals | None:
    """The engine's counters now, or None when it has none to give (old launcher, native
    without --metrics, down)."""
    try:
        r = await client.get(contract.url_root(base_url) + "/metrics", timeout=timeout,
                             headers=auth_headers(key))
        if r.status_code != 200:
            return None
        return parse_metrics(r.text)
    except (httpx.HTTPError, ValueError):
        return None


# --- one completion ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Completion:
    """One completion's timings, from a response's `timings` or an engine log."""

    prompt_n: int            # prompt tokens evaluated
    cache_n: int | None      # prompt tokens reused from the cache
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    queue_ms: float | None = None
    cache_save_ms: float | None = None
    empty: bool | None = None


def from_timings(obj: dict) -> Completion:
    """A response's `timings` object (native llama-server or neverdark's launcher)."""
    save = obj.get("cache_save_ms")
    if save is not None and obj.get("cache_load_ms") is not None:
        save = float(save) + float(obj["cache_load_ms"])
    return Completion(prompt_n=int(obj["prompt_n"]),
                      cache_n=None if obj.get("cache_n") is None else int(obj["cache_n"]),
                      prompt_ms=float(obj["prompt_ms"]), predicted_n=int(obj["predicted_n"]),
                      predicted_ms=float(obj["predicted_ms"]),
                      queue_ms=None if obj.get("queue_ms") is None else float(obj["queue_ms"]),
                      cache_save_ms=None if save is None else float(save),
                      empty=obj.get("empty"))


_LAUNCHER = re.compile(r"neverdark-timings (\{.*\})")
_NATIVE_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_NATIVE_EVAL = re.compile(r"^(?:.*\|\s+)?\s*eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_NATIVE_TASK = re.compile(r"\| task (-?\d+) \|")
_NATIVE_CACHE = re.compile(r"\| task (-?\d+) \|.*n_past = (\d+)")


def parse_log(text: str) -> list[Completion]:
    """Completions from an engine's log (the journal of its unit, or a captured stderr):
    neverdark's launcher lines, and native llama-server's print_timings blocks. Native logs no
    per-task cache hit count in its timing block; its "n_past = N" line before the prompt is
    evaluated gives it where present."""
    out: list[Completion] = []
    past: dict[str, int] = {}
    pending: dict[str, tuple[float, int]] = {}
    for line in text.splitlines():
        m = _LAUNCHER.search(line)
        if m:
            try:
                out.append(from_timings(json.loads(m.group(1))))
            except (ValueError, KeyError, TypeError):
                pass
            continue
        task = _NATIVE_TASK.search(line)
        key = task.group(1) if task else ""
        m = _NATIVE_CACHE.search(line)
        if m:
            past[m.group(1)] = int(m.group(2))
        m = _NATIVE_PROMPT.search(line)
        if m:
            pending[key] = (float(m.group(1)), int(m.group(2)))
            continue
        m = _NATIVE_EVAL.search(line)
        if m and "prompt eval" not in line and key in pending:
            p_ms, p_n = pending.pop(key)
            out.append(Completion(prompt_n=p_n, cache_n=past.pop(key, None), prompt_ms=p_ms,
                                  predicted_n=int(m.group(2)), predicted_ms=float(m.group(1))))
    return out


# --- one turn ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnBreakdown:
    """Where one turn's wall time went. Engine fields are None when the engine gave no counters;
    `shared` is set when the engine served more requests than the turn made (another wizard)."""

    wall_s: float
    # Hermes' requests to the model this turn (1 + retries of empty answers), from its session
    # record; None where Hermes counted none (llama-cpp-python streams no usage, so Hermes records
    # no calls for it): `requests`, the engine's own count, then says it.
    api_calls: int | None = None
    requests: float | None = None
    prompt_tokens: float | None = None   # the prompt as the engine counts it (evaluated + cached)
    cached_tokens: float | None = None
    queue_s: float | None = None
    prefill_s: float | None = None
    generated_tokens: float | None = None
    generation_s: float | None = None
    cache_save_s: float | None = None
    empty: float | None = None
    overhead_s: float | None = None      # gateway: wall minus everything the engine accounts for
    shared: bool = False

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def breakdown(wall_s: float, delta: EngineTotals | None, api_calls: int | None) -> TurnBreakdown:
    api_calls = api_calls or None   # 0: Hermes saw no usage, not "no call"
    if delta is None:
        return TurnBreakdown(wall_s=wall_s, api_calls=api_calls)
    cached = delta.cached_tokens
    return TurnBreakdown(
        wall_s=wall_s, api_calls=api_calls, requests=delta.requests,
        prompt_tokens=delta.prompt_tokens + (cached or 0.0), cached_tokens=cached,
        queue_s=delta.queue_s, prefill_s=delta.prefill_s,
        generated_tokens=delta.generated_tokens, generation_s=delta.generation_s,
        cache_save_s=delta.cache_save_s, empty=delta.empty,
        overhead_s=max(0.0, wall_s - delta.engine_seconds()),
        shared=bool(api_calls is not None and delta.requests is not None
                    and delta.requests > api_calls))


def format_breakdown(b: dict | TurnBreakdown | None) -> str:
    """One line for people: `neverdark drill`, the demo, the benchmark."""
    if b is None:
        return "no breakdown"
    d = b.as_dict() if isinstance(b, TurnBreakdown) else dict(b)
    parts = [f"{d['wall_s']:.2f} s"]
    calls = d.get("api_calls") if d.get("api_calls") is not None else d.get("requests")
    if calls is not None:
        parts.append(f"{calls:.0f} request{'s' if calls != 1 else ''}")
    if d.get("prefill_s") is None:
        return ", ".join(parts) + " (the engine gave no timings)"
    if d.get("queue_s") is not None:
        parts.append(f"queue {d['queue_s']:.2f} s")
    cached = d.get("cached_tokens")
    parts.append(f"prompt {d['prompt_tokens']:.0f} tok" + (f" ({cached:.0f} cached)" if cached is not None else "")
                 + f" prefill {d['prefill_s']:.2f} s")
    parts.append(f"{d['generated_tokens']:.0f} tok generated in {d['generation_s']:.2f} s")
    if d.get("cache_save_s"):
        parts.append(f"cache save {d['cache_save_s']:.2f} s")
    if d.get("empty"):
        parts.append(f"{d['empty']:.0f} empty")
    parts.append(f"gateway {d['overhead_s']:.2f} s")
    if d.get("shared"):
        parts.append("engine shared with other requests")
    return ", ".join(parts)
