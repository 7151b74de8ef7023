"""Build seconds of the host artifacts, per arch and recipe, cold (nothing of the build cached).

    .venv/bin/python bench/artifacts_bench.py [--arch x86_64] [--arch aarch64] [--mode combined]
                                              [--mode separate] [--keep DIR]

Each run unpacks the pinned sdist (downloaded once into the cache; `--cold-sdist` times the
download too) into a fresh folder and builds:
- combined: the wheel (scikit-build-core, shared libs), then `llama-server` from the same tree;
- separate: the wheel, then a static `llama-server` from its own configure of vendor/llama.cpp.
Prints seconds per step, sizes and the machine's load, one table row per run. Nothing is
written to the artifact cache. Serialise it with anything else heavy on a small machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neverdark import artifacts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", choices=list(artifacts.ARCHES))
    ap.add_argument("--mode", action="append", choices=["combined", "separate"])
    ap.add_argument("--cold-sdist", action="store_true", help="also time the sdist download")
    ap.add_argument("--keep", type=Path, help="keep each run's output folder under DIR")
    args = ap.parse_args()
    if args.cold_sdist:
        t = time.monotonic()
        src = artifacts.sdist()
        if src.exists():
            src.unlink()
        artifacts.sdist()
        print(f"sdist download: {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    artifacts.build_env()
    print(f"build env (scikit-build-core venv): {time.monotonic() - t:.1f} s (0 if cached)")
    print(f"{'arch':8} {'mode':9} {'wheel s':>8} {'server s':>9} {'total s':>8} "
          f"{'CPU s w/s':>11} {'wheel MB':>9} {'server MB':>10}  load before/after")
    for arch in args.arch or ["x86_64"]:
        for mode in args.mode or ["combined"]:
            with tempfile.TemporaryDirectory(prefix="neverdark-artifacts-bench-") as tmp:
                work = Path(tmp)
                log = work / "build.log"
                load = os.getloadavg()[0]
                stamp = artifacts.build_into(arch, work / "out", work, log, mode=mode)
                s = stamp["seconds"]
                files = stamp["files"]
                wheel_mb = files[stamp["wheel"]]["bytes"] / 1e6
                server_mb = sum(r["bytes"] for n, r in files.items()
                                if n.startswith("llama-server/")) / 1e6
                c = stamp["cpu_seconds"]
                print(f"{arch:8} {mode:9} {s['wheel']:8.0f} {s['server']:9.0f} "
                      f"{s['total']:8.0f} {c['wheel']:5.0f}/{c['server']:<5.0f} "
                      f"{wheel_mb:9.1f} {server_mb:10.1f}  "
                      f"{load:.2f}/{os.getloadavg()[0]:.2f}", flush=True)
                if args.keep:
                    shutil.copytree(work / "out", args.keep / f"{arch}-{mode}")
                    shutil.copy(log, args.keep / f"{arch}-{mode}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
