"""The hosts' base images (mmdebstrap, cached per architecture) and, for a foreign
architecture, qemu-user through binfmt_misc."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from testbed.fleet.base import (CACHE, DEBIAN_ARCH, IMAGES, NATIVE_ARCH, FleetError, _locked,
                                sh)
from testbed.fleet.roots import _remove_tree

SUITE = "bookworm"
MIRROR = os.environ.get("NEVERDARK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What a host needs without a package index: systemd + sshd (the SSH connector, testinfra's
# service checks), python3 + venv (pyinfra facts, pip installs from the served wheelhouse),
# sudo (pi hosts), iproute2 (`ss` for testinfra sockets, addresses), procps (ps, pgrep),
# libgomp1 (the OpenMP runtime llama-cpp-python's libggml-cpu.so links against), nftables (a
# model server's host admits only the fleet's hosts, issue 17; the hosts cannot apt-get it).
INCLUDE = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
           "iproute2", "sudo", "procps", "libgomp1", "nftables"]
IMAGE_VERSION = "1"   # bump when ensure_image() makes a different image from the same list
RUNNER_PACKAGES = ["mmdebstrap", "systemd-container", "iproute2", "openssh-client"]
# Foreign-arch hosts (aarch64 on an x86_64 runner): qemu-user with binfmt_misc registration;
# the runner's own nft for them (NATIVE_PROGRAMS).
EMULATION_PACKAGES = ["qemu-user-static", "binfmt-support", "nftables"]
# nft cannot work under qemu-user: its linux-user layer refuses every netlink protocol but
# NETLINK_ROUTE, KOBJECT_UEVENT and AUDIT ("mnl.c: Unable to initialize Netlink socket: Protocol
# not supported"), and nftables speaks NETLINK_NETFILTER. So an emulated host's image carries the
# runner's native nft and the libraries it links against in NATIVE_DIR, run by a wrapper at the
# program's own path (the package's binary diverted with dpkg-divert): `nft` and nftables.service
# on the host run natively, in the host's own network namespace; the package stays installed.
NATIVE_DIR = "/usr/lib/neverdark-native"
NATIVE_PROGRAMS = ["/usr/sbin/nft"]

# mmdebstrap, not debootstrap: apt downloads everything natively in one go and dpkg installs in
# two batches. Measured cold (downloads included) on 2 cores, back to back: amd64 30 s against
# 57 s for `debootstrap --include=...` (219 MB against 332 MB); arm64 under qemu-user 135-244 s
# against 176-190 s (load 2-4; 150-163 s on a quieter machine), 247 MB against 358 MB; the
# FIELD-NOTES' 668 s + 304 s was debootstrap then `apt-get install` beside a compile. Docs, man
# pages and translations are not unpacked: the hosts never read them, and emulated I/O costs.
DPKG_EXCLUDES = ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*",
                 "/usr/share/info/*"]
DPKG_INCLUDES = ["/usr/share/doc/*/copyright"]
# openssh-server's postinst makes RSA, ECDSA and Ed25519 host keys (RSA: 2-4 s under emulation);
# every host gets its own key before boot anyway, so placeholders stop it and are removed.
SSH_KEY_PLACEHOLDERS = ("ssh_host_rsa_key", "ssh_host_ecdsa_key", "ssh_host_ed25519_key")


def image_key(arch: str = NATIVE_ARCH) -> str:
    recipe = f"{SUITE}|{DEBIAN_ARCH[arch]}|{','.join(INCLUDE)}|{','.join(DPKG_EXCLUDES)}|" \
             f"{IMAGE_VERSION}"
    if arch != NATIVE_ARCH:
        recipe += f"|native:{','.join(NATIVE_PROGRAMS)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def image_dir(arch: str = NATIVE_ARCH) -> Path:
    return IMAGES / f"{SUITE}-{DEBIAN_ARCH[arch]}-{image_key(arch)}"


def ensure_runner_packages(arches: set[str] = frozenset()) -> None:
    wanted = list(RUNNER_PACKAGES)
    if any(a != NATIVE_ARCH for a in arches):
        wanted += EMULATION_PACKAGES
    missing = [p for p in wanted
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        sh(["apt-get", "update", "-qq"], timeout=600, env=env)
        sh(["apt-get", "install", "-y", "-qq", *missing], timeout=900, env=env)


BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_FLAGS = "POCF"   # P: keep argv[0]; O+C: credentials from the binary; F: interpreter preopened


def _binfmt_entry(arch: str) -> dict[str, str]:
    entry = BINFMT / f"qemu-{arch}"
    try:
        lines = entry.read_text().splitlines()
    except OSError:
        return {}
    fields = {"state": lines[0] if lines else ""}
    for line in lines[1:]:
        key, _, value = line.replace(":", " ", 1).partition(" ")
        fields[key] = value.strip()
    return fields


def ensure_binfmt(arch: str) -> None:
    """The kernel runs `arch` binaries through qemu-user, in chroots and containers, setuid
    binaries (sudo) included.

    qemu-user-static registers `qemu-<arch>` with flags PF (F: the interpreter is opened once, at
    registration, so nothing has to be copied into a root). Without C the kernel takes the
    credentials of the interpreter, not of a setuid binary, and sudo on a pi host fails ("effective
    uid is not 0"): the entry is registered again, same magic and interpreter, flags POCF.
    binfmt_misc may be unmounted, or the entry missing after a reboot or a failed postinst (no
    systemd to run binfmt-support here).
    """
    if arch == NATIVE_ARCH:
        return
    entry = BINFMT / f"qemu-{arch}"
    if not (BINFMT / "register").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    if _binfmt_entry(arch).get("state") != "enabled":
        sh(["update-binfmts", "--enable", f"qemu-{arch}"], check=False)
    fields = _binfmt_entry(arch)
    if fields.get("state") == "enabled" and set(BINFMT_FLAGS) - set(fields.get("flags", "")):
        def escaped(hexed: str) -> str:
            return "".join(f"\\x{hexed[i:i + 2]}" for i in range(0, len(hexed), 2))
        rule = (f":qemu-{arch}:M:{fields.get('offset', '0')}:{escaped(fields['magic'])}:"
                f"{escaped(fields['mask'])}:{fields['interpreter']}:{BINFMT_FLAGS}")
        with _locked(CACHE / "locks" / "binfmt.lock", timeout=60):
            if set(BINFMT_FLAGS) - set(_binfmt_entry(arch).get("flags", "")):
                entry.write_text("-1")                       # unregister, then register again
                (BINFMT / "register").write_text(rule)
        fields = _binfmt_entry(arch)
    if fields.get("state") != "enabled" or set(BINFMT_FLAGS) - set(fields.get("flags", "")):
        raise FleetError(f"{arch} hosts need binfmt_misc entry {entry} enabled with flags "
                         f"{BINFMT_FLAGS} (apt-get install {' '.join(EMULATION_PACKAGES)}); "
                         f"found: {fields or 'none'}")


def _emulation_dropins(root: Path) -> list[str]:
    """Units that fail under qemu-user at step CREDENTIALS ("Failed to set up credentials:
    Invalid argument": systemd's credential mount is not emulated) run without credentials;
    the test hosts pass none. An empty LoadCredential= clears the unit's list."""
    units = []
    for unit in sorted((root / "lib" / "systemd" / "system").glob("*.service")):
        text = unit.read_text(errors="replace")
        if re.search(r"^(LoadCredential|SetCredential|LoadCredentialEncrypted)=", text, re.M):
            dropin = root / "etc" / "systemd" / "system" / f"{unit.name}.d"
            dropin.mkdir(parents=True, exist_ok=True)
            (dropin / "neverdark-qemu-user.conf").write_text(
                "# neverdark test fleet: under qemu-user, setting up credentials fails\n"
                "[Service]\nLoadCredential=\nSetCredential=\n")
            units.append(unit.name)
    return units


def _native_programs(root: Path) -> list[str]:
    """NATIVE_PROGRAMS of the runner, with what they link against, into an emulated root (see
    NATIVE_DIR); the programs it wrapped."""
    dest = root / NATIVE_DIR.lstrip("/")
    dest.mkdir(parents=True, exist_ok=True)
    for program in NATIVE_PROGRAMS:
        loader = None
        for line in sh(["ldd", program]).splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
                lib = parts[2]
            elif parts and parts[0].startswith("/"):
                lib = loader = parts[0]              # the dynamic loader
            else:
                continue                             # linux-vdso: the kernel's
            shutil.copy2(os.path.realpath(lib), dest / os.path.basename(lib))
        if loader is None:
            raise FleetError(f"{program} on the runner names no dynamic loader (ldd)")
        shutil.copy2(program, dest / os.path.basename(program))
        sh(["chroot", str(root), "dpkg-divert", "--quiet", "--local", "--rename", "--divert",
            f"{program}.qemu-user", "--add", program])
        wrapper = root / program.lstrip("/")
        wrapper.write_text(
            "#!/bin/sh\n# neverdark test fleet: the runner's native build (under qemu-user this "
            "program cannot work)\n"
            f'exec {NATIVE_DIR}/{os.path.basename(loader)} --library-path {NATIVE_DIR} '
            f'{NATIVE_DIR}/{os.path.basename(program)} "$@"\n')
        wrapper.chmod(0o755)
    return list(NATIVE_PROGRAMS)


def build_image(arch: str, target: Path, logfile: Path) -> None:
    """mmdebstrap a Debian root for `arch` into `target` (absent or empty), ready to be an image:
    no host keys, no machine-id, emulated hosts' units fixed. Removes `target` on failure."""
    placeholders = " ".join(f'"$1/etc/ssh/{k}"' for k in SSH_KEY_PLACEHOLDERS)
    argv = ["mmdebstrap", f"--arch={DEBIAN_ARCH[arch]}", "--variant=minbase",
            f"--include={','.join(INCLUDE)}", '--aptopt=Apt::Install-Recommends "false"',
            *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
            *[f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES],
            f'--essential-hook=mkdir -p "$1/etc/ssh" && touch {placeholders}',
            SUITE, str(target), MIRROR]
    logfile.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(logfile, "w") as out:
            out.write(f"$ {shlex.join(argv)}\n")
            out.flush()
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                timeout=1800).returncode
        if rc != 0:
            raise FleetError(f"mmdebstrap failed ({rc}); see {logfile}")
        # Host keys and the machine-id are made per host: an image must not carry them.
        for key in (target / "etc" / "ssh").glob("ssh_host_*"):
            key.unlink()
        (target / "etc" / "machine-id").write_text("")
        if arch != NATIVE_ARCH:
            with open(logfile, "a") as out:
                out.write(f"credential-less drop-ins: {', '.join(_emulation_dropins(target))}\n"
                          f"native programs: {', '.join(_native_programs(target))}\n")
        (target / "etc" / "neverdark-image").write_text(f"{SUITE} {arch} {' '.join(INCLUDE)}\n")
    except BaseException:
        _remove_tree(target)
        raise


def ensure_image(arch: str = NATIVE_ARCH, log=print) -> tuple[Path, float | None]:
    """The cached base image for `arch`, built when missing. Returns (path, build seconds or None).

    Built into `<final>.tmp-<pid>`, then renamed: the rename is atomic, so a crash never leaves a
    complete-looking half image. Parallel callers wait on a lock. A foreign arch is built and
    booted under qemu-user (binfmt_misc): apt downloads natively, only dpkg's unpacking and the
    maintainer scripts run emulated.
    """
    final = image_dir(arch)
    ensure_runner_packages({arch})
    ensure_binfmt(arch)
    if final.is_dir():
        return final, None
    with _locked(final.parent / f".build-{DEBIAN_ARCH[arch]}.lock"):
        if final.is_dir():
            return final, None
        for old in final.parent.glob(f"{final.name}.tmp-*"):  # crashed builds
            _remove_tree(old)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        logfile = CACHE / "logs" / f"mmdebstrap-{final.name}.log"
        how = "under qemu-user, about 3 minutes" if arch != NATIVE_ARCH else "about a minute"
        log(f"testfleet: building the {SUITE} {arch} image (mmdebstrap, {how}): {logfile}")
        started = time.monotonic()
        build_image(arch, tmp, logfile)
        os.rename(tmp, final)
        return final, time.monotonic() - started
