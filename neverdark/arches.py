"""The CPU architectures neverdark deploys to: one table, read by the artifact builds (compilers,
CMake flags), the ELF checks (e_machine), the deploy's host check (`uname -m`, Debian's name)
and the test fleet (mmdebstrap, qemu-user). Stdlib only.

Why these flags (the bits every host of an arch runs):
- x86_64: `GGML_NATIVE=OFF` with `GGML_SSE42 GGML_AVX GGML_AVX2 GGML_BMI2 GGML_FMA GGML_F16C`
  on, i.e. the x86-64-v3 level (Intel Haswell 2013+, AMD Zen 1+). Why not native: the runner is
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
  break it), cross-compiled (an emulated compile would take hours).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


class UnknownArch(ValueError):
    pass


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


ARCHES = {
    "x86_64": Arch("x86_64", 62, None,
                   ("-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
                    "-DGGML_BMI2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"),
                   ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"), debian="amd64"),
    "aarch64": Arch("aarch64", 183, "aarch64-linux-gnu",
                    ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"),
                    ("asimd",), qemu_cpu="cortex-a72", debian="arm64"),
}


def arch_spec(arch: str) -> Arch:
    try:
        return ARCHES[arch]
    except KeyError:
        raise UnknownArch(f"unknown arch {arch!r}: one of {', '.join(ARCHES)}") from None


def host_cpu_problems(arch: str, cpuinfo: str | None = None) -> list[str]:
    """CPU features the build for `arch` needs that /proc/cpuinfo (or `cpuinfo`) does not list."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    have = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have |= set(value.split())
    return [f for f in arch_spec(arch).cpu_features if f not in have]
