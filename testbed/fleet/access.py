"""How tests reach a booted host: nsenter as root, SSH with the run's keys and strict host keys,
and the files pyinfra, testinfra and a person use (ssh_config, known_hosts, inventory.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

from testbed.fleet.base import sh
from testbed.fleet.cgroups import _in_cgroup


class HostAccess:
    """Mixed into FleetContext: needs `hosts` (name -> host record), `ssh_config`,
    `known_hosts`, `run_dir` and `run_id`."""

    hosts: dict[str, dict]
    ssh_config: Path
    known_hosts: Path
    run_dir: Path
    run_id: str

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
        return sh(self.ssh_argv(name, remote), check=check, timeout=timeout, input=input,
                  what=f"ssh {name} {command!r}")

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
