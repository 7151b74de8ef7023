"""`python -m llama_launcher [llama-cpp-python's server options]`: patch, then run its server."""

from __future__ import annotations

import sys

import llama_cpp

from llama_launcher import VERSION

if llama_cpp.__version__ != VERSION:
    sys.exit(f"neverdark's llama_launcher is written for llama-cpp-python {VERSION}, "
             f"found {llama_cpp.__version__}")

# The internals these patch are that release's: imported only once it is the one installed.
import llama_cpp.server.__main__ as server_main  # noqa: E402
from llama_cpp.server import model as server_model  # noqa: E402

from llama_launcher import cache, routes, timings  # noqa: E402


def main() -> int:
    cache.install()
    timings.install()        # after cache: it times the patched methods
    create_app = server_main.create_app

    def create_app_patched(*args, **kwargs):
        app = create_app(*args, **kwargs)
        routes.add_routes(app)
        return app

    server_main.create_app = create_app_patched
    # Its server builds LlamaRAMCache(capacity_bytes=cache_size) when --cache is on; ours
    # instead, always (it keeps each wizard's prefix), sized by NEVERDARK_CACHE_BYTES.
    server_model.llama_cpp.LlamaRAMCache = lambda capacity_bytes=0: cache.CACHE
    load = server_model.LlamaProxy.load_llama_from_model_settings

    def load_with_cache(settings):
        llama = load(settings)
        llama.set_cache(cache.CACHE)
        return llama

    server_model.LlamaProxy.load_llama_from_model_settings = staticmethod(load_with_cache)
    return server_main.main() or 0


if __name__ == "__main__":
    sys.exit(main())
