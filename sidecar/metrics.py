"""Counters and the probe latency histogram, rendered as Prometheus text exposition 0.0.4."""

from __future__ import annotations

from collections import Counter

# Probe latencies: loopback answers in ms, cloud list-models in 0.1-1 s, timeouts at `timeout`.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    def __init__(self) -> None:
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.recovered: Counter[tuple[str, str]] = Counter()
        self.failures: Counter[tuple[str, str, str]] = Counter()
        # (wizard, backend) -> [per-bucket counts..., +Inf count], sum
        self._hist: dict[tuple[str, str], list[int]] = {}
        self._sum: Counter[tuple[str, str]] = Counter()

    def probe(self, wizard: str, result) -> None:
        if not result.ok:
            self.failures[(wizard, result.backend, result.reason)] += 1
        if result.reason == "passive":
            return  # the gateway's own traffic: no probe latency to record
        key = (wizard, result.backend)
        counts = self._hist.setdefault(key, [0] * (len(BUCKETS) + 1))
        for i, bound in enumerate(BUCKETS):
            if result.latency <= bound:
                counts[i] += 1
        counts[-1] += 1
        self._sum[key] += result.latency

    def transition(self, wizard: str, kind: str) -> None:
        self.transitions[(wizard, kind)] += 1

    def recovery(self, wizard: str, outcome: str) -> None:
        """A switch found unfinished at start: 'completed' or 'rolled_back' (or 'interrupted')."""
        self.recovered[(wizard, outcome)] += 1

    def render(self, wizards: dict) -> str:
        """`wizards`: name -> (backend names in order, active backend or None, dark)."""
        out = ["# HELP neverdark_active_backend 1 for the backend each wizard is on.",
               "# TYPE neverdark_active_backend gauge"]
        for w, (backends, active, _) in sorted(wizards.items()):
            for b in backends:
                out.append(f"neverdark_active_backend{_labels(wizard=w, backend=b)} {int(b == active)}")
        out += ["# HELP neverdark_dark 1 while a wizard has no healthy backend.",
                "# TYPE neverdark_dark gauge"]
        for w, (_, _, dark) in sorted(wizards.items()):
            out.append(f"neverdark_dark{_labels(wizard=w)} {int(bool(dark))}")
        out += ["# HELP neverdark_transitions_total Completed backend switches.",
                "# TYPE neverdark_transitions_total counter"]
        for (w, kind), n in sorted(self.transitions.items()):
            out.append(f"neverdark_transitions_total{_labels(wizard=w, kind=kind)} {n}")
        out += ["# HELP neverdark_interrupted_switches_total Switches a sidecar stop or crash cut short, "
                "by how a restarted sidecar found them.",
                "# TYPE neverdark_interrupted_switches_total counter"]
        for (w, outcome), n in sorted(self.recovered.items()):
            out.append(f"neverdark_interrupted_switches_total{_labels(wizard=w, outcome=outcome)} {n}")
        out += ["# HELP neverdark_probe_failures_total Failed probes and passive errors by reason.",
                "# TYPE neverdark_probe_failures_total counter"]
        for (w, b, reason), n in sorted(self.failures.items()):
            out.append(f"neverdark_probe_failures_total{_labels(wizard=w, backend=b, reason=reason)} {n}")
        out += ["# HELP neverdark_probe_latency_seconds Probe round-trip time.",
                "# TYPE neverdark_probe_latency_seconds histogram"]
        for (w, b), counts in sorted(self._hist.items()):
            for bound, n in zip(BUCKETS, counts):
                out.append(f"neverdark_probe_latency_seconds_bucket{_labels(wizard=w, backend=b, le=repr(bound))} {n}")
            out.append(f"neverdark_probe_latency_seconds_bucket{_labels(wizard=w, backend=b, le='+Inf')} {counts[-1]}")
            out.append(f"neverdark_probe_latency_seconds_sum{_labels(wizard=w, backend=b)} {self._sum[(w, b)]:.6f}")
            out.append(f"neverdark_probe_latency_seconds_count{_labels(wizard=w, backend=b)} {counts[-1]}")
        return "\n".join(out) + "\n"
