"""Model files: hash-named, verified by sha256, swapped in by symlink only after verification."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Sha256File
from pyinfra.operations import files

from deploys import ops
from deploys.common import plan

MODELS = "/var/lib/neverdark/models"


@deploy("neverdark models")
def deploy_models():
    files.directory(name="Model directory", path=MODELS, user="root", group="root", mode="0755")
    changed = {}
    for model in plan()["models"]:
        final = f"{MODELS}/{model['sha256']}.gguf"
        staged = None
        if model.get("upload"):
            # Uploads land on a staging name; verified_file only renames after the hash check.
            staged = f"{MODELS}/{model['sha256']}.gguf.upload"
            files.put(name=f"Upload {model['name']}", src=model["upload"], dest=staged,
                      mode="0600", _if=lambda final=final: not _verified(final, model["sha256"]))
        got = ops.verified_file(name=f"Verify {model['name']} (sha256)", path=final,
                                sha256=model["sha256"], url=model.get("url"), staged=staged)
        if staged:
            files.file(name=f"Drop staged {model['name']}", path=staged, present=False)
        link = ops.atomic_symlink(name=f"Activate {model['name']}",
                                  path=f"{MODELS}/{model['name']}.gguf", target=final)
        changed[model["name"]] = (got, link)
    return changed


def _verified(path: str, sha256: str) -> bool:
    return host.get_fact(Sha256File, path=path) == sha256
