"""Run llama-cpp-python's OpenAI-compatible server with a sliding-window KV cache.

The server's CLI has no flag for `swa_full`; left at llama.cpp's default a Gemma 3 model keeps a
full-size sliding-window cache, about 1 GB wasted at n_ctx 65536. NEVERDARK_SWA_FULL=true keeps
llama.cpp's behaviour for models that need it.
"""
import functools
import os
import sys

import llama_cpp
from llama_cpp.server.__main__ import main

_swa_full = os.environ.get("NEVERDARK_SWA_FULL", "false").lower() == "true"
_init = llama_cpp.Llama.__init__


@functools.wraps(_init)
def _init_with_swa(self, *args, **kwargs):
    kwargs.setdefault("swa_full", _swa_full)
    _init(self, *args, **kwargs)


llama_cpp.Llama.__init__ = _init_with_swa

if __name__ == "__main__":
    sys.exit(main())
