"""How the host artifacts are compiled, from the pinned llama-cpp-python sdist (whose
`vendor/llama.cpp` is llama.cpp `versions.LLAMA_CPP_COMMIT`), in two parts:

- `wheel`: llama-cpp-python's own build (scikit-build-core), trimmed to what its Python code
  loads: ggml and llama. Not built: llama.cpp's `common` library (with cpp-httplib, ~45% of the
  old wheel's compile) and `mtmd` (the multimodal/llava library), which llama_cpp imports only
  for its vision chat handlers (`Llava15ChatHandler`...), which no neverdark host uses
  (`LLAVA_BUILD=OFF`, and `LLAMA_BUILD_COMMON` off through a CMake hook: llama-cpp-python
  forces it on). The duplicate libraries, headers and CMake files llama.cpp's own install
  rules put beside `llama_cpp/` are left out of the wheel (nothing on a host loads them).
- `server`: llama.cpp's `llama-server`, from the *same* configured tree: it is reconfigured
  with `LLAVA_BUILD=ON` and a hook (`CMAKE_PROJECT_llama.cpp_INCLUDE`) adding tools/server and
  tools/ui, and only the `llama-server` target is built: ggml and llama are the wheel's, common,
  cpp-httplib and mtmd (which the server links) compile now. Its shared libraries are bundled
  beside it with RUNPATH `$ORIGIN`.

A host that runs only llama-cpp-python needs only the wheel; one whose model uses `engine:
llama-server`, the server (`neverdark.artifacts.needed()` reads that from the inventory).
The wheel's build tree is kept until the server is built, so adding the server later costs
only what the server adds.

Flags (both arches): Release, `GGML_OPENMP=OFF` (ggml's own thread pool; a minimal host has no
libgomp.so.1), `GGML_CCACHE=OFF`, `LLAMA_OPENSSL=OFF` (llama-cpp-python already forces
`LLAMA_CURL=OFF`), `LLAMA_USE_PREBUILT_UI=OFF LLAMA_BUILD_UI=OFF` (no web UI download or npm
build: the build never touches the network), tests and examples off; the arch's own flags are
in neverdark.arches. aarch64 is cross-compiled with Debian's `gcc-aarch64-linux-gnu
g++-aarch64-linux-gnu` through a CMake toolchain file and `_PYTHON_HOST_PLATFORM=linux-aarch64`.

Why one tree, not a static llama-server of its own (measured, recipe 1): the server alone from
its own configure compiled ggml and llama a second time, 366-403 s against 36-62 s added to
the wheel's tree. ccache between the two was not taken: the wheel's objects are built shared
(-fPIC, -DGGML_SHARED...) and a static server's are not, so they would not hit.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from neverdark import versions
from neverdark.arches import Arch, arch_spec
from neverdark.artifacts import elf
from neverdark.artifacts.errors import ArtifactError

RECIPE = 2          # bump when the build steps change in a way the flags below do not show
PARTS = ("wheel", "server")

COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)

# Wall seconds of each part, cold, on 2 idle cores: the CPU seconds measured by
# bench/artifacts_bench.py (docs/artifacts.md) over 2 cores, plus ~10% for single-job steps.
# The note printed before a build scales them by the core count; other work beside it, or the
# other arch built at the same time, can double them.
EXPECTED_SECONDS = {"x86_64": {"wheel": 145, "server": 280},
                    "aarch64": {"wheel": 135, "server": 260}}

# What no host loads, left out of the wheel (gitignore syntax): llama.cpp's own install rules
# put second copies of the libraries, headers, CMake and pkg-config files beside llama_cpp/,
# and each library in llama_cpp/lib/ comes three times (libx.so, libx.so.0, libx.so.0.5.0:
# ctypes loads libx.so, the loader the SONAME libx.so.0, nothing the full version).
# elf.wheel_problems() checks that every library llama_cpp/lib/ needs is still there.
WHEEL_EXCLUDE = ["/lib/", "/include/", "/bin/", "/llama_cpp/lib/*.so.*.*"]

# Included right after vendor/llama.cpp's project(): the wheel's tree leaves out llama.cpp's
# common library (llama-cpp-python forces the cache variable on; a normal variable shadows it,
# and llama.cpp's option() honours that, CMP0077).
_WHEEL_HOOK = "set(LLAMA_BUILD_COMMON OFF)\n"
# The same place, for the server: adds the server and its UI table to the tree. Measured: no
# compile command of the wheel's targets changes. (LLAMA_BUILD_TOOLS=ON would instead add
# tools/mtmd a second time with other warning flags; cmake_language(DEFER) may not add
# subdirectories.)
_SERVER_HOOK = """\
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/tools/ui ${CMAKE_CURRENT_BINARY_DIR}/tools/ui)
add_subdirectory(${CMAKE_CURRENT_SOURCE_DIR}/tools/server ${CMAKE_CURRENT_BINARY_DIR}/tools/server)
"""


def cmake_args(spec: Arch) -> list[str]:
    return [*COMMON_FLAGS, *spec.flags]


def run(cmd: list, log: Path, *, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 7200) -> None:
    """Run `cmd` with its output appended to `log`; a failure raises with the log's tail."""
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


def compilers(spec: Arch) -> tuple[str, str]:
    prefix = f"{spec.cross}-" if spec.cross else ""
    return f"{prefix}gcc", f"{prefix}g++"


def compiler_id(spec: Arch) -> str:
    cc = compilers(spec)[0]
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as e:
        raise ArtifactError(f"{cc} is missing ({e}): apt-get install "
                            + ("gcc-aarch64-linux-gnu g++-aarch64-linux-gnu" if spec.cross
                               else "build-essential")) from None


def recipe(arch: str) -> dict:
    """Everything that decides the artifacts' bits; its hash names the cache folder."""
    spec = arch_spec(arch)
    return {"recipe": RECIPE, "arch": arch,
            "llama_cpp_python": versions.LLAMA_VERSION,
            "sdist_sha256": versions.LLAMA_SDIST_SHA256,
            "llama_cpp_commit": versions.LLAMA_CPP_COMMIT,
            "backend": versions.SCIKIT_BUILD_CORE, "compiler": compiler_id(spec),
            "cmake_args": cmake_args(spec)}


def _toolchain(spec: Arch, where: Path) -> list[str]:
    if not spec.cross:
        return []
    cc, cxx = compilers(spec)
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


def unpack(archive: Path, dest: Path) -> Path:
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


def _hook(build: Path, name: str, text: str) -> str:
    path = build.parent / name
    path.write_text(text)
    return f"-DCMAKE_PROJECT_llama.cpp_INCLUDE={path}"


def build_wheel(spec: Arch, src: Path, build: Path, out: Path, log: Path, jobs: int,
                venv: Path) -> Path:
    """The `wheel` part: llama-cpp-python's own build (scikit-build-core, from `venv`) into
    `out`, keeping its build tree in `build`."""
    args = [*cmake_args(spec), *_toolchain(spec, build.parent), "-DLLAVA_BUILD=OFF",
            _hook(build, "wheel-hook.cmake", _WHEEL_HOOK)]
    extra = {"CMAKE_ARGS": " ".join(args)}
    if spec.cross:
        extra["_PYTHON_HOST_PLATFORM"] = f"linux-{spec.name}"   # the wheel's platform tag
    out.mkdir(parents=True, exist_ok=True)
    run([venv / "bin" / "python", "-c",
         "import sys; from scikit_build_core.build import build_wheel; "
         "print(build_wheel(sys.argv[1], {'build-dir': sys.argv[2], "
         "'wheel.exclude': sys.argv[3:]}))", out, build, *WHEEL_EXCLUDE],
        log, cwd=src, env=_clean_env(jobs, **extra))
    (wheel,) = out.glob("llama_cpp_python-*.whl")
    return wheel


def build_server(spec: Arch, src: Path, build: Path, log: Path, jobs: int) -> Path:
    """The `server` part, in the wheel's configured tree (see the module's docstring)."""
    run(["cmake", "-S", src, "-B", build, "-DLLAVA_BUILD=ON",
         _hook(build, "server-hook.cmake", _SERVER_HOOK)], log, env=_clean_env(jobs))
    run(["cmake", "--build", build, "--target", "llama-server", "-j", str(jobs)], log,
        env=_clean_env(jobs))
    server = build / "vendor" / "llama.cpp" / "tools" / "server" / "llama-server"
    if not server.is_file():
        raise ArtifactError(f"the build left no {server}; log {log}")
    return server


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
        run([strip, "--strip-unneeded", target], log)
        info = elf.elf_info(target)
        if info.runpath is not None:
            elf.set_runpath(target)
        for lib in info.needed:
            if lib not in elf.SYSTEM_LIBS:
                if lib not in libs:
                    raise ArtifactError(f"{name} needs {lib}, not found in {build}")
                todo.append((lib, libs[lib]))
    return dest / "llama-server"


def _cpu_now() -> float:
    """CPU seconds of finished child processes (the compilers included)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build_parts(arch: str, work: Path, out: Path, log: Path, *, server: bool,
                sdist: Callable[[], Path], venv: Callable[[], Path],
                jobs: int | None = None) -> dict:
    """Build in `work`: the wheel, unless a configured tree from an earlier build is there
    (`work/tree.ok`), and, if `server`, llama-server from that tree. Into `out`: `<wheel>` (if
    built) and `llama-server/`, each checked (neverdark.artifacts.elf). `sdist` and `venv`
    give the source archive and the scikit-build-core venv, asked for only to build the wheel.
    Returns {"wheel": its name or None, "seconds": {step: s}, "cpu_seconds": {step: s}}. No
    caching: see neverdark.artifacts.cache.ensure()."""
    spec = arch_spec(arch)
    jobs = jobs or os.cpu_count() or 2
    seconds, cpu, wheel_name = {}, {}, None
    ok = work / "tree.ok"
    out.mkdir(parents=True, exist_ok=True)
    if not ok.is_file():
        t = time.monotonic()
        for stale in ("src", "build", "wheel"):
            shutil.rmtree(work / stale, ignore_errors=True)
        src = unpack(sdist(), work / "src")
        seconds["unpack"] = round(time.monotonic() - t, 1)
        t, c = time.monotonic(), _cpu_now()
        wheel = build_wheel(spec, src, work / "build", work / "wheel", log, jobs, venv())
        seconds["wheel"], cpu["wheel"] = round(time.monotonic() - t, 1), round(_cpu_now() - c, 1)
        problems = elf.wheel_problems(wheel, arch)
        if problems:
            raise ArtifactError("the wheel fails its checks:\n  " + "\n  ".join(problems))
        shutil.copy2(wheel, out / wheel.name)
        wheel_name = wheel.name
        ok.write_text(wheel.name + "\n")
    (src,) = [p for p in (work / "src").iterdir() if p.is_dir()]
    if server:
        t, c = time.monotonic(), _cpu_now()
        binary = build_server(spec, src, work / "build", log, jobs)
        bundle = out / "llama-server"
        bundle_server(binary, work / "build", bundle, log)
        problems = elf.server_problems(bundle, arch)
        if problems:
            raise ArtifactError("llama-server fails its checks:\n  " + "\n  ".join(problems))
        if not spec.cross:
            run([bundle / "llama-server", "--version"], log)
        seconds["server"], cpu["server"] = round(time.monotonic() - t, 1), round(_cpu_now() - c, 1)
    return {"wheel": wheel_name, "seconds": seconds, "cpu_seconds": cpu}


def max_glibc(paths) -> str | None:
    """The newest GLIBC_ symbol version any of the ELF files `paths` asks for."""
    found = [v for v in (elf.max_symbol_version(p) for p in paths) if v]
    return max(found, key=lambda v: elf.version_tuple(v.partition("_")[2]), default=None)

