"""What every part of the test fleet shares: names, limits, the error, running a command, a lock
and an atomic write."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import platform
import subprocess
import time
from pathlib import Path

from neverdark.artifacts import ARCHES, CACHE  # noqa: F401 -- $NEVERDARK_CACHE: one rule for the runner

IMAGES = CACHE / "images"   # the cached base images (image.py), lower layers of the host roots
REGISTRY = Path(os.environ.get("NEVERDARK_TESTFLEET_REGISTRY", "/run/neverdark-testfleet"))
PREFIX = "nd"
NET = ipaddress.ip_network("10.213.0.0/16")   # one /24 per run, one /30 per host
PROFILES = {"vps": "root", "pi": "pi"}
DEFAULT_HOSTS = [("vps1", "vps"), ("pi1", "pi")]
DEFAULT_RUN_DIR = Path(os.environ.get("NEVERDARK_TESTFLEET_DIR", ".run/testfleet"))
BOOT_TIMEOUT = float(os.environ.get("NEVERDARK_TESTFLEET_BOOT_TIMEOUT", "150"))
MAX_HOSTS = 60                              # /30s in a run's /24 (64), less a margin
NATIVE_ARCH = platform.machine()            # `uname -m` of the runner
DEBIAN_ARCH = {a: spec.debian for a, spec in ARCHES.items()}   # `uname -m` -> Debian's name
DEFAULT_MEMORY_MB = 4096
EMULATED_SLOWDOWN = 3      # boot and poweroff waits for a host under qemu-user (10-20x slower CPU)


class FleetError(RuntimeError):
    pass


def sh(cmd: list[str] | str, check: bool = True, timeout: float = 120, input: str | None = None,
       what: str | None = None, **kw) -> str:
    """Run a command, return its stdout; FleetError (with stderr and stdout, naming the command
    or `what`) when it fails or hangs."""
    what = what or repr(cmd)
    try:
        proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                              timeout=timeout, input=input, **kw)
    except subprocess.TimeoutExpired as e:
        raise FleetError(f"{what}: no answer within {timeout}s") from e
    if check and proc.returncode != 0:
        output = "\n".join(o.strip()[-2000:] for o in (proc.stderr, proc.stdout) if o.strip())
        raise FleetError(f"{what} failed ({proc.returncode}): {output}")
    return proc.stdout


@contextlib.contextmanager
def _locked(path: Path, timeout: float = 1800):
    """An exclusive flock on `path`, waited for at most `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FleetError(f"lock {path} still held after {timeout}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
