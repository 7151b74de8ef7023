"""The keys of model servers that other hosts of the fleet reach (docs/crosshost.md).

A model server that a wizard on another host falls back onto listens on its host's
private_address and refuses a request without its key. Each such server has its own key,
derived on the operator's machine from one fleet key:

    key = hex(HMAC-SHA256(fleet key, "<host>/<model>"))

so nothing but the fleet key needs keeping: the same inventory and fleet key give the same keys
on every deploy (a second deploy changes nothing), a key learnt from one host opens no other
host's server, and changing the fleet key changes every server's key at the next deploy.

The fleet key comes from NEVERDARK_FLEET_KEY (the secrets file, then the environment, as every
secret), else from a 0600 file beside the secrets file (beside the inventory when there is no
secrets file), which is generated on first use. It never leaves this machine; the derived keys
reach hosts only in 0600 files (the server's EnvironmentFile, the wizard's .env, the sidecar's
env), never argv or pyinfra's output.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from neverdark import contract

FLEET_KEY_SECRET = "NEVERDARK_FLEET_KEY"
FLEET_KEY_FILE = "neverdark-fleet.key"
FLEET_KEY_MIN_LENGTH = 32
# The name a served model's key goes by among the inventory's secrets (never in the secrets
# file: Fleet.secret derives it), so the wizard's .env and the sidecar's env carry it through the
# same path as a cloud backend's key.
SECRET_PREFIX = "NEVERDARK_MODEL_KEY_"


class FleetKeyError(ValueError):
    """The fleet key cannot be had; the message names where it was looked for, never a value."""


def secret_name(host: str, model: str) -> str:
    return f"{SECRET_PREFIX}{contract.env_token(host)}__{contract.env_token(model)}"


def derive(fleet_key: str, host: str, model: str) -> str:
    return hmac.new(fleet_key.encode(), f"{host}/{model}".encode(), hashlib.sha256).hexdigest()


def key_file(secrets_file: Path | None, inventory: Path | None) -> Path:
    """Where the generated fleet key is kept: beside the secrets file, else the inventory."""
    beside = secrets_file or inventory
    if beside is None:
        raise FleetKeyError(f"no secrets file and no inventory path to keep the fleet key "
                            f"beside: set {FLEET_KEY_SECRET}")
    return Path(beside).expanduser().resolve().parent / FLEET_KEY_FILE


def load_or_create(given: str | None, path: Path) -> str:
    """`given` (NEVERDARK_FLEET_KEY) if set, else the key in `path`, written there (0600,
    atomically) on first use."""
    if given:
        if len(given) < FLEET_KEY_MIN_LENGTH:
            raise FleetKeyError(f"{FLEET_KEY_SECRET} is shorter than {FLEET_KEY_MIN_LENGTH} "
                                "characters")
        return given
    try:
        st = path.stat()
    except FileNotFoundError:
        return _create(path)
    if st.st_mode & 0o077:
        raise FleetKeyError(f"fleet key file {path} is readable by others (mode "
                            f"{st.st_mode & 0o777:o}): chmod 600 it")
    text = path.read_text().strip()
    if len(text) < FLEET_KEY_MIN_LENGTH or any(c.isspace() for c in text):
        raise FleetKeyError(f"fleet key file {path}: line 1: expected one key of at least "
                            f"{FLEET_KEY_MIN_LENGTH} characters and no spaces")
    return text


def _create(path: Path) -> str:
    key = secrets.token_hex(32)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        # link, not rename: two deploys starting at once keep whichever key got there first
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create(None, path)
    finally:
        os.unlink(tmp)
    return key
