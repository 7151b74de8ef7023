"""Probe classification against real servers on loopback.

Real: an `llmock serve` process (OpenAI, Anthropic and Gemini routes) with faults scripted through
its admin API; a closed loopback port for 'refused'; small stdlib servers for what LLMock cannot
emit (a TCP reset, a Gemini `retryDelay` body, Anthropic's RFC 3339 reset headers, a non-JSON
body); a real llama-cpp-python server for the local kind; a DNS failure from the real resolver in
a private mount namespace whose resolv.conf names 127.0.0.1 (so no query leaves the machine).

Why one module: every test here drives the one `probe` function, and they share its servers
(module-scoped fixtures: LLMock, the engines), which split files would each start again.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from neverdark import contract
from sidecar.probes import ProbeResult, parse_retry_after, probe
from testbed.llmock import free_port, llmock, llmock_module  # noqa: F401  (fixtures)

SECRET = "sk-probe-secret-do-not-log-0123456789"


def backend(kind: str, base_url: str, model: str = "m", api_key: str | None = SECRET):
    return SimpleNamespace(name=f"{kind}-b", kind=kind, base_url=base_url, model=model,
                           api_key=api_key, variant=Path("/nonexistent"))


def run_probe(b, timeout: float = 5.0, deep: bool = False) -> ProbeResult:
    async def go():
        async with httpx.AsyncClient() as client:
            return await probe(b, client, timeout, deep)
    r = asyncio.run(go())
    assert SECRET not in r.detail
    return r


def kinds(mock):
    return {
        "openai": backend("openai", mock.openai_base, "gpt-4o-mini"),
        "anthropic": backend("anthropic", mock.anthropic_base, "claude-sonnet-4-5"),
        "google": backend("google", mock.google_base, "gemini-2.0-flash"),
    }


@pytest.mark.parametrize("kind", ["openai", "anthropic", "google"])
def test_healthy_listing_is_ok_and_sends_the_key_in_a_header(llmock, kind):
    r = run_probe(kinds(llmock)[kind])
    assert (r.ok, r.reason, r.status) == (True, "ok", 200)
    [req] = llmock.requests()
    assert req["method"] == "GET" and req["path"].endswith("models")
    assert SECRET not in req["path"]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "google"])
def test_deep_probe_asks_for_one_token(llmock, kind):
    r = run_probe(kinds(llmock)[kind], deep=True)
    assert (r.ok, r.reason, r.deep) == (True, "ok", True)
    [req] = llmock.requests()
    assert req["method"] == "POST"
    body = req["body"]
    assert body.get("max_tokens") == 1 or body.get("generationConfig", {}).get("maxOutputTokens") == 1


@pytest.mark.parametrize("kind", ["openai", "anthropic", "google"])
@pytest.mark.parametrize("status,reason", [
    (500, "http_5xx"), (502, "http_5xx"), (503, "http_5xx"), (529, "http_5xx"),
    (401, "auth"), (403, "auth"), (404, "bad_response"),
])
def test_http_faults_are_classified(llmock, kind, status, reason):
    llmock.fault({"type": "fail", "status": status})
    r = run_probe(kinds(llmock)[kind])
    assert (r.ok, r.reason, r.status) == (False, reason, status)
    assert llmock.requests()[0]["fault"] == f"scenario:{status}"


@pytest.mark.parametrize("kind", ["openai", "anthropic", "google"])
def test_429_retry_after_from_llmock_headers(llmock, kind):
    # LLMock sends retry-after (whole seconds, rounded up) and retry-after-ms; the ms one wins.
    llmock.fault({"type": "fail", "status": 429, "retry_after": 7.25})
    r = run_probe(kinds(llmock)[kind])
    assert (r.ok, r.reason, r.status, r.retry_after) == (False, "rate_limited", 429, 7.25)


def test_429_without_retry_after_gets_llmocks_default(llmock):
    # LLMock 0.2.2 gives every 429/503/504/529 a 1 s Retry-After when none is scripted.
    llmock.fault({"type": "fail", "status": 429})
    r = run_probe(kinds(llmock)["openai"])
    assert (r.reason, r.retry_after) == ("rate_limited", 1.0)


def test_delay_past_timeout_is_timeout(llmock):
    llmock.fault({"type": "delay", "seconds": 3})
    r = run_probe(kinds(llmock)["anthropic"], timeout=0.5)
    assert (r.ok, r.reason, r.status) == (False, "timeout", None)
    assert r.latency < 2.0


def test_closed_port_is_refused():
    r = run_probe(backend("openai", f"http://127.0.0.1:{free_port()}/v1"))
    assert (r.ok, r.reason) == (False, "refused")


# --- stdlib servers for what LLMock cannot send ---------------------------------------------

class _Canned(BaseHTTPRequestHandler):
    status = 200
    headers_out: dict = {}
    body = b""

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        for k, v in self.headers_out.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    servers = []

    def start(status, body, headers=None):
        handler = type("H", (_Canned,), {"status": status, "body": body, "headers_out": headers or {}})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_gemini_retry_delay_body(canned):
    # Gemini's documented 429 shape; LLMock 0.2.2 sends no `details`, so this is served by hand.
    body = json.dumps({"error": {"code": 429, "message": "Resource has been exhausted",
                                 "status": "RESOURCE_EXHAUSTED", "details": [
                                     {"@type": "type.googleapis.com/google.rpc.QuotaFailure"},
                                     {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                      "retryDelay": "17s"}]}}).encode()
    r = run_probe(backend("google", canned(429, body)))
    assert (r.reason, r.retry_after) == ("rate_limited", 17.0)


def test_anthropic_reset_headers(canned):
    # LLMock emits these only with --rpm quotas; the exhausted bucket's reset must win.
    now = datetime.now(timezone.utc)
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": (now + timedelta(seconds=40)).isoformat().replace("+00:00", "Z"),
        "anthropic-ratelimit-tokens-remaining": "5000",
        "anthropic-ratelimit-tokens-reset": (now + timedelta(seconds=5)).isoformat().replace("+00:00", "Z"),
    }
    r = run_probe(backend("anthropic", canned(429, b"{}", headers)))
    assert r.reason == "rate_limited"
    assert 35 < r.retry_after <= 40


def test_retry_after_http_date(canned):
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    r = run_probe(backend("openai", canned(429, b"{}", {"Retry-After": format_datetime(when, usegmt=True)})))
    assert r.reason == "rate_limited" and 25 < r.retry_after <= 30


def test_llmock_quota_sends_anthropic_reset_headers(tmp_path):
    """A real LLMock with --rpm 1: the second listing is a quota 429 with Anthropic's headers."""
    from testbed.llmock import LLMock
    mock = LLMock(tmp_path, ("--rpm", "1"))
    try:
        b = kinds(mock)["anthropic"]
        assert run_probe(b).ok
        r = run_probe(b)
        assert r.reason == "rate_limited" and 50 < r.retry_after <= 61
    finally:
        mock.stop()


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"unexpected": true}', b"[1, 2]"])
def test_wrong_body_is_bad_response(canned, body):
    r = run_probe(backend("openai", canned(200, body) + "/v1"))
    assert (r.ok, r.reason, r.status) == (False, "bad_response", 200)


def test_connection_reset():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        for _ in range(4):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(4096)
            # SO_LINGER 0 makes close() send RST instead of FIN: a real reset.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        r = run_probe(backend("openai", f"http://127.0.0.1:{srv.getsockname()[1]}/v1"))
        assert (r.ok, r.reason) == (False, "reset")
    finally:
        srv.close()


def test_dns_failure(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = textwrap.dedent(f"""
        import asyncio, httpx
        from types import SimpleNamespace
        from sidecar.probes import probe
        b = SimpleNamespace(name="x", kind="openai", base_url="http://api.neverdark-test.invalid/v1",
                            model="m", api_key="k")
        async def go():
            async with httpx.AsyncClient() as c:
                return await probe(b, c, 5.0)
        print(asyncio.run(go()).reason)
    """)
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         f'mount --bind "{resolv}" /etc/resolv.conf && exec "{sys.executable}" -c "$0"', script],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "dns"


def test_retry_after_parser_priorities():
    h = httpx.Headers({"retry-after": "9", "retry-after-ms": "8500"})
    assert parse_retry_after(h, b"") == 8.5
    assert parse_retry_after(httpx.Headers({"retry-after": "-3"}), b"") is None
    assert parse_retry_after(httpx.Headers({}), b"not json") is None
    # An unusable millisecond header gives way to the seconds one.
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "inf", "retry-after": "4"}), b"") == 4.0


def _gemini_429(delay: str) -> bytes:
    return json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}}).encode()


@pytest.mark.parametrize("headers,body,expected", [
    ({"Retry-After": "inf"}, b"{}", None),
    ({"Retry-After": "nan"}, b"{}", None),
    ({"Retry-After": "1e309"}, b"{}", None),
    ({"Retry-After": "-5"}, b"{}", None),
    ({"retry-after-ms": "-Infinity"}, b"{}", None),
    ({"Retry-After": "1e9"}, b"{}", 1e9),                         # finite: the policy caps it
    ({"Retry-After": "inf"}, _gemini_429("17s"), 17.0),           # the next usable signal wins
    ({}, _gemini_429("999999999s"), 999999999.0),
    ({}, _gemini_429("9" * 400 + "s"), None),                     # overflows to inf
    ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, b"{}", "far"),
    ({"anthropic-ratelimit-requests-reset": "9999-12-31T23:59:59-12:00"}, b"{}", "far"),
    ({"anthropic-ratelimit-requests-reset": "not a time"}, b"{}", None),
])
def test_unusable_provider_hints_are_ignored(canned, headers, body, expected):
    """Through real HTTP: what a provider (or a broken proxy) may send in a 429."""
    r = run_probe(backend("google", canned(429, body, headers)))
    assert r.reason == "rate_limited"
    if expected == "far":
        assert r.retry_after > 200 * 365 * 86400 and r.retry_after != float("inf")
    else:
        assert r.retry_after == expected


# --- local llama server -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The deployed launcher (llama_launcher) with the deployed request handling."""
    from testbed.llama_server import LlamaServer, LlamaServerError
    try:
        server = LlamaServer(tmp_path_factory.mktemp("llama"), n_ctx=2048)
    except LlamaServerError as e:
        pytest.fail(str(e))
    try:
        yield server.base_url
    finally:
        server.stop()


def test_local_liveness_and_deep_readiness(llama_server):
    b = backend("local", llama_server, "gemma3-270m", api_key=None)
    live = run_probe(b)
    assert (live.ok, live.reason) == (True, "ok")
    deep = run_probe(b, timeout=60, deep=True)
    assert (deep.ok, deep.reason) == (True, "ok"), deep.detail


def test_local_liveness_answers_while_a_long_answer_streams(llama_server):
    """The liveness probe (/health) neither waits for nor cuts short a generation in flight
    (any route of llama-cpp-python's own server would do one or the other; the launcher
    answers /health itself)."""
    b = backend("local", llama_server, "gemma3-270m", api_key=None)
    out = {}

    def generate():   # streamed, as Hermes asks
        with httpx.stream("POST", f"{llama_server}/chat/completions", timeout=120, json={
                # ~1,500 prompt tokens: seconds of prefill, whatever the model then says.
                "messages": [{"role": "user", "content": "tell me a story " * 375}],
                "max_tokens": 200, "stream": True}) as r:
            out["status"] = r.status_code
            out["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]
    worker = threading.Thread(target=generate)
    worker.start()
    import time
    time.sleep(0.5)
    probes = [run_probe(b) for _ in range(3)]
    busy = worker.is_alive()
    worker.join(120)
    assert busy, "the generation ended before the probes: make it longer"
    assert all(p.ok and p.status == 200 and p.latency < 0.5 for p in probes), probes
    # Not cut short: the stream ran to its end.
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]", out
    assert any('"finish_reason": "' in line or '"finish_reason":"' in line for line in out["lines"])


def test_local_deep_probe_on_llama_cpp_python_generates_one_token(llama_server):
    # it has no /apply-template: the readiness check is the generation
    b = backend("local", llama_server, "gemma3-270m", api_key=None)
    before = httpx.get(f"{contract.url_root(llama_server)}/metrics").text
    r = run_probe(b, timeout=60, deep=True)
    after = httpx.get(f"{contract.url_root(llama_server)}/metrics").text
    assert (r.ok, r.detail) == (True, "deep")
    assert counter(after, "llamacpp:tokens_predicted_total") > counter(
        before, "llamacpp:tokens_predicted_total")


def counter(metrics: str, name: str) -> float:
    line, = [x for x in metrics.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


@pytest.fixture(scope="module")
def native_server(tmp_path_factory):
    """Native llama-server as its unit runs it (two wizards: two slots)."""
    from testbed.localserver import LocalServer, server_spec
    from testbed.wait import NotReady
    spec = server_spec("llama-server", ("gandalf", "merlin"), n_ctx=2048)
    server = LocalServer(spec, tmp_path_factory.mktemp("native") / "llama-server.log")
    try:
        server.start(timeout=180)
    except NotReady as e:
        pytest.fail(str(e))
    yield server
    server.stop()


def test_local_deep_probe_on_llama_server_takes_no_slot(native_server):
    """Readiness from its slots, its model and its template, without a generation: a
    generation would take the least recently used slot, the wizard switched first, whose next
    turn would be cold (the fleet measured 551 tokens evaluated, 1 cached)."""
    root = native_server.root

    def turn(wizard: str) -> dict:
        r = httpx.post(f"{native_server.base_url}/chat/completions", timeout=300, json={
            "messages": [{"role": "system", "content": f"You are {wizard}. " + " ".join(
                f"Rule {i} of {wizard}: answer briefly." for i in range(30))},
                {"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["timings"]

    for w in ("Merlin", "Gandalf"):      # each wizard's prefix in its own slot
        turn(w)
    before = httpx.get(f"{root}/metrics").text
    r = run_probe(backend("local", native_server.base_url, "gemma3-270m", api_key=None),
                  timeout=60, deep=True)
    assert (r.ok, r.reason, r.deep) == (True, "ok", True), r.detail
    after = httpx.get(f"{root}/metrics").text
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total"):
        assert counter(after, name) == counter(before, name), name
    for w in ("Merlin", "Gandalf"):      # both prefixes still cached
        t = turn(w)
        assert t["cache_n"] > 200 and t["prompt_n"] < 10, (w, t)
    # a server that serves another model is not ready for this backend
    wrong = run_probe(backend("local", native_server.base_url, "qwen", api_key=None),
                      timeout=60, deep=True)
    assert (wrong.ok, wrong.reason) == (False, "bad_response")
    assert "serves gemma3-270m, not qwen" in wrong.detail


def test_local_wrong_path_is_bad_response(llama_server):
    # A base_url missing /v1: the server listens (liveness passes), but the readiness probe's
    # generation gets a 404, so nothing switches onto it.
    b = backend("local", contract.url_root(llama_server), "gemma3-270m", api_key=None)
    r = run_probe(b, timeout=60, deep=True)
    assert (r.ok, r.reason, r.status) == (False, "bad_response", 404)


def test_local_server_gone_is_refused(llama_server):
    b = backend("local", f"http://127.0.0.1:{free_port()}/v1", "gemma3-270m", api_key=None)
    r = run_probe(b)
    assert (r.ok, r.reason) == (False, "refused")


@pytest.mark.parametrize("engine_name", ["llama-cpp-python", "llama-server"])
def test_local_deep_probe_carries_the_key_of_a_server_other_hosts_reach(engine_name, tmp_path):
    """A model server another host's wizard falls back onto wants its key on every route but
    /health (docs/crosshost.md): the readiness probe before a switch sends it, and without it the
    server is not ready for that backend."""
    from testbed.localserver import LocalServer, server_spec
    from testbed.wait import NotReady
    key = "nd-model-key-for-the-probe-test-0123456789"
    server = LocalServer(server_spec(engine_name, ("merlin",), n_ctx=2048),
                         tmp_path / "server.log")
    try:
        server.start(timeout=180, key=key)
    except NotReady as e:
        pytest.fail(str(e))
    try:
        keyed = backend("local", server.base_url, "gemma3-270m", api_key=key)
        assert run_probe(keyed).ok                            # /health: open
        r = run_probe(keyed, timeout=60, deep=True)
        assert (r.ok, r.reason) == (True, "ok"), r.detail
        assert key not in r.detail
        bare = run_probe(backend("local", server.base_url, "gemma3-270m", api_key=None),
                         timeout=60, deep=True)
        assert (bare.ok, bare.status) == (False, 401), bare
    finally:
        server.stop()
