"""The capacity drill: every wizard of a host on one local model at once, turns from all of them
concurrently for minutes, the host's memory read throughout. Used by the fleet test
(tests/test_fleet_engines.py) and the engine benchmark (bench/llama_engine_bench.py).

What it reads on the host (one SSH round trip per sample): each neverdark unit's main process
RSS and PSS (/proc/<pid>/status, smaps_rollup), the sum over every process of the host, and,
where the test fleet holds each host in a memory cgroup (testbed.fleet), that cgroup's usage,
peak and limit hits.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field

SAMPLE = r"""
import json, os, subprocess
def mem(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                out["pss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out
units = subprocess.run(["systemctl", "list-units", "--plain", "--no-legend", "neverdark-*"],
                       capture_output=True, text=True).stdout.split("\n")
res = {"units": {}, "all_rss_mb": 0.0}
for line in units:
    if not line.strip():
        continue
    u = line.split()[0]
    pid = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", u],
                         capture_output=True, text=True).stdout.strip()
    if pid and pid != "0":
        res["units"][u] = {"pid": int(pid), **mem(pid)}
for p in os.listdir("/proc"):
    if p.isdigit():
        res["all_rss_mb"] += mem(p).get("rss_mb", 0.0)
print(json.dumps(res))
"""


def sample(bed, host: str) -> dict:
    got = json.loads(bed.ssh(host, f"python3 -c {shlex.quote(SAMPLE)}"))
    fleet = bed.fleet
    if hasattr(fleet, "memory_usage"):   # the test fleet's per-host memory cgroup
        got["cgroup"] = {"usage_mb": fleet.memory_usage(host) / 2**20,
                         "peak_mb": fleet.memory_peak(host) / 2**20,
                         "limit_mb": fleet.memory_limit(host) / 2**20,
                         "limit_hits": fleet.oom_events(host)}
    got["at"] = time.monotonic()
    return got


@dataclass
class Drill:
    """Turns from every wizard at once (each wizard one conversation after another, back to
    back) for `seconds`, while the host's memory is sampled."""

    bed: object
    host: str
    wizards: list[str]
    seconds: float
    every: float = 5.0
    turns: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)

    def _talk(self, wizard: str, stop: threading.Event) -> None:
        client = self.bed.client(wizard)
        n, convo = 0, None
        while not stop.is_set():
            n += 1
            # Every third turn continues the previous conversation: a second turn's prefix is
            # the first turn's whole exchange.
            if n % 3 != 0:
                convo = f"nd-capacity-{uuid.uuid4().hex[:12]}"
            t = client.turn(f"{wizard} turn {n}: say something short.", session=convo)
            self.turns[wizard].append(t)

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.samples.append(sample(self.bed, self.host))
            except Exception as exc:  # noqa: BLE001 -- a sample lost is reported, not fatal
                self.samples.append({"error": repr(exc), "at": time.monotonic()})
            stop.wait(self.every)

    def run(self) -> Drill:
        self.turns = {w: [] for w in self.wizards}
        self.samples = [sample(self.bed, self.host)]
        stop = threading.Event()
        threads = [threading.Thread(target=self._talk, args=(w, stop), daemon=True)
                   for w in self.wizards]
        watcher = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        for t in [*threads, watcher]:
            t.start()
        time.sleep(self.seconds)
        stop.set()
        for t in threads:
            t.join(400)
        watcher.join(60)
        self.samples.append(sample(self.bed, self.host))
        return self

    def peak(self, unit: str, key: str = "rss_mb") -> float:
        return max((s["units"].get(unit, {}).get(key, 0.0) for s in self.samples
                    if "units" in s), default=0.0)

    def summary(self) -> dict:
        ok = [s for s in self.samples if "units" in s]
        units = sorted({u for s in ok for u in s["units"]})
        out = {"seconds": self.seconds, "samples": len(ok),
               "turns": {w: {"sent": len(ts), "answered": sum(t.ok for t in ts),
                             "failed": [t.error[:120] for t in ts if not t.ok],
                             "by_model": {m: sum(t.model == m for t in ts)
                                          for m in sorted({str(t.model) for t in ts})},
                             "median_s": _median([t.latency for t in ts if t.ok]),
                             "max_s": round(max((t.latency for t in ts), default=0.0), 2)}
                       for w, ts in self.turns.items()},
               "peak_rss_mb": {u: round(self.peak(u), 1) for u in units},
               "peak_pss_mb": {u: round(self.peak(u, "pss_mb"), 1) for u in units},
               "start_rss_mb": {u: round(ok[0]["units"].get(u, {}).get("rss_mb", 0.0), 1)
                                for u in units} if ok else {},
               "host_peak_rss_mb": round(max((s["all_rss_mb"] for s in ok), default=0.0), 1)}
        cg = [s["cgroup"] for s in ok if "cgroup" in s]
        if cg:
            out["cgroup"] = {"peak_mb": round(max(c["peak_mb"] for c in cg), 1),
                             "limit_mb": round(cg[-1]["limit_mb"], 1),
                             "limit_hits": cg[-1]["limit_hits"]}
        return out


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[len(xs) // 2], 2)
