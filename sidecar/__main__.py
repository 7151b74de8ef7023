"""`python -m sidecar --config /etc/neverdark/sidecar.yaml` (the neverdark-sidecar unit's ExecStart)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys

from sidecar import config, daemon, jsonlog
from sidecar.http_api import TokenError

log = logging.getLogger("sidecar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar", description=__doc__)
    parser.add_argument("--config", default="/etc/neverdark/sidecar.yaml")
    parser.add_argument("--systemctl", default=None,
                        help=f"command prefix for systemctl (default: ${daemon.SYSTEMCTL_ENV}, "
                             f"else {' '.join(daemon.DEFAULT_SYSTEMCTL)!r})")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and secrets, then exit (0 = valid)")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="with --check: take the paths the config names relative to DIR "
                             "(a tree written by `neverdark render HOST --out DIR`)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    jsonlog.setup(level=getattr(logging, args.log_level))
    try:
        cfg = config.load(args.config, root=args.root)
    except config.ConfigError as exc:
        log.error("invalid config: %s", exc)
        return 2
    if args.check:
        print(f"{cfg.path}: valid ({len(cfg.wizards)} wizards: {', '.join(cfg.wizards)})")
        return 0
    # From here on every line is scrubbed of every value in the secrets file.
    jsonlog.setup(cfg.secrets, level=getattr(logging, args.log_level))
    systemctl = shlex.split(args.systemctl) if args.systemctl else None
    try:
        asyncio.run(daemon.run(cfg, systemctl=systemctl))
    except (OSError, TokenError) as exc:
        # e.g. the listen port is taken, the control socket's directory is not writable, or
        # the private listener's token file is missing or readable by others
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
