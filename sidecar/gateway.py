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
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

import httpx


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


def _error_text(r: httpx.Response, wizard) -> str:
    try:
        text = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = r.text
    # Hermes redacts provider errors itself; the gateway key is the one secret we add to the mix.
    return text.replace(wizard.api_key, "***")[:200] if wizard.api_key else text[:200]


VERIFY_PROMPT = "neverdark backend check {nonce}: reply with the word ok."


async def verify(wizard, target, client: httpx.AsyncClient, timeout: float) -> Verdict:
    """One real turn through the gateway; ok only if it succeeded and the target's model answered.

    Through a local target this is also the warm-up: it fills the llama server's prompt cache with
    Hermes' system prompt and tool schemas, so its latency is the cold first turn.
    """
    base = f"http://127.0.0.1:{wizard.api_port}"
    auth = {"Authorization": f"Bearer {wizard.api_key}"}
    body = {"messages": [{"role": "user",
                          "content": VERIFY_PROMPT.format(nonce=secrets.token_hex(6))}]}
    started = time.monotonic()
    try:
        r = await client.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=timeout)
    except httpx.HTTPError as exc:
        return Verdict(False, f"verify request failed: {type(exc).__name__}", time.monotonic() - started, None)
    latency = time.monotonic() - started
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
    if not content.strip():
        return Verdict(False, "verify answer is empty", latency, None)
    session_id = r.headers.get("X-Hermes-Session-Id")
    if not session_id:
        return Verdict(False, "no X-Hermes-Session-Id: cannot tell which backend answered", latency, None)
    try:
        s = await client.get(f"{base}/api/sessions/{session_id}", headers=auth, timeout=10.0)
        model = s.json()["session"]["model"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"session lookup failed: {type(exc).__name__}", latency, None)
    if model != target.model:
        return Verdict(False, f"answered by model {model!r}, not {target.name}'s {target.model!r}",
                       latency, model)
    return Verdict(True, f"{target.name} answered", latency, model)
