"""The wheelhouse: every wheel a host needs, for hosts with no route to a package index.

The same directory serves the test fleet and air-gapped or Pi fleets (point the inventory's
`wheelhouse.find_links` at wherever you publish it). llama-cpp-python has no wheel on PyPI and
compiles for about 6-7 minutes on 2 cores, so it is built once (`pip wheel --no-deps`) into
`$NEVERDARK_CACHE/wheels` and reused by every wheelhouse.

Wheels are built for the runner's own interpreter and platform: the runner and the test hosts are
both Debian 12 with CPython 3.11 on x86_64. This machine's pip configuration (constraints file,
extra local indexes, find-links, CA bundle) applies as usual: pip runs with it untouched.

    python -m testbed.wheelhouse [DEST]        # default: $NEVERDARK_CACHE/wheels
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from neverdark import versions

CACHE = Path(os.environ.get("NEVERDARK_CACHE", "/var/cache/neverdark"))
LLAMA_CACHE = CACHE / "wheels"          # where the one llama-cpp-python build is kept
REQUIREMENTS = [*versions.LLAMA_REQUIREMENTS, *versions.HERMES_REQUIREMENTS,
                *versions.SIDECAR_REQUIREMENTS]
HOST_TAG = ("cp311", "x86_64")           # what the hosts run (Debian 12)
STAMP = ".neverdark-wheelhouse"


class WheelhouseError(RuntimeError):
    pass


def _pip(*args: str, log: Path | None = None, timeout: float = 3600) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
        out = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise WheelhouseError(f"pip {' '.join(args[:2])} failed ({proc.returncode}):\n"
                              f"{out.strip()[-3000:]}")


def _digest(requirements: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()


def _complete(dest: Path, digest: str) -> bool:
    """The stamp names this requirement set, and every wheel it lists is still there."""
    try:
        lines = (dest / STAMP).read_text().split()
    except OSError:
        return False
    return bool(lines) and lines[0] == digest and all((dest / n).is_file() for n in lines[1:])


def _check_runner() -> None:
    tag = (f"cp{sys.version_info[0]}{sys.version_info[1]}", platform.machine())
    if tag != HOST_TAG:
        raise WheelhouseError(f"the runner is {tag}, the hosts are {HOST_TAG}: build the "
                              "wheelhouse on a Debian 12 / Python 3.11 x86_64 machine")


def llama_wheel(log: Path | None = None) -> Path:
    """The llama-cpp-python wheel, built once (minutes) and cached."""
    pattern = f"llama_cpp_python-{versions.LLAMA_VERSION}-*.whl"
    found = sorted(LLAMA_CACHE.glob(pattern))
    if found:
        return found[0]
    LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
    print(f"wheelhouse: building llama-cpp-python {versions.LLAMA_VERSION} (about 7 minutes "
          f"on 2 cores; log {log or 'captured'})", file=sys.stderr, flush=True)
    _pip("wheel", "--no-deps", "-w", str(LLAMA_CACHE),
         f"llama-cpp-python=={versions.LLAMA_VERSION}", log=log)
    found = sorted(LLAMA_CACHE.glob(pattern))
    if not found:
        raise WheelhouseError(f"pip wheel left no {pattern} in {LLAMA_CACHE}")
    return found[0]


def build_wheelhouse(dest: Path, requirements: list[str] = REQUIREMENTS) -> Path:
    """Wheels for `requirements` and everything they need, for the hosts (cp311 x86_64).

    Idempotent: a stamp keyed by the requirement set (and listing the wheels) makes a second
    call return at once, without the network. Safe to call from parallel processes (a lock).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    digest = _digest(requirements)
    if _complete(dest, digest):
        return dest
    _check_runner()
    log = CACHE / "logs" / "wheelhouse.log"
    with open(dest / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(dest, digest):
            return dest
        started = time.monotonic()
        if any(r.replace("_", "-").lower().startswith("llama-cpp-python") for r in requirements):
            wheel = llama_wheel(log)
            if wheel.parent.resolve() != dest.resolve() and not (dest / wheel.name).exists():
                shutil.copy2(wheel, dest / wheel.name)
        before = set(os.listdir(dest))
        # --find-links dest: the cached llama wheel satisfies its own requirement; pip wheel
        # downloads wheels and builds any sdist into a wheel, so hosts never compile.
        _pip("wheel", "-w", str(dest), "--find-links", str(dest), *requirements, log=log)
        wheels = sorted(n for n in os.listdir(dest) if n.endswith(".whl"))
        stray = [n for n in set(os.listdir(dest)) - before
                 if not n.endswith(".whl") and not n.startswith(".")]
        if stray:
            raise WheelhouseError(f"pip wheel left non-wheel files in {dest}: {stray}")
        tmp = dest / f"{STAMP}.tmp"
        tmp.write_text("\n".join([digest, *wheels]) + "\n")
        os.replace(tmp, dest / STAMP)
        print(f"wheelhouse: {len(wheels)} wheels in {dest} "
              f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    return dest


def ensure_default_wheelhouse() -> Path:
    return build_wheelhouse(CACHE / "wheels")


if __name__ == "__main__":
    print(build_wheelhouse(Path(sys.argv[1])) if len(sys.argv) > 1 else ensure_default_wheelhouse())
