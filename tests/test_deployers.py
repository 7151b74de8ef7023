"""The deployers' declarations (deploys/deployer.py), without a host: what each deployer creates
when enabled and what the same declaration removes when disabled, and in which order.

The pyinfra operations are replaced by a recorder, so the deployers' own code runs, stage by
stage, as `deploys/fleet.py` runs it, and the operations it asks for are checked. The fleet
tests (tests/test_fleet_deploy.py) run the same code against real hosts.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import yaml

from deploys import base, deployer, firewall, hermes, llama, models, retired, sidecar, stages
from neverdark import contract, plan
from neverdark.inventory import validate

DATA = Path(__file__).parent / "data" / "inventories"


class Op:
    def __init__(self, kind: str, kwargs: dict) -> None:
        self.kind, self.kwargs = kind, kwargs
        self.name = kwargs.get("name", "")

    def did_change(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{self.kind}({self.name!r})"


class Recorder:
    """Stands in for pyinfra's operation modules and deploys.ops; reads of the host say it has
    nothing."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def module(self, prefix: str):
        rec = self

        class Module:
            def __getattr__(self, fn: str):
                if fn == "listed_names":
                    return lambda *a, **k: []
                if fn == "host_has_file":
                    return lambda *a, **k: False

                def operation(*args, **kwargs):
                    op = Op(f"{prefix}.{fn}", kwargs)
                    rec.ops.append(op)
                    return op
                return operation
        return Module()

    def of(self, who: str) -> list[Op]:
        return [op for op in self.ops if op.name.startswith(f"{who}: ")]


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    for mod in (deployer, base, firewall, hermes, llama, models, retired, sidecar, stages):
        for attr in ("files", "server", "systemd", "pip", "apt", "ops"):
            if hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, rec.module(attr))
        if hasattr(mod, "each"):
            monkeypatch.setattr(mod, "each", list)
    monkeypatch.setattr(deployer, "no_diff", contextlib.nullcontext)
    return rec


def host_plan(tmp_path: Path, drop: tuple[str, ...] = (), host: str = "vps.fra-1",
              metrics: str | None = None) -> dict:
    doc = yaml.safe_load((DATA / "contract_names.yaml").read_text())
    for wizard in drop:
        del doc["wizards"][wizard]
    if metrics:
        doc["sidecar"]["metrics"] = metrics
        for h in doc["hosts"].values():
            h["private_address"] = h["address"]
    shutil.copy(DATA / "contract_names.env", tmp_path)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return plan.host_plan(validate(tmp_path / "fleet.yaml", env={}), host)


def run(deployers) -> None:
    """Every stage, as deploys/fleet.py runs them, less the base and the models (which read
    the host)."""
    stages.run([d for d in deployers
                if not isinstance(d, (base.BaseDeployer, models.ModelsDeployer))])


def index(ops: list[Op], kind: str, **match) -> int:
    for i, op in enumerate(ops):
        if op.kind == kind and all(op.kwargs.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {kind} {match} in {ops}")


def test_every_upload_lies_within_its_deployers_declaration(tmp_path):
    p = host_plan(tmp_path)
    for d in stages.host_deployers(p):
        if d.enabled:
            owns = d.owns()
            assert all(owns.covers(f.path) for f in d.uploads()), d.name
    outside = sidecar.SidecarDeployer(p)
    outside.files = lambda: [plan.File("/etc/neverdark/elsewhere.yaml", "")]
    with pytest.raises(RuntimeError, match="outside what it declares"):
        outside.uploads()


def test_a_removed_wizard_declares_what_the_deployed_one_installed(tmp_path):
    """A wizard gone from the inventory has no plan: its removal is built from its name, and
    it is the deployed wizard's own declaration."""
    p = host_plan(tmp_path)
    w = p["hermes"]["wizards"][0]
    deployed = hermes.WizardDeployer(p, w["name"], w).owns()
    assert hermes.WizardDeployer(p, w["name"], enabled=False).owns() == deployed
    server = p["llama"]["servers"][0]
    assert llama.LlamaServerDeployer(p, None, server["unit"], enabled=False).owns() == \
        llama.LlamaServerDeployer(p, server, server["unit"]).owns()


def test_users_are_created_once_each(tmp_path, recorder):
    p = host_plan(tmp_path)
    run(stages.host_deployers(p))
    users = [op.kwargs["user"] for op in recorder.ops if op.kind == "server.user"]
    assert sorted(users) == sorted({*users}), users
    assert contract.SIDECAR_USER in users and contract.LLAMA_USER in users
    sidecar_user = next(op for op in recorder.ops if op.kind == "server.user"
                        and op.kwargs["user"] == contract.SIDECAR_USER)
    assert set(sidecar_user.kwargs["groups"]) == {contract.OPS_GROUP, "systemd-journal"}
    # Every user exists before any directory names it (a wizard's managed dir is the
    # sidecar's, and the sidecar comes after the wizards).
    first_dir = index(recorder.ops, "files.directory",
                      path=contract.wizard_managed_dir(p["hermes"]["wizards"][0]["name"]))
    assert all(i < first_dir for i, op in enumerate(recorder.ops) if op.kind == "server.user")


def test_a_wizard_gone_from_the_inventory_is_removed_and_archived(tmp_path, recorder):
    p = host_plan(tmp_path, drop=("merlin",))
    run(stages.host_deployers(p, stale_wizards=["merlin"]))
    ops = recorder.of("wizard merlin")
    assert not [op for op in ops if op.kind == "files.put"], ops
    unit = contract.wizard_unit("merlin")
    stop = index(ops, "systemd.service", service=unit, running=False)
    unit_gone = index(ops, "files.file", path=f"{contract.UNIT_DIR}/{unit}", present=False)
    user_gone = index(ops, "server.user", user="hermes-merlin", present=False)
    archived = index(ops, "ops.archive_directory", path=contract.wizard_var("merlin"))
    etc_gone = index(ops, "files.directory", path=contract.wizard_etc("merlin"), present=False)
    assert stop < unit_gone < user_gone < archived < etc_gone
    assert any(op.kind == "systemd.daemon_reload" for op in ops[unit_gone:user_gone])
    # Nothing of its data is deleted: home and managed dir go with the archive.
    deleted = [op.kwargs["path"] for op in ops
               if op.kind == "files.directory" and op.kwargs.get("present") is False]
    assert deleted == [contract.wizard_etc("merlin")], deleted


def test_a_model_no_longer_used_loses_its_server(tmp_path, recorder):
    p = host_plan(tmp_path)
    old = contract.llama_unit("old-model")
    run(stages.host_deployers(p, stale_llama_units=[old]))
    ops = recorder.of("llama server old-model")
    assert [op.kind for op in ops] == ["systemd.service", "files.file", "systemd.daemon_reload",
                                       "files.file"], ops
    assert ops[1].kwargs["path"] == f"{contract.UNIT_DIR}/{old}"
    # and its key, had other hosts reached it (docs/crosshost.md)
    assert ops[3].kwargs == {"name": "llama server old-model: remove "
                                     "/etc/neverdark/llama/old-model.env",
                             "path": contract.llama_key_file("old-model"), "present": False}


def test_a_host_without_wizards_has_its_sidecar_hermes_and_engines_removed(tmp_path, recorder):
    p = host_plan(tmp_path, drop=("saruman",), host="cloud-only")
    deployers = stages.host_deployers(p)
    run(deployers)
    assert not [op for op in recorder.ops if op.kind in ("files.put", "server.user")
                and op.kwargs.get("present", True)], recorder.ops
    ops = recorder.of("sidecar")
    removed = {op.kwargs["path"] for op in ops if op.kind in ("files.file", "files.directory")}
    assert removed == {f"{contract.UNIT_DIR}/{contract.SIDECAR_UNIT}", contract.SIDECAR_CONFIG,
                       contract.SIDECAR_ENV, sidecar.SUDOERS_STAGED, contract.SIDECAR_SUDOERS,
                       contract.SIDECAR_DIR, contract.SIDECAR_STATE_DIR,
                       contract.METRICS_TOKEN_FILE, contract.MODEL_CHECK_DIR}
    assert index(ops, "systemd.service", service=contract.SIDECAR_UNIT, running=False) < \
        index(ops, "server.user", user=contract.SIDECAR_USER, present=False)
    index(ops, "server.group", group=contract.OPS_GROUP, present=False)
    index(recorder.of("hermes"), "files.directory", path=contract.HERMES_DIR, present=False)
    engine = recorder.of("llama")
    index(engine, "files.directory", path=contract.LLAMA_DIR, present=False)
    index(engine, "server.user", user=contract.LLAMA_USER, present=False)


def test_the_journal_drop_in_is_removed_off_a_pi(tmp_path, recorder):
    p = host_plan(tmp_path)   # a vps
    run(stages.host_deployers(p))
    ops = recorder.of("journald")
    remove = index(ops, "files.file", path=contract.JOURNALD_DROPIN, present=False)
    assert remove < index(ops, "systemd.service", service=base.JOURNALD, restarted=True)


def test_private_metrics_make_the_token_on_the_host_before_the_sidecar_reloads(tmp_path,
                                                                              recorder):
    p = host_plan(tmp_path, metrics="private")
    assert f"private_listen: 10.0.0.1:{contract.SIDECAR_PORT}" in p["sidecar"]["config"].content
    run(stages.host_deployers(p))
    ops = recorder.of("sidecar")
    made = index(ops, "ops.token_if_missing", path=contract.METRICS_TOKEN_FILE,
                 user=contract.SIDECAR_USER)
    mode = index(ops, "ops.file_mode", path=contract.METRICS_TOKEN_FILE, mode="0600")
    started = next(i for i, op in enumerate(ops) if op.kind == "systemd.service"
                   and op.kwargs.get("service") == contract.SIDECAR_UNIT)
    assert made < mode < started


def test_loopback_metrics_make_no_token_and_remove_one_left_by_private(tmp_path, recorder):
    run(stages.host_deployers(host_plan(tmp_path)))
    assert not [op for op in recorder.ops if op.kind == "ops.token_if_missing"]
    # a host deployed with metrics: private before keeps no token (tests/infra checks it)
    index(recorder.of("sidecar"), "files.file", path=contract.METRICS_TOKEN_FILE, present=False)


def test_the_token_command_prints_nothing_and_leaves_a_0600_file(tmp_path):
    import os
    import pwd
    import subprocess
    from deploys import ops as real_ops
    path = tmp_path / "metrics.token"
    user = pwd.getpwuid(os.getuid()).pw_name
    proc = subprocess.run(["sh", "-c", real_ops.token_command(str(path), user)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0 and "\n" not in token
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "metrics.token.new").exists()
    assert token not in real_ops.token_command(str(path), user)


@pytest.mark.parametrize("found, makes", [(None, True), ({"size": 0}, True),
                                          ({"size": contract.METRICS_TOKEN_MIN - 1}, True),
                                          ({"size": 64}, False)])
def test_a_missing_or_torn_token_is_made_again(monkeypatch, found, makes):
    """A token cut short (a power cut before its data reached the disk) is one the sidecar
    refuses: the deploy makes a new one rather than keeping it forever."""
    from deploys import ops as real_ops
    noted = []
    from types import SimpleNamespace
    monkeypatch.setattr(real_ops, "host", SimpleNamespace(get_fact=lambda fact, path: found,
                                                          noop=noted.append))
    commands = list(real_ops.token_if_missing._inner(contract.METRICS_TOKEN_FILE, "nd"))
    assert bool(commands) == makes and bool(noted) != makes
