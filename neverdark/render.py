"""`neverdark render HOST --out DIR`: every file the deploy would install on HOST, under DIR.

For review and diffs (as `helm template` does), without touching any host: units, Hermes base
configs, variants and `.env`, the sidecar's config and env file, sudo rule and launcher, each
with the mode it gets on the host; `DIR/MANIFEST` lists mode, owner and group. The same deployer
code produces these files for the real deploy (deploys/stages.py). Secret files are written
0600, as on the host; the model files themselves are listed, not copied.
"""

from __future__ import annotations

import os
from pathlib import Path

from neverdark import contract, plan
from neverdark.schema import Fleet


def host_files(fleet: Fleet, host: str) -> tuple[list[plan.File], dict]:
    from deploys.stages import host_deployers   # pyinfra is imported only for this command
    p = plan.host_plan(fleet, host)
    found: list[plan.File] = []
    for d in host_deployers(p):
        if d.enabled:
            found += d.uploads()
    # What a fresh host starts on: the primary's variant as the active config.
    for w in p["hermes"]["wizards"]:
        primary = w["variants"][w["primary"]]
        found.append(plan.File(w["active_config"], primary.content, "0640",
                               contract.SIDECAR_USER, w["user"]))
    return found, p


def write(out: Path, files: list[plan.File], models: list[dict]) -> list[str]:
    """Write the files under `out` (atomically each); returns the manifest lines."""
    lines = []
    for f in sorted(files, key=lambda f: f.path):
        dest = out / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f.content)
        os.chmod(tmp, int(f.mode, 8))
        os.replace(tmp, dest)
        lines.append(f"{f.mode} {f.user}:{f.group} {f.path}")
    for m in models:
        lines.append(f"{contract.MODEL_FILE_MODE} root:root {m['path']} (model {m['name']}, "
                     f"sha256 {m['sha256']}, from {m['url'] or m['upload']})")
        lines.append(f"link {m['link']} -> {m['path']}")
    out.mkdir(parents=True, exist_ok=True)   # a host with nothing to install still gets one
    manifest = out / "MANIFEST"
    manifest.write_text("\n".join(lines) + "\n")
    return lines


def render(fleet: Fleet, host: str, out: Path) -> list[str]:
    files, p = host_files(fleet, host)
    return write(Path(out), files, p["models"])
