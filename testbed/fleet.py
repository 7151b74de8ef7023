"""The test fleet: Debian 12 hosts with real systemd and sshd, booted with systemd-nspawn.

Each host is an overlay over a cached mmdebstrap image of its architecture (a `cp -a` copy where
overlayfs is not available), booted with its own network namespace and a /30 link to the runner
(`ve-<machine>` here, `host0` inside), reached over SSH with a key made for the run. `vps` hosts
take SSH as root; `pi` hosts as a `pi` user with passwordless sudo, as on a real Pi. A host of
another architecture than the runner's (aarch64 on x86_64) runs under qemu-user through
binfmt_misc: real arm64 Debian, 10-20x slower. Each host is held to its memory_mb by a memory
cgroup around its whole container, as a real host's RAM holds it. The hosts have no route to a
package index: the runner serves them files over HTTP on each link's runner-side address.

Library (tests, demo, benchmarks)::

    with fleet_context(hosts=["vps1:vps", "pi1:pi:aarch64:2048"], run_dir=tmp,
                       serve_dirs={"wheels": wheelhouse_dir}) as fleet:
        fleet.ssh("pi1", "systemctl is-active ssh")        # as root (sudo on a pi host)
        fleet.exec("vps1", "journalctl -b -n 20")          # nsenter, no SSH
        fleet.files_url("vps1") + "/wheels/"               # pip --find-links for that host
        fleet.memory_peak("vps1"), fleet.oom_events("vps1")

CLI (run dir defaults to `.run/testfleet`, or `--run-dir` / `$NEVERDARK_TESTFLEET_DIR`)::

    python -m testbed.fleet up vps1:vps pi1:pi:aarch64 [--serve wheels=/var/cache/neverdark/wheels]
    python -m testbed.fleet status
    python -m testbed.fleet ssh pi1 -- sudo systemctl is-system-running
    python -m testbed.fleet down        # power off, keep the host roots
    python -m testbed.fleet destroy     # power off and remove everything of the run

Everything a run creates is named with its run id (`nd<4 hex>`): machines `nd<id>-<host>`,
links `ve-nd<id>-<host>`, memory cgroups `neverdark-nd<id>/<host>`, a registry entry in
/run/neverdark-testfleet/<id>.json. Each run starts by clearing what dead runs left behind
(processes, links, overlay mounts, host roots, cgroups), and never touches a run whose owner is
still alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import html
import io
import http.server
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import click

from neverdark.artifacts import ARCHES, CACHE   # $NEVERDARK_CACHE: one rule for the whole runner
SUITE = "bookworm"
MIRROR = os.environ.get("NEVERDARK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What a host needs without a package index: systemd + sshd (the SSH connector, testinfra's
# service checks), python3 + venv (pyinfra facts, pip installs from the served wheelhouse),
# sudo (pi hosts), iproute2 (`ss` for testinfra sockets, addresses), procps (ps, pgrep),
# libgomp1 (the OpenMP runtime llama-cpp-python's libggml-cpu.so links against).
INCLUDE = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
           "iproute2", "sudo", "procps", "libgomp1"]
IMAGE_VERSION = "1"   # bump when ensure_image() makes a different image from the same list
RUNNER_PACKAGES = ["mmdebstrap", "systemd-container", "iproute2", "openssh-client"]
# Foreign-arch hosts (aarch64 on an x86_64 runner): qemu-user with binfmt_misc registration.
EMULATION_PACKAGES = ["qemu-user-static", "binfmt-support"]
REGISTRY = Path(os.environ.get("NEVERDARK_TESTFLEET_REGISTRY", "/run/neverdark-testfleet"))
PREFIX = "nd"
NET = ipaddress.ip_network("10.213.0.0/16")   # one /24 per run, one /30 per host
PROFILES = {"vps": "root", "pi": "pi"}
DEFAULT_HOSTS = [("vps1", "vps"), ("pi1", "pi")]
DEFAULT_RUN_DIR = Path(os.environ.get("NEVERDARK_TESTFLEET_DIR", ".run/testfleet"))
BOOT_TIMEOUT = float(os.environ.get("NEVERDARK_TESTFLEET_BOOT_TIMEOUT", "150"))


class FleetError(RuntimeError):
    pass


def sh(cmd: list[str] | str, check: bool = True, timeout: float = 120, input: str | None = None,
       **kw) -> str:
    """Run a command, return its stdout; FleetError (with stderr) when it fails or hangs."""
    try:
        proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                              timeout=timeout, input=input, **kw)
    except subprocess.TimeoutExpired as e:
        raise FleetError(f"{cmd!r} did not finish within {timeout}s") from e
    if check and proc.returncode != 0:
        raise FleetError(f"{cmd!r} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout


@contextlib.contextmanager
def _locked(path: Path, timeout: float = 1800):
    """An exclusive flock on `path`, waited for at most `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FleetError(f"lock {path} still held after {timeout}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- processes -----------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, names a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int | None, start: str | None = None) -> bool:
    if not pid:
        return False
    got = _proc_start(pid)
    return got is not None and (start is None or got == start)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _nspawn_pids(machine_prefix: str) -> list[int]:
    """systemd-nspawn processes whose --machine= starts with machine_prefix."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(int(entry.name))
        if args and os.path.basename(args[0]) == "systemd-nspawn" and any(
                a.startswith(f"--machine={machine_prefix}") for a in args):
            found.append(int(entry.name))
    return found


def _children(pid: int) -> list[int]:
    kids = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _pid1(nspawn_pid: int, timeout: float = 30) -> int:
    """The container's PID 1 (systemd) as the runner sees it: the child of systemd-nspawn."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(nspawn_pid):
            break
        for kid in _children(nspawn_pid):
            comm = Path(f"/proc/{kid}/comm").read_text().strip() if _alive(kid) else ""
            if comm == "systemd":
                return kid
        time.sleep(0.1)
    raise FleetError(f"systemd-nspawn {nspawn_pid} started no PID 1 (systemd) within {timeout}s")


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return not any(_alive(p) for p in pids)


# -- links and mounts ----------------------------------------------------------------------------

def _links() -> list[str]:
    out = sh(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


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


def _image_overlay_mounts() -> list[str]:
    """Overlay mount points whose lower layer is one of our cached images."""
    images = str((CACHE / "images").resolve())
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            if post.startswith("overlay ") and f"lowerdir={images}/" in post:
                points.append(pre.split()[4])
    return points


# -- host specs ----------------------------------------------------------------------------------

NATIVE_ARCH = platform.machine()            # `uname -m` of the runner
DEBIAN_ARCH = {a: spec.debian for a, spec in ARCHES.items()}   # `uname -m` -> Debian's name
DEFAULT_MEMORY_MB = 4096
EMULATED_SLOWDOWN = 3      # boot and poweroff waits for a host under qemu-user (10-20x slower CPU)


@dataclass(frozen=True)
class HostSpec:
    """One test host. CLI form NAME[:PROFILE[:ARCH]][:MEMORY_MB], e.g. `pi1:pi:aarch64:2048`;
    `name:profile` is a host of the runner's own architecture with DEFAULT_MEMORY_MB."""
    name: str
    profile: str = "vps"
    arch: str = NATIVE_ARCH
    memory_mb: int = DEFAULT_MEMORY_MB

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", str(self.name)):
            raise FleetError(f"host {self.name!r}: name must match [a-z][a-z0-9-]{{0,30}}")
        if self.profile not in PROFILES:
            raise FleetError(f"host {self.name}: profile {self.profile!r} is not one of "
                             f"{', '.join(PROFILES)}")
        if self.arch not in DEBIAN_ARCH:
            raise FleetError(f"host {self.name}: arch {self.arch!r} is not one of "
                             f"{', '.join(DEBIAN_ARCH)}")
        if not isinstance(self.memory_mb, int) or isinstance(self.memory_mb, bool) \
                or not 64 <= self.memory_mb <= 1 << 20:
            raise FleetError(f"host {self.name}: memory_mb {self.memory_mb!r} is not a whole "
                             "number of MB from 64 up")

    @property
    def emulated(self) -> bool:
        return self.arch != NATIVE_ARCH

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        name, *rest = text.split(":")
        fields: dict = {"name": name}
        if rest:
            fields["profile"] = rest.pop(0)
        for part in rest:
            if part in DEBIAN_ARCH and "arch" not in fields:
                fields["arch"] = part
            elif part.isdigit() and "memory_mb" not in fields:
                fields["memory_mb"] = int(part)
            else:
                raise FleetError(f"host {text!r}: {part!r} is neither an arch "
                                 f"({', '.join(DEBIAN_ARCH)}) nor a memory size in MB; "
                                 "the form is NAME[:PROFILE[:ARCH]][:MEMORY_MB]")
        return cls(**fields)

    @classmethod
    def of(cls, value) -> HostSpec:
        """A HostSpec from itself, "NAME:...", (name, profile[, arch[, memory_mb]]) or a dict."""
        if isinstance(value, HostSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 4:
            return cls(*value)
        raise FleetError(f"not a host spec: {value!r}")

    def as_dict(self) -> dict:
        return {"name": self.name, "profile": self.profile, "arch": self.arch,
                "memory_mb": self.memory_mb}


# -- the base image ------------------------------------------------------------------------------

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
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def image_dir(arch: str = NATIVE_ARCH) -> Path:
    return CACHE / "images" / f"{SUITE}-{DEBIAN_ARCH[arch]}-{image_key(arch)}"


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


def _remove_tree(path: Path) -> None:
    """rm -rf of a (crashed) build or host root, never through a mount (mmdebstrap mounts /proc,
    /sys and /dev inside the root while it builds; a killed build leaves them there)."""
    for point in _mounts_under(path):
        _umount(point)
    if _mounts_under(path):
        raise FleetError(f"cannot remove {path}: still mounted: {_mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


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
                out.write(f"credential-less drop-ins: {', '.join(_emulation_dropins(target))}\n")
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


# -- memory: one cgroup per host ----------------------------------------------------------------

# A host's limit must hold the whole container, as a real host's RAM does. `MemoryMax=` inside
# a container is not enforced here (units show MemoryCurrent "[not set]"), so each host's
# systemd-nspawn, and so everything it starts, runs in a child cgroup of the runner's own memory
# cgroup: <runner's>/neverdark-nd<run id>/<host>. cgroup v1, as on these machines.
CGROUP_PREFIX = "neverdark-"


def _memory_mount() -> tuple[Path, str] | None:
    """(mount point, the hierarchy path it shows) of the cgroup v1 memory controller."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fstype, _, options = (post.split() + ["", "", ""])[:3]
            if fstype == "cgroup" and "memory" in options.split(","):
                return Path(pre.split()[4]), pre.split()[3]
    return None


def _memory_cgroup_of_runner() -> Path:
    """The runner's own cgroup in the cgroup v1 memory hierarchy, as a directory."""
    mount = _memory_mount()
    own = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                own = path
    if mount is None or own is None:
        raise FleetError("test hosts' memory limits need the cgroup v1 memory controller "
                         "(a `cgroup` mount with option memory, and a memory line in "
                         "/proc/self/cgroup); this machine has none")
    point, shown = mount
    if shown != "/" and (own == shown or own.startswith(shown + "/")):
        own = own[len(shown):]              # the mount shows only a subtree (in a container)
    return point / own.lstrip("/")


def _swap_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _cg_read(cg: Path, knob: str) -> str:
    try:
        return (cg / knob).read_text()
    except OSError as e:
        raise FleetError(f"cannot read {cg / knob}: {e}") from None


def _cg_write(cg: Path, knob: str, value: object) -> None:
    try:
        (cg / knob).write_text(str(value))
    except OSError as e:
        raise FleetError(f"cannot write {value} to {cg / knob}: {e}") from None


def _cg_make(cg: Path, limit_bytes: int | None = None) -> None:
    """Create the cgroup; with a limit on memory and, where swap exists, on memory + swap."""
    try:
        cg.mkdir()
    except OSError as e:
        raise FleetError(f"cannot create memory cgroup {cg}: {e}") from None
    if limit_bytes is None:
        return
    _cg_write(cg, "memory.limit_in_bytes", limit_bytes)
    if (cg / "memory.memsw.limit_in_bytes").exists():
        _cg_write(cg, "memory.memsw.limit_in_bytes", limit_bytes)
    elif _swap_bytes():
        # No memsw accounting (swapaccount=0): with swappiness 0 a v1 memory cgroup never swaps
        # its anonymous memory, so swap cannot hide an overrun.
        _cg_write(cg, "memory.swappiness", 0)
    got = int(_cg_read(cg, "memory.limit_in_bytes"))
    if not limit_bytes - 4096 <= got <= limit_bytes:        # the kernel rounds to pages
        raise FleetError(f"{cg}: memory.limit_in_bytes is {got}, not {limit_bytes}")


def _cg_procs(cg: Path) -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for d, _, _ in os.walk(cg):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(d, "cgroup.procs").read_text().split()]
    return pids


def _cg_remove(cg: Path, timeout: float = 10) -> bool:
    """Kill what still runs in the cgroup (and its children), then remove them, deepest first."""
    if not cg.is_dir():
        return True
    deadline = time.monotonic() + timeout
    while (pids := _cg_procs(cg)) and time.monotonic() < deadline:
        for pid in pids:
            _kill(pid)
        time.sleep(0.1)
    dirs = sorted((d for d, _, _ in os.walk(cg)), key=len, reverse=True)
    for d in dirs:
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:       # EBUSY for a moment after its last task exits
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    return not cg.exists()


def _in_cgroup(cg: Path, argv: list[str]) -> list[str]:
    """argv, run from a shell that first moves itself into cgroup `cg` (inherited through exec
    and by every child: nspawn, the container's systemd and all it starts)."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg), *argv]


def _stale_cgroups(live_ids: set[str]) -> list[Path]:
    """Our run cgroups (neverdark-nd<id>, anywhere in the memory hierarchy) of runs not live."""
    found: list[Path] = []
    if (mounted := _memory_mount()) is None:
        return found
    mount = mounted[0]
    for d, subdirs, _ in os.walk(mount):
        depth = len(Path(d).relative_to(mount).parts)
        keep = []
        for sub in subdirs:
            m = re.fullmatch(rf"{CGROUP_PREFIX}{PREFIX}([0-9a-f]{{4}})", sub)
            if m:
                if m.group(1) not in live_ids:
                    found.append(Path(d) / sub)
            elif depth < 6:
                keep.append(sub)
        subdirs[:] = keep
    return found


# -- the file server -----------------------------------------------------------------------------

class _LayeredHandler(http.server.SimpleHTTPRequestHandler):
    """Serves /KEY/... from a list of directories (first match wins); listings merge them, so
    a directory of wheels is a valid pip --find-links page."""
    layers: dict[str, list[str]] = {}

    def _split(self, path: str) -> tuple[str, str]:
        path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
        parts = path.lstrip("/").split("/", 1)
        return parts[0], parts[1] if len(parts) > 1 else ""

    def translate_path(self, path: str) -> str:
        key, rest = self._split(path)
        if key not in self.layers:
            return "/nonexistent" if key else "/"
        first = None
        for root in self.layers[key]:
            root = os.path.realpath(root)
            full = os.path.realpath(os.path.join(root, rest))
            if full != root and not full.startswith(root + "/"):
                return "/nonexistent"
            first = first or full
            if os.path.exists(full):
                return full
        return first or "/nonexistent"

    def list_directory(self, path):
        key, rest = self._split(self.path)
        if not key:
            names = [f"{k}/" for k in sorted(self.layers)]
        else:
            seen = {}
            for root in self.layers.get(key, []):
                d = os.path.join(root, rest)
                with contextlib.suppress(OSError):
                    for n in os.listdir(d):
                        if not n.startswith("."):
                            seen.setdefault(n, n + "/" if os.path.isdir(os.path.join(d, n)) else n)
            names = [seen[n] for n in sorted(seen)]
        body = "<!DOCTYPE html><html><body>\n" + "".join(
            f'<a href="{urllib.parse.quote(n)}">{html.escape(n)}</a><br>\n' for n in names) \
            + "</body></html>\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)

    def log_message(self, fmt, *args) -> None:
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")


def serve(layers: dict[str, list[str]], binds: list[str], port: int = 0,
          attempts: int = 20) -> tuple[list[http.server.ThreadingHTTPServer], int]:
    """Start threaded HTTP servers on `binds` (never 0.0.0.0), all on one port.

    Port 0: the first address picks a free port and the others take the same one (retried).
    Returns the servers (call .shutdown() to stop) and the port.
    """
    if not binds or any(ipaddress.ip_address(b).is_unspecified for b in binds):
        raise FleetError(f"serve: bind to the hosts' runner addresses, not {binds}")
    handler = type("Handler", (_LayeredHandler,), {"layers": layers})
    for _ in range(attempts):
        servers = []
        try:
            for addr in binds:
                servers.append(http.server.ThreadingHTTPServer(
                    (addr, port if port or not servers else servers[0].server_address[1]),
                    handler))
        except OSError:
            for s in servers:
                s.server_close()
            if port:
                raise
            continue
        for s in servers:
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return servers, servers[0].server_address[1]
    raise FleetError(f"no port free on all of {binds}")


# -- the fleet -----------------------------------------------------------------------------------

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


class FleetContext:
    """A test fleet. `fleet_context(...)` gives one that is up and cleans up after itself.

    hosts: HostSpecs or what HostSpec.of() takes ("pi1:pi:aarch64:2048", ("vps1", "vps")).
    hosts[name]: address, runner_address, user, port, key, profile, arch, memory_mb, pid
    (systemd-nspawn), pid1 (the container's systemd), known_hosts, machine, link, root, sudo,
    cgroup (its memory cgroup), files_url (when serving).
    """

    def __init__(self, run_dir: Path, hosts=DEFAULT_HOSTS,
                 serve_dirs: dict[str, Path] | None = None, persistent: bool = False,
                 log=None):
        self.run_dir = Path(run_dir).resolve()
        self.specs = [HostSpec.of(h) for h in hosts]
        self.serve_dirs = {k: str(Path(v).resolve()) for k, v in (serve_dirs or {}).items()}
        self.persistent = persistent     # CLI runs outlive the process that started them
        self.run_id = ""
        self.subnet: str | None = None
        self.cgroup: Path | None = None      # the run's memory cgroup; one child per host
        self.hosts: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._booted: dict[str, float] = {}
        self.ssh_config = self.run_dir / "ssh_config"
        self.known_hosts = self.run_dir / "known_hosts"
        self.client_key = self.run_dir / "id_ed25519"
        self.files_port: int | None = None
        self.files_pid: int | None = None
        self.timings: dict[str, float] = {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- names -------------------------------------------------------------------------------
    @property
    def machine_prefix(self) -> str:
        return f"{PREFIX}{self.run_id}-"

    def _machine(self, name: str, index: int) -> str:
        machine = f"{self.machine_prefix}{name}"
        return machine if len(machine) <= 12 else f"{self.machine_prefix}{index}"  # ve-… ≤ 15

    # -- bring-up ------------------------------------------------------------------------------
    def up(self) -> FleetContext:
        if len({s.name for s in self.specs}) != len(self.specs) or not 0 < len(self.specs) <= 60:
            raise FleetError("1 to 60 hosts, unique names")
        _memory_cgroup_of_runner()     # fails early, with the reason, where limits cannot work
        clear_stale(log=self.log)
        self._clear_previous_run_here()
        images, total = {}, 0.0
        for arch in sorted({s.arch for s in self.specs}):
            images[arch], built = ensure_image(arch, log=self.log)
            self.timings[f"image_build_s:{arch}"] = built or 0.0
            total += built or 0.0
        self.timings["image_build_s"] = total
        self.timings["image_cached"] = float(total == 0.0)
        started = time.monotonic()
        try:
            self._up(images)
        except BaseException:
            with contextlib.suppress(Exception):
                self.destroy(keep_logs=True)
            raise
        self.timings["up_s"] = time.monotonic() - started
        return self

    def _up(self, images: dict[str, Path]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        with _locked(REGISTRY / ".lock", timeout=60):
            self.run_id = self._new_run_id()
            self.subnet = str(self._pick_subnet())
            self.cgroup = _memory_cgroup_of_runner() / f"{CGROUP_PREFIX}{PREFIX}{self.run_id}"
            self._register()                   # registered first: a crash from here is stale
            _cg_make(self.cgroup)
        self.client_key.unlink(missing_ok=True)
        Path(f"{self.client_key}.pub").unlink(missing_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"neverdark-testfleet-{self.run_id}",
            "-f", str(self.client_key)])
        self.client_key.chmod(0o600)
        client_pub = Path(f"{self.client_key}.pub").read_text()
        blocks = list(ipaddress.ip_network(self.subnet).subnets(new_prefix=30))
        for index, spec in enumerate(self.specs):
            runner_addr, host_addr = (str(a) for a in list(blocks[index].hosts())[:2])
            self._boot(spec, index, images[spec.arch], client_pub, runner_addr, host_addr)
            self._save()
        self._write_ssh_files()
        for name in self.hosts:
            self._wait_ready(name)
        if self.serve_dirs:
            self.start_file_server()
        self._save()

    def _new_run_id(self) -> str:
        while True:
            run_id = os.urandom(2).hex()
            if not (REGISTRY / f"{run_id}.json").exists() and not _nspawn_pids(
                    f"{PREFIX}{run_id}-"):
                return run_id

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """This run's /24: derived from the run id, the next free one if that is in use."""
        used = sh(["ip", "-o", "-4", "addr", "show"], check=False)
        taken = set()
        for entry in REGISTRY.glob("*.json"):
            with contextlib.suppress(ValueError, OSError, KeyError):
                taken.add(json.loads(entry.read_text())["subnet"])
        blocks = list(NET.subnets(new_prefix=24))
        start = int(self.run_id, 16) % len(blocks)
        for i in range(len(blocks)):
            block = blocks[(start + i) % len(blocks)]
            prefix = ".".join(str(block.network_address).split(".")[:3]) + "."
            if str(block) not in taken and f" {prefix}" not in used:
                return block
        raise FleetError(f"no free /24 in {NET} for the test fleet")

    def _boot(self, spec: HostSpec, index, image, client_pub, runner_addr, host_addr) -> None:
        name, profile = spec.name, spec.profile
        machine = self._machine(name, index)
        hdir = self.run_dir / "hosts" / name
        shutil.rmtree(hdir, ignore_errors=True)
        root = hdir / "root"
        for d in (root, hdir / "upper", hdir / "work"):
            d.mkdir(parents=True)
        mode = os.environ.get("NEVERDARK_TESTFLEET_ROOTS", "overlay")   # overlay | copy
        try:
            if mode != "overlay":
                raise FleetError(f"NEVERDARK_TESTFLEET_ROOTS={mode}")
            sh(["mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir={image},upperdir={hdir / 'upper'},workdir={hdir / 'work'}", str(root)])
        except FleetError as e:   # overlayfs unavailable (e.g. run_dir on an overlay): copy
            if mode == "overlay":
                self.log(f"testfleet: {name}: overlay mount failed, copying the image ({e})")
            mode = "copy"
            root.rmdir()
            sh(["cp", "-a", "--reflink=auto", str(image), str(root)], timeout=600)
        host_pub = _prepare_root(root, name, profile, client_pub, runner_addr)
        known = hdir / "known_hosts"
        known.write_text(f"{name},{host_addr} {host_pub}\n")
        console = self.run_dir / "logs" / f"{name}.console.log"
        cgroup = self.cgroup / name
        _cg_make(cgroup, spec.memory_mb * 1024 * 1024)
        with open(console, "wb") as out:
            proc = subprocess.Popen(
                _in_cgroup(cgroup, ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
                                    "-D", str(root), f"--machine={machine}", "--network-veth",
                                    "-b"]),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.procs[name] = proc
        booted = time.monotonic()
        link = f"ve-{machine}"
        self.hosts[name] = {
            "address": host_addr, "runner_address": runner_addr, "user": PROFILES[profile],
            "port": 22, "key": str(self.client_key), "profile": profile, "arch": spec.arch,
            "memory_mb": spec.memory_mb, "emulated": spec.emulated, "pid": proc.pid,
            "pid_start": _proc_start(proc.pid), "pid1": None, "known_hosts": str(known),
            "machine": machine, "link": link, "root": str(root), "root_mode": mode,
            "sudo": PROFILES[profile] != "root", "console_log": str(console),
            "cgroup": str(cgroup),
        }
        self._booted[name] = booted
        try:
            pid1 = _pid1(proc.pid)     # the shell joins the cgroup, then execs systemd-nspawn
        except FleetError as e:
            self._fail(name, str(e))
        self.hosts[name]["pid1"] = pid1
        deadline = time.monotonic() + 20
        while link not in _links():
            if time.monotonic() > deadline or proc.poll() is not None:
                self._fail(name, f"veth {link} did not appear")
            time.sleep(0.1)
        sh(["ip", "addr", "add", f"{runner_addr}/30", "dev", link])
        sh(["ip", "link", "set", link, "up"])
        # The container's end, in its network namespace (works while it is still booting).
        sh(["nsenter", "-t", str(pid1), "-n", "ip", "addr", "add", f"{host_addr}/30",
            "dev", "host0"])
        sh(["nsenter", "-t", str(pid1), "-n", "ip", "link", "set", "host0", "up"])

    def _wait_ready(self, name: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Bounded: systemd running/degraded, the right `uname -m`, then sshd answering with the
        run's keys. An emulated host gets EMULATED_SLOWDOWN times the time."""
        h = self.hosts[name]
        if h.get("emulated"):
            timeout *= EMULATED_SLOWDOWN
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            if not self.is_alive(name):
                self._fail(name, f"the container exited while booting ({state!r})")
            try:
                state = self.exec(name, "systemctl is-system-running 2>/dev/null || true",
                                  check=False, timeout=30).strip()
            except FleetError as e:       # a slow answer while booting: ask again, bounded
                state = str(e)
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                self._fail(name, f"systemd did not finish booting within {timeout}s ({state!r})")
            time.sleep(0.3)
        if state == "degraded":
            failed = self.exec(name, "systemctl --failed --no-legend --plain", check=False)
            self.log(f"testfleet: {name} is degraded; failed units:\n{failed}")
        h["system_state"] = state
        machine = self.exec(name, "uname -m", check=False).strip()
        if machine != h["arch"]:
            self._fail(name, f"`uname -m` says {machine!r}, not {h['arch']!r}")
        last = ""
        while True:
            try:
                proc = subprocess.run(self.ssh_argv(name, "true", connect_timeout=5),
                                      capture_output=True, text=True, timeout=30)
            except subprocess.TimeoutExpired:
                proc = subprocess.CompletedProcess([], 255, "", "ssh: no answer within 30 s")
            if proc.returncode == 0:
                self.timings[f"ready_s:{name}"] = time.monotonic() - self._booted[name]
                return
            last = proc.stderr.strip()
            if time.monotonic() > deadline:
                self._fail(name, f"sshd did not accept the run's key within {timeout}s: {last}")
            time.sleep(0.3)

    def _fail(self, name: str, why: str) -> None:
        h = self.hosts[name]
        journal = failed = ""
        if self.is_alive(name) and h.get("pid1"):
            with contextlib.suppress(FleetError):
                failed = self.exec(name, "systemctl --failed --no-legend --plain", check=False)
                journal = self.exec(name, "journalctl -b --no-pager -n 80", check=False)
        console = ""
        with contextlib.suppress(OSError):
            console = Path(h["console_log"]).read_text(errors="replace")[-3000:]
        raise FleetError(f"{name}: {why}\n--- failed units:\n{failed}\n--- journal (last 80):\n"
                         f"{journal}\n--- console ({h['console_log']}):\n{console}")

    # -- outputs -------------------------------------------------------------------------------
    def _write_ssh_files(self) -> None:
        lines = [f"# neverdark test fleet run {self.run_id}: ssh -F {self.ssh_config} NAME", ""]
        for name, h in self.hosts.items():
            lines += [f"Host {name}", f"  HostName {h['address']}", f"  User {h['user']}",
                      f"  Port {h['port']}", f"  IdentityFile {h['key']}", "  IdentitiesOnly yes",
                      f"  UserKnownHostsFile {h['known_hosts']}", "  StrictHostKeyChecking yes",
                      "  BatchMode yes", "  LogLevel ERROR", "  ConnectTimeout 10", ""]
        self.ssh_config.write_text("\n".join(lines))
        self.known_hosts.write_text("".join(Path(h["known_hosts"]).read_text()
                                            for h in self.hosts.values()))
        self.pyinfra_inventory_file()

    def pyinfra_inventory(self) -> list[tuple[str, dict]]:
        """(name, host data) for pyinfra's SSH connector: the run's key, strict host keys."""
        out = []
        for name, h in self.hosts.items():
            data = {"ssh_hostname": h["address"], "ssh_port": h["port"], "ssh_user": h["user"],
                    "ssh_key": h["key"], "ssh_known_hosts_file": h["known_hosts"],
                    "ssh_strict_host_key_checking": "yes"}
            if h["sudo"]:
                data["_sudo"] = True
            out.append((name, data))
        return out

    def pyinfra_inventory_file(self) -> Path:
        path = self.run_dir / "inventory.py"
        path.write_text("# pyinfra inventory of the neverdark test fleet (generated)\n"
                        f"hosts = {self.pyinfra_inventory()!r}\n")
        return path

    def testinfra_url(self, name: str) -> str:
        sudo = "&sudo=true" if self.hosts[name]["sudo"] else ""
        return f"ssh://{name}?ssh_config={self.ssh_config}{sudo}"

    def _state(self) -> dict:
        return {"run_id": self.run_id, "subnet": self.subnet, "run_dir": str(self.run_dir),
                "owner": None if self.persistent else os.getpid(),
                "owner_start": None if self.persistent else _proc_start(os.getpid()),
                "machine_prefix": self.machine_prefix,
                "specs": [spec.as_dict() for spec in self.specs],
                "cgroup": str(self.cgroup) if self.cgroup else None,
                "serve_dirs": self.serve_dirs, "files_port": self.files_port,
                "files_pid": self.files_pid, "hosts": self.hosts}

    def _register(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        _atomic_write(REGISTRY / f"{self.run_id}.json", json.dumps(self._state(), indent=2))

    def _save(self) -> None:
        self._register()
        _atomic_write(self.run_dir / "run.json", json.dumps(self._state(), indent=2))
        _atomic_write(self.run_dir / "hosts.json", json.dumps(self.hosts, indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> FleetContext:
        """The fleet a `up` left running in run_dir (for the CLI)."""
        run_dir = Path(run_dir).resolve()
        try:
            state = json.loads((run_dir / "run.json").read_text())
        except OSError:
            raise FleetError(f"no test fleet in {run_dir} (no run.json)") from None
        fleet = cls(run_dir, state["specs"], state["serve_dirs"],
                    persistent=state["owner"] is None)
        fleet.run_id, fleet.subnet = state["run_id"], state["subnet"]
        fleet.cgroup = Path(state["cgroup"]) if state.get("cgroup") else None
        fleet.hosts, fleet.files_port = state["hosts"], state["files_port"]
        fleet.files_pid = state["files_pid"]
        return fleet

    def _clear_previous_run_here(self) -> None:
        if (self.run_dir / "run.json").exists():
            old, info = None, {}
            with contextlib.suppress(FleetError, ValueError, KeyError, TypeError):
                old = FleetContext.load(self.run_dir)
                entry = REGISTRY / f"{old.run_id}.json"
                info = json.loads(entry.read_text()) if entry.exists() else {}
            if old is not None:
                if info.get("owner") and _alive(info["owner"], info.get("owner_start")) \
                        and info["owner"] != os.getpid():
                    raise FleetError(f"{self.run_dir} is in use by pid {info['owner']}")
                self.log(f"testfleet: removing the previous run {old.run_id} in {self.run_dir}")
                old.destroy(keep_logs=False)
        for point in _mounts_under(self.run_dir / "hosts"):
            _umount(point)
        shutil.rmtree(self.run_dir / "hosts", ignore_errors=True)

    # -- using the hosts ----------------------------------------------------------------------
    def is_alive(self, name: str) -> bool:
        h = self.hosts[name]
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return _alive(h["pid"], h.get("pid_start"))

    def exec(self, name: str, command: str, check: bool = True, timeout: float = 60,
             input: str | None = None) -> str:
        """Run a shell command inside the host as root through nsenter (no SSH), charged to
        the host's memory cgroup like everything else that runs in it."""
        h = self.hosts[name]
        argv = ["nsenter", "-t", str(h["pid1"]), "-a", "/bin/sh", "-c", command]
        if h.get("cgroup"):                   # (absent in a run.json of an older harness)
            argv = _in_cgroup(Path(h["cgroup"]), argv)
        return sh(argv, check=check,
                  timeout=timeout, input=input, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                     "LANG": "C.UTF-8", "HOME": "/root"})

    # -- memory readings (the host's cgroup: every process of the container) -----------------
    def memory_limit(self, name: str) -> int:
        """Bytes the host may use (its memory_mb), as the kernel enforces it."""
        return int(_cg_read(Path(self.hosts[name]["cgroup"]), "memory.limit_in_bytes"))

    def memory_usage(self, name: str) -> int:
        """Bytes the host uses now: its processes' memory and its page cache."""
        return int(_cg_read(Path(self.hosts[name]["cgroup"]), "memory.usage_in_bytes"))

    def memory_peak(self, name: str) -> int:
        """The most bytes the host has used since boot or reset_memory_peak()."""
        return int(_cg_read(Path(self.hosts[name]["cgroup"]), "memory.max_usage_in_bytes"))

    def reset_memory_peak(self, name: str) -> None:
        _cg_write(Path(self.hosts[name]["cgroup"]), "memory.max_usage_in_bytes", 0)

    def oom_events(self, name: str) -> dict[str, int]:
        """failcnt (memsw_failcnt: memory + swap): times usage hit the limit (reclaim usually
        follows, no kill); under_oom: 1 while the host is out of memory; oom_kill: processes the
        kernel killed for it."""
        cg = Path(self.hosts[name]["cgroup"])
        events = {"failcnt": int(_cg_read(cg, "memory.failcnt"))}
        if (cg / "memory.memsw.failcnt").exists():
            events["memsw_failcnt"] = int(_cg_read(cg, "memory.memsw.failcnt"))
        for line in _cg_read(cg, "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key in ("under_oom", "oom_kill"):
                events[key] = int(value)
        events.setdefault("oom_kill", 0)    # kernels before 4.13 do not count kills
        return events

    def ssh_argv(self, name: str, command: str | None = None, connect_timeout: int = 10,
                 tty: bool = False) -> list[str]:
        argv = ["ssh", "-F", str(self.ssh_config), "-o", f"ConnectTimeout={connect_timeout}"]
        if tty:
            argv.append("-t")
        argv += ["--", name]   # the host name is never read as an option
        if command is not None:
            argv.append(command)
        return argv

    def ssh(self, name: str, command: str, check: bool = True, timeout: float = 600,
            input: str | None = None, as_root: bool = True) -> str:
        """Run a command over SSH. as_root (default): as root, through `sudo -n` on a pi host;
        as_root=False: as the login user (root on vps, pi on pi). Returns stdout."""
        remote = command
        if as_root and self.hosts[name]["sudo"]:
            remote = f"sudo -n sh -c {shlex.quote(command)}"
        try:
            proc = subprocess.run(self.ssh_argv(name, remote), capture_output=True, text=True,
                                  timeout=timeout, input=input)
        except subprocess.TimeoutExpired as e:
            raise FleetError(f"ssh {name} {command!r}: no answer within {timeout}s") from e
        if check and proc.returncode != 0:
            raise FleetError(f"ssh {name} {command!r} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}\n{proc.stdout[-2000:]}")
        return proc.stdout

    def runner_address(self, name: str) -> str:
        return self.hosts[name]["runner_address"]

    def files_url(self, name: str) -> str:
        if self.files_port is None:
            raise FleetError("no file server: pass serve_dirs")
        return f"http://{self.hosts[name]['runner_address']}:{self.files_port}"

    def served_dir(self, key: str) -> Path:
        """This run's writable layer of /KEY/: files put here are served over the source dir
        (which stays untouched, so a shared cache is never polluted by a test)."""
        return self.run_dir / "files" / key

    # -- the file server -------------------------------------------------------------------------
    def start_file_server(self, timeout: float = 20) -> None:
        binds = [h["runner_address"] for h in self.hosts.values()]
        args = []
        for key, src in self.serve_dirs.items():
            self.served_dir(key).mkdir(parents=True, exist_ok=True)
            args += ["--dir", f"{key}={self.served_dir(key)}:{src}"]
        portfile = self.run_dir / "files.port"
        portfile.unlink(missing_ok=True)
        with open(self.run_dir / "logs" / "files.log", "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "testbed.fleet", "serve", "--port-file",
                 str(portfile), *[f"--bind={b}" for b in binds], *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        self.files_pid = proc.pid
        self._files_proc = proc
        deadline = time.monotonic() + timeout
        while not portfile.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FleetError(f"file server did not start; see {self.run_dir}/logs/files.log")
            time.sleep(0.05)
        self.files_port = int(portfile.read_text())
        for name, h in self.hosts.items():
            h["files_url"] = self.files_url(name)
        self._save()

    def stop_file_server(self) -> None:
        pid = self.files_pid
        if pid and _alive(pid) and "serve" in _cmdline(pid):
            _kill(pid, signal.SIGTERM)
            if not _wait_gone([pid], 5):
                _kill(pid)
        proc = getattr(self, "_files_proc", None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.files_pid = None

    # -- teardown ---------------------------------------------------------------------------
    def down(self, timeout: float = 30) -> None:
        """Clean `systemctl poweroff` in every host, a bounded wait (EMULATED_SLOWDOWN times
        longer for an emulated host), then SIGKILL; unmount; remove the memory cgroups.

        Never SIGTERM to systemd-nspawn: under qemu-user the container's systemd gets it as
        another signal (real-time signal numbers are remapped) and goes to rescue mode."""
        self.stop_file_server()
        for name, h in self.hosts.items():
            if self.is_alive(name) and h.get("pid1"):
                with contextlib.suppress(FleetError):
                    self.exec(name, "systemctl poweroff --no-block", check=False,
                              timeout=10 * (EMULATED_SLOWDOWN if h.get("emulated") else 1))
        started = time.monotonic()
        for name, h in self.hosts.items():
            wait = timeout * (EMULATED_SLOWDOWN if h.get("emulated") else 1)
            while self.is_alive(name) and time.monotonic() < started + wait:
                time.sleep(0.2)
            if self.is_alive(name):
                self.log(f"testfleet: {name} did not power off within {wait}s; killing it")
                _kill(h.get("pid1"))          # SIGKILL to PID 1 ends the whole PID namespace
                _kill(h["pid"])
            proc = self.procs.get(name)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        leftover = _nspawn_pids(self.machine_prefix) if self.run_id else []
        for pid in leftover:
            _kill(pid)
        _wait_gone(leftover, 10)
        for h in self.hosts.values():
            if h["link"] in _links():     # the veth goes with the container's netns
                subprocess.run(["ip", "link", "del", h["link"]], capture_output=True)
        for point in _mounts_under(self.run_dir / "hosts"):
            _umount(point)
        if self.cgroup is not None and not _cg_remove(self.cgroup):
            self.log(f"testfleet: memory cgroup {self.cgroup} could not be removed: "
                     f"{_cg_procs(self.cgroup) or 'busy'}")
        if self.run_id and (self.run_dir / "run.json").exists():
            self._save()

    def destroy(self, keep_logs: bool = True) -> None:
        """down(), then remove the run's links, mounts, host roots, keys and registry entry."""
        if not (self.run_dir / "run.json").exists() and not self.hosts:
            return
        self.down()
        for point in _mounts_under(self.run_dir / "hosts"):
            _umount(point)
        shutil.rmtree(self.run_dir / "hosts", ignore_errors=True)
        shutil.rmtree(self.run_dir / "files", ignore_errors=True)
        for f in ("ssh_config", "known_hosts", "hosts.json", "run.json", "inventory.py",
                  "files.port", "id_ed25519", "id_ed25519.pub"):
            (self.run_dir / f).unlink(missing_ok=True)
        if not keep_logs:
            shutil.rmtree(self.run_dir / "logs", ignore_errors=True)
        if self.run_id:
            (REGISTRY / f"{self.run_id}.json").unlink(missing_ok=True)
        self.hosts = {}

    def leftovers(self) -> dict[str, list]:
        """What of this run still exists on the runner (empty lists after destroy())."""
        return {"links": [ln for ln in _links() if ln.startswith(f"ve-{self.machine_prefix}")],
                "mounts": _mounts_under(self.run_dir),
                "processes": _nspawn_pids(self.machine_prefix)
                + [p for p in [self.files_pid] if p and _alive(p)]
                + (_cg_procs(self.cgroup) if self.cgroup else []),
                "roots": [str(p) for p in (self.run_dir / "hosts").glob("*")],
                "cgroups": [str(self.cgroup)] if self.cgroup and self.cgroup.exists() else []}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def fleet_context(hosts=DEFAULT_HOSTS, run_dir: Path | None = None,
                  serve_dirs: dict[str, Path] | None = None, keep: bool = False):
    """The fleet up for the duration of the block, destroyed after (unless keep=True)."""
    if run_dir is None:
        raise FleetError("fleet_context needs a run_dir")
    fleet = FleetContext(run_dir, hosts, serve_dirs)
    fleet.up()
    try:
        yield fleet
    finally:
        if not keep:
            fleet.destroy()


def clear_stale(log=print) -> list[str]:
    """Remove what dead runs left on a reused machine. Never touches a live run's state.

    A run is dead when its owner process is gone (library runs) or, for CLI runs, when none
    of its containers is running. Also removes links, nspawn processes and image overlays of
    our naming that no registered run claims.
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
        for link in _links():
            m = re.match(rf"ve-{PREFIX}([0-9a-f]{{4}})-", link)
            if m and m.group(1) not in live_ids:
                subprocess.run(["ip", "link", "del", link], capture_output=True)
        for point in _image_overlay_mounts():
            if not any(point.startswith(d.rstrip("/") + "/") for d in live_dirs):
                log(f"testfleet: unmounting stale overlay {point}")
                _umount(point)
        for cg in _stale_cgroups(live_ids):
            log(f"testfleet: removing stale memory cgroup {cg}")
            _cg_remove(cg)
    return cleared


def _kill_container(nspawn_pid: int) -> None:
    for kid in _children(nspawn_pid):
        _kill(kid)
    _kill(nspawn_pid)
    _wait_gone([nspawn_pid], 10)


def _teardown_remnants(prefix: str, info: dict) -> None:
    if info.get("files_pid") and "serve" in _cmdline(info["files_pid"]) \
            and "testbed.fleet" in " ".join(_cmdline(info["files_pid"])):
        _kill(info["files_pid"])
    for pid in _nspawn_pids(prefix):
        _kill_container(pid)
    for link in _links():
        if link.startswith(f"ve-{prefix}"):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
    run_dir = Path(info.get("run_dir") or "/nonexistent")
    for point in _mounts_under(run_dir / "hosts"):
        _umount(point)
    if run_dir.is_dir() and not _mounts_under(run_dir / "hosts"):
        shutil.rmtree(run_dir / "hosts", ignore_errors=True)
    if info.get("cgroup"):
        _cg_remove(Path(info["cgroup"]))


# -- CLI -----------------------------------------------------------------------------------------

run_dir_option = click.option(
    "--run-dir", type=click.Path(path_type=Path), default=DEFAULT_RUN_DIR, show_default=True,
    help="where the run keeps its keys, ssh_config, hosts.json and host roots "
         "($NEVERDARK_TESTFLEET_DIR)")


@click.group()
def cli() -> None:
    """The nspawn test fleet: Debian 12 hosts with systemd and sshd on this machine (root)."""


@cli.command()
@run_dir_option
@click.argument("hosts", nargs=-1)
@click.option("--serve", "serves", multiple=True, metavar="KEY=DIR",
              help="serve DIR to the hosts under /KEY/ (e.g. wheels=/var/cache/neverdark/wheels)")
def up(run_dir: Path, hosts: tuple[str, ...], serves: tuple[str, ...]) -> None:
    """Boot HOSTS (NAME[:PROFILE[:ARCH]][:MEMORY_MB]: profile vps or pi, arch x86_64 or aarch64
    (default: the runner's), memory in MB (default 4096); default vps1:vps pi1:pi) and leave
    them running. Prints hosts.json."""
    try:
        specs = [HostSpec.parse(h) for h in hosts] or DEFAULT_HOSTS
    except FleetError as e:
        raise click.BadParameter(str(e), param_hint="HOSTS") from None
    serve_dirs = dict(s.split("=", 1) for s in serves)
    fleet = FleetContext(run_dir, specs, serve_dirs, persistent=True)
    fleet.up()
    click.echo(json.dumps(fleet.hosts, indent=2))
    click.echo(f"up in {fleet.timings['up_s']:.1f} s; ssh -F {fleet.ssh_config} "
               f"{fleet.specs[0].name}", err=True)


@cli.command()
@run_dir_option
def down(run_dir: Path) -> None:
    """Power the hosts off (bounded, then killed); keeps their roots and keys."""
    FleetContext.load(run_dir).down()


@cli.command()
@run_dir_option
def destroy(run_dir: Path) -> None:
    """Power off and remove the run's links, mounts, host roots and keys (logs stay)."""
    try:
        fleet = FleetContext.load(run_dir)
    except FleetError:
        clear_stale()
        return
    fleet.destroy()


@cli.command()
@run_dir_option
def status(run_dir: Path) -> None:
    """Per host: address, user, running or not, systemd state."""
    fleet = FleetContext.load(run_dir)
    for name, h in fleet.hosts.items():
        state = "stopped"
        if fleet.is_alive(name):
            state = fleet.exec(name, "systemctl is-system-running || true", check=False,
                               timeout=10).strip()
        memory = ""
        if fleet.is_alive(name):
            memory = (f"{fleet.memory_usage(name) / 2**20:.0f}/{h['memory_mb']} MB "
                      f"(peak {fleet.memory_peak(name) / 2**20:.0f})")
        click.echo(f"{name:10} {h['profile']:4} {h.get('arch', NATIVE_ARCH):7} "
                   f"{h['user']}@{h['address']:15} runner {h['runner_address']:15} {state}  "
                   f"{memory}  {h.get('files_url', '')}")


@cli.command(context_settings={"ignore_unknown_options": True})
@run_dir_option
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(run_dir: Path, name: str, command: tuple[str, ...]) -> None:
    """SSH to host NAME as its login user: ssh NAME -- CMD (no CMD: a login shell)."""
    fleet = FleetContext.load(run_dir)
    if name not in fleet.hosts:
        raise click.UsageError(f"no host {name}; hosts: {', '.join(fleet.hosts)}")
    argv = fleet.ssh_argv(name, " ".join(command) if command else None,  # as ssh joins them
                          tty=not command and sys.stdin.isatty())
    os.execvp(argv[0], argv)


@cli.command("serve", hidden=True)
@click.option("--bind", "binds", multiple=True, required=True)
@click.option("--port", type=int, default=0)
@click.option("--port-file", type=click.Path(path_type=Path))
@click.option("--dir", "dirs", multiple=True, help="KEY=DIR[:DIR...] served under /KEY/")
def _serve_cmd(binds: tuple[str, ...], port: int, port_file: Path | None,
               dirs: tuple[str, ...]) -> None:
    """Serve files to the hosts until terminated (started by the harness)."""
    layers = {k: v.split(":") for k, v in (d.split("=", 1) for d in dirs)}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers, port = serve(layers, list(binds), port)
    if port_file:
        _atomic_write(port_file, str(port))
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()


if __name__ == "__main__":
    cli()
