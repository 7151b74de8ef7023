"""Model files: hash-named, verified by sha256, swapped in by symlink only after verification.

A file at /var/lib/neverdark/models/<sha256>.gguf was hashed before it was renamed to that name,
so a re-run needs a stat, not a re-hash of gigabytes (minutes on a Pi's SD card). It is written
once (an upload is moved into place, not copied), root's and read-only (0444), and never again:
a new version of a model is a new hash, a new file, and a switched link. A full re-hash
is there when asked for: `pyinfra inventory deploys/fleet.py --data verify_models=true`.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.facts.files import File, Sha256File
from pyinfra.operations import files

from deploys import ops
from deploys.deployer import Deployer, each
from neverdark import contract


def verify_requested() -> bool:
    return str(host.data.get("verify_models") or "").lower() in ("1", "true", "yes")


def present(path: str, sha256: str) -> bool:
    """The verified file is in place (its name is its hash); re-hashed only when asked."""
    if verify_requested():
        return host.get_fact(Sha256File, path=path) == sha256
    return bool(host.get_fact(File, path=path))


class ModelsDeployer(Deployer):
    name = "models"

    def __init__(self, p: dict, enabled: bool = True) -> None:
        super().__init__(p, enabled)
        self.changes: dict[str, tuple] = {}   # model -> ops whose change restarts its server

    def install(self) -> None:
        files.directory(name="model directory", path=contract.MODELS_DIR, user="root",
                        group="root", mode="0755")
        for model in each(self.p["models"]):
            self.changes[model["name"]] = self._model(model)

    def _model(self, model: dict) -> tuple:
        final, sha = model["path"], model["sha256"]
        staged = None
        if model.get("upload"):
            # Uploads land on a staging name; verified_file only renames after the hash check.
            staged = f"{final}.upload"
            files.put(name=f"upload {model['name']}", src=model["upload"], dest=staged,
                      mode="0600", _if=lambda final=final, sha=sha: not present(final, sha))
        got = ops.verified_file(name=f"verify {model['name']} (sha256)", path=final, sha256=sha,
                                url=model.get("url"), staged=staged, rehash=verify_requested(),
                                mode=contract.MODEL_FILE_MODE)
        # Files from before models were read-only: their mode only, never their bytes, and no
        # restart of the model's server for it.
        ops.file_mode(name=f"{model['name']}: read-only", path=final,
                      mode=contract.MODEL_FILE_MODE)
        if staged:
            files.file(name=f"drop staged {model['name']}", path=staged, present=False)
        link = ops.atomic_symlink(name=f"activate {model['name']}", path=model["link"],
                                  target=final)
        return got, link

