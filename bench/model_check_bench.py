"""`neverdark model check` on the test fleet: prints figures for docs/model-check.md (not a test).

    .venv/bin/python bench/model_check_bench.py [--mixed] [WIZARD ...]
                                       # default: merlin gandalf (vps1) radagast (pi1)

Brings the test fleet up (testbed.bed.Testbed: vps1 and pi1 x86_64 with the vps and pi
profiles; with --mixed, pi1 aarch64 under qemu-user, tests/test_fleet_mixed_arch.py's fleet),
deploys it, runs the operator's `neverdark model check WIZARD --json` for each wizard in turn
(one at a time: each is three completions on its host's engine), prints one line of figures per
wizard and the command's wall time, then tears the fleet down. Under emulation pi1's figures are
qemu's, not a Pi's (and a cold prefill there takes minutes).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.bed import MIXED_HOSTS, HOSTS, Testbed  # noqa: E402

CHECK_TIMEOUT = 3600   # a cold Hermes-sized prefill, twice, under qemu-user


def main(argv: list[str]) -> int:
    mixed = "--mixed" in argv
    wizards = [a for a in argv if a != "--mixed"] or ["merlin", "gandalf", "radagast"]
    with tempfile.TemporaryDirectory(prefix="neverdark-model-check-bench-") as tmp, \
            Testbed(Path(tmp), hosts=MIXED_HOSTS if mixed else HOSTS) as bed:
        t = time.monotonic()
        result = bed.deploy()
        if result.rc != 0:
            print(result.output[-4000:])
            return 1
        print(f"deploy {time.monotonic() - t:.0f} s")
        for w in wizards:
            t = time.monotonic()
            proc = bed.neverdark("model", "check", w, "--json", timeout=CHECK_TIMEOUT)
            took = time.monotonic() - t
            try:
                [r] = json.loads(proc.stdout)
            except ValueError:
                print(f"{w}: no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
                continue
            if not r.get("ok"):
                print(f"{w}: FAILED: {r.get('error')}")
                continue
            c = r["completions"]
            print(f"{w} on {r['host']} ({r['backend']}, {r['platform']} prompt "
                  f"{r['prompt_tokens']} tokens): first token cold {r['first_token_s']['cold']} s, "
                  f"warm {r['first_token_s']['warm']} s; prefill {r['prefill_tokens_per_s']} tok/s, "
                  f"decode {r['decode_tokens_per_s']} tok/s; warm turn {r['warm_turn_s']} s "
                  f"({'within' if r['within_budget'] else 'over'} {r['budget_s']:g} s); "
                  f"warm cached {c['warm']['cached_tokens']}, evaluated {c['warm']['prompt_tokens']}; "
                  f"command {took:.0f} s, exit {proc.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
