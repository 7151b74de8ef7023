"""A real LLMock process on a free loopback port, for tests that need a cloud API to break;
and a real Hermes gateway under a small real supervisor, pointed at such LLMocks.

Import explicitly (``from testbed.llmock import llmock, LLMock``); it is not a conftest so
that several engineers' fixtures cannot collide.

The gateway helper is real: `hermes gateway run` from the pinned hermes venv, with its API server
on loopback; a supervisor process restarts it when it exits 75, the way the unit's
RestartForceExitStatus=75 does, and the restart is triggered by SIGUSR1 exactly as the unit's
ExecReload would. Only systemd itself is absent (no PID-1 systemd here).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from testbed import runtimes
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


# --- Hermes gateway ---------------------------------------------------------------------------

HERMES_BIN = runtimes.HERMES_BIN

SUPERVISOR = r"""
import os, signal, subprocess, sys
pidfile, argv = sys.argv[1], sys.argv[2:]
child = None
def forward(sig, _frame):
    if child and child.poll() is None:
        child.send_signal(sig)
signal.signal(signal.SIGTERM, forward)
while True:
    child = subprocess.Popen(argv)
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(child.pid))
    os.replace(tmp, pidfile)
    rc = child.wait()
    if rc != 75:
        sys.exit(rc)
"""


def require_hermes() -> Path:
    if not HERMES_BIN.exists():
        pytest.fail(f"Hermes gateway not found at {HERMES_BIN}: set NEVERDARK_HERMES_BIN or "
                    + runtimes.INSTALL_HINT)
    return HERMES_BIN


def variant(path: Path, *, provider: str, model: str, base_url: str) -> Path:
    doc = {"model": {"provider": provider, "default": model, "base_url": base_url,
                     "api_key": "sk-neverdark-test-" + provider,
                     # Set explicitly: otherwise Hermes looks cloud models up online.
                     "context_length": 128000, "max_tokens": 256}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class SupervisedGateway:
    def __init__(self, root: Path, active: Path) -> None:
        hermes = require_hermes()
        self.home = root / "home"
        self.managed = active.parent
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.key = "nd-test-" + secrets.token_hex(16)
        (self.home / "config.yaml").write_text(yaml.safe_dump({
            "security": {"tirith_enabled": False, "allow_lazy_installs": False},
            "platforms": {"api_server": {"enabled": True, "extra": {
                "host": "127.0.0.1", "port": self.port, "key": self.key}}},
        }))
        # Hermes' anthropic provider reads its key only from the environment / HERMES_HOME/.env,
        # never from model.api_key; .env is re-read every turn.
        (self.home / ".env").write_text("ANTHROPIC_API_KEY=sk-ant-neverdark-test\n")
        self.pidfile = root / "gateway.pid"
        self.log = (root / "supervisor.log").open("wb")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
               "HERMES_HOME": str(self.home), "HERMES_MANAGED_DIR": str(self.managed),
               "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(self.pidfile), str(hermes), "gateway", "run"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_health(90)

    def gateway_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Hermes gateway did not answer /health")

    # GatewayControl: what systemctl restart / is-active do for the real unit.
    async def restart(self) -> None:
        old = self.gateway_pid()
        os.kill(old, signal.SIGUSR1)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            new = self.gateway_pid()
            if new is not None and new != old:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited {self.proc.returncode}")
            await asyncio.sleep(0.1)
        raise RuntimeError("gateway did not come back after SIGUSR1")

    async def is_active(self) -> bool:
        pid = self.gateway_pid()
        if self.proc.poll() is not None or pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
