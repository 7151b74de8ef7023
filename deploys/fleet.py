"""Deploy a neverdark fleet: `pyinfra inventory deploys/fleet.py` from the repo root.

Stages across components, in the order their dependencies need: users and software first, then
configuration, then services (each restarted only when something it reads changed).
"""

from pyinfra import host

from deploys import base, hermes, llama, models, sidecar

if not hasattr(host.data, "neverdark"):
    raise SystemExit(f"{host.name}: no neverdark plan in host data: run with the `inventory` "
                     "file from the repo root: pyinfra inventory deploys/fleet.py")

base.deploy_base()
model_changes = models.deploy_models()
sidecar_install = sidecar.install() if host.data.neverdark["hermes"]["wizards"] else ()
variant_ops = hermes.deploy_hermes()
llama.deploy_llama(model_changes)
if host.data.neverdark["hermes"]["wizards"]:
    sidecar.deploy_sidecar(sidecar_install, variant_ops)
else:
    sidecar.remove()
