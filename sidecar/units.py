"""The model servers' and gateways' units as /metrics reports them: memory in use and its limit,
OOM kills, systemd's restarts and whether each is active.

systemd says where each unit's cgroup is and how often it restarted it (`systemctl show`, which
needs no privilege); the kernel's cgroup files say the memory and the OOM kills:

- cgroup v2 (Debian 12's default): <root>/<ControlGroup>/memory.current, memory.max ("max": no
  limit) and memory.events' `oom_kill` line.
- cgroup v1 (older hosts, and hybrid setups such as containers on a v1 runner): the memory
  controller's tree, <root>/memory/<ControlGroup>/memory.usage_in_bytes, memory.limit_in_bytes
  (a page-rounded 2^63 for no limit) and memory.oom_control's `oom_kill` line (kernel 4.13+).
  systemd makes a unit's v1 memory cgroup only when memory accounting is on for it: without
  one, the memory falls back to systemd's own MemoryCurrent, and the OOM kills are unknown.
- A v1 host whose memory controller systemd cannot use per unit (a container on a v1 runner,
  where the controller is mounted read-only: MemoryCurrent is "[not set]"): the memory is the
  resident memory (VmRSS) of the unit's processes, listed in systemd's own hierarchy
  (<root>/systemd/<ControlGroup>); it leaves out the page cache the cgroup would count. The
  limit and the OOM kills are unknown there.

A value that cannot be read is None and its sample is left out, rather than reported as 0.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("sidecar")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROPERTIES = ("Id", "ActiveState", "NRestarts", "ControlGroup", "MemoryCurrent")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
V1_UNLIMITED = 1 << 62
SHOW_TIMEOUT = 10.0
_last_error: list[str] = []     # the latest failure logged: said once, not every 15 s


@dataclass(frozen=True)
class UnitReading:
    unit: str
    active: bool | None = None
    restarts: int | None = None
    memory: int | None = None
    memory_max: int | None = None     # 0: no limit
    oom_kills: int | None = None


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show -p ... A B` output: one block of KEY=VALUE lines per unit, blank-line
    separated, in the order asked."""
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            cur[key] = value
    if cur:
        blocks.append(cur)
    return blocks


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None     # "[not set]", "infinity", ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    """`key N` from a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return _int(v)
    return None


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    return 2 if (root / "cgroup.controllers").exists() else 1


def read_cgroup(group: str, root: Path = CGROUP_ROOT) -> tuple[int | None, int | None, int | None]:
    """(memory in use, limit (0: none), OOM kills) of the cgroup `group` (systemd's
    ControlGroup, e.g. /system.slice/x.service); None for what cannot be read."""
    rel = group.strip("/")
    if not rel:
        return None, None, None
    if cgroup_version(root) == 2:
        d = root / rel
        limit = _read(d / "memory.max")
        cap = 0 if limit is not None and limit.strip() == "max" else _int(limit)
        return (_int(_read(d / "memory.current")), cap,
                _keyed(_read(d / "memory.events"), "oom_kill"))
    d = root / "memory" / rel
    cap = _int(_read(d / "memory.limit_in_bytes"))
    if cap is not None and cap >= V1_UNLIMITED:
        cap = 0
    return (_int(_read(d / "memory.usage_in_bytes")), cap,
            _keyed(_read(d / "memory.oom_control"), "oom_kill"))


def processes_rss(group: str, root: Path = CGROUP_ROOT, proc: Path = Path("/proc")) -> int | None:
    """The summed VmRSS of the processes in `group` and its children, from systemd's v1
    hierarchy (name=systemd); None where that hierarchy or every process cannot be read."""
    rel = group.strip("/")
    d = root / "systemd" / rel
    if not rel or not d.is_dir():
        return None
    total, seen = 0, False
    for procs in d.rglob("cgroup.procs"):
        for pid in (_read(procs) or "").split():
            rss = _vmrss(proc / pid / "status")
            if rss is not None:
                total, seen = total + rss, True
    return total if seen else None


def _vmrss(status: Path) -> int | None:
    """Bytes from /proc/PID/status's `VmRSS:   N kB` (a kernel thread has none)."""
    for line in (_read(status) or "").splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            fields = value.split()                  # "  1234 kB"
            kb = _int(fields[0]) if fields else None
            return None if kb is None else kb * 1024
    return None


def reading(unit: str, props: dict[str, str] | None, root: Path = CGROUP_ROOT) -> UnitReading:
    if not props:
        return UnitReading(unit)
    state = props.get("ActiveState")
    memory = cap = ooms = None
    if props.get("ControlGroup"):
        memory, cap, ooms = read_cgroup(props["ControlGroup"], root)
    if memory is None:
        memory = _int(props.get("MemoryCurrent"))
    if memory is None and props.get("ControlGroup") and cgroup_version(root) == 1:
        memory = processes_rss(props["ControlGroup"], root)
    return UnitReading(unit, active=None if not state else state == "active",
                       restarts=_int(props.get("NRestarts")), memory=memory,
                       memory_max=cap, oom_kills=ooms)


async def read_units(names: list[str], show: list[str], root: Path = CGROUP_ROOT,
                     timeout: float = SHOW_TIMEOUT) -> list[UnitReading]:
    """Each unit's reading (one `systemctl show` for all); bare readings if systemd does not
    answer. `show`: the systemctl command line (no sudo: show needs no privilege)."""
    if not names:
        return []
    blocks: list[dict[str, str]] = []
    try:
        proc = await asyncio.create_subprocess_exec(
            *show, "show", "-p", ",".join(PROPERTIES), "--", *names,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise OSError(f"systemctl show gave no answer in {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise OSError(f"systemctl show exited {proc.returncode}: "
                          f"{err.decode(errors='replace').strip()[:200]}")
        blocks = parse_show(out.decode(errors="replace"))
        _last_error.clear()
    except OSError as exc:
        if _last_error != [str(exc)]:
            log.warning("cannot read the units' state (said once until it changes)",
                        extra={"error": str(exc)})
            _last_error[:] = [str(exc)]
    by_id = {b.get("Id"): b for b in blocks}
    # Blocks come in the order asked; Id names an alias's unit by its own name, so fall back
    # to the position when the names differ.
    found = [by_id.get(n) or (blocks[i] if i < len(blocks) and len(blocks) == len(names) else None)
             for i, n in enumerate(names)]
    return await asyncio.to_thread(lambda: [reading(n, p, root) for n, p in zip(names, found)])
