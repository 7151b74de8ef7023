"""The `neverdark` command: validate an inventory, run the test fleet, drive the sidecars."""

from __future__ import annotations

import click

from neverdark.inventory import validate_cmd


@click.group()
def main() -> None:
    """neverdark: degraded, but never dark."""


main.add_command(validate_cmd)

try:  # the test fleet needs root and systemd-nspawn; the rest of the CLI does not
    from neverdark.testfleet import cli as _testfleet_cli
    main.add_command(_testfleet_cli, "testfleet")
except ImportError:
    pass
