"""FleetContext: a run of test hosts, from boot to destroy; fleet_context() for a `with` block."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from testbed.fleet import cgroups, fileserver, limits, net
from testbed.fleet.access import HostAccess
from testbed.fleet.base import (BOOT_TIMEOUT, DEFAULT_HOSTS, EMULATED_SLOWDOWN, MAX_HOSTS,
                                PREFIX, PROFILES, REGISTRY, FleetError, _atomic_write, _locked,
                                sh)
from testbed.fleet.cgroups import HostMemory, _cg_make, _cg_procs, _cg_remove, _in_cgroup
from testbed.fleet.image import ensure_image
from testbed.fleet.procs import (_alive, _kill, _nspawn_pids, _pid1, _proc_start, _wait_gone)
from testbed.fleet.roots import _mounts_under, _prepare_root, _umount_all, make_root
from testbed.fleet.spec import HostSpec
from testbed.fleet.stale import clear_stale


class FleetContext(HostAccess, HostMemory):
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
        self.subnet: str | None = None   # the run's /24; every host routes it via the runner
        self.cgroup: Path | None = None      # the run's memory cgroup; one child per host
        self.hosts: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._booted: dict[str, float] = {}
        self.ssh_config = self.run_dir / "ssh_config"
        self.known_hosts = self.run_dir / "known_hosts"
        self.client_key = self.run_dir / "id_ed25519"
        self.files_port: int | None = None
        self.files_pid: int | None = None
        self._files_proc: subprocess.Popen | None = None
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
        if len({s.name for s in self.specs}) != len(self.specs) \
                or not 0 < len(self.specs) <= MAX_HOSTS:
            raise FleetError(f"1 to {MAX_HOSTS} hosts, unique names")
        cgroups._memory_cgroup_of_runner()   # fails early, with the reason, where limits can't work
        clear_stale(log=self.log)
        self._clear_previous_run_here()
        limits.ensure_inotify_for(len(self.specs))
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
            self.subnet = str(net.pick_subnet(self.run_id))
            self.cgroup = cgroups.run_cgroup(self.run_id)
            self._register()                   # registered first: a crash from here is stale
            _cg_make(self.cgroup)
            net.open_run(self.run_id)
        self.client_key.unlink(missing_ok=True)
        Path(f"{self.client_key}.pub").unlink(missing_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"neverdark-testfleet-{self.run_id}",
            "-f", str(self.client_key)])
        self.client_key.chmod(0o600)
        client_pub = Path(f"{self.client_key}.pub").read_text()
        for index, spec in enumerate(self.specs):
            self._boot(spec, index, images[spec.arch], client_pub)
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

    def _boot(self, spec: HostSpec, index: int, image: Path, client_pub: str) -> None:
        name, profile = spec.name, spec.profile
        runner_addr, host_addr = net.host_addresses(self.subnet, index)
        machine = self._machine(name, index)
        hdir = self.run_dir / "hosts" / name
        root, mode = make_root(hdir, image, self.log)
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
        while link not in net._links():
            if time.monotonic() > deadline or proc.poll() is not None:
                self._fail(name, f"veth {link} did not appear")
            time.sleep(0.1)
        net.wire(link, pid1, runner_addr, host_addr, self.subnet, self.run_id)

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

    # -- the run's state ----------------------------------------------------------------------
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
        _umount_all(self.run_dir / "hosts")
        shutil.rmtree(self.run_dir / "hosts", ignore_errors=True)

    # -- using the hosts ----------------------------------------------------------------------
    def is_alive(self, name: str) -> bool:
        h = self.hosts[name]
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return _alive(h["pid"], h.get("pid_start"))

    def address(self, name: str) -> str:
        """The host's own address: what the other hosts of the run reach it at, and the source
        address they see from it."""
        return self.hosts[name]["address"]

    def runner_address(self, name: str) -> str:
        return self.hosts[name]["runner_address"]

    # -- the file server -------------------------------------------------------------------------
    def files_url(self, name: str) -> str:
        if self.files_port is None:
            raise FleetError("no file server: pass serve_dirs")
        return f"http://{self.hosts[name]['runner_address']}:{self.files_port}"

    def served_dir(self, key: str) -> Path:
        """This run's writable layer of /KEY/: files put here are served over the source dir
        (which stays untouched, so a shared cache is never polluted by a test)."""
        return self.run_dir / "files" / key

    def start_file_server(self, timeout: float = 20) -> None:
        layers = {}
        for key, src in self.serve_dirs.items():
            self.served_dir(key).mkdir(parents=True, exist_ok=True)
            layers[key] = [str(self.served_dir(key)), src]
        self._files_proc, self.files_port = fileserver.start_process(
            [h["runner_address"] for h in self.hosts.values()], layers,
            self.run_dir / "files.port", self.run_dir / "logs" / "files.log", timeout)
        self.files_pid = self._files_proc.pid
        for name, h in self.hosts.items():
            h["files_url"] = self.files_url(name)
        self._save()

    def stop_file_server(self) -> None:
        fileserver.stop_process(self.files_pid, self._files_proc)
        self.files_pid = None

    # -- teardown ---------------------------------------------------------------------------
    def down(self, timeout: float = 30) -> None:
        """Clean `systemctl poweroff` in every host, a bounded wait (EMULATED_SLOWDOWN times
        longer for an emulated host), then SIGKILL; unmount; remove the memory cgroups and the
        run's routing.

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
            net.unlink(h["link"])         # the veth goes with the container's netns
        if self.run_id:
            net.close_run(self.run_id)
        _umount_all(self.run_dir / "hosts")
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
        _umount_all(self.run_dir / "hosts")
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
        return {"links": [ln for ln in net._links() if ln.startswith(f"ve-{self.machine_prefix}")],
                "mounts": _mounts_under(self.run_dir),
                "processes": _nspawn_pids(self.machine_prefix)
                + [p for p in [self.files_pid] if p and _alive(p)]
                + (_cg_procs(self.cgroup) if self.cgroup else []),
                "roots": [str(p) for p in (self.run_dir / "hosts").glob("*")],
                "cgroups": [str(self.cgroup)] if self.cgroup and self.cgroup.exists() else [],
                "routing": net.leftovers(self.run_id) if self.run_id else []}


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
