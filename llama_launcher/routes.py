"""The routes that need no model, answered without waiting for the generation in flight:
/health, /v1/models, /props and /v1/props (llama.cpp's shape), /metrics, /neverdark/status.
"""

from __future__ import annotations

import os
import time

import llama_cpp.server.app as server_app

from llama_launcher import VERSION
from llama_launcher.auth import KeyMiddleware
from llama_launcher.cache import CACHE, SWA_FULL
from llama_launcher.timings import STATS, TimingsMiddleware

STARTED = time.time()


def add_routes(app) -> None:
    from fastapi.responses import PlainTextResponse

    proxy = server_app._llama_proxy
    llama = proxy(None)
    settings = proxy._default_model_settings
    alias = settings.model_alias or settings.model
    n_ctx = llama.n_ctx()

    def health():
        return {"status": "ok"}

    def models():
        return {"object": "list", "data": [{"id": alias, "object": "model",
                                            "owned_by": "llamacpp", "permissions": []}]}

    def props():
        # llama.cpp's own shape: Hermes recognises a llama.cpp server by it, reads n_ctx from
        # it and stops probing other servers' routes before every turn.
        return {"default_generation_settings": {"n_ctx": n_ctx}, "model_alias": alias,
                "total_slots": 1, "engine": "llama-cpp-python", "build_info": VERSION}

    def status():
        # pid and started_at tell a restart apart (the prompt cache starts empty).
        return {"engine": "llama-cpp-python", "model": alias, "n_ctx": n_ctx,
                "swa_full": SWA_FULL, "pid": os.getpid(), "started_at": STARTED,
                "cache": CACHE.stats(), **STATS.gauges()}

    def metrics():
        return PlainTextResponse(STATS.metrics(), media_type="text/plain; version=0.0.4")

    mine = [("/health", health), ("/v1/models", models), ("/props", props),
            ("/v1/props", props), ("/metrics", metrics), ("/neverdark/status", status)]
    before = len(app.router.routes)
    for path, fn in mine:
        app.add_api_route(path, fn, methods=["GET"], include_in_schema=False)
    # First match wins: ours go in front of the library's lock-taking /v1/models.
    app.router.routes[:] = app.router.routes[before:] + app.router.routes[:before]
    app.add_middleware(TimingsMiddleware)
    # Added last, so it runs first: a request without the key reaches nothing.
    app.add_middleware(KeyMiddleware)
