"""One wizard's backend chain as the deploy sees it: built once per wizard in the plan.

Both sides of a switch are derived from this one view: the Hermes variants (one per backend,
neverdark.hermes_config) and the sidecar's config (sidecar.config.BackendConfig), which names the
variant it installs for each backend. Each backend's kind, URL, model, context, key and the path
of its variant are decided here once, so the variant the sidecar copies is the one rendered for
that backend by construction, not because two functions spell the same path.

A backend is looked up by name with `WizardBackends.backend`, which is neverdark.contract's
`find_backend`: the one lookup the Hermes config and the sidecar use too (the sidecar ships the
contract, not this module).
"""

from __future__ import annotations

from dataclasses import dataclass

from neverdark import contract
from neverdark.schema import CloudBackend, Fleet, LocalBackend


def backend_kind(backend: CloudBackend | LocalBackend) -> str:
    """contract.KINDS: `local` for neverdark's own model servers, else the provider."""
    return "local" if isinstance(backend, LocalBackend) else backend.provider


@dataclass(frozen=True)
class Backend:
    """One backend of a wizard's chain, with everything Hermes and the sidecar take from it."""

    name: str
    kind: str                        # contract.KINDS
    model: str                       # the provider's model name, or the local model's
    base_url: str                    # where Hermes and the probes send requests
    context_length: int              # what Hermes is told (a local model: its server's)
    max_tokens: int
    profile: str | None              # the prompt profile (neverdark.hermes_config.PROFILES)
    tools: tuple[str, ...] | None    # Hermes toolsets (None: Hermes' defaults)
    api_key_secret: str | None       # the inventory's secret holding its key (None: keyless)
    key_env: str | None              # the sidecar's name for that key (contract.backend_key_env)
    variant: str                     # its Hermes variant, which the sidecar installs
    host: str | None = None          # the host serving a local model (None: not a local one)


@dataclass(frozen=True)
class WizardBackends:
    """A wizard's chain, in order: the first backend is the primary."""

    name: str                        # the wizard
    backends: tuple[Backend, ...]

    @property
    def primary(self) -> Backend:
        return self.backends[0]

    def backend(self, name: str) -> Backend:
        return contract.find_backend(self, name)


def view(fleet: Fleet, wizard: str) -> WizardBackends:
    """The wizard's chain from the validated inventory."""
    return WizardBackends(wizard, tuple(_backend(fleet, wizard, b)
                                        for b in fleet.wizards[wizard].backends))


def _backend(fleet: Fleet, wizard: str, b: CloudBackend | LocalBackend) -> Backend:
    if isinstance(b, LocalBackend):
        # a server other hosts reach takes a key from every wizard, its own host's too
        host = fleet.serving_host(wizard, b)
        secret = fleet.model_key_secret(host, b.local)
    else:
        host, secret = None, b.api_key.secret if b.api_key else None
    return Backend(
        name=b.name, kind=backend_kind(b),
        model=b.local if isinstance(b, LocalBackend) else b.model,
        base_url=fleet.base_url(wizard, b), context_length=fleet.context_length(b),
        max_tokens=b.max_tokens, profile=b.profile,
        tools=None if b.tools is None else tuple(b.tools),
        api_key_secret=secret,
        key_env=contract.backend_key_env(wizard, b.name) if secret else None,
        variant=contract.variant_path(wizard, b.name), host=host)
