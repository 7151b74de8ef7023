"""The fleet's status, as `neverdark status` and the panel show it.

Every host is asked at once (at most `parallel` at a time, each bounded by `timeout`), in one SSH
round trip per host that starts no interpreter there: bash reads the host's memory (MemTotal and
MemAvailable from /proc/meminfo) and its sidecar's `GET /status` on loopback (the document the
control socket's `status` op returns too), as the login user: /status and /proc/meminfo need no
root, so a Pi's `pi` login needs no sudo. On a Pi, starting the sidecar's Python to ask the
control socket costs more than the whole read (and the panel reads every few seconds). A host
that does not answer in time counts as unreachable and holds up no other.

`collect()` asks, `snapshot()` turns the answers and the inventory into one JSON-able document
(hosts, wizards, a summary), and `render_text()` prints it; the panel serves the same snapshot.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from neverdark import contract, memory_fit, remote
from neverdark.problems import printable

DEFAULT_PARALLEL = 16
DEFAULT_TIMEOUT = 15.0      # s per host: ssh and the sidecar's answer
MEMINFO = "/proc/meminfo"
MARK = "--- neverdark status"
STATES = ("primary", "fallback", "dark", "unreachable", "unknown")
_MEMINFO_LINE = re.compile(r"(MemTotal|MemAvailable):\s+(\d+)\s*kB")

# (host, command, timeout) -> the finished process; the default runs it over SSH.
Transport = Callable[[str, str, float], subprocess.CompletedProcess]


def read_command(port: int = contract.SIDECAR_PORT, meminfo: str = MEMINFO,
                 read_timeout: int = 10) -> str:
    """What runs on a host (bash: its /dev/tcp): the memory lines, a mark, then the sidecar's
    whole HTTP answer to GET /status, read within `read_timeout` s. Only bash's builtins: no
    grep, timeout or cat to start on each host for each read (the panel reads every few
    seconds; on the 20-host benchmark's shared cores each process started was measurable)."""
    addr = f"{contract.LOOPBACK}:{int(port)}"
    script = (
        f"while read -r k v _; do case $k in MemTotal:|MemAvailable:) echo \"$k $v kB\";; "
        f"esac; done < {shlex.quote(meminfo)}; echo '{MARK}'; "
        f"{{ exec 3<>/dev/tcp/{contract.LOOPBACK}/{int(port)}; }} 2>/dev/null || "
        f"{{ echo 'no sidecar answering on {addr} (connection refused)' >&2; exit 3; }}; "
        f"printf 'GET /status HTTP/1.0\\r\\nHost: {addr}\\r\\n\\r\\n' >&3; "
        # a line at a time until EOF; the last may lack its newline; no more than read_timeout
        # seconds in all, however slowly the answer trickles in
        f"while [ $SECONDS -lt {int(read_timeout)} ] && "
        f"{{ IFS= read -r -t $(({int(read_timeout)} - SECONDS)) -u 3 line || [ -n \"$line\" ]; }}; "
        f"do printf '%s\\n' \"$line\"; line=; done")
    return f"exec bash -c {shlex.quote(script)}"


def ssh_transport(fleet) -> Transport:
    def run(host: str, command: str, timeout: float) -> subprocess.CompletedProcess:
        return remote.run(fleet, host, command, timeout=timeout, as_root=False,
                          fleet_read=True)
    return run


@dataclass
class HostReport:
    """One host's answer: the sidecar's status document, or why there is none."""
    host: str
    status: dict | None = None
    error: str | None = None
    mem_total: int | None = None        # bytes
    mem_available: int | None = None    # bytes
    seconds: float = 0.0                # this host's round trip
    asked_at: float = 0.0               # wall time


def _http_status(answer: str) -> dict:
    """The /status document from a whole HTTP answer; ValueError saying what is wrong.
    (Line ends may arrive as \\n: text-mode pipes translate them.)"""
    head, sep, body = answer.replace("\r\n", "\n").partition("\n\n")
    if not sep:
        raise ValueError("the sidecar's answer was cut short" if answer else "no answer")
    line = head.split("\n", 1)[0].split(" ", 2)
    if len(line) < 2 or not line[0].startswith("HTTP/"):
        raise ValueError("not an HTTP answer")
    if line[1] != "200":
        raise ValueError(f"GET /status answered HTTP {' '.join(line[1:])}")
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("wizards"), dict):
        raise ValueError("its /status is not a status document")
    return doc


def parse_reply(host: str, proc: subprocess.CompletedProcess) -> HostReport:
    report = HostReport(host)
    memory, sep, answer = proc.stdout.partition(MARK + "\n")
    for line in memory.splitlines():
        m = _MEMINFO_LINE.fullmatch(line.strip())
        if m:
            value = int(m.group(2)) * 1024
            if m.group(1) == "MemTotal":
                report.mem_total = value
            else:
                report.mem_available = value
    if not sep or proc.returncode == 255:
        report.error = remote.why_no_answer(proc)
        return report
    try:
        report.status = _http_status(answer)
    except ValueError as e:
        said = remote.why_no_answer(proc) if proc.returncode else ""
        report.error = said if proc.returncode and not answer else \
            f"no status from the sidecar: {printable(str(e))}"
    return report


def ask(host: str, transport: Transport, command: str, timeout: float) -> HostReport:
    asked, started = time.time(), time.monotonic()
    proc, why = remote.attempt(lambda: transport(host, command, timeout))
    report = HostReport(host, error=why) if proc is None else parse_reply(host, proc)
    report.asked_at, report.seconds = asked, time.monotonic() - started
    return report


def collect(fleet, hosts=None, *, transport: Transport | None = None,
            parallel: int = DEFAULT_PARALLEL, timeout: float = DEFAULT_TIMEOUT,
            command: str | None = None, pool: ThreadPoolExecutor | None = None,
            ) -> dict[str, HostReport]:
    """Every host's report, in inventory order; at most `parallel` hosts asked at once."""
    names = list(fleet.hosts if hosts is None else hosts)
    transport = transport or ssh_transport(fleet)
    command = command or read_command(fleet.sidecar.port)
    if not names:
        return {}
    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names))),
                                      thread_name_prefix="status")
    try:
        reports = list(pool.map(lambda h: ask(h, transport, command, timeout), names))
    finally:
        if own:
            pool.shutdown()
    return {r.host: r for r in reports}


# --- the snapshot: one document for the table, --json and the panel ------------------------

def health_word(h: dict) -> str:
    if h.get("key_rejected"):
        return "key-rejected"
    if h.get("held_for"):
        return f"held-{h['held_for']:.0f}s"
    return {True: "up", False: "down"}.get(h.get("healthy"), "unknown")


def stale_after(settings: dict | None) -> float:
    """How old a host's newest probe may be before it counts as stale: the sidecar's own stall
    rule (3 intervals, 2 timeouts and 30 s), so a slow round is not a problem."""
    s = {**contract.PROBE_DEFAULTS, **(settings or {})}
    return 3 * float(s["interval"]) + 2 * float(s["timeout"]) + 30


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _wizard(fleet, name: str, report: HostReport | None, now: float) -> dict:
    host = fleet.wizards[name].host
    view: dict = {"host": host, "state": "unreachable", "active": None, "index": None,
                  "chain": [b.name for b in fleet.wizards[name].backends], "since": None,
                  "since_age": None, "why": None, "dark": False, "pinned": None,
                  "switching": False, "backends": {}, "last_transition": None, "problems": []}
    if report is None or report.status is None:
        view["problems"].append((report.error if report else None) or "no answer")
        return view
    st = report.status["wizards"].get(name)
    if not isinstance(st, dict):
        view["state"] = "unknown"
        view["problems"].append("not in the sidecar's config: deploy")
        return view
    backends = st.get("backends") if isinstance(st.get("backends"), dict) else {}
    chain = list(backends) or view["chain"]    # the deployed chain, as the sidecar runs it
    active = st.get("active")
    since = _num(st.get("since"))
    transitions = st.get("transitions") if isinstance(st.get("transitions"), list) else []
    view.update(
        chain=chain, active=active, index=chain.index(active) if active in chain else None,
        since=since, since_age=None if since is None else max(0.0, now - since),
        why=st.get("why"), dark=bool(st.get("dark")), pinned=st.get("pinned"),
        switching=bool(st.get("switching")),
        last_transition=transitions[-1] if transitions else None,
        backends={b: {"health": health_word(h), "healthy": h.get("healthy"),
                      "key_rejected": bool(h.get("key_rejected")),
                      "held_for": _num(h.get("held_for")) or 0.0,
                      "last_reason": h.get("last_reason"), "last_at": _num(h.get("last_at"))}
                  for b, h in backends.items() if isinstance(h, dict)})
    # A local backend served by another host of the fleet: which host answers the wizard now.
    served = {b.name: b.host for b in fleet.wizards[name].backends
              if getattr(b, "host", None) and b.host != host}
    view["served_by"] = served.get(active)
    if view["dark"]:
        view["state"] = "dark"
        view["problems"].append("dark: no healthy backend")
    elif view["index"] == 0:
        view["state"] = "primary"
    elif active is None:
        view["state"] = "unknown"
        view["problems"].append("the sidecar does not know which backend it is on")
    else:
        view["state"] = "fallback"
        view["problems"].append(f"on fallback {active} (primary {chain[0]}: "
                                f"{view['backends'].get(chain[0], {}).get('health', 'unknown')})")
    for b, h in view["backends"].items():
        if h["health"] not in ("up", "unknown") and not (view["state"] == "fallback"
                                                           and b == chain[0]):
            view["problems"].append(f"backend {b}: {h['health']}")
    return view


def _host(fleet, name: str, report: HostReport | None, now: float) -> dict:
    budget = memory_fit.memory_budget(fleet, name)
    memory = {"total": None, "available": None, "available_ratio": None,
              "memory_mb": fleet.hosts[name].memory_mb,
              "planned_mb": sum(mb for _, mb in budget), "headroom_mb": budget[-1][1],
              "low": False}
    view: dict = {"reached": False, "error": None, "seconds": None, "asked_at": None,
                  "last_probe": None, "last_probe_age": None, "memory": memory,
                  "wizards": fleet.wizards_on(name), "problems": [], "sidecar": None}
    if report is None:
        view["error"] = "not asked"
        return view
    view.update(error=report.error, seconds=round(report.seconds, 3), asked_at=report.asked_at)
    if report.mem_total:
        memory.update(total=report.mem_total, available=report.mem_available)
        if report.mem_available is not None:
            memory["available_ratio"] = report.mem_available / report.mem_total
            # The plan keeps `headroom_mb` free for the OS and page cache: less than that
            # available means the host holds more than its budget.
            memory["low"] = report.mem_available < memory["headroom_mb"] * memory_fit.MIB
            if memory["low"]:
                view["problems"].append(
                    f"memory low: {report.mem_available // memory_fit.MIB} MB available, the "
                    f"plan keeps {memory['headroom_mb']} MB headroom")
    if report.status is None:
        view["problems"].insert(0, report.error or "no answer")
        return view
    view["reached"] = True
    view["sidecar"] = report.status
    wizards = [w for w in report.status["wizards"].values() if isinstance(w, dict)]
    probes = [_num(h.get("last_at")) for w in wizards
              for h in (w.get("backends") or {}).values() if isinstance(h, dict)]
    probes = [p for p in probes if p is not None]
    if probes:
        view["last_probe"] = max(probes)
        view["last_probe_age"] = max(0.0, now - view["last_probe"])
        limit = min(stale_after(w.get("settings")) for w in wizards)
        if view["last_probe_age"] > limit:
            view["problems"].append(f"probes stale: the newest is {ago(view['last_probe'], now)} "
                                    "old")
    elif wizards:
        view["problems"].append("no probe yet")
    return view


def snapshot(fleet, reports: dict[str, HostReport], now: float | None = None,
             took: float | None = None) -> dict:
    """The whole fleet as one JSON-able document."""
    now = time.time() if now is None else now
    hosts = {h: _host(fleet, h, reports.get(h), now) for h in fleet.hosts}
    wizards = {w: _wizard(fleet, w, reports.get(fleet.wizards[w].host), now)
               for w in fleet.wizards}
    summary = {s: 0 for s in STATES}
    for w in wizards.values():
        summary[w["state"]] += 1
    summary.update(wizards=len(wizards), hosts=len(hosts),
                   hosts_unreachable=sum(not h["reached"] for h in hosts.values()),
                   problems=sum(bool(v["problems"]) for v in [*wizards.values(), *hosts.values()]))
    return {"at": now, "took": None if took is None else round(took, 3), "summary": summary,
            "hosts": hosts, "wizards": wizards}


def fleet_snapshot(fleet, **kwargs) -> dict:
    started = time.monotonic()
    reports = collect(fleet, **kwargs)
    return snapshot(fleet, reports, time.time(), time.monotonic() - started)


def failing(snap: dict) -> bool:
    """`neverdark status` exits 1: a wizard is dark or a host cannot be read."""
    return bool(snap["summary"]["dark"] or snap["summary"]["hosts_unreachable"])


# --- text ----------------------------------------------------------------------------------

def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0, int(now - ts))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_text(m: dict) -> str:
    if not m["total"]:
        return "-"
    if m["available"] is None:
        return f"? of {_bytes(m['total'])}"
    return (f"{_bytes(m['available'])} free of {_bytes(m['total'])} "
            f"({100 * m['available_ratio']:.0f}%)")


def summary_line(snap: dict) -> str:
    s = snap["summary"]
    line = (f"{s['primary']} on primary, {s['fallback']} on fallback, {s['dark']} dark, "
            f"{s['unreachable']} unreachable")
    if s["unknown"]:
        line += f", {s['unknown']} unknown"
    took = f", asked in {snap['took']:.2f} s" if snap.get("took") is not None else ""
    return (f"{line} ({s['wizards']} wizard{'s' * (s['wizards'] != 1)} on {s['hosts']} "
            f"host{'s' * (s['hosts'] != 1)}{took})")


def _table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the last column is left unpadded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1]
            for r in rows]


def wizard_row(name: str, w: dict, now: float) -> list[str]:
    p = printable
    if w["state"] in ("unreachable",) or (w["state"] == "unknown" and not w["backends"]):
        return [p(name), p(w["host"]), "?", "-", p("; ".join(w["problems"])), ""]
    flags = "".join([" DARK" if w["dark"] else "", " pinned" if w["pinned"] else "",
                     " switching" if w["switching"] else ""])
    health = " ".join(f"{b}:{h['health']}" for b, h in w["backends"].items())
    where = f" (on {p(w['served_by'])})" if w.get("served_by") else ""
    return [p(name), p(w["host"]), p(str(w["active"] or "?")) + where + flags, ago(w["since"], now),
            p(str(w["why"] or "")), p(health)]


def host_row(name: str, h: dict, now: float) -> list[str]:
    m = h["memory"]
    plan = f"plan {m['planned_mb']} of {m['memory_mb']} MB, {m['headroom_mb']} MB headroom"
    if not h["reached"]:
        return [printable(name), "-", "-", memory_text(m), plan]
    return [printable(name), f"{h['seconds']:.2f} s", ago(h["last_probe"], now) + " ago"
            if h["last_probe"] is not None else "-", memory_text(m), plan]


def render_text(snap: dict, only_problems: bool = False) -> tuple[list[str], list[str]]:
    """(stdout lines, stderr lines)."""
    now = snap["at"]
    wizards = {n: w for n, w in snap["wizards"].items() if w["problems"] or not only_problems}
    hosts = {n: h for n, h in snap["hosts"].items() if h["problems"] or not only_problems}
    out: list[str] = []
    if wizards:
        out += _table([["WIZARD", "HOST", "ACTIVE", "SINCE", "REASON", "BACKENDS"],
                       *(wizard_row(n, w, now) for n, w in wizards.items())])
    if hosts:
        out += [""] if out else []
        out += _table([["HOST", "ANSWERED", "LAST PROBE", "MEMORY", "BUDGET"],
                       *(host_row(n, h, now) for n, h in hosts.items())])
    if only_problems:
        problems = [f"{n}: {p}" for n, w in wizards.items() for p in w["problems"]
                    if w["state"] not in ("unreachable",)]
        problems += [f"{n}: {p}" for n, h in hosts.items() for p in h["problems"]]
        if problems:
            out += ["", "PROBLEMS", *(printable(p) for p in problems)]
        elif not out:
            out.append("no problems")
    out += ["", "summary: " + summary_line(snap)]
    err = [f"{printable(n)}: {h['error']}" for n, h in snap["hosts"].items()
           if not h["reached"] and h["error"]]
    return out, err


def watch(fleet, interval: float, show: Callable[[dict], None], *, rounds: int | None = None,
          stop: threading.Event | None = None, **kwargs) -> dict:
    """Ask, show, wait `interval` from the start of the round; until `stop` is set (or
    `rounds`). A round under way is finished first. Returns the last snapshot."""
    parallel = kwargs.pop("parallel", DEFAULT_PARALLEL)
    stop = stop or threading.Event()
    n = 0
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(fleet.hosts))),
                            thread_name_prefix="status") as pool:
        while True:
            started = time.monotonic()
            snap = fleet_snapshot(fleet, pool=pool, parallel=parallel, **kwargs)
            show(snap)
            n += 1
            if (rounds is not None and n >= rounds) or stop.is_set():
                return snap
            if stop.wait(max(0.0, interval - (time.monotonic() - started))):
                return snap
