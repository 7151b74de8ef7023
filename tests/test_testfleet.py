"""The test fleet harness on real hosts: nspawn containers with systemd and sshd.

Two hosts (a `vps` reached as root, a `pi` reached as `pi` with sudo), SSH with the run's keys and
strict host keys, pyinfra and testinfra through the generated files, the runner's file server
seen from inside a host, an offline pip install of Hermes from the served wheelhouse, stale-state
clearing after a killed run, and a destroy that leaves nothing behind.
"""

from __future__ import annotations

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
import testinfra

from neverdark import versions
from testbed import fleet as testfleet, wheelhouse

pytestmark = pytest.mark.fleet

HOSTS = [("vps1", "vps"), ("pi1", "pi")]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheels():
    return wheelhouse.ensure_default_wheelhouse()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, wheels):
    with testfleet.fleet_context(hosts=HOSTS, run_dir=tmp_path_factory.mktemp("fleet"),
                                 serve_dirs={"wheels": wheels}) as fleet:
        print(f"\ntestfleet: image {'cached' if fleet.timings['image_cached'] else 'built in %.1f s' % fleet.timings['image_build_s']}, "
              f"2 hosts up in {fleet.timings['up_s']:.1f} s")
        yield fleet


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
                      "known_hosts", "files_url"):
            assert field in h, (name, field)
    assert stat.S_IMODE(os.stat(fleet.hosts["vps1"]["key"]).st_mode) == 0o600
    config = fleet.ssh_config.read_text()
    assert "StrictHostKeyChecking yes" in config and "UserKnownHostsFile" in config


def test_ssh_as_root_on_vps(fleet):
    assert fleet.ssh("vps1", "id -un", as_root=False).strip() == "root"


def test_ssh_as_pi_with_passwordless_sudo(fleet):
    assert fleet.ssh("pi1", "id -un", as_root=False).strip() == "pi"
    assert fleet.ssh("pi1", "sudo -n id -u", as_root=False).strip() == "0"
    assert fleet.ssh("pi1", "id -u").strip() == "0"   # default: as root through sudo


def test_ssh_rejects_a_wrong_host_key(fleet, tmp_path):
    h = fleet.hosts["vps1"]
    bad = tmp_path / "known_hosts"
    other = Path(fleet.hosts["pi1"]["known_hosts"]).read_text().split(None, 1)[1]
    bad.write_text(f"{h['address']} {other}")
    proc = subprocess.run(["ssh", "-F", str(fleet.ssh_config), "-o",
                           f"UserKnownHostsFile={bad}", "vps1", "true"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0


def test_testinfra_sees_sshd_running(fleet):
    for name in fleet.hosts:
        host = testinfra.get_host(fleet.testinfra_url(name))
        assert host.service("ssh").is_running
        assert host.service("ssh").is_enabled
        assert host.socket("tcp://0.0.0.0:22").is_listening
        assert host.user().name == "root"       # sudo=true on the pi host


def test_pyinfra_runs_against_both_hosts(fleet):
    inventory = fleet.pyinfra_inventory_file()
    pyinfra = Path(sys.executable).with_name("pyinfra")
    proc = subprocess.run([str(pyinfra), "-y", str(inventory), "exec", "--",
                           "echo WHO=$(id -un)@$(hostname)"], capture_output=True, text=True,
                          timeout=120, cwd=fleet.run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "WHO=root@vps1" in out and "WHO=root@pi1" in out, out[-3000:]


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


def test_hosts_have_no_route_out(fleet):
    out = fleet.exec("vps1", "python3 -c 'import socket;s=socket.socket();s.settimeout(3);"
                             "print(s.connect_ex((\"1.1.1.1\", 80)))'").strip()
    assert out != "0"


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
    assert testfleet._nspawn_pids(prefix)            # the killed run's container still runs
    cleared = testfleet.clear_stale(log=print)
    assert run_id in cleared
    assert not testfleet._nspawn_pids(prefix)
    assert not [ln for ln in testfleet._links() if ln.startswith(f"ve-{prefix}")]
    assert not testfleet._mounts_under(tmp_path / "stale")
    assert not (tmp_path / "stale" / "hosts").exists()
    for name in fleet.hosts:                          # the live run is untouched
        assert fleet.is_alive(name)
    assert fleet.ssh("vps1", "true") == ""


def test_destroy_leaves_nothing_of_the_run(fleet):
    prefix = fleet.machine_prefix
    links = [h["link"] for h in fleet.hosts.values()]
    t = time.monotonic()
    fleet.destroy()
    print(f"\ndestroy (poweroff + cleanup) of 2 hosts: {time.monotonic() - t:.1f} s")
    assert fleet.leftovers() == {"links": [], "mounts": [], "processes": [], "roots": []}
    assert not set(links) & set(testfleet._links())
    assert not testfleet._nspawn_pids(prefix)
    assert not (testfleet.REGISTRY / f"{fleet.run_id}.json").exists()
    assert not (fleet.run_dir / "id_ed25519").exists()
