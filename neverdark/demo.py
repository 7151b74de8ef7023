"""The demo: the built-in test fleet, deployed the way an operator deploys a real one.

    make demo        (runs scripts/setup.sh, then this)

Boots two Debian 12 hosts (a VPS and a Pi profile) with systemd-nspawn, starts LLMock servers
as their cloud APIs, writes an inventory with three wizards, runs
`pyinfra inventory deploys/fleet.py`, re-runs it to show it changes nothing, and prints where
each wizard and model runs and what each sidecar sees.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from neverdark import plan
from neverdark.inventory import validate
from neverdark.testbed import Testbed


def say(text: str = "") -> None:
    print(text, flush=True)


def main() -> int:
    keep = "--keep" in sys.argv
    run_dir = Path(tempfile.mkdtemp(prefix="neverdark-demo-"))
    say(f"neverdark demo: working in {run_dir}")
    with Testbed(run_dir) as bed:
        say("test fleet up: " + ", ".join(f"{n} ({h['profile']}, {h['address']}, ssh as {h['user']})"
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

        env = dict(os.environ, NEVERDARK_SECRETS=str(bed.secrets_path))
        fleet = validate(bed.inventory_path, env=env)
        say("where everything runs:")
        for line in plan.summary(fleet):
            say("  " + line)
        say()
        say("what each sidecar sees (GET 127.0.0.1:9470/status on the host):")
        say(f"  {'wizard':10} {'host':6} {'active':8} {'backends (healthy?)'}")
        for host in sorted(fleet.hosts):
            status = bed.sidecar_status(host)
            for name, w in sorted(status["wizards"].items()):
                health = ", ".join(f"{b}:{'up' if s.get('healthy') else 'down'}"
                                   for b, s in w["backends"].items())
                say(f"  {name:10} {host:6} {w['active']:8} {health}")
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
