"""Deploy a neverdark fleet: `pyinfra inventory deploys/fleet.py` from the repo root.

Every component's install, then every configure, then every activate (deploys/stages.py): users
and software first, then configuration, then services, each restarted only when something it
reads changed. Components the host no longer needs are removed by the same deployers, disabled.
"""

from pyinfra import host

from deploys import hermes, llama, stages

if not hasattr(host.data, "neverdark"):
    raise SystemExit(f"{host.name}: no neverdark plan in host data: run with the `inventory` "
                     "file from the repo root: pyinfra inventory deploys/fleet.py")

plan = host.data.neverdark
stages.run(stages.host_deployers(
    plan,
    stale_wizards=hermes.stale_wizards({w["name"] for w in plan["hermes"]["wizards"]}),
    stale_llama_units=llama.stale_server_units({s["unit"] for s in plan["llama"]["servers"]})))
