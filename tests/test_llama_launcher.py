"""llama_launcher (the llama-cpp-python units' launcher) as a real process on the real Gemma 3
270M GGUF, started with the unit's own command line and environment (neverdark.engines, through
testbed.localserver): saved states without the 512 MiB score copies, a cache bounded in bytes
that keeps each wizard's prefix while another wizard uses the one context, and lock-free routes
during a generation (asserted from the server's own counters: each completion's `timings`, how
many prompt tokens it evaluated and how many it reused, not wall time).

A small n_ctx keeps each start quick; the memory behaviour at n_ctx 65536 is
bench/llama_engine_bench.py's.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from neverdark import engines
from testbed.localserver import LocalServer, server_spec

SYSTEM = ("You are Merlin, a wizard of the test fleet. " + " ".join(
    f"Rule {i}: answer briefly, name sources, never invent facts about topic {i}."
    for i in range(40)))
OTHER = "You are Morgana, who answers in one word."


def messages(user: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class Launcher(LocalServer):
    def __init__(self, tmp, cache_bytes: int = 64 << 20, n_ctx: int = 4096) -> None:
        spec = server_spec("llama-cpp-python", ("gandalf", "merlin"), n_ctx=n_ctx)
        super().__init__(dataclasses.replace(spec, prompt_cache_bytes=cache_bytes),
                         tmp / "launcher.log")

    @property
    def url(self) -> str:
        return self.root

    def chat(self, msgs: list[dict], max_tokens: int = 6) -> dict:
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=300, json={
            "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "seed": 7})
        r.raise_for_status()
        return r.json()

    def status(self) -> dict:
        return httpx.get(f"{self.url}/neverdark/status", timeout=5).json()


@pytest.fixture
def launcher(tmp_path):
    ln = Launcher(tmp_path).start()
    yield ln
    ln.stop()


def test_it_runs_as_the_unit_runs_it(launcher):
    argv = launcher.argv()
    assert argv[1:3] == ["-m", engines.LAUNCHER] and "--n_ctx" in argv
    st = launcher.status()
    assert st["engine"] == "llama-cpp-python" and st["n_ctx"] == 4096
    assert st["cache"]["capacity_bytes"] == 64 << 20   # NEVERDARK_CACHE_BYTES from the unit env


def test_a_wizards_prefix_outlives_another_wizards_turn_and_not_a_restart(tmp_path):
    """What keeps a wizard's prefix once its check turn computed it: the RAM prompt cache, while
    another wizard's turn takes the one context. A restart starts it empty."""
    ln = Launcher(tmp_path).start()
    try:
        cold = ln.chat(messages("What is a wizard?"))["timings"]
        assert cold["cache_n"] == 0 and cold["prompt_n"] > 400, cold
        ln.chat(messages("Something else entirely, to move the context away.", system=OTHER))
        again = ln.chat(messages("Where do dragons live?"))
        t = again["timings"]
        # A new conversation: only the user's message and the turn's frame are evaluated.
        assert t["cache_n"] > 400 and t["prompt_n"] < 40, t
        assert t["cache_load_ms"] > 0 and ln.status()["cache"]["loads"] >= 1
        first = ln.status()
    finally:
        ln.stop()
    ln.start()
    try:
        st = ln.status()
        assert st["cache"]["entries"] == 0 and (st["pid"], st["started_at"]) != (
            first["pid"], first["started_at"])
        fresh = ln.chat(messages("Where do dragons live?"))
        assert fresh["timings"]["cache_n"] == 0
        # The same answer as from a cold context (greedy sampling): the loaded state is sound.
        assert fresh["choices"][0]["message"]["content"] == \
            again["choices"][0]["message"]["content"]
    finally:
        ln.stop()


def test_saved_states_hold_no_score_copies_and_the_cache_stays_in_its_bytes(tmp_path):
    ln = Launcher(tmp_path, cache_bytes=24 << 20).start()
    try:
        base = ln.rss_mb()
        for i in range(8):   # eight different wizards' prompts: each turn saves a state
            ln.chat(messages(f"Question {i}?", system=f"Wizard {i}. " + SYSTEM[:1500]))
        cache = ln.status()["cache"]
        assert cache["bytes"] <= 24 << 20 and cache["entries"] >= 1, cache
        # llama-cpp-python's own cache would hold a 512 MiB score copy per entry here.
        assert ln.rss_mb() - base < 150, (base, ln.rss_mb())
    finally:
        ln.stop()


def test_routes_without_a_model_answer_during_a_generation(launcher):
    done = threading.Event()
    slowest = []

    def poll():
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                for path in ("/health", "/v1/models", "/v1/props", "/neverdark/status",
                             "/metrics"):
                    t = time.monotonic()
                    r = c.get(launcher.url + path)
                    slowest.append((time.monotonic() - t, path, r.status_code))
                time.sleep(0.1)

    t = threading.Thread(target=poll)
    t.start()
    try:
        launcher.chat(messages("Tell me a long story about dragons."), max_tokens=80)
    finally:
        done.set()
        t.join()
    assert len(slowest) >= 8
    assert all(code == 200 for _, _, code in slowest), slowest
    assert max(s for s, _, _ in slowest) < 1.0, sorted(slowest)[-3:]
    props = httpx.get(launcher.url + "/v1/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096   # Hermes reads this
