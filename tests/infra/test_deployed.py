"""What a deployed host must look like. Parametrised over every host in the inventory.

Names and paths come from neverdark.contract, the servers and ports from neverdark.topology: the
same sources the deploy itself uses."""

from __future__ import annotations

import hashlib
import json

from deploys import retired
from deploys.llama import LAUNCHER_DIR, LAUNCHER_SRC
from neverdark import artifacts, contract, memory_fit, plan, topology

# systemd's SD_MESSAGE_JOURNAL_USAGE: journald's "X Journal (...) is N, max M" message, with the
# limit it runs with in the MAX_USE field (bytes).
JOURNAL_USAGE_ID = "ec387f577b844b8fa948f33cad9a75e6"


def units(fleet, host_name):
    llama = [contract.llama_unit(s.model) for s in topology.llama_servers(fleet, host_name)]
    wizards = [contract.wizard_unit(w) for w in fleet.wizards_on(host_name)]
    sidecar = [contract.SIDECAR_UNIT] if wizards else []
    return llama + wizards + sidecar


def ports(fleet, host_name):
    found = [s.port for s in topology.llama_servers(fleet, host_name)]
    found += [fleet.wizards[w].api_port for w in fleet.wizards_on(host_name)]
    if fleet.wizards_on(host_name):
        found.append(fleet.sidecar.port)
    return found


def http(host, method, url, body=None, timeout=120, key_file=None):
    """A request sent from the host; `key_file`: a server's EnvironmentFile on the host, whose
    key goes in the Authorization header (read there, so it is never on a command line). An
    HTTP error comes back as its status."""
    script = ("import json,sys,urllib.request as u,urllib.error as e;"
              "h={'content-type':'application/json'};"
              "k=[l.split('=',1)[1].strip() for l in open(sys.argv[4]) if '=' in l] "
              "if sys.argv[4] else [];"
              "h.update({'Authorization':'Bearer '+k[0]} if k else {});"
              "r=u.Request(sys.argv[2],method=sys.argv[1],data=(sys.argv[3].encode() or None),"
              "headers=h)\n"
              "try: x=u.urlopen(r,timeout=%d);print(x.status);print(x.read().decode())\n"
              "except e.HTTPError as x: print(x.code);print(x.read().decode())" % timeout)
    out = host.check_output("python3 -c %s %s %s %s %s", script, method, url, body or "",
                            key_file or "")
    status, _, text = out.partition("\n")
    return int(status), text


def test_host_is_the_declared_architecture(host, fleet, host_name):
    """The kernel and the installed system both: a 32-bit userland under a 64-bit kernel could
    run neither the wheel nor the server."""
    arch = fleet.hosts[host_name].arch
    assert host.check_output("uname -m") == arch
    assert host.check_output("dpkg --print-architecture") == artifacts.arch_spec(arch).debian


_ELF = ("import sys;[print(p, int.from_bytes(open(p,'rb').read(20)[18:20],'little')) "
        "for p in sys.argv[1:]]")
_WHEEL = ("import importlib.metadata as m,json;d=m.distribution('llama_cpp_python');"
          "print(json.dumps({'tags':[l.split(': ',1)[1] for l in d.read_text('WHEEL').splitlines()"
          " if l.startswith('Tag:')],'url':json.loads(d.read_text('direct_url.json') or 'null'),"
          "'libs':[str(f.locate()) for f in d.files if '.so' in f.name]}))")


def elf_machines(host, paths) -> dict:
    out = host.check_output("python3 -c %s " + " ".join(["%s"] * len(paths)), _ELF, *paths)
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


def test_engines_are_built_for_the_hosts_arch(host, fleet, host_name):
    """The llama-cpp-python the host runs is the wheel built for its arch and uploaded by the
    deploy (platform tag, where pip took it from, the ELF machine of every library), and a
    native llama-server and its libraries are that arch's too."""
    arch = fleet.hosts[host_name].arch
    machine = artifacts.arch_spec(arch).e_machine   # ELF e_machine of that arch's code
    engines_used = {s.engine for s in topology.llama_servers(fleet, host_name)}
    if "llama-cpp-python" in engines_used:
        info = json.loads(host.check_output(f"{contract.venv('llama')}/bin/python -c %s", _WHEEL))
        assert info["tags"] == [f"py3-none-linux_{arch}"], info["tags"]
        assert info["url"]["url"].startswith(
            f"file://{contract.LLAMA_DIR}/{contract.LLAMA_WHEEL_PREFIX}"), info["url"]
        assert info["libs"] and set(elf_machines(host, info["libs"]).values()) == {machine}
    if "llama-server" in engines_used:
        build = host.file(contract.LLAMA_SERVER_LINK).linked_to
        names = host.check_output(f"ls {build}").split()
        found = elf_machines(host, [f"{build}/{n}" for n in names])
        assert "llama-server" in names and set(found.values()) == {machine}, found


def test_units_verify_enabled_and_running(host, fleet, host_name):
    for unit in units(fleet, host_name):
        svc = host.service(unit)
        assert svc.is_valid, f"{unit}: systemd-analyze verify failed"
        assert svc.is_enabled, f"{unit} not enabled"
        assert svc.is_running, f"{unit} not running"


def private_metrics(fleet, host_name) -> str | None:
    """The private address the sidecar also listens on (`sidecar: {metrics: private}`)."""
    if fleet.sidecar.metrics == "private" and fleet.wizards_on(host_name):
        return fleet.hosts[host_name].private_address
    return None


def test_ports_listen_on_loopback_only(host, fleet, host_name):
    """Every port on loopback, but a model server other hosts reach: on the host's private
    address, never on a public one or on every address; the sidecar's port also on the private
    address with metrics: private."""
    listening = host.socket.get_listening_sockets()
    private = private_metrics(fleet, host_name)
    where = {s.port: s.listen for s in topology.llama_servers(fleet, host_name)}
    for port in ports(fleet, host_name):
        address = where.get(port, contract.LOOPBACK)
        # (testinfra writes an IPv6 address unbracketed: tcp://fd00::1:8081)
        assert f"tcp://{address}:{port}" in listening, f"nothing on {address}:{port}"
        allowed = {f"tcp://{address}:{port}"}
        if private and port == fleet.sidecar.port:
            assert f"tcp://{private}:{port}" in listening, f"nothing on {private}:{port}"
            allowed.add(f"tcp://{private}:{port}")
        others = [s for s in listening if s.endswith(f":{port}") and s not in allowed]
        assert not others, f"port {port} also listens on {others}"


def test_metrics_token_file(host, fleet, host_name):
    """Made on the host, 0600, the sidecar user's; absent without metrics: private."""
    token = host.file(contract.METRICS_TOKEN_FILE)
    if not private_metrics(fleet, host_name):
        assert not token.exists
        return
    assert (token.user, token.group, token.mode) == (contract.SIDECAR_USER, contract.SIDECAR_USER,
                                                     0o600)
    assert int(host.check_output(f"wc -c < {contract.METRICS_TOKEN_FILE}")) >= 16


# Asks /metrics on the private address without a token, with a wrong one and with the host's
# own, and prints only the three status codes (the token stays on the host).
_TOKEN_PROBE = (
    "import sys,urllib.request as u,urllib.error as e\n"
    "def get(h):\n"
    "    try: return u.urlopen(u.Request(sys.argv[1],headers=h),timeout=30).status\n"
    "    except e.HTTPError as x: return x.code\n"
    "t=open(sys.argv[2]).read().strip()\n"
    "print(get({}),get({'Authorization':'Bearer wrong-token-0123456789'}),"
    "get({'Authorization':'Bearer '+t}))\n")


def test_private_metrics_want_the_token(host, fleet, host_name):
    private = private_metrics(fleet, host_name)
    if not private:
        return
    url = f"http://{private}:{fleet.sidecar.port}/metrics"
    out = host.check_output("python3 -c %s %s %s", _TOKEN_PROBE, url, contract.METRICS_TOKEN_FILE)
    assert out.split() == ["401", "401", "200"], out


def test_a_server_other_hosts_reach_refuses_a_request_without_its_key(host, fleet, host_name):
    """401 without the key (and with a wrong one); /health alone stays open."""
    for s in topology.llama_servers(fleet, host_name):
        if not s.key_file:
            continue
        key = host.file(s.key_file)
        assert (key.user, key.mode) == (contract.LLAMA_USER, 0o600)
        status, _ = http(host, "GET", f"{s.base_url}/models", timeout=10)
        assert status == 401, f"{s.model}: HTTP {status} without the key"
        status, _ = http(host, "GET", f"{contract.url_root(s.base_url)}/health", timeout=10)
        assert status == 200
        status, _ = http(host, "GET", f"{s.base_url}/models", timeout=10, key_file=s.key_file)
        assert status == 200, f"{s.model}: HTTP {status} with the key"
        pid = host.check_output(f"systemctl show -p MainPID --value {contract.llama_unit(s.model)}")
        argv = host.file(f"/proc/{pid}/cmdline").content_string
        assert "api-key" not in argv and "api_key" not in argv


def test_the_firewall_admits_only_the_fleet(host, fleet, host_name):
    """The table is loaded where a server is reached from other hosts, and absent elsewhere."""
    fw = plan.firewall_plan(fleet, host_name)
    loaded = host.run(f"nft list table inet {contract.FIREWALL_TABLE}")
    if fw is None:
        assert loaded.rc != 0, "a neverdark firewall table on a host that needs none"
        assert not host.file(contract.FIREWALL_RULES).exists
        return
    assert loaded.rc == 0, loaded.stderr
    assert host.service(contract.FIREWALL_UNIT).is_enabled
    for r in fw["rules"]:
        for a in r["ipv4"] + r["ipv6"]:
            assert a in loaded.stdout and f"dport {r['port']}" in loaded.stdout
        assert f"tcp dport {r['port']} drop" in loaded.stdout


def test_a_host_outside_the_fleet_cannot_connect(outsider, fleet, host_name):
    """With --outsider HOST (a testinfra host spec of a machine outside the fleet that can
    route to the private addresses): no model server answers it."""
    if outsider is None:
        return
    for s in topology.llama_servers(fleet, host_name):
        if s.listen == contract.LOOPBACK:
            continue
        probe = outsider.run("python3 -c %s %s %s", "import socket,sys;socket.create_connection("
                             "(sys.argv[1],int(sys.argv[2])),timeout=5)", s.listen, str(s.port))
        assert probe.rc != 0, f"{s.model} on {host_name} accepted a connection from outside"


def test_host_has_the_declared_cores_and_memory(host, fleet, host_name):
    """What the threads and the memory fit were computed from (the deploy refuses a host with
    fewer cores, or with memory_mb above MemTotal by more than the fit's headroom)."""
    h = fleet.hosts[host_name]
    assert int(host.check_output("env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc")) >= h.cores
    memtotal_kb = host.check_output("awk '$1 == \"MemTotal:\" {print $2}' /proc/meminfo")
    memtotal_mb = int(memtotal_kb) // 1024
    assert h.memory_mb - memtotal_mb <= memory_fit.headroom_mb(fleet, host_name)


def test_model_files_match_their_sha256(host, fleet, host_name):
    for name in fleet.local_models(host_name):
        sha = fleet.models[name].source.sha256
        link = host.file(contract.model_link(name))
        assert link.is_symlink and link.linked_to == contract.model_file(sha)
        model = host.file(contract.model_file(sha))
        assert model.sha256sum == sha
        # Written once: read-only to everyone (SD-card wear), root's; no staging copy left.
        assert (model.user, model.group, model.mode) == ("root", "root",
                                                         int(contract.MODEL_FILE_MODE, 8))
        assert not host.file(f"{contract.model_file(sha)}.upload").exists
        assert not host.file(f"{contract.model_file(sha)}.partial").exists


def test_journal_is_capped_on_pi_hosts(host, fleet, host_name):
    """Pi hosts: the drop-in is the plan's, and the running journald uses its limits (it was
    restarted after the file changed). Other hosts: no drop-in of ours."""
    dropin = host.file(contract.JOURNALD_DROPIN)
    if fleet.hosts[host_name].profile not in contract.JOURNALD_PROFILES:
        assert not dropin.exists
        return
    assert (dropin.user, dropin.group, dropin.mode) == ("root", "root", 0o644)
    assert dropin.content_string == plan.journald_dropin().content
    out = host.check_output(f"journalctl -b -o json --no-pager MESSAGE_ID={JOURNAL_USAGE_ID}")
    usage = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert usage, "journald logged no usage message this boot"
    last = usage[-1]
    key = "SystemMaxUse" if last["JOURNAL_NAME"].startswith("System") else "RuntimeMaxUse"
    assert int(last["MAX_USE"]) == _bytes(contract.JOURNALD_LIMITS[key]), last


def _bytes(size: str) -> int:
    return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[size[-1]]


def test_owners_and_modes(host, fleet, host_name):
    for w in fleet.wizards_on(host_name):
        user = contract.wizard_user(w)
        env = host.file(f"{contract.wizard_home(w)}/.env")
        assert (env.user, env.mode) == (user, 0o600)
        for b in fleet.wizards[w].backends:
            variant = host.file(contract.variant_path(w, b.name))
            assert (variant.user, variant.group, variant.mode) == (
                "root", contract.SIDECAR_USER, 0o640)
        managed = host.file(contract.wizard_managed_dir(w))
        assert (managed.user, managed.group, managed.mode) == (contract.SIDECAR_USER, user, 0o2750)
        active = host.file(contract.active_config(w))
        assert (active.user, active.group, active.mode) == (contract.SIDECAR_USER, user, 0o640)
    if fleet.wizards_on(host_name):
        secrets = host.file(contract.SIDECAR_ENV)
        assert (secrets.user, secrets.mode) == (contract.SIDECAR_USER, 0o600)
        sudoers = host.file(contract.SIDECAR_SUDOERS)
        assert (sudoers.user, sudoers.mode) == ("root", 0o440)


def test_sidecar_accepts_its_config(host, fleet, host_name):
    if not fleet.wizards_on(host_name):
        return
    out = host.check_output(f"sudo -u {contract.SIDECAR_USER} env PYTHONPATH={contract.SIDECAR_LIB} "
                            f"{contract.SIDECAR_PYTHON} -m sidecar --check --config "
                            f"{contract.SIDECAR_CONFIG}")
    assert "valid" in out


def test_llama_server_answers_a_real_completion(host, fleet, host_name):
    for s in topology.llama_servers(fleet, host_name):
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 4})
        status, text = http(host, "POST", f"{s.base_url}/chat/completions", body,
                            key_file=s.key_file)
        answer = json.loads(text)
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None
        assert answer["usage"]["completion_tokens"] >= 1


def test_each_gateway_health_answers(host, fleet, host_name):
    for w in fleet.wizards_on(host_name):
        port = fleet.wizards[w].api_port
        status, _ = http(host, "GET", f"{contract.loopback_url(port)}/health", timeout=10)
        assert status == 200


def test_each_llama_server_is_healthy(host, fleet, host_name):
    """/health answers without waiting for a generation, on both engines."""
    for s in topology.llama_servers(fleet, host_name):
        status, _ = http(host, "GET", f"{contract.url_root(s.base_url)}/health", timeout=10)
        assert status == 200


def test_the_llama_launcher_is_this_version_of_the_package(host, fleet, host_name):
    """llama-cpp-python's units run `python -m llama_launcher` from the package the deploy
    uploaded: the same modules, byte for byte, and no other."""
    if not any(s.engine == "llama-cpp-python" for s in topology.llama_servers(fleet, host_name)):
        assert not host.file(contract.LLAMA_LIB).exists
        return
    want = {m.name: hashlib.sha256(m.read_bytes()).hexdigest()
            for m in LAUNCHER_SRC.glob("*.py")}
    found = {n: host.file(f"{LAUNCHER_DIR}/{n}").sha256sum
             for n in host.check_output(f"ls {LAUNCHER_DIR}").split() if n.endswith(".py")}
    assert found == want


def test_nothing_of_the_retired_warmer_is_left(host, fleet, host_name):
    """Hosts deployed by an earlier version lose its prefix capture units and files on the
    next deploy (deploys/retired.py)."""
    units = host.check_output(f"ls {contract.UNIT_DIR}").split()
    assert not retired.prefix_units(units), units
    for path in (*retired.FILES, *retired.DIRS,
                 *(retired.prefix_dir(w) for w in fleet.wizards_on(host_name))):
        assert not host.file(path).exists, path


def test_native_llama_server_is_the_verified_build(host, fleet, host_name):
    servers = [s for s in topology.llama_servers(fleet, host_name) if s.engine == "llama-server"]
    if not servers:
        assert not host.file(contract.LLAMA_SERVER_LINK).exists
        return
    binary = host.file(f"{contract.LLAMA_SERVER_LINK}/llama-server")
    assert binary.exists and binary.mode & 0o111
    assert "0c1e570" in host.check_output(f"{binary.path} --version 2>&1")
    for s in servers:
        unit = host.check_output(f"systemctl cat {contract.llama_unit(s.model)}")
        assert f"--parallel {s.slots}" in unit and f"--ctx-size {s.n_ctx * s.slots}" in unit
