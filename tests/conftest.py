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


# --- fleet tests last, their host images built meanwhile ----------------------------------------
# On a cold machine (CI) the aarch64 host image takes minutes under qemu-user, and the first
# fleet module needing it would wait for it. The tests that need no fleet run first (pytest's
# order otherwise interleaves them alphabetically: test_fleet_* sit among them) while a separate
# process builds the images: those tests leave most of the second core idle. The image build
# has its own lock, so a fleet test that gets there first waits for it instead of building twice.
_prefetch: dict = {}


@pytest.hookimpl(trylast=True)      # after `-m`/`-k` have deselected
def pytest_collection_modifyitems(session, config, items):
    fleet = [item for item in items if item.get_closest_marker("fleet")]
    if not fleet:
        return
    items[:] = [item for item in items if not item.get_closest_marker("fleet")] + fleet
    if not config.option.collectonly:
        _start_image_prefetch()


def _start_image_prefetch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    from testbed.fleet import base, image
    arches = [base.NATIVE_ARCH] + [a for a in ("aarch64",) if a != base.NATIVE_ARCH]
    if all(image.image_dir(a).is_dir() for a in arches):
        return
    log = base.CACHE / "logs" / "image-prefetch.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
    except OSError:
        return                      # the fleet tests build what they need, and say why not
    code = ("import sys; from testbed.fleet.image import ensure_image\n"
            "for arch in sys.argv[1:]: ensure_image(arch)")
    _prefetch["proc"] = subprocess.Popen(
        [sys.executable, "-c", code, *arches], cwd=Path(__file__).resolve().parent.parent,
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _prefetch["log"] = log


def pytest_sessionfinish(session, exitstatus):
    proc = _prefetch.get("proc")
    if proc is None:
        return
    import subprocess
    try:            # never killed mid-build by choice: mmdebstrap's mounts are its own to undo
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(60)
    if proc.returncode:
        print(f"\nhost image prefetch failed (exit {proc.returncode}): {_prefetch['log']}")
