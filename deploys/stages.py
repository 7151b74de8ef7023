"""Which deployers a host gets, in order, and the three stages run across all of them."""

from __future__ import annotations

from deploys.base import BaseDeployer, JournaldDeployer
from deploys.deployer import Deployer, each
from deploys.firewall import FirewallDeployer
from deploys.hermes import HermesDeployer, WizardDeployer
from deploys.llama import LlamaDeployer, LlamaServerDeployer
from deploys.models import ModelsDeployer
from deploys.retired import RetiredDeployer
from deploys.sidecar import SidecarDeployer

STAGES = ("install", "configure", "activate")


def host_deployers(p: dict, stale_wizards: list[str] = (),
                   stale_llama_units: list[str] = ()) -> list[Deployer]:
    """Every deployer for a host's plan `p`; the stale lists (read from the host) become
    disabled deployers, which remove what a wizard or a model server had installed.

    Within each stage, model servers come before the gateways that fall back onto them and the
    sidecar; an engine or venv (and its removal) after the units that run from it; what earlier
    versions installed is removed last, once every service runs from its new files."""
    servers = p["llama"]["servers"]
    wizards = p["hermes"]["wizards"]
    models = ModelsDeployer(p)
    engine = LlamaDeployer(p, enabled=bool(servers))
    hermes = HermesDeployer(p, enabled=bool(wizards))
    wizard_ds = [WizardDeployer(p, w["name"], w, hermes) for w in wizards]
    # Up before a server listens beyond loopback; taken down only after every server here is
    # back on loopback.
    firewall = FirewallDeployer(p, enabled=bool(p["firewall"]))
    return [
        BaseDeployer(p),
        JournaldDeployer(p, enabled=bool(p["base"]["journald"])),
        *([firewall] if firewall.enabled else []),
        models,
        *[LlamaServerDeployer(p, s, s["unit"], engine, models)
          for s in servers],
        *[LlamaServerDeployer(p, None, unit, enabled=False) for unit in stale_llama_units],
        *([] if firewall.enabled else [firewall]),
        engine,
        *wizard_ds,
        *[WizardDeployer(p, name, enabled=False) for name in stale_wizards],
        hermes,
        SidecarDeployer(p, wizard_ds, enabled=bool(wizards)),
        RetiredDeployer(p),
    ]


def run(deployers: list[Deployer]) -> None:
    for stage in each(STAGES):
        for d in each(deployers):
            getattr(d, stage)()
