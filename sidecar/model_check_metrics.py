"""The latest `neverdark model check` results (MODEL_CHECK_DIR/<wizard>.json, written by
sidecar/modelcheck.py) as metric families for the sidecar's /metrics.

`families()` returns plain data, (name, help, type, [(labels, value)...]), so whichever renderer
sidecar/metrics.py uses (its own text, or prometheus_client's GaugeMetricFamily) takes it as is.
The files are read at each scrape: a check can run at any time, from another process, and a
result's age is itself exported (timestamp) for a "stale check" rule.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

Sample = tuple[dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]

_PREFIX = "neverdark_model_check_"
# name suffix, help, the result's value (None: no sample)
_PER_BACKEND = (
    ("prefill_tokens_per_second", "Prompt processing rate the last model check measured (cold prompt).",
     lambda r: r.get("prefill_tokens_per_s")),
    ("decode_tokens_per_second", "Generation rate the last model check measured.",
     lambda r: r.get("decode_tokens_per_s")),
    ("budget_seconds", "The interactive budget the last model check judged a warm turn against.",
     lambda r: r.get("budget_s")),
    ("within_budget", "1 when the last model check's warm turn (first token plus a brief answer) "
     "fit the budget.", lambda r: None if r.get("within_budget") is None else int(bool(r["within_budget"]))),
    ("timestamp_seconds", "When the last model check ran (Unix time).", lambda r: r.get("timestamp")),
)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def read_results(directory: Path, wizards: Iterable[str]) -> dict[str, dict]:
    """wizard -> its latest result, for the wizards given (a removed wizard's file is left out);
    a missing, unreadable or malformed file is no result (logged at debug: it is re-read at
    every scrape)."""
    out = {}
    for w in sorted(wizards):
        path = Path(directory) / f"{w}.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.debug("model check result unreadable", extra={"path": str(path), "error": str(exc)})
            continue
        if isinstance(doc, dict) and doc.get("wizard") == w and isinstance(doc.get("backend"), str):
            out[w] = doc
    return out


def families(directory: Path, wizards: Iterable[str]) -> list[Family]:
    results = read_results(directory, wizards)
    first: list[Sample] = []
    for w, r in results.items():
        for cache in ("cold", "warm"):
            v = _number((r.get("first_token_s") or {}).get(cache))
            if v is not None:
                first.append(({"wizard": w, "backend": r["backend"], "cache": cache}, v))
    out: list[Family] = [(_PREFIX + "first_token_seconds",
                          "First-token latency the last model check measured: cold (no cached "
                          "prefix) and warm (the conversation's prefix cached, a new turn).",
                          "gauge", first)]
    for suffix, help_, get in _PER_BACKEND:
        samples = [({"wizard": w, "backend": r["backend"]}, v) for w, r in results.items()
                   if (v := _number(get(r))) is not None]
        out.append((_PREFIX + suffix, help_, "gauge", samples))
    return [f for f in out if f[3]]
