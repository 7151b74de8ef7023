"""Asking the hosts for `neverdark status` and the panel (neverdark/status.py makes the
snapshot from the answers).

Every host is asked at once (at most `parallel` at a time, each bounded by `timeout`) for its
sidecar's `GET /status` on loopback (the document the control socket's `status` op returns too)
and the host's MemTotal and MemAvailable, as the login user: neither needs root, so a Pi's `pi`
login needs no sudo. Two ways, one answer:
- over the host's kept SSH connection, the request goes through a forwarded TCP channel to the
  sidecar's port (neverdark.remote.forward), and the memory is in the document: the host
  starts no session, no shell, no process;
- otherwise (the first contact of a `status`, forwarding turned off in sshd, a sidecar older
  than the `memory` in /status), one SSH session that starts no interpreter: bash reads
  /proc/meminfo and GET /status over its /dev/tcp (read_command). On a Pi, starting the
  sidecar's Python to ask the control socket costs more than the whole read (and the panel
  reads every few seconds).
A host that does not answer in time counts as unreachable and holds up no other.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from neverdark import contract, remote, ssh_mux
from neverdark.problems import printable

DEFAULT_PARALLEL = 16
DEFAULT_TIMEOUT = 15.0      # s per host: ssh and the sidecar's answer
MEMINFO = "/proc/meminfo"
MARK = "--- neverdark status"
_MEMINFO_LINE = re.compile(r"(MemTotal|MemAvailable):\s+(\d+)\s*kB")

# (host, command, timeout) -> the finished process; the default runs it over SSH.
Transport = Callable[[str, str, float], subprocess.CompletedProcess]
# (host, port, request, timeout) -> everything the host's port answered. Raises
# ssh_mux.Unavailable (it cannot be asked that way) or ssh_mux.Unanswered (no whole answer in
# FORWARD_ANSWER_S): the Transport's read is used then; TimeoutExpired: the host is unreachable.
Forward = Callable[[str, int, bytes, float], bytes]
# A sidecar answers /status in milliseconds. One that has not within this, through a forwarded
# channel, is asked by the read command, which has time left to say what is wrong with it (its
# own 10 s) and to read the host's memory still.
FORWARD_ANSWER_S = 3.0


def status_request(port: int) -> str:
    """The HTTP request for a sidecar's /status on the host's loopback."""
    return f"GET /status HTTP/1.0\r\nHost: {contract.LOOPBACK}:{int(port)}\r\n\r\n"


def read_command(port: int = contract.SIDECAR_PORT, meminfo: str = MEMINFO,
                 read_timeout: int = 10) -> str:
    """What runs on a host (bash: its /dev/tcp): the memory lines, a mark, then the sidecar's
    whole HTTP answer to GET /status, read within `read_timeout` s. Only bash's builtins: no
    grep, timeout or cat to start on each host for each read (the panel reads every few
    seconds; on the 20-host benchmark's shared cores each process started was measurable)."""
    addr = f"{contract.LOOPBACK}:{int(port)}"
    request = status_request(port).replace("\r\n", "\\r\\n")     # as printf's escapes
    script = (
        f"while read -r k v _; do case $k in MemTotal:|MemAvailable:) echo \"$k $v kB\";; "
        f"esac; done < {shlex.quote(meminfo)}; echo '{MARK}'; "
        f"{{ exec 3<>/dev/tcp/{contract.LOOPBACK}/{int(port)}; }} 2>/dev/null || "
        f"{{ echo 'no sidecar answering on {addr} (connection refused)' >&2; exit 3; }}; "
        f"printf '{request}' >&3; "
        # a line at a time until EOF; the last may lack its newline; no more than read_timeout
        # seconds in all, however slowly the answer trickles in
        f"while [ $SECONDS -lt {int(read_timeout)} ] && "
        f"{{ IFS= read -r -t $(({int(read_timeout)} - SECONDS)) -u 3 line || [ -n \"$line\" ]; }}; "
        f"do printf '%s\\n' \"$line\"; line=; done")
    return f"exec bash -c {shlex.quote(script)}"


def ssh_forward(fleet) -> Forward:
    def forward(host: str, port: int, data: bytes, timeout: float) -> bytes:
        return remote.forward(fleet, host, port, data, timeout, FORWARD_ANSWER_S)
    return forward


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


def _memory(doc: dict) -> tuple[int, int | None] | None:
    """(MemTotal, MemAvailable) in bytes from a /status document; None when it has none (a
    sidecar older than /status' `memory`, or a host whose /proc/meminfo it could not read)."""
    m = doc.get("memory")
    if not isinstance(m, dict):
        return None
    total, available = m.get("total"), m.get("available")
    if type(total) is not int or total <= 0:
        return None
    return total, available if type(available) is int and available >= 0 else None


def ask_forwarded(host: str, forward: Forward, port: int, timeout: float) -> HostReport | None:
    """The host's report read through a forwarded channel; None when it cannot be read that way
    whole (the caller's read command is used then, and says what is wrong, if anything is)."""
    def read() -> bytes | None:
        try:
            return forward(host, port, status_request(port).encode(), timeout)
        except (ssh_mux.Unavailable, ssh_mux.Unanswered, OSError):
            return None         # not asked, or no answer yet: the read command will be
    answer, why = remote.attempt(read, timeout)
    if why is not None:                 # no answer in time, as unreachable as the read's
        return HostReport(host, error=why)
    if answer is None:
        return None
    try:
        doc = _http_status(answer.decode("utf-8", "replace"))
    except ValueError:
        return None
    memory = _memory(doc)
    if memory is None:
        return None
    return HostReport(host, status=doc, mem_total=memory[0], mem_available=memory[1])


def ask(host: str, transport: Transport, command: str, timeout: float,
        forward: Forward | None = None, port: int = contract.SIDECAR_PORT) -> HostReport:
    asked, started = time.time(), time.monotonic()
    report = ask_forwarded(host, forward, port, timeout) if forward else None
    if report is None:
        left = max(1.0, timeout - (time.monotonic() - started))
        proc, why = remote.attempt(lambda: transport(host, command, left), timeout)
        report = HostReport(host, error=why) if proc is None else parse_reply(host, proc)
    report.asked_at, report.seconds = asked, time.monotonic() - started
    return report


def collect(fleet, hosts=None, *, transport: Transport | None = None,
            forward: Forward | None = None, parallel: int = DEFAULT_PARALLEL,
            timeout: float = DEFAULT_TIMEOUT, command: str | None = None,
            pool: ThreadPoolExecutor | None = None) -> dict[str, HostReport]:
    """Every host's report, in inventory order; at most `parallel` hosts asked at once. With
    no `transport`, over SSH: through a forwarded channel where a kept connection allows it.
    A given `transport` is used alone, unless a `forward` is given too."""
    names = list(fleet.hosts if hosts is None else hosts)
    if transport is None:
        transport, forward = ssh_transport(fleet), forward or ssh_forward(fleet)
    command = command or read_command(fleet.sidecar.port)
    if not names:
        return {}
    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names))),
                                      thread_name_prefix="status")
    try:
        reports = list(pool.map(
            lambda h: ask(h, transport, command, timeout, forward, fleet.sidecar.port), names))
    finally:
        if own:
            pool.shutdown()
    return {r.host: r for r in reports}
