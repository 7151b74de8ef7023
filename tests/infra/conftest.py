"""testinfra checks for any deployed neverdark inventory.

    pytest tests/infra --inventory fleet.yaml          # a real fleet, over the operator's SSH

Hosts, users and keys come from the inventory itself, so the same checks run against the test
fleet in CI and against VPS and Pi hosts in production.
"""

from __future__ import annotations

import os
import shlex

import pytest
import testinfra

from neverdark.inventory import default_inventory_path, validate


def pytest_addoption(parser):
    parser.addoption("--inventory", default=None,
                     help="inventory YAML (default: $NEVERDARK_INVENTORY or fleet.yaml)")
    parser.addoption("--outsider", default=None,
                     help="a testinfra host spec (ssh://user@addr) of a machine outside the "
                          "fleet: no model server may accept its connections")


@pytest.fixture(scope="session")
def outsider(pytestconfig):
    spec = pytestconfig.getoption("--outsider")
    return testinfra.get_host(spec, ssh_extra_args="-o BatchMode=yes") if spec else None


def _fleet(config):
    path = config.getoption("--inventory") or default_inventory_path()
    return validate(path, env=os.environ)


def pytest_generate_tests(metafunc):
    if "host_name" in metafunc.fixturenames:
        fleet = _fleet(metafunc.config)
        metafunc.parametrize("host_name", sorted(fleet.hosts), scope="session")


@pytest.fixture(scope="session")
def fleet(pytestconfig):
    return _fleet(pytestconfig)


@pytest.fixture(scope="session")
def host(fleet, host_name):
    h = fleet.hosts[host_name]
    extra = ["-o BatchMode=yes"]
    if h.ssh.known_hosts:
        # testinfra runs ssh through a shell: quote what came from the inventory.
        known = shlex.quote(os.path.expanduser(h.ssh.known_hosts))
        extra += [f"-o UserKnownHostsFile={known}",
                  "-o StrictHostKeyChecking=yes"]
    kwargs = {"ssh_extra_args": " ".join(extra)}
    if h.ssh.key:
        kwargs["ssh_identity_file"] = os.path.expanduser(h.ssh.key)
    if h.ssh.sudo:
        kwargs["sudo"] = True
    return testinfra.get_host(f"ssh://{h.ssh.user}@{h.address}:{h.ssh.port}", **kwargs)
