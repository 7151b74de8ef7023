"""Pi defaults: the journal's caps (planned for `pi` hosts only, rendered as the deploy writes
them) and the memory-fit presets for 2, 4 and 8 GB Pis."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from neverdark import contract, plan
from neverdark.cli import main as cli
from neverdark.inventory import validate


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
