"""Counters and the probe latency histogram, rendered as Prometheus text exposition 0.0.4.

Local backends also get where their turns' time goes: the engine's own counters as the last probe
read them (every completion the engine served, whoever sent it: one engine can serve several
wizards), and the breakdown of each check turn the sidecar ran itself (switches, drills).
"""

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
        # (wizard, backend) -> the engine's counters at the last probe (sidecar.engine.EngineTotals)
        self.engines: dict[tuple[str, str], object] = {}
        # (wizard, backend) -> summed check-turn breakdowns, and their count
        self.turns: dict[tuple[str, str], Counter] = {}

    def probe(self, wizard: str, result) -> None:
        if getattr(result, "engine", None) is not None:
            self.engines[(wizard, result.backend)] = result.engine
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

    # Parts of a local turn's wall time, as sidecar.engine.TurnBreakdown names them.
    TURN_PARTS = ("queue_s", "prefill_s", "generation_s", "cache_save_s", "overhead_s")

    def local_turn(self, wizard: str, backend: str, breakdown: dict | None) -> None:
        """A check turn the sidecar ran on a local backend (Verdict.breakdown)."""
        if not breakdown:
            return
        c = self.turns.setdefault((wizard, backend), Counter())
        c["turns"] += 1
        c["wall_s"] += breakdown.get("wall_s") or 0.0
        for k in (*self.TURN_PARTS, "prompt_tokens", "cached_tokens", "generated_tokens"):
            if breakdown.get(k) is not None:
                c[k] += breakdown[k]

    def recovery(self, wizard: str, outcome: str) -> None:
        """A switch found unfinished at start: 'completed' or 'rolled_back' (or 'interrupted')."""
        self.recovered[(wizard, outcome)] += 1

    def render(self, wizards: dict, families: list = ()) -> str:
        """`wizards`: name -> (backend names in order, active backend or None, dark);
        `families`: more gauges as (name, help, type, [(labels, value)]) (model checks)."""
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
        out += self._render_engines()
        for name, help_, kind, samples in families:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            out += [f"{name}{_labels(**labels)} {float(value)!r}" for labels, value in samples]
        return "\n".join(out) + "\n"

    _ENGINE = (("prompt_tokens", "neverdark_engine_prompt_tokens_total",
                "Prompt tokens the local engine evaluated (cache hits excluded)."),
               ("cached_tokens", "neverdark_engine_cached_tokens_total",
                "Prompt tokens the local engine reused from its cache."),
               ("prefill_s", "neverdark_engine_prefill_seconds_total", "Local prompt processing."),
               ("generated_tokens", "neverdark_engine_generated_tokens_total", "Local generated tokens."),
               ("generation_s", "neverdark_engine_generation_seconds_total", "Local generation."),
               ("queue_s", "neverdark_engine_queue_seconds_total",
                "Waiting for the engine (llama-cpp-python's single lock)."),
               ("cache_save_s", "neverdark_engine_cache_save_seconds_total",
                "Prompt-cache state copies (llama-cpp-python's RAM cache)."),
               ("requests", "neverdark_engine_requests_total", "Completions the engine served."),
               ("empty", "neverdark_engine_empty_completions_total", "Completions with no text."))

    def _render_engines(self) -> list[str]:
        out = []
        for attr, name, help_ in self._ENGINE:
            rows = [(k, getattr(t, attr)) for k, t in sorted(self.engines.items())
                    if getattr(t, attr) is not None]
            if not rows:
                continue
            out += [f"# HELP {name} {help_} Engine-wide, read at the last probe.",
                    f"# TYPE {name} counter"]
            out += [f"{name}{_labels(wizard=w, backend=b)} {v:g}" for (w, b), v in rows]
        if self.turns:
            out += ["# HELP neverdark_local_check_turns_total Check turns the sidecar ran on a local backend.",
                    "# TYPE neverdark_local_check_turns_total counter"]
            out += [f"neverdark_local_check_turns_total{_labels(wizard=w, backend=b)} {c['turns']}"
                    for (w, b), c in sorted(self.turns.items())]
            out += ["# HELP neverdark_local_check_turn_seconds_total Where those turns' wall time went.",
                    "# TYPE neverdark_local_check_turn_seconds_total counter"]
            for (w, b), c in sorted(self.turns.items()):
                out.append(f"neverdark_local_check_turn_seconds_total{_labels(wizard=w, backend=b, part='wall')} {c['wall_s']:.6f}")
                for part in self.TURN_PARTS:
                    if part in c:
                        label = part[:-2].replace("overhead", "gateway")
                        out.append(f"neverdark_local_check_turn_seconds_total{_labels(wizard=w, backend=b, part=label)} {c[part]:.6f}")
            out += ["# HELP neverdark_local_check_turn_tokens_total Those turns' tokens by kind.",
                    "# TYPE neverdark_local_check_turn_tokens_total counter"]
            for (w, b), c in sorted(self.turns.items()):
                for k, kind in (("prompt_tokens", "prompt"), ("cached_tokens", "cached"),
                                ("generated_tokens", "generated")):
                    if k in c:
                        out.append(f"neverdark_local_check_turn_tokens_total{_labels(wizard=w, backend=b, kind=kind)} {c[k]:g}")
        return out
