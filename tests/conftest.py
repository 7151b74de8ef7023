"""Shared test configuration (markers are registered in pyproject.toml)."""


def pytest_ignore_collect(collection_path, config):
    # tests/infra is the operator-facing testinfra suite for a deployed inventory: it runs only
    # when given --inventory (tests/test_fleet_deploy.py runs it against the test fleet).
    if collection_path.name == "infra" and config.getoption("--inventory", None) is None:
        return True
    return None
