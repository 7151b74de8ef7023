"""Host roots: an overlay over the cached image (a copy where overlayfs is unavailable), each
host's identity and SSH access written before boot, and removing roots and mounts safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from testbed.fleet.base import IMAGES, PROFILES, FleetError, sh

ROOTS_MODE = "NEVERDARK_TESTFLEET_ROOTS"   # overlay (default) | copy


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root.rstrip("/") + "/"):
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def _umount(point: str) -> None:
    if subprocess.run(["umount", point], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", point], capture_output=True)


def _umount_all(path: Path) -> None:
    for point in _mounts_under(path):
        _umount(point)


def _image_overlay_mounts() -> list[str]:
    """Overlay mount points whose lower layer is one of our cached images."""
    images = str(IMAGES.resolve())
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            if post.startswith("overlay ") and f"lowerdir={images}/" in post:
                points.append(pre.split()[4])
    return points


def _remove_tree(path: Path) -> None:
    """rm -rf of a (crashed) build or host root, never through a mount (mmdebstrap mounts /proc,
    /sys and /dev inside the root while it builds; a killed build leaves them there)."""
    _umount_all(path)
    if _mounts_under(path):
        raise FleetError(f"cannot remove {path}: still mounted: {_mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


def make_root(hdir: Path, image: Path, log) -> tuple[Path, str]:
    """The host's root under `hdir`: an overlay over `image`, or a copy of it where overlayfs
    is not available (e.g. run_dir on an overlay) or $NEVERDARK_TESTFLEET_ROOTS=copy.
    Returns (root, "overlay" | "copy")."""
    shutil.rmtree(hdir, ignore_errors=True)
    root = hdir / "root"
    for d in (root, hdir / "upper", hdir / "work"):
        d.mkdir(parents=True)
    mode = os.environ.get(ROOTS_MODE, "overlay")
    try:
        if mode != "overlay":
            raise FleetError(f"{ROOTS_MODE}={mode}")
        sh(["mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={image},upperdir={hdir / 'upper'},workdir={hdir / 'work'}", str(root)])
    except FleetError as e:
        if mode == "overlay":
            log(f"testfleet: {hdir.name}: overlay mount failed, copying the image ({e})")
        mode = "copy"
        root.rmdir()
        sh(["cp", "-a", "--reflink=auto", str(image), str(root)], timeout=600)
    return root, mode


def _host_key(root: Path, name: str) -> str:
    key = root / "etc" / "ssh" / "ssh_host_ed25519_key"
    for old in key.parent.glob("ssh_host_*"):
        old.unlink()
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)])
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def _prepare_root(root: Path, name: str, profile: str, client_pub: str, runner_addr: str) -> str:
    """Per-host identity and access, written before boot. Returns the host's public key."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{name}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n"
                               f"{runner_addr}\tneverdark-runner\n::1\tlocalhost ip6-localhost\n")
    (etc / "machine-id").unlink(missing_ok=True)
    (etc / "machine-id").write_text(os.urandom(16).hex() + "\n")
    host_pub = _host_key(root, name)
    (etc / "ssh" / "sshd_config.d").mkdir(exist_ok=True)
    (etc / "ssh" / "sshd_config.d" / "neverdark-testfleet.conf").write_text(
        "# neverdark test fleet: key-only SSH with the run's client key\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\n")
    user = PROFILES[profile]
    if user == "root":
        home = root / "root"
    else:
        sh(["chroot", str(root), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "-p", "*",
            user])
        sudoers = etc / "sudoers.d" / f"010_{user}-nopasswd"
        sudoers.write_text(f"{user} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        home = root / "home" / user
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(client_pub)
    (ssh_dir / "authorized_keys").chmod(0o600)
    sh(["chroot", str(root), "chown", "-R", f"{user}:{user}", f"/{ssh_dir.relative_to(root)}"])
    return host_pub
