"""A stand-in sidecar: the real control socket and HTTP `/status` protocol, no probing.

`neverdark status` and the panel read a host through its sidecar's control socket
(`python -m sidecar.ctl status`); a benchmark with twenty light hosts, or a browser test of the
panel, needs that answer without LLM backends and Hermes gateways behind it. This serves it with
the sidecar's own servers (`sidecar.control.serve`: socket permissions and peer credentials;
`sidecar.http_api.HttpApi`) and a status document of the daemon's shape (tests/test_status.py
compares the two key by key), built from a scenario file:

    {"interval": 2,
     "wizards": {"merlin": {"chain": ["claude", "local"], "active": "claude", "since": 1.7e9,
                            "why": "start", "dark": false, "pinned": null,
                            "health": {"claude": {"healthy": true}, "local": {"healthy": true}},
                            "transitions": []}}}

The file is read on every request, so a test flips a wizard by rewriting it (`switch()`), as a
sidecar's automatic failover would; `failover`, `pin` and `release` requests change it as the
real ones change the real sidecar. Backends look probed every `interval` seconds. Runs on a test
host with only the host's python3 and the sidecar's code on PYTHONPATH:

    python3 -m testbed.standin_sidecar --scenario FILE [--socket PATH] [--listen 127.0.0.1:9470]
        [--meminfo /proc/meminfo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sidecar.control import serve as serve_control
from sidecar.http_api import HttpApi
from sidecar.meminfo import MEMINFO, memory_status

SOCKET = "/run/neverdark-sidecar/control.sock"
LISTEN = "127.0.0.1:9470"
SETTINGS = {"interval": 10, "timeout": 5, "fall": 3, "rise": 2, "min_dwell": 60,
            "cooldown_429": 60, "damping_base": 30, "damping_cap": 300, "max_hold": 3600,
            "paid_probe": False}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(
        timespec="seconds")


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save(path: Path, scenario: dict) -> None:
    """Atomically: a request never reads half a scenario."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(scenario, indent=1))
    os.replace(tmp, path)


def wizard(chain: list[str], active: str | None = None, since: float | None = None,
           why: str = "start", health: dict | None = None, dark: bool = False) -> dict:
    """One wizard of a scenario; every backend healthy unless `health` says otherwise."""
    return {"chain": list(chain), "active": active or chain[0],
            "since": time.time() if since is None else since, "why": why, "dark": dark,
            "pinned": None, "health": {b: {"healthy": True, **(health or {}).get(b, {})}
                                       for b in chain},
            "transitions": []}


def switch(path: Path, name: str, to: str, why: str, *, kind: str = "failover",
           health: dict | None = None, dark: bool | None = None, now: float | None = None) -> dict:
    """Move `name` to `to` in the scenario file, as an automatic switch would; returns the
    transition record."""
    scenario = load(path)
    w = scenario["wizards"][name]
    now = time.time() if now is None else now
    record = {"from": w["active"], "to": to, "kind": kind, "reason": why, "ok": True,
              "detail": "", "at": now, "timings": {}}
    w.update(active=to, since=now, why=why)
    w["transitions"] = (w.get("transitions") or [])[-9:] + [record]
    for b, h in (health or {}).items():
        w["health"].setdefault(b, {}).update(h)
    if dark is not None:
        w["dark"] = dark
    save(path, scenario)
    return record


def status_document(scenario: dict, now: float, meminfo: Path = MEMINFO) -> dict:
    """The daemon's `status()` shape (sidecar.daemon.Daemon.status, policy.describe); the
    memory as `meminfo` says (a test's file, or the host's)."""
    interval = float(scenario.get("interval") or SETTINGS["interval"])
    probed = now - (now % interval)      # as if every backend were probed each interval
    wizards = {}
    for name, w in scenario["wizards"].items():
        backends = {}
        for b in w["chain"]:
            h = {"healthy": True, "key_rejected": False, "held_for": 0.0, "hold_note": "",
                 **w.get("health", {}).get(b, {})}
            ok = h["healthy"] is True and not h["key_rejected"]
            backends[b] = {"healthy": h["healthy"], "usable": ok and not h["held_for"],
                           "passes": 2 if ok else 0, "fails": 0 if ok else 3,
                           "held_for": float(h["held_for"]), "hold_note": h["hold_note"],
                           "key_rejected": h["key_rejected"], "last_ok": ok,
                           "last_at": probed, "last_reason": h.get("last_reason") or
                           ("ok" if ok else "key_rejected" if h["key_rejected"] else "http_5xx")}
        transitions = [{**t, "at_iso": _iso(t.get("at"))} for t in w.get("transitions") or []]
        wizards[name] = {
            "active": w["active"], "since": w["since"], "why": w["why"], "dark": w["dark"],
            "pinned": w.get("pinned"), "forced": None, "deferred": None, "stay_for": None,
            "intent": None, "damping_hold": 0.0, "restart_budget": None,
            "settings": {**SETTINGS, "interval": interval}, "backends": backends,
            "transitions": transitions, "since_iso": _iso(w["since"]), "switching": False,
            "retiring": False}
    return {"at": _iso(now), "wizards": wizards, "memory": memory_status(meminfo)}


class StandIn:
    def __init__(self, scenario: Path, meminfo: Path = MEMINFO) -> None:
        self.path = Path(scenario)
        self.meminfo = Path(meminfo)

    def status(self) -> dict:
        return status_document(load(self.path), time.time(), self.meminfo)

    async def handle(self, request: dict, peer_uid: int) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": self.status()}
        scenario = load(self.path)
        name = request.get("wizard")
        w = scenario["wizards"].get(name)
        if w is None:
            return {"ok": False, "error": f"unknown wizard {name!r} (on this host: "
                                          f"{', '.join(scenario['wizards'])})"}
        to = request.get("to")
        if to is not None and to not in w["chain"]:
            return {"ok": False, "wizard": name,
                    "error": f"{name} has no backend {to!r} ({', '.join(w['chain'])})"}
        if op == "release":
            w["pinned"] = None
            save(self.path, scenario)
            return {"ok": True, "wizard": name, "active": w["active"], "pinned": None}
        if op == "pin":
            w["pinned"] = to or w["active"]
            save(self.path, scenario)
            if w["pinned"] == w["active"]:
                return {"ok": True, "wizard": name, "active": w["active"], "pinned": w["pinned"]}
            to = w["pinned"]
        if to is None:
            rest = [b for b in w["chain"] if b != w["active"]]
            to = rest[0] if rest else w["active"]
        record = switch(self.path, name, to, f"operator {op}", kind="forced")
        return {"ok": True, "wizard": name, "active": to, "transition": record}


REPO = Path(__file__).resolve().parent.parent


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalStandIns:
    """Stand-in sidecars on this machine, one per inventory host, for tests with no test fleet.

    `transport` is a neverdark.status transport: instead of ssh, it runs the host's read
    command (neverdark.status_read.read_command, with this host's socket and meminfo file) locally,
    so everything but the SSH hop is what `neverdark status` does.
    """

    def __init__(self, root: Path, scenarios: dict[str, dict],
                 memory: dict[str, tuple[int, int]] | None = None) -> None:
        self.root = Path(root)
        self.scenarios = scenarios
        self.memory = memory or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def dir(self, host: str) -> Path:
        return self.root / host

    def scenario(self, host: str) -> Path:
        return self.dir(host) / "scenario.json"

    def socket(self, host: str) -> Path:
        return self.dir(host) / "control.sock"

    def set_memory(self, host: str, total_kb: int, available_kb: int) -> None:
        (self.dir(host) / "meminfo").write_text(
            f"MemTotal:       {total_kb} kB\nMemFree:        {available_kb // 2} kB\n"
            f"MemAvailable:   {available_kb} kB\n")

    def start(self, timeout: float = 20) -> "LocalStandIns":
        from testbed.llmock import free_port
        for host, scenario in self.scenarios.items():
            self.dir(host).mkdir(parents=True, exist_ok=True)
            save(self.scenario(host), scenario)
            self.set_memory(host, *self.memory.get(host, (4_000_000, 3_000_000)))
            log = open(self.dir(host) / "standin.log", "wb")
            self.ports[host] = free_port()
            self.procs[host] = subprocess.Popen(
                [sys.executable, "-m", "testbed.standin_sidecar", "--scenario",
                 str(self.scenario(host)), "--socket", str(self.socket(host)),
                 "--listen", f"127.0.0.1:{self.ports[host]}",
                 "--meminfo", str(self.dir(host) / "meminfo")],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + timeout
        for host in self.scenarios:
            while not self.socket(host).exists() or not _listening(self.ports[host]):
                if self.procs[host].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stand-in sidecar for {host} did not start: "
                                       + (self.dir(host) / "standin.log").read_text())
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalStandIns":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, host: str) -> str:
        from neverdark.status_read import read_command
        return read_command(port=self.ports[host], meminfo=str(self.dir(host) / "meminfo"))

    def forward(self, host: str, port: int, data: bytes, timeout: float) -> bytes:
        """A neverdark.status_read forward: what a forwarded channel to the sidecar's port on
        the host's loopback carries (the request, our end shut, the answer until the far end
        closes), over a TCP connection of this machine to the host's stand-in (on a port of
        its own here, whatever `port` the inventory says), with the same limits: Unanswered
        past FORWARD_ANSWER_S, TimeoutExpired past `timeout`."""
        import socket
        from neverdark.ssh_mux import Unanswered, Unavailable
        from neverdark.status_read import FORWARD_ANSWER_S
        if host not in self.procs:
            raise Unavailable("no kept connection to forward over")
        deadline = time.monotonic() + timeout
        answer_by = min(deadline, time.monotonic() + FORWARD_ANSWER_S)
        try:
            conn = socket.create_connection(("127.0.0.1", self.ports[host]), timeout=timeout)
        except ConnectionRefusedError:
            raise Unavailable("Session open refused by peer") from None
        except TimeoutError:
            raise subprocess.TimeoutExpired(["forward", host], timeout) from None
        answer = b""
        with conn:
            try:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                while True:
                    conn.settimeout(max(0.001, answer_by - time.monotonic()))
                    chunk = conn.recv(65536)
                    if not chunk:
                        return answer
                    answer += chunk
            except TimeoutError:
                if answer_by < deadline:
                    raise Unanswered(f"no end within {FORWARD_ANSWER_S} s") from None
                raise subprocess.TimeoutExpired(["forward", host], timeout) from None

    def transport(self, host: str, command: str, timeout: float) -> subprocess.CompletedProcess:
        if host not in self.procs:      # as ssh says of a host it cannot reach
            return subprocess.CompletedProcess([], 255, "", f"ssh: connect to host {host} "
                                               "port 22: Connection refused\n")
        return subprocess.run(["sh", "-c", self.command(host)], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


async def main_async(args) -> None:
    standin = StandIn(Path(args.scenario), Path(args.meminfo))
    host, _, port = args.listen.rpartition(":")
    api = HttpApi(standin.status, lambda: "", lambda: True)
    http = await api.start(host, int(port))
    control = await serve_control(Path(args.socket), standin.handle)
    print(f"stand-in sidecar: {args.socket}, http://{args.listen}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        http.close()
        control.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.standin_sidecar")
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--socket", default=SOCKET)
    ap.add_argument("--listen", default=LISTEN)
    ap.add_argument("--meminfo", default=str(MEMINFO), help="the memory /status reports")
    try:
        asyncio.run(main_async(ap.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
