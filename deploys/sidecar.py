"""The sidecar: this repo's `sidecar` package, its generated config, secrets and unit."""

from __future__ import annotations

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from deploys import ops
from deploys.common import REPO, component_venv, no_diff, plan, system_user, template

BASE = "/opt/neverdark/sidecar"
UNIT = "neverdark-sidecar.service"


@deploy("neverdark sidecar: install")
def install():
    server.group(name="operators group (control socket)", group="neverdark-ops", system=True)
    system_user("neverdark-sidecar")
    reqs = component_venv("sidecar", plan()["sidecar"]["requirements"])
    code = files.sync(name="sidecar code", src=str(REPO / "sidecar"), dest=f"{BASE}/lib/sidecar",
                      mode="0644", dir_mode="0755", delete=True, exclude=["*.pyc"],
                      exclude_dir=["__pycache__"])
    return reqs, code


@deploy("neverdark sidecar: configure and activate")
def configure_and_activate(install_changes, variant_ops):
    p = plan()["sidecar"]
    # Wizard groups let it read each wizard's variants, never its .env (0600); neverdark-ops
    # lets it hand its control socket to the operators; systemd-journal lets it read the
    # gateways' logged provider errors (Hermes keeps its own log directory 0700).
    groups = [w["user"] for w in plan()["hermes"]["wizards"]] + ["neverdark-ops", "systemd-journal"]
    member = system_user("neverdark-sidecar", groups=groups, label="sidecar reads wizard variants")
    files.directory(name="sidecar state", path="/var/lib/neverdark/sidecar/state",
                    user="neverdark-sidecar", group="neverdark-sidecar", mode="0700")
    config = files.put(name="sidecar config", src=StringIO(p["config"]),
                       dest="/etc/neverdark/sidecar.yaml", user="root",
                       group="neverdark-sidecar", mode="0640")
    with no_diff():
        secrets = files.put(name="sidecar secrets (probe keys)", src=StringIO(p["env"]),
                            dest="/etc/neverdark/sidecar.env", user="neverdark-sidecar",
                            group="neverdark-sidecar", mode="0600")
    files.template(name="sidecar sudoers (staged)", src=template("sidecar", "sudoers.j2"),
                   dest="/etc/neverdark/sidecar.sudoers", mode="0440", units=p["units"])
    sudoers = ops.install_if_valid(name="sidecar may restart its gateways only",
                                   source="/etc/neverdark/sidecar.sudoers",
                                   dest="/etc/sudoers.d/neverdark-sidecar",
                                   check="visudo -cqf", mode="0440")
    unit = files.template(name=f"unit {UNIT}", src=template("sidecar", "neverdark-sidecar.service.j2"),
                          dest=f"/etc/systemd/system/{UNIT}", mode="0644",
                          watchdog_sec=p["watchdog_sec"])
    systemd.daemon_reload(name="daemon-reload (sidecar)", _if=unit.did_change)
    systemd.service(name=f"restart {UNIT} (its inputs changed)", service=UNIT, restarted=True,
                    _if=any_changed(unit, config, secrets, sudoers, member, *install_changes,
                                    *variant_ops))
    systemd.service(name=f"run {UNIT}", service=UNIT, running=True, enabled=True)


def deploy_sidecar(install_changes, variant_ops):
    configure_and_activate(install_changes, variant_ops)


@deploy("neverdark sidecar: remove (no wizard on this host)")
def remove():
    systemd.service(name=f"stop {UNIT}", service=UNIT, running=False, enabled=False)
    unit = files.file(name=f"remove {UNIT}", path=f"/etc/systemd/system/{UNIT}", present=False)
    systemd.daemon_reload(name="daemon-reload (sidecar removed)", _if=unit.did_change)
    for path in ("/etc/sudoers.d/neverdark-sidecar", "/etc/neverdark/sidecar.sudoers",
                 "/etc/neverdark/sidecar.yaml", "/etc/neverdark/sidecar.env"):
        files.file(name=f"remove {path}", path=path, present=False)
    files.directory(name=f"remove {BASE}", path=BASE, present=False)
