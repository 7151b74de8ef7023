"""The artifact cache: what neverdark.artifacts builds, kept under $NEVERDARK_CACHE (default
/var/cache/neverdark) and built once:

    artifacts/src/llama_cpp_python-<v>.tar.gz   the pinned sdist, sha256-checked
    artifacts/buildenv-py<XY>/                  a venv with the pinned scikit-build-core
    artifacts/<arch>/<v>-<key>/                 stamp.json, the wheel, llama-server/ (if built)
    artifacts/<arch>/.build-<v>-<key>/          a build under way, or the wheel's build tree
                                                kept until the server is built from it
    logs/artifacts-<arch>.log                   every build's commands and output

`<key>` hashes every input that changes the bits (build.recipe()). The stamp lists the parts
built (the wheel always; the server once asked for), their build seconds and each file's
sha256; cached() takes a folder only if every file still matches. Building holds a flock per
arch, so parallel callers build once; a new folder is renamed into place complete, a server
added later goes in by rename before the stamp that names it (os.replace), so a killed build
is never taken for a good one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from neverdark import versions
from neverdark.arches import arch_spec
from neverdark.artifacts import build
from neverdark.artifacts.errors import ArtifactError

CACHE = Path(os.environ.get("NEVERDARK_CACHE", "/var/cache/neverdark"))
PARTS = build.PARTS
ENGINE_PART = {"llama-cpp-python": "wheel", "llama-server": "server"}   # what each engine runs


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Lock:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def log_path(name: str) -> Path:
    return CACHE / "logs" / f"artifacts-{name}.log"


def _root(arch: str) -> Path:
    return CACHE / "artifacts" / arch


def sdist(log: Path | None = None) -> Path:
    """The pinned llama-cpp-python sdist, downloaded once with the operator's pip settings."""
    name = f"llama_cpp_python-{versions.LLAMA_VERSION}.tar.gz"
    out = CACHE / "artifacts" / "src" / name
    with Lock(out.parent / ".lock"):
        if out.is_file() and sha256_of(out) == versions.LLAMA_SDIST_SHA256:
            return out
        log = log or log_path("src")
        log.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            build.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                       "--no-deps", "--no-binary", ":all:", "-d", tmp,
                       f"llama-cpp-python=={versions.LLAMA_VERSION}"], log)
            got = Path(tmp) / name
            if not got.is_file():
                raise ArtifactError(f"pip download left no {name}")
            digest = sha256_of(got)
            if digest != versions.LLAMA_SDIST_SHA256:
                raise ArtifactError(f"{name}: sha256 {digest}, pinned "
                                    f"{versions.LLAMA_SDIST_SHA256} (neverdark/versions.py)")
            os.replace(got, out)
    return out


def build_env(log: Path | None = None) -> Path:
    """A venv with the pinned scikit-build-core: builds then run offline, without isolation."""
    venv = CACHE / "artifacts" / f"buildenv-py{sys.version_info[0]}{sys.version_info[1]}"
    ok = venv / ".neverdark-ok"
    with Lock(venv.parent / ".buildenv.lock"):
        if ok.is_file() and ok.read_text() == versions.SCIKIT_BUILD_CORE:
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = log or log_path("buildenv")
        log.parent.mkdir(parents=True, exist_ok=True)
        build.run([sys.executable, "-m", "venv", venv], log)
        build.run([venv / "bin" / "python", "-m", "pip", "install", "-q",
                   "--disable-pip-version-check", versions.SCIKIT_BUILD_CORE], log)
        ok.write_text(versions.SCIKIT_BUILD_CORE)
    return venv


@dataclasses.dataclass(frozen=True)
class Artifacts:
    arch: str
    dir: Path
    wheel: Path                 # llama_cpp_python-<v>-py3-none-linux_<arch>.whl
    server_dir: Path            # llama-server and the shared libraries it needs (if built)
    stamp: dict

    @property
    def server(self) -> Path:
        return self.server_dir / "llama-server"

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.stamp["parts"])


def _key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:12]


def _folder(arch: str, rec: dict) -> Path:
    return _root(arch) / f"{versions.LLAMA_VERSION}-{_key(rec)}"


def _valid(d: Path) -> dict | None:
    """The stamp of a complete, unmodified artifact folder, else None."""
    try:
        stamp = json.loads((d / "stamp.json").read_text())
        if "wheel" not in stamp["parts"]:
            return None
        for rel, rec in stamp["files"].items():
            if sha256_of(d / rel) != rec["sha256"]:
                return None
        return stamp
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _has(stamp: dict | None, parts) -> bool:
    return stamp is not None and set(parts) <= set(stamp["parts"])


def _artifacts(arch: str, d: Path, stamp: dict) -> Artifacts:
    return Artifacts(arch, d, d / stamp["wheel"], d / "llama-server", stamp)


def cached(arch: str, parts=PARTS) -> Artifacts | None:
    """The artifacts for `arch` if `parts` (default: the wheel and llama-server) are built with
    the current recipe, else None (never builds)."""
    d = _folder(arch, build.recipe(arch))
    stamp = _valid(d)
    return _artifacts(arch, d, stamp) if _has(stamp, parts) else None


def _file_records(out: Path, names) -> dict:
    return {n: {"sha256": sha256_of(out / n), "bytes": (out / n).stat().st_size} for n in names}


def _merge_seconds(old: dict, new: dict) -> dict:
    merged = {k: v for k, v in {**old, **new}.items() if k != "total"}
    return {**merged, "total": round(sum(merged.values()), 1)}


def _note(arch: str, steps: list[str], log: Path) -> None:
    spec = arch_spec(arch)
    seconds = sum(build.EXPECTED_SECONDS[arch][s] for s in steps)
    minutes = seconds * 2 / (os.cpu_count() or 2) / 60
    what = {"wheel": "llama-cpp-python wheel", "server": "llama-server"}
    print(f"artifacts: building the {arch} {' and '.join(what[s] for s in steps)}"
          f"{' (cross-compiled)' if spec.cross else ''}: about {minutes:.0f} minutes on "
          f"{os.cpu_count()} idle cores; log {log}", file=sys.stderr, flush=True)


def ensure(arch: str, parts=PARTS, *, quiet: bool = False) -> Artifacts:
    """The artifacts for `arch` with `parts` (default: the wheel and llama-server; the wheel is
    always built), built once (minutes) and cached; a part missing from a cached folder is
    added to it."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ArtifactError(f"unknown part(s) {sorted(unknown)}: {', '.join(PARTS)}")
    rec = build.recipe(arch)
    final = _folder(arch, rec)
    stamp = _valid(final)
    if _has(stamp, parts):
        return _artifacts(arch, final, stamp)
    with Lock(_root(arch) / ".lock"):
        stamp = _valid(final)      # another caller may have built it while we waited
        if _has(stamp, parts):
            return _artifacts(arch, final, stamp)
        server = "server" in parts
        work = _root(arch) / f".build-{final.name}"
        if stamp is None or not (work / "tree.ok").is_file():
            shutil.rmtree(work, ignore_errors=True)     # a killed build's leftovers
        if stamp is None and final.exists():   # a corrupt or half-copied folder
            shutil.rmtree(final)
        work.mkdir(parents=True, exist_ok=True)
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        log = log_path(arch)
        log.parent.mkdir(parents=True, exist_ok=True)
        steps = (["wheel"] if not (work / "tree.ok").is_file() else []) + (["server"] * server)
        if not quiet:
            _note(arch, steps, log)
        with open(log, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} build {final.name} "
                    f"({', '.join(steps)}): {json.dumps(rec, sort_keys=True)}\n")
        load = round(os.getloadavg()[0], 2)
        done = build.build_parts(arch, work, out, log, server=server,
                                 sdist=lambda: sdist(log), venv=lambda: build_env(log))
        bundle = [f"llama-server/{p.name}" for p in sorted((out / "llama-server").iterdir())
                  ] if server else []
        info = {"seconds": _merge_seconds((stamp or {}).get("seconds", {}), done["seconds"]),
                "cpu_seconds": _merge_seconds((stamp or {}).get("cpu_seconds", {}),
                                              done["cpu_seconds"]),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "max_glibc": build.max_glibc(out / n for n in bundle)}
        if stamp is None:   # a new folder: complete in `out`, then renamed into place
            stamp = {**rec, "key": _key(rec), "wheel": done["wheel"], "load_at_start": load,
                     "cpus": os.cpu_count(), "parts": ["wheel", *(["server"] * server)],
                     **info, "files": _file_records(out, [done["wheel"], *bundle])}
            (out / "stamp.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            os.rename(out, final)
        else:               # the server into a cached folder: the files first, then the stamp
            shutil.rmtree(final / "llama-server", ignore_errors=True)   # not in the stamp
            os.rename(out / "llama-server", final / "llama-server")
            stamp = {**stamp, **info, "parts": list(PARTS),
                     "files": {**stamp["files"], **_file_records(final, bundle)}}
            tmp = final / "stamp.json.tmp"
            tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, final / "stamp.json")
        if server:
            shutil.rmtree(work)
        else:       # the tree stays for the server; its copies of the outputs do not
            for leftover in (out, work / "wheel"):
                shutil.rmtree(leftover, ignore_errors=True)
        if not quiet:
            print(f"artifacts: {arch} {' and '.join(steps)} built in "
                  f"{sum(done['seconds'].values()):.0f} s -> {final}", file=sys.stderr,
                  flush=True)
    return _artifacts(arch, final, stamp)


def needed(fleet) -> dict[str, tuple[str, ...]]:
    """What the hosts of a validated fleet run, per arch: the wheel where a model uses
    llama-cpp-python, the server where one uses llama-server (as plan.llama_plan uploads)."""
    from neverdark import topology
    want: dict[str, set[str]] = {}
    for name, host in fleet.hosts.items():
        engines = {s.engine for s in topology.llama_servers(fleet, name)}
        if engines:
            want.setdefault(host.arch, set()).update(ENGINE_PART[e] for e in engines)
    return {arch: tuple(p for p in PARTS if p in ps) for arch, ps in sorted(want.items())}
