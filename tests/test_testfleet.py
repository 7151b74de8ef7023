"""The test fleet harness on real hosts: nspawn containers with systemd and sshd.

Two hosts (a `vps` reached as root, a `pi` reached as `pi` with sudo), SSH with the run's keys and
strict host keys, pyinfra and testinfra through the generated files, the runner's file server
seen from inside a host, an offline pip install of Hermes from the served wheelhouse, each host
held to its memory_mb (an overrun is killed, the host lives on), stale-state clearing after a
killed run, hosts reaching each other through the runner with their own addresses (and the
runner forwarding nothing else), and a destroy that leaves nothing behind. Then an aarch64 host
under qemu-user beside a native host and an outsider: boots, answers SSH as `pi` with sudo, runs
python3, admits with nftables only the host a test's inventory would list, and goes away without
a trace. Twenty light hosts boot in one run. Host specs and the test bed's wizards for any host
list are checked without booting anything.

Why one module: the tests share booted hosts (module-scoped fixtures: a boot takes seconds to
minutes, an aarch64 host under qemu-user longer); split, each file would boot its own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from types import SimpleNamespace
import testinfra

from neverdark import remote, status_read, versions
from neverdark.inventory import validate
from testbed import bed as testbed, fleet as testfleet, light_hosts, standin_sidecar, wheelhouse
from testbed.fleet import net as fleetnet

VPS1_MEMORY_MB = 1024   # small enough to overrun quickly; the default hosts have 4096
HOSTS = [testfleet.HostSpec("vps1", "vps", memory_mb=VPS1_MEMORY_MB), ("pi1", "pi")]
REPO = Path(__file__).resolve().parent.parent
NEVERDARK = Path(sys.executable).with_name("neverdark")
MiB = 2**20


# -- without booting -----------------------------------------------------------------------------

def test_host_specs_parse_with_arch_and_memory():
    native = testfleet.NATIVE_ARCH
    assert testfleet.HostSpec.parse("vps1:vps") == testfleet.HostSpec("vps1", "vps", native, 4096)
    assert testfleet.HostSpec.parse("pi1:pi:aarch64:2048") == testfleet.HostSpec(
        "pi1", "pi", "aarch64", 2048)
    assert testfleet.HostSpec.parse("vps2:vps:512").memory_mb == 512
    assert testfleet.HostSpec.of(("pi1", "pi")).arch == native
    assert testfleet.HostSpec.of({"name": "a1", "arch": "aarch64"}).emulated == (
        native != "aarch64")
    for bad, why in [("pi1:pi:arm64", "neither an arch"), ("Pi1:pi", "name"),
                     ("pi1:rpi", "profile"), ("pi1:pi:aarch64:32", "memory_mb"),
                     ("pi1:pi:aarch64:x86_64", "neither an arch")]:
        with pytest.raises(testfleet.FleetError, match=why):
            testfleet.HostSpec.parse(bad)


def test_image_cache_is_keyed_by_arch():
    assert testfleet.image_dir("aarch64") != testfleet.image_dir("x86_64")
    assert "-arm64-" in testfleet.image_dir("aarch64").name
    assert "-amd64-" in testfleet.image_dir("x86_64").name


def _bed_without_fleet(tmp_path, hosts):
    """A Testbed's wizard builder with LLMock records (not started: only URLs are needed)."""
    bed = testbed.Testbed(tmp_path, hosts=hosts)
    for spec in bed.host_specs:
        for kind in ("anthropic", "openai", "google"):
            bed.mocks[f"{spec.name}/{kind}"] = SimpleNamespace(host="10.213.9.1", port=9,
                                                               url="http://10.213.9.1:9")
    bed.telegram = type("T", (), {"url": "http://10.213.9.1:9/bot"})()
    return bed


def test_inotify_limit_is_raised_for_the_hosts_to_come_and_never_lowered(tmp_path):
    """The per-user inotify limit that killed h18's PID 1 in CI is raised before a boot."""
    from testbed.fleet import limits
    knob = tmp_path / "max_user_instances"
    knob.write_text("128\n")
    in_use = limits.inotify_instances_in_use()
    assert in_use >= 0
    raised = limits.ensure_inotify_for(20, knob)
    assert raised >= 20 * limits.PER_HOST + in_use and int(knob.read_text()) == raised
    knob.write_text("1000000\n")
    assert limits.ensure_inotify_for(20, knob) == 1000000 and knob.read_text() == "1000000\n"


def test_inotify_limit_that_cannot_be_raised_names_the_sysctl(tmp_path):
    from testbed.fleet import limits

    class ReadOnly(type(tmp_path)):
        def write_text(self, *a, **kw):
            raise PermissionError("read-only file system")
    knob = tmp_path / "knob"
    knob.write_text("128\n")
    with pytest.raises(testfleet.FleetError, match=r"sysctl -w fs.inotify.max_user_instances=\d+"):
        limits.ensure_inotify_for(20, ReadOnly(knob))


def test_default_hosts_keep_the_default_wizards(tmp_path):
    wizards = _bed_without_fleet(tmp_path, testbed.HOSTS).default_wizards()
    assert {w: wz["host"] for w, wz in wizards.items()} == {
        "merlin": "vps1", "gandalf": "vps1", "radagast": "pi1"}
    assert [b.get("name") for b in wizards["gandalf"]["backends"]] == ["claude", "gpt-4.1", "local"]


def test_any_host_list_gets_one_wizard_per_host(tmp_path):
    hosts = [f"vps{i}:vps:2048" for i in range(1, 6)] + ["pi9:pi:aarch64"]
    bed = _bed_without_fleet(tmp_path, hosts)
    wizards = bed.default_wizards()
    assert {w: wz["host"] for w, wz in wizards.items()} == {
        s.name: s.name for s in bed.host_specs}
    assert [b["name"] for b in wizards["vps3"]["backends"]] == ["claude", "local"]
    assert [b["name"] for b in wizards["pi9"]["backends"]] == ["local", "gemini"]
    assert bed.host_specs[-1] == testfleet.HostSpec("pi9", "pi", "aarch64", 4096)


# -- the fleet -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels():
    return wheelhouse.ensure_default_wheelhouse()


def _forwarding() -> dict[str, str]:
    """The runner's IPv4 forwarding switches: the global one and each interface's."""
    conf = Path("/proc/sys/net/ipv4/conf")
    return {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            **{d.name: (d / "forwarding").read_text().strip() for d in conf.iterdir()
               if (d / "forwarding").exists()}}


@pytest.fixture(scope="module")
def forwarding_before():
    """The runner's forwarding switches before this module boots anything."""
    return _forwarding()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, wheels, forwarding_before):
    with testfleet.fleet_context(hosts=HOSTS, run_dir=tmp_path_factory.mktemp("fleet"),
                                 serve_dirs={"wheels": wheels}) as fleet:
        print(f"\ntestfleet: image {'cached' if fleet.timings['image_cached'] else 'built in %.1f s' % fleet.timings['image_build_s']}, "
              f"2 hosts up in {fleet.timings['up_s']:.1f} s")
        yield fleet


@pytest.mark.fleet
def test_two_hosts_up_with_outputs(fleet):
    assert fleet.timings["up_s"] < 120
    assert set(fleet.hosts) == {"vps1", "pi1"}
    for name, h in fleet.hosts.items():
        assert h["system_state"] in ("running", "degraded")
        assert fleet.exec(name, "systemctl is-system-running || true").strip() in (
            "running", "degraded")
        assert fleet.exec(name, "hostname").strip() == name
    # distinct /30s; the runner's end and the host's end in the same one
    nets = {h["address"].rsplit(".", 1)[0] + "." + str(int(h["address"].rsplit(".", 1)[1]) & ~3)
            for h in fleet.hosts.values()}
    assert len(nets) == 2
    # unique machine ids and host keys
    ids = {fleet.exec(n, "cat /etc/machine-id").strip() for n in fleet.hosts}
    assert len(ids) == 2
    keys = {Path(h["known_hosts"]).read_text().split()[-1] for h in fleet.hosts.values()}
    assert len(keys) == 2
    saved = json.loads((fleet.run_dir / "hosts.json").read_text())
    for name, h in saved.items():
        for field in ("address", "runner_address", "user", "port", "key", "profile", "pid",
                      "known_hosts", "files_url", "arch", "memory_mb", "cgroup"):
            assert field in h, (name, field)
    assert stat.S_IMODE(os.stat(fleet.hosts["vps1"]["key"]).st_mode) == 0o600
    config = fleet.ssh_config.read_text()
    assert "StrictHostKeyChecking yes" in config and "UserKnownHostsFile" in config


@pytest.mark.fleet
def test_ssh_as_root_on_vps(fleet):
    assert fleet.ssh("vps1", "id -un", as_root=False).strip() == "root"


@pytest.mark.fleet
def test_ssh_as_pi_with_passwordless_sudo(fleet):
    assert fleet.ssh("pi1", "id -un", as_root=False).strip() == "pi"
    assert fleet.ssh("pi1", "sudo -n id -u", as_root=False).strip() == "0"
    assert fleet.ssh("pi1", "id -u").strip() == "0"   # default: as root through sudo


@pytest.mark.fleet
def test_ssh_rejects_a_wrong_host_key(fleet, tmp_path):
    h = fleet.hosts["vps1"]
    bad = tmp_path / "known_hosts"
    other = Path(fleet.hosts["pi1"]["known_hosts"]).read_text().split(None, 1)[1]
    bad.write_text(f"{h['address']} {other}")
    proc = subprocess.run(["ssh", "-F", str(fleet.ssh_config), "-o",
                           f"UserKnownHostsFile={bad}", "vps1", "true"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0


@pytest.mark.fleet
def test_testinfra_sees_sshd_running(fleet):
    for name in fleet.hosts:
        host = testinfra.get_host(fleet.testinfra_url(name))
        assert host.service("ssh").is_running
        assert host.service("ssh").is_enabled
        assert host.socket("tcp://0.0.0.0:22").is_listening
        assert host.user().name == "root"       # sudo=true on the pi host


@pytest.mark.fleet
def test_pyinfra_runs_against_both_hosts(fleet):
    inventory = fleet.pyinfra_inventory_file()
    pyinfra = Path(sys.executable).with_name("pyinfra")
    proc = subprocess.run([str(pyinfra), "-y", str(inventory), "exec", "--",
                           "echo WHO=$(id -un)@$(hostname)"], capture_output=True, text=True,
                          timeout=120, cwd=fleet.run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "WHO=root@vps1" in out and "WHO=root@pi1" in out, out[-3000:]


@pytest.mark.fleet
def test_pyinfra_python_api_fact(fleet):
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all
    from pyinfra.facts.server import Hostname, Which

    inv = Inventory((fleet.pyinfra_inventory(), {}))
    state = State(inv, Config())
    connect_all(state)
    try:
        for name in fleet.hosts:
            host = inv.get_host(name)
            assert host.get_fact(Hostname) == name
            for tool in ("python3", "sha256sum", "sudo", "ss", "systemctl"):
                assert host.get_fact(Which, command=tool), (name, tool)
    finally:
        for host in inv:
            host.disconnect()


@pytest.mark.fleet
def test_hosts_reach_the_runner_file_server(fleet):
    marker = fleet.served_dir("wheels") / "marker.txt"
    marker.write_text("served to the hosts\n")
    for name in fleet.hosts:
        url = fleet.files_url(name)
        assert url.startswith(f"http://{fleet.runner_address(name)}:")
        got = fleet.ssh(name, "python3 -c 'import sys,urllib.request as u;"
                              "print(u.urlopen(sys.argv[1],timeout=10).read().decode())' "
                              f"{url}/wheels/marker.txt", as_root=False)
        assert got.strip() == "served to the hosts"
        listing = fleet.exec(name, "python3 -c 'import sys,urllib.request as u;"
                                   "print(u.urlopen(sys.argv[1],timeout=10).read().decode())' "
                                   f"{url}/wheels/")
        assert f"hermes_agent-{versions.HERMES_VERSION}-" in listing and "marker.txt" in listing
    # the run's layer never writes into the shared source dir
    assert not (Path(fleet.serve_dirs["wheels"]) / "marker.txt").exists()
    # bound to the hosts' links only, not to every address of the runner
    import socket
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", fleet.files_port), 2):
        pass


@pytest.mark.fleet
def test_hosts_have_no_route_out(fleet):
    out = fleet.exec("vps1", "python3 -c 'import socket;s=socket.socket();s.settimeout(3);"
                             "print(s.connect_ex((\"1.1.1.1\", 80)))'").strip()
    assert out != "0"


@pytest.mark.fleet
def test_offline_pip_install_of_hermes_and_llama(fleet, record_property):
    """The deploy's real installs, from the served wheelhouse only (no index, no internet)."""
    host = fleet.hosts["pi1"]
    links = f"{fleet.files_url('pi1')}/wheels/"
    # pip ignores plain-http find-links on a host other than localhost without --trusted-host
    pip = (f"--no-index --trusted-host {host['runner_address']} --find-links {links}")
    t = time.monotonic()
    fleet.ssh("pi1", f"python3 -m venv /opt/t/hermes && /opt/t/hermes/bin/pip install -q {pip} "
                     f"'{versions.HERMES_REQUIREMENTS[0]}'", timeout=900)
    hermes_s = time.monotonic() - t
    record_property("hermes_pip_install_s", round(hermes_s, 1))
    print(f"\npip install {versions.HERMES_REQUIREMENTS[0]} inside a host: {hermes_s:.1f} s")
    assert fleet.ssh("pi1", "/opt/t/hermes/bin/python -c 'import aiohttp, anthropic, "
                            "importlib.metadata as m; print(m.version(\"hermes-agent\"))'"
                     ).strip() == versions.HERMES_VERSION
    t = time.monotonic()
    fleet.ssh("pi1", f"python3 -m venv /opt/t/llama && /opt/t/llama/bin/pip install -q {pip} "
                     f"'{versions.LLAMA_REQUIREMENTS[0]}' httpx pyyaml", timeout=900)
    print(f"pip install {versions.LLAMA_REQUIREMENTS[0]} inside a host: "
          f"{time.monotonic() - t:.1f} s")
    # imports libllama.so (needs libgomp1 in the image) and the server's dependencies
    assert fleet.ssh("pi1", "/opt/t/llama/bin/python -c 'import llama_cpp, llama_cpp.server.app;"
                            "print(llama_cpp.__version__)'").strip() == versions.LLAMA_VERSION


# A TCP server on a host that answers each connection with the address it came from, for
# `count` connections or `seconds`, whichever comes first.
PEER_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
s.settimeout(float(sys.argv[3]))
for _ in range(int(sys.argv[2])):
    c, peer = s.accept()
    c.sendall(peer[0].encode())
    c.close()
"""
# A client: what the server answered, or the error's name (ConnectionRefusedError, timeout...).
PEER_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(64).decode())
except OSError as e:
    print(type(e).__name__)
"""


def serve_peers(fleet, name: str, port: int, count: int, seconds: int = 120) -> None:
    fleet.exec(name, "cat > /tmp/peer_server.py", input=PEER_SERVER)
    fleet.exec(name, f"nohup python3 /tmp/peer_server.py {port} {count} {seconds} "
                     "</dev/null >/tmp/peer_server.log 2>&1 &")
    deadline = time.monotonic() + 60          # an emulated python3 takes seconds to start
    while f":{port} " not in fleet.exec(name, "ss -ltnH"):
        assert time.monotonic() < deadline, fleet.exec(name, "cat /tmp/peer_server.log")
        time.sleep(0.3)


def connect(fleet, name: str, address: str, port: int) -> str:
    """Connect from host `name` to address:port; what the server saw as our address, or the
    error's name."""
    fleet.exec(name, "cat > /tmp/peer_client.py", input=PEER_CLIENT)
    return fleet.exec(name, f"python3 /tmp/peer_client.py {address} {port}", timeout=120).strip()


def route_from_link(fleet, name: str, destination: str) -> subprocess.CompletedProcess:
    """The runner's routing decision for a packet from host `name` (arriving on its link) to
    `destination`: a lookup in the kernel, nothing is sent."""
    h = fleet.hosts[name]
    return subprocess.run(["ip", "route", "get", destination, "from", h["address"], "iif",
                           h["link"]], capture_output=True, text=True)


@pytest.mark.fleet
def test_hosts_reach_each_other_with_their_own_addresses(fleet):
    """Host to host through the runner, both ways, each seen at its own address (no NAT)."""
    serve_peers(fleet, "pi1", 7070, count=1)
    assert connect(fleet, "vps1", fleet.address("pi1"), 7070) == fleet.address("vps1")
    serve_peers(fleet, "vps1", 7071, count=1)
    assert connect(fleet, "pi1", fleet.address("vps1"), 7071) == fleet.address("pi1")
    for name, h in fleet.hosts.items():
        routes = fleet.exec(name, "ip -4 route show")
        assert f"{fleet.subnet} via {h['runner_address']} dev host0" in routes, routes
        assert "default" not in routes, routes                 # still no way out


@pytest.mark.fleet
def test_runner_forwards_only_within_the_run(fleet, forwarding_before):
    """Forwarding is on for the run's links only, and what they carry goes to the run's hosts
    only: another run's /24, the runner's uplink or any other address is refused (even for a
    host that sets a default route itself). Checked as the kernel's routing decisions."""
    now = _forwarding()
    links = {h["link"] for h in fleet.hosts.values()}
    assert all(now[link] == "1" for link in links)
    assert now["ip_forward"] == forwarding_before["ip_forward"]
    for switch, before in forwarding_before.items():   # "all", "default", the uplink...
        if switch in now:
            assert now[switch] == before, switch
    ok = route_from_link(fleet, "vps1", fleet.address("pi1"))
    assert ok.returncode == 0 and f"dev {fleet.hosts['pi1']['link']}" in ok.stdout, ok
    other_run = str(next(n for n in testfleet.NET.subnets(new_prefix=24)
                         if str(n) != fleet.subnet).network_address + 2)
    unassigned = str(ipaddress.ip_network(fleet.subnet).network_address + 250)
    for destination in (other_run, unassigned, "203.0.113.7", "192.0.2.1", "1.1.1.1"):
        refused = route_from_link(fleet, "vps1", destination)
        assert refused.returncode != 0, (destination, refused.stdout)
    # What the runner itself reaches on a link (the file server, stand-ins) is still delivered.
    local = route_from_link(fleet, "pi1", fleet.runner_address("vps1"))
    assert local.returncode == 0 and local.stdout.startswith("local "), local


# Touches every page (b"x" * n writes n bytes), so all of it is really charged.
ALLOCATE = "import sys; b = b'x' * (int(sys.argv[1]) * 2**20); print(len(b))\n"


def allocate(fleet, name: str, mb: int) -> str:
    """Allocate `mb` MB in a python3 on the host, over SSH as root; its output."""
    fleet.ssh(name, "cat > /tmp/allocate.py", input=ALLOCATE)
    return fleet.ssh(name, f"python3 /tmp/allocate.py {mb}").strip()


@pytest.mark.fleet
def test_memory_peak_is_real(fleet):
    """A 300 MB allocation inside the host shows in the host's peak, not in another host's."""
    assert fleet.memory_limit("vps1") == VPS1_MEMORY_MB * MiB
    assert fleet.memory_limit("pi1") == testfleet.DEFAULT_MEMORY_MB * MiB
    base = fleet.memory_usage("vps1")
    assert 5 * MiB < base < 600 * MiB, base          # systemd, journald, sshd, dbus, caches
    fleet.reset_memory_peak("vps1")
    fleet.reset_memory_peak("pi1")
    pi_peak = fleet.memory_peak("pi1")
    assert allocate(fleet, "vps1", 300) == str(300 * MiB)
    peak = fleet.memory_peak("vps1")
    assert base + 290 * MiB < peak < fleet.memory_limit("vps1"), (base, peak)
    assert fleet.memory_usage("vps1") < peak - 250 * MiB    # freed when the process exited
    assert fleet.memory_peak("pi1") < pi_peak + 100 * MiB
    assert fleet.oom_events("vps1")["oom_kill"] == 0


@pytest.mark.fleet
def test_memory_overrun_is_killed_and_the_host_lives_on(fleet):
    before = fleet.oom_events("vps1")
    allocate(fleet, "vps1", 1)
    # Detached from the SSH session: at the limit, the session's sshd may fail an allocation of
    # its own and drop the connection (seen: ssh exit 255) even though only python3 is killed.
    fleet.ssh("vps1", "rm -f /tmp/oom.rc; nohup sh -c 'python3 /tmp/allocate.py "
                      f"{VPS1_MEMORY_MB + 200}; echo $? > /tmp/oom.rc' "
                      "</dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 60
    while not fleet.ssh("vps1", "cat /tmp/oom.rc 2>/dev/null || true").strip():
        assert time.monotonic() < deadline, "the allocation neither finished nor was killed"
        time.sleep(0.5)
    assert fleet.ssh("vps1", "cat /tmp/oom.rc").strip() == str(128 + signal.SIGKILL)
    after = fleet.oom_events("vps1")
    assert after["oom_kill"] == before["oom_kill"] + 1, after
    assert after["under_oom"] == 0
    assert fleet.memory_peak("vps1") > fleet.memory_limit("vps1") - 64 * MiB
    # the host is fine: systemd and sshd alive, a new allocation within the limit works
    assert fleet.is_alive("vps1")
    assert fleet.ssh("vps1", "systemctl is-active ssh").strip() == "active"
    assert fleet.ssh("vps1", "systemctl is-system-running || true").strip() in (
        "running", "degraded")
    assert allocate(fleet, "vps1", 100) == str(100 * MiB)
    assert fleet.oom_events("pi1")["oom_kill"] == 0
    # what runs through nsenter is charged to the host too
    with pytest.raises(testfleet.FleetError):
        fleet.exec("vps1", f"python3 /tmp/allocate.py {VPS1_MEMORY_MB + 200}", timeout=120)
    assert fleet.oom_events("vps1")["oom_kill"] == before["oom_kill"] + 2


@pytest.mark.fleet
def test_stale_run_of_a_killed_owner_is_cleared(fleet, tmp_path):
    """A run whose owner died (SIGKILL: no cleanup) is cleared by the next harness start, and
    the live fleet of this module is left alone."""
    script = textwrap.dedent(f"""
        import sys, time
        from testbed import fleet as testfleet
        f = testfleet.FleetContext({str(tmp_path / 'stale')!r}, [("vps9", "vps")])
        f.up()
        print("UP", f.run_id, flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, start_new_session=True)
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["UP"], line
        run_id = line[1]
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
    prefix = f"{testfleet.PREFIX}{run_id}-"
    # the child ran in our memory cgroup, so its run's cgroup is beside ours
    cgroup = (testfleet._memory_cgroup_of_runner()
              / f"{testfleet.CGROUP_PREFIX}{testfleet.PREFIX}{run_id}")
    assert testfleet._nspawn_pids(prefix)            # the killed run's container still runs
    assert (cgroup / "vps9").is_dir()
    assert fleetnet.leftovers(run_id)                 # its routing rule and table
    cleared = testfleet.clear_stale(log=print)
    assert run_id in cleared
    assert not fleetnet.leftovers(run_id)
    assert not testfleet._nspawn_pids(prefix)
    assert not cgroup.exists()
    assert not [ln for ln in testfleet._links() if ln.startswith(f"ve-{prefix}")]
    assert not testfleet._mounts_under(tmp_path / "stale")
    assert not (tmp_path / "stale" / "hosts").exists()
    for name in fleet.hosts:                          # the live run is untouched
        assert fleet.is_alive(name)
    assert fleetnet.leftovers(fleet.run_id)           # (its routing too)
    assert fleet.ssh("vps1", "true") == ""


def _logins(fleet, name: str) -> int:
    """How many SSH logins the host's sshd has accepted (its journal)."""
    return int(fleet.exec(name, "journalctl -u ssh --no-pager -o cat | "
                                "grep -c '^Accepted publickey' || true").strip())


@pytest.mark.fleet
def test_status_reads_keep_one_connection_per_host(fleet, tmp_path, monkeypatch):
    """`neverdark status` against real sshd, as root and as a Pi's `pi`: the first run logs in
    once a host and keeps the connection; the next runs over it with no new login, no ssh
    process and no command on the host (a forwarded channel to the sidecar); the host
    dropping it (its sshd's sessions killed) costs no answer; closed, the connection is gone."""
    runtime = Path(f"/tmp/nd-kept-{fleet.run_id}")       # a socket path has at most 107 bytes
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv(remote.REUSE_ENV, raising=False)
    names = list(fleet.hosts)
    for i, name in enumerate(names):
        light_hosts.install_standin(fleet, name, {"interval": 2, "wizards": {
            light_hosts.wizard_name(i): standin_sidecar.wizard(["claude", "local"])}})
    inv = light_hosts.inventory(fleet, names, tmp_path / "fleet.yaml")
    inv_fleet = validate(inv, env=os.environ)

    def status() -> dict:
        proc = subprocess.run([str(NEVERDARK), "status", "--json", "--inventory", str(inv)],
                              capture_output=True, text=True, timeout=120)
        snap = json.loads(proc.stdout)
        assert snap["summary"]["unreachable"] == 0, snap["hosts"]
        return snap

    try:
        before = {n: _logins(fleet, n) for n in names}
        status()
        opened = {n: _logins(fleet, n) for n in names}
        assert opened == {n: before[n] + 1 for n in names}
        for name in names:
            sock = remote.control_path(inv_fleet, name)
            assert sock.parent == runtime / f"neverdark-ssh-{os.getuid()}"
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
            assert stat.S_ISSOCK(sock.stat().st_mode)
        status()
        # over the kept connections the CLI starts no ssh at all (neverdark.ssh_mux): an ssh
        # that only fails stands first on PATH, and every host still answers
        no_ssh = tmp_path / "no-ssh"
        no_ssh.mkdir()
        (no_ssh / "ssh").write_text("#!/bin/sh\necho 'ssh must not run' >&2\nexit 255\n")
        (no_ssh / "ssh").chmod(0o755)
        with monkeypatch.context() as m:
            m.setenv("PATH", f"{no_ssh}:{os.environ['PATH']}")
            status()
        # and the host runs no command for it: /status (with the host's memory) comes through
        # a forwarded channel of the kept connection, sshd to the sidecar's loopback port
        def no_command(host, command, timeout):
            raise AssertionError(f"{host}: the read command ran")
        reports = status_read.collect(inv_fleet, transport=no_command,
                                     forward=status_read.ssh_forward(inv_fleet))
        for name in names:
            total_kb = fleet.exec(name, "awk '$1 == \"MemTotal:\" {print $2}' /proc/meminfo")
            assert reports[name].error is None and reports[name].status["wizards"], name
            assert reports[name].mem_total == int(total_kb) * 1024
        assert {n: _logins(fleet, n) for n in names} == opened      # no new login
        for name in names:          # the host drops it: its sessions' sshd processes killed
            fleet.exec(name, "pkill -f '^sshd: (root|pi)[ @]' || true")
        status()                    # answered: over a new connection, or the one retry
        status()
        for name in names:
            assert remote.close_kept(inv_fleet, name)
            assert not remote.control_path(inv_fleet, name).exists()
    finally:
        for name in names:
            remote.close_kept(inv_fleet, name)
            fleet.exec(name, "systemctl stop neverdark-sidecar || true")
        subprocess.run(["rm", "-rf", str(runtime)], check=False)


@pytest.mark.fleet
def test_destroy_leaves_nothing_of_the_run(fleet):
    prefix = fleet.machine_prefix
    links = [h["link"] for h in fleet.hosts.values()]
    t = time.monotonic()
    fleet.destroy()
    print(f"\ndestroy (poweroff + cleanup) of 2 hosts: {time.monotonic() - t:.1f} s")
    assert fleet.leftovers() == {"links": [], "mounts": [], "processes": [], "roots": [],
                                 "cgroups": [], "routing": []}
    assert not set(links) & set(testfleet._links())
    assert not testfleet._nspawn_pids(prefix)
    assert not (testfleet.REGISTRY / f"{fleet.run_id}.json").exists()
    assert not (fleet.run_dir / "id_ed25519").exists()


# -- an aarch64 host (qemu-user), a native host and an outsider ----------------------------------

ARM_MEMORY_MB = 1536


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    """One emulated Raspberry Pi (aarch64 Debian 12, the `pi` user with sudo), a native VPS and
    an outsider: a host of the run that no inventory lists (issue 17's cross-host layout). After
    the x86 fleet of this module is destroyed: the two never run at once."""
    with testfleet.fleet_context(hosts=[f"arm1:pi:aarch64:{ARM_MEMORY_MB}", "vps2:vps:512",
                                        "out1:vps:256"],
                                 run_dir=tmp_path_factory.mktemp("arm")) as fleet:
        t = fleet.timings
        print(f"\ntestfleet aarch64: image "
              f"{'cached' if t['image_cached'] else 'built in %.1f s' % t['image_build_s']}, "
              f"up in {t['up_s']:.1f} s, boot to SSH {t['ready_s:arm1']:.1f} s")
        yield fleet


@pytest.mark.fleet
def test_aarch64_host_boots_and_answers_as_pi(arm):
    h = arm.hosts["arm1"]
    assert h["arch"] == "aarch64" and h["emulated"] == (testfleet.NATIVE_ARCH != "aarch64")
    assert arm.ssh("arm1", "uname -m", as_root=False).strip() == "aarch64"
    assert arm.ssh("arm1", "id -un", as_root=False).strip() == "pi"
    assert arm.ssh("arm1", "sudo -n id -u", as_root=False).strip() == "0"
    assert arm.ssh("arm1", "python3 -c 'import platform, sys; "
                           "print(platform.machine(), sys.version_info[:2])'",
                   as_root=False).strip() == "aarch64 (3, 11)"
    # the credential units run (drop-ins), so nothing failed
    assert arm.ssh("arm1", "systemctl is-system-running || systemctl --failed --plain"
                   ).strip() == "running"
    assert arm.ssh("arm1", "dpkg --print-architecture").strip() == "arm64"


@pytest.mark.fleet
def test_aarch64_host_is_held_to_its_memory(arm):
    assert arm.memory_limit("arm1") == ARM_MEMORY_MB * MiB
    base = arm.memory_usage("arm1")
    assert 5 * MiB < base < ARM_MEMORY_MB * MiB
    arm.reset_memory_peak("arm1")
    assert allocate(arm, "arm1", 200) == str(200 * MiB)             # an emulated python3
    assert arm.memory_peak("arm1") > base + 190 * MiB


# Admits the port to the fleet's own hosts (by their addresses, not the run's /24, which the
# outsider shares) and refuses everyone else at once.
NFT_ADMIT = """
table inet neverdark_test {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport %(port)d ip saddr { %(admitted)s } accept
        tcp dport %(port)d reject with tcp reset
    }
}
"""


@pytest.mark.fleet
def test_firewall_on_the_emulated_pi_refuses_the_outsider(arm):
    """nftables on the aarch64 host (under qemu-user) admits the fleet's host and refuses the
    outsider, which reaches the port the moment the rule goes: it was the firewall."""
    pi = arm.address("arm1")
    arm.ssh("arm1", "nft -f -", input=NFT_ADMIT % {"port": 7072, "admitted": arm.address("vps2")})
    assert "neverdark_test" in arm.ssh("arm1", "nft list tables")
    serve_peers(arm, "arm1", 7072, count=2)
    assert connect(arm, "vps2", pi, 7072) == arm.address("vps2")
    assert connect(arm, "out1", pi, 7072) == "ConnectionRefusedError"
    arm.ssh("arm1", "nft delete table inet neverdark_test")
    assert connect(arm, "out1", pi, 7072) == arm.address("out1")


@pytest.mark.fleet
def test_aarch64_teardown_leaves_nothing(arm, capsys):
    pid1, cgroup = arm.hosts["arm1"]["pid1"], Path(arm.hosts["arm1"]["cgroup"])
    t = time.monotonic()
    arm.destroy()
    took = time.monotonic() - t
    # powered off from inside, in time: not killed (a SIGTERM would have sent it to rescue mode)
    assert "killing it" not in capsys.readouterr().err
    print(f"\ndestroy of an aarch64 host: {took:.1f} s")
    assert arm.leftovers() == {"links": [], "mounts": [], "processes": [], "roots": [],
                               "cgroups": [], "routing": []}
    assert not cgroup.exists() and not Path(f"/proc/{pid1}").exists()
    assert not (testfleet.REGISTRY / f"{arm.run_id}.json").exists()


# -- many light hosts (issue 18's status benchmark) --------------------------------------------

MANY = 20


@pytest.mark.fleet
def test_twenty_light_hosts_in_one_run(tmp_path):
    """Twenty 256 MB hosts boot in one run, each with systemd and sshd answering the run's key,
    each at an address of its own that the others reach; destroy leaves nothing."""
    specs = [f"h{i:02d}:vps:256" for i in range(MANY)]
    with testfleet.fleet_context(hosts=specs, run_dir=tmp_path / "many") as many:
        used = sum(many.memory_usage(n) for n in many.hosts)
        print(f"\n{MANY} light hosts up in {many.timings['up_s']:.1f} s; memory "
              f"{used / MiB:.0f} MB in all ({used / MiB / MANY:.0f} MB a host); slowest boot to "
              f"SSH {max(many.timings[f'ready_s:{n}'] for n in many.hosts):.1f} s")
        assert len(many.hosts) == MANY
        assert len({h["address"] for h in many.hosts.values()}) == MANY
        for name, h in many.hosts.items():
            assert h["system_state"] in ("running", "degraded"), name
            assert many.ssh(name, "hostname").strip() == name
            assert many.memory_limit(name) == 256 * MiB
        first, last = specs[0].split(":")[0], specs[-1].split(":")[0]
        serve_peers(many, last, 7073, count=1)
        assert connect(many, first, many.address(last), 7073) == many.address(first)
        many.destroy()
        assert many.leftovers() == {"links": [], "mounts": [], "processes": [], "roots": [],
                                    "cgroups": [], "routing": []}
