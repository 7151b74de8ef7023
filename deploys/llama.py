"""Local model servers: one llama-cpp-python server unit per distinct local model on the host."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from deploys import ops
from deploys.common import component_venv, plan, system_user, template

UNIT_DIR = "/etc/systemd/system"
PREFIX = "neverdark-llama-"


@deploy("neverdark llama: install")
def install():
    system_user("neverdark-llama")
    reqs = component_venv("llama", plan()["llama"]["requirements"])
    launcher = files.put(name="llama launcher", src=template("llama", "serve.py"),
                         dest="/opt/neverdark/llama/serve.py", mode="0644")
    return reqs, launcher


@deploy("neverdark llama: configure and activate")
def configure_and_activate(install_changes, model_changes: dict):
    p = plan()
    wanted = {s["unit"] for s in p["llama"]["servers"]}
    units = {}
    for s in p["llama"]["servers"]:
        units[s["unit"]] = files.template(
            name=f"unit {s['unit']}", src=template("llama", "neverdark-llama.service.j2"),
            dest=f"{UNIT_DIR}/{s['unit']}", mode="0644", s=s)
    stale = [u for u in ops.listed_names(UNIT_DIR) if u.startswith(PREFIX) and u not in wanted]
    for unit in stale:
        systemd.service(name=f"stop removed {unit}", service=unit, running=False, enabled=False)
        units[unit] = files.file(name=f"remove {unit}", path=f"{UNIT_DIR}/{unit}", present=False)
    if units:
        systemd.daemon_reload(name="daemon-reload (llama units)", _if=any_changed(*units.values()))
    for s in p["llama"]["servers"]:
        # restart also starts a stopped unit, so a fresh unit is started once, not twice
        systemd.service(name=f"restart {s['unit']} (its inputs changed)", service=s["unit"],
                        restarted=True,
                        _if=any_changed(units[s["unit"]], *install_changes,
                                        *model_changes.get(s["model"], ())))
        systemd.service(name=f"run {s['unit']}", service=s["unit"], running=True, enabled=True)
    if not p["llama"]["servers"]:
        files.directory(name="remove llama install (no local model on this host)",
                        path="/opt/neverdark/llama", present=False)


def deploy_llama(model_changes: dict):
    changes = install() if plan()["llama"]["servers"] else ()
    configure_and_activate(changes, model_changes)
