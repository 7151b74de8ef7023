"""A fallback served by another host of the fleet, on the real test fleet (docs/crosshost.md).

Two hosts of the runner's architecture and an outsider in the same /24 that the inventory never
lists: merlin lives on vps1, which serves no model, and falls back onto vps2's Gemma 3 270M
server, reached across the network at vps2's private address with its key. The deploy converges
(a second one changes nothing); the testinfra suite passes, with the outsider unable to connect
to the server (the firewall) and a request without the key refused 401; a drill fails merlin
over onto vps2's model and back, real turns answered on both sides; with its cloud primary
down, merlin fails over onto vps2's model by itself, goes dark when vps2's server stops too, and
comes back onto it when the server does.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from neverdark import contract
from testbed import fleet as testfleet
from testbed.bed import Testbed

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]

SERVING, WIZARD_HOST, OUTSIDER = "vps2", "vps1", "out1"
MODEL, WIZARD = "gemma3-270m", "merlin"


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    with Testbed(tmp_path_factory.mktemp("crosshost"),
                 hosts=[testfleet.HostSpec(WIZARD_HOST, "vps"), testfleet.HostSpec(SERVING, "vps")],
                 outsiders=[f"{OUTSIDER}:vps:256"]) as bed:
        wizards = {WIZARD: {"host": WIZARD_HOST, "backends": [
            bed.cloud("claude", WIZARD_HOST, "anthropic", "claude-sonnet-4-5"),
            {"name": "remote", "local": MODEL, "host": SERVING, "max_tokens": 64}]}}
        doc = bed.inventory(wizards)
        for name in (WIZARD_HOST, SERVING):
            # the test hosts' own addresses are private (the run's /24)
            doc["hosts"][name]["private_address"] = bed.fleet.address(name)
        bed.inventory_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        yield bed


@pytest.fixture(scope="module")
def deployed(cross):
    result = cross.deploy()
    assert result.rc == 0, result.output[-6000:]
    return result


def cli(bed, *args: str) -> dict:
    proc = bed.neverdark(*args)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def wait_for(bed, ok, timeout: float) -> dict:
    """Until merlin's sidecar status satisfies `ok`; that status."""
    deadline = time.monotonic() + timeout
    while True:
        w = bed.sidecar_status(WIZARD_HOST)["wizards"][WIZARD]
        if ok(w):
            return w
        assert time.monotonic() < deadline, w
        time.sleep(1)


def test_the_deploy_converges(cross, deployed):
    again = cross.deploy()
    assert again.rc == 0 and again.changed == 0, again.changed_ops
    fleet = cross.validated()
    assert fleet.local_models(WIZARD_HOST) == [] and fleet.local_models(SERVING) == [MODEL]
    unit = cross.ssh(SERVING, f"systemctl cat {contract.llama_unit(MODEL)}")
    assert f"--host {cross.fleet.address(SERVING)}" in unit, unit
    assert f"EnvironmentFile={contract.llama_key_file(MODEL)}" in unit


def test_testinfra_passes_and_the_outsider_cannot_connect(cross, deployed):
    proc = cross.testinfra(f"--outsider={cross.fleet.testinfra_url(OUTSIDER)}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # and the outsider really routes to the host: sshd on vps2 answers it
    out = cross.ssh(OUTSIDER, "python3 -c 'import socket,sys;socket.create_connection("
                              f"(sys.argv[1],22),timeout=5);print(\"ssh ok\")' "
                              f"{cross.fleet.address(SERVING)}")
    assert "ssh ok" in out


def test_a_drill_onto_the_other_hosts_model_and_back(cross, deployed):
    cross.wait_active(WIZARD_HOST, WIZARD, "claude")
    report = cli(cross, "drill", WIZARD, "--to", "remote", "--turns", "1", "--json")
    assert report["ok"], report
    assert (report["to"], report["served_by"]) == ("remote", SERVING), report
    assert all(t["model"] == MODEL for t in report["fallback_turns"]), report
    status = cli(cross, "status", "--json")
    assert status["wizards"][WIZARD]["state"] == "primary", status["wizards"][WIZARD]


def test_the_other_hosts_server_taken_over_then_lost(cross, deployed):
    """claude down: merlin fails over onto vps2's model by itself (probed and check-turned
    across the network); vps2's server stopped too: merlin has no healthy backend left and goes
    dark; the server back: merlin back on it."""
    unit = contract.llama_unit(MODEL)
    claude = cross.mocks[f"{WIZARD_HOST}/anthropic"]
    claude.fault({"type": "fail", "status": 503, "times": None})
    try:
        cross.wait_active(WIZARD_HOST, WIZARD, "remote", timeout=400)
        status = cli(cross, "status", "--json")["wizards"][WIZARD]
        assert (status["active"], status["served_by"]) == ("remote", SERVING), status
        cross.ssh(SERVING, f"systemctl stop {unit}")
        dark = wait_for(cross, lambda w: w["dark"], 120)
        # dark keeps the last backend active: nothing healthy to switch to
        assert dark["active"] == "remote" and not dark["backends"]["remote"]["healthy"], dark
        cross.ssh(SERVING, f"systemctl start {unit}")
        back = wait_for(cross, lambda w: not w["dark"] and w["active"] == "remote"
                        and w["backends"]["remote"]["healthy"], 400)
        assert not back["switching"], back
    finally:
        cross.ssh(SERVING, f"systemctl start {unit}", check=False)
        claude.recover()
