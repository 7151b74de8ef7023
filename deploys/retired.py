"""What earlier neverdark versions installed and this one does not: removed by a deployer that
only ever runs disabled, so a host deployed by an older version ends up as a fresh one would.

The prompt-prefix warmer (removed in issue 17): each wizard's `neverdark-prefix-<w>` capture
service and nightly timer, the capture script, the captured prompts, and each model server's
state directory (prefixes written to disk, saved llama-server slots, `server.json`). What
replaces it: the sidecar's check turn through the real gateway computes a wizard's prefix
before users arrive, and each engine's own prompt cache keeps it. And the llama-cpp-python
launcher's single-file predecessor of the llama_launcher package.

These paths are facts about old hosts only, so they live here, not in neverdark.contract.
"""

from __future__ import annotations

from pyinfra.operations import files

from deploys import ops
from deploys.deployer import Deployer, each
from neverdark import contract

PREFIX_UNIT_PREFIX = "neverdark-prefix-"            # neverdark-prefix-<w>.service and .timer
PREFIX_SCRIPT = f"{contract.HERMES_DIR}/prefix.py"
LLAMA_STATE_DIR = f"{contract.VAR}/llama"           # <model>/: prefixes, slots, server.json
SERVE_PY = f"{contract.LLAMA_DIR}/serve.py"
FILES = (PREFIX_SCRIPT, SERVE_PY)
DIRS = (LLAMA_STATE_DIR,)


def prefix_dir(wizard: str) -> str:
    """Where a wizard's captured prompts were kept."""
    return f"{contract.wizard_var(wizard)}/prefix"


def prefix_units(names: list[str]) -> list[str]:
    """The capture units among a unit directory's `names`: timers first (a timer left running
    would start its service again)."""
    found = [n for n in names if n.startswith(PREFIX_UNIT_PREFIX)]
    return sorted(found, key=lambda n: (not n.endswith(".timer"), n))


class RetiredDeployer(Deployer):
    """Always disabled: stops and removes what is found on the host (read, never assumed);
    on a host that never had any of it, nothing changes."""

    name = "retired"

    def __init__(self, p: dict) -> None:
        super().__init__(p, enabled=False)

    def activate(self) -> None:
        for unit in each(prefix_units(ops.listed_names(contract.UNIT_DIR))):
            self.stop_unit(unit)
        for wizard in each(ops.listed_names(contract.WIZARDS_VAR)):
            files.directory(name=f"{self.name}: remove {prefix_dir(wizard)}",
                            path=prefix_dir(wizard), present=False)
        for path in each(FILES):
            self.remove(path)
        for path in each(DIRS):
            files.directory(name=f"{self.name}: remove {path}", path=path, present=False)
