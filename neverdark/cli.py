"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars."""

from __future__ import annotations

import json
import os
import sys

import click

from neverdark import remote
from neverdark.inventory import InventoryError, default_inventory_path, validate, validate_cmd
from neverdark.testfleet import cli as testfleet_cli


@click.group()
def main() -> None:
    """neverdark: degraded, but never dark."""


main.add_command(validate_cmd)
main.add_command(testfleet_cli, "testfleet")


def _fleet(path):
    try:
        return validate(path or default_inventory_path(), env=os.environ)
    except InventoryError as err:
        click.echo(str(err), err=True)
        sys.exit(2)


def _control(op: str, wizard: str, to: str | None, inventory) -> None:
    fleet = _fleet(inventory)
    if wizard not in fleet.wizards:
        raise click.BadParameter(f"unknown wizard {wizard!r} (known: {', '.join(fleet.wizards)})")
    host = fleet.wizards[wizard].host
    args = [op, wizard] + (["--to", to] if to else [])
    proc = remote.sidecar_ctl(fleet, host, *args)
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        click.echo(f"{host}: no answer from the sidecar: {proc.stderr.strip()}", err=True)
        sys.exit(2)
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
