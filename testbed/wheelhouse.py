"""The wheelhouse the test fleet serves: every wheel a host needs, for hosts with no route to a
package index. The work is neverdark.artifacts.wheelhouse (operators build the same thing for
air-gapped or Pi fleets); this module names the test bench's defaults.

One folder, `$NEVERDARK_CACHE/wheels`, serves every arch: pure wheels are shared, each arch adds
its compiled ones and its own llama-cpp-python wheel from neverdark.artifacts.ensure(arch)
(built once, minutes). x86_64 (the runner's own platform) is resolved with `pip wheel`, aarch64
with `pip download --platform manylinux_*_aarch64 --only-binary :all:`. This machine's pip
configuration (constraints file, extra local indexes, find-links, CA bundle) applies as usual.

    python -m testbed.wheelhouse [--arch aarch64] [DEST]    # default: $NEVERDARK_CACHE/wheels
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neverdark import artifacts

CACHE = artifacts.CACHE
DEFAULT = CACHE / "wheels"
REQUIREMENTS = artifacts.HOST_REQUIREMENTS
WheelhouseError = artifacts.ArtifactError


def llama_wheel(arch: str = "x86_64") -> Path:
    """The llama-cpp-python wheel for `arch`, built once (minutes) and cached."""
    return artifacts.ensure(arch, ("wheel",)).wheel


def build_wheelhouse(dest: Path, requirements: list[str] = REQUIREMENTS,
                     arch: str = "x86_64") -> Path:
    """Wheels for `requirements` and everything they need, for Debian 12 cp311 hosts of `arch`.
    Idempotent (a per-arch stamp) and safe to call from parallel processes (a lock)."""
    return artifacts.wheelhouse.fill(arch, Path(dest), requirements)


def ensure_default_wheelhouse(arch: str = "x86_64") -> Path:
    return build_wheelhouse(DEFAULT, arch=arch)


def is_complete(dest: Path = DEFAULT, arch: str = "x86_64") -> bool:
    """Built for the current requirements and llama wheel (False if it would be rebuilt)."""
    if not artifacts.wheelhouse_complete(dest, arch):
        return False
    a = artifacts.cached(arch, ("wheel",))
    return a is not None and artifacts.wheelhouse_complete(
        dest, arch, artifacts.wheelhouse_digest(arch, REQUIREMENTS, a))


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m testbed.wheelhouse")
    p.add_argument("--arch", default="x86_64", choices=list(artifacts.ARCHES))
    p.add_argument("dest", nargs="?", type=Path, default=DEFAULT)
    args = p.parse_args()
    print(build_wheelhouse(args.dest, arch=args.arch))
