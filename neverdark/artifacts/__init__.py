"""Host artifacts, built once on the operator's machine: per architecture, the llama-cpp-python
wheel, the native `llama-server` and a wheelhouse for hosts without a package index.

llama-cpp-python has no wheel on PyPI, and a host (a VPS, a Raspberry Pi) has no compiler. So
the operator's machine (x86_64 Debian 12, or anything with the same toolchain) compiles them
from the pinned sdist, for each arch in neverdark.arches (aarch64 cross-compiled), and the
deploy uploads what each host runs:

- the wheel `llama_cpp_python-<v>-py3-none-linux_<arch>.whl`, for hosts whose models use
  llama-cpp-python;
- `llama-server/`: llama.cpp's own server from the *same* build tree, with the shared
  libraries it links beside it (RUNPATH `$ORIGIN`: deploy the folder as a whole), for hosts
  whose models use `engine: llama-server`.

    python -m neverdark.artifacts build [--arch A]... [--part wheel|server]... [--wheelhouse DIR]
    python -m neverdark.artifacts build --inventory fleet.yaml   # what that fleet's hosts run
    python -m neverdark.artifacts show
    python -m neverdark.artifacts smoke --arch aarch64 --model M.gguf   # qemu-user if foreign
    python -m neverdark.artifacts check PATH...      # ELF/wheel checks, stdlib only (hosts too)

The modules: `build` (the recipe and compile steps), `cache` (ensure/cached: built once under
$NEVERDARK_CACHE, keyed by every input), `elf` (would it run on a Debian 12 host of that arch),
`smoke` (run a built server here), `wheelhouse`, `__main__` (the command line). This package
re-exports what the rest of neverdark, the test bench and the benchmarks use.
"""

from neverdark.arches import ARCHES, Arch, arch_spec, host_cpu_problems
from neverdark.artifacts import build, cache, elf, smoke, wheelhouse
from neverdark.artifacts.cache import (CACHE, ENGINE_PART, PARTS, Artifacts, build_env, cached,
                                       ensure, needed, sdist, sha256_of)
from neverdark.artifacts.elf import (HOST_SYMBOL_LIMITS, SYSTEM_LIBS, bundle_problems, elf_info,
                                     elf_problems, max_symbol_version, server_problems,
                                     set_runpath, version_tuple, wheel_problems)
from neverdark.artifacts.errors import ArtifactError
from neverdark.artifacts.smoke import (_http, missing_server_flags, serve, server_command,
                                       server_version)
from neverdark.artifacts.wheelhouse import (HOST_REQUIREMENTS, wheelhouse_complete,
                                            wheelhouse_digest, wheelhouse_missing)

__all__ = [
    "ARCHES", "Arch", "arch_spec", "host_cpu_problems", "build", "cache", "elf", "smoke",
    "wheelhouse", "CACHE", "ENGINE_PART", "PARTS", "Artifacts", "build_env", "cached", "ensure", "needed",
    "sdist", "sha256_of", "HOST_SYMBOL_LIMITS", "SYSTEM_LIBS", "bundle_problems", "elf_info",
    "elf_problems", "max_symbol_version", "server_problems", "set_runpath", "version_tuple",
    "wheel_problems", "ArtifactError", "_http", "missing_server_flags", "serve",
    "server_command", "server_version", "HOST_REQUIREMENTS", "wheelhouse_complete",
    "wheelhouse_digest", "wheelhouse_missing",
]
