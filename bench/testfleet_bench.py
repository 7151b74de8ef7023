"""Test fleet benchmark: prints figures for the README (not a timed test).

    .venv/bin/python bench/testfleet_bench.py [--hosts vps1:vps,pi1:pi:aarch64:2048] [--pip]
                                              [--cold] [--many N [--many-mb 256]]

- base image per architecture: build time, or "cached"; with --cold, a fresh build into a
  temporary directory (downloads included, the cache untouched) for each architecture;
- wheelhouse: build time, or "cached";
- N-host up (overlay roots, boot to `running`, sshd answering with the run's keys), and each
  host's boot-to-SSH time (an aarch64 host runs under qemu-user);
- each host's memory: use after boot, peak, limit (its memory_mb), OOM kills; in all, and the
  runner's MemAvailable before the boot and after it;
- with --many N: N light hosts h00..h<N-1> (memory_mb --many-mb), as issue 18's status
  benchmark boots them, instead of --hosts;
- with --pip: offline `pip install hermes-agent[anthropic,messaging]` inside the first host from
  the runner's file server;
- down (clean poweroff of every host) and destroy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neverdark import versions  # noqa: E402
from testbed import fleet as testfleet, wheelhouse  # noqa: E402

MiB = 2**20


def mem_available() -> int:
    """The runner's MemAvailable, bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cold_build(arch: str) -> None:
    """One image build from nothing (apt downloads included), timed, then thrown away."""
    testfleet.ensure_runner_packages({arch})
    testfleet.ensure_binfmt(arch)
    with tempfile.TemporaryDirectory(prefix="neverdark-image-bench-", dir="/var/tmp") as tmp:
        target = Path(tmp) / "root"
        t = time.monotonic()
        testfleet.build_image(arch, target, Path(tmp) / "build.log")
        took = time.monotonic() - t
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()
                   and not f.is_symlink())
        print(f"cold image {arch:8} {took:7.1f} s  ({size / MiB:.0f} MB, mmdebstrap "
              f"{'under qemu-user' if arch != testfleet.NATIVE_ARCH else 'native'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="vps1:vps,pi1:pi",
                    help="NAME[:PROFILE[:ARCH]][:MEMORY_MB],... (ARCH x86_64 or aarch64)")
    ap.add_argument("--pip", action="store_true", help="also time an offline Hermes install")
    ap.add_argument("--cold", action="store_true",
                    help="also time a cold image build for each architecture in --hosts")
    ap.add_argument("--many", type=int, default=0, metavar="N",
                    help="boot N light hosts h00.. instead of --hosts")
    ap.add_argument("--many-mb", type=int, default=256, help="memory_mb of each --many host")
    args = ap.parse_args()
    hosts = [f"h{i:02d}:vps:{args.many_mb}" for i in range(args.many)] if args.many \
        else args.hosts.split(",")
    specs = [testfleet.HostSpec.parse(h) for h in hosts]
    arches = sorted({s.arch for s in specs})

    if args.cold:
        for arch in arches:
            cold_build(arch)
    for arch in arches:
        image, built = testfleet.ensure_image(arch)
        print(f"base image {arch:8} {'cached' if built is None else f'{built:7.1f} s (built)'}"
              f"  {image}")
    cached = wheelhouse.is_complete()
    t = time.monotonic()
    wheels = wheelhouse.ensure_default_wheelhouse()
    print(f"wheelhouse:            {'cached' if cached else f'{time.monotonic() - t:7.1f} s'}"
          f"  {wheels}")

    with tempfile.TemporaryDirectory(prefix="neverdark-fleet-bench-") as tmp:
        fleet = testfleet.FleetContext(Path(tmp), specs, {"wheels": wheels})
        try:
            available = mem_available()
            fleet.up()
            print(f"{len(specs)}-host up:             {fleet.timings['up_s']:7.1f} s "
                  f"({', '.join(n + '=' + h['system_state'] for n, h in fleet.hosts.items())}; "
                  f"roots: {next(iter(fleet.hosts.values()))['root_mode']})")
            for s in specs:
                print(f"  {s.name:10} {s.arch:8} boot to SSH "
                      f"{fleet.timings[f'ready_s:{s.name}']:6.1f} s; memory "
                      f"{fleet.memory_usage(s.name) / MiB:6.0f} MB now, "
                      f"{fleet.memory_peak(s.name) / MiB:6.0f} MB peak of "
                      f"{fleet.memory_limit(s.name) / MiB:.0f} MB")
            used = sum(fleet.memory_usage(s.name) for s in specs)
            peaks = sum(fleet.memory_peak(s.name) for s in specs)
            print(f"memory in all:         {used / MiB:7.0f} MB now ({used / MiB / len(specs):.0f} "
                  f"MB a host), peaks {peaks / MiB:.0f} MB; runner MemAvailable "
                  f"{available / MiB:.0f} -> {mem_available() / MiB:.0f} MB")
            if args.pip:
                name = specs[0].name
                h = fleet.hosts[name]
                t = time.monotonic()
                fleet.ssh(name, "python3 -m venv /tmp/bench-hermes && /tmp/bench-hermes/bin/pip "
                                f"install -q --no-index --trusted-host {h['runner_address']} "
                                f"--find-links {fleet.files_url(name)}/wheels/ "
                                f"'{versions.HERMES_REQUIREMENTS[0]}'", timeout=1800)
                print(f"pip install hermes:    {time.monotonic() - t:7.1f} s (inside {name}, "
                      f"{h['arch']}, offline, from the runner's file server; peak "
                      f"{fleet.memory_peak(name) / MiB:.0f} MB, "
                      f"OOM kills {fleet.oom_events(name)['oom_kill']})")
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
