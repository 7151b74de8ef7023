"""Wheelhouses: every wheel a Debian 12 / CPython 3.11 host of an arch needs, for hosts with no
route to a package index (`wheelhouse: {find_links: ..., index: false}` in the inventory; the
test fleet's hosts). Filled with the operator's pip settings.

    python -m neverdark.artifacts build --arch aarch64 --wheelhouse DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

from neverdark import versions
from neverdark.artifacts.build import run
from neverdark.artifacts.cache import Artifacts, Lock, ensure, log_path, sha256_of
from neverdark.artifacts.errors import ArtifactError

HOST_PYTHON = (3, 11)
HOST_PYTHON_FULL = "3.11.2"     # Debian 12 and Raspberry Pi OS Bookworm
HOST_REQUIREMENTS = [*versions.LLAMA_REQUIREMENTS, *versions.HERMES_REQUIREMENTS,
                     *versions.SIDECAR_REQUIREMENTS]


def _platforms(arch: str) -> list[str]:
    """Every platform tag a Debian 12 (glibc 2.36) host of `arch` accepts, for pip download."""
    return ([f"manylinux_2_{m}_{arch}" for m in range(36, 16, -1)]
            + [f"manylinux2014_{arch}", f"linux_{arch}"])


def _target_env(arch: str) -> dict:
    return {"platform_machine": arch, "sys_platform": "linux", "platform_system": "Linux",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "python_full_version": HOST_PYTHON_FULL,
            "python_version": "%d.%d" % HOST_PYTHON, "platform_release": "",
            "platform_version": "", "implementation_version": HOST_PYTHON_FULL}


def _fits(wheel_name: str, arch: str) -> bool:
    from packaging.tags import Tag, cpython_tags, compatible_tags
    from packaging.utils import parse_wheel_filename
    plats = _platforms(arch)
    ok = set(cpython_tags(HOST_PYTHON, platforms=plats)) | set(
        compatible_tags(HOST_PYTHON, "cp311", platforms=plats))
    _, _, _, tags = parse_wheel_filename(wheel_name)
    return any(Tag(t.interpreter, t.abi, t.platform) in ok for t in tags)


def wheelhouse_missing(dest: Path, arch: str, requirements: list[str]) -> list[str]:
    """Requirements (from `requirements` down through every wheel's Requires-Dist, markers
    evaluated for a Debian 12 host of `arch`) that no wheel in `dest` fitting `arch` satisfies.
    pip download --platform evaluates markers for the runner, so this is the real check."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    have: dict[str, list[tuple[object, Path]]] = {}
    for w in Path(dest).glob("*.whl"):
        if _fits(w.name, arch):
            name, ver, _, _ = parse_wheel_filename(w.name)
            have.setdefault(name, []).append((ver, w))
    env = _target_env(arch)
    missing, seen = [], set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        match = [(v, w) for v, w in have.get(name, []) if req.specifier.contains(v, True)]
        if not match:
            missing.append(str(req))
            continue
        ver, w = max(match, key=lambda m: m[0])
        for ex in [""] + sorted(req.extras):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            with zipfile.ZipFile(w) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                for line in z.read(meta).decode().splitlines():
                    if line.startswith("Requires-Dist:"):
                        todo.append((Requirement(line.partition(":")[2].strip()), ex))
    return sorted(set(missing))


def _pip(args: list[str], log: Path) -> None:
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], log)


def wheelhouse_digest(arch: str, requirements: list[str], art: Artifacts | None) -> str:
    """What a wheelhouse stamp is keyed by: arch, requirements, the llama wheel's sha256."""
    return hashlib.sha256(json.dumps(
        [arch, sorted(requirements), art.stamp["files"][art.wheel.name]["sha256"] if art else None]
    ).encode()).hexdigest()


def fill(arch: str, dest: Path, requirements: list[str] | None = None) -> Path:
    """Every wheel a Debian 12 / CPython 3.11 host of `arch` needs for `requirements` (default:
    llama-cpp-python[server], Hermes, the sidecar's), including the llama wheel from ensure().

    One `dest` may hold several arches: pure wheels are shared, each arch has its own stamp.
    The runner's own platform (x86_64 here) uses `pip wheel`, which builds any sdist-only
    package; another arch gets `pip download --only-binary :all:` with its manylinux platform
    tags (a package with no wheel for it fails, naming the package), then the closure check.
    Idempotent (a stamp keyed by arch, requirements and the llama wheel's sha256) and safe
    against parallel callers (a lock in `dest`).
    """
    reqs = list(requirements or HOST_REQUIREMENTS)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    llama = any(r.replace("_", "-").lower().startswith("llama-cpp-python") for r in reqs)
    art = ensure(arch, ("wheel",)) if llama else None
    digest = wheelhouse_digest(arch, reqs, art)
    stamp = dest / f".neverdark-wheelhouse-{arch}"
    if wheelhouse_complete(dest, arch, digest):
        return dest
    log = log_path(f"wheelhouse-{arch}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with Lock(dest / ".lock"):
        if wheelhouse_complete(dest, arch, digest):
            return dest
        started = time.monotonic()
        if art:   # replace any other build of the same wheel name (e.g. other flags)
            target = dest / art.wheel.name
            if not target.is_file() or sha256_of(target) != sha256_of(art.wheel):
                shutil.copy2(art.wheel, dest / f".{art.wheel.name}.tmp")
                os.replace(dest / f".{art.wheel.name}.tmp", target)
        native = (sys.version_info[:2] == HOST_PYTHON and os.uname().machine == arch)
        if native:
            _pip(["wheel", "-w", str(dest), "--find-links", str(dest), *reqs], log)
        else:
            plats = [a for p in _platforms(arch) for a in ("--platform", p)]
            _pip(["download", "--only-binary", ":all:", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311", *plats, "-d", str(dest),
                  "--find-links", str(dest), *reqs], log)
            missing = wheelhouse_missing(dest, arch, reqs)
            if missing:   # deps behind markers that were false for the runner
                _pip(["download", "--only-binary", ":all:", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311", *plats, "-d", str(dest),
                      "--find-links", str(dest), *missing], log)
        missing = wheelhouse_missing(dest, arch, reqs)
        if missing:
            raise ArtifactError(f"wheelhouse {dest} for {arch} lacks {missing}; log {log}")
        stray = [n for n in os.listdir(dest) if not n.endswith(".whl") and not n.startswith(".")]
        if stray:
            raise ArtifactError(f"pip left non-wheel files in {dest}: {stray}")
        wheels = sorted(n for n in os.listdir(dest) if n.endswith(".whl") and _fits(n, arch))
        tmp = dest / f"{stamp.name}.tmp"
        tmp.write_text("\n".join([digest, *wheels]) + "\n")
        os.replace(tmp, stamp)
        print(f"wheelhouse: {len(wheels)} wheels for {arch} in {dest} "
              f"({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
    return dest


def wheelhouse_complete(dest: Path, arch: str, digest: str | None = None) -> bool:
    """The arch's stamp is there (for `digest`, if given) and every wheel it lists still is."""
    try:
        lines = (Path(dest) / f".neverdark-wheelhouse-{arch}").read_text().split()
    except OSError:
        return False
    return (bool(lines) and (digest is None or lines[0] == digest)
            and all((Path(dest) / n).is_file() for n in lines[1:]))
