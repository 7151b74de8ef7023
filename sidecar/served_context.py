"""How much context a model server neverdark does not run really serves, from its own API.

Hermes is told a backend's `context_length` and sizes its prompts to it; a server that serves
less truncates them silently (Ollama loads a model with its default num_ctx, 4096, unless the
Modelfile or the request says otherwise). So an external server whose real context is smaller is
probed unhealthy, with the numbers in the reason.

- Ollama: `GET /api/tags` (is the model pulled), `GET /api/ps` (the context of the loaded model),
  else `POST /api/show` (num_ctx in its parameters), else Ollama's default.
- OpenAI-compatible servers: the model's entry in `GET /v1/models`, where servers say it:
  vLLM's `max_model_len`, llama.cpp's `meta.n_ctx` / `meta.n_ctx_train`. Nothing said: unchecked.
"""

from __future__ import annotations

import re

import httpx

from neverdark import contract


def _same_model(listed: str, wanted: str) -> bool:
    """Ollama names carry a tag; a name without one means `:latest`."""
    def norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"
    return norm(listed) == norm(wanted)


async def ollama(client: httpx.AsyncClient, root: str, model: str,
                 timeout: float) -> tuple[int | None, str]:
    """(context the model is served with, where that came from); (None, why) when the model
    is not there at all."""
    tags = (await client.get(f"{root}/api/tags", timeout=timeout)).json()
    names = [m.get("name") or m.get("model") or "" for m in tags.get("models") or []]
    if not any(_same_model(n, model) for n in names):
        return None, f"model {model} is not pulled on this Ollama server (ollama pull {model})"
    ps = (await client.get(f"{root}/api/ps", timeout=timeout)).json()
    for m in ps.get("models") or []:
        if _same_model(m.get("name") or m.get("model") or "", model):
            if isinstance(m.get("context_length"), int):
                return m["context_length"], "loaded with (/api/ps)"
    show = (await client.post(f"{root}/api/show", json={"model": model}, timeout=timeout)).json()
    found = re.search(r"^num_ctx\s+(\d+)\s*$", show.get("parameters") or "", re.M)
    if found:
        return int(found.group(1)), "num_ctx in its Modelfile (/api/show)"
    return contract.OLLAMA_DEFAULT_CONTEXT, "Ollama's default num_ctx"


def openai_models(data: dict, model: str) -> tuple[int | None, str]:
    """The context an OpenAI-compatible server says it serves `model` with, if it says."""
    for entry in data.get("data") or []:
        if not isinstance(entry, dict) or entry.get("id") != model:
            continue
        if isinstance(entry.get("max_model_len"), int):
            return entry["max_model_len"], "max_model_len (/v1/models)"
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        for key in ("n_ctx", "n_ctx_train"):
            if isinstance(meta.get(key), int):
                return meta[key], f"meta.{key} (/v1/models)"
    return None, ""


def too_small(served: int | None, wanted: int | None, source: str) -> str | None:
    """The reason a served context is not enough, or None."""
    if served is None or wanted is None or served >= wanted:
        return None
    return (f"serves {served} tokens of context ({source}), Hermes is told {wanted}: prompts "
            "would be cut; raise the server's context (Ollama: num_ctx) or lower context_length")
