"""HostSpec: one test host's name, profile, architecture and memory."""

from __future__ import annotations

import re
from dataclasses import dataclass

from testbed.fleet.base import DEBIAN_ARCH, DEFAULT_MEMORY_MB, NATIVE_ARCH, PROFILES, FleetError


@dataclass(frozen=True)
class HostSpec:
    """One test host. CLI form NAME[:PROFILE[:ARCH]][:MEMORY_MB], e.g. `pi1:pi:aarch64:2048`;
    `name:profile` is a host of the runner's own architecture with DEFAULT_MEMORY_MB."""
    name: str
    profile: str = "vps"
    arch: str = NATIVE_ARCH
    memory_mb: int = DEFAULT_MEMORY_MB

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", str(self.name)):
            raise FleetError(f"host {self.name!r}: name must match [a-z][a-z0-9-]{{0,30}}")
        if self.profile not in PROFILES:
            raise FleetError(f"host {self.name}: profile {self.profile!r} is not one of "
                             f"{', '.join(PROFILES)}")
        if self.arch not in DEBIAN_ARCH:
            raise FleetError(f"host {self.name}: arch {self.arch!r} is not one of "
                             f"{', '.join(DEBIAN_ARCH)}")
        if not isinstance(self.memory_mb, int) or isinstance(self.memory_mb, bool) \
                or not 64 <= self.memory_mb <= 1 << 20:
            raise FleetError(f"host {self.name}: memory_mb {self.memory_mb!r} is not a whole "
                             "number of MB from 64 up")

    @property
    def emulated(self) -> bool:
        return self.arch != NATIVE_ARCH

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        name, *rest = text.split(":")
        fields: dict = {"name": name}
        if rest:
            fields["profile"] = rest.pop(0)
        for part in rest:
            if part in DEBIAN_ARCH and "arch" not in fields:
                fields["arch"] = part
            elif part.isdigit() and "memory_mb" not in fields:
                fields["memory_mb"] = int(part)
            else:
                raise FleetError(f"host {text!r}: {part!r} is neither an arch "
                                 f"({', '.join(DEBIAN_ARCH)}) nor a memory size in MB; "
                                 "the form is NAME[:PROFILE[:ARCH]][:MEMORY_MB]")
        return cls(**fields)

    @classmethod
    def of(cls, value) -> HostSpec:
        """A HostSpec from itself, "NAME:...", (name, profile[, arch[, memory_mb]]) or a dict."""
        if isinstance(value, HostSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 4:
            return cls(*value)
        raise FleetError(f"not a host spec: {value!r}")

    def as_dict(self) -> dict:
        return {"name": self.name, "profile": self.profile, "arch": self.arch,
                "memory_mb": self.memory_mb}
