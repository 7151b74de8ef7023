"""RSS of the deployed llama launcher at n_ctx 65536, sliding-window cache on and off.

    .venv/bin/python bench/llama_memory_bench.py

Runs deploys/llama/serve.py (what the llama units run) on the runner with the real Gemma 3
270M GGUF, once with NEVERDARK_SWA_FULL=false (the deployed default) and once with true
(llama.cpp's own default), and prints the server's RSS once it answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.runtimes import LLAMA_PYTHON, gguf  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(swa_full: bool, model: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NEVERDARK_SWA_FULL="true" if swa_full else "false")
    proc = subprocess.Popen(
        [str(LLAMA_PYTHON), str(REPO / "deploys/llama/serve.py"), "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "65536", "--n_threads", "2",
         "--chat_format", "chatml", "--logits_all", "false", "--verbose", "false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                return rss_mb(proc.pid)
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited {proc.returncode}")
                time.sleep(0.5)
        raise TimeoutError("server did not answer")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    model = gguf()
    print("llama-cpp-python server (deploys/llama/serve.py), Gemma 3 270M Q4_K_M, n_ctx 65536:")
    for swa_full in (False, True):
        print(f"  swa_full={str(swa_full).lower():5}  RSS when ready: {measure(swa_full, model) / 1024:.2f} GB")


if __name__ == "__main__":
    main()
