"""systemd's notify protocol (Type=notify, WatchdogSec=) with the stdlib only.

A datagram to $NOTIFY_SOCKET; a leading '@' names a Linux abstract-namespace socket.
Without NOTIFY_SOCKET (not under systemd, or in tests) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    return addr


def notify(message: str) -> bool:
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        # Never block the event loop on a busy manager: a dropped ping is retried next period.
        s.setblocking(False)
        try:
            s.connect(addr)
            s.send(message.encode())
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID says whom the watchdog is for; a child that inherited the env must not ping.
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2
