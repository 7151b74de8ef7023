"""Read a GGUF model's metadata header on the operator's machine (standard library only).

Everything an inventory's model block needs from a file without loading it: the architecture,
the context it was trained for (`<arch>.context_length`: llama.cpp's native server caps every
slot there), the KV layout the memory fit prices (block count, KV heads, key length, sliding
window and, where the header says, which layers use it) and the chat templates
(`tokenizer.chat_template` and the named ones, `tokenizer.chat_template.<name>`).

The header is untrusted input (a download, a file from anywhere): every length is checked
against the file's size before it is used, strings and arrays are bounded, nesting is bounded,
and anything malformed is a GGUFError naming what and where, never a crash or a long loop. The
tokenizer's arrays (262K strings for Gemma) are skipped, not read: a header of a few megabytes
is scanned in well under a second.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}

# Bounds far above any real model's header, so a hostile one fails fast and in bounded memory.
MAX_KEYS = 1 << 16             # metadata entries (real models: 20-60)
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24     # a kept string, e.g. a chat template (real ones: 1-20 KB)
MAX_KEPT_ARRAY = 1 << 12       # a small array kept (per-layer values); larger ones are skipped
MAX_DEPTH = 4                  # arrays of arrays
MAX_HEADER_BYTES = 1 << 30     # where the metadata must end

CHAT_TEMPLATE = "tokenizer.chat_template"


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    size: int                       # bytes of the whole file
    version: int
    architecture: str
    name: str | None                # general.name
    context_length: int | None      # what the model was trained for
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None       # the largest, when the header gives one per layer
    key_length: int | None          # per head; <arch>.attention.key_length
    value_length: int | None
    key_length_swa: int | None      # sliding-window layers' own head size (Gemma 4)
    embedding_length: int | None
    sliding_window: int | None
    sliding_window_pattern: int | tuple[bool, ...] | None   # the header's own, if it has one
    chat_template: str | None       # tokenizer.chat_template
    named_templates: tuple[tuple[str, str], ...] = field(default=())   # (name, template)
    metadata: tuple[tuple[str, object], ...] = field(default=(), repr=False)

    @property
    def has_sliding_window(self) -> bool:
        return bool(self.sliding_window)

    @property
    def head_dim(self) -> int | None:
        """Key length per head: llama.cpp's n_embd_head_k, embedding / heads when not given."""
        if self.key_length:
            return self.key_length
        if self.embedding_length and self.head_count:
            return self.embedding_length // self.head_count
        return None

    def get(self, key: str, default=None):
        return dict(self.metadata).get(key, default)


class _Reader:
    def __init__(self, f, size: int, where: str) -> None:
        self.f, self.size, self.where = f, size, where

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.where}: {what} (at byte {self.f.tell()})")

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise self.fail(f"truncated header: {n} more bytes needed, the file ends first")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("truncated header")
        return data

    def skip(self, n: int) -> None:
        if n > self.size - self.f.tell():
            raise self.fail(f"truncated header: a value of {n} bytes runs past the end of "
                            "the file")
        self.f.seek(n, 1)
        if self.f.tell() > MAX_HEADER_BYTES:
            raise self.fail(f"metadata runs past {MAX_HEADER_BYTES} bytes: not a model header")

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int, what: str) -> str:
        n = self.unpack("<Q")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit} a header may hold")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason} at its byte {e.start})") from None

    def value(self, kind: int, keep: bool, key: str, depth: int = 0):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string(MAX_STRING_BYTES, f"the value of {key}")
            self.skip(self.unpack("<Q"))
            return None
        if kind == _ARRAY:
            if depth >= MAX_DEPTH:
                raise self.fail(f"{key}: arrays nested more than {MAX_DEPTH} deep")
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item in _SCALARS:
                width = struct.calcsize(_SCALARS[item])
                if n > (self.size - self.f.tell()) // width:
                    raise self.fail(f"truncated header: {key} holds {n} values, more than "
                                    "the rest of the file")
                if keep and n <= MAX_KEPT_ARRAY:
                    return tuple(self.unpack(_SCALARS[item]) for _ in range(n))
                self.skip(width * n)
                return None
            if item not in (_STRING, _ARRAY):
                raise self.fail(f"{key}: unknown array item type {item}")
            # Every item takes at least 8 bytes (a length), so this loop ends at the file's end.
            if n > (self.size - self.f.tell()) // 8:
                raise self.fail(f"truncated header: {key} holds {n} items, more than the rest "
                                "of the file")
            kept = keep and item == _STRING and n <= MAX_KEPT_ARRAY
            out = [self.value(item, kept, key, depth + 1) for _ in range(n)]
            return tuple(out) if kept else None
        raise self.fail(f"{key}: unknown value type {kind}")


def _keep(key: str) -> bool:
    """The tokenizer's own arrays are skipped; its chat templates and everything else kept."""
    return not key.startswith("tokenizer.") or key.startswith(CHAT_TEMPLATE)


def read_metadata(path: str | Path) -> tuple[int, dict[str, object]]:
    """(version, metadata) of a GGUF file; GGUFError for anything that is not a sound header."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise GGUFError(f"{path} is a directory, not a GGUF file") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size, str(path))
        if size < 4 or f.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        f.seek(4)
        version = r.unpack("<I")
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old")
        if version > 3:
            raise GGUFError(f"{path}: GGUF version {version} is newer than this reader knows "
                            "(2 and 3)")
        r.unpack("<Q")                 # tensor count
        n_kv = r.unpack("<Q")
        if n_kv > MAX_KEYS:
            raise r.fail(f"{n_kv} metadata entries: not a model header")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string(MAX_KEY_BYTES, "a metadata key")
            kind = r.unpack("<I")
            meta[key] = r.value(kind, _keep(key), key)
    return version, meta


def _int(meta: dict, key: str, where: str) -> int | None:
    """An integer value, the largest of a per-layer array; GGUFError for any other type."""
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool)
                                          for x in v):
        v = max(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise GGUFError(f"{where}: {key} is {_kind(v)}, not an integer")
    if v < 0:
        raise GGUFError(f"{where}: {key} is negative ({v})")
    return v


def _kind(v: object) -> str:
    if isinstance(v, tuple):
        return "an array"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(v), type(v).__name__)


def _template(meta: dict, key: str, where: str) -> str | None:
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise GGUFError(f"{where}: {key} is {_kind(v)}, not a string: a chat template is "
                        "Jinja text")
    return v


def read(path: str | Path) -> GGUFInfo:
    """The header's facts; GGUFError for a file that is not GGUF, is cut short or holds values
    of the wrong type where a model block needs them."""
    path = Path(path)
    version, meta = read_metadata(path)
    where = str(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{where}: no general.architecture in the header")
    name = meta.get("general.name")

    def num(key: str) -> int | None:
        return _int(meta, f"{arch}.{key}", where)

    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple):
        pattern = tuple(bool(x) for x in pattern)
    elif pattern is not None:
        pattern = _int(meta, f"{arch}.attention.sliding_window_pattern", where)
    named = []
    for key in sorted(meta):
        if key.startswith(CHAT_TEMPLATE + ".") and key != CHAT_TEMPLATE:
            named.append((key[len(CHAT_TEMPLATE) + 1:], _template(meta, key, where)))
    return GGUFInfo(
        path=path, size=path.stat().st_size, version=version, architecture=arch,
        name=name if isinstance(name, str) else None,
        context_length=num("context_length"), block_count=num("block_count"),
        head_count=num("attention.head_count"), head_count_kv=num("attention.head_count_kv"),
        key_length=num("attention.key_length"), value_length=num("attention.value_length"),
        key_length_swa=num("attention.key_length_swa"),
        embedding_length=num("embedding_length"),
        sliding_window=num("attention.sliding_window"), sliding_window_pattern=pattern,
        chat_template=_template(meta, CHAT_TEMPLATE, where), named_templates=tuple(named),
        metadata=tuple((k, v) for k, v in meta.items() if not isinstance(v, str)
                       or not k.startswith(CHAT_TEMPLATE)))
