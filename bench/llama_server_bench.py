"""The native llama-server from neverdark.artifacts: RSS when ready, /health during a prefill.

    .venv/bin/python bench/llama_server_bench.py [--ctx 65536] [--parallel 3] [--prompt-tokens 8000]

Runs the cached x86_64 `llama-server` (python -m neverdark.artifacts build) on the real Gemma 3
270M GGUF with `-c CTX -np PARALLEL -t <cores>`, prints its RSS once /health says 200, then
sends one long prompt (about PROMPT_TOKENS tokens, a cold prefill) and polls /health and
/v1/models every 100 ms while it runs: their latencies, and the RSS after the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neverdark import artifacts  # noqa: E402
from testbed.runtimes import gguf  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=65536)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=8000)
    args = ap.parse_args()
    a = artifacts.ensure("x86_64")
    threads = str(os.cpu_count() or 2)
    t = time.monotonic()
    with artifacts.serve("x86_64", a.server, gguf(), "-c", str(args.ctx), "-np",
                         str(args.parallel), "-t", threads, timeout=300) as (url, proc):
        print(f"llama-server -c {args.ctx} -np {args.parallel} -t {threads}: ready in "
              f"{time.monotonic() - t:.1f} s, RSS {rss_mb(proc.pid):.0f} MB")
        # ~11.5 Gemma tokens per filler sentence; the answer reports the real count
        prompt = " ".join(f"item{i % 997} is filed under shelf {i % 31}."
                          for i in range(int(args.prompt_tokens / 11.5)))
        result = {}

        def complete():
            t0 = time.monotonic()
            status, body = artifacts._http(url + "/completion", {
                "prompt": prompt, "n_predict": 4, "cache_prompt": False}, timeout=900)
            result.update(status=status, seconds=time.monotonic() - t0,
                          body=json.loads(body) if status == 200 else body[:300])

        th = threading.Thread(target=complete)
        th.start()
        health, models = [], []
        time.sleep(0.5)
        while th.is_alive():
            for path, out in (("/health", health), ("/v1/models", models)):
                t0 = time.monotonic()
                status, _ = artifacts._http(url + path, timeout=60)
                out.append((time.monotonic() - t0) * 1000)
                assert status == 200, (path, status)
            time.sleep(0.1)
        th.join()
        if result.get("status") != 200:
            print(f"completion failed: {result}")
            return 1
        timings = result["body"].get("timings", {})
        print(f"prefill: {timings.get('prompt_n')} tokens in {result['seconds']:.1f} s "
              f"({timings.get('prompt_per_second', 0):.0f} tok/s); RSS after {rss_mb(proc.pid):.0f} MB")
        for name, xs in (("/health", health), ("/v1/models", models)):
            print(f"{name} during prefill: n={len(xs)} median {statistics.median(xs):.1f} ms, "
                  f"max {max(xs):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
