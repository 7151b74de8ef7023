"""The demo: the built-in test fleet, deployed the way an operator deploys a real one.

    make demo        (runs scripts/setup.sh, then this)

Boots two Debian 12 hosts with systemd-nspawn (an x86_64 VPS and an aarch64 Raspberry Pi under
qemu-user, as tests/test_fleet_mixed_arch.py does), starts LLMock servers
as their cloud APIs, writes an inventory with three wizards, runs
`pyinfra inventory deploys/fleet.py`, re-runs it to show it changes nothing, prints where
each wizard and model runs and the `neverdark status` table, then takes merlin's cloud API down
(503) and brings it back while talking to merlin, and prints the measured failover and failback
times (outage start to the first answer from the local model, recovery to the first answer from
the primary), then drills merlin onto its local model and back with `neverdark drill`, which
shows where each fallback turn's time goes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from neverdark import plan
from testbed.outage import first_answer_from
from testbed.bed import MIXED_HOSTS, Testbed

LOCAL, CLOUD = "gemma3-270m", "claude-sonnet-4-5"


def say(text: str = "") -> None:
    print(text, flush=True)


def show_status(bed) -> None:
    proc = bed.neverdark("status", timeout=120)
    for line in (proc.stdout + proc.stderr).splitlines():
        say("  " + line)
    say()


def secs(value: float | None) -> str:
    return "no answer" if value is None else f"{value:.1f} s"


def outage(bed) -> None:
    """merlin's cloud API goes dark (503) and comes back; a user keeps talking throughout."""
    merlin = bed.client("merlin")
    claude = bed.mocks["vps1/anthropic"]
    first = merlin.turn("Hello Merlin!")
    say(f"merlin answers from {first.model} in {first.latency:.1f} s")
    say("\n--- outage: vps1's Anthropic API (LLMock) now answers every request with 503 ---")
    t0 = time.monotonic()
    claude.fault({"type": "fail", "status": 503, "times": None})
    down = first_answer_from(merlin, LOCAL, t0)
    bed.wait_active("vps1", "merlin", "local")
    say(f"  outage start -> first answer from the local model: {secs(down.seconds)} "
        f"({len(down.turns)} turns, {down.failed} failed)")
    switch = bed.sidecar_status("vps1")["wizards"]["merlin"]["transitions"][-1]
    say(f"  sidecar: {switch['from']} -> {switch['to']} ({switch['reason']}), verified switch "
        f"took {switch['timings'].get('total', 0):.1f} s")
    turn = merlin.turn("How are you feeling?")
    say(f"  a turn now: answered by {turn.model} in {turn.latency:.1f} s: {turn.content[:70]!r}")
    say("\n$ neverdark status")
    show_status(bed)
    say("--- recovery: the API answers again ---")
    t1 = time.monotonic()
    claude.recover()
    up = first_answer_from(merlin, CLOUD, t1)
    say(f"  recovery -> first answer from the primary again: {secs(up.seconds)} "
        f"({len(up.turns)} turns, {up.failed} failed; failback waits for rise passes and the "
        f"dwell on the fallback)")
    bed.wait_active("vps1", "merlin", "claude")
    say(f"\nfailover {secs(down.seconds)}, failback {secs(up.seconds)}, "
        f"failed turns {down.failed + up.failed}\n")
    say("$ neverdark status")
    show_status(bed)


def drill(bed) -> None:
    """Where a fallback turn's time goes: the operator's drill onto the local model, each turn
    broken down by the engine's own counters (queue, prompt and cache hits, prefill, generation,
    cache save, gateway)."""
    say("$ neverdark drill merlin --to local --turns 2")
    proc = bed.neverdark("drill", "merlin", "--to", "local", "--turns", "2", timeout=900)
    for line in (proc.stdout + proc.stderr).splitlines():
        say("  " + line)
    say()


def main() -> int:
    keep = "--keep" in sys.argv
    run_dir = Path(tempfile.mkdtemp(prefix="neverdark-demo-"))
    say(f"neverdark demo: working in {run_dir}")
    with Testbed(run_dir, hosts=MIXED_HOSTS) as bed:
        say("test fleet up: " + ", ".join(f"{n} ({h['profile']}, {h['arch']}"
                                          f"{' under qemu-user' if h.get('emulated') else ''}, "
                                          f"{h['address']}, ssh as {h['user']})"
                                          for n, h in bed.fleet.hosts.items()))
        say(f"inventory: {bed.inventory_path}\n")
        say("$ pyinfra -y inventory deploys/fleet.py")
        t = time.monotonic()
        first = bed.deploy()
        if first.rc != 0:
            say(first.output[-5000:])
            say("deploy failed")
            return 1
        say(f"  fresh deploy: {first.changed} changes in {time.monotonic() - t:.0f} s")
        t = time.monotonic()
        again = bed.deploy()
        say(f"  second run:   {again.changed} changes in {time.monotonic() - t:.0f} s\n")

        fleet = bed.validated()
        say("where everything runs:")
        for line in plan.summary(fleet):
            say("  " + line)
        say()
        say("$ neverdark status")
        show_status(bed)
        outage(bed)
        drill(bed)
        if keep:
            say(f"\n--keep: hosts stay up; ssh -F {bed.fleet.ssh_config} vps1 ; Ctrl-C to end")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
