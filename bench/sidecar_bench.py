"""Sidecar benchmark: prints figures for the README (not a timed test).

    .venv/bin/python bench/sidecar_bench.py [--seconds 60] [--intervals 2,10] [--probes 20]

Everything is real and on loopback:
- one `llmock serve` process (its Anthropic, OpenAI and Gemini routes stand in for the clouds)
  and one llama-cpp-python server (the deployed launcher, testbed.llama_server) with the real
  Gemma 3 270M GGUF (the `local` kind);
- probe latency: `sidecar.probes.probe()` called directly, N times per backend kind, over one
  shared httpx.AsyncClient as the daemon uses it (after 2 unrecorded warm-up calls per row);
- footprint: the real daemon (`python -m sidecar --config ...`) as a subprocess with 3 wizards
  (anthropic->local, local->google, anthropic->openai->local; 7 probed backends), once per probe
  interval. RSS is VmRSS from /proc/PID/status at the end of the window (VmHWM = peak); CPU is
  utime+stime from /proc/PID/stat over the window, as % of one core. The window starts after the
  daemon's first full probe round, so interpreter start-up and imports are not counted.
  All backends stay healthy, so no switch happens and `--systemctl /bin/false` is never run;
  the script checks that (failures and switches are printed).

Runs are sequential (one daemon at a time, latency measured with no daemon running), so the
figures do not disturb each other on a small machine.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sidecar import flip  # noqa: E402
from sidecar.probes import probe  # noqa: E402
from testbed.hermes_gateway import variant  # noqa: E402
from testbed.llama_server import LlamaServer  # noqa: E402
from testbed.llmock import LLMock, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOCAL_MODEL = "gemma3-270m"


# --- servers ----------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL to the process's own group (every child here has its own session)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# --- probe latency ----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation): p95 of 20 samples is the 19th smallest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def probe_latencies(mock: LLMock, llama: LlamaServer, n: int) -> list[dict]:
    def b(kind, base, model, key):
        return SimpleNamespace(name=f"bench-{kind}", kind=kind, base_url=base, model=model,
                               api_key=key, variant=Path("/nonexistent"))

    rows = [
        ("anthropic", "list models", "LLMock", b("anthropic", mock.anthropic_base, "claude-sonnet-4-5", "sk-ant-bench"), False),
        ("openai", "list models", "LLMock", b("openai", mock.openai_base, "gpt-4o-mini", "sk-bench"), False),
        ("google", "list models", "LLMock", b("google", mock.google_base, "gemini-2.0-flash", "g-bench"), False),
        ("local", "liveness (GET /health, then /metrics)", "llama-cpp-python, Gemma 3 270M", b("local", llama.base_url, LOCAL_MODEL, None), False),
        ("local", "deep (1-token completion)", "llama-cpp-python, Gemma 3 270M", b("local", llama.base_url, LOCAL_MODEL, None), True),
        ("anthropic", "deep (1 token, paid_probe)", "LLMock", b("anthropic", mock.anthropic_base, "claude-sonnet-4-5", "sk-ant-bench"), True),
        ("openai", "deep (1 token, paid_probe)", "LLMock", b("openai", mock.openai_base, "gpt-4o-mini", "sk-bench"), True),
        ("google", "deep (1 token, paid_probe)", "LLMock", b("google", mock.google_base, "gemini-2.0-flash", "g-bench"), True),
    ]
    out = []
    async with httpx.AsyncClient(follow_redirects=False) as client:
        for kind, what, server, backend, deep in rows:
            timeout = 60.0 if deep and kind == "local" else 5.0
            for _ in range(2):  # warm-up: connection set-up, server-side first-call costs
                await probe(backend, client, timeout, deep=deep)
            lat = []
            for _ in range(n):
                r = await probe(backend, client, timeout, deep=deep)
                if not r.ok:
                    raise RuntimeError(f"{kind} {what} probe failed: {r.reason} {r.detail}")
                lat.append(r.latency * 1000)
            out.append({"kind": kind, "what": what, "server": server, "n": n,
                        "median": statistics.median(lat), "p95": percentile(lat, 0.95)})
    return out


# --- the daemon -------------------------------------------------------------------------------

def write_site(root: Path, mock: LLMock, llama: LlamaServer, interval: float) -> Path:
    """sidecar.yaml, secrets, variants and active configs for 3 wizards under `root`."""
    chains = {
        "merlin": [("claude", "anthropic"), ("local", "local")],
        "morgana": [("local", "local"), ("gemini", "google")],
        "gandalf": [("claude", "anthropic"), ("gpt", "openai"), ("local", "local")],
    }
    urls = {"anthropic": mock.anthropic_base, "openai": mock.openai_base,
            "google": mock.google_base, "local": llama.base_url}
    models = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o-mini",
              "google": "gemini-2.0-flash", "local": LOCAL_MODEL}
    providers = {"anthropic": "anthropic", "openai": "openai", "google": "gemini", "local": "custom"}
    secrets: dict[str, str] = {}
    wizards = {}
    for w, chain in chains.items():
        wdir = root / "wizards" / w
        (wdir / "backends").mkdir(parents=True)
        (wdir / "managed").mkdir()
        (wdir / "home").mkdir()
        backends = []
        for name, kind in chain:
            v = variant(wdir / "backends" / f"{name}.yaml", provider=providers[kind],
                        model=models[kind], base_url=urls[kind])
            entry = {"name": name, "kind": kind, "base_url": urls[kind], "model": models[kind],
                     "variant": str(v)}
            if kind != "local":
                env = f"{kind.upper()}_KEY_{w.upper()}"
                secrets[env] = f"sk-bench-{kind}-{w}-0123456789"
                entry["api_key_env"] = env
            backends.append(entry)
        active = wdir / "managed" / "config.yaml"
        flip.atomic_install(Path(backends[0]["variant"]), active)
        api_env = f"WIZARD_{w.upper()}_API_KEY"
        secrets[api_env] = f"nd-bench-{w}-0123456789"
        wizards[w] = {"unit": f"neverdark-wizard-{w}.service", "api_port": free_port(),
                      "api_key_env": api_env, "home": str(wdir / "home"),
                      "active_config": str(active), "backends": backends}
    env_file = root / "sidecar.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    os.chmod(env_file, 0o600)
    doc = {"listen": f"127.0.0.1:{free_port()}",
           "control_socket": str(root / "run" / "control.sock"),
           "state_dir": str(root / "state"), "secrets_file": str(env_file),
           "probe": {"interval": interval},
           "wizards": wizards}
    (root / "run").mkdir()
    path = root / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cpu_ticks(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is field 3
    return int(fields[11]) + int(fields[12])     # utime (14), stime (15)


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


_METRIC = re.compile(r'^(neverdark_\w+)\{([^}]*)\} (\S+)$')


def metrics(port: int) -> dict[str, float]:
    """Sums of the counters the benchmark checks: probes done, probe failures, switches."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    sums = {"probes": 0.0, "failures": 0.0, "switches": 0.0}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name == "neverdark_probe_latency_seconds_count":
            sums["probes"] += float(value)
        elif name == "neverdark_probe_failures_total":
            sums["failures"] += float(value)
        elif name == "neverdark_transitions_total":
            sums["switches"] += float(value)
    return sums


def run_daemon(root: Path, mock: LLMock, llama: LlamaServer, interval: float,
               seconds: float) -> dict:
    site = write_site(root, mock, llama, interval)
    cfg = yaml.safe_load(site.read_text())
    port = int(cfg["listen"].rsplit(":", 1)[1])
    n_backends = sum(len(w["backends"]) for w in cfg["wizards"].values())
    log_path = root / "sidecar.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "--config", str(site), "--systemctl", "/bin/false"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")})
        try:
            # Ready = /healthz answers and every backend has been probed once.
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited {proc.returncode}: "
                                       f"{log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("sidecar not ready (first probe round) in 60 s")
                try:
                    if metrics(port)["probes"] >= n_backends:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            time.sleep(0.5)  # let the first round's state save and log lines finish
            before = metrics(port)
            rss_start = status_kb(proc.pid, "VmRSS")
            t0, c0 = time.monotonic(), cpu_ticks(proc.pid)
            end = t0 + seconds
            while (left := end - time.monotonic()) > 0:
                if proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited {proc.returncode} during the window")
                time.sleep(min(1.0, left))
            t1, c1 = time.monotonic(), cpu_ticks(proc.pid)
            rss_end = status_kb(proc.pid, "VmRSS")
            hwm = status_kb(proc.pid, "VmHWM")
            after = metrics(port)
        finally:
            stop_process(proc)
    cpu_s = (c1 - c0) / CLK_TCK
    return {"interval": interval, "window": t1 - t0, "wizards": len(cfg["wizards"]),
            "backends": n_backends, "rss_start": rss_start / 1024, "rss": rss_end / 1024,
            "hwm": hwm / 1024, "cpu_s": cpu_s, "cpu_pct": 100 * cpu_s / (t1 - t0),
            "probes": after["probes"] - before["probes"],
            "failures": after["failures"], "switches": after["switches"],
            "exit": proc.returncode}


# --- main -------------------------------------------------------------------------------------

def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO))
    except ValueError:
        exe_s = str(exe)
    script = Path(__file__).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return shlex.join([exe_s, script_s, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0,
                    help="measurement window per probe interval (default 60)")
    ap.add_argument("--intervals", default="2,10",
                    help="comma-separated probe intervals in s (default 2,10)")
    ap.add_argument("--probes", type=int, default=20,
                    help="probe calls per backend kind for the latency table (default 20)")
    args = ap.parse_args(argv)
    intervals = [float(x) for x in args.intervals.split(",") if x.strip()]

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="neverdark-sidecar-bench-") as tmp:
        tmp = Path(tmp)
        mock = llama = None
        try:
            mock = LLMock(tmp)
            # The deployed launcher: liveness probes its /health (plain llama_cpp.server has none).
            llama = LlamaServer(tmp, n_ctx=2048)
            latencies = asyncio.run(probe_latencies(mock, llama, args.probes))
            runs = []
            for i, interval in enumerate(intervals):
                root = tmp / f"site-{i}"
                root.mkdir()
                runs.append(run_daemon(root, mock, llama, interval, args.seconds))
        finally:
            if llama is not None:
                llama.stop()
            if mock is not None:
                mock.stop()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"command: {command_line()}")
    print(f"machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}; total run {time.monotonic() - started:.0f} s")
    print()
    print("Sidecar footprint, 3 wizards (anthropic→local, local→google, anthropic→openai→local; "
          f"{runs[0]['backends'] if runs else 7} backends, all healthy, on loopback):")
    print()
    print("| probe interval | window | probes in window | RSS | peak RSS (VmHWM) | CPU (% of one core) | probe failures / switches |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['interval']:g} s | {r['window']:.0f} s | {r['probes']:.0f} | "
              f"{r['rss']:.1f} MB | {r['hwm']:.1f} MB | {r['cpu_pct']:.2f} % "
              f"({r['cpu_s']:.2f} s CPU) | {r['failures']:.0f} / {r['switches']:.0f} |")
    print()
    print(f"Probe latency, `sidecar.probes.probe()` on loopback, {args.probes} calls each "
          "(nearest-rank p95):")
    print()
    print("| backend kind | probe | server | median | p95 |")
    print("|---|---|---|---:|---:|")
    for r in latencies:
        print(f"| {r['kind']} | {r['what']} | {r['server']} | {r['median']:.1f} ms | {r['p95']:.1f} ms |")
    bad = [r for r in runs if r["failures"] or r["switches"] or r["exit"] != 0]
    if bad:
        print("\nWARNING: a daemon run saw probe failures or switches, or did not exit 0 on "
              "SIGTERM; its figures include that.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
