"""Write a file so that a reader, or a crash at any instant, sees the whole old file or the whole
new one: a temp file beside the target, fsync, rename over it, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, data: bytes, mode: int = 0o600,
                 owner: tuple[int, int] | None = None, tmp_prefix: str | None = None) -> None:
    """Replace `dest` with `data`, giving it `mode` (and `owner` (uid, gid) when set).

    The temp file's name is `tmp_prefix` (default `.<name>.tmp-`) plus the writer's pid, so a
    caller can recognise and clean up temps left by a writer that died.
    """
    dest = Path(dest)
    prefix = tmp_prefix if tmp_prefix is not None else f".{dest.name}.tmp-"
    tmp = dest.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != owner:
                    os.fchown(fd, owner[0] if st.st_uid != owner[0] else -1, owner[1])
            os.fchmod(fd, mode)  # after any chown, and regardless of the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
