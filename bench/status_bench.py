"""`neverdark status` at fleet scale: 2 hosts against 20 (or --hosts N), printed, not asserted.

    flock /tmp/nd-fleet.lock .venv/bin/python bench/status_bench.py [--hosts 20] [--rounds 7]

Light test hosts (testbed.light_hosts): the test fleet's nspawn Debian hosts (real systemd and
sshd; every fourth a `pi` profile, reached as `pi` through sudo as a real Pi is), each with a
stand-in sidecar (testbed/standin_sidecar.py: the sidecar's own control-socket and HTTP servers, a
status document of the daemon's shape, the host's memory in it) installed where the deploy puts
the real one, so each host is asked what a real one is, over SSH, as the inventory's login user:
its /status through a forwarded channel, or the read command (neverdark.status_read.read_command:
bash reads /proc/meminfo and the sidecar's GET /status).

Each round runs the real CLI (`neverdark status --json`, a new process: inventory validation,
ssh to every host, the table's snapshot) against an inventory of the first 2 hosts and against
one of all of them, alternately, so both see the same machine load; the medians' ratio is the
figure. Four times each round: a first contact (every kept connection closed before it: a new
SSH connection to each host, as a `status` a few minutes after the last one), then the same
again over the connections that run kept (neverdark.remote: as `--watch`, the panel's polls, or
a `status` again within a minute): with an ssh process per host (NEVERDARK_SSH_MUX=0), with none
but the read command run in a session on each host (NEVERDARK_SSH_FORWARD=0), and as by default
(neverdark.ssh_mux speaks to each master itself, and the host runs no command: /status comes
through a forwarded channel to the sidecar's port). The CPU each side spends is measured too:
the operator's (the CLI, its ssh processes and the kept connections' masters) and the hosts'
(the rest of this machine's busy time meanwhile: sshd, shells, stand-ins). On a real fleet each
host's share runs on that host, while here all twenty share this machine's cores with the
operator. One more run asks the N hosts one at a time (--parallel 1), for scale. Every run's
answer is checked (all hosts reached, the summary's counts as the scenarios say)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neverdark import remote  # noqa: E402
from neverdark.inventory import validate  # noqa: E402
from testbed import light_hosts, standin_sidecar  # noqa: E402
from testbed.fleet import HostSpec, fleet_context  # noqa: E402

NEVERDARK = Path(sys.executable).with_name("neverdark")


def specs(n: int) -> list[HostSpec]:
    return [HostSpec(f"h{i:02d}", "pi" if i % 4 == 3 else "vps", memory_mb=384) for i in range(n)]


def scenario(i: int) -> dict:
    """Host i's wizard: most on their primary, every 5th on its fallback, every 9th dark."""
    w = standin_sidecar.wizard(["claude", "local"], since=time.time() - 600 - i)
    if i % 9 == 8:
        w.update(dark=True, why="nothing healthy")
        w["health"]["claude"]["healthy"] = w["health"]["local"]["healthy"] = False
    elif i % 5 == 4:
        w.update(active="local", why="claude failed 3 probes (http_5xx)")
        w["health"]["claude"]["healthy"] = False
    return {"interval": 2, "wizards": {light_hosts.wizard_name(i): w}}


def expected(n: int) -> dict:
    dark = sum(i % 9 == 8 for i in range(n))
    fallback = sum(i % 5 == 4 and i % 9 != 8 for i in range(n))
    return {"primary": n - dark - fallback, "fallback": fallback, "dark": dark,
            "unreachable": 0}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def machine_cpu() -> float:
    """CPU seconds this machine's cores have been busy (every process: /proc/stat's cpu line,
    all but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def masters_cpu() -> dict[int, float]:
    """CPU seconds so far of each kept connection's master (an ssh process of this machine with
    a ControlPath in neverdark's socket directory): they left the CLI's process tree when they
    went to the background, so its children's CPU does not count them."""
    tick, found = os.sysconf("SC_CLK_TCK"), {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"neverdark-ssh-" not in (proc / "cmdline").read_bytes():
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(proc.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            continue
    return found


def run_status(inv: Path, n: int, *extra: str, env: dict | None = None,
               ) -> tuple[float, dict, float, float]:
    """(wall seconds, the snapshot, CPU seconds of the operator's side: the CLI, its ssh
    processes and the kept connections' masters; CPU seconds of everything else on this
    machine meanwhile: the hosts' sshd, shells and sidecars)."""
    cpu, masters, busy = children_cpu(), masters_cpu(), machine_cpu()
    started = time.monotonic()
    proc = subprocess.run([str(NEVERDARK), "status", "--json", "--inventory", str(inv), *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    took, cpu = time.monotonic() - started, children_cpu() - cpu
    cpu += sum(t - masters.get(pid, 0.0) for pid, t in masters_cpu().items())
    others = max(0.0, machine_cpu() - busy - cpu)
    try:
        snap = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"status gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    got = {k: snap["summary"][k] for k in ("primary", "fallback", "dark", "unreachable")}
    if got != expected(n):
        raise SystemExit(f"{n} hosts: summary {got}, expected {expected(n)}:\n"
                         + json.dumps({h: v["error"] for h, v in snap["hosts"].items()}))
    return took, snap, cpu, others


def close_all(inv: Path) -> None:
    """Close every kept connection to the inventory's hosts: the next run is a first contact."""
    fleet = validate(inv, env=os.environ)
    for host in fleet.hosts:
        remote.close_kept(fleet, host)


def summary(label: str, times: dict, cpus: dict, others: dict, n: int) -> float:
    med = {k: statistics.median(t) for k, t in times.items()}
    cpu = {k: statistics.median(c) for k, c in cpus.items()}
    host = {k: statistics.median(c) for k, c in others.items()}
    for k, t in times.items():
        print(f"{label}, {k:2d} hosts: median {med[k]:.2f} s (min {min(t):.2f}, max "
              f"{max(t):.2f}; {len(t)} runs); operator CPU {cpu[k]:.2f} s, hosts' CPU "
              f"{host[k]:.2f} s")
    ratio = med[n] / med[2]
    print(f"{label}: ratio {n}/2 hosts {ratio:.2f}x (target 1.3x); CPU per extra host: "
          f"operator {(cpu[n] - cpu[2]) / (n - 2) * 1000:.0f} ms, the host "
          f"{(host[n] - host[2]) / (n - 2) * 1000:.0f} ms")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--parallel", type=int, default=None,
                    help="passed to every `neverdark status` of the rounds (default: its own)")
    args = ap.parse_args()
    extra = ["--parallel", str(args.parallel)] if args.parallel else []
    if args.hosts < 20:
        print(f"note: {args.hosts} hosts (the figure the README quotes is for 20)")
    with tempfile.TemporaryDirectory(prefix="neverdark-status-bench-") as tmp:
        t0 = time.monotonic()
        with fleet_context(hosts=specs(args.hosts), run_dir=Path(tmp) / "fleet") as fleet:
            names = list(fleet.hosts)
            n = len(names)
            up = time.monotonic() - t0
            for i, name in enumerate(names):
                light_hosts.install_standin(fleet, name, scenario(i))
            for d in ("small", "large"):
                (Path(tmp) / d).mkdir()
            small = light_hosts.inventory(fleet, names[:2], Path(tmp) / "small" / "fleet.yaml")
            large = light_hosts.inventory(fleet, names, Path(tmp) / "large" / "fleet.yaml")
            print(f"{n} light hosts up in {up:.0f} s "
                  f"({sum(fleet.hosts[h]['sudo'] for h in names)} of them pi-profile, login pi); "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
            run_status(large, n)                     # sshd and the page cache warm
            close_all(large)
            # Each round: a first contact (no kept connection: a new `status` after a minute or
            # more), then the same again over the connections it left (`--watch`, the panel,
            # a `status` run again within a minute): with an ssh process per host running the
            # read command (NEVERDARK_SSH_MUX=0, as before neverdark.ssh_mux), with no ssh
            # process but the command run in a session (NEVERDARK_SSH_FORWARD=0), then as by
            # default: no ssh process, no command on the host, /status through a forwarded
            # channel. 2 hosts and 20 alternately, so both see the same machine load.
            modes = {"first contact": {}, "kept, ssh per host": {remote.MUX_ENV: "0"},
                     "kept, session per host": {remote.FORWARD_ENV: "0"},
                     "kept connections": {}}
            times = {how: {2: [], n: []} for how in modes}
            cpus = {how: {2: [], n: []} for how in modes}
            others = {how: {2: [], n: []} for how in modes}
            per_host: dict[str, list[float]] = {how: [] for how in modes}
            for _ in range(args.rounds):
                for inv, k in ((small, 2), (large, n)):
                    close_all(inv)
                    for how, env in modes.items():
                        took, snap, cpu, other = run_status(inv, k, *extra, env=env)
                        times[how][k].append(took)
                        cpus[how][k].append(cpu)
                        others[how][k].append(other)
                        if k == n:
                            per_host[how] += [h["seconds"] for h in snap["hosts"].values()]
            close_all(large)
            serial = run_status(large, n, "--parallel", "1")[0]
            close_all(large)
            load = os.getloadavg()[0]
        for how in modes:
            summary(how, times[how], cpus[how], others[how], n)
        for how, seconds in per_host.items():
            print(f"per-host round trip inside the {n}-host runs, {how}: median "
                  f"{statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
        print(f"{n} hosts one at a time (--parallel 1, first contact): {serial:.2f} s; load at "
              f"the end {load:.1f}")


if __name__ == "__main__":
    main()
