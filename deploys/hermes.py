"""Hermes gateways: one shared pinned venv, per wizard a user, home, config, secrets and unit.

Who owns what (see docs/CONTRACTS.md): the deploy owns each wizard's base config, backend
variants, `.env` and unit; the sidecar owns the active override in HERMES_MANAGED_DIR, which
the deploy only seeds when it is missing, so a deploy never moves a wizard back to its primary.
"""

from __future__ import annotations

from io import StringIO

from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from deploys import ops
from deploys.common import component_venv, no_diff, plan, template

UNIT_DIR = "/etc/systemd/system"
WIZARDS_ETC = "/etc/neverdark/wizards"
WIZARDS_VAR = "/var/lib/neverdark/wizards"
ARCHIVE = "/var/lib/neverdark/archive"


@deploy("neverdark hermes: install")
def install():
    return (component_venv("hermes", plan()["hermes"]["requirements"]),)


@deploy("neverdark hermes: wizard")
def wizard(w: dict, install_changes):
    user, etc, var = w["user"], f"{WIZARDS_ETC}/{w['name']}", f"{WIZARDS_VAR}/{w['name']}"
    server.group(name=f"{user} group", group=user, system=True)
    server.user(name=f"{user} user", user=user, group=user, system=True, home=w["home"],
                create_home=False, ensure_home=False, shell="/usr/sbin/nologin")
    files.directory(name=f"{w['name']} etc", path=f"{etc}/backends", user="root", group=user,
                    mode="0750")
    files.directory(name=f"{w['name']} var", path=var, user="root", group="root", mode="0755")
    # 0700, as Hermes itself sets it at every start (a looser mode would be undone and never
    # converge); the sidecar reads the gateway's errors from the journal instead.
    files.directory(name=f"{w['name']} home", path=w["home"], user=user, group=user, mode="0700")
    files.directory(name=f"{w['name']} managed dir", path=w["managed_dir"],
                    user="neverdark-sidecar", group=user, mode="0750")

    variants = []
    for backend, text in w["variants"].items():
        variants.append(files.put(name=f"{w['name']} variant {backend}", src=StringIO(text),
                                  dest=f"{etc}/backends/{backend}.yaml", user="root", group=user,
                                  mode="0640"))
    for stale in ops.listed_names(f"{etc}/backends"):
        if stale.removesuffix(".yaml") not in w["variants"]:
            variants.append(files.file(name=f"{w['name']} drop variant {stale}",
                                       path=f"{etc}/backends/{stale}", present=False))
    ops.write_if_missing(name=f"{w['name']} seed active config (primary)",
                         path=f"{w['managed_dir']}/config.yaml",
                         source=f"{etc}/backends/{w['primary']}.yaml",
                         user="neverdark-sidecar", group=user, mode="0640")

    base = files.put(name=f"{w['name']} base config", src=StringIO(w["base_config"]),
                     dest=f"{etc}/config.yaml", user="root", group=user, mode="0640")
    home_config = ops.copy_on_change(name=f"{w['name']} HERMES_HOME/config.yaml",
                                     source=f"{etc}/config.yaml", dest=f"{w['home']}/config.yaml",
                                     user=user, mode="0600", changed=base.did_change)
    with no_diff():
        env = files.put(name=f"{w['name']} secrets (.env)", src=StringIO(w["env"]),
                        dest=f"{w['home']}/.env", user=user, group=user, mode="0600")
    soul = files.put(name=f"{w['name']} persona (SOUL.md)", src=StringIO(w["soul"]),
                     dest=f"{w['home']}/SOUL.md", user=user, group=user, mode="0600")

    unit = files.template(name=f"unit {w['unit']}",
                          src=template("hermes", "neverdark-wizard.service.j2"),
                          dest=f"{UNIT_DIR}/{w['unit']}", mode="0644", w=w)
    systemd.daemon_reload(name=f"daemon-reload ({w['unit']})", _if=unit.did_change)
    systemd.service(name=f"restart {w['unit']} (its inputs changed)", service=w["unit"],
                    restarted=True,
                    _if=any_changed(unit, base, home_config, env, soul, *install_changes))
    systemd.service(name=f"run {w['unit']}", service=w["unit"], running=True, enabled=True)
    return variants


@deploy("neverdark hermes: remove wizard")
def remove_wizard(name: str):
    unit = f"neverdark-wizard-{name}.service"
    systemd.service(name=f"stop removed {unit}", service=unit, running=False, enabled=False)
    gone = files.file(name=f"remove {unit}", path=f"{UNIT_DIR}/{unit}", present=False)
    systemd.daemon_reload(name=f"daemon-reload (removed {unit})", _if=gone.did_change)
    ops.archive_directory(name=f"archive {name}'s sessions and memories",
                          path=f"{WIZARDS_VAR}/{name}", archive_root=ARCHIVE, prefix=name)
    files.directory(name=f"remove {name}'s config", path=f"{WIZARDS_ETC}/{name}", present=False)


def deploy_hermes() -> list:
    """Returns the variant ops: the sidecar reloads when any variant changed."""
    p = plan()
    wizards = p["hermes"]["wizards"]
    changes = install() if wizards else ()
    variant_ops = []
    for w in wizards:
        variant_ops += wizard(w, changes)
    wanted = {w["name"] for w in wizards}
    for name in ops.listed_names(WIZARDS_ETC):
        if name not in wanted:
            remove_wizard(name)
    if not wizards:
        files.directory(name="remove hermes install (no wizard on this host)",
                        path="/opt/neverdark/hermes", present=False)
    return variant_ops
