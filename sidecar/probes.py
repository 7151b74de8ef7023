"""Active health probes of one backend, classified into the reasons the policy acts on.

By default a probe costs no billed tokens: it lists models. ``deep=True`` sends a real 1-token
generation, which on a cloud backend is the optional paid probe. On the local server it is the
readiness check before a switch, and there a generation has a cost too: llama-server gives a
request that names no slot the least recently used one, another wizard's cached prefix, whose
next turn is then cold. So llama-server is asked without generating: its slots (GET /slots),
the model it serves (GET /models) and that the chat template renders (POST /apply-template, the
model's own Jinja template since issue 17, which can fail where chatml did not). llama-cpp-python
has no /apply-template (404): it gets the 1-token generation (one context, no slot to take).

A local probe also reads the engine's counters (sidecar.engine: GET /metrics, which neither engine
holds behind a generation), so every probe round carries where the local turns' time went since
the engine started; metrics.py exports them. They never decide health.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import math
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import httpx

from neverdark import contract
from sidecar import engine, served_context

ANTHROPIC_VERSION = "2023-06-01"

REASONS = (
    "ok", "refused", "reset", "dns", "timeout", "http_5xx", "rate_limited", "auth",
    "bad_response", "passive", "context_too_small",
)


@dataclass(frozen=True)
class ProbeResult:
    backend: str
    ok: bool
    reason: str
    status: int | None
    retry_after: float | None
    latency: float
    detail: str
    # Local backends: the engine's counters at probe time (None: it exports none).
    engine: engine.EngineTotals | None = None
    deep: bool = False   # a real generation (the pre-switch confirmation), not a listing


def _request(backend, deep: bool) -> tuple[str, str, dict, dict | None]:
    """(method, url, headers, json body) for this backend's probe."""
    base = backend.base_url.rstrip("/")
    key = backend.api_key or ""
    kind = backend.kind
    if kind == "anthropic":
        headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
        if deep:
            body = {"model": backend.model, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "ping"}]}
            return "POST", f"{base}/v1/messages", headers, body
        return "GET", f"{base}/v1/models", headers, None
    if kind == "google":
        # base_url carries the API version, as Hermes takes it
        # (https://generativelanguage.googleapis.com/v1beta).
        # The header, not ?key=, so the key never lands in a URL that httpx or a proxy may log.
        headers = {"x-goog-api-key": key}
        if deep:
            body = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}],
                    "generationConfig": {"maxOutputTokens": 1}}
            return "POST", f"{base}/models/{backend.model}:generateContent", headers, body
        return "GET", f"{base}/models", headers, None
    if kind == "ollama" and not deep:
        return "GET", f"{contract.url_root(base)}/api/tags", {}, None
    if kind in ("openai", "local", "ollama"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if deep:
            body = {"model": backend.model, "max_tokens": 1,
                    "messages": [{"role": "user", "content": "ping"}]}
            return "POST", f"{base}/chat/completions", headers, body
        return "GET", f"{base}/models", headers, None
    raise ValueError(f"unknown backend kind {kind!r}")


def _shape_ok(kind: str, deep: bool, data) -> bool:
    if not isinstance(data, dict):
        return False
    if deep:
        if kind == "anthropic":
            return isinstance(data.get("content"), list)
        if kind == "google":
            return isinstance(data.get("candidates"), list) and bool(data["candidates"])
        choices = data.get("choices")
        return isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict)
    if kind in ("google", "ollama"):
        return isinstance(data.get("models"), list)
    return isinstance(data.get("data"), list)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def _seconds_until(when: datetime, now: datetime) -> float | None:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        return max(0.0, (when - now).total_seconds())   # a date in the past: retry now
    except OverflowError:   # beyond datetime's range once converted: not a usable stamp
        return None


def _rfc3339(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def _seconds(text: str, scale: float = 1.0) -> float | None:
    """A header's number of seconds; None unless finite and >= 0 ('inf', 'nan', '1e309', '-5')."""
    try:
        value = float(text) / scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_retry_after(headers: httpx.Headers, body: bytes, now: datetime | None = None) -> float | None:
    """Seconds the provider asked us to wait, from whichever usable signal it sent; None if none.

    Only finite values >= 0 count; an absurd but finite one (a year) is returned as asked: the
    policy caps it at max_hold and says so. `now` is the wall clock, which HTTP-dates and
    Anthropic's reset stamps are read against: the only use the sidecar makes of wall time for
    holds.
    """
    now = now or datetime.now(timezone.utc)
    # The millisecond header is the more precise twin of Retry-After where both are sent.
    ms = headers.get("retry-after-ms")
    if ms and (value := _seconds(ms, 1000.0)) is not None:
        return value
    ra = headers.get("retry-after")
    if ra:
        value = _seconds(ra)
        if value is not None:
            return value
        try:
            value = _seconds_until(parsedate_to_datetime(ra), now)
        except (TypeError, ValueError, IndexError, OverflowError):
            value = None
        if value is not None:
            return value
    resets: dict[str, float] = {}
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        raw = headers.get(f"anthropic-ratelimit-{kind}-reset")
        when = _rfc3339(raw) if raw else None
        seconds = _seconds_until(when, now) if when is not None else None
        if seconds is not None:
            resets[kind] = seconds
    if resets:
        # The exhausted bucket is the one that decides; unknown exhaustion -> earliest reset.
        spent = [s for k, s in resets.items()
                 if headers.get(f"anthropic-ratelimit-{k}-remaining") == "0"]
        return max(spent) if spent else min(resets.values())
    return _gemini_retry_delay(body)


def _gemini_retry_delay(body: bytes) -> float | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for item in details:
        if isinstance(item, dict) and isinstance(item.get("retryDelay"), str):
            m = _DURATION.match(item["retryDelay"])
            if m and (value := _seconds(m.group(1))) is not None:
                return value
    return None


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _classify_transport(exc: Exception) -> str:
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            return "dns"
        if isinstance(cause, ConnectionRefusedError):
            return "refused"
        if isinstance(cause, ConnectionResetError):
            return "reset"
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "refused"
    text = str(exc).lower()
    if "name or service not known" in text or "name resolution" in text or "nodename" in text:
        return "dns"
    if "refused" in text:
        return "refused"
    if isinstance(exc, httpx.ConnectError):
        return "refused"
    # ReadError, RemoteProtocolError ("Server disconnected"), WriteError: the peer hung up.
    return "reset"


def _redact(text: str, backend) -> str:
    key = backend.api_key
    if key:
        text = text.replace(key, "***")
    return text[:300]


async def probe(backend, client: httpx.AsyncClient, timeout: float, deep: bool = False) -> ProbeResult:
    started = time.monotonic()

    def result(ok: bool, reason: str, status=None, retry_after=None, detail="") -> ProbeResult:
        return ProbeResult(backend.name, ok, reason, status, retry_after,
                           time.monotonic() - started, _redact(detail, backend), deep=deep)

    if backend.kind == "local" and deep:
        ready = await _llama_server_ready(backend, client, timeout)
        if ready is not None:
            return result(*ready)
    if backend.kind == "local" and not deep:
        # Liveness of the local server is its /health, which both engines answer without
        # waiting for a generation (llama-server itself; llama-cpp-python through neverdark's
        # launcher, whose library routes all wait): 200 once the model is loaded, 503 while
        # llama-server is still loading it. Readiness is the deep probe (a one-token
        # generation), sent just before a switch onto it.
        method, url, body = "GET", f"{contract.url_root(backend.base_url)}/health", None
        headers = engine.auth_headers(backend.api_key)
    else:
        method, url, headers, body = _request(backend, deep)

    try:
        # The outer bound catches a server that trickles bytes and so never trips a phase timeout.
        async with asyncio.timeout(timeout):
            response = await client.request(method, url, headers=headers, json=body, timeout=timeout)
            content = response.content
    except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
        reason = _classify_transport(exc)
        return result(False, reason, detail=f"{type(exc).__name__}: {exc}")

    status = response.status_code
    if status == 429:
        return result(False, "rate_limited", status, parse_retry_after(response.headers, content),
                      f"HTTP 429 from {method} {response.url.path}")
    if status in (401, 403):
        return result(False, "auth", status, detail=f"HTTP {status} from {response.url.path}")
    if status >= 500:
        return result(False, "http_5xx", status, parse_retry_after(response.headers, content),
                      f"HTTP {status} from {response.url.path}")
    if status >= 300:
        return result(False, "bad_response", status, detail=f"HTTP {status} from {response.url.path}")
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return result(False, "bad_response", status, detail="body is not JSON")
    if backend.kind == "local" and not deep:
        done = result(True, "ok", status, detail="healthy")
        totals = await engine.scrape(client, backend.base_url, timeout=min(timeout, 2.0),
                                     key=backend.api_key)
        return done if totals is None else dataclasses.replace(done, engine=totals)
    if not _shape_ok(backend.kind, deep, data):
        return result(False, "bad_response", status, detail="body has the wrong shape")
    if not deep and backend.kind in ("ollama", "openai"):
        short = await _served_context_problem(backend, client, data, timeout)
        if short:
            return result(False, "context_too_small", status, detail=short)
    return result(True, "ok", status, detail="deep" if deep else "")


async def _served_context_problem(backend, client: httpx.AsyncClient, data: dict,
                                  timeout: float) -> str | None:
    """Why a server neverdark does not run cannot serve what Hermes is told (None: it can, or
    it does not say)."""
    wanted = getattr(backend, "context_length", None)
    if backend.kind == "openai":
        served, source = served_context.openai_models(data, backend.model)
        return served_context.too_small(served, wanted, source)
    root = contract.url_root(backend.base_url)
    try:
        served, source = await served_context.ollama(client, root, backend.model, timeout)
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return f"cannot read the model's context from Ollama: {type(exc).__name__}: {exc}"
    if served is None:
        return source
    return served_context.too_small(served, wanted, source)


PING = [{"role": "user", "content": "ping"}]


async def _llama_server_ready(backend, client: httpx.AsyncClient, timeout: float):
    """llama-server's readiness without a generation, as result() arguments (ok, reason,
    status, retry_after, detail); None when the server has no /apply-template (llama-cpp-python:
    the caller generates one token instead)."""
    root, base = contract.url_root(backend.base_url), backend.base_url.rstrip("/")
    # A server other hosts reach wants its key on every route but /health.
    headers = engine.auth_headers(backend.api_key)
    steps = (("POST", f"{root}/apply-template", {"messages": PING}),
             ("GET", f"{root}/slots", None),
             ("GET", f"{base}/models", None))
    try:
        async with asyncio.timeout(timeout):
            for i, (method, url, body) in enumerate(steps):
                response = await client.request(method, url, headers=headers, json=body,
                                                  timeout=timeout)
                status, path = response.status_code, response.url.path
                if i == 0 and status == 404:
                    return None
                if status == 501 and path.endswith("/slots"):
                    continue      # started with --no-slots: nothing to read there
                if status >= 500:
                    return (False, "http_5xx", status, None, f"HTTP {status} from {path}")
                if status != 200:
                    return (False, "bad_response", status, None, f"HTTP {status} from {path}")
                try:
                    data = json.loads(response.content)
                except (ValueError, UnicodeDecodeError):
                    return (False, "bad_response", status, None, f"{path}: body is not JSON")
                problem = _ready_problem(path, data, backend.model)
                if problem:
                    return (False, "bad_response", status, None, problem)
    except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
        return (False, _classify_transport(exc), None, None, f"{type(exc).__name__}: {exc}")
    return (True, "ok", 200, None, "deep (slots, model and template, no generation)")


def _ready_problem(path: str, data, model: str) -> str | None:
    if path.endswith("/apply-template"):
        if not (isinstance(data, dict) and isinstance(data.get("prompt"), str) and data["prompt"]):
            return f"{path}: no prompt rendered"
    elif path.endswith("/slots"):
        if not (isinstance(data, list) and data):
            return f"{path}: no slots"
    else:
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] \
            if isinstance(data, dict) and isinstance(data.get("data"), list) else None
        if ids is None:
            return f"{path}: body has the wrong shape"
        if model not in ids:
            return f"{path}: serves {', '.join(map(str, ids)) or 'no model'}, not {model}"
    return None
