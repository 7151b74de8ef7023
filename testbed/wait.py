"""Waiting for a local server the test bench started: until its URL answers 200.

The one loop behind every "poll /health until it answers" in the bench (LLMock, the Hermes
gateway, the llama servers). It watches the process as well as the URL, so a server that dies on
start fails at once with its exit code and the end of its log, instead of after the timeout.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

import httpx

TAIL = 4000  # characters of the log an error carries


class NotReady(RuntimeError):
    """The server exited, or did not answer 200 in time; the message carries its log tail."""


def log_tail(path: Path | None, chars: int = TAIL) -> str:
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return f"(no log at {path})"


def wait_http(url: str, proc: subprocess.Popen, *, timeout: float, what: str,
              log: Path | None = None, every: float = 0.2,
              error: type[Exception] = NotReady,
              on_fail: Callable[[], None] | None = None) -> float:
    """Until GET `url` answers 200; returns the seconds it took.

    Raises `error` (NotReady unless a caller has its own class) as soon as `proc` has exited,
    naming its exit code, or once `timeout` seconds have passed; either way with the tail of
    `log`. `on_fail` (the caller's stop: it owns the process and its log file) runs before
    anything is raised, an interrupt included, so a failed start leaves no process behind."""
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise error(f"{what} exited {proc.returncode}:\n{log_tail(log)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started >= timeout:
                raise error(f"{what} not ready within {timeout:.0f} s (GET {url}):\n"
                            + log_tail(log))
            time.sleep(every)
    except BaseException:
        if on_fail is not None:
            on_fail()
        raise


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 1.0,
               tolerate: tuple[type[BaseException], ...] = (Exception,)):
    """Poll `check` until it returns something truthy and return that; an exception of a
    `tolerate` type counts as not yet (a host or a sidecar mid-restart). Fails the test with the
    last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except tolerate as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")
