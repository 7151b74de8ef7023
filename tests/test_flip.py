"""The active-config flip against real files: SIGKILL mid-flip, a full disk, ownership.

Real: the files, a child Python process flipping in a loop and killed with SIGKILL at random
instants, and a 64 KiB tmpfs mounted for the full-disk case (needs root; unmounted in finally).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sidecar.flip import atomic_install, read_active_backend

REPO = Path(__file__).resolve().parents[1]


def write_variant(path: Path, name: str, padding: int = 0) -> Path:
    doc = {"model": {"provider": "custom", "default": name, "base_url": f"http://127.0.0.1:1/{name}"},
           # Padding makes a write span many syscalls, so kills land inside it.
           "notes": [f"{name}-{i}" for i in range(padding)]}
    path.write_text(yaml.safe_dump(doc))
    return path


def temps(directory: Path, dest: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(f".{dest.name}.nd-tmp-")]


CHILD = """
import sys
from pathlib import Path
from sidecar.flip import atomic_install
a, b, dest = map(Path, sys.argv[1:4])
out = sys.stdout.buffer
out.write(b"R"); out.flush()
i = 0
while True:
    atomic_install(a if i % 2 else b, dest)
    out.write(b"."); out.flush()
    i += 1
"""


def test_sigkill_at_random_instants_across_1000_flips(tmp_path):
    a = write_variant(tmp_path / "a.yaml", "alpha", padding=4000)
    b = write_variant(tmp_path / "b.yaml", "beta", padding=3800)
    live = tmp_path / "managed"
    live.mkdir()
    dest = live / "config.yaml"
    atomic_install(a, dest)
    expected = {yaml.safe_load(a.read_text())["model"]["default"]: a.read_bytes(),
                yaml.safe_load(b.read_text())["model"]["default"]: b.read_bytes()}
    rng = random.Random(1234)
    flips = kills = mid_flight = 0
    while flips < 1000:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(a), str(b), str(dest)],
                                 stdout=subprocess.PIPE, cwd=REPO)
        assert child.stdout.read(1) == b"R"
        counted = []
        reader = threading.Thread(target=lambda: counted.append(len(child.stdout.read())))
        reader.start()
        time.sleep(rng.uniform(0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        reader.join()
        flips += counted[0]
        kills += 1
        # The file is always one whole variant, never a mix or a truncation.
        data = dest.read_bytes()
        assert data in expected.values()
        left = temps(live, dest)
        assert len(left) <= 1, left
        mid_flight += len(left)
    assert kills >= 10
    # The next flip sweeps the dead writer's temp file.
    atomic_install(b, dest)
    assert temps(live, dest) == []
    assert dest.read_bytes() == b.read_bytes()
    print(f"{flips} flips, {kills} kills, {mid_flight} killed mid-write")


@pytest.fixture
def tiny_tmpfs():
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs and needs root")
    mnt = Path(tempfile.mkdtemp(prefix="nd-flip-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def test_full_disk_leaves_old_file_intact(tmp_path, tiny_tmpfs):
    small = write_variant(tmp_path / "small.yaml", "small")
    big = write_variant(tmp_path / "big.yaml", "big", padding=5000)  # ~60 KiB
    dest = tiny_tmpfs / "config.yaml"
    atomic_install(small, dest)
    before = dest.read_bytes()
    # Fill what is left, so the new variant cannot fit beside the old one.
    fd = os.open(tiny_tmpfs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        atomic_install(big, dest)
    assert info.value.errno == errno.ENOSPC
    assert dest.read_bytes() == before
    assert temps(tiny_tmpfs, dest) == []


def test_owner_group_mode_are_kept(tmp_path):
    a = write_variant(tmp_path / "a.yaml", "alpha")
    b = write_variant(tmp_path / "b.yaml", "beta")
    dest = tmp_path / "config.yaml"
    atomic_install(a, dest)
    os.chown(dest, 4321, 8765)
    os.chmod(dest, 0o640)
    atomic_install(b, dest)
    st = dest.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 8765, 0o640)
    assert dest.read_bytes() == b.read_bytes()


def test_new_dest_gets_its_directorys_group_and_0640(tmp_path):
    """The managed dir's group is the wizard's (setgid, set by the deploy); the variant's is the
    sidecar's own: a new active config must be the wizard's to read."""
    a = write_variant(tmp_path / "a.yaml", "alpha")
    os.chown(a, 0, 5555)
    dest = tmp_path / "new" / "config.yaml"
    dest.parent.mkdir()
    os.chown(dest.parent, 0, 6666)
    os.chmod(dest.parent, 0o2750)
    atomic_install(a, dest)
    st = dest.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.geteuid(), 6666, 0o640)


@pytest.mark.parametrize("text", ["just a string\n", "model: not-a-mapping\n", "a: [unclosed\n",
                                  "other: {x: 1}\n"])
def test_invalid_variant_is_refused_and_dest_untouched(tmp_path, text):
    good = write_variant(tmp_path / "good.yaml", "good")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    dest = tmp_path / "config.yaml"
    atomic_install(good, dest)
    with pytest.raises((ValueError, yaml.YAMLError)):
        atomic_install(bad, dest)
    assert dest.read_bytes() == good.read_bytes()
    assert temps(tmp_path, dest) == []


def test_live_writers_temp_is_not_swept(tmp_path):
    a = write_variant(tmp_path / "a.yaml", "alpha")
    dest = tmp_path / "config.yaml"
    in_flight = tmp_path / f".config.yaml.nd-tmp-{os.getppid()}-abcd"
    in_flight.write_text("partial")
    dead = tmp_path / ".config.yaml.nd-tmp-999999999-abcd"
    dead.write_text("partial")
    atomic_install(a, dest)
    assert in_flight.exists() and not dead.exists()


def test_read_active_backend(tmp_path):
    a = write_variant(tmp_path / "a.yaml", "alpha")
    b = write_variant(tmp_path / "b.yaml", "beta")
    wizard = SimpleNamespace(backends=(SimpleNamespace(name="claude", variant=a),
                                       SimpleNamespace(name="local", variant=b)))
    dest = tmp_path / "config.yaml"
    assert read_active_backend(dest, wizard) is None
    atomic_install(b, dest)
    assert read_active_backend(dest, wizard) == "local"
    # Same content, different formatting: still recognised (parsed comparison).
    dest.write_text(yaml.safe_dump(yaml.safe_load(a.read_text()), default_flow_style=True))
    assert read_active_backend(dest, wizard) == "claude"
    dest.write_text("model: {default: stranger}\n")
    assert read_active_backend(dest, wizard) is None
    dest.write_text(": : :\n\t[")
    assert read_active_backend(dest, wizard) is None
