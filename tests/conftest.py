"""Shared test configuration (markers are registered in pyproject.toml)."""

import pytest

from testbed.bed import Testbed


def pytest_ignore_collect(collection_path, config):
    # tests/infra is the operator-facing testinfra suite for a deployed inventory: it runs only
    # when given --inventory (tests/test_fleet_deploy.py runs it against the test fleet).
    if collection_path.name == "infra" and config.getoption("--inventory", None) is None:
        return True
    return None


@pytest.fixture(scope="session")
def bed(tmp_path_factory):
    """The test fleet (two nspawn hosts, LLMock clouds, webhook receiver), shared by the fleet
    test files: booting and deploying it is the expensive part."""
    with Testbed(tmp_path_factory.mktemp("testbed")) as bed:
        yield bed


@pytest.fixture(scope="session")
def first_deploy(bed):
    result = bed.deploy()
    assert result.rc == 0, result.output[-6000:]
    return result
