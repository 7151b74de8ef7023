"""sidecar/units.py: the units' memory, OOM kills, restarts and state, from cgroup v2 and v1
trees laid out as the kernel writes them and `systemctl show` output as systemd 252 prints it.
(This runner has no systemd as PID 1; a real daemon reading a stand-in: tests/test_monitoring.py.)"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from sidecar import units

UNIT = "neverdark-llama-gemma.service"
CG = f"/system.slice/{UNIT}"

SHOW = (f"Id={UNIT}\nActiveState=active\nNRestarts=3\nControlGroup={CG}\n"
        "MemoryCurrent=1000\n\n"
        "Id=neverdark-wizard-merlin.service\nActiveState=activating\nNRestarts=0\n"
        "ControlGroup=\nMemoryCurrent=[not set]\n")


def v2(root: Path, current="52428800\n", limit="max\n", events="oom 1\noom_kill 2\n") -> Path:
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    d = root / CG.strip("/")
    d.mkdir(parents=True)
    (d / "memory.current").write_text(current)
    (d / "memory.max").write_text(limit)
    (d / "memory.events").write_text(f"low 0\nhigh 0\nmax 0\n{events}oom_group_kill 0\n")
    return root


def v1(root: Path, usage="4096\n", limit="9223372036854771712\n", oom="oom_kill 5\n") -> Path:
    d = root / "memory" / CG.strip("/")
    d.mkdir(parents=True)
    (d / "memory.usage_in_bytes").write_text(usage)
    (d / "memory.limit_in_bytes").write_text(limit)
    (d / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\n{oom}")
    return root


def test_parse_show_blocks():
    blocks = units.parse_show(SHOW)
    assert [b["Id"] for b in blocks] == [UNIT, "neverdark-wizard-merlin.service"]
    assert blocks[1]["ControlGroup"] == "" and blocks[1]["MemoryCurrent"] == "[not set]"


def test_cgroup_v2(tmp_path):
    root = v2(tmp_path)
    assert units.cgroup_version(root) == 2
    assert units.read_cgroup(CG, root) == (52428800, 0, 2)          # "max": no limit
    other = v2(tmp_path / "b", limit="268435456\n", events="oom 0\noom_kill 0\n")
    assert units.read_cgroup(CG, other) == (52428800, 268435456, 0)


def test_cgroup_v1(tmp_path):
    root = v1(tmp_path)
    assert units.cgroup_version(root) == 1
    assert units.read_cgroup(CG, root) == (4096, 0, 5)              # page-rounded 2^63: none
    old_kernel = v1(tmp_path / "b", limit="1073741824\n", oom="")   # no oom_kill line
    assert units.read_cgroup(CG, old_kernel) == (4096, 1073741824, None)


def test_a_unit_with_no_memory_cgroup_falls_back_to_systemd(tmp_path):
    """v1 without memory accounting: no memory cgroup; systemd's MemoryCurrent, OOM unknown."""
    r = units.reading(UNIT, units.parse_show(SHOW)[0], tmp_path)
    assert r == units.UnitReading(UNIT, active=True, restarts=3, memory=1000, memory_max=None,
                                  oom_kills=None)
    r = units.reading("neverdark-wizard-merlin.service", units.parse_show(SHOW)[1], tmp_path)
    assert r.active is False and r.restarts == 0 and r.memory is None


def test_a_v1_container_without_unit_memory_cgroups_sums_its_processes_rss(tmp_path):
    """A container on a v1 runner (the test fleet's hosts): the memory controller is read-only,
    systemd's MemoryCurrent "[not set]"; the memory is the VmRSS of the unit's processes, from
    systemd's own hierarchy, its children's included; limit and OOM kills stay unknown."""
    import os
    d = tmp_path / "systemd" / CG.strip("/")
    (d / "child").mkdir(parents=True)
    (d / "cgroup.procs").write_text(f"{os.getpid()}\n999999999\n")    # a pid that has ended
    (d / "child" / "cgroup.procs").write_text(f"{os.getppid()}\n")
    rss = sum(units._vmrss(Path(f"/proc/{p}/status")) for p in (os.getpid(), os.getppid()))
    props = dict(units.parse_show(SHOW)[0], MemoryCurrent="[not set]")
    r = units.reading(UNIT, props, tmp_path)
    assert r.memory is not None and abs(r.memory - rss) < 64 * 2**20 and r.memory > 2**20, r
    assert (r.memory_max, r.oom_kills, r.restarts) == (None, None, 3)
    # a unit with no process, or no hierarchy: unknown, not 0
    (d / "cgroup.procs").write_text("")
    (d / "child" / "cgroup.procs").write_text("")
    assert units.reading(UNIT, props, tmp_path).memory is None
    assert units.reading(UNIT, props, tmp_path / "none").memory is None


def fake_systemctl(tmp_path: Path, output: str, rc: int = 0) -> list[str]:
    script = tmp_path / "systemctl.py"
    script.write_text(f"import sys\nsys.stdout.write({output!r})\nsys.exit({rc})\n")
    return [sys.executable, str(script)]


def test_read_units(tmp_path):
    root = v2(tmp_path / "cg")
    got = asyncio.run(units.read_units([UNIT, "neverdark-wizard-merlin.service"],
                                       fake_systemctl(tmp_path, SHOW), root))
    assert got[0] == units.UnitReading(UNIT, True, 3, 52428800, 0, 2)
    assert got[1].unit == "neverdark-wizard-merlin.service" and got[1].active is False


def test_read_units_without_systemd(tmp_path, caplog):
    """systemd does not answer (no bus): bare readings, said once, not every round."""
    show = fake_systemctl(tmp_path, "", rc=1)
    units._last_error.clear()
    for _ in range(3):
        got = asyncio.run(units.read_units([UNIT], show, tmp_path))
        assert got == [units.UnitReading(UNIT)]
    said = [r for r in caplog.records if "cannot read the units" in r.getMessage()]
    assert len(said) == 1
