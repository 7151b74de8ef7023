"""Restart a wizard's Hermes gateway, wait until it serves, and prove which backend answers.

Restart, not reload. The unit's ExecReload sends SIGUSR1, which drains and exits 75 so that
systemd restarts it (RestartForceExitStatus=75): `systemctl reload` returns as soon as the signal
is sent, while the old process is still active and answering /health, so "active + healthy" right
after it cannot tell the old gateway from the new one, and the real restart then happens later
under Restart=, outside our control. `systemctl restart` is synchronous: it returns once the old
process has stopped (Hermes drains in-flight turns on SIGTERM too, up to agent.restart_drain_timeout;
KillMode=mixed signals only the main process first) and the new one has been started. It is also
the only verb besides is-active that the sidecar's sudoers rule allows.

Which backend answered: Hermes' completion `model` field echoes the request (or "hermes-agent"),
and no header names the provider. The API server's session record does: GET
/api/sessions/<X-Hermes-Session-Id> returns `session.model`, the model the agent last used (after a
per-turn fallback it names the fallback's model). Each verify sends a fresh nonce so Hermes
derives a fresh session id (it hashes the system prompt and first user message), never one whose
model was recorded under the previous backend.

What it asks: "Repeat: <word>", after two worked examples sent as earlier turns of the same
request (a random number, then another word). Measured through the real gateway against the real
Gemma 3 270M, a base model that answers Hermes' chatml prompt with an echo of the user's message
or an immediate end-of-turn about half the time whatever it is asked (docs/hermes.md, "The check
turn"): with the examples it repeated the word 19-20 times in 20. The verdict refuses an empty
answer and an echo of the question ("Repeat: river"), and on a local target requires the word:
a cloud model's answer is reported but not required to contain it (its failures are HTTP errors,
and the test clouds answer canned text).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from sidecar import engine


class GatewayControl(Protocol):
    """How a gateway is restarted: systemd in production, a test supervisor in tests."""

    async def restart(self) -> None: ...
    async def is_active(self) -> bool: ...


async def _run(argv: list[str], timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"{' '.join(argv)} timed out after {timeout:.0f}s"
    return proc.returncode, out.decode(errors="replace").strip()[-500:]


class SystemdControl:
    def __init__(self, systemctl: list[str], unit: str, timeout: float = 180.0) -> None:
        self.systemctl = list(systemctl)
        self.unit = unit
        # systemd's own TimeoutStopSec bounds the drain; this only stops us hanging forever.
        self.timeout = timeout

    async def restart(self) -> None:
        rc, out = await _run([*self.systemctl, "restart", self.unit], self.timeout)
        if rc != 0:
            raise RuntimeError(f"systemctl restart {self.unit} failed ({rc}): {out}")

    async def is_active(self) -> bool:
        # No --quiet: the sudoers rule names exact argument lists, and is-active's status says it.
        rc, _ = await _run([*self.systemctl, "is-active", self.unit], 15.0)
        return rc == 0


async def wait_ready(control: GatewayControl, api_port: int, client: httpx.AsyncClient,
                     timeout: float) -> None:
    """Until the unit is active and the API server's /health answers 200; TimeoutError if not."""
    url = f"http://127.0.0.1:{api_port}/health"
    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        if await control.is_active():
            try:
                r = await client.get(url, timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"/health answered {r.status_code}"
            except httpx.HTTPError as exc:
                last = f"/health: {type(exc).__name__}"
        else:
            last = "unit not active"
        await asyncio.sleep(0.25)
    raise TimeoutError(f"gateway not ready after {timeout:.0f}s ({last})")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str
    latency: float
    answered_model: str | None
    answer: str = ""
    recognised: bool | None = None
    # Local targets: where the turn's time went (sidecar.engine.TurnBreakdown.as_dict()).
    breakdown: dict | None = field(default=None, compare=False)
    quality: bool = False   # failed on the answer itself (empty, echo, no check word): retryable


def _error_text(r: httpx.Response, wizard) -> str:
    try:
        text = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = r.text
    # Hermes redacts provider errors itself; the gateway key is the one secret we add to the mix.
    return text.replace(wizard.api_key, "***")[:200] if wizard.api_key else text[:200]


CHECK_WORDS = ("apple", "river", "lantern", "pebble", "meadow", "copper", "violet", "harbor",
               "falcon", "maple", "candle", "orange", "garden", "silver", "winter", "basket",
               "forest", "pepper", "rocket", "island", "thunder", "marble", "velvet", "anchor")


@dataclass(frozen=True)
class CheckTurn:
    messages: list
    question: str
    expected: str


def check_turn(rng: random.Random | None = None) -> CheckTurn:
    """The check's messages: two worked examples as earlier turns, then the question. The first
    example is a random number, so the first user message (which Hermes hashes into the session
    id) is fresh for every check."""
    rng = rng or random.SystemRandom()
    nonce = str(rng.randrange(100000, 1000000))
    example, word = rng.sample(CHECK_WORDS, 2)
    question = f"Repeat: {word}"
    return CheckTurn([{"role": "user", "content": f"Repeat: {nonce}"},
                      {"role": "assistant", "content": nonce},
                      {"role": "user", "content": f"Repeat: {example}"},
                      {"role": "assistant", "content": example},
                      {"role": "user", "content": question}], question, word)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def judge(answer: str, check: CheckTurn) -> tuple[str | None, bool]:
    """(why the answer is refused or None, whether it contains the expected word)."""
    words = _words(answer)
    if not words:
        return "the answer is empty", False
    question = _words(check.question)
    n = len(question)
    if any(words[i:i + n] == question for i in range(len(words) - n + 1)):
        return f"the answer echoes the check's question: {answer.strip()[:80]!r}", False
    return None, check.expected in words


async def _session_calls(client: httpx.AsyncClient, base: str, auth: dict, session_id: str) -> tuple[str | None, int | None]:
    s = await client.get(f"{base}/api/sessions/{session_id}", headers=auth, timeout=10.0)
    session = s.json()["session"]
    calls = session.get("api_call_count")
    return session["model"], (int(calls) if isinstance(calls, (int, float)) else None)


# A small model misses a check now and then (Gemma 3 270M, a base model: about 1 in 20); each
# retry is a new conversation whose system prompt is already in the server's cache, so it costs
# a few generated tokens, not another prefill. Only the answer's quality is retried: a failed
# request or another model answering is a real failure at once.
CHECK_ATTEMPTS = 3


async def verify(wizard, target, client: httpx.AsyncClient, timeout: float,
                 check: CheckTurn | None = None, attempts: int = CHECK_ATTEMPTS) -> Verdict:
    """The check turn, up to `attempts` times while only the answer's quality fails; the first
    passing verdict, or the last failing one (its detail says how many were tried)."""
    started = time.monotonic()
    verdict = None
    for i in range(1, max(1, attempts) + 1):
        verdict = await verify_once(wizard, target, client, timeout, check if i == 1 else None)
        if verdict.ok or not verdict.quality:
            break
    if i > 1:
        verdict = dataclasses.replace(
            verdict, latency=time.monotonic() - started,
            detail=f"{verdict.detail} (check {i} of {max(1, attempts)})")
    return verdict


async def verify_once(wizard, target, client: httpx.AsyncClient, timeout: float,
                      check: CheckTurn | None = None) -> Verdict:
    """One real turn through the gateway; ok only if it succeeded, the target's model answered,
    the answer is neither empty nor an echo of the question, and (local targets) it repeats the
    check word.

    Through a local target this is also the warm-up: it fills the llama server's prompt cache with
    Hermes' system prompt, so its latency is the cold first turn; the breakdown says where it went.
    """
    check = check or check_turn()
    base = f"http://127.0.0.1:{wizard.api_port}"
    auth = {"Authorization": f"Bearer {wizard.api_key}"}
    local = getattr(target, "kind", None) == "local"
    before = await engine.scrape(client, target.base_url, key=getattr(target, "api_key", None)) if local else None
    started = time.monotonic()
    try:
        r = await client.post(f"{base}/v1/chat/completions", json={"messages": check.messages},
                              headers=auth, timeout=timeout)
    except httpx.HTTPError as exc:
        return Verdict(False, f"verify request failed: {type(exc).__name__}", time.monotonic() - started, None)
    latency = time.monotonic() - started
    after = await engine.scrape(client, target.base_url, key=getattr(target, "api_key", None)) if local else None
    if r.status_code != 200:
        return Verdict(False, f"verify answered HTTP {r.status_code}: {_error_text(r, wizard)}",
                       latency, None)
    try:
        data = r.json()
        choice = data["choices"][0]
        finish = choice.get("finish_reason")
        content = (choice.get("message") or {}).get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return Verdict(False, "verify answer is not a chat completion", latency, None)
    if finish == "error":
        err = (data.get("hermes") or {}).get("error") or content
        return Verdict(False, f"agent error: {str(err)[:200]}", latency, None)
    session_id = r.headers.get("X-Hermes-Session-Id")
    if not session_id:
        return Verdict(False, "no X-Hermes-Session-Id: cannot tell which backend answered", latency, None)
    try:
        model, calls = await _session_calls(client, base, auth, session_id)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"session lookup failed: {type(exc).__name__}", latency, None)
    parts = None
    if local:
        delta = after - before if before is not None and after is not None else None
        parts = engine.breakdown(latency, delta, calls).as_dict()
    refused, recognised = judge(content, check)
    # Hermes stands in "(empty)" after its own retries of empty answers ran out.
    if refused is None and content.strip() == "(empty)":
        refused = "the model answered nothing (Hermes' \"(empty)\" after its retries)"
    if model != target.model:
        return Verdict(False, f"answered by model {model!r}, not {target.name}'s {target.model!r}",
                       latency, model, content, recognised, parts)
    if refused:
        return Verdict(False, refused, latency, model, content, recognised, parts, quality=True)
    if local and not recognised:
        return Verdict(False, f"the answer does not repeat the check word {check.expected!r}: "
                              f"{content.strip()[:80]!r}", latency, model, content, False, parts,
                       quality=True)
    return Verdict(True, f"{target.name} answered" + ("" if recognised else
                                                     " (without the check word)"),
                   latency, model, content, recognised, parts)
