"""The sidecar's /metrics: what it counted, and what it reads at each scrape, exported with
prometheus_client as a custom collector.

`Metrics` holds the counters the daemon adds to (probes, switches, check turns, hook deliveries)
and the latest readings other tasks leave here (the units' memory, sidecar/units.py). At a scrape
the collector hands a `Scrape` (those counters plus the wizards' current state) to each producer
in `PRODUCERS`, and each yields metric families; a new family is one more producer, so another
part of the sidecar extends the export without touching the others. Names, types and labels are
the ones in monitoring/metrics.txt (the alert rules and the dashboard name only those).

Why a collector, not prometheus_client's Counter/Gauge objects: the state lives in the wizards'
policies and the counters here; a collector reads them at the scrape, so there is no second copy
to keep in step, and a wizard removed by a reload simply stops being exported.

Local backends also get where their turns' time goes: the engine's own counters as the last probe
read them (every completion the engine served, whoever sent it: one engine can serve several
wizards), and the breakdown of each check turn the sidecar ran itself (switches, drills).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from sidecar.meminfo import MEMINFO, read_meminfo

# Probe latencies: loopback answers in ms, cloud list-models in 0.1-1 s, timeouts at `timeout`.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Text exposition 0.0.4, which generate_latest writes (Prometheus negotiates it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WizardState(NamedTuple):
    """One wizard at the scrape: its chain, where it is, and its /status view (policy.describe),
    which has each backend's health, `since` and the probes' times as wall time."""
    backends: list[str]
    active: str | None
    dark: bool
    status: dict | None = None


@dataclass
class Scrape:
    metrics: "Metrics"
    wizards: dict[str, WizardState]
    families: list = field(default_factory=list)
    meminfo: Path = MEMINFO


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
        # (hook, outcome) -> deliveries; outcome "ok", or what kept it from arriving
        self.deliveries: Counter[tuple[str, str]] = Counter()
        # the units' latest readings (sidecar.units.UnitReading), left by the daemon's unit task
        self.units: list = []

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

    def delivery(self, hook: str, outcome: str) -> None:
        """One hook delivery: outcome 'ok', or 'timeout' / 'error'."""
        self.deliveries[(hook, outcome)] += 1

    def render(self, wizards: dict, families: Iterable = ()) -> str:
        """`wizards`: name -> WizardState (or the tuple (backends, active, dark[, status]));
        `families`: more gauges as (name, help, type, [(labels, value)]), read by another part
        of the sidecar at this scrape (sidecar/model_check_metrics.py)."""
        scrape = Scrape(self, {n: WizardState(*v) for n, v in wizards.items()}, list(families))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(scrape))
        return generate_latest(registry).decode()


class _Collector:
    def __init__(self, scrape: Scrape) -> None:
        self.scrape = scrape

    def collect(self):
        for producer in PRODUCERS:
            yield from producer(self.scrape)


def _gauge(name: str, help_: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_, labels=labels)


def _counter(name: str, help_: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_, labels=labels)


# --- producers: each takes the Scrape and yields families ------------------------------------

def wizard_state(s: Scrape) -> Iterable:
    active = _gauge("neverdark_active_backend", "1 for the backend each wizard is on.",
                    ["wizard", "backend"])
    index = _gauge("neverdark_active_index", "The active backend's place in the wizard's chain "
                   "(0: the primary); absent while it is on none.", ["wizard"])
    since = _gauge("neverdark_active_since_timestamp_seconds",
                   "When the wizard went onto its active backend (Unix time).", ["wizard"])
    dark = _gauge("neverdark_dark", "1 while a wizard has no healthy backend.", ["wizard"])
    healthy = _gauge("neverdark_backend_healthy",
                     "1 while the backend's probes say healthy and it is neither held (429) nor "
                     "key-rejected; 0 otherwise, including not known yet.", ["wizard", "backend"])
    rejected = _gauge("neverdark_key_rejected", "1 while the backend rejects the wizard's key "
                      "(401/403); a 429 is not a rejection.", ["wizard", "backend"])
    last = _gauge("neverdark_last_probe_timestamp_seconds",
                  "The latest observation of any of the wizard's backends (Unix time).", ["wizard"])
    for w, st in sorted(s.wizards.items()):
        for b in st.backends:
            active.add_metric([w, b], int(b == st.active))
        if st.active in st.backends:
            index.add_metric([w], st.backends.index(st.active))
        dark.add_metric([w], int(bool(st.dark)))
        view = st.status or {}
        if view.get("since") is not None:
            since.add_metric([w], view["since"])
        health = view.get("backends") or {}
        for b in st.backends:
            h = health.get(b)
            if h is None:
                continue
            healthy.add_metric([w, b], int(h.get("healthy") is True and bool(h.get("usable"))))
            rejected.add_metric([w, b], int(bool(h.get("key_rejected"))))
        seen = [h["last_at"] for h in health.values() if h.get("last_at") is not None]
        if seen:
            last.add_metric([w], max(seen))
    yield from (active, index, since, dark, healthy, rejected, last)


def switches(s: Scrape) -> Iterable:
    m = s.metrics
    c = _counter("neverdark_transitions_total", "Completed backend switches.", ["wizard", "kind"])
    for (w, kind), n in sorted(m.transitions.items()):
        c.add_metric([w, kind], n)
    yield c
    c = _counter("neverdark_interrupted_switches_total", "Switches a sidecar stop or crash cut "
                 "short, by how a restarted sidecar found them.", ["wizard", "outcome"])
    for (w, outcome), n in sorted(m.recovered.items()):
        c.add_metric([w, outcome], n)
    yield c


def probes(s: Scrape) -> Iterable:
    m = s.metrics
    c = _counter("neverdark_probe_failures_total", "Failed probes and passive errors by reason.",
                 ["wizard", "backend", "reason"])
    for (w, b, reason), n in sorted(m.failures.items()):
        c.add_metric([w, b, reason], n)
    yield c
    h = HistogramMetricFamily("neverdark_probe_latency_seconds", "Probe round-trip time.",
                              labels=["wizard", "backend"])
    for (w, b), counts in sorted(m._hist.items()):
        cumulative = [(repr(bound), n) for bound, n in zip(BUCKETS, counts)]
        h.add_metric([w, b], cumulative + [("+Inf", counts[-1])], sum_value=m._sum[(w, b)])
    yield h


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


def engines(s: Scrape) -> Iterable:
    for attr, name, help_ in _ENGINE:
        rows = [(k, getattr(t, attr)) for k, t in sorted(s.metrics.engines.items())
                if getattr(t, attr) is not None]
        if not rows:
            continue    # an engine that does not give this one (llama-server has no queue)
        c = _counter(name, f"{help_} Engine-wide, read at the last probe.", ["wizard", "backend"])
        for (w, b), v in rows:
            c.add_metric([w, b], v)
        yield c


def check_turns(s: Scrape) -> Iterable:
    turns = s.metrics.turns
    if not turns:
        return
    n = _counter("neverdark_local_check_turns_total",
                 "Check turns the sidecar ran on a local backend.", ["wizard", "backend"])
    secs = _counter("neverdark_local_check_turn_seconds_total",
                    "Where those turns' wall time went.", ["wizard", "backend", "part"])
    toks = _counter("neverdark_local_check_turn_tokens_total", "Those turns' tokens by kind.",
                    ["wizard", "backend", "kind"])
    for (w, b), c in sorted(turns.items()):
        n.add_metric([w, b], c["turns"])
        secs.add_metric([w, b, "wall"], c["wall_s"])
        for part in Metrics.TURN_PARTS:
            if part in c:
                secs.add_metric([w, b, part[:-2].replace("overhead", "gateway")], c[part])
        for k, kind in (("prompt_tokens", "prompt"), ("cached_tokens", "cached"),
                        ("generated_tokens", "generated")):
            if k in c:
                toks.add_metric([w, b, kind], c[k])
    yield from (n, secs, toks)


def units(s: Scrape) -> Iterable:
    """The model servers' and gateways' units, as the daemon's unit task last read them."""
    mem = _gauge("neverdark_unit_memory_bytes", "The unit's cgroup memory use "
                 "(memory.current; v1: memory.usage_in_bytes; a v1 container without a memory "
                 "cgroup per unit: its processes' VmRSS).", ["unit"])
    cap = _gauge("neverdark_unit_memory_max_bytes", "The unit's cgroup memory limit "
                 "(MemoryMax); 0 for none.", ["unit"])
    ooms = _counter("neverdark_unit_oom_kills_total", "Processes of the unit the kernel "
                    "OOM-killed (memory.events oom_kill), since the unit's cgroup was made.",
                    ["unit"])
    restarts = _counter("neverdark_unit_restarts_total", "systemd's automatic restarts of the "
                        "unit (NRestarts) since it was last started by hand.", ["unit"])
    up = _gauge("neverdark_unit_active", "1 while the unit is active (running).", ["unit"])
    for r in s.metrics.units:
        if r.memory is not None:
            mem.add_metric([r.unit], r.memory)
        if r.memory_max is not None:
            cap.add_metric([r.unit], r.memory_max)
        if r.oom_kills is not None:
            ooms.add_metric([r.unit], r.oom_kills)
        if r.restarts is not None:
            restarts.add_metric([r.unit], r.restarts)
        if r.active is not None:
            up.add_metric([r.unit], int(r.active))
    yield from (mem, cap, ooms, restarts, up)


def host_memory(s: Scrape) -> Iterable:
    info = read_meminfo(s.meminfo)
    total = _gauge("neverdark_host_memory_total_bytes", "The host's memory (MemTotal).")
    avail = _gauge("neverdark_host_memory_available_bytes",
                   "Memory available to new work without swapping (MemAvailable).")
    if "MemTotal" in info:
        total.add_metric([], info["MemTotal"])
    if "MemAvailable" in info:
        avail.add_metric([], info["MemAvailable"])
    yield from (total, avail)


def hook_deliveries(s: Scrape) -> Iterable:
    c = _counter("neverdark_hook_deliveries_total", "Operator notices by hook and outcome "
                 "('ok' delivered; anything else failed).", ["hook", "outcome"])
    for (hook, outcome), n in sorted(s.metrics.deliveries.items()):
        c.add_metric([hook, outcome], n)
    yield c


def given(s: Scrape) -> Iterable:
    """The families handed to `render` as data (only gauges are: the model checks)."""
    for name, help_, kind, samples in s.families:
        assert kind == "gauge", kind
        labels = list(dict.fromkeys(k for lb, _ in samples for k in lb))   # as given
        g = _gauge(name, help_, labels)
        for lb, value in samples:
            g.add_metric([str(lb.get(k, "")) for k in labels], float(value))
        yield g


# The families, in exposition order. Another part of the sidecar adds its own producer here.
PRODUCERS: list[Callable[[Scrape], Iterable]] = [
    wizard_state, switches, probes, engines, check_turns, units, host_memory, hook_deliveries,
    given]
