"""Host artifacts, built once on the operator's machine: per architecture, the llama-cpp-python
wheel, the native `llama-server` and a wheelhouse for hosts without a package index.

llama-cpp-python has no wheel on PyPI, and a host (a VPS, a Raspberry Pi) has no compiler. So
the operator's machine (x86_64 Debian 12, or anything with the same toolchain) compiles, from
the pinned sdist (`versions.LLAMA_SDIST_SHA256`, whose `vendor/llama.cpp` is llama.cpp
`versions.LLAMA_CPP_COMMIT`):

- the wheel `llama_cpp_python-<v>-py3-none-linux_<arch>.whl`;
- `llama-server/`: llama.cpp's own server from the *same* configured build tree, with the shared
  libraries it links (`libllama.so`, `libggml*.so`, `libmtmd.so`, `libllama-common.so`,
  `libllama-server-impl.so`) beside it and RUNPATH `$ORIGIN`: deploy the folder as a whole.

aarch64 is cross-compiled with Debian's `gcc-aarch64-linux-gnu g++-aarch64-linux-gnu` (an
emulated compile would take hours). Everything lands under `$NEVERDARK_CACHE/artifacts/<arch>/`
(default /var/cache/neverdark), in a folder named by version and a key of every input that
changes the bits (recipe, sdist sha256, CMake flags, compiler and backend versions), with a
`stamp.json` recording flags, build seconds and each file's sha256. A folder is renamed into
place only once complete and checked, under a flock, so parallel callers build once and a killed
build is never taken for a good one. The build log goes to `$NEVERDARK_CACHE/logs/`.

    python -m neverdark.artifacts build [--arch x86_64] [--arch aarch64] [--wheelhouse DIR]
    python -m neverdark.artifacts show
    python -m neverdark.artifacts smoke --arch aarch64 --model M.gguf   # qemu-user if foreign
    python -m neverdark.artifacts check PATH...      # ELF/wheel checks, stdlib only (hosts too)

Flags (both arches): Release, `GGML_OPENMP=OFF` (ggml's own thread pool; a minimal host has no
libgomp.so.1), `GGML_CCACHE=OFF`, `LLAMA_OPENSSL=OFF` (llama-cpp-python already forces
`LLAMA_CURL=OFF`), `LLAMA_USE_PREBUILT_UI=OFF LLAMA_BUILD_UI=OFF` (no web UI download or npm
build: the build never touches the network), tests and examples off.
- x86_64: `GGML_NATIVE=OFF` with `GGML_SSE42 GGML_AVX GGML_AVX2 GGML_BMI2 GGML_FMA GGML_F16C`
  on, i.e. the x86-64-v3 level (Intel Haswell 2013+, AMD Zen 1+). Why not native: this runner is
  an AVX-512 EPYC, and `-march=native` would put AVX-512 code into the wheel, which dies with
  SIGILL on an older or smaller VPS (Zen 1-3, most Intel client parts). AVX2 is what every
  x86 VPS of the last decade has, ggml's AVX2 kernels are its main x86 path, and the test hosts
  (this same CPU) run it too. `host_cpu_problems()` tells a host that lacks a needed feature.
  The price, measured here (Gemma 3 270M Q4_K_M, 1 thread, tokens per CPU-second, a
  `-march=native` AVX-512/VNNI build against this one): prefill 500 vs 326 (-35%), decode 80
  vs 75 (-6%). A SIGILL would take the local engine down exactly when the cloud is dark; a
  slower prefill does not. (ggml's GGML_CPU_ALL_VARIANTS picks the best kernel set at run time
  but compiles the CPU backend once per variant and needs GGML_BACKEND_DL, whose backends are
  loaded by ggml_backend_load_all(), which llama-cpp-python 0.3.36 never calls.)
- aarch64: `GGML_CPU_ARM_ARCH=armv8-a` (a Pi 4's Cortex-A72 is armv8.0; `armv8.2-a` would
  break it), built with a CMake toolchain file and `_PYTHON_HOST_PLATFORM=linux-aarch64`.

Build cost, wall seconds on this 2-core runner, cold (empty build tree; the sdist download,
46 s, and the scikit-build-core venv, 8 s, happen once per machine and are not included). Other
sessions' work ran beside every build (load average in brackets), so idle figures are lower:
the CPU seconds (user+sys of the compilers) are the steadier measure.

| build                                         | x86_64 wall    | aarch64 wall   | CPU x86/aarch64 |
| --------------------------------------------- | -------------- | -------------- | --------------- |
| wheel alone (scikit-build-core, shared libs)  | 320 s [3-4]    | 770 s [5-7]    | ~390 / ~450 (a) |
| llama-server alone (static, own configure)    | 366 s [2.4-3.9]| 403 s [2.3-4.5]| - / 446         |
| both, separately (sum of the two rows above)  | 686 s          | 1173 s         | - / ~896        |
| both from one tree (wheel, then the server)   | 371 s = 320+50 | 834 s = 770+62 | 444 / 500       |
| the same, idle (a cold `make test`'s setup)   | 253 s = 175+36 | 211 s = 174+36 | 440 / 404       |

(a) the one-tree build's total minus its server step. The idle row (2026-11-30, nothing else
running) includes the once-per-machine sdist download and build venv in x86_64's 253 s (41 s).
Sizes: x86_64 wheel 23.7 MB, server bundle 15.6 MB (8 files; a static server alone is
12.4 MB); aarch64 21.6 MB and 14.0 MB.

The chosen recipe is the last row: scikit-build-core builds the wheel with `build-dir` kept;
that tree is reconfigured with a one-line CMake hook (`CMAKE_PROJECT_llama.cpp_INCLUDE`) that
adds llama.cpp's tools/server and tools/ui, and `cmake --build --target llama-server` compiles
only the server's 14 sources: ggml, llama, common (with cpp-httplib) and mtmd are the wheel's.
ccache between two separate builds was not taken: the wheel's objects are built shared
(-fPIC, -DGGML_SHARED...) and a static server's are not, so they would not hit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

try:
    from neverdark import versions
except ImportError:   # this file alone on a host, for `check`: the ELF checks need nothing else
    versions = None

CACHE = Path(os.environ.get("NEVERDARK_CACHE", "/var/cache/neverdark"))
RECIPE = 1          # bump when the build steps change in a way the flags below do not show
HOST_PYTHON = (3, 11)
HOST_PYTHON_FULL = "3.11.2"     # Debian 12 and Raspberry Pi OS Bookworm
# What a Debian 12 / Pi OS Bookworm host provides: glibc 2.36, GCC 12's libstdc++.
HOST_SYMBOL_LIMITS = {"GLIBC": (2, 36), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13)}
# The only libraries an artifact may take from the host system.
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0",
               "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
# What the engine passes to llama-server: each must appear in its --help.
SERVER_FLAGS = ["--parallel", "-np", "--slot-save-path", "--cache-reuse", "-ctk", "-ctv",
                "--metrics", "--swa-full", "--ctx-size", "-c", "--threads", "-t", "--host",
                "--port", "--alias", "--jinja", "--chat-template"]

_COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str                   # uname -m on the host
    e_machine: int              # ELF header value of its binaries
    cross: str | None           # GNU triplet of the cross toolchain, None: the runner's own
    flags: tuple[str, ...]      # CMake flags for ggml's CPU backend
    cpu_features: tuple[str, ...]   # /proc/cpuinfo flags a host needs to run the build
    qemu_cpu: str | None = None     # the oldest CPU the build targets, for qemu-user checks
    debian: str = ""            # Debian's name for it (dpkg --print-architecture, mmdebstrap)

    @property
    def wheel_platform(self) -> str:
        return f"linux_{self.name}"

    @property
    def cmake_args(self) -> list[str]:
        return [*_COMMON_FLAGS, *self.flags]


ARCHES = {
    "x86_64": Arch("x86_64", 62, None,
                   ("-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
                    "-DGGML_BMI2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"),
                   ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"), debian="amd64"),
    "aarch64": Arch("aarch64", 183, "aarch64-linux-gnu",
                    ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"),
                    ("asimd",), qemu_cpu="cortex-a72", debian="arm64"),
}
# Seconds of a cold combined build on 2 idle cores (the table above; the note printed before a
# build scales them by the core count). Other work beside it can double them.
EXPECTED_SECONDS = {"x86_64": 260, "aarch64": 220}


class ArtifactError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Artifacts:
    arch: str
    dir: Path
    wheel: Path                 # llama_cpp_python-<v>-py3-none-linux_<arch>.whl
    server_dir: Path            # llama-server and the shared libraries it needs
    stamp: dict

    @property
    def server(self) -> Path:
        return self.server_dir / "llama-server"


def arch_spec(arch: str) -> Arch:
    try:
        return ARCHES[arch]
    except KeyError:
        raise ArtifactError(f"unknown arch {arch!r}: one of {', '.join(ARCHES)}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- ELF inspection (stdlib only, so hosts can run it) -------------------------------------------

@dataclasses.dataclass(frozen=True)
class ElfInfo:
    machine: int
    needed: tuple[str, ...]
    runpath: str | None
    versions: dict[str, tuple[str, ...]]   # library -> symbol versions it is asked for


def _elf_sections(data: bytes):
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ArtifactError("not a little-endian 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    out = []
    for i in range(shnum):
        name, typ, flags, addr, off, size, link, info, align, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize)
        out.append({"type": typ, "offset": off, "size": size, "link": link, "info": info})
    return out


def _cstr(data: bytes, at: int) -> str:
    return data[at:data.index(b"\0", at)].decode()


def _dynamic(data: bytes, sections):
    """(dynamic section, its string table, [(tag, value, file offset of the entry)])."""
    for s in sections:
        if s["type"] == 6:  # SHT_DYNAMIC
            strtab = sections[s["link"]]
            entries = []
            for off in range(s["offset"], s["offset"] + s["size"], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 0:
                    break
                entries.append((tag, val, off))
            return s, strtab, entries
    return None, None, []


def elf_info(path: Path) -> ElfInfo:
    """Machine, DT_NEEDED, RUNPATH and the symbol versions it needs (.gnu.version_r)."""
    data = Path(path).read_bytes()
    try:
        sections = _elf_sections(data)
        machine, = struct.unpack_from("<H", data, 0x12)
        _, strtab, entries = _dynamic(data, sections)
        needed, runpath = [], None
        for tag, val, _ in entries:
            if tag == 1:
                needed.append(_cstr(data, strtab["offset"] + val))
            elif tag in (15, 29):  # DT_RPATH, DT_RUNPATH
                runpath = _cstr(data, strtab["offset"] + val)
        want: dict[str, list[str]] = {}
        for s in sections:
            if s["type"] != 0x6FFFFFFE:  # SHT_GNU_verneed
                continue
            names = sections[s["link"]]["offset"]
            off = s["offset"]
            for _ in range(s["info"]):
                _, cnt, file_, aux, nxt = struct.unpack_from("<HHIII", data, off)
                lib = want.setdefault(_cstr(data, names + file_), [])
                a = off + aux
                for _ in range(cnt):
                    _, _, _, vname, anext = struct.unpack_from("<IHHII", data, a)
                    lib.append(_cstr(data, names + vname))
                    a += anext
                off += nxt
    except (struct.error, IndexError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read ELF structure: {e}") from None
    return ElfInfo(machine, tuple(needed), runpath,
                   {k: tuple(sorted(set(v))) for k, v in want.items()})


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def elf_problems(path: Path, arch: str, bundled: set[str] = frozenset(),
                 loaded: bool = True) -> list[str]:
    """Why this ELF file would not run on a Debian 12 / Pi OS Bookworm host of `arch` (empty if
    it would): wrong machine, a symbol version newer than the host's libraries, or a library
    that is neither one of `bundled` (shipped beside it, reached by RUNPATH $ORIGIN) nor a base
    system library (libgomp, libcurl, libssl... are absent on a minimal host). `loaded=False`
    checks only machine and symbol versions (a file nothing loads)."""
    spec = arch_spec(arch)
    info = elf_info(path)
    problems = []
    if info.machine != spec.e_machine:
        problems.append(f"{path}: ELF e_machine {info.machine}, {arch} is {spec.e_machine}")
    for lib in info.needed if loaded else ():
        if lib in bundled:
            if info.runpath != "$ORIGIN":
                problems.append(f"{path}: needs bundled {lib} but RUNPATH is {info.runpath!r}")
        elif lib not in SYSTEM_LIBS:
            problems.append(f"{path}: needs {lib}, which a minimal host does not have")
    for lib, names in info.versions.items():
        for name in names:
            prefix, _, ver = name.partition("_")
            limit = HOST_SYMBOL_LIMITS.get(prefix)
            if limit and re.fullmatch(r"[0-9.]+", ver) and _version_tuple(ver) > limit:
                problems.append(f"{path}: needs {name} from {lib}; Debian 12 has up to "
                                f"{prefix}_{'.'.join(map(str, limit))}")
    return problems


def max_symbol_version(path: Path, prefix: str = "GLIBC") -> str | None:
    found = [n.partition("_")[2] for names in elf_info(path).versions.values() for n in names
             if n.startswith(prefix + "_") and re.fullmatch(r"[0-9.]+", n.partition("_")[2])]
    return f"{prefix}_{max(found, key=_version_tuple)}" if found else None


def wheel_problems(wheel: Path, arch: str) -> list[str]:
    """The wheel's tag and every shared library in it (see elf_problems). Only llama_cpp/lib/
    is loaded (by llama_cpp's ctypes); the copies llama.cpp's own install rules add under lib/
    are dead weight on a host, so for them only machine and symbol versions are checked."""
    m = re.fullmatch(r"llama_cpp_python-([^-]+)-py3-none-(\w+)\.whl", Path(wheel).name)
    if not m:
        return [f"{wheel}: not a llama_cpp_python py3-none wheel name"]
    problems = []
    if m.group(2) != arch_spec(arch).wheel_platform:
        problems.append(f"{wheel}: platform tag {m.group(2)}, want {arch_spec(arch).wheel_platform}")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        # every shared library, also the copies llama.cpp's own install rules put under lib/
        libs = [n for n in z.namelist() if re.search(r"\.so(\.[0-9]+)*$", n)]
        if "llama_cpp/lib/libllama.so" not in libs:
            problems.append(f"{wheel}: no llama_cpp/lib/libllama.so")
        names = {Path(n).name for n in libs if n.startswith("llama_cpp/lib/")}
        for n in libs:
            problems += [p.replace(str(Path(tmp) / n), f"{wheel}!{n}") for p in elf_problems(
                Path(z.extract(n, tmp)), arch, names, loaded=n.startswith("llama_cpp/lib/"))]
    return problems


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def bundle_problems(folder: Path, arch: str) -> list[str]:
    """Every ELF file in `folder`, the others there counting as bundled (RUNPATH $ORIGIN): a
    llama-server bundle, or an installed llama_cpp/lib on a host."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and _is_elf(p))
    names = {p.name for p in files}
    return [p for f in files for p in elf_problems(f, arch, names)]


def server_problems(server_dir: Path, arch: str) -> list[str]:
    """llama-server and every library beside it (see elf_problems)."""
    if not (Path(server_dir) / "llama-server").is_file():
        return [f"{server_dir}: no llama-server"]
    return bundle_problems(server_dir, arch)


def host_cpu_problems(arch: str, cpuinfo: str | None = None) -> list[str]:
    """CPU features the build needs that this host's /proc/cpuinfo does not list."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    have = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have |= set(value.split())
    return [f for f in arch_spec(arch).cpu_features if f not in have]


def set_runpath(path: Path, runpath: str = "$ORIGIN") -> None:
    """Rewrite DT_RUNPATH/DT_RPATH in place (the string may only shrink; chrpath does the
    same): a build-tree RUNPATH becomes $ORIGIN, so the bundle finds its libraries beside it."""
    data = bytearray(Path(path).read_bytes())
    _, strtab, entries = _dynamic(bytes(data), _elf_sections(bytes(data)))
    hits = [(tag, val, off) for tag, val, off in entries if tag in (15, 29)]
    if not hits:
        raise ArtifactError(f"{path}: no RUNPATH to rewrite")
    new = runpath.encode()
    for tag, val, off in hits:
        at = strtab["offset"] + val
        old_len = data.index(b"\0", at) - at
        if len(new) > old_len:
            raise ArtifactError(f"{path}: RUNPATH {data[at:at + old_len]!r} shorter than {runpath}")
        data[at:at + old_len + 1] = new + b"\0" * (old_len - len(new) + 1)
        struct.pack_into("<qQ", data, off, 29, val)  # always DT_RUNPATH
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, os.stat(path).st_mode)
    os.replace(tmp, path)


# --- building ------------------------------------------------------------------------------------

def _root(arch: str) -> Path:
    return CACHE / "artifacts" / arch


def _log_path(arch: str) -> Path:
    return CACHE / "logs" / f"artifacts-{arch}.log"


def _run(cmd: list[str], log: Path, *, cwd: Path | None = None, env: dict | None = None,
         timeout: float = 7200) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except FileNotFoundError as e:
            raise ArtifactError(f"{cmd[0]} not found: install the build tools "
                                "(apt-get install cmake ninja-build g++ "
                                "gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)") from e
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise ArtifactError(f"{' '.join(map(str, cmd[:3]))} failed ({proc.returncode}); "
                            f"log {log}:\n{tail}")


class _Lock:
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


def sdist(log: Path | None = None) -> Path:
    """The pinned llama-cpp-python sdist, downloaded once with the operator's pip settings."""
    name = f"llama_cpp_python-{versions.LLAMA_VERSION}.tar.gz"
    out = CACHE / "artifacts" / "src" / name
    with _Lock(out.parent / ".lock"):
        if out.is_file() and sha256_of(out) == versions.LLAMA_SDIST_SHA256:
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                   "--no-deps", "--no-binary", ":all:", "-d", tmp,
                   f"llama-cpp-python=={versions.LLAMA_VERSION}"]
            _run(cmd, log or _log_path("src"))
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
    with _Lock(venv.parent / ".buildenv.lock"):
        if ok.is_file() and ok.read_text() == versions.SCIKIT_BUILD_CORE:
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = log or _log_path("buildenv")
        _run([sys.executable, "-m", "venv", venv], log)
        _run([venv / "bin" / "python", "-m", "pip", "install", "-q",
              "--disable-pip-version-check", versions.SCIKIT_BUILD_CORE], log)
        ok.write_text(versions.SCIKIT_BUILD_CORE)
    return venv


def _compilers(spec: Arch) -> tuple[str, str]:
    prefix = f"{spec.cross}-" if spec.cross else ""
    return f"{prefix}gcc", f"{prefix}g++"


def _compiler_id(spec: Arch) -> str:
    cc = _compilers(spec)[0]
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise ArtifactError(f"{cc} is missing ({e}): apt-get install "
                            + ("gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" if spec.cross
                               else "build-essential")) from None


def recipe(arch: str, mode: str = "combined") -> dict:
    """Everything that decides the artifact's bits; its hash names the cache folder."""
    spec = arch_spec(arch)
    return {"recipe": RECIPE, "mode": mode, "arch": arch,
            "llama_cpp_python": versions.LLAMA_VERSION,
            "sdist_sha256": versions.LLAMA_SDIST_SHA256,
            "llama_cpp_commit": versions.LLAMA_CPP_COMMIT,
            "backend": versions.SCIKIT_BUILD_CORE, "compiler": _compiler_id(spec),
            "cmake_args": spec.cmake_args}


def _key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:12]


def _toolchain(spec: Arch, where: Path) -> list[str]:
    if not spec.cross:
        return []
    cc, cxx = _compilers(spec)
    path = where / f"toolchain-{spec.name}.cmake"
    path.write_text(
        "set(CMAKE_SYSTEM_NAME Linux)\n"
        f"set(CMAKE_SYSTEM_PROCESSOR {spec.name})\n"
        f"set(CMAKE_C_COMPILER {cc})\nset(CMAKE_CXX_COMPILER {cxx})\n"
        f"set(CMAKE_FIND_ROOT_PATH /usr/{spec.cross})\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)\n")
    return [f"-DCMAKE_TOOLCHAIN_FILE={path}"]


def _clean_env(jobs: int, **extra: str) -> dict:
    """Only what the compile needs: the caller's PIP_*, CFLAGS, CMAKE_* cannot leak in."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
           "LANG": "C.UTF-8", "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    env.update(extra)
    return env


def _unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tf.extractall(dest)
    (src,) = [p for p in dest.iterdir() if p.is_dir()]
    return src


def _cmake_cache(build: Path, name: str) -> str | None:
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.partition("=")[2]
    return None


def build_wheel(spec: Arch, src: Path, build: Path, out: Path, log: Path, jobs: int) -> Path:
    """Step 1: llama-cpp-python's own build (scikit-build-core), keeping its build tree."""
    venv = build_env(log)
    extra = {"CMAKE_ARGS": " ".join([*spec.cmake_args, *_toolchain(spec, build.parent)])}
    if spec.cross:
        extra["_PYTHON_HOST_PLATFORM"] = f"linux-{spec.name}"   # the wheel's platform tag
    out.mkdir(parents=True, exist_ok=True)
    _run([venv / "bin" / "python", "-c",
          "import sys; from scikit_build_core.build import build_wheel; "
          "print(build_wheel(sys.argv[1], {'build-dir': sys.argv[2]}))", out, build],
         log, cwd=src, env=_clean_env(jobs, **extra))
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    return wheel


# Included right after vendor/llama.cpp's project() (CMAKE_PROJECT_llama.cpp_INCLUDE): adds the
# server and its UI table to llama-cpp-python's own tree. Measured: no compile command of the
# existing targets changes, so only the server's 14 sources compile. (LLAMA_BUILD_TOOLS=ON
# would instead re-add tools/mtmd with other warning flags and rebuild it, and llama-cpp-python
# would have to drop its own mtmd; cmake_language(DEFER) may not add subdirectories.)
_SERVER_HOOK = """\
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/tools/ui ${CMAKE_CURRENT_BINARY_DIR}/tools/ui)
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/tools/server ${CMAKE_CURRENT_BINARY_DIR}/tools/server)
"""


def build_server_in_tree(spec: Arch, src: Path, build: Path, log: Path, jobs: int) -> Path:
    """Step 2: the wheel's configured tree, reconfigured with the hook above, then only the
    `llama-server` target: ggml, llama, common (with cpp-httplib) and mtmd are reused."""
    hook = build.parent / "add-llama-server.cmake"
    hook.write_text(_SERVER_HOOK)
    _run(["cmake", "-S", src, "-B", build, f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={hook}"], log,
         env=_clean_env(jobs))
    _run(["cmake", "--build", build, "--target", "llama-server", "-j", str(jobs)], log,
         env=_clean_env(jobs))
    server = build / "vendor" / "llama.cpp" / "tools" / "server" / "llama-server"
    if not server.is_file():
        raise ArtifactError(f"the build left no {server}; log {log}")
    return server


def build_server_standalone(spec: Arch, src: Path, build: Path, log: Path, jobs: int) -> Path:
    """The alternative measured by bench/artifacts_bench.py: a static llama-server from its own
    configure of vendor/llama.cpp (compiles ggml and llama a second time)."""
    _run(["cmake", "-S", src / "vendor" / "llama.cpp", "-B", build, "-G", "Ninja",
          "-DBUILD_SHARED_LIBS=OFF", *spec.cmake_args, *_toolchain(spec, build.parent)],
         log, env=_clean_env(jobs))
    _run(["cmake", "--build", build, "--target", "llama-server", "-j", str(jobs)], log,
         env=_clean_env(jobs))
    return build / "bin" / "llama-server"


def bundle_server(server: Path, build: Path, dest: Path, log: Path) -> Path:
    """llama-server plus the build-tree libraries it loads (transitively), stripped, each under
    the name the loader asks for (its SONAME) and with RUNPATH $ORIGIN, in `dest`."""
    dest.mkdir(parents=True)
    libs = {p.name: p.resolve() for p in build.rglob("*.so*")
            if ".so" in p.name and "CMakeFiles" not in p.parts and p.resolve().is_file()}
    strip = _cmake_cache(build, "CMAKE_STRIP") or "strip"
    todo, done = [("llama-server", server)], set()
    while todo:
        name, src = todo.pop()
        if name in done:
            continue
        done.add(name)
        target = dest / name
        shutil.copy2(src, target)
        _run([strip, "--strip-unneeded", target], log)
        info = elf_info(target)
        if info.runpath is not None:
            set_runpath(target)
        for lib in info.needed:
            if lib not in SYSTEM_LIBS:
                if lib not in libs:
                    raise ArtifactError(f"{name} needs {lib}, not found in {build}")
                todo.append((lib, libs[lib]))
    return dest / "llama-server"


def _file_record(path: Path) -> dict:
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}


def _valid(d: Path) -> dict | None:
    """The stamp of a complete, unmodified artifact folder, else None."""
    try:
        stamp = json.loads((d / "stamp.json").read_text())
        for rel, rec in stamp["files"].items():
            if sha256_of(d / rel) != rec["sha256"]:
                return None
        return stamp
    except (OSError, ValueError, KeyError):
        return None


def _artifacts(arch: str, d: Path, stamp: dict) -> Artifacts:
    return Artifacts(arch, d, d / stamp["wheel"], d / "llama-server", stamp)


def cached(arch: str) -> Artifacts | None:
    """The artifacts for `arch` if built with the current recipe, else None (never builds)."""
    d = _root(arch) / f"{versions.LLAMA_VERSION}-{_key(recipe(arch))}"
    stamp = _valid(d)
    return _artifacts(arch, d, stamp) if stamp else None


def build_into(arch: str, out: Path, work: Path, log: Path, mode: str = "combined",
               jobs: int | None = None) -> dict:
    """Build the wheel and llama-server for `arch` into `out` (which must not exist), using
    `work` for sources and build trees; returns the stamp. No caching: see ensure()."""
    spec = arch_spec(arch)
    jobs = jobs or os.cpu_count() or 2
    rec = recipe(arch, mode)
    started = time.monotonic()
    seconds, cpu = {}, {}

    def cpu_now():   # CPU seconds of finished child processes (compilers included)
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpu0, load0 = cpu_now(), os.getloadavg()[0]
    src = _unpack(sdist(log), work / "src")
    t = time.monotonic()
    seconds["unpack"] = round(t - started, 1)
    c = cpu_now()
    wheel = build_wheel(spec, src, work / "build", work / "wheel", log, jobs)
    seconds["wheel"] = round(time.monotonic() - t, 1)
    cpu["wheel"] = round(cpu_now() - c, 1)
    t, c = time.monotonic(), cpu_now()
    if mode == "combined":
        server = build_server_in_tree(spec, src, work / "build", log, jobs)
        server_build = work / "build"
    elif mode == "separate":
        server = build_server_standalone(spec, src, work / "build-server", log, jobs)
        server_build = work / "build-server"
    else:
        raise ArtifactError(f"unknown mode {mode!r}")
    seconds["server"] = round(time.monotonic() - t, 1)
    cpu["server"] = round(cpu_now() - c, 1)
    out.mkdir(parents=True)
    shutil.copy2(wheel, out / wheel.name)
    bundle_server(server, server_build, out / "llama-server", log)
    problems = wheel_problems(out / wheel.name, arch) + server_problems(out / "llama-server", arch)
    if problems:
        raise ArtifactError("built artifacts fail their checks:\n  " + "\n  ".join(problems))
    if not spec.cross:
        _run([out / "llama-server" / "llama-server", "--version"], log)
    seconds["total"] = round(time.monotonic() - started, 1)
    cpu["total"] = round(cpu_now() - cpu0, 1)
    files = {wheel.name: _file_record(out / wheel.name)}
    for f in sorted((out / "llama-server").iterdir()):
        files[f"llama-server/{f.name}"] = _file_record(f)
    stamp = {**rec, "key": _key(rec), "wheel": wheel.name, "seconds": seconds,
             "cpu_seconds": cpu, "load_at_start": round(load0, 2), "jobs": jobs,
             "cpus": os.cpu_count(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "max_glibc": max((v for v in (max_symbol_version(out / n) for n in files
                                           if not n.endswith(".whl")) if v),
                              key=lambda v: _version_tuple(v.partition("_")[2]), default=None),
             "files": files}
    tmp = out / "stamp.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "stamp.json")
    return stamp


def ensure(arch: str, *, quiet: bool = False) -> Artifacts:
    """The wheel and llama-server for `arch`, built once (minutes) and cached."""
    spec = arch_spec(arch)
    root = _root(arch)
    rec = recipe(arch)
    final = root / f"{versions.LLAMA_VERSION}-{_key(rec)}"
    stamp = _valid(final)
    if stamp:
        return _artifacts(arch, final, stamp)
    with _Lock(root / ".lock"):
        stamp = _valid(final)      # another caller may have built it while we waited
        if stamp:
            return _artifacts(arch, final, stamp)
        log = _log_path(arch)
        log.parent.mkdir(parents=True, exist_ok=True)
        minutes = EXPECTED_SECONDS[arch] * 2 / (os.cpu_count() or 2) / 60
        if not quiet:
            print(f"artifacts: building llama-cpp-python {versions.LLAMA_VERSION} wheel and "
                  f"llama-server for {arch}{' (cross-compiled)' if spec.cross else ''}: about "
                  f"{minutes:.0f} minutes on {os.cpu_count()} cores; log {log}",
                  file=sys.stderr, flush=True)
        with open(log, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} build {final.name}: "
                    f"{json.dumps(rec, sort_keys=True)}\n")
        work = root / f".build-{final.name}"
        shutil.rmtree(work, ignore_errors=True)     # a killed build's leftovers
        work.mkdir(parents=True)
        out = work / "out"
        stamp = build_into(arch, out, work, log)
        if final.exists():     # a corrupt or half-copied folder from an older tool
            shutil.rmtree(final)
        os.rename(out, final)
        shutil.rmtree(work)
        if not quiet:
            print(f"artifacts: {arch} built in {stamp['seconds']['total']:.0f} s -> {final}",
                  file=sys.stderr, flush=True)
    return _artifacts(arch, final, stamp)


# --- running the server (smoke checks, before deploying) -----------------------------------------

def server_command(arch: str, server: Path) -> tuple[list[str], dict]:
    """argv prefix and extra environment to run `arch`'s llama-server on this machine: directly
    on its own arch, else under qemu-user (`apt-get install qemu-user-static`) with the cross
    toolchain's libc as the sysroot and the oldest CPU the build targets (a Pi 4's)."""
    spec = arch_spec(arch)
    if os.uname().machine == arch:
        return [str(server)], {}
    qemu = shutil.which(f"qemu-{arch}-static") or shutil.which(f"qemu-{arch}")
    if not qemu:
        raise ArtifactError(f"no qemu-{arch}-static to run the {arch} llama-server here: "
                            "apt-get install qemu-user-static")
    env = {"QEMU_CPU": spec.qemu_cpu} if spec.qemu_cpu else {}
    return [qemu, "-L", f"/usr/{spec.cross}", str(server)], env


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def serve(arch: str, server: Path, model: Path, *args: str, timeout: float = 600,
          log: Path | None = None):
    """Run llama-server on `model` on a free loopback port until /health says 200; yields
    (base URL, Popen). Extra `args` go to the server (-c, -np, --metrics...)."""
    port = _free_port()
    prefix, extra_env = server_command(arch, server)
    cmd = [*prefix, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **extra_env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ArtifactError(f"llama-server exited {proc.returncode} before it was "
                                    f"ready: {' '.join(cmd)}" + (f"; log {log}" if log else ""))
            try:
                if _http(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ArtifactError(f"llama-server not ready in {timeout:.0f} s: {' '.join(cmd)}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def server_version(arch: str, server: Path) -> str:
    prefix, env = server_command(arch, server)
    r = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    if r.returncode != 0:
        raise ArtifactError(f"llama-server --version failed ({r.returncode}): {r.stderr[-2000:]}")
    return (r.stdout + r.stderr).strip()


def missing_server_flags(arch: str, server: Path) -> list[str]:
    """Which of SERVER_FLAGS (what the engine passes) llama-server's --help does not list."""
    prefix, env = server_command(arch, server)
    r = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    words = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][a-z0-9-]*)", r.stdout + r.stderr))
    return [f for f in SERVER_FLAGS if f not in words]


def smoke(arch: str, model: Path, n_predict: int = 8, timeout: float = 600) -> dict:
    """Start the cached llama-server for `arch` on `model`, wait for /health, one completion."""
    a = cached(arch)
    if a is None:
        raise ArtifactError(f"{arch} artifacts are not built: python -m neverdark.artifacts "
                            f"build --arch {arch}")
    t = time.monotonic()
    with serve(arch, a.server, model, "-c", "2048", "-np", "1", "-t", str(os.cpu_count() or 2),
               timeout=timeout) as (url, _):
        ready = time.monotonic() - t
        status, body = _http(url + "/completion", {"prompt": "The capital of France is",
                                                   "n_predict": n_predict}, timeout=timeout)
    if status != 200:
        raise ArtifactError(f"/completion answered {status}: {body[:500]!r}")
    reply = json.loads(body)
    return {"arch": arch, "ready_s": round(ready, 1), "content": reply.get("content"),
            "tokens_predicted": reply.get("tokens_predicted"),
            "version": server_version(arch, a.server)}


# --- wheelhouse ----------------------------------------------------------------------------------

HOST_REQUIREMENTS = ([*versions.LLAMA_REQUIREMENTS, *versions.HERMES_REQUIREMENTS,
                      *versions.SIDECAR_REQUIREMENTS] if versions else [])


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
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], log)


def wheelhouse_digest(arch: str, requirements: list[str], art: Artifacts | None) -> str:
    """What a wheelhouse stamp is keyed by: arch, requirements, the llama wheel's sha256."""
    return hashlib.sha256(json.dumps(
        [arch, sorted(requirements), art.stamp["files"][art.wheel.name]["sha256"] if art else None]
    ).encode()).hexdigest()


def wheelhouse(arch: str, dest: Path, requirements: list[str] | None = None) -> Path:
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
    art = ensure(arch) if llama else None
    digest = wheelhouse_digest(arch, reqs, art)
    stamp = dest / f".neverdark-wheelhouse-{arch}"
    if wheelhouse_complete(dest, arch, digest):
        return dest
    log = _log_path(f"wheelhouse-{arch}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(dest / ".lock"):
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


# --- CLI -----------------------------------------------------------------------------------------

def _show(arch: str) -> str:
    try:
        a = cached(arch)
    except ArtifactError as e:     # e.g. no cross compiler here to name the recipe by
        return f"{arch}: cannot tell ({e})"
    if a is None:
        return f"{arch}: not built (python -m neverdark.artifacts build --arch {arch})"
    s = a.stamp
    size = sum(r["bytes"] for n, r in s["files"].items() if n.startswith("llama-server/"))
    return (f"{arch}: {a.dir}\n  wheel  {a.wheel.name} ({s['files'][a.wheel.name]['bytes'] / 1e6:.1f} MB)\n"
            f"  server {a.server} (bundle {size / 1e6:.1f} MB)\n"
            f"  built {s['built_at']} in {s['seconds']['total']:.0f} s "
            f"(wheel {s['seconds']['wheel']:.0f} s, server {s['seconds']['server']:.0f} s; "
            f"CPU {s.get('cpu_seconds', {}).get('total', 0):.0f} s) "
            f"on {s['cpus']} cores; needs up to {s['max_glibc']}\n"
            f"  flags {' '.join(s['cmake_args'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neverdark.artifacts", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the wheel and llama-server per arch")
    b.add_argument("--arch", action="append", choices=list(ARCHES))
    b.add_argument("--wheelhouse", type=Path, help="also fill this wheelhouse for each arch")
    sub.add_parser("show", help="what is cached")
    sm = sub.add_parser("smoke", help="run the built llama-server (qemu-user for a foreign "
                        "arch) on a GGUF: /health, one completion")
    sm.add_argument("--arch", action="append", choices=list(ARCHES))
    sm.add_argument("--model", type=Path, required=True)
    c = sub.add_parser("check", help="check a wheel, a folder of ELF files (a llama-server "
                       "bundle, an installed llama_cpp/lib) or one ELF file")
    c.add_argument("--arch", default=os.uname().machine, choices=list(ARCHES))
    c.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            for arch in args.arch or [os.uname().machine]:
                ensure(arch)
                if args.wheelhouse:
                    wheelhouse(arch, args.wheelhouse)
                print(_show(arch))
        elif args.cmd == "smoke":
            for arch in args.arch or [os.uname().machine]:
                print(json.dumps(smoke(arch, args.model)))
        elif args.cmd == "show":
            for arch in ARCHES:
                print(_show(arch))
        else:
            problems = []
            for path in args.paths:
                if path.is_dir():
                    problems += bundle_problems(path, args.arch)
                elif path.name.endswith(".whl"):
                    problems += wheel_problems(path, args.arch)
                else:   # its neighbours count as bundled (reached by RUNPATH $ORIGIN)
                    problems += elf_problems(path, args.arch,
                                             {p.name for p in path.parent.iterdir()})
            print("\n".join(problems) or f"ok: {len(args.paths)} path(s) fit a Debian 12 "
                  f"{args.arch} host")
            return 1 if problems else 0
    except ArtifactError as e:
        print(f"artifacts: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
