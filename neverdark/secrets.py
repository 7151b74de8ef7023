"""Secret references: the inventory names secrets, the operator's secrets file holds them.

An inventory never holds a value, only `{secret: NAME}`. Values come from the operator's dotenv
file (`NEVERDARK_SECRETS`, else `secrets.file` in the inventory) and, for names the file lacks,
from the environment, so CI can inject them without writing a file. A `SecretStore` hands a
value out only through `get()`: its repr names what it holds, never the values, so a fleet or a
traceback can be printed safely.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_VAR = "NEVERDARK_SECRETS"
MAX_BYTES = 1024 * 1024
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecretRef(BaseModel):
    """`{secret: NAME}`. NAME becomes an environment variable name on hosts, hence the pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(pattern=NAME_PATTERN)

    @model_validator(mode="before")
    @classmethod
    def _not_a_value(cls, data):
        # A bare string here is almost always the key itself pasted into the inventory; the
        # message must not repeat it, and must say where the value belongs instead.
        if isinstance(data, str):
            raise ValueError("write a reference {secret: NAME} and put the value in the "
                             "secrets file; the inventory must never hold a secret value")
        return data


class SecretStore:
    """Values by name: the file first, then the environment."""

    def __init__(self, file_values: Mapping[str, str | None], env: Mapping[str, str],
                 path: Path | None = None):
        self._file = {k: v for k, v in file_values.items() if v}
        self._env = env
        self.path = path

    def get(self, name: str) -> str | None:
        value = self._file.get(name) or self._env.get(name)
        return value or None

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def __repr__(self) -> str:
        return f"SecretStore(path={self.path!s}, names_in_file={sorted(self._file)})"


def secrets_path(configured: str | None, inventory_path: Path,
                 env: Mapping[str, str]) -> tuple[Path | None, str]:
    """The secrets file to read and where its name came from (for error messages).

    A relative `secrets.file` is taken from the inventory's directory, not the working directory,
    so `neverdark validate` gives the same answer wherever it is run from.
    """
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]).expanduser(), ENV_VAR
    if configured:
        p = Path(configured).expanduser()
        return (p if p.is_absolute() else inventory_path.parent / p), "secrets.file"
    return None, ""


def load_store(path: Path | None, env: Mapping[str, str]) -> SecretStore:
    """Raises FileNotFoundError for a named file that is missing: silently falling back to the
    environment would turn a typo in the path into a list of 'unresolved secret' errors."""
    if path is None:
        return SecretStore({}, env)
    if not path.exists():
        raise FileNotFoundError(str(path))
    if not path.is_file():
        raise OSError(errno.EINVAL, "not a regular file")
    if path.stat().st_size > MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_BYTES:,} bytes: not a secrets file")
    try:
        return SecretStore(dotenv_values(path, interpolate=False), env, path)
    except UnicodeDecodeError:
        raise OSError(errno.EILSEQ, "not UTF-8 text") from None
