"""PassiveWatcher against real Hermes errors.log files.

Real: a Hermes 0.19.0 gateway pointed at LLMock (OpenAI and Anthropic routes) and at a closed
loopback port, writing its own errors.log while LLMock fails its calls. The rotation, truncation
and partial-line tests append lines captured verbatim from that gateway to real files.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from sidecar.flip import atomic_install
from sidecar.passive import PassiveWatcher
from testbed.hermes_gateway import Gateway, variant
from testbed.llmock import LLMock, free_port

# Captured from `hermes gateway run` (0.19.0) against LLMock with a 401 and a 429 fault.
LINE_401 = ("2026-11-23 07:48:11,301 WARNING [api-4616533c3b295d8a] agent.conversation_loop: API call "
            "failed (attempt 1/3) error_type=AuthenticationError thread=asyncio_0:140576548148928 "
            "provider=custom base_url=http://127.0.0.1:18801/v1 model=mock-a summary=HTTP 401: Unauthorized.\n")
LINE_429 = ("2026-11-23 07:48:17,381 WARNING [api-b236b654fea953c3] agent.conversation_loop: API call "
            "failed (attempt 1/3) error_type=RateLimitError thread=asyncio_2:140576513431232 "
            "provider=custom base_url=http://127.0.0.1:18801/v1 model=mock-a summary=HTTP 429: Rate limit exceeded.\n")
NOISE = ("2026-11-23 07:48:17,382 WARNING [api-b236b654fea953c3] agent.conversation_loop: Retrying API "
         "call in 3.0s (attempt 1/3) thread=asyncio_2:1 provider=custom base_url=http://127.0.0.1:18801/v1 "
         "model=mock-a policy=default error=Error code: 429\n"
         "2026-11-23 07:48:01,413 WARNING tools.registry: check_fn check_image_generation_requirements "
         "returned False; dependent tools will be unavailable this turn\n")


def file_wizard(tmp_path: Path):
    (tmp_path / "logs").mkdir()
    return SimpleNamespace(name="w", home=tmp_path, backends=(
        SimpleNamespace(name="mock", base_url="http://127.0.0.1:18801/v1/", model="mock-a"),
        SimpleNamespace(name="other", base_url="http://127.0.0.1:9/v1", model="x")))


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_only_new_failures_and_attribution(tmp_path):
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    append(log, LINE_401)  # history before the watcher started
    watcher = PassiveWatcher(w)
    assert watcher.poll() == []
    append(log, NOISE + LINE_429 + LINE_401)
    got = watcher.poll()
    assert [(r.backend, r.reason, r.status, r.ok) for r in got] == [
        ("mock", "passive", 429, False), ("mock", "passive", 401, False)]
    assert got[0].detail.startswith("RateLimitError: HTTP 429")
    assert watcher.poll() == []


def test_partial_line_waits_for_its_end(tmp_path):
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    watcher = PassiveWatcher(w)  # no file yet
    append(log, LINE_429[:70])
    assert watcher.poll() == []
    append(log, LINE_429[70:])
    assert [r.status for r in watcher.poll()] == [429]


def test_rotation_reads_the_rest_of_the_old_file_then_the_new(tmp_path):
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    append(log, NOISE)
    watcher = PassiveWatcher(w)
    append(log, LINE_401)
    os.rename(log, log.with_name("errors.log.1"))  # what RotatingFileHandler does
    append(log, LINE_429)
    assert [r.status for r in watcher.poll()] == [401, 429]
    append(log, LINE_401)
    assert [r.status for r in watcher.poll()] == [401]


def test_truncation_starts_over(tmp_path):
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    append(log, NOISE * 5)
    watcher = PassiveWatcher(w)
    with open(log, "w"):
        pass
    append(log, LINE_429)
    assert [r.status for r in watcher.poll()] == [429]


def test_unknown_backend_is_unattributed(tmp_path):
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    watcher = PassiveWatcher(w)
    append(log, LINE_401.replace("127.0.0.1:18801", "10.9.9.9:1").replace("mock-a", "nobody"))
    [r] = watcher.poll()
    assert r.backend == "" and r.status == 401


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("passive")
    mocks = [LLMock(root), LLMock(root)]
    gw = None
    try:
        a, b = mocks
        dead = f"http://127.0.0.1:{free_port()}/v1"
        vdir = root / "backends"
        vdir.mkdir()
        backends = (
            SimpleNamespace(name="gpt", base_url=a.openai_base, model="mock-gpt",
                            variant=variant(vdir / "gpt.yaml", provider="custom", model="mock-gpt",
                                            base_url=a.openai_base)),
            SimpleNamespace(name="claude", base_url=b.anthropic_base, model="claude-mock",
                            variant=variant(vdir / "claude.yaml", provider="anthropic",
                                            model="claude-mock", base_url=b.anthropic_base)),
            SimpleNamespace(name="gone", base_url=dead, model="mock-gone",
                            variant=variant(vdir / "gone.yaml", provider="custom", model="mock-gone",
                                            base_url=dead)),
        )
        active = root / "managed" / "config.yaml"
        active.parent.mkdir()
        atomic_install(backends[0].variant, active)
        gw = Gateway.bare(root / "gw", active, supervised=True)
        yield SimpleNamespace(gw=gw, mocks=mocks, backends=backends, active=active,
                              wizard=SimpleNamespace(name="w", home=gw.home, backends=backends))
    finally:
        if gw:
            gw.stop()
        for m in mocks:
            m.stop()


def chat(gw, text: str) -> dict:
    r = httpx.post(f"http://127.0.0.1:{gw.port}/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {gw.key}"},
                   json={"messages": [{"role": "user", "content": text}]})
    return r.json()


def test_real_gateway_errors_are_seen_and_attributed(live):
    gpt_mock, claude_mock = live.mocks
    watcher = PassiveWatcher(live.wizard)
    assert watcher.poll() == []

    atomic_install(live.backends[1].variant, live.active)  # Hermes re-reads it per request
    claude_mock.fault({"type": "fail", "status": 401, "times": None})
    assert chat(live.gw, "passive one")["choices"][0]["finish_reason"] == "error"
    got = watcher.poll()
    assert got and {(r.backend, r.status) for r in got} == {("claude", 401)}, got

    atomic_install(live.backends[0].variant, live.active)
    gpt_mock.fault({"type": "fail", "status": 503, "times": 1, "match": {"path": "/v1/chat/completions"}})
    assert chat(live.gw, "passive two")["choices"][0]["finish_reason"] == "stop"
    got = watcher.poll()
    assert [(r.backend, r.status) for r in got] == [("gpt", 503)], got

    atomic_install(live.backends[2].variant, live.active)
    assert chat(live.gw, "passive three")["choices"][0]["finish_reason"] == "error"
    got = watcher.poll()
    assert got and all(r.backend == "gone" and r.status is None for r in got), got
    assert "Connection" in got[0].detail
    atomic_install(live.backends[0].variant, live.active)


def test_same_model_on_another_endpoint_is_unattributed(tmp_path):
    """Hermes' auxiliary clients call a provider's default URL; an error there says nothing
    about the backend that serves the same model through another base_url."""
    w = file_wizard(tmp_path)
    log = tmp_path / "logs" / "errors.log"
    watcher = PassiveWatcher(w)
    append(log, LINE_401.replace("http://127.0.0.1:18801/v1", "https://api.anthropic.com"))
    [r] = watcher.poll()
    assert r.backend == ""

