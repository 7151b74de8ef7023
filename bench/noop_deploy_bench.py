"""What a no-op deploy costs, for 2 and 5 test hosts, side by side in one run.

    .venv/bin/python bench/noop_deploy_bench.py [--rounds 3]

Boots five vps test hosts, each with one wizard (cloud primary, local Gemma fallback: its model
uploaded and served), deploys a 2-host inventory (vps1, vps2) and the 5-host one, then times
no-op re-runs of each, alternating, `--rounds` times. Every no-op run is made with pyinfra's
--debug, and the bench counts the facts that would hash a model file (Sha256File on
/var/lib/neverdark/models) and any sha256sum it ran: a no-op run must not hash gigabytes (a 3 GB
model on a Pi's SD card is minutes). Prints the medians and the 5-host/2-host ratio.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neverdark import contract  # noqa: E402
from testbed.bed import Testbed  # noqa: E402

HOSTS = [f"vps{i}:vps:3072" for i in range(1, 6)]


def subset(inv: dict, hosts: set[str]) -> dict:
    out = dict(inv)
    out["hosts"] = {h: v for h, v in inv["hosts"].items() if h in hosts}
    out["wizards"] = {w: v for w, v in inv["wizards"].items() if v["host"] in hosts}
    return out


def model_hashes(output: str) -> int:
    facts = re.findall(r"Getting fact: files\.Sha256File \(path=([^)]*)\)", output)
    runs = re.findall(r"sha256sum\s+\S*" + re.escape(contract.MODELS_DIR), output)
    return sum(contract.MODELS_DIR in f for f in facts) + len(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="neverdark-noop-") as tmp, \
            Testbed(Path(tmp), hosts=HOSTS) as bed:
        full = bed.inventory(bed.default_wizards())
        paths = {}
        for n, hosts in ((2, {"vps1", "vps2"}), (5, set(full["hosts"]))):
            paths[n] = Path(tmp) / f"fleet-{n}.yaml"
            paths[n].write_text(yaml.safe_dump(subset(full, hosts), sort_keys=False))
        for n in (2, 5):
            t = time.monotonic()
            first = bed.deploy(paths[n])
            assert first.rc == 0, first.output[-4000:]
            print(f"deploy, {n} hosts: {time.monotonic() - t:6.1f} s ({first.changed} changes)",
                  flush=True)
        seconds: dict[int, list[float]] = {2: [], 5: []}
        hashed = {2: 0, 5: 0}
        for _ in range(args.rounds):
            for n in (2, 5):
                t = time.monotonic()
                again = bed.deploy(paths[n], extra=("--debug",))
                seconds[n].append(time.monotonic() - t)
                assert again.rc == 0 and again.changed == 0, again.changed_ops
                hashed[n] += model_hashes(again.output)
        # The control: asked to re-hash, the same count sees every model file.
        t = time.monotonic()
        verify = bed.deploy(paths[5], extra=("--debug", "--data", "verify_models=true"))
        verify_s = time.monotonic() - t
        assert verify.rc == 0 and verify.changed == 0, verify.changed_ops
        m2, m5 = statistics.median(seconds[2]), statistics.median(seconds[5])
        print(f"no-op re-run, 2 hosts: median {m2:5.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[2])})")
        print(f"no-op re-run, 5 hosts: median {m5:5.1f} s  ({', '.join(f'{s:.1f}' for s in seconds[5])})")
        print(f"5-host / 2-host: {m5 / m2:.2f}  (goal <= 1.5)")
        print(f"model files hashed in no-op runs: {hashed[2] + hashed[5]}  (goal 0)")
        print(f"control, 5 hosts with --data verify_models=true: {verify_s:5.1f} s, "
              f"{model_hashes(verify.output)} model files hashed")


if __name__ == "__main__":
    main()
