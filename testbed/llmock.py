"""A real LLMock process on a free loopback port, for tests that need a cloud API to break.

Import explicitly (``from testbed.llmock import llmock, LLMock``); it is not a conftest so
that several engineers' fixtures cannot collide. The Hermes gateway pointed at such LLMocks is
testbed/hermes_gateway.py's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from testbed.wait import wait_http

LLMOCK_BIN = Path(sys.executable).parent / "llmock"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LLMock:
    """One `llmock serve` child process and its admin API: a real OpenAI, Anthropic and Gemini
    server that fails on demand. The one wrapper the tests, the test bed, the demo and the
    benchmarks use.

    `host` defaults to loopback (the test bed binds each host's runner-side address); `name`
    set: every completion answers plain text naming it ("Plain answer from NAME."), so Hermes
    runs no tools and a log shows who answered; `answer`: that text instead (a stand-in for a
    local model must pass the sidecar's check turn: sidecar.gateway.CHECK_WORDS); neither:
    LLMock's static style without tools."""

    def __init__(self, log_dir: Path, extra_args: tuple[str, ...] = (), host: str = "127.0.0.1",
                 name: str | None = None, answer: str | None = None) -> None:
        self.host, self.name = host, name
        self.answer = answer or (f"Plain answer from {name}." if name else None)
        self.port = free_port()
        self.root = f"http://{host}:{self.port}"
        label = (name or "mock").replace("/", "-")
        self.log_path = Path(log_dir) / f"llmock-{label}-{self.port}.log"
        self._log = self.log_path.open("wb")
        # Each instance gets its own process group so a stop never touches a sibling.
        self.proc = subprocess.Popen(
            [str(LLMOCK_BIN), "serve", "--host", host, "--port", str(self.port),
             "--log-level", "warning", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "LLMOCK_RESPONSE_STYLE": "static", "LLMOCK_TOOL_MODE": "off"},
        )
        wait_http(f"{self.root}/health", self.proc, timeout=30, what="llmock", log=self.log_path,
                  every=0.1, on_fail=self.stop)
        self.plain_answers()

    @property
    def url(self) -> str:
        return self.root

    # Provider base URLs as a BackendConfig would carry them.
    @property
    def openai_base(self) -> str:
        return f"{self.root}/v1"

    @property
    def anthropic_base(self) -> str:
        return f"{self.root}/anthropic"

    @property
    def google_base(self) -> str:
        return f"{self.root}/gemini/v1beta"

    def scenario(self, behaviors: list[dict]) -> None:
        """Append behaviors to the scenario (LLMock applies them in order)."""
        httpx.post(f"{self.root}/_llmock/scenario", json={"behaviors": list(behaviors)},
                   timeout=5).raise_for_status()

    def plain_answers(self) -> None:
        if self.answer:
            self.scenario([{"type": "reply", "text": self.answer, "times": None}])

    def fault(self, *behaviors: dict) -> None:
        """An outage: exactly these faults (until recover() or reset()), in front of the plain
        answers."""
        httpx.delete(f"{self.root}/_llmock/scenario", timeout=5).raise_for_status()
        self.scenario(list(behaviors))
        self.plain_answers()

    def recover(self) -> None:
        httpx.delete(f"{self.root}/_llmock/scenario", timeout=5).raise_for_status()
        self.plain_answers()

    def reset(self) -> None:
        """Faults and request log cleared."""
        httpx.post(f"{self.root}/_llmock/reset", timeout=5).raise_for_status()
        self.plain_answers()

    def requests(self) -> list[dict]:
        r = httpx.get(f"{self.root}/_llmock/requests", timeout=10)
        r.raise_for_status()
        body = r.json()
        return body.get("requests", body) if isinstance(body, dict) else body

    def chats(self, since: float = 0.0) -> list[dict]:
        """Completion requests (not model lists), started at or after `since` (time.monotonic();
        LLMock stamps its log with the same system-wide clock)."""
        return [r for r in self.requests() if r["method"] == "POST"
                and r["started_at"] >= since]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def llmock_module(tmp_path_factory):
    server = LLMock(tmp_path_factory.mktemp("llmock"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llmock(llmock_module):
    """The module's LLMock, reset before each test so faults never leak between tests."""
    llmock_module.reset()
    yield llmock_module
    llmock_module.reset()
