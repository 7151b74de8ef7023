"""Where a local turn's time goes (sidecar.engine), against both engines' real output: the
deployed llama-cpp-python launcher run here with the real Gemma 3 270M, and native llama-server's
/metrics and log lines as its build printed them (tests/data/engine/, captured on this runner with
the llama-server built from llama-cpp-python 0.3.36's vendored llama.cpp)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from neverdark import contract
from sidecar import engine
from sidecar.gateway import CheckTurn, check_turn, judge
from sidecar.metrics import Metrics
from sidecar.probes import ProbeResult
from testbed.metrics_text import value

DATA = Path(__file__).parent / "data" / "engine"


# --- native llama-server ----------------------------------------------------------------------

def test_native_metrics_parse():
    t = engine.parse_metrics((DATA / "native-metrics.txt").read_text())
    assert (t.prompt_tokens, t.cached_tokens, t.generated_tokens) == (458, 448, 512)
    assert (t.prefill_s, t.generation_s) == (9.47568, 135.363)
    assert t.queue_s is None and t.requests is None   # native counts neither


def test_native_log_timing_blocks():
    done = engine.parse_log((DATA / "native-llama-server.log").read_text())
    assert [(c.prompt_n, c.predicted_n) for c in done] == [(453, 256), (5, 256)]
    assert done[0].prompt_ms == 8920.94 and done[1].predicted_ms == 80159.86


def test_native_response_timings():
    c = engine.from_timings({"cache_n": 448, "prompt_n": 5, "prompt_ms": 560.1,
                             "prompt_per_second": 8.9, "predicted_n": 256, "predicted_ms": 80159.8})
    assert (c.cache_n, c.prompt_n, c.queue_ms, c.cache_save_ms) == (448, 5, None, None)


def test_not_an_engine_metrics_page():
    with pytest.raises(ValueError, match="--metrics"):
        engine.parse_metrics("# TYPE up gauge\nup 1\n")


# --- breakdown and its line -------------------------------------------------------------------

def test_breakdown_leaves_the_gateway_the_rest():
    before = engine.EngineTotals(100, 50, 1.0, 10, 0.5, 2, 0.0, 0.0, 0)
    after = engine.EngineTotals(110, 500, 1.5, 30, 1.5, 3, 0.25, 0.1, 0)
    b = engine.breakdown(3.0, after - before, None)
    assert (b.prompt_tokens, b.cached_tokens, b.generated_tokens, b.requests) == (460, 450, 20, 1)
    assert b.overhead_s == pytest.approx(3.0 - 0.25 - 0.5 - 1.0 - 0.1)
    line = engine.format_breakdown(b)
    assert "prompt 460 tok (450 cached) prefill 0.50 s" in line and "gateway 1.15 s" in line
    assert engine.breakdown(2.0, after - before, 1).shared is False
    assert engine.format_breakdown(engine.breakdown(1.0, None, None)).endswith("no timings)")


# --- the check turn's judge -------------------------------------------------------------------

CHECK = CheckTurn([], "Repeat: river", "river")


@pytest.mark.parametrize("answer,refused,recognised", [
    ("", "empty", False),
    ("   \n", "empty", False),
    ("Repeat: river", "echoes", False),
    ("repeat river!", "echoes", False),
    ("river", None, True),
    ("River.", None, True),
    ("The word is river", None, True),
    ("Mock response from gpt-test.", None, False),
])
def test_judge(answer, refused, recognised):
    why, seen = judge(answer, CHECK)
    assert (why is None) == (refused is None) and seen == recognised
    if refused:
        assert refused in why


def test_check_turns_are_fresh_and_end_with_the_question():
    a, b = check_turn(), check_turn()
    assert a.messages[-1] == {"role": "user", "content": a.question}
    assert a.question == f"Repeat: {a.expected}"
    assert a.messages[0] != b.messages[0] or a.messages == b.messages is False


# --- the sidecar's metrics --------------------------------------------------------------------

def test_metrics_export_engine_counters_and_check_turns():
    m = Metrics()
    totals = engine.parse_metrics((DATA / "native-metrics.txt").read_text())
    m.probe("merlin", ProbeResult("local", True, "ok", None, None, 0.001, "listening", totals))
    m.local_turn("merlin", "local", engine.breakdown(2.5, totals, None).as_dict())
    text = m.render({"merlin": (["claude", "local"], "local", False)})
    assert value(text, "neverdark_engine_prompt_tokens_total", wizard="merlin", backend="local") == 458
    assert value(text, "neverdark_engine_cached_tokens_total", wizard="merlin", backend="local") == 448
    assert "neverdark_engine_queue_seconds_total" not in text   # native has none to give
    assert value(text, "neverdark_local_check_turns_total", wizard="merlin", backend="local") == 1
    assert value(text, "neverdark_local_check_turn_seconds_total", wizard="merlin",
                 backend="local", part="prefill") == pytest.approx(9.476)
    assert value(text, "neverdark_local_check_turn_tokens_total", wizard="merlin",
                 backend="local", kind="cached") == 448


# --- the deployed launcher with the real model ------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from testbed.llama_server import LlamaServer, LlamaServerError
    try:
        server = LlamaServer(tmp_path_factory.mktemp("llama"), n_ctx=4096)
    except LlamaServerError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


def stream(llama, messages, max_tokens=8):
    with httpx.stream("POST", f"{llama.base_url}/chat/completions", timeout=600, json={
            "messages": messages, "max_tokens": max_tokens, "stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: {")]


async def scrape(llama):
    async with httpx.AsyncClient() as c:
        return await engine.scrape(c, llama.base_url)


def test_launcher_reports_each_completion_like_native(llama):
    import asyncio
    system = {"role": "system", "content": "You are a terse assistant. " * 40}
    before = asyncio.run(scrape(llama))
    first = stream(llama, [system, {"role": "user", "content": "Hello"}])
    again = stream(llama, [system, {"role": "user", "content": "Hello there"}])
    after = asyncio.run(scrape(llama))
    t1 = engine.from_timings([c for c in first if "timings" in c][-1]["timings"])
    t2 = engine.from_timings([c for c in again if "timings" in c][-1]["timings"])
    assert t1.prompt_n > 200 and t1.cache_n == 0 and t1.prompt_ms > 0
    # The second shares the system prompt: the context's prefix is reused, not evaluated again.
    assert t2.cache_n > 200 and t2.prompt_n < 30
    assert t2.queue_ms is not None and t2.cache_save_ms == 0
    delta = after - before
    assert delta.requests == 2
    assert delta.prompt_tokens == t1.prompt_n + t2.prompt_n
    assert delta.cached_tokens == t1.cache_n + t2.cache_n
    assert delta.generated_tokens == t1.predicted_n + t2.predicted_n
    logged = engine.parse_log(llama.log_text())[-2:]
    assert [(c.prompt_n, c.cache_n) for c in logged] == [(t1.prompt_n, 0), (t2.prompt_n, t2.cache_n)]


def test_launcher_metrics_answer_during_a_long_prefill(llama):
    """The scrape never waits for the generation lock (every llama-cpp-python route does)."""
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("chunks", stream(
        llama, [{"role": "user", "content": "tell me a story " * 375}], max_tokens=4)))
    worker.start()
    time.sleep(1.0)
    started = time.monotonic()
    text = httpx.get(f"{contract.url_root(llama.base_url)}/metrics", timeout=5).text
    took = time.monotonic() - started
    busy = worker.is_alive()
    worker.join(600)
    assert busy, "the completion ended before the scrape: make it longer"
    assert took < 1.0 and "llamacpp:requests_processing 1" in text, (took, text)


def test_local_probe_carries_the_engine_counters(llama):
    import asyncio
    from sidecar.probes import probe
    b = SimpleNamespace(name="local", kind="local", base_url=llama.base_url, model="gemma3-270m",
                        api_key=None)

    async def run():
        async with httpx.AsyncClient() as c:
            return await probe(b, c, 5)
    r = asyncio.run(run())
    assert r.ok and r.engine is not None and r.engine.requests is not None
