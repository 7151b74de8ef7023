"""A mixed fleet, as operators run one: an x86_64 VPS and an aarch64 Raspberry Pi.

The Pi is real arm64 Debian 12 under qemu-user (testbed.fleet), 10-20x slower than a native
host, so what runs on it is kept to what the acceptance names: the exact operator command, a
second run with zero changes, the operator's testinfra suite on both hosts (which asserts the
engines' platform tag and ELF machine against each host's `uname -m`), and a completion from
the Pi's local model through its wizard's own Hermes gateway. The hosts' wheelhouse has no
llama-cpp-python wheel (testbed.bed serves it without one, as no package index has one): the
deploy uploads the one built for each host's arch, and nothing is compiled on a host.

The same fleet is `make demo`'s (vps1 with merlin and gandalf, pi1 with radagast, local first).
"""

from __future__ import annotations

import time

import pytest

from testbed.bed import MIXED_HOSTS, Testbed

pytestmark = pytest.mark.fleet

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    t = time.monotonic()
    with Testbed(tmp_path_factory.mktemp("mixed"), hosts=MIXED_HOSTS) as bed:
        print(f"\nmixed fleet up in {time.monotonic() - t:.0f} s")
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
    proc = mixed.testinfra("-rA", timeout=1800)
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
