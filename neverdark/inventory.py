"""The fleet inventory: one YAML file describing hosts, local models and wizards.

`validate(path)` returns a `Fleet` with every default resolved (ports assigned, cloud base URLs
filled in, arch from profile) or raises `InventoryError` listing every problem at once, each as
`file:line: field.path: message`. The format is documented in docs/inventory.md.

Validation runs in two passes. Each host, model and wizard is checked against its schema on its
own (neverdark.schema), so one broken entry does not hide the problems of the others; the
cross-references (hosts, models, ports, secrets, memory) are then checked over the entries that
passed (neverdark.checks, neverdark.topology).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from neverdark import checks, topology
from neverdark.models import facts
from neverdark.problems import (InventoryError, Problem, Report, add_validation_errors,
                                unknown_key)
from neverdark.schema import CloudBackend, Fleet, Host, LocalBackend, Model, Wizard
from neverdark.yamlsource import load_yaml, read_text

__all__ = ["CloudBackend", "Fleet", "InventoryError", "InventoryNotFound", "LocalBackend", "Model",
           "Problem", "default_inventory_path", "find_inventory", "validate"]

REPO = Path(__file__).resolve().parent.parent
INVENTORY_ENV = "NEVERDARK_INVENTORY"
SECTIONS: dict[str, type[BaseModel]] = {"hosts": Host, "models": Model, "wizards": Wizard}


class InventoryNotFound(Exception):
    """No inventory file where the operator pointed, or anywhere by default; the message says
    which paths were tried and how to start one."""


def _candidates(env: Mapping[str, str], cwd: Path) -> list[tuple[Path, str]]:
    if env.get(INVENTORY_ENV):
        return [(Path(env[INVENTORY_ENV]).expanduser(), f"${INVENTORY_ENV}")]
    here, repo = cwd / "fleet.yaml", REPO / "fleet.yaml"
    return [(here, "the current directory")] + ([] if here.resolve() == repo.resolve()
                                               else [(repo, "the repository root")])


def default_inventory_path(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Path:
    """$NEVERDARK_INVENTORY, else ./fleet.yaml in the current directory if there is one, else
    fleet.yaml in the repository root. The path, whether or not a file is there."""
    candidates = _candidates(env, cwd or Path.cwd())
    return next((p for p, _ in candidates if p.exists()), candidates[-1][0])


def _start_hint(target: str | Path = "fleet.yaml") -> str:
    return (f"To start one: cp {REPO / 'fleet.example.yaml'} {target}, edit it, and run "
            "`neverdark validate`.")


def find_inventory(explicit: str | os.PathLike | None = None,
                   env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Path:
    """The inventory file a command works on: `explicit` (--inventory, validate's PATH), else
    the default_inventory_path() rule. Raises InventoryNotFound naming every path it tried."""
    tried = ([(Path(explicit).expanduser(), "the command line")] if explicit is not None
             else _candidates(env, cwd or Path.cwd()))
    for path, origin in tried:
        if path.is_dir():
            raise InventoryNotFound(f"inventory {path} (from {origin}) is a directory: name the "
                                    "YAML file itself")
        if path.exists():
            return path
    if explicit is not None or env.get(INVENTORY_ENV):
        path, origin = tried[0]
        raise InventoryNotFound(f"inventory {path} (from {origin}) does not exist. "
                                f"{_start_hint(path)}")
    places = " or ".join(f"{origin} ({path})" for path, origin in tried)
    raise InventoryNotFound(
        f"no inventory: no --inventory, ${INVENTORY_ENV} is not set, and there is no fleet.yaml "
        f"in {places}. {_start_hint()} Or name yours with --inventory PATH or "
        f"${INVENTORY_ENV}=PATH.")


def validate(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> Fleet:
    path = Path(path)
    report = Report(str(path), {})
    text = read_text(path, report)
    raw = load_yaml(text, report) if text is not None else None
    if report.problems and raw is None:
        raise InventoryError(report.problems)
    if not isinstance(raw, dict):
        report.add((), "the inventory must be a mapping with at least a hosts: section")
        raise InventoryError(report.problems)

    top = _validate_top(report, {k: v for k, v in raw.items() if k not in SECTIONS})
    parts, names = {}, {}
    for section, cls in SECTIONS.items():
        parts[section], names[section] = _validate_entries(report, raw.get(section), section, cls)
    if "hosts" not in raw:
        report.add(("hosts",), "required key is missing: the fleet needs at least one host")
    elif not names["hosts"] and not isinstance(raw["hosts"], (list, str, int, float)):
        report.add(("hosts",), "no hosts: the fleet needs at least one host")

    bad_wizards = checks.check_names(report, Fleet.model_construct(**top, **parts), names)
    # A wizard whose name is unusable is reported once, here; nothing later derives from it.
    parts["wizards"] = {w: wz for w, wz in parts["wizards"].items() if w not in bad_wizards}
    fleet = Fleet.model_construct(**top, **parts)
    fleet._path = path
    checks.default_api_keys(fleet)
    # The header-derived fields first: the tools check and the memory fit read them.
    incomplete = facts.fill_models(report, fleet)
    unsure = checks.check_references(report, fleet, names["hosts"], names["models"])
    unsure |= {where for m in incomplete for h in fleet.hosts
               for w in fleet.wizards_using(h, m) for where in (h, fleet.wizards[w].host)}
    # A host with a broken wizard entry would be budgeted without that wizard's gateway.
    raw_wizards = raw.get("wizards") if isinstance(raw.get("wizards"), dict) else {}
    unsure |= {entry.get("host") for w, entry in raw_wizards.items()
               if w not in parts["wizards"] and isinstance(entry, dict)
               and isinstance(entry.get("host"), str)}
    checks.check_models(report, fleet)
    checks.check_engines(report, fleet)
    checks.check_probes(report, fleet)
    topology.assign_ports(report, fleet)
    checks.check_telegram(report, fleet)
    checks.check_metrics(report, fleet)
    checks.check_key_variables(report, fleet)
    store = checks.load_secrets(report, fleet, path, env)
    if store is not None:
        fleet._store = store
        checks.check_secrets(report, fleet, store)
    checks.check_memory(report, fleet, unsure)
    if report.problems:
        raise InventoryError(report.problems)
    return fleet


def _validate_top(report: Report, skeleton: dict) -> dict[str, Any]:
    """The sections other than hosts, models and wizards, with their defaults."""
    fields = {k: f for k, f in Fleet.model_fields.items() if k not in SECTIONS}
    out: dict[str, Any] = {}
    for key in skeleton:
        if key not in fields:
            report.add((key,), unknown_key(key, list(Fleet.model_fields)))
    for key, field in fields.items():
        if skeleton.get(key) is not None:
            try:
                out[key] = TypeAdapter(field.annotation).validate_python(skeleton[key])
            except ValidationError as e:
                add_validation_errors(report, Fleet, e, (key,))
                out[key] = field.get_default(call_default_factory=True)
        else:
            out[key] = field.get_default(call_default_factory=True)
    return out


def _validate_entries(report: Report, raw: Any, section: str, cls: type[BaseModel],
                      ) -> tuple[dict[str, Any], set[str]]:
    """Valid entries of one section, and the names of all entries (valid or not)."""
    if raw is None:
        return {}, set()
    if not isinstance(raw, dict):
        report.add((section,), f"must be a mapping of name -> {section[:-1]}")
        return {}, set()
    good = {}
    for name, entry in raw.items():
        try:
            good[name] = cls.model_validate(entry)
        except ValidationError as e:
            add_validation_errors(report, Fleet, e, (section, name))
    return good, set(raw)
