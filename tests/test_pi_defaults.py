"""Pi defaults: the journal's caps (planned for `pi` hosts only, rendered as the deploy writes
them) and the memory-fit presets for 2, 4 and 8 GB Pis."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from neverdark import contract, memory_fit, plan
from neverdark.cli import main as cli
from neverdark.inventory import InventoryError, validate


def one_host(tmp_path: Path, profile: str) -> Path:
    path = tmp_path / f"{profile}.yaml"
    path.write_text(yaml.safe_dump({"hosts": {"h": {
        "address": "192.168.1.50", "ssh": {"user": "pi", "sudo": True}, "profile": profile,
        "memory_mb": 2048, "cores": 4}}}))
    return path


def test_the_journal_dropin_is_planned_for_pi_hosts_only(tmp_path):
    pi = plan.host_plan(validate(one_host(tmp_path, "pi"), env={}), "h")
    vps = plan.host_plan(validate(one_host(tmp_path, "vps"), env={}), "h")
    assert vps["base"]["journald"] is None
    dropin = pi["base"]["journald"]
    assert (dropin.path, dropin.mode, dropin.user) == (contract.JOURNALD_DROPIN, "0644", "root")
    # journald reads [Journal] Key=Value; a size is a number with K, M or G.
    lines = [line for line in dropin.content.splitlines() if not line.startswith("#")]
    assert lines == ["[Journal]", "SystemMaxUse=64M", "RuntimeMaxUse=16M"]


def test_render_shows_the_journal_dropin_on_a_pi(tmp_path):
    for profile, present in (("pi", True), ("vps", False)):
        out = tmp_path / f"out-{profile}"
        result = CliRunner().invoke(cli, ["render", "h", "--out", str(out)],
                                    env={"NEVERDARK_INVENTORY": str(one_host(tmp_path, profile)),
                                         "NEVERDARK_SECRETS": ""})
        assert result.exit_code == 0, result.output
        rendered = out / contract.JOURNALD_DROPIN.lstrip("/")
        assert rendered.exists() == present
        assert (f"0644 root:root {contract.JOURNALD_DROPIN}" in
                (out / "MANIFEST").read_text()) == present
        if present:
            assert rendered.read_text() == plan.journald_dropin().content


# --- memory-fit presets ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "inventories"


def presets_module():
    spec = importlib.util.spec_from_file_location("pi_presets", REPO / "bench" / "pi_presets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def presets():
    return presets_module()


def test_the_docs_show_what_the_script_prints(presets):
    docs = (REPO / "docs" / "inventory.md").read_text()
    begin = docs.index("<!-- pi-presets:begin (bench/pi_presets.py) -->\n")
    end = docs.index("<!-- pi-presets:end -->")
    shown = docs[docs.index("\n", begin) + 1:end]
    assert shown == presets.render(), "docs/inventory.md is stale: rerun bench/pi_presets.py"


def test_the_script_prints_the_tables(presets):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pi_presets.py")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == presets.render()
    assert "| 2 GB | 2048 | llama-cpp-python | f16 | **3** | 2010 MB | 308 MB | 38 MB |" in (
        proc.stdout)


@pytest.mark.parametrize("name,memory_mb", [("pi_2gb", 2048), ("pi_4gb", 4096),
                                            ("pi_8gb", 8192)])
def test_each_preset_example_fits_and_one_more_wizard_does_not(presets, tmp_path, name,
                                                               memory_mb):
    path = DATA / f"{name}.yaml"
    fleet = validate(path, env=presets.ENV)
    assert fleet.hosts["pi"].memory_mb == memory_mb and memory_fit.misfit(fleet, "pi") is None
    wizards = fleet.wizards_on("pi")
    assert len(wizards) == presets.max_wizards(memory_mb, *presets.DEFAULT)
    # The example is the table's preset: same budget as the script computed.
    row = next(r for r in presets.size_rows()
               if r["memory_mb"] == memory_mb and (r["engine"], r["kv_type"]) == presets.DEFAULT)
    assert sum(mb for _, mb in memory_fit.memory_budget(fleet, "pi")) == row["total"]
    doc = yaml.safe_load(path.read_text())
    doc["wizards"][f"wizard{len(wizards) + 1}"] = dict(doc["wizards"]["wizard1"])
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(doc))
    with pytest.raises(InventoryError) as err:
        validate(bigger, env=presets.ENV)
    problems = [str(p) for p in err.value.problems]
    assert len(problems) == 1 and "hosts.pi.memory_mb: does not fit" in problems[0]


def test_a_fourth_wizard_on_a_2gb_pi_is_refused_with_the_hints(presets):
    path = DATA / "pi_2gb_four_wizards.yaml"
    with pytest.raises(InventoryError) as err:
        validate(path, env=presets.ENV)
    (problem,) = [str(p) for p in err.value.problems]
    line = path.read_text().splitlines().index("    memory_mb: 2048") + 1
    assert problem.startswith(
        f"{path}:{line}: hosts.pi.memory_mb: does not fit: needs 2293 MB, host has 2048 MB "
        "(245 MB over). Options: set models.gemma3-270m.server.kv_type q8_0 (saves 216 MB); "
        "serve a smaller model than gemma3-270m (it takes 1025 MB); move a wizard to another "
        "host (230 MB per gateway, more where wizards share a model's prompt cache):"), problem
    assert "hermes gateway wizard4" in problem


@pytest.mark.parametrize("engine,kv_type", [("llama-cpp-python", "f16"),
                                            ("llama-server", "q8_0")])
def test_min_memory_is_the_smallest_memory_mb_that_fits(presets, engine, kv_type):
    for wizards in (1, 3, 7):
        need = presets.needed_mb(wizards, engine, kv_type)
        fits = presets.load(presets.preset_inventory(need, wizards, engine, kv_type))
        assert memory_fit.misfit(fits, "pi") is None
        with pytest.raises(InventoryError):
            presets.load(presets.preset_inventory(need - 1, wizards, engine, kv_type))
