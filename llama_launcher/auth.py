"""The key a model server other hosts of the fleet reach requires (docs/crosshost.md).

llama-server checks LLAMA_API_KEY itself; llama-cpp-python's server would take a key only on
its command line (visible in /proc to every user of the host), so the launcher reads the same
variable from the unit's EnvironmentFile and checks it here, as llama-server does: `/health`
stays open (the sidecar's liveness probe, which says nothing about the model), every other
request needs `Authorization: Bearer KEY` (or `X-Api-Key: KEY`) and is refused 401 without it.
No key in the environment: nothing is checked (a server on loopback only).
"""

from __future__ import annotations

import hmac
import json
import os

KEY_ENV = "LLAMA_API_KEY"      # neverdark.contract.LLAMA_KEY_ENV (the launcher ships alone)
PUBLIC = frozenset(("/health", "/v1/health"))
_REFUSED = json.dumps({"error": {"message": "Invalid API Key", "type": "authentication_error",
                                 "code": 401}}).encode()


def presented(headers) -> bytes:
    """The key a request carries (raw ASGI headers), 'Bearer ' stripped."""
    found = dict(headers or [])
    value = found.get(b"authorization") or found.get(b"x-api-key") or b""
    return value[len(b"Bearer "):] if value.startswith(b"Bearer ") else value


class KeyMiddleware:
    def __init__(self, app, key: str | None = None) -> None:
        self.app = app
        self.key = (key if key is not None else os.environ.get(KEY_ENV, "")).encode()

    async def __call__(self, scope, receive, send):
        if (not self.key or scope["type"] != "http" or scope.get("path") in PUBLIC
                or hmac.compare_digest(presented(scope.get("headers")), self.key)):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json; charset=utf-8"),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": _REFUSED})
