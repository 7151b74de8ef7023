"""The deploy reads a host's real CPUs and memory before changing it: the fact's command run on
this machine, the decisions, and pyinfra itself stopping on a host that has less than the
inventory says (`--dry` against @local: nothing could change even if the check failed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from deploys.base import resources
from neverdark import memory_fit
from neverdark.inventory import validate
from neverdark.plan import host_plan
from neverdark.schema import MemoryPolicy

REPO = Path(__file__).resolve().parent.parent
PYINFRA = Path(sys.executable).with_name("pyinfra")


def run_fact(**popen) -> resources.Resources:
    out = subprocess.run(["sh", "-c", resources.COMMAND], capture_output=True, text=True,
                         check=True, timeout=30, **popen).stdout
    return resources.parse(out.splitlines())


def memtotal_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal")


def test_the_fact_reads_this_machine():
    real = run_fact()
    assert real.cores == len(os.sched_getaffinity(0))
    assert real.memory_mb == memtotal_mb()
    assert real.machine == os.uname().machine
    dpkg = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert real.userland == dpkg
    assert resources.arch_problem("here", os.uname().machine, real) is None


def test_the_arch_must_be_the_inventorys_in_the_kernel_and_in_the_userland():
    def problem(wanted, machine, userland):
        return resources.arch_problem("pi4", wanted, resources.Resources(
            4, 4096, None, (), machine, userland))

    for wanted, machine, userland in [("aarch64", "aarch64", "arm64"),
                                      ("aarch64", "arm64", "arm64"),
                                      ("x86_64", "x86_64", "amd64"),
                                      ("aarch64", "aarch64", None)]:     # no dpkg: uname decides
        assert problem(wanted, machine, userland) is None, (wanted, machine, userland)
    # A Pi inventory against a VPS, and the reverse: the old message, unchanged.
    assert problem("aarch64", "x86_64", "amd64") == (
        "pi4: the inventory says arch aarch64, the host says 'x86_64' (uname -m): fix "
        "hosts.pi4.arch")
    assert problem("x86_64", "aarch64", "arm64").startswith(
        "pi4: the inventory says arch x86_64, the host says 'aarch64'")
    # 32-bit systems: a Pi 3 with 32-bit Pi OS, an old PC; told what to install.
    for machine, userland in [("armv7l", "armhf"), ("armv6l", "armhf"), ("i686", "i386")]:
        text = problem("aarch64", machine, userland)
        assert text.startswith(f"pi4: the inventory says arch aarch64, the host says "
                               f"{machine!r} (uname -m)"), text
        assert "a 32-bit system cannot run neverdark's engines" in text
        assert "install a 64-bit OS" in text
    # The 32-bit Raspberry Pi OS on a Pi 4/5: a 64-bit kernel, an armhf userland.
    text = problem("aarch64", "aarch64", "armhf")
    assert text.startswith("pi4: the kernel is aarch64 (uname -m) but the installed system is "
                           "armhf (dpkg --print-architecture), not arm64"), text
    assert "cannot install the aarch64 wheel" in text and "install a 64-bit OS" in text
    assert problem("x86_64", "x86_64", "i386").startswith("pi4: the kernel is x86_64")


def test_the_fact_parses_the_kernels_and_the_userlands_arch():
    real = resources.parse(["machine aarch64", "userland armhf", "cores 4",
                            "memtotal_kb 1000000", "container "])
    assert (real.machine, real.userland, real.cores) == ("aarch64", "armhf", 4)
    none = resources.parse(["machine ", "userland ", "cores 1", "memtotal_kb 1024"])
    assert (none.machine, none.userland) == (None, None)


def test_the_fact_counts_the_cpus_it_may_run_on_not_omp_num_threads():
    """A cpuset or taskset limits the CPUs (sched_getaffinity, which nproc reads); an
    OMP_NUM_THREADS carried in by a login profile must not pass for a core count."""
    first = min(os.sched_getaffinity(0))
    real = run_fact(preexec_fn=lambda: os.sched_setaffinity(0, {first}),
                    env={**os.environ, "OMP_NUM_THREADS": "7", "OMP_THREAD_LIMIT": "9"})
    assert real.cores == 1


def test_parse_reads_container_and_enabled_time_sync_units():
    real = resources.parse([
        "cores 4", "memtotal_kb 3884376", "container systemd-nspawn",
        "timesync systemd-timesyncd.service enabled", "timesync chrony.service ",
        "timesync ntpsec.service disabled", "timesync ntp.service masked",
        "timesync openntpd.service static"])
    assert real == resources.Resources(4, 3793, "systemd-nspawn",
                                       ("systemd-timesyncd.service", "openntpd.service"))
    bare = resources.parse(["cores 4", "memtotal_kb 1000000", "container ",
                            "timesync systemd-timesyncd.service "])
    assert (bare.container, bare.time_sync) == (None, ())
    assert resources.parse(["cores", "memtotal_kb x"]) == resources.Resources(None, None, None)


def plan_for(tmp_path, profile="pi", memory_mb=4096, cores=4) -> dict:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"hosts": {"pi4": {
        "address": "192.168.1.50", "ssh": {"user": "pi", "sudo": True}, "profile": profile,
        "arch": "x86_64", "memory_mb": memory_mb, "cores": cores}}}))
    return host_plan(validate(path, env={}), "pi4")


SYNCED = ("systemd-timesyncd.service",)


def test_more_cores_than_the_host_runs_on_is_refused(tmp_path):
    p = plan_for(tmp_path, cores=4)
    refusals, _ = resources.check("pi4", p, resources.Resources(2, 8000, None, SYNCED))
    assert refusals == ["pi4: the inventory says cores 4, the host runs on 2 (nproc): fix "
                        "hosts.pi4.cores (it sets the model servers' default threads)"]
    assert resources.check("pi4", p, resources.Resources(4, 8000, None, SYNCED)) == ([], [])
    assert resources.check("pi4", p, resources.Resources(8, 8000, None, SYNCED)) == ([], [])


def test_memory_above_memtotal_warns_within_the_headroom_and_is_refused_beyond(tmp_path):
    p = plan_for(tmp_path, memory_mb=4096)
    headroom = p["resources"]["headroom_mb"]
    assert headroom == 615                   # 15% of 4096
    at = resources.check("pi4", p, resources.Resources(4, 4096, None, SYNCED))
    assert at == ([], [])
    # A "4 GB" Pi's MemTotal is below 4096: the nominal size deploys, with a warning.
    refusals, warnings = resources.check("pi4", p, resources.Resources(4, 3793, None, SYNCED))
    assert refusals == [] and warnings == [
        "pi4: memory_mb 4096 is 303 MB above the host's MemTotal (3793 MB); the memory fit's "
        "headroom shrinks from 615 to 312 MB. Set hosts.pi4.memory_mb: 3793 for an exact fit"]
    edge = resources.check("pi4", p, resources.Resources(4, 4096 - headroom, None, SYNCED))
    assert edge[0] == [] and len(edge[1]) == 1
    refusals, _ = resources.check("pi4", p,
                                  resources.Resources(4, 4096 - headroom - 1, None, SYNCED))
    assert refusals == [
        f"pi4: the inventory says memory_mb 4096, the host has {4096 - headroom - 1} MB "
        f"(MemTotal): {headroom + 1} MB more than it has, beyond the memory fit's {headroom} MB "
        f"headroom; fix hosts.pi4.memory_mb (at most {4096 - headroom - 1})"]


def test_an_unreadable_host_is_refused(tmp_path):
    refusals, _ = resources.check("pi4", plan_for(tmp_path),
                                  resources.Resources(None, 4096, None, SYNCED))
    assert refusals and "could not read" in refusals[0]


def test_a_pi_without_time_sync_is_warned_unless_a_container_or_a_vps(tmp_path):
    pi = plan_for(tmp_path)
    _, warnings = resources.check("pi4", pi, resources.Resources(4, 4096, None, ()))
    assert len(warnings) == 1 and "no time sync service is enabled" in warnings[0]
    assert "apt-get install systemd-timesyncd" in warnings[0]
    # In a container the clock is the machine's; a VPS is not warned (it has a clock).
    assert resources.check("pi4", pi, resources.Resources(4, 4096, "systemd-nspawn", ())) == (
        [], [])
    vps = plan_for(tmp_path, profile="vps")
    assert resources.check("pi4", vps, resources.Resources(4, 4096, None, ())) == ([], [])


def local_deploy(tmp_path, memory_mb: int, cores: int,
                 arch: str = os.uname().machine) -> subprocess.CompletedProcess:
    """`pyinfra --dry` of deploys/fleet.py against this machine (@local), with a one-host plan.
    --dry: nothing is executed, and the refusal comes while pyinfra prepares operations."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"hosts": {"here": {
        "address": "127.0.0.1", "profile": "vps", "arch": arch,
        "memory_mb": memory_mb, "cores": cores}}}))
    inventory = tmp_path / "local_inventory.py"
    inventory.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from neverdark.inventory import validate\n"
        "from neverdark.plan import host_plan\n"
        f"hosts = [('@local', {{'neverdark': host_plan(validate({str(fleet)!r}, env={{}}), "
        "'here')})]\n")
    return subprocess.run([str(PYINFRA), "-y", "--dry", str(inventory), "deploys/fleet.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_pyinfra_stops_before_any_operation_on_a_host_with_fewer_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    ok = local_deploy(tmp_path, memory_mb=1024, cores=cores)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Ready: deploys/fleet.py" in ok.stdout + ok.stderr
    refused = local_deploy(tmp_path, memory_mb=1024, cores=cores + 1)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 1, out
    assert (f"@local: the inventory says cores {cores + 1}, the host runs on {cores} (nproc)"
            in out)
    assert "nothing was changed on this host" in out and "Ready:" not in out


def test_pyinfra_stops_on_memory_beyond_memtotal_and_the_headroom(tmp_path):
    real = memtotal_mb()
    # memory_mb M is refused when M - real exceeds the headroom, max(ceil(15% of M), 256): the
    # smallest such M (real / 0.85 + 2 is not always enough: 24151 MB gives 28414, whose
    # headroom rounds up to exactly the 4263 MB over).
    too_much = real + 1
    while too_much - real <= memory_fit.headroom_for(MemoryPolicy(), too_much):
        too_much += 1
    refused = local_deploy(tmp_path, memory_mb=too_much, cores=1)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 1, out
    assert f"@local: the inventory says memory_mb {too_much}, the host has {real} MB" in out
    warned = local_deploy(tmp_path, memory_mb=real + 10, cores=1)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert f"memory_mb {real + 10} is 10 MB above the host's MemTotal ({real} MB)" in (
        warned.stdout + warned.stderr)


def test_pyinfra_stops_on_a_host_of_another_arch_before_any_operation(tmp_path):
    other = {"x86_64": "aarch64", "aarch64": "x86_64"}[os.uname().machine]
    refused = local_deploy(tmp_path, memory_mb=1024, cores=1, arch=other)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 1, out
    assert (f"@local: the inventory says arch {other}, the host says {os.uname().machine!r} "
            "(uname -m): fix hosts.@local.arch" in out), out
    assert "nothing was changed on this host" in out and "Ready:" not in out
