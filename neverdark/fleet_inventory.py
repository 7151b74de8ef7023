"""What the top-level `inventory` file hands pyinfra: host groups, or a loud stop.

pyinfra 3.10 runs an empty inventory as zero hosts with exit 0, and a directory as INVENTORY
crashes; so every failure here exits non-zero with a message that names the file.
"""

from __future__ import annotations

import os
import sys

from neverdark.inventory import InventoryError, default_inventory_path, validate
from neverdark.model_sources import ModelSourceError
from neverdark.plan import pyinfra_groups


def _stop(message: str) -> None:
    print(f"neverdark: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_groups() -> dict[str, list]:
    path = default_inventory_path()
    if not path.exists():
        _stop(f"inventory {path} does not exist (set NEVERDARK_INVENTORY, or copy "
              "fleet.example.yaml to fleet.yaml)")
    if path.is_dir():
        _stop(f"inventory {path} is a directory; NEVERDARK_INVENTORY must name a YAML file")
    try:
        fleet = validate(path, env=os.environ)
    except InventoryError as err:
        _stop(f"invalid inventory, nothing deployed:\n{err}")
    try:
        groups = pyinfra_groups(fleet)
    except ModelSourceError as err:
        _stop(f"{path}: {err}")
    if not any(groups.values()):
        _stop(f"inventory {path} declares no hosts: nothing to deploy")
    return groups
