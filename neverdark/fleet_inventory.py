"""What the top-level `inventory` file hands pyinfra: host groups, or a loud stop.

pyinfra 3.10 runs an empty inventory as zero hosts with exit 0, and a directory as INVENTORY
crashes; so every failure here exits non-zero with a message that names the file. The file is
found as every `neverdark` command finds it (neverdark.inventory.find_inventory:
$NEVERDARK_INVENTORY, else ./fleet.yaml, else the repository's), and the exit codes are the
CLI's: 1 for an invalid inventory, 2 when there is no inventory file.
"""

from __future__ import annotations

import os
import sys

from neverdark.inventory import InventoryError, InventoryNotFound, find_inventory, validate
from neverdark.model_sources import ModelSourceError
from neverdark.plan import pyinfra_groups

EXIT_PROBLEMS, EXIT_USAGE = 1, 2


def _stop(message: str, code: int) -> None:
    print(f"neverdark: {message}", file=sys.stderr)
    raise SystemExit(code)


def load_groups() -> dict[str, list]:
    try:
        path = find_inventory(None, env=os.environ)
    except InventoryNotFound as err:
        _stop(str(err), EXIT_USAGE)
    try:
        fleet = validate(path, env=os.environ)
    except InventoryError as err:
        n = len(err.problems)
        _stop(f"invalid inventory, nothing deployed:\n{err}\n"
              f"{n} problem{'' if n == 1 else 's'} in {path}", EXIT_PROBLEMS)
    try:
        groups = pyinfra_groups(fleet)
    except ModelSourceError as err:
        _stop(f"{path}: {err}", EXIT_PROBLEMS)
    if not any(groups.values()):
        _stop(f"inventory {path} declares no hosts: nothing to deploy", EXIT_PROBLEMS)
    return groups
