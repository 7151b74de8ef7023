"""Build seconds of the host artifacts, per arch and part, cold (nothing of the build cached).

    .venv/bin/python bench/artifacts_bench.py [--arch x86_64] [--arch aarch64] [--keep DIR]

Each arch is built into a private, empty artifact cache (the sdist and the scikit-build-core
venv are taken from $NEVERDARK_CACHE, downloaded there once; `--cold-sdist` times the
download too), the way a host's needs decide it:
- wheel: `ensure(arch, ("wheel",))`, what a host running llama-cpp-python needs (the demo's);
- server: then `ensure(arch)`, which adds llama-server from the wheel's kept build tree.
Prints wall and CPU seconds per part (CPU: user+sys of the compilers, the steadier figure on
a shared machine), sizes and the load average before and after, one row per arch. Serialise it
with anything else heavy on a small machine.
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
    ap.add_argument("--cold-sdist", action="store_true", help="also time the sdist download")
    ap.add_argument("--keep", type=Path, help="keep each arch's artifacts and log under DIR")
    args = ap.parse_args()
    shared = artifacts.cache.CACHE
    if args.cold_sdist:
        t = time.monotonic()
        src = artifacts.sdist()
        if src.exists():
            src.unlink()
        artifacts.sdist()
        print(f"sdist download: {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    sdist, venv = artifacts.sdist(), artifacts.build_env()
    print(f"sdist and build env (scikit-build-core venv): {time.monotonic() - t:.1f} s "
          "(0 if cached)")
    print(f"{'arch':8} {'wheel s':>8} {'server s':>9} {'total s':>8} {'CPU s w/s':>11} "
          f"{'wheel MB':>9} {'server MB':>10}  load before/after")
    for arch in args.arch or ["x86_64"]:
        with tempfile.TemporaryDirectory(prefix="neverdark-artifacts-bench-") as tmp:
            cache = Path(tmp)
            (cache / "artifacts" / "src").mkdir(parents=True)
            os.symlink(sdist, cache / "artifacts" / "src" / sdist.name)
            os.symlink(venv, cache / "artifacts" / venv.name)
            artifacts.cache.CACHE = cache
            try:
                load = os.getloadavg()[0]
                artifacts.ensure(arch, ("wheel",), quiet=True)
                a = artifacts.ensure(arch, quiet=True)
            finally:
                artifacts.cache.CACHE = shared
            s, c, files = a.stamp["seconds"], a.stamp["cpu_seconds"], a.stamp["files"]
            wheel_mb = files[a.wheel.name]["bytes"] / 1e6
            server_mb = sum(r["bytes"] for n, r in files.items()
                            if n.startswith("llama-server/")) / 1e6
            print(f"{arch:8} {s['unpack'] + s['wheel']:8.0f} {s['server']:9.0f} "
                  f"{s['total']:8.0f} {c['wheel']:5.0f}/{c['server']:<5.0f} "
                  f"{wheel_mb:9.1f} {server_mb:10.1f}  "
                  f"{load:.2f}/{os.getloadavg()[0]:.2f}", flush=True)
            if args.keep:
                shutil.copytree(a.dir, args.keep / arch)
                shutil.copy(cache / "logs" / f"artifacts-{arch}.log", args.keep / f"{arch}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
