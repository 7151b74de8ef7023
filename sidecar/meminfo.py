"""The host's memory as /proc/meminfo says: one reader for /metrics' host gauges and the
`memory` of /status (which `neverdark status` and the panel show). Standard library only: the
stand-in sidecar of the light test hosts runs it with the host's own python3."""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")


def read_meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """/proc/meminfo's MemTotal and MemAvailable, in bytes ({} if unreadable)."""
    out = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and rest.split() and rest.split()[0].isdigit():
            out[key] = int(rest.split()[0]) * 1024      # the kernel writes kB (KiB)
    return out


def memory_status(path: Path = MEMINFO) -> dict[str, int | None]:
    """/status' `memory`: {"total", "available"} in bytes, None where unreadable."""
    info = read_meminfo(path)
    return {"total": info.get("MemTotal"), "available": info.get("MemAvailable")}
