"""The wheelhouse: every wheel a host needs, for hosts with no route to a package index.

The same directory serves the test fleet and air-gapped or Pi fleets (point the inventory's
`wheelhouse.find_links` at wherever you publish it). llama-cpp-python has no wheel on PyPI and
compiles for about 7 minutes on 2 cores, so it is built once and kept.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from neverdark import versions

CACHE = Path(os.environ.get("NEVERDARK_CACHE", "/var/cache/neverdark"))
REQUIREMENTS = [*versions.LLAMA_REQUIREMENTS, *versions.HERMES_REQUIREMENTS,
                *versions.SIDECAR_REQUIREMENTS]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args],
                   check=True)


def build_wheelhouse(dest: Path, requirements: list[str] = REQUIREMENTS) -> Path:
    """Wheels for `requirements` and all they need, built for this Python and platform.

    The hosts run the same Debian 12 and Python 3.11 as the runner. Idempotent: a stamp of the
    requirement set makes a second call return at once, without the network.
    """
    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / ".neverdark-wheelhouse"
    digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == digest:
        return dest
    if not list(dest.glob(f"llama_cpp_python-{versions.LLAMA_VERSION}-*.whl")):
        _pip("wheel", "--no-deps", "-w", str(dest), f"llama-cpp-python=={versions.LLAMA_VERSION}")
    # --find-links dest: the llama wheel just built satisfies its own requirement
    _pip("wheel", "-w", str(dest), "--find-links", str(dest), *requirements)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, stamp)
    return dest


def ensure_default_wheelhouse() -> Path:
    return build_wheelhouse(CACHE / "wheels")


if __name__ == "__main__":
    print(ensure_default_wheelhouse())
