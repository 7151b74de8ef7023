"""`neverdark notify --test`: each host's sidecar sends a test notice through its hooks.

The hooks and their secrets live on the hosts (a webhook may be reachable only from there), so
each host's sidecar sends it with the code real notices go through (sidecar/hooktest.py, the
control socket's `notify-test`), and reports each delivery; hosts are asked at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from neverdark import remote
from neverdark.problems import printable

COMMAND = f"{remote.SIDECAR_PYTHON} -m sidecar.hooktest"
TIMEOUT = 90.0      # s per host: ssh, sudo, the sidecar, every hook at once (10 s each)


def ask(fleet, host: str, timeout: float = TIMEOUT) -> dict:
    """The host's reply, or {"ok": False, "error": why, "hooks": {}} when there is none."""
    proc, why = remote.attempt(lambda: remote.run(fleet, host, COMMAND, timeout=timeout))
    if proc is None:
        return {"ok": False, "error": why, "hooks": {}}
    try:
        answer = remote.last_json(proc)
    except ValueError:
        return {"ok": False, "error": remote.why_no_answer(proc), "hooks": {}}
    if not isinstance(answer.get("hooks"), dict):
        answer["hooks"] = {}
    return answer


def ask_all(fleet, hosts, parallel: int = 16, timeout: float = TIMEOUT) -> dict[str, dict]:
    hosts = list(hosts)
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(lambda h: ask(fleet, h, timeout), hosts)))


def report_lines(results: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(stdout lines: one per delivery and a total; stderr lines: hosts with none)."""
    lines, errors = [], []
    for host, r in results.items():
        if not r["hooks"]:
            errors.append(f"{printable(host)}: {printable(str(r.get('error') or 'no hooks'))}")
            continue
        for name, h in r["hooks"].items():
            lines.append(f"{printable(host)}  {name:9} {'delivered' if h['ok'] else 'FAILED':9} "
                         f"{h['seconds']:6.2f} s  {printable(str(h['detail']))}")
    n = sum(len(r["hooks"]) for r in results.values())
    ok = sum(h["ok"] for r in results.values() for h in r["hooks"].values())
    lines.append(f"{ok} of {n} deliveries made from {len(results)} host"
                 f"{'s' * (len(results) != 1)}")
    return lines, errors


def failing(results: dict[str, dict]) -> bool:
    return not results or any(not r.get("ok") for r in results.values())
