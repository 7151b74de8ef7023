from testbed.fleet.cli import cli

cli()
