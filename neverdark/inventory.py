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
from neverdark.problems import (InventoryError, Problem, Report, add_validation_errors,
                                unknown_key)
from neverdark.schema import CloudBackend, Fleet, Host, LocalBackend, Model, Wizard
from neverdark.yamlsource import load_yaml

__all__ = ["CloudBackend", "Fleet", "InventoryError", "LocalBackend", "Model", "Problem",
           "default_inventory_path", "validate"]

REPO = Path(__file__).resolve().parent.parent
INVENTORY_ENV = "NEVERDARK_INVENTORY"
SECTIONS: dict[str, type[BaseModel]] = {"hosts": Host, "models": Model, "wizards": Wizard}


def default_inventory_path(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env[INVENTORY_ENV]) if env.get(INVENTORY_ENV) else REPO / "fleet.yaml"


def validate(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> Fleet:
    path = Path(path)
    report = Report(str(path), {})
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise InventoryError([Problem(str(path), None, "(file)", f"cannot read: {reason}")])
    raw = load_yaml(text, report)
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
    unsure = checks.check_references(report, fleet, names["hosts"], names["models"])
    # A host with a broken wizard entry would be budgeted without that wizard's gateway.
    unsure |= {entry.get("host") for w, entry in (raw.get("wizards") or {}).items()
               if w not in parts["wizards"] and isinstance(entry, dict)
               and isinstance(entry.get("host"), str)}
    checks.check_models(report, fleet)
    checks.check_engines(report, fleet)
    checks.check_probes(report, fleet)
    topology.assign_ports(report, fleet)
    checks.check_telegram(report, fleet)
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
