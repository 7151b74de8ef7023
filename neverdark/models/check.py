"""`neverdark model check`: run sidecar/modelcheck.py on each wizard's host over SSH and show
what it measured, one table per wizard.

The measuring is the host's (its own engine, its own load, the wizard's real prompt from Hermes);
this side picks the wizards, groups them by host, and reads back one JSON line per wizard.
"""

from __future__ import annotations

import json
import shlex

from neverdark import remote

# A host checks its wizards one after another; each is three completions, the first a cold
# Hermes-sized prefill (minutes on a Pi). The host side bounds each request at 1800 s.
TIMEOUT_PER_WIZARD = 3600


def local_wizards(fleet) -> list[str]:
    return [w for w, wz in fleet.wizards.items() if any(hasattr(b, "local") for b in wz.backends)]


def platform(fleet, wizard: str) -> str:
    """Whose prompt to measure: Telegram's where the wizard chats there (the interactive case),
    else the API server's."""
    return "telegram" if fleet.wizards[wizard].telegram is not None else "api_server"


def host_command(wizards: list[str], budget: float, backend: str | None, platform_: str) -> str:
    args = [*wizards, "--budget", repr(float(budget)), "--platform", platform_]
    if backend:
        args += ["--backend", backend]
    return f"{remote.SIDECAR_PYTHON} -m sidecar.modelcheck {shlex.join(args)}"


def run(fleet, wizards: list[str], budget: float, backend: str | None) -> list[dict]:
    """One result per wizard: the host's JSON, or {"ok": False, "wizard", "error"}."""
    groups: dict[tuple[str, str], list[str]] = {}
    for w in wizards:
        groups.setdefault((fleet.wizards[w].host, platform(fleet, w)), []).append(w)
    results = []
    for (host, plat), names in groups.items():
        cmd = host_command(names, budget, backend, plat)
        proc, why = remote.attempt(lambda: remote.run(fleet, host, cmd,
                                                      timeout=TIMEOUT_PER_WIZARD * len(names)))
        seen = {}
        for line in (proc.stdout.splitlines() if proc is not None else ()):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                seen[doc.get("wizard")] = doc
        for w in names:
            if w in seen:
                results.append(dict(seen[w], host=host))
            else:
                error = seen.get(None, {}).get("error") or why or remote.why_no_answer(proc)
                results.append({"ok": False, "wizard": w, "host": host, "error": error})
    return results


def passed(result: dict) -> bool:
    return bool(result.get("ok") and result.get("within_budget"))


def _n(value, fmt: str, unit: str) -> str:
    return "?" if value is None else f"{value:{fmt}} {unit}"


def table(r: dict) -> list[str]:
    head = f"{r['wizard']} on {r.get('host', '?')}"
    if not r.get("ok"):
        return [f"{head}: model check FAILED: {r.get('error')}"]
    ft = r.get("first_token_s") or {}
    rates = r.get("rates_from") or {}
    verdict = "within" if r["within_budget"] else "OVER"
    return [
        f"{head}: backend {r['backend']} ({r['model']}), {r.get('platform')} prompt of "
        f"{_n(r.get('prompt_tokens'), 'd', 'tokens')}",
        f"  first token, cold   {_n(ft.get('cold'), '8.2f', 's')}   (no cached prefix)",
        f"  first token, warm   {_n(ft.get('warm'), '8.2f', 's')}   (prefix cached, a new turn)",
        f"  prefill             {_n(r.get('prefill_tokens_per_s'), '8.1f', 'tokens/s')}"
        f"   ({rates.get('prefill', '?')} timings)",
        f"  decode              {_n(r.get('decode_tokens_per_s'), '8.1f', 'tokens/s')}"
        f"   ({rates.get('decode', '?')} timings)",
        f"  warm turn           {_n(r.get('warm_turn_s'), '8.2f', 's')}   (first token + "
        f"{r['answer_tokens']} tokens)",
        f"  verdict             {verdict} the {r['budget_s']:g} s budget",
    ]
