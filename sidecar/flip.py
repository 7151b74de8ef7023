"""Atomic replacement of a wizard's active config by one of its deploy-owned backend variants.

Hermes re-reads the managed config on every request, so a reader must only ever see a whole old
file or a whole new one: write a temp file beside the target, fsync, rename over, fsync the dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from sidecar.atomic import write_atomic

# libyaml's loader is ~50x faster; the pure-Python one is the fallback on hosts without it.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TMP_MARK = ".nd-tmp-"


def _load_variant(variant: Path) -> bytes:
    data = variant.read_bytes()
    parsed = yaml.load(data, Loader=_Loader)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
        raise ValueError(f"{variant}: not a YAML mapping with a 'model' section")
    return data


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}{_TMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dest: Path) -> None:
    """Remove temp files left by flips that died mid-way (their writer's pid is gone)."""
    prefix = _tmp_prefix(dest)
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_part = name[len(prefix):].split("-", 1)[0]
        # A live writer's temp is its in-flight flip; deleting it would fail that flip's rename.
        if pid_part.isdigit() and _pid_alive(int(pid_part)):
            continue
        try:
            os.unlink(dest.parent / name)
        except FileNotFoundError:
            pass


def _target_owner(variant: Path, dest: Path) -> tuple[int, int, int]:
    try:
        st = dest.stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777
    except FileNotFoundError:
        # A new active config: readable by the wizard's group (its directory's: the deploy
        # makes it setgid), nobody else.
        return os.geteuid(), dest.parent.stat().st_gid, 0o640


def atomic_install(variant: Path, dest: Path) -> None:
    variant, dest = Path(variant), Path(dest)
    data = _load_variant(variant)
    clean_stale_temps(dest)
    uid, gid, mode = _target_owner(variant, dest)
    write_atomic(dest, data, mode=mode, owner=(uid, gid), tmp_prefix=_tmp_prefix(dest))


def _parse(path: Path):
    try:
        return yaml.load(Path(path).read_bytes(), Loader=_Loader)
    except (OSError, yaml.YAMLError):
        return None


def refresh(active_config: Path, wizard, backend: str) -> bool:
    """Re-install `backend`'s variant when the active config is an older copy of it (a deploy
    changed the variant: new notice, profile, model settings). True when it rewrote the file.

    Only where the active config matches no current variant: a wizard on another backend's
    current variant is left alone."""
    if read_active_backend(active_config, wizard) is not None:
        return False
    atomic_install(wizard.backend(backend).variant, active_config)
    return True


def read_active_backend(active_config: Path, wizard) -> str | None:
    active = _parse(active_config)
    if not isinstance(active, dict):
        return None
    for backend in wizard.backends:
        if _parse(backend.variant) == active:
            return backend.name
    return None
