"""Test fleet benchmark: prints figures for the README (not a timed test).

    .venv/bin/python bench/testfleet_bench.py [--hosts vps1:vps,pi1:pi] [--pip]

- base image: debootstrap build time, or "cached";
- wheelhouse: build time, or "cached";
- N-host up (overlay roots, boot to `running`, sshd answering with the run's keys);
- with --pip: offline `pip install hermes-agent[anthropic,messaging]` inside a host from the
  runner's file server;
- down (clean poweroff of every host) and destroy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neverdark import versions
from testbed import fleet as testfleet, wheelhouse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="vps1:vps,pi1:pi")
    ap.add_argument("--pip", action="store_true", help="also time an offline Hermes install")
    args = ap.parse_args()
    specs = [tuple(h.split(":")) for h in args.hosts.split(",")]

    t = time.monotonic()
    image, built = testfleet.ensure_image()
    print(f"base image:            {'cached' if built is None else f'{built:7.1f} s (built)'}"
          f"  {image}")
    cached = wheelhouse.is_complete()
    t = time.monotonic()
    wheels = wheelhouse.ensure_default_wheelhouse()
    print(f"wheelhouse:            {'cached' if cached else f'{time.monotonic() - t:7.1f} s'}"
          f"  {wheels}")

    with tempfile.TemporaryDirectory(prefix="neverdark-fleet-bench-") as tmp:
        fleet = testfleet.FleetContext(Path(tmp), specs, {"wheels": wheels})
        try:
            fleet.up()
            print(f"{len(specs)}-host up:             {fleet.timings['up_s']:7.1f} s "
                  f"({', '.join(n + '=' + h['system_state'] for n, h in fleet.hosts.items())}; "
                  f"roots: {next(iter(fleet.hosts.values()))['root_mode']})")
            if args.pip:
                name = specs[0][0]
                h = fleet.hosts[name]
                t = time.monotonic()
                fleet.ssh(name, "python3 -m venv /tmp/bench-hermes && /tmp/bench-hermes/bin/pip "
                                f"install -q --no-index --trusted-host {h['runner_address']} "
                                f"--find-links {fleet.files_url(name)}/wheels/ "
                                f"'{versions.HERMES_REQUIREMENTS[0]}'", timeout=900)
                print(f"pip install hermes:    {time.monotonic() - t:7.1f} s (inside {name}, "
                      "offline, from the runner's file server)")
            t = time.monotonic()
            fleet.down()
            print(f"down (poweroff):       {time.monotonic() - t:7.1f} s")
        finally:
            t = time.monotonic()
            fleet.destroy()
            print(f"destroy (after down):  {time.monotonic() - t:7.1f} s; leftovers: "
                  f"{ {k: v for k, v in fleet.leftovers().items() if v} or 'none'}")


if __name__ == "__main__":
    main()
