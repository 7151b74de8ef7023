"""`python -m sidecar.ctl OP WIZARD [--to BACKEND]`: the sidecar's control socket, on the host.

Only root, the sidecar's user and members of neverdark-ops get an answer (the socket checks
the caller's credentials). `neverdark failover|pin|release` runs this over SSH.

If the sidecar is stopped or killed while it handles the request (the connection closes without
a reply), this reconnects once it is back (systemd restarts it), waits until it has finished the
switch it found interrupted, and reports where the wizard ended up, marked "interrupted".
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from sidecar.control import ControlError, ControlInterrupted, control_request

SOCKET = "/run/neverdark-sidecar/control.sock"
# systemd restarts the sidecar after RestartSec=2; a restarted sidecar that finds a switch
# unfinished runs a check turn first (gateway ready, then a real turn: a cold local model takes
# minutes on a Pi), so the wait for its verdict is bounded generously.
RECONNECT_FOR = 420.0
POLL_EVERY = 1.0


def _wizard_status(socket: str, wizard: str) -> dict | None:
    reply = control_request(socket, {"op": "status"}, timeout=30)
    if not reply.get("ok"):
        return None
    return reply["status"]["wizards"].get(wizard)


def _busy(status: dict) -> bool:
    """A switch or check in flight, or a request the restarted sidecar still has queued."""
    pinned = status.get("pinned")
    return bool(status.get("switching") or status.get("intent") or status.get("forced")
                or (pinned is not None and pinned != status.get("active")))


def after_restart(socket: str, request: dict, before: dict | None, reconnect_for: float,
                  sleep=time.sleep) -> dict:
    """Where the wizard ended up after the sidecar restarted mid-request (bounded wait)."""
    wizard, op, to = request["wizard"], request["op"], request.get("to")
    deadline = time.monotonic() + reconnect_for
    last: object = "no answer yet"
    while True:
        try:
            status = _wizard_status(socket, wizard)
        except ControlError as exc:  # still down, or starting
            status, last = None, str(exc)
        else:
            if status is None:
                last = f"{wizard} is no longer in the sidecar's config"
            elif not _busy(status):
                break
            else:
                last = f"{wizard} is still being checked or switched (on {status.get('active')})"
        if time.monotonic() >= deadline:
            return {"ok": False, "wizard": wizard, "interrupted": True,
                    "error": f"the sidecar closed the connection mid-request and gave no verdict "
                             f"within {reconnect_for:.0f}s of reconnecting ({last})"}
        sleep(POLL_EVERY)
    active, pinned = status.get("active"), status.get("pinned")
    start = (before or {}).get("active")
    if op == "failover":
        ok = active == to if to else (active is not None and active != start)
    elif op == "pin":
        ok = pinned is not None and pinned == (to or start) and active == pinned
    else:
        ok = pinned is None
    transitions = status.get("transitions") or []
    reply = {"ok": ok, "wizard": wizard, "active": active, "pinned": pinned, "interrupted": True,
             "transition": transitions[-1] if transitions else None,
             "note": f"the sidecar was restarted while it handled this {op} (it closed the "
                     f"connection without a reply); {wizard} is now on {active}"}
    if not ok:
        last = reply["transition"] or {}
        reply["error"] = (f"{reply['note']}, not where the {op} wanted it: "
                          f"{last.get('reason') or 'no switch was recorded'}"
                          + (f" ({last['detail']})" if last.get("detail") else ""))
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.ctl")
    parser.add_argument("op", choices=("failover", "pin", "release", "status"))
    parser.add_argument("wizard", nargs="?")
    parser.add_argument("--to", default=None)
    parser.add_argument("--socket", default=SOCKET)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--reconnect", type=float, default=RECONNECT_FOR,
                        help="seconds to wait for a sidecar that restarted mid-request")
    args = parser.parse_args(argv)
    if args.op != "status" and not args.wizard:
        parser.error(f"{args.op} needs a wizard")
    request = {"op": args.op, "wizard": args.wizard, "to": args.to, "wait": True,
               "timeout": args.timeout}
    before = None
    if args.op != "status":
        try:  # where it starts, to judge the outcome should the sidecar restart mid-request
            before = _wizard_status(args.socket, args.wizard)
        except ControlError:
            before = None
    try:
        answer = control_request(args.socket, request, timeout=args.timeout + 60)
    except ControlInterrupted:
        if args.op == "status":
            print(json.dumps({"ok": False, "error": "the sidecar closed the connection mid-request"}))
            return 2
        answer = after_restart(args.socket, request, before, args.reconnect)
    except ControlError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
