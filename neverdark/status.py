"""The fleet's status, as `neverdark status` and the panel show it.

`neverdark.status_read.collect()` asks the hosts (each host's sidecar's /status and memory, all
at once, bounded); `snapshot()` turns the answers and the inventory into one JSON-able document
(hosts, wizards, a summary), `render_text()` prints it, and `watch()` repeats it; the panel
serves the same snapshot.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from neverdark import contract, memory_fit
from neverdark.problems import printable
from neverdark.status_read import DEFAULT_PARALLEL, HostReport, collect

STATES = ("primary", "fallback", "dark", "unreachable", "unknown")


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
