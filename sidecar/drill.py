"""`python -m sidecar.drill WIZARD [--to BACKEND] [--turns N]`: a failover drill, on the host.

What an operator runs after a deploy (`neverdark drill WIZARD` runs this over SSH as root):
force a failover through the sidecar's control socket, send real turns through the wizard's
Hermes API server and check from Hermes' session record that the fallback's model answered
them, fail back the same way, check the primary answers again, and report the timings as one
JSON line. Turns on a local backend carry their breakdown (queue, prompt tokens and cache hits,
prefill, generation, cache save, gateway overhead: sidecar.engine). Nothing here bypasses the sidecar: the switches are its own verified switches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx

from sidecar.config import ConfigError, load
from sidecar.control import ControlError, control_request
from sidecar.ctl import SOCKET
from sidecar.gateway import verify


def _switch(socket: str, wizard: str, to: str | None, timeout: float,
            stay: float | None = None) -> tuple[dict, dict]:
    """A forced, verified switch through the control socket: the reply and its report line.
    `stay`: seconds the sidecar must not fail back (the drill's turns must reach the fallback)."""
    started = time.monotonic()
    request = {"op": "failover", "wizard": wizard, "to": to, "wait": True, "timeout": timeout}
    if stay:
        request["stay"] = stay
    reply = control_request(socket, request, timeout=timeout + 60)
    return reply, {"ok": bool(reply.get("ok")), "seconds": round(time.monotonic() - started, 2),
                   "to": reply.get("active"), "error": reply.get("error"),
                   "timings": (reply.get("transition") or {}).get("timings")}


async def _turns(wizard, backend, n: int, timeout: float) -> list[dict]:
    out = []
    async with httpx.AsyncClient() as client:
        for _ in range(n):
            v = await verify(wizard, backend, client, timeout)
            turn = {"ok": v.ok, "latency": round(v.latency, 2), "model": v.answered_model,
                    "detail": v.detail, "answer": v.answer[:120]}
            if v.breakdown:   # local backends: where the turn's time went
                turn["breakdown"] = v.breakdown
            out.append(turn)
    return out


def drill(cfg, wizard_name: str, to: str | None, turns: int, socket: str,
          timeout: float) -> dict:
    wizard = cfg.wizards[wizard_name]
    status = control_request(socket, {"op": "status"}, timeout=30)["status"]["wizards"][wizard_name]
    if status.get("pinned"):
        return {"ok": False, "wizard": wizard_name,
                "error": f"pinned to {status['pinned']}: `neverdark release {wizard_name}` first"}
    start = status["active"]
    report: dict = {"wizard": wizard_name, "from": start}

    # The primary stays healthy in a drill, and the sidecar would fail back after min_dwell,
    # perhaps between two of the drill's turns: it holds the fallback until the drill fails back
    # itself (bounded, should the drill die).
    stay = timeout * (turns + 2)
    reply, report["failover"] = _switch(socket, wizard_name, to, timeout, stay)
    if not reply.get("ok"):
        return {**report, "ok": False, "error": f"failover failed: {reply.get('error')}"}
    fallback = wizard.backend(reply["active"])
    report["to"] = fallback.name
    if getattr(fallback, "host", None):   # another host's model server answers these turns
        report["served_by"] = fallback.host
    report["fallback_turns"] = asyncio.run(_turns(wizard, fallback, turns, timeout))

    reply, report["failback"] = _switch(socket, wizard_name, start, timeout)
    if not reply.get("ok"):   # the failback failed: the health rules apply again now
        control_request(socket, {"op": "release", "wizard": wizard_name}, timeout=30)
    if reply.get("ok"):
        report["primary_turns"] = asyncio.run(_turns(wizard, wizard.backend(start), turns, timeout))
    answered = report["fallback_turns"] + report.get("primary_turns", [])
    report["ok"] = reply.get("ok", False) and all(t["ok"] for t in answered)
    if not report["ok"]:
        report["error"] = (f"failback failed: {reply.get('error')}" if not reply.get("ok")
                           else "a turn was not answered by the expected backend")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.drill")
    parser.add_argument("wizard")
    parser.add_argument("--to", default=None, help="fallback to drill (default: next healthy)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--config", default="/etc/neverdark/sidecar.yaml")
    parser.add_argument("--socket", default=SOCKET)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    if args.wizard not in cfg.wizards:
        print(json.dumps({"ok": False, "error": f"unknown wizard {args.wizard!r} "
                                                f"(on this host: {', '.join(cfg.wizards)})"}))
        return 2
    try:
        report = drill(cfg, args.wizard, args.to, args.turns, args.socket, args.timeout)
    except ControlError as exc:
        report = {"ok": False, "wizard": args.wizard, "error": f"sidecar: {exc}"}
    print(json.dumps(report))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
