"""Can a local model answer within the interactive budget on the hardware a host declares?

An estimate from published llama.cpp rates (the one place they live; the README's projection
table quotes the same rows), used by `neverdark validate` to warn before anything is deployed.
`neverdark model check` measures the real thing on the host.

On a CPU, generating a token reads every weight once (memory-bound) and prompt processing does
arithmetic on every weight (compute-bound): both rates scale about inversely with the model's
size at a given quantization. Each row below gives a rate for a file of a known size; their
product (bytes x tokens/s) is what that hardware moves. For a host of a class we take the best
product of its rows, which is optimistic (Gemma 4's per-layer embeddings are not read per
token, so its rows credit the hardware with more than a dense model gets): the warning fires
only when even that cannot meet the budget. Prompt processing is also scaled by the host's
cores against the row's threads; generation is not (memory bandwidth does not grow with them).

A warm turn: the conversation's prefix is cached (the sidecar's check turn computed it), so the
turn costs the new message's tokens and a brief answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from neverdark import contract

BUDGET_S = contract.INTERACTIVE_BUDGET_S   # a warm turn, the Telegram case (issue 17)
WARM_NEW_TOKENS = 25     # a user's message and the template's turn markers
ANSWER_TOKENS = contract.ANSWER_TOKENS     # a brief answer (the README's projections use the same)
GB = 1_000_000_000


@dataclass(frozen=True)
class Rate:
    hardware: str
    model: str
    file_gb: float           # the GGUF's size
    threads: int
    prompt_tps: float        # prompt processing, tokens/s
    gen_tps: float           # generation, tokens/s
    source: str


# Published llama.cpp figures (shared/FIELD-NOTES.md "Published Pi figures"; the README's
# "What the small model gets"). File sizes: published GGUFs of those quantizations (Gemma 4 E2B
# Q4: 3.2-3.4 GB listed; the larger is taken, the optimistic side; TinyLlama 1.1B q8_0 1.17 GB).
RATES: dict[str, tuple[Rate, ...]] = {
    "pi": (
        Rate("Raspberry Pi 5", "Gemma 4 E2B Q4_K_M", 3.4, 4, 30.0, 6.3,
             "llama.cpp on a Pi 5, published (FIELD-NOTES: 28-32 / 6-6.7 tokens/s)"),
        Rate("Raspberry Pi 5", "TinyLlama 1.1B q8_0", 1.17, 4, 35.0, 9.0,
             "llama.cpp on a Pi 5, published (FIELD-NOTES: 35 / 9 tokens/s)"),
    ),
    "vps": (
        Rate("Intel i7-10750H, 3 threads", "Gemma 4 E2B Q4_0", 3.4, 3, 71.0, 18.0,
             "pt13762104.github.io, 2026-06-06 (README)"),
    ),
}


@dataclass(frozen=True)
class Estimate:
    prompt_tps: float
    gen_tps: float
    warm_turn_s: float
    basis: Rate


def estimate(profile: str, cores: int, size_mb: int) -> Estimate | None:
    """A warm turn of a `size_mb` model on a host of `profile` with `cores` (None: no rates for
    that class of host)."""
    rows = RATES.get(profile)
    if not rows or size_mb <= 0:
        return None
    size = size_mb * 1024 * 1024 / GB
    best_gen = max(rows, key=lambda r: r.file_gb * r.gen_tps)
    best_prompt = max(rows, key=lambda r: r.file_gb * r.prompt_tps / r.threads)
    gen = best_gen.file_gb * best_gen.gen_tps / size
    prompt = best_prompt.file_gb * best_prompt.prompt_tps / size * cores / best_prompt.threads
    return Estimate(prompt, gen, WARM_NEW_TOKENS / prompt + ANSWER_TOKENS / gen, best_gen)


def warnings(fleet, budget_s: float = BUDGET_S) -> list[str]:
    """One line per (host, model) whose estimated warm turn is over the budget."""
    out = []
    for h, host in fleet.hosts.items():
        for m in fleet.local_models(h):
            model = fleet.models[m]
            e = estimate(host.profile, host.cores, model.size_mb or 0)
            if e is None or e.warm_turn_s <= budget_s:
                continue
            out.append(
                f"model {m} on host {h}: a warm turn needs about {e.warm_turn_s:.0f} s "
                f"({WARM_NEW_TOKENS} new prompt tokens at ~{e.prompt_tps:.0f}/s, a "
                f"{ANSWER_TOKENS}-token answer at ~{e.gen_tps:.1f}/s for {model.size_mb} MB on "
                f"{host.cores} cores, scaled from {e.basis.hardware} with {e.basis.model}), "
                f"over the {budget_s:.0f} s interactive budget even on the most favourable "
                "published rates: a smaller model or a bigger host (`neverdark model check` "
                "measures it on the host)")
    return out
