"""Read a GGUF model's metadata header on the operator's machine (standard library only).

What the inventory checks need from a model file without loading it: its architecture, the
context it was trained for (`<arch>.context_length`: llama.cpp's native server caps every slot
there), and the KV layout the memory fit prices (block count, KV heads, key length, sliding
window). Array values (the tokenizer's 262K strings) are skipped, not read: a header of a few
megabytes is scanned in milliseconds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    context_length: int | None     # what the model was trained for
    block_count: int | None
    head_count_kv: int | None
    key_length: int | None
    sliding_window: int | None

    @property
    def has_sliding_window(self) -> bool:
        return bool(self.sliding_window)


class _Reader:
    def __init__(self, f) -> None:
        self.f = f

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("truncated header")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise GGUFError(f"implausible string length {n}")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.unpack("<Q"), 1)

    def value(self, kind: int, keep: bool):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item]) * n, 1)
            else:
                for _ in range(n):
                    self.value(item, keep=False)
            return None
        raise GGUFError(f"unknown value type {kind}")


def read(path: str | Path) -> GGUFInfo:
    """The metadata the checks use; GGUFError for a file that is not GGUF (or is cut short)."""
    path = Path(path)
    meta: dict[str, object] = {}
    with open(path, "rb") as f:
        r = _Reader(f)
        if r.take(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        version = r.unpack("<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        r.unpack("<Q")                 # tensor count
        n_kv = r.unpack("<Q")
        for _ in range(n_kv):
            key = r.string()
            kind = r.unpack("<I")
            # Only the small scalars and strings outside the tokenizer are worth keeping.
            meta[key] = r.value(kind, keep=not key.startswith("tokenizer."))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: no general.architecture in the header")

    def num(key: str) -> int | None:
        v = meta.get(f"{arch}.{key}")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return GGUFInfo(path, arch, num("context_length"), num("block_count"),
                    num("attention.head_count_kv"), num("attention.key_length"),
                    num("attention.sliding_window"))
