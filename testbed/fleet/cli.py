"""`python -m testbed.fleet up|status|ssh|down|destroy` (and `serve`, the harness's file server);
also `neverdark testfleet ...`."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from testbed.fleet.base import DEFAULT_HOSTS, DEFAULT_RUN_DIR, NATIVE_ARCH, FleetError, _atomic_write
from testbed.fleet.context import FleetContext
from testbed.fleet.fileserver import serve
from testbed.fleet.spec import HostSpec
from testbed.fleet.stale import clear_stale

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
