"""A mixed fleet, as operators run one: an x86_64 VPS and an aarch64 Raspberry Pi.

The Pi is real arm64 Debian 12 under qemu-user (testbed.fleet), 10-20x slower than a native
host, so what runs on it is kept to what the acceptance names: the exact operator command, a
second run with zero changes, the operator's testinfra suite on both hosts (which asserts the
engines' platform tag and ELF machine against each host's `uname -m`), and a completion from
the Pi's local model through its wizard's own Hermes gateway. And the common layout of issue
17: saruman lives on the VPS with no model of its own and falls back onto the Pi's model,
reached across the network at pi1's private address with its key (the testinfra suite checks
the key and that an outsider in the same /24 cannot connect): drilled there and back, then
taken over by itself when its cloud primary fails, and sent on to its next backend when the
Pi's server stops (tests/test_fleet_crosshost.py runs the same on two x86_64 hosts, dark
included). The hosts' wheelhouse has no
llama-cpp-python wheel (testbed.bed serves it without one, as no package index has one): the
deploy uploads the one built for each host's arch, and nothing is compiled on a host.

The same fleet is `make demo`'s (vps1 with merlin and gandalf, pi1 with radagast, local first).
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from neverdark import contract
from testbed.bed import MIXED_HOSTS, Testbed

pytestmark = pytest.mark.fleet

OUTSIDER = "out1"
REMOTE_WIZARD, MODEL = "saruman", "gemma3-270m"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    t = time.monotonic()
    with Testbed(tmp_path_factory.mktemp("mixed"), hosts=MIXED_HOSTS,
                 outsiders=[f"{OUTSIDER}:vps:256"]) as bed:
        print(f"\nmixed fleet up in {time.monotonic() - t:.0f} s")
        # make demo's wizards, and saruman: the VPS's wizard whose fallback is the Pi's model
        wizards = {**bed.default_wizards(), REMOTE_WIZARD: {"host": "vps1", "backends": [
            bed.cloud("claude", "vps1", "anthropic", "claude-sonnet-4-5"),
            {"name": "home", "local": MODEL, "host": "pi1", "max_tokens": 32},
            bed.cloud("gpt", "vps1", "openai", "gpt-4.1-mini")]}}
        doc = bed.inventory(wizards)
        for name in ("vps1", "pi1"):
            doc["hosts"][name]["private_address"] = bed.fleet.address(name)   # the run's /24
        bed.inventory_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        yield bed


@pytest.fixture(scope="module")
def deployed(mixed):
    t = time.monotonic()
    result = mixed.deploy(timeout=2400)
    print(f"\nmixed fleet: fresh deploy {time.monotonic() - t:.0f} s, {result.changed} changes")
    assert result.rc == 0, result.output[-6000:]
    return result


def test_the_pi_is_aarch64_and_the_vps_is_not(mixed):
    assert mixed.ssh("pi1", "uname -m").strip() == "aarch64"
    assert mixed.ssh("vps1", "uname -m").strip() == "x86_64"
    assert mixed.fleet.hosts["pi1"]["user"] == "pi"     # a sudo user, as on a real Pi


def test_no_host_has_a_compiler_or_a_llama_wheel_to_take(mixed, deployed):
    for host in ("vps1", "pi1"):
        assert mixed.ssh(host, "command -v cc gcc c++ cmake || echo none").strip() == "none"
    served = mixed.run_dir / "wheels"
    assert not list(served.glob("llama_cpp_python-*")) and list(served.glob("*.whl"))


def test_second_deploy_changes_nothing(mixed, deployed):
    t = time.monotonic()
    again = mixed.deploy(timeout=1800)
    print(f"\nmixed fleet: second deploy {time.monotonic() - t:.0f} s")
    assert again.rc == 0, again.output[-4000:]
    assert again.changed == 0, f"changed on re-run: {again.changed_ops}"


def test_testinfra_suite_passes_on_both_arches(mixed, deployed):
    proc = mixed.testinfra("-rA", f"--outsider={mixed.fleet.testinfra_url(OUTSIDER)}",
                           timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # every check ran on both hosts, the arch checks included
    for host in ("vps1", "pi1"):
        assert f"test_engines_are_built_for_the_hosts_arch[{host}]" in proc.stdout
        assert f"test_host_is_the_declared_architecture[{host}]" in proc.stdout


def test_the_pis_local_model_answers_through_its_wizard(mixed, deployed):
    """radagast runs local-first on the Pi: a real turn through its Hermes gateway, answered by
    the aarch64 build of llama-cpp-python serving Gemma 3 270M."""
    mixed.wait_active("pi1", "radagast", "local", timeout=900)
    client = mixed.client("radagast")
    try:
        t = time.monotonic()
        turn = client.turn("Say hello in five words.", timeout=900)
        print(f"\npi1 (aarch64, emulated): a Hermes turn on the local model took "
              f"{time.monotonic() - t:.1f} s")
    finally:
        client.close()
    assert turn.ok and turn.model == "gemma3-270m", turn


def test_a_vps_wizard_drills_onto_the_pis_model_and_back(mixed, deployed):
    """saruman on vps1 fails over onto pi1's model (the aarch64 build under qemu-user), real
    turns answered there through saruman's own gateway on the VPS, and back."""
    mixed.wait_active("vps1", REMOTE_WIZARD, "claude", timeout=600)
    mixed.wait_healthy("vps1", REMOTE_WIZARD, "home", timeout=900)
    t = time.monotonic()
    proc = mixed.neverdark("drill", REMOTE_WIZARD, "--to", "home", "--turns", "1", "--json",
                           timeout=1800)
    report = json.loads(proc.stdout)
    print(f"\nsaruman (vps1) drilled onto pi1's model (aarch64, emulated) and back in "
          f"{time.monotonic() - t:.0f} s")
    assert report["ok"], json.dumps(report, indent=1)
    assert (report["to"], report["served_by"]) == ("home", "pi1"), report
    assert all(t["model"] == MODEL for t in report["fallback_turns"]), report
    status = mixed.sidecar_status("vps1")["wizards"][REMOTE_WIZARD]
    assert status["active"] == "claude", status


def test_the_pis_server_takes_the_vps_wizard_over_then_stops(mixed, deployed):
    """claude down: saruman fails over onto pi1's model by itself (probed and check-turned
    across the network to the Pi); pi1's server stopped: saruman goes on to its next backend
    (gpt); the server and claude back: saruman back on claude."""
    unit = contract.llama_unit(MODEL)
    claude = mixed.mocks["vps1/anthropic"]
    claude.fault({"type": "fail", "status": 503, "times": None})
    try:
        t = time.monotonic()
        mixed.wait_active("vps1", REMOTE_WIZARD, "home", timeout=900)
        print(f"\nsaruman: claude failing -> on pi1's model in {time.monotonic() - t:.0f} s")
        status = json.loads(mixed.neverdark("status", "--json").stdout)["wizards"][REMOTE_WIZARD]
        assert (status["active"], status["served_by"]) == ("home", "pi1"), status
        mixed.ssh("pi1", f"sudo systemctl stop {unit}")
        t = time.monotonic()
        moved = mixed.wait_active("vps1", REMOTE_WIZARD, "gpt", timeout=300)
        print(f"saruman: pi1's server stopped -> on gpt in {time.monotonic() - t:.0f} s")
        assert not moved["backends"]["home"]["healthy"], moved
    finally:
        mixed.ssh("pi1", f"sudo systemctl start {unit}", check=False)
        claude.recover()
    mixed.wait_active("vps1", REMOTE_WIZARD, "claude", timeout=600)
