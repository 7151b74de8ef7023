"""Clearing what dead runs left behind on a reused machine: containers, the file server,
links and routing, overlay mounts, host roots, memory cgroups."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from testbed.fleet import net
from testbed.fleet.base import PREFIX, REGISTRY, _locked
from testbed.fleet.cgroups import _cg_remove, _stale_cgroups
from testbed.fleet.fileserver import is_file_server
from testbed.fleet.procs import _alive, _cmdline, _kill, _kill_container, _nspawn_pids
from testbed.fleet.roots import _image_overlay_mounts, _mounts_under, _umount, _umount_all


def clear_stale(log=print) -> list[str]:
    """Remove what dead runs left on a reused machine. Never touches a live run's state.

    A run is dead when its owner process is gone (library runs) or, for CLI runs, when none
    of its containers is running. Also removes links, routing rules and tables, nspawn
    processes and image overlays of our naming that no registered run claims. Returns the ids
    of the registered runs it cleared.
    """
    cleared = []
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with _locked(REGISTRY / ".lock", timeout=60):
        live_ids, live_dirs = set(), set()
        for entry in sorted(REGISTRY.glob("*.json")):
            try:
                info = json.loads(entry.read_text())
                run_id = info["run_id"]
            except (ValueError, OSError, KeyError):
                entry.unlink(missing_ok=True)
                continue
            prefix = f"{PREFIX}{run_id}-"
            if info.get("owner"):
                alive = _alive(info["owner"], info.get("owner_start"))
            else:
                alive = bool(_nspawn_pids(prefix))
            if alive:
                live_ids.add(run_id)
                live_dirs.add(info["run_dir"])
                continue
            log(f"testfleet: clearing stale run {run_id} ({info.get('run_dir')})")
            _teardown_remnants(prefix, info)
            entry.unlink(missing_ok=True)
            cleared.append(run_id)
        # Unregistered remnants of our naming (registry lost, e.g. /run cleared by hand).
        for pid in _nspawn_pids(PREFIX):
            machine = next(a for a in _cmdline(pid) if a.startswith("--machine="))
            m = re.match(rf"--machine={PREFIX}([0-9a-f]{{4}})-", machine)
            if m and m.group(1) not in live_ids:
                log(f"testfleet: killing unregistered container {machine} (pid {pid})")
                _kill_container(pid)
        for what in net.clear_stale(live_ids):      # links, routing rules and tables
            log(f"testfleet: removed stale {what}")
        for point in _image_overlay_mounts():
            if not any(point.startswith(d.rstrip("/") + "/") for d in live_dirs):
                log(f"testfleet: unmounting stale overlay {point}")
                _umount(point)
        for cg in _stale_cgroups(live_ids):
            log(f"testfleet: removing stale memory cgroup {cg}")
            _cg_remove(cg)
    return cleared


def _teardown_remnants(prefix: str, info: dict) -> None:
    if is_file_server(info.get("files_pid")):
        _kill(info["files_pid"])
    for pid in _nspawn_pids(prefix):
        _kill_container(pid)
    run_dir = Path(info.get("run_dir") or "/nonexistent")
    _umount_all(run_dir / "hosts")
    if run_dir.is_dir() and not _mounts_under(run_dir / "hosts"):
        shutil.rmtree(run_dir / "hosts", ignore_errors=True)
    if info.get("cgroup"):
        _cg_remove(Path(info["cgroup"]))
