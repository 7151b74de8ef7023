"""A wizard's Hermes API server as an application talks to it, and who answered each turn."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import httpx


@dataclass
class Turn:
    """One chat turn through a wizard's Hermes API server, and who answered it."""
    ok: bool
    latency: float
    status: int | None = None
    content: str = ""
    session: str | None = None
    model: str | None = None   # from Hermes' session record: the model that really answered
    error: str = ""
    sent_at: float = 0.0


class WizardClient:
    """Talks to one wizard's API server (through an SSH tunnel: it listens on the host's
    loopback only), the way an application would."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"})

    def turn(self, text: str, session: str | None = None, timeout: float = 300) -> Turn:
        # Without the header Hermes derives the session id from the system prompt and the first
        # user message: the same text would continue an old session, whose record keeps the model
        # it began with (docs/hermes.md, finding 8). A new conversation gets a new id.
        headers = {"X-Hermes-Session-Id": session or f"nd-{uuid.uuid4().hex[:16]}"}
        sent = time.monotonic()
        try:
            r = self.http.post(f"{self.url}/v1/chat/completions", headers=headers, timeout=timeout,
                               json={"messages": [{"role": "user", "content": text}]})
        except httpx.HTTPError as exc:
            return Turn(False, time.monotonic() - sent, error=f"{type(exc).__name__}: {exc}",
                        sent_at=sent)
        latency = time.monotonic() - sent
        turn = Turn(False, latency, r.status_code, session=r.headers.get("X-Hermes-Session-Id"),
                    sent_at=sent)
        try:
            choice = r.json()["choices"][0]
            turn.content = (choice.get("message") or {}).get("content") or ""
            failed = choice.get("finish_reason") == "error" or not turn.content.strip()
        except (ValueError, KeyError, IndexError, TypeError):
            turn.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return turn
        if r.status_code != 200 or failed:
            turn.error = f"HTTP {r.status_code}, agent error: {turn.content[:200]}"
            return turn
        turn.ok = True
        if turn.session:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                turn.model = self.http.get(f"{self.url}/api/sessions/{turn.session}",
                                           timeout=10).json()["session"]["model"]
        return turn

    def close(self) -> None:
        self.http.close()
