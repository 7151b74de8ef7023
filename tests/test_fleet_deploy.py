"""The deploy kit on the real test fleet: two nspawn hosts over SSH, the exact operator command.

Order matters and is part of the story: a fresh deploy, a no-op re-run, a wizard added and
removed, a corrupt model download, an invalid inventory. One fleet serves the whole module
because bringing it up and deploying it is the expensive part (the `bed` and `first_deploy`
fixtures in conftest.py; tests/test_fleet_drills.py runs on the same fleet afterwards).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import testinfra

from deploys import retired
from neverdark import contract
from testbed.bed import GEMMA_SHA256

pytestmark = pytest.mark.fleet


def pids(bed, host: str) -> dict[str, str]:
    out = bed.ssh(host, "for u in $(systemctl list-units --type=service --plain --no-legend "
                        "'neverdark-*' | awk '$3 != \"inactive\" {print $1}'); do echo $u "
                        "$(systemctl show -p MainPID --value $u); done")
    return dict(line.split() for line in out.splitlines() if line.strip())


def gateway_health(bed, host: str, port: int) -> int:
    return int(bed.ssh(host, f"python3 -c 'import urllib.request;print(urllib.request.urlopen("
                             f"\"http://127.0.0.1:{port}/health\", timeout=5).status)'").strip())


def test_fresh_deploy_runs_every_component(bed, first_deploy):
    assert first_deploy.changed > 0 and first_deploy.errors == 0
    vps = pids(bed, "vps1")
    assert {"neverdark-llama-gemma3-270m.service", "neverdark-wizard-merlin.service",
            "neverdark-wizard-gandalf.service", "neverdark-sidecar.service"} <= set(vps)
    pi = pids(bed, "pi1")
    assert {"neverdark-llama-gemma3-270m.service", "neverdark-wizard-radagast.service",
            "neverdark-sidecar.service"} <= set(pi)
    assert all(pid != "0" for pid in [*vps.values(), *pi.values()])


def test_second_deploy_changes_nothing(bed, first_deploy):
    again = bed.deploy()
    assert again.rc == 0, again.output[-4000:]
    assert again.changed == 0, f"changed on re-run: {again.changed_ops}"


def test_testinfra_suite_passes_against_the_fleet(bed, first_deploy):
    """The operator-facing testinfra checks, pointed at the test fleet's SSH config."""
    proc = bed.testinfra()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_local_model_keeps_the_system_prompt(bed, first_deploy):
    """chatml, not gemma: a system message reaches the model (gemma would drop it)."""
    script = ("import json,urllib.request as u\n"
              "def n(msgs):\n"
              " r=u.Request('http://127.0.0.1:8081/v1/chat/completions',"
              "data=json.dumps({'messages':msgs,'max_tokens':1}).encode(),"
              "headers={'content-type':'application/json'})\n"
              " return json.load(u.urlopen(r,timeout=120))['usage']['prompt_tokens']\n"
              "sysm={'role':'system','content':'MARKER-PERSONA-MERLIN '*20}\n"
              "user={'role':'user','content':'hi'}\n"
              "print(n([sysm,user])-n([user]))\n")
    grew = int(bed.ssh("vps1", f"python3 -c {shlex.quote(script)}").strip())
    assert grew >= 40, f"system message added only {grew} prompt tokens"


def test_adding_a_wizard_touches_only_that_wizard(bed, first_deploy):
    before = {h: pids(bed, h) for h in ("vps1", "pi1")}
    wizards = bed.default_wizards()
    # Cloud-only on purpose: a wizard that also falls back onto vps1's model server resizes
    # that server's prompt cache (one cached Hermes prefix per sharing wizard), which restarts it.
    wizards["morgana"] = {"host": "vps1", "backends": [
        bed.cloud("gpt-4.1", "vps1", "openai", "gpt-4.1-mini"),
        bed.cloud("claude", "vps1", "anthropic", "claude-haiku-4-5")]}
    bed.write_inventory(wizards)
    try:
        result = bed.deploy()
        assert result.rc == 0, result.output[-6000:]
        assert result.changed > 0
        after = {h: pids(bed, h) for h in ("vps1", "pi1")}
        assert "neverdark-wizard-morgana.service" in after["vps1"]
        # Nothing restarts, the sidecar included: it learns the new wizard by a reload.
        for host in before:
            for unit, pid in before[host].items():
                assert after[host].get(unit) == pid, f"{host} {unit} restarted"
        status = bed.sidecar_status("vps1")["wizards"]
        assert "morgana" in status and {"merlin", "gandalf"} <= set(status)
        unrelated = [op for op in result.changed_ops if "morgana" not in op
                     and "sidecar" not in op.lower()]
        assert not unrelated, f"ops outside morgana changed: {unrelated}"
    finally:
        bed.write_inventory(bed.default_wizards())


def test_removing_a_wizard_archives_its_data(bed, first_deploy):
    assert "neverdark-wizard-morgana.service" in pids(bed, "vps1"), "runs after the add test"
    bed.write_inventory(bed.default_wizards())  # morgana gone
    result = bed.deploy()
    assert result.rc == 0, result.output[-6000:]
    vps = bed.fleet.hosts["vps1"]
    host = testinfra.get_host(f"ssh://{vps['user']}@{vps['address']}",
                              ssh_identity_file=vps["key"],
                              ssh_extra_args=f"-o UserKnownHostsFile={vps['known_hosts']}")
    assert not host.file("/etc/systemd/system/neverdark-wizard-morgana.service").exists
    assert not host.file("/etc/neverdark/wizards/morgana").exists
    assert not host.file("/var/lib/neverdark/wizards/morgana").exists
    archived = bed.ssh("vps1", "ls /var/lib/neverdark/archive").split()
    assert any(a.startswith("morgana-") for a in archived), archived
    assert "neverdark-wizard-morgana.service" not in pids(bed, "vps1")
    assert bed.deploy().changed == 0


# What a host deployed by the version with the prompt-prefix warmer had beside what it still has
# (the units as that version rendered them, less their comments).
WARMER_ERA = {
    f"{contract.UNIT_DIR}/neverdark-prefix-merlin.service":
        "[Unit]\nDescription=neverdark: capture wizard merlin's local prompt prefix\n"
        "[Service]\nType=oneshot\nUser=hermes-merlin\nGroup=hermes-merlin\n"
        "RuntimeDirectory=neverdark-prefix-merlin\nExecStart=-/bin/true\n",
    f"{contract.UNIT_DIR}/neverdark-prefix-merlin.timer":
        "[Unit]\nDescription=neverdark: nightly capture of wizard merlin's local prompt prefix\n"
        "[Timer]\nOnCalendar=*-*-* 00:00:30\nPersistent=true\n"
        "Unit=neverdark-prefix-merlin.service\n[Install]\nWantedBy=timers.target\n",
    f"{retired.prefix_dir('merlin')}/local.json": '{"model": "gemma3-270m", "messages": []}\n',
    retired.PREFIX_SCRIPT: "# capture\n",
    retired.SERVE_PY: "# the single-file launcher\n",
    f"{retired.LLAMA_STATE_DIR}/gemma3-270m/server.json": '{"engine": "llama-cpp-python"}\n',
    f"{retired.LLAMA_STATE_DIR}/gemma3-270m/merlin.prefix": "kv",
}


def test_a_host_from_the_warmer_era_is_cleaned_up_by_the_deploy(bed, first_deploy):
    """The warmer's capture service and its running timer are stopped, disabled and removed,
    with the captured prompts, the model servers' kept prefixes, server.json and the old
    launcher; nothing else restarts, and a second deploy changes nothing."""
    for path, text in WARMER_ERA.items():
        bed.ssh("vps1", f"mkdir -p {shlex.quote(str(Path(path).parent))} && "
                        f"printf %s {shlex.quote(text)} > {shlex.quote(path)}")
    bed.ssh("vps1", "systemctl daemon-reload && systemctl enable --now neverdark-prefix-merlin.timer")
    assert bed.ssh("vps1", "systemctl is-active neverdark-prefix-merlin.timer").strip() == "active"
    before = pids(bed, "vps1")
    result = bed.deploy()
    assert result.rc == 0, result.output[-6000:]
    assert all(op.startswith("retired") for op in result.changed_ops), result.changed_ops
    assert pids(bed, "vps1") == before
    left = bed.ssh("vps1", "ls -d " + " ".join(shlex.quote(p) for p in WARMER_ERA)
                   + f" {retired.LLAMA_STATE_DIR} {retired.prefix_dir('merlin')} 2>/dev/null; "
                   "systemctl list-unit-files --no-legend 'neverdark-prefix-*'; "
                   "systemctl list-units --all --no-legend 'neverdark-prefix-*'", check=False)
    assert left.strip() == "", left
    assert bed.deploy().changed == 0


def test_corrupt_model_download_keeps_the_old_model_serving(bed, first_deploy):
    files_dir = bed.fleet.served_dir("wheels")
    corrupt = Path(files_dir) / "gemma-next.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 4096)
    new_sha = "0" * 63 + "1"   # the release the operator expected; the bytes do not match it
    models = {"gemma3-270m": {
        "source": {"url": f"{bed.fleet.files_url('vps1')}/wheels/gemma-next.gguf",
                   "sha256": new_sha},
        "size_mb": 253, "server": {"threads": 2},
        "kv": {"layers": 18, "kv_heads": 1, "head_dim": 256, "sliding_window_layers": 15,
               "sliding_window": 512}}}
    before = pids(bed, "vps1")["neverdark-llama-gemma3-270m.service"]
    path = bed.write_inventory(bed.default_wizards(), models, bed.run_dir / "corrupt.yaml")
    result = bed.deploy(path)
    assert result.rc != 0 and "sha256 mismatch" in result.output
    target = bed.ssh("vps1", "readlink /var/lib/neverdark/models/gemma3-270m.gguf").strip()
    assert target.endswith(f"{GEMMA_SHA256}.gguf")
    assert bed.ssh("vps1", f"ls /var/lib/neverdark/models/ | grep -c {new_sha} || true").strip() == "0"
    assert pids(bed, "vps1")["neverdark-llama-gemma3-270m.service"] == before
    models_list = bed.ssh("vps1", "python3 -c 'import urllib.request;print(urllib.request."
                                  "urlopen(\"http://127.0.0.1:8081/v1/models\").read().decode())'")
    assert "gemma3-270m" in models_list
    assert bed.deploy().changed == 0   # the good inventory still converges to no changes


@pytest.mark.parametrize("breakage", ["unknown-host", "directory", "empty"])
def test_invalid_inventory_touches_no_host(bed, first_deploy, breakage, tmp_path):
    marker = bed.ssh("vps1", "stat -c %Y /etc/neverdark/sidecar.yaml").strip()
    if breakage == "directory":
        path = tmp_path
    elif breakage == "empty":
        path = tmp_path / "empty.yaml"
        path.write_text("hosts: {}\n")
    else:
        inv = bed.inventory(bed.default_wizards())
        inv["wizards"]["merlin"]["host"] = "nowhere"
        path = tmp_path / "bad.yaml"
        import yaml
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
    result = bed.deploy(path)
    assert result.rc != 0
    assert "neverdark:" in result.output
    if breakage == "unknown-host":
        assert "wizards.merlin.host" in result.output and "bad.yaml:" in result.output
    assert "Connecting" not in result.output and "Starting operation" not in result.output
    assert bed.ssh("vps1", "stat -c %Y /etc/neverdark/sidecar.yaml").strip() == marker


def test_secrets_stay_out_of_output_and_world_readable_files(bed, first_deploy):
    again = bed.deploy()
    for value in bed.secrets.values():
        assert value not in again.output and value not in first_deploy.output
    for host in ("vps1", "pi1"):
        for value in bed.secrets.values():
            hits = bed.ssh(host, f"grep -rlsF {shlex.quote(value)} /etc /opt/neverdark "
                                 "/var/lib/neverdark || true").split()
            for path in hits:
                mode_owner = bed.ssh(host, f"stat -c '%a %U' {shlex.quote(path)}").split()
                assert mode_owner[0] == "600", f"{host}:{path} holds a secret with mode {mode_owner}"


def neverdark_cli(bed, *args: str) -> dict:
    proc = bed.neverdark(*args)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def active_of(bed, host: str, wizard: str) -> str:
    return bed.sidecar_status(host)["wizards"][wizard]["active"]


def test_a_deploy_keeps_a_wizard_on_its_fallback(bed, first_deploy):
    """Operator drill through the control socket (a verified switch: a real turn on Gemma),
    then a deploy: the wizard stays on its fallback, and nothing changes."""
    bed.write_inventory(bed.default_wizards())
    answer = neverdark_cli(bed, "pin", "merlin", "--to", "local")
    assert answer["ok"], answer
    assert active_of(bed, "vps1", "merlin") == "local"
    variant = bed.ssh("vps1", "cat /etc/neverdark/wizards/merlin/backends/local.yaml")
    assert bed.ssh("vps1", "cat /var/lib/neverdark/wizards/merlin/managed/config.yaml") == variant
    assert bed.ssh("vps1", "systemctl is-active neverdark-wizard-merlin").strip() == "active"
    result = bed.deploy()
    assert result.rc == 0 and result.changed == 0, result.changed_ops
    assert active_of(bed, "vps1", "merlin") == "local"
    assert bed.ssh("vps1", "cat /var/lib/neverdark/wizards/merlin/managed/config.yaml") == variant
    assert neverdark_cli(bed, "release", "merlin")["ok"]
    back = neverdark_cli(bed, "failover", "merlin", "--to", "claude")
    assert back["ok"] and back["active"] == "claude", back


def test_two_uploaded_models_on_one_host_converge(bed, first_deploy, tmp_path):
    """Two models uploaded from the operator's machine to one host: the second run changes
    nothing (each upload's check must look at its own model), and dropping the second model
    removes its server with the same deployer, disabled."""
    import hashlib
    import shutil
    second = tmp_path / "gemma-b.gguf"
    shutil.copyfile(bed.gguf_path(), second)
    with open(second, "ab") as f:   # a different file that llama.cpp still loads
        f.write(b"\0" * 4096 + b"neverdark: a second model")
    sha = hashlib.sha256(second.read_bytes()).hexdigest()
    models = bed.default_models()
    models["gemma-b"] = {**models["gemma3-270m"], "source": {"file": str(second), "sha256": sha}}
    wizards = bed.default_wizards()
    wizards["saruman"] = {"host": "vps1", "backends": [
        bed.cloud("claude", "vps1", "anthropic", "claude-haiku-4-5"),
        {"name": "local-b", "local": "gemma-b", "max_tokens": 64}]}
    path = bed.write_inventory(wizards, models, bed.run_dir / "two-models.yaml")
    try:
        result = bed.deploy(path)
        assert result.rc == 0, result.output[-6000:]
        assert "neverdark-llama-gemma-b.service" in pids(bed, "vps1")
        again = bed.deploy(path)
        assert again.rc == 0 and again.changed == 0, again.changed_ops
    finally:
        restored = bed.deploy()
    assert restored.rc == 0, restored.output[-6000:]
    assert "neverdark-llama-gemma-b.service" not in pids(bed, "vps1")
    assert "neverdark-wizard-saruman.service" not in pids(bed, "vps1")
    assert bed.deploy().changed == 0
