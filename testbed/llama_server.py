"""The real llama-cpp-python server on the runner as the llama units run it (python -m
llama_launcher, the command line and environment from neverdark.engines, through
testbed.localserver) with the real Gemma 3 270M GGUF, on a free loopback port, its output kept
in a log file.

For tests and benchmarks that need the real engine without the test fleet.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from testbed import runtimes
from testbed.localserver import LocalServer, server_spec
from testbed.wait import NotReady

MODEL_ALIAS = "gemma3-270m"


class LlamaServerError(NotReady):
    """The engine is missing, died or did not come up; the message carries its log tail."""


class LlamaServer(LocalServer):
    """Started on construction; one wizard's server at `n_ctx` (its prompt cache sized by the
    memory fit for one wizard's prompt of `prompt_tokens`)."""

    def __init__(self, log_dir: Path, *, n_ctx: int = 65536, port: int | None = None,
                 prompt_tokens: int = 2048, start_timeout: float = 120) -> None:
        probe = subprocess.run([str(runtimes.LLAMA_PYTHON), "-c", "import llama_cpp.server"],
                               capture_output=True)
        if probe.returncode != 0:
            raise LlamaServerError(f"llama-cpp-python[server] is not importable from "
                                   f"{runtimes.LLAMA_PYTHON}: {runtimes.INSTALL_HINT}")
        spec = server_spec("llama-cpp-python", ("merlin",), n_ctx=n_ctx, port=port or 0,
                           prompt_tokens=prompt_tokens)
        super().__init__(spec, Path(log_dir) / f"llama-{spec.port}.log")
        self.port, self.alias = spec.port, spec.model
        self.start(timeout=start_timeout, error=LlamaServerError)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")
