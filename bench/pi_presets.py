"""What fits on a 2, 4 and 8 GB Raspberry Pi: the memory fit's own arithmetic, printed as the
tables in docs/inventory.md ("Raspberry Pi presets").

    .venv/bin/python bench/pi_presets.py

Every figure comes from neverdark.memory_fit through a validated inventory: one Pi (4 cores),
N wizards each with a cloud primary and Gemma 3 270M as local fallback (the model as
fleet.example.yaml declares it), at Hermes' floor of 64K context, for both engines and two KV
cache types. Memory only: how many wizards one Pi's CPU can answer at once during an outage is
another limit, not measured here (the test fleet's hosts are not Pis).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neverdark import contract, memory_fit  # noqa: E402
from neverdark.inventory import InventoryError, validate  # noqa: E402

PI_SIZES = {"2 GB": 2048, "4 GB": 4096, "8 GB": 8192}   # memory_mb at each board's nominal size
MODEL = "gemma3-270m"
CONFIGS = [("llama-cpp-python", "f16"), ("llama-cpp-python", "q8_0"),
           ("llama-server", "f16"), ("llama-server", "q8_0")]
DEFAULT = CONFIGS[0]            # what an inventory gets without engine or kv_type
MAX_WIZARDS = 64
# Validation needs every secret named; these placeholders never leave this process.
ENV = {"ANTHROPIC_API_KEY": "placeholder-anthropic-key-0000000000",
       **{f"NEVERDARK_API_KEY_WIZARD{i}": f"placeholder-api-server-key-{i:08d}"
          for i in range(1, MAX_WIZARDS + 2)}}


def example_model() -> dict:
    return yaml.safe_load((REPO / "fleet.example.yaml").read_text())["models"][MODEL]


@functools.lru_cache(maxsize=None)
def _checked() -> tuple[int | None, str | None]:
    """The example's model validated once as it is, against its GGUF header (layout, training
    context, architecture; llama-server makes validation fetch the file when it is missing)."""
    fleet = load(preset_inventory(4096, 1, "llama-server", checked=False))
    model = fleet.models[MODEL]
    return model.training_context, model.architecture


def sweep_model() -> dict:
    """The same model for the sweep's ~100 validations: named by a URL (never fetched) and
    with what its header said declared, so each does not re-read the header of a 253 MB file.
    The memory fit reads nothing else from the source."""
    model = example_model()
    training_context, architecture = _checked()
    model["source"] = {"url": f"https://models.invalid/{MODEL}.gguf",
                       "sha256": model["source"]["sha256"]}
    model.update(training_context=training_context, architecture=architecture)
    return model


def preset_inventory(memory_mb: int, wizards: int, engine: str = DEFAULT[0],
                     kv_type: str = DEFAULT[1], checked: bool = True) -> dict:
    """One Pi, `wizards` wizards, each: anthropic primary, the local model as fallback.
    `checked`: the model as validated once against its file (sweep_model), else as the example
    declares it."""
    model = sweep_model() if checked else example_model()
    server = dict(model.get("server") or {}, n_ctx=contract.MIN_N_CTX, kv_type=kv_type)
    if engine != contract.DEFAULT_ENGINE:
        model["engine"] = engine
        # Gemma 3 270M was trained for 32K: llama-server serves 64K only when told to extend.
        server["extend_context"] = True
    model["server"] = server
    return {
        "hosts": {"pi": {"address": "192.168.1.50", "ssh": {"user": "pi", "sudo": True},
                         "profile": "pi", "memory_mb": memory_mb, "cores": 4}},
        "models": {MODEL: model},
        "wizards": {f"wizard{i}": {"host": "pi", "backends": [
            {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5",
             "api_key": {"secret": "ANTHROPIC_API_KEY"}, "context_length": 200000},
            {"name": "local", "local": MODEL}]} for i in range(1, wizards + 1)},
    }


def load(doc: dict):
    """Validate `doc` as an inventory file would be: the Fleet, or InventoryError."""
    with tempfile.TemporaryDirectory(prefix="neverdark-presets-") as tmp:
        path = Path(tmp) / "fleet.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return validate(path, env=ENV)


@functools.lru_cache(maxsize=None)
def needed_mb(wizards: int, engine: str, kv_type: str) -> int:
    """The smallest memory_mb that holds `wizards` wizards with this engine and KV type."""
    return memory_fit.min_memory_mb(
        load(preset_inventory(memory_fit.MIB, wizards, engine, kv_type)), "pi")


def max_wizards(memory_mb: int, engine: str, kv_type: str) -> int:
    n = 0
    while n < MAX_WIZARDS and needed_mb(n + 1, engine, kv_type) <= memory_mb:
        n += 1
    return n


def size_rows() -> list[dict]:
    rows = []
    for label, memory_mb in PI_SIZES.items():
        for engine, kv_type in CONFIGS:
            n = max_wizards(memory_mb, engine, kv_type)
            fleet = load(preset_inventory(memory_mb, n, engine, kv_type))
            budget = memory_fit.memory_budget(fleet, "pi")
            total = sum(mb for _, mb in budget)
            rows.append({"pi": label, "memory_mb": memory_mb, "engine": engine,
                         "kv_type": kv_type, "wizards": n, "total": total,
                         "headroom": budget[-1][1], "spare": memory_mb - total,
                         "next": needed_mb(n + 1, engine, kv_type)})
    return rows


def render() -> str:
    out = ["| Pi | `memory_mb` | engine | KV cache | wizards | budget | headroom | spare | "
           "one more wizard needs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in size_rows():
        out.append(f"| {r['pi']} | {r['memory_mb']} | {r['engine']} | {r['kv_type']} | "
                   f"**{r['wizards']}** | {r['total']} MB | {r['headroom']} MB | "
                   f"{r['spare']} MB | {r['next']} MB |")
    out += ["", "Smallest `memory_mb` for N wizards (compare with your Pi's `free -m` total):",
            "", "| wizards | " + " | ".join(f"{e} {k}" for e, k in CONFIGS) + " |",
            "|---|" + "---|" * len(CONFIGS)]
    for n in (1, 2, 3, 4, 6, 8):
        out.append(f"| {n} | " + " | ".join(f"{needed_mb(n, e, k)} MB" for e, k in CONFIGS)
                   + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    try:
        print(render(), end="")
    except InventoryError as err:      # the example's model no longer validates
        sys.exit(f"pi_presets: {err}")


if __name__ == "__main__":
    main()
