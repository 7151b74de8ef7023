"""Failover from the user's side, on the real test fleet: how long an outage is felt, and what
it costs per turn with Hermes' own per-turn fallback alone against neverdark.

    .venv/bin/python bench/failover_bench.py [--seconds 300]

1. Flips (503 on vps1's Anthropic stand-in, which merlin and gandalf both use as primary):
   outage start to the first answer from the fallback, recovery to the first answer from the
   primary, and the turns that failed meanwhile, for merlin (claude -> local Gemma) and gandalf
   (claude -> gpt). Both switch live (no gateway restart).
2. Added latency per turn (gandalf, claude -> gpt, so both ends are LLMock and the difference is
   the retry overhead, not model speed): turns back to back for --seconds under each outage
   (503, 429 with Retry-After 30, refused connection, 500), with the sidecar stopped (Hermes'
   per-turn fallback alone) and running (neverdark), against the mean of a healthy baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.outage import first_answer_from, mean, steady_turns  # noqa: E402
from testbed.bed import Testbed  # noqa: E402

CLAUDE, GPT, LOCAL = "claude-haiku-4-5", "gpt-4.1-mini", "gemma3-270m"
MERLIN_CLAUDE = "claude-sonnet-4-5"


def flips(bed) -> dict:
    claude = bed.mocks["vps1/anthropic"]
    clients = {"merlin": bed.client("merlin"), "gandalf": bed.client("gandalf")}
    want = {"merlin": (LOCAL, MERLIN_CLAUDE), "gandalf": (GPT, CLAUDE)}
    out: dict = {}

    def measure(phase: int, start: float) -> None:
        def one(w):
            h = first_answer_from(clients[w], want[w][phase], start)
            out.setdefault(w, {})[("failover", "failback")[phase]] = {
                "first_answer_s": None if h.seconds is None else round(h.seconds, 1),
                "turns": len(h.turns), "failed": h.failed}
        threads = [threading.Thread(target=one, args=(w,)) for w in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    t0 = time.monotonic()
    claude.fault({"type": "fail", "status": 503, "times": None})
    measure(0, t0)
    for w in clients:
        bed.wait_active("vps1", w, "local" if w == "merlin" else "gpt")
    t1 = time.monotonic()
    claude.recover()
    measure(1, t1)
    for w in clients:
        bed.wait_active("vps1", w, "claude")
    return out


FAULTS = {
    "503": {"type": "fail", "status": 503, "times": None},
    "429": {"type": "fail", "status": 429, "retry_after": 30, "times": None},
    "refused": None,          # the LLMock process stopped: connection refused
    "500": {"type": "fail", "status": 500, "times": None},
}


def latency(bed, seconds: float) -> dict:
    claude = bed.mocks["vps1/anthropic"]
    client = bed.client("gandalf")
    base = steady_turns(client, min(seconds, 60))
    baseline = mean(t.latency for t in base if t.ok)
    rows = {"baseline": {"mean_s": round(baseline, 2), "turns": len(base)}}
    for mode in ("hermes-alone", "neverdark"):
        for name, fault in FAULTS.items():
            bed.wait_active("vps1", "gandalf", "claude")
            if mode == "hermes-alone":
                bed.ssh("vps1", "systemctl stop neverdark-sidecar")
            if fault is None:
                claude.stop()
            else:
                claude.fault(fault)
            turns = steady_turns(client, seconds)
            if fault is None:
                claude.start()
            claude.recover()
            if mode == "hermes-alone":
                bed.ssh("vps1", "systemctl start neverdark-sidecar")
            ok = [t for t in turns if t.ok]
            rows[f"{mode}/{name}"] = {
                "turns": len(turns), "failed": len(turns) - len(ok),
                "mean_s": round(mean(t.latency for t in ok), 2),
                "added_s": round(mean(t.latency for t in ok) - baseline, 2),
                "answered_by": {m: sum(t.model == m for t in ok) for m in sorted({str(t.model) for t in ok})}}
            print(f"  {mode:13} {name:8} {json.dumps(rows[f'{mode}/{name}'])}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=300, help="per outage and mode")
    parser.add_argument("--skip-flips", action="store_true")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="neverdark-failover-bench-"))
    with Testbed(run_dir) as bed:
        result = bed.deploy()
        if result.rc != 0:
            print(result.output[-4000:])
            return 1
        report: dict = {}
        if not args.skip_flips:
            report["flips"] = flips(bed)
            print("flips:", json.dumps(report["flips"], indent=2), flush=True)
        report["latency"] = latency(bed, args.seconds)
        (run_dir / "failover-bench.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
