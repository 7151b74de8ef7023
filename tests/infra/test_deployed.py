"""What a deployed host must look like. Parametrised over every host in the inventory."""

from __future__ import annotations

import json

MODELS = "/var/lib/neverdark/models"


def units(fleet, host_name):
    out = [s.model for s in fleet.llama_servers(host_name)]
    llama = [f"neverdark-llama-{m}.service" for m in out]
    wizards = [f"neverdark-wizard-{w}.service" for w in fleet.wizards_on(host_name)]
    sidecar = ["neverdark-sidecar.service"] if wizards else []
    return llama + wizards + sidecar


def ports(fleet, host_name):
    found = [s.port for s in fleet.llama_servers(host_name)]
    found += [fleet.wizards[w].api_port for w in fleet.wizards_on(host_name)]
    if fleet.wizards_on(host_name):
        found.append(fleet.sidecar.port)
    return found


def http(host, method, url, body=None, timeout=120):
    script = ("import json,sys,urllib.request as u;"
              "r=u.Request(sys.argv[2],method=sys.argv[1],data=(sys.argv[3].encode() or None),"
              "headers={'content-type':'application/json'});"
              "x=u.urlopen(r,timeout=%d);print(x.status);print(x.read().decode())" % timeout)
    out = host.check_output("python3 -c %s %s %s %s", script, method, url, body or "")
    status, _, text = out.partition("\n")
    return int(status), text


def test_units_verify_enabled_and_running(host, fleet, host_name):
    for unit in units(fleet, host_name):
        svc = host.service(unit)
        assert svc.is_valid, f"{unit}: systemd-analyze verify failed"
        assert svc.is_enabled, f"{unit} not enabled"
        assert svc.is_running, f"{unit} not running"


def test_ports_listen_on_loopback_only(host, fleet, host_name):
    listening = host.socket.get_listening_sockets()
    for port in ports(fleet, host_name):
        assert f"tcp://127.0.0.1:{port}" in listening, f"nothing on 127.0.0.1:{port}"
        others = [s for s in listening if s.endswith(f":{port}") and "127.0.0.1" not in s]
        assert not others, f"port {port} also listens on {others}"


def test_model_files_match_their_sha256(host, fleet, host_name):
    for name in fleet.local_models(host_name):
        sha = fleet.models[name].source.sha256
        link = host.file(f"{MODELS}/{name}.gguf")
        assert link.is_symlink and link.linked_to == f"{MODELS}/{sha}.gguf"
        assert host.file(f"{MODELS}/{sha}.gguf").sha256sum == sha


def test_owners_and_modes(host, fleet, host_name):
    for w in fleet.wizards_on(host_name):
        user = f"hermes-{w}"
        env = host.file(f"/var/lib/neverdark/wizards/{w}/home/.env")
        assert (env.user, env.mode) == (user, 0o600)
        for b in fleet.wizards[w].backends:
            variant = host.file(f"/etc/neverdark/wizards/{w}/backends/{b.name}.yaml")
            assert (variant.user, variant.group, variant.mode) == ("root", user, 0o640)
        active = host.file(f"/var/lib/neverdark/wizards/{w}/managed/config.yaml")
        assert (active.user, active.group, active.mode) == ("neverdark-sidecar", user, 0o640)
    if fleet.wizards_on(host_name):
        secrets = host.file("/etc/neverdark/sidecar.env")
        assert (secrets.user, secrets.mode) == ("neverdark-sidecar", 0o600)
        sudoers = host.file("/etc/sudoers.d/neverdark-sidecar")
        assert (sudoers.user, sudoers.mode) == ("root", 0o440)


def test_llama_server_answers_a_real_completion(host, fleet, host_name):
    for s in fleet.llama_servers(host_name):
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                           "max_tokens": 4})
        status, text = http(host, "POST", f"http://127.0.0.1:{s.port}/v1/chat/completions", body)
        answer = json.loads(text)
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None
        assert answer["usage"]["completion_tokens"] >= 1


def test_each_gateway_health_answers(host, fleet, host_name):
    for w in fleet.wizards_on(host_name):
        port = fleet.wizards[w].api_port
        status, _ = http(host, "GET", f"http://127.0.0.1:{port}/health", timeout=10)
        assert status == 200
