"""A test notice through every hook a host's sidecar is configured with, and each outcome.

The hooks and their secrets (the Telegram bot token, a webhook reachable only from the host's
network) live on the host, so the test runs there, in the sidecar, through the very code that
sends real notices (sidecar.hooks.deliver): the control socket's `{"op": "notify-test"}`.
`neverdark notify --test` runs `python -m sidecar.hooktest` on each host over SSH.

Reply: {"ok": every configured hook delivered (and at least one is configured), "host": ...,
"event": the notice sent, "hooks": {name: {"ok", "detail", "seconds"}}}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from datetime import datetime, timezone

from sidecar import hooks as hooks_mod
from sidecar.control import ControlError, control_request

OP = "notify-test"
SOCKET = "/run/neverdark-sidecar/control.sock"
HOOK_TIMEOUT = 10.0     # what a real notice gets (sidecar.hooks.notify's default)


def sample_event(host: str | None = None) -> dict:
    return {"event": "test", "host": host or socket.gethostname(),
            "detail": "a test notice from `neverdark notify --test`: the hook works",
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


async def try_hooks(hooks, secrets: dict[str, str], client, *,
                    telegram_base: str = hooks_mod.TELEGRAM_API,
                    timeout: float = HOOK_TIMEOUT) -> dict:
    event = sample_event()
    outcomes = await hooks_mod.deliver(event, hooks, secrets, client,
                                       telegram_base=telegram_base, timeout=timeout)
    reply = {"ok": bool(outcomes) and all(ok for ok, _, _ in outcomes.values()),
             "host": event["host"], "event": event,
             "hooks": {name: {"ok": ok, "detail": detail, "seconds": round(seconds, 3)}
                       for name, (ok, detail, seconds) in outcomes.items()}}
    if not outcomes:
        reply["error"] = "no hooks configured (the inventory's sidecar.hooks)"
    return reply


async def handle(daemon, request: dict) -> dict:
    """The control op, with the running sidecar's hooks, secrets and HTTP client."""
    reply = await try_hooks(daemon.cfg.hooks, daemon.cfg.secrets, daemon.client)
    # A test notice is a delivery like any other: a hook that fails it shows in /metrics too.
    daemon.events.count({name: (h["ok"], h["detail"], h["seconds"])
                         for name, h in reply["hooks"].items()})
    return reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.hooktest")
    parser.add_argument("--socket", default=SOCKET)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        # Every hook runs at once, each bounded by HOOK_TIMEOUT.
        answer = control_request(args.socket, {"op": OP}, timeout=HOOK_TIMEOUT + 30)
    except ControlError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    answer.setdefault("seconds", round(time.monotonic() - started, 3))
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
