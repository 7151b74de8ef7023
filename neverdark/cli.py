"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import click

from neverdark import remote
from neverdark.inventory import InventoryError, default_inventory_path, validate, validate_cmd


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
                raise click.UsageError("the test fleet lives in the repository's testbed/ "
                                       "package: run this from a checkout of neverdark") from None
            sys.path.insert(0, repo)
            from testbed.fleet import cli as testfleet_cli
        return testfleet_cli


@click.group(cls=_Group)
def main() -> None:
    """neverdark: degraded, but never dark."""


main.add_command(validate_cmd)


def _fleet(path):
    try:
        return validate(path or default_inventory_path(), env=os.environ)
    except InventoryError as err:
        click.echo(str(err), err=True)
        sys.exit(2)


def _host_of(fleet, wizard: str) -> str:
    if wizard not in fleet.wizards:
        raise click.BadParameter(f"unknown wizard {wizard!r} (known: {', '.join(fleet.wizards)})")
    return fleet.wizards[wizard].host


def _last_json(proc) -> dict:
    """The host-side tools end their output with one JSON line; ValueError when missing."""
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ValueError("no output")
    return json.loads(lines[-1])


def _control(op: str, wizard: str, to: str | None, inventory) -> None:
    fleet = _fleet(inventory)
    host = _host_of(fleet, wizard)
    args = [op, wizard] + (["--to", to] if to else [])
    # The host's ctl waits up to 600 s for the switch, then (if the sidecar restarted
    # mid-request) up to 420 s for its verdict: sidecar/ctl.py.
    proc = remote.sidecar_ctl(fleet, host, *args, timeout=1200)
    try:
        answer = _last_json(proc)
    except ValueError:
        click.echo(f"{host}: no answer from the sidecar: {proc.stderr.strip()}", err=True)
        sys.exit(2)
    if answer.get("interrupted"):
        # The sidecar restarted mid-request; sidecar.ctl reconnected and says where it ended up.
        click.echo(f"{host}: the sidecar restarted during the {op}; {wizard} is now on "
                   f"{answer.get('active') or 'an unknown backend'}", err=True)
    click.echo(json.dumps(answer, indent=2))
    sys.exit(0 if answer.get("ok") else 1)


_inventory = click.option("--inventory", type=click.Path(dir_okay=False), default=None,
                          help="inventory YAML (default: $NEVERDARK_INVENTORY or fleet.yaml)")


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="backend to switch to (default: the next healthy)")
@_inventory
def failover(wizard: str, to: str | None, inventory) -> None:
    """Switch WIZARD now (drills, maintenance); waits until the switch is verified."""
    _control("failover", wizard, to, inventory)


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="backend to pin (default: the active one)")
@_inventory
def pin(wizard: str, to: str | None, inventory) -> None:
    """Keep WIZARD on a backend: no automatic switching until `release`."""
    _control("pin", wizard, to, inventory)


@main.command()
@click.argument("wizard")
@_inventory
def release(wizard: str, inventory) -> None:
    """Let the sidecar choose WIZARD's backend again."""
    _control("release", wizard, None, inventory)


@main.command()
@click.argument("wizard")
@click.option("--to", "to", default=None, help="fallback to drill (default: the next healthy)")
@click.option("--turns", default=3, show_default=True, help="real turns checked on each side")
@click.option("--json", "as_json", is_flag=True, help="print the whole report as JSON")
@_inventory
def drill(wizard: str, to: str | None, turns: int, as_json: bool, inventory) -> None:
    """Fail WIZARD over and back through its sidecar, checking real answers on each side."""
    fleet = _fleet(inventory)
    host = _host_of(fleet, wizard)
    args = [wizard, "--turns", str(turns)] + (["--to", to] if to else [])
    proc = remote.run(fleet, host, f"{remote.SIDECAR_PYTHON} -m sidecar.drill "
                                   + shlex.join(args))
    try:
        report = _last_json(proc)
    except ValueError:
        click.echo(f"{host}: the drill gave no report: {proc.stderr.strip()[-500:]}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in drill_lines(host, report):
            click.echo(line)
    sys.exit(0 if report.get("ok") else 1)


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
    lines.append("drill passed" if report.get("ok") else f"drill FAILED: {report.get('error')}")
    return lines


def _host_status(fleet, host: str) -> tuple[str, dict | str]:
    try:
        proc = remote.sidecar_ctl(fleet, host, "status", timeout=60)
        answer = _last_json(proc)
        if not answer.get("ok"):
            return host, answer.get("error") or "sidecar refused"
        return host, answer["status"]
    except Exception as exc:  # noqa: BLE001 -- one unreachable host must not hide the others
        detail = getattr(exc, "stderr", None) or str(exc) or type(exc).__name__
        return host, f"unreachable: {str(detail).strip()[-200:]}"


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
    """One table for the whole inventory: where each wizard runs and how its backends are."""
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
    bad = any(not isinstance(s, dict) for s in statuses.values()) or any(
        w.get("dark") for s in statuses.values() if isinstance(s, dict)
        for w in s["wizards"].values())
    sys.exit(1 if bad else 0)
