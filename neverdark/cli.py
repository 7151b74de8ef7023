"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars."""

from __future__ import annotations

import click

from neverdark.inventory import validate_cmd
from neverdark.testfleet import cli as testfleet_cli


@click.group()
def main() -> None:
    """neverdark: degraded, but never dark."""


main.add_command(validate_cmd)
main.add_command(testfleet_cli, "testfleet")
