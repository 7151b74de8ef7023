"""deploys/llama/serve.py (the llama-cpp-python units' launcher) as a real process on the real
Gemma 3 270M GGUF: saved states without the 512 MiB score copies, a cache bounded in bytes,
lock-free routes during a generation, warm prefixes that give way to real requests, and
prefixes that survive a restart (asserted from the server's own counters: each completion's
`timings`, how many prompt tokens it evaluated and how many it reused, not wall time).

A small n_ctx keeps each start quick; the memory behaviour at n_ctx 65536 is
bench/llama_engine_bench.py's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from testbed import runtimes
from testbed.bed import free_port
from testbed.wait import wait_http

REPO = Path(__file__).resolve().parent.parent
SYSTEM = ("You are Merlin, a wizard of the test fleet. " + " ".join(
    f"Rule {i}: answer briefly, name sources, never invent facts about topic {i}."
    for i in range(40)))


def messages(user: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class Launcher:
    def __init__(self, tmp: Path, cache_bytes: int = 64 << 20, n_ctx: int = 4096) -> None:
        self.tmp, self.cache_bytes, self.n_ctx = tmp, cache_bytes, n_ctx
        self.prefix_dir = tmp / "prefixes"
        self.prefix_dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Launcher:
        self.port = free_port()
        env = dict(os.environ, NEVERDARK_PREFIX_DIR=str(self.prefix_dir),
                   NEVERDARK_CACHE_BYTES=str(self.cache_bytes))
        self.log = open(self.tmp / "launcher.log", "ab")
        self.proc = subprocess.Popen(
            [str(runtimes.LLAMA_PYTHON), str(REPO / "deploys/llama/serve.py"),
             "--model", str(runtimes.gguf()), "--model_alias", "gemma3-270m",
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
             "--n_threads", "2", "--n_threads_batch", "2", "--chat_format", "chatml",
             "--logits_all", "false", "--interrupt_requests", "false", "--verbose", "false"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.url}/health", self.proc, timeout=120, what="launcher",
                  log=self.tmp / "launcher.log", every=0.3, on_fail=self.stop)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def chat(self, msgs: list[dict], max_tokens: int = 6) -> dict:
        r = httpx.post(f"{self.url}/v1/chat/completions", timeout=300, json={
            "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "seed": 7})
        r.raise_for_status()
        return r.json()

    def status(self) -> dict:
        return httpx.get(f"{self.url}/neverdark/status", timeout=5).json()

    def warm(self, key: str, msgs: list[dict], chunk: int = 64) -> dict:
        return httpx.post(f"{self.url}/neverdark/warm", timeout=300,
                          json={"key": key, "messages": msgs, "chunk": chunk}).json()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture
def launcher(tmp_path):
    ln = Launcher(tmp_path).start()
    yield ln
    ln.stop()


def test_a_warm_prefix_is_used_by_the_next_turn_and_survives_a_restart(tmp_path):
    ln = Launcher(tmp_path).start()
    try:
        cold = ln.chat(messages("What is a wizard?"))
        assert cold["timings"]["cache_n"] == 0
        w = ln.warm("merlin", messages("anything"))
        assert w["ok"] and w["tokens"] > 400, w
        ln.chat(messages("Something else entirely, to move the context away.",
                         system="A different wizard's prompt."))
        warm = ln.chat(messages("What is a wizard?"))
        last = warm["timings"]
        # Only the user's message and the turn's frame are evaluated; the prefix is reused.
        assert last["cache_n"] >= w["tokens"] and last["prompt_n"] < 40, last
        # The same answer as from a cold context (greedy sampling): the state is sound.
        assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
        assert (ln.prefix_dir / "merlin.prefix").is_file()
    finally:
        ln.stop()
    ln.start()
    try:
        st = ln.status()
        assert st["restored"] == {"merlin": w["tokens"]}, st
        again = ln.chat(messages("What is a wizard?"))
        last = again["timings"]
        assert last["cache_n"] >= w["tokens"] and last["prompt_n"] < 40, last
        assert again["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
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
                for path in ("/health", "/v1/models", "/v1/props", "/neverdark/status"):
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


def test_a_warm_up_gives_way_to_a_waiting_request(launcher):
    """A warm-up in progress answers `preempted` once a real request waits; the request is
    not held up by more than a chunk, and the next warm-up resumes where this one stopped."""
    result = {}

    def warm():
        result["warm"] = launcher.warm("merlin", messages("x"), chunk=16)

    t = threading.Thread(target=warm)
    t.start()
    time.sleep(1.0)                      # a few chunks in
    launcher.chat(messages("Hello?", system="Another wizard."), max_tokens=2)
    t.join(120)
    w = result["warm"]
    assert w.get("preempted") and not w["ok"], w
    again = launcher.warm("merlin", messages("x"), chunk=512)
    assert again["ok"] and again["tokens"] == w["tokens"]
