"""ELF and wheel checks: would a built file run on a Debian 12 / Raspberry Pi OS Bookworm host
of its arch? Stdlib only (a host can run them: `python -m neverdark.artifacts check PATH`).

What is checked: the ELF machine, every DT_NEEDED library (bundled beside the file and reached
by RUNPATH $ORIGIN, or one of the base system's), and every versioned symbol against what the
host's glibc and libstdc++ provide. `set_runpath` rewrites a build tree's RUNPATH to $ORIGIN.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import tempfile
import zipfile
from pathlib import Path

from neverdark.arches import arch_spec
from neverdark.artifacts.errors import ArtifactError

# What a Debian 12 / Pi OS Bookworm host provides: glibc 2.36, GCC 12's libstdc++.
HOST_SYMBOL_LIMITS = {"GLIBC": (2, 36), "GLIBCXX": (3, 4, 30), "CXXABI": (1, 3, 13)}
# The only libraries an artifact may take from the host system.
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0",
               "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}


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


def version_tuple(text: str) -> tuple[int, ...]:
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
            if limit and re.fullmatch(r"[0-9.]+", ver) and version_tuple(ver) > limit:
                problems.append(f"{path}: needs {name} from {lib}; Debian 12 has up to "
                                f"{prefix}_{'.'.join(map(str, limit))}")
    return problems


def max_symbol_version(path: Path, prefix: str = "GLIBC") -> str | None:
    found = [n.partition("_")[2] for names in elf_info(path).versions.values() for n in names
             if n.startswith(prefix + "_") and re.fullmatch(r"[0-9.]+", n.partition("_")[2])]
    return f"{prefix}_{max(found, key=version_tuple)}" if found else None


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


