"""Reading the sidecar's /metrics in tests: samples by name and labels, parsed by
prometheus_client's own parser (label order and number format are the exposition's business)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample `name{labels}` (exactly those labels), or None if there is none."""
    return samples(text).get((name, frozenset(labels.items())))
