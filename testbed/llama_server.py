"""The real local model server on the runner: deploys/llama/serve.py (what the llama units run)
with the real Gemma 3 270M GGUF, on a free loopback port, its stderr kept in a log file.

For tests and benchmarks that need the real engine without the test fleet.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from testbed import runtimes
from testbed.llmock import free_port
from testbed.wait import NotReady, wait_http

SERVE_PY = runtimes.REPO / "deploys" / "llama" / "serve.py"
MODEL_ALIAS = "gemma3-270m"


class LlamaServerError(NotReady):
    """The engine is missing, died or did not come up; the message carries its log tail."""


class LlamaServer:
    def __init__(self, log_dir: Path, *, n_ctx: int = 65536, threads: int = 2,
                 chat_format: str = "chatml", alias: str = MODEL_ALIAS,
                 extra: tuple[str, ...] = (), env: dict | None = None,
                 port: int | None = None, start_timeout: float = 120) -> None:
        probe = subprocess.run([str(runtimes.LLAMA_PYTHON), "-c", "import llama_cpp.server"],
                               capture_output=True)
        if probe.returncode != 0:
            raise LlamaServerError(f"llama-cpp-python[server] is not importable from "
                                   f"{runtimes.LLAMA_PYTHON}: {runtimes.INSTALL_HINT}")
        self.port = port or free_port()
        self.alias = alias
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.log_path = log_dir / f"llama-{self.port}.log"
        self._log = self.log_path.open("wb")
        # The unit's flags (templates/llama/neverdark-llama.service.j2), minus the systemd parts.
        argv = [str(runtimes.LLAMA_PYTHON), str(SERVE_PY), "--model", str(runtimes.gguf()),
                "--model_alias", alias, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--chat_format", chat_format,
                "--logits_all", "false", "--interrupt_requests", "false", *extra]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     env={**os.environ, **(env or {})})
        wait_http(f"{self.base_url}/models", self.proc, timeout=start_timeout,
                  what="llama server", log=self.log_path, error=LlamaServerError,
                  on_fail=self.stop)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
