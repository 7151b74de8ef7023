"""`python -m sidecar.ctl OP WIZARD [--to BACKEND]`: the sidecar's control socket, on the host.

Only root, the sidecar's user and members of neverdark-ops get an answer (the socket checks
the caller's credentials). `neverdark failover|pin|release` runs this over SSH.
"""

from __future__ import annotations

import argparse
import json
import sys

from sidecar.control import ControlError, control_request

SOCKET = "/run/neverdark-sidecar/control.sock"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.ctl")
    parser.add_argument("op", choices=("failover", "pin", "release", "status"))
    parser.add_argument("wizard", nargs="?")
    parser.add_argument("--to", default=None)
    parser.add_argument("--socket", default=SOCKET)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if args.op != "status" and not args.wizard:
        parser.error(f"{args.op} needs a wizard")
    request = {"op": args.op, "wizard": args.wizard, "to": args.to, "wait": True,
               "timeout": args.timeout}
    try:
        answer = control_request(args.socket, request, timeout=args.timeout + 60)
    except ControlError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
