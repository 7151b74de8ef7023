"""The test fleet: Debian 12 hosts with real systemd and sshd, booted with systemd-nspawn.

Each host is a copy of a cached debootstrap image, booted with its own network namespace and a
/30 link to the runner (`ve-<machine>` here, `host0` inside), reached over SSH with a key made
for the run. `vps` hosts take SSH as root; `pi` hosts as a `pi` user with sudo, as on a real Pi.
The hosts have no route to a package index: the runner serves them files over HTTP on each
link's runner-side address.

    python -m neverdark.testfleet up RUN_DIR vps1:vps pi1:pi    # prints hosts.json
    python -m neverdark.testfleet destroy RUN_DIR
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import click

CACHE = Path(os.environ.get("NEVERDARK_CACHE", "/var/cache/neverdark"))
SUITE = "bookworm"
INCLUDE = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
           "iproute2", "sudo", "procps"]
IMAGE_VERSION = "1"
REGISTRY = Path("/run/neverdark-testfleet")
RUNNER_PACKAGES = ["debootstrap", "systemd-container", "iproute2", "openssh-client"]
PREFIX = "nd"


class FleetError(RuntimeError):
    pass


def sh(cmd: list[str] | str, check: bool = True, timeout: float = 120, **kw) -> str:
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise FleetError(f"{cmd!r} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


# -- the base image ----------------------------------------------------------------------------

def image_dir() -> Path:
    key = hashlib.sha256(f"{SUITE}|{','.join(INCLUDE)}|{IMAGE_VERSION}".encode()).hexdigest()[:12]
    return CACHE / "images" / f"{SUITE}-{key}"


def ensure_runner_packages() -> None:
    missing = [p for p in RUNNER_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        sh("apt-get update -qq", timeout=600)
        sh(["apt-get", "install", "-y", "-qq", *missing], timeout=900,
           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_image() -> tuple[Path, float | None]:
    """The cached image, built when missing. Returns (path, build seconds or None if cached)."""
    final = image_dir()
    if (final / "etc" / "neverdark-image").exists():
        return final, None
    ensure_runner_packages()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    sh(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, str(tmp)],
       timeout=1800)
    # Host keys and machine-id are made per host; an image must not carry them.
    for key in (tmp / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (tmp / "etc" / "machine-id").write_text("")
    (tmp / "etc" / "neverdark-image").write_text(f"{SUITE} {' '.join(INCLUDE)}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)   # atomic: a crash never leaves a complete-looking half image
    return final, time.monotonic() - started


# -- file server on the runner ------------------------------------------------------------------

class _MappedHandler(http.server.SimpleHTTPRequestHandler):
    mapping: dict[str, str] = {}

    def translate_path(self, path: str) -> str:
        parts = path.split("?", 1)[0].split("#", 1)[0].lstrip("/").split("/", 1)
        root = self.mapping.get(parts[0])
        if root is None:
            return "/nonexistent"
        rest = parts[1] if len(parts) > 1 else ""
        full = os.path.realpath(os.path.join(root, rest))
        return full if full.startswith(os.path.realpath(root)) else "/nonexistent"

    def log_message(self, *args) -> None:
        pass


def serve_forever(binds: list[str], port: int, mapping: dict[str, str]) -> None:
    handler = type("Handler", (_MappedHandler,), {"mapping": mapping})
    servers = [http.server.ThreadingHTTPServer((addr, port), handler) for addr in binds]
    import threading
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    servers[0].serve_forever()


# -- hosts ---------------------------------------------------------------------------------------

def _pid1(nspawn_pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{nspawn_pid}/task").iterdir():
                children = (task / "children").read_text().split()
                if children:
                    return int(children[0])
        time.sleep(0.1)
    raise FleetError(f"systemd-nspawn {nspawn_pid} started no PID 1 within {timeout}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _prepare_root(root: Path, name: str, profile: str, client_pub: str) -> str:
    (root / "etc" / "hostname").write_text(f"{name}\n")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
    (root / "etc" / "machine-id").write_text(os.urandom(16).hex() + "\n")
    key = root / "etc" / "ssh" / "ssh_host_ed25519_key"
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)])
    (root / "etc" / "ssh" / "sshd_config.d").mkdir(exist_ok=True)
    (root / "etc" / "ssh" / "sshd_config.d" / "neverdark-test.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\nUseDNS no\n")
    if profile == "pi":
        sh(["chroot", str(root), "useradd", "-m", "-s", "/bin/bash", "pi"])
        sudoers = root / "etc" / "sudoers.d" / "010_pi-nopasswd"
        sudoers.write_text("pi ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        home, uid = root / "home" / "pi", "pi"
    else:
        home, uid = root / "root", "root"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(client_pub)
    (ssh_dir / "authorized_keys").chmod(0o600)
    sh(["chroot", str(root), "chown", "-R", f"{uid}:{uid}", str(Path("/") / ssh_dir.relative_to(root))])
    return (Path(f"{key}.pub")).read_text().split()[0:2]


class FleetContext:
    """A running test fleet. Use `fleet_context(...)` to get one that cleans up after itself."""

    def __init__(self, run_dir: Path, hosts: list[tuple[str, str]],
                 serve_dirs: dict[str, Path] | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.specs = hosts
        self.serve_dirs = {k: str(Path(v).resolve()) for k, v in (serve_dirs or {}).items()}
        self.run_id = os.urandom(2).hex()
        self.hosts: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.server: subprocess.Popen | None = None
        self.ssh_config = self.run_dir / "ssh_config"
        self.timings: dict[str, float] = {}

    # lifecycle
    def up(self) -> FleetContext:
        for name, profile in self.specs:
            if len(name) > 8 or profile not in ("vps", "pi"):
                raise FleetError(f"host {name}:{profile}: names up to 8 chars, profile vps|pi")
        clear_stale()
        image, built = ensure_image()
        self.timings["image_build_s"] = built or 0.0
        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.run_id}.json").write_text(json.dumps(
            {"owner": os.getpid(), "run_dir": str(self.run_dir)}))
        client_key = self.run_dir / "id_ed25519"
        if not client_key.exists():
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "neverdark-testfleet",
                "-f", str(client_key)])
        client_pub = (self.run_dir / "id_ed25519.pub").read_text()
        subnet = self._pick_subnet()
        for i, (name, profile) in enumerate(self.specs):
            self._boot(name, profile, image, client_key, client_pub, subnet, i)
        for name in self.hosts:
            self._wait_ready(name)
        self._write_outputs()
        if self.serve_dirs:
            self._start_file_server()
        self.timings["up_s"] = time.monotonic() - started
        return self

    def _pick_subnet(self) -> int:
        used = sh("ip -o -4 addr show", check=False)
        for _ in range(100):
            third = random.randrange(0, 60) * 4
            if not any(f"10.213.{third + i}." in used for i in range(len(self.specs))):
                return third
        raise FleetError("no free 10.213.x.0/30 block for the test fleet")

    def _boot(self, name, profile, image, client_key, client_pub, subnet, index) -> None:
        machine = f"{PREFIX}{self.run_id}-{name}"
        hdir = self.run_dir / "hosts" / name
        root = hdir / "root"
        shutil.rmtree(hdir, ignore_errors=True)
        hdir.mkdir(parents=True)
        sh(["cp", "-a", "--reflink=auto", str(image), str(root)], timeout=300)
        host_key = _prepare_root(root, name, profile, client_pub)
        known = hdir / "known_hosts"
        net = f"10.213.{subnet + index}"  # a /30 per host: .1 the runner's end, .2 the host
        runner_addr, host_addr = f"{net}.1", f"{net}.2"
        known.write_text(f"{host_addr} {host_key[0]} {host_key[1]}\n")
        log = open(hdir / "console.log", "wb")
        proc = subprocess.Popen(
            ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(root),
             f"--machine={machine}", "--network-veth", "-b"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.procs[name] = proc
        pid1 = _pid1(proc.pid)
        link = f"ve-{machine}"[:15]
        deadline = time.monotonic() + 20
        while f" {link}@" not in sh("ip -o link show", check=False):
            if time.monotonic() > deadline:
                raise FleetError(f"{name}: veth {link} did not appear")
            time.sleep(0.1)
        sh(["ip", "addr", "add", f"{runner_addr}/30", "dev", link])
        sh(["ip", "link", "set", link, "up"])
        self.hosts[name] = {
            "machine": machine, "profile": profile, "pid": proc.pid, "pid1": pid1,
            "address": host_addr, "runner_address": runner_addr, "link": link,
            "user": "pi" if profile == "pi" else "root", "port": 22,
            "key": str(client_key), "known_hosts": str(known), "root": str(root),
        }

    def exec(self, name: str, command: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command in the host's namespaces as root, without SSH."""
        pid1 = self.hosts[name]["pid1"]
        return sh(["nsenter", "-t", str(pid1), "-a", "sh", "-c", command], check=check,
                  timeout=timeout)

    def _wait_ready(self, name: str, timeout: float = 120) -> None:
        h = self.hosts[name]
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                break
            state = self.exec(name, "systemctl is-system-running 2>/dev/null || true",
                              check=False).strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            self._fail(name, f"systemd did not finish booting ({state!r})")
        if state != "running" and state != "degraded":
            self._fail(name, f"container exited while booting ({state!r})")
        self.exec(name, "ip addr add {0}/30 dev host0 2>/dev/null || true; ip link set host0 up"
                  .format(h["address"]))
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection((h["address"], 22), timeout=2):
                    break
            time.sleep(0.3)
        else:
            self._fail(name, "sshd did not answer")

    def _fail(self, name: str, why: str) -> None:
        journal = self.exec(name, "journalctl -b --no-pager -n 60 2>&1 || true", check=False) \
            if self.procs[name].poll() is None else ""
        failed = self.exec(name, "systemctl --failed --no-legend 2>&1 || true", check=False) \
            if self.procs[name].poll() is None else ""
        console = Path(self.hosts[name]["root"]).parent.joinpath("console.log").read_text(
            errors="replace")[-3000:]
        raise FleetError(f"{name}: {why}\nfailed units:\n{failed}\njournal:\n{journal}\n"
                         f"console:\n{console}")

    def _write_outputs(self) -> None:
        lines = []
        for name, h in self.hosts.items():
            lines += [f"Host {name}", f"  HostName {h['address']}", f"  User {h['user']}",
                      f"  IdentityFile {h['key']}", f"  UserKnownHostsFile {h['known_hosts']}",
                      "  StrictHostKeyChecking yes", "  BatchMode yes", "  LogLevel ERROR",
                      "  IdentitiesOnly yes", ""]
        self.ssh_config.write_text("\n".join(lines))
        (self.run_dir / "hosts.json").write_text(json.dumps(self.hosts, indent=2))

    def _start_file_server(self) -> None:
        binds = [h["runner_address"] for h in self.hosts.values()]
        with socket.socket() as s:
            s.bind((binds[0], 0))
            self.files_port = s.getsockname()[1]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "neverdark.testfleet", "serve", "--port", str(self.files_port),
             *[f"--bind={b}" for b in binds],
             *[f"--dir={k}={v}" for k, v in self.serve_dirs.items()]],
            stdout=subprocess.DEVNULL, stderr=open(self.run_dir / "files.log", "wb"),
            start_new_session=True, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection((binds[0], self.files_port), timeout=1):
                    for name, h in self.hosts.items():
                        h["files_url"] = self.files_url(name)
                    self._write_outputs()
                    return
            time.sleep(0.1)
        raise FleetError("file server did not start; see files.log")

    def files_url(self, name: str) -> str:
        return f"http://{self.hosts[name]['runner_address']}:{self.files_port}"

    def runner_address(self, name: str) -> str:
        return self.hosts[name]["runner_address"]

    def served_dir(self, key: str) -> str:
        return self.serve_dirs[key]

    def ssh(self, name: str, command: str, check: bool = True, timeout: float = 600,
            input: str | None = None) -> str:
        """Run a command over SSH as the host's login user (root, or pi with sudo)."""
        h = self.hosts[name]
        remote = command if h["user"] == "root" else f"sudo -n sh -c {shlex.quote(command)}"
        proc = subprocess.run(["ssh", "-F", str(self.ssh_config), name, remote],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise FleetError(f"ssh {name} {command!r} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}\n{proc.stdout[-2000:]}")
        return proc.stdout

    def down(self, timeout: float = 30) -> None:
        for name in list(self.hosts):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                with contextlib.suppress(FleetError, subprocess.TimeoutExpired):
                    self.exec(name, "systemctl poweroff", check=False, timeout=10)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.server and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def destroy(self) -> None:
        self.down()
        for h in self.hosts.values():
            subprocess.run(["ip", "link", "del", h["link"]], capture_output=True)
        shutil.rmtree(self.run_dir / "hosts", ignore_errors=True)
        (REGISTRY / f"{self.run_id}.json").unlink(missing_ok=True)


@contextlib.contextmanager
def fleet_context(hosts: list[tuple[str, str]], run_dir: Path,
                  serve_dirs: dict[str, Path] | None = None):
    fleet = FleetContext(run_dir, hosts, serve_dirs)
    try:
        fleet.up()
        yield fleet
    finally:
        fleet.destroy()


def clear_stale() -> None:
    """Remove what earlier runs left behind on a reused machine (their owner is gone)."""
    if not REGISTRY.exists():
        return
    for entry in REGISTRY.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            info = json.loads(entry.read_text())
            if _alive(info["owner"]):
                continue
            run_id = entry.stem
            out = sh(["pgrep", "-f", f"--machine={PREFIX}{run_id}-"], check=False)
            for pid in out.split():
                with contextlib.suppress(OSError):
                    os.killpg(int(pid), signal.SIGKILL)
            for line in sh("ip -o link show", check=False).splitlines():
                link = line.split(":")[1].strip().split("@")[0]
                if link.startswith(f"ve-{PREFIX}{run_id}"):
                    subprocess.run(["ip", "link", "del", link], capture_output=True)
            shutil.rmtree(Path(info["run_dir"]) / "hosts", ignore_errors=True)
            entry.unlink()


# -- CLI -----------------------------------------------------------------------------------------

@click.group()
def cli() -> None:
    """The nspawn test fleet."""


@cli.command()
@click.option("--port", type=int, required=True)
@click.option("--bind", "binds", multiple=True, required=True)
@click.option("--dir", "dirs", multiple=True, help="KEY=PATH served under /KEY/")
def serve(port: int, binds: tuple[str, ...], dirs: tuple[str, ...]) -> None:
    """Serve files to the hosts (runs until killed)."""
    serve_forever(list(binds), port, dict(d.split("=", 1) for d in dirs))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("hosts", nargs=-1)
def up(run_dir: Path, hosts: tuple[str, ...]) -> None:
    """Boot HOSTS (NAME:PROFILE ...) and leave them running; prints hosts.json."""
    specs = [tuple(h.split(":", 1)) for h in hosts] or [("vps1", "vps"), ("pi1", "pi")]
    fleet = FleetContext(run_dir, specs)
    fleet.up()
    (Path(run_dir) / "run.json").write_text(json.dumps({"run_id": fleet.run_id}))
    (REGISTRY / f"{fleet.run_id}.json").write_text(json.dumps(
        {"owner": os.getppid(), "run_dir": str(fleet.run_dir)}))
    click.echo(json.dumps(fleet.hosts, indent=2))
    click.echo(f"ssh -F {fleet.ssh_config} {specs[0][0]}   # to log in", err=True)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def destroy(run_dir: Path) -> None:
    """Stop the hosts of RUN_DIR and remove their state."""
    hosts = json.loads((Path(run_dir) / "hosts.json").read_text())
    for h in hosts.values():
        with contextlib.suppress(ProcessLookupError):
            subprocess.run(["nsenter", "-t", str(h["pid1"]), "-a", "systemctl", "poweroff"],
                           capture_output=True, timeout=10)
    time.sleep(3)
    for h in hosts.values():
        with contextlib.suppress(OSError):
            os.killpg(h["pid"], signal.SIGKILL)
        subprocess.run(["ip", "link", "del", h["link"]], capture_output=True)
    shutil.rmtree(Path(run_dir) / "hosts", ignore_errors=True)


if __name__ == "__main__":
    cli()
