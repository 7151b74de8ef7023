"""Inventory problems: each one `file:line: field.path: message`, all of them at once.

Pydantic's errors become problems here, with the line of the deepest key the file has.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import BaseModel, Tag, ValidationError


def printable(text: str, keep: str = "") -> str:
    """`text` with every character that is not printable (control characters, lone surrogates,
    line breaks but those in `keep`) escaped: a problem quotes names and values from the file,
    and what reaches the operator's terminal must be neither an escape sequence nor a fake line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else ascii(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        # A line break stays only where it starts an indented continuation (a memory budget's
        # breakdown), so no value quoted in a message can fake a problem line of its own.
        message = re.sub(r"\n(?!  )", r"\\n", printable(self.message, keep="\n"))
        return f"{printable(where)}: {printable(self.field)}: {message}"


SHOWN_MAX = 200  # problems in the message; a hostile file can hold thousands of duplicate keys


class InventoryError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.field))
        shown = list(map(str, self.problems[:SHOWN_MAX]))
        if len(self.problems) > SHOWN_MAX:
            shown.append(f"... and {len(self.problems) - SHOWN_MAX} more problems (the first "
                         f"{SHOWN_MAX} are shown)")
        super().__init__("\n".join(shown))


def dotted(path: tuple) -> str:
    out = ""
    for el in path:
        if isinstance(el, int):
            out += f"[{el}]"
        else:
            key = str(el) if len(str(el)) <= 64 else str(el)[:40] + "..."
            out += f".{key}" if out else key
    return out or "(top level)"


class Report:
    """The problems found in one file, and the line of every key path in it."""

    def __init__(self, file: str, lines: dict[tuple, int]):
        self.file, self.lines, self.problems = file, lines, []

    def line_of(self, path: tuple) -> int:
        """The line of the deepest key on the path that the file has (a missing key reports
        at the mapping that lacks it)."""
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def add(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.file, self.line_of(path), dotted(path), message))


def _strip_optional(t: Any) -> Any:
    if typing.get_origin(t) in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return t


def _step(t: Any, el: Any) -> Any:
    t = _strip_optional(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        f = t.model_fields.get(el)
        return f.annotation if f else None
    origin = typing.get_origin(t)
    if origin is dict:
        return typing.get_args(t)[1]
    if origin is list:
        return typing.get_args(t)[0]
    if origin is Annotated:
        inner = typing.get_args(t)[0]
        for member in typing.get_args(inner):
            if typing.get_origin(member) is Annotated:
                cls, *meta = typing.get_args(member)
                if any(isinstance(m, Tag) and m.tag == el for m in meta):
                    return cls
        return _step(inner, el)
    return None


def _clean_loc(root: type, loc: tuple) -> tuple[tuple, type | None]:
    """Drop pydantic's union tags from loc (a path under the model `root`); also return the
    model that holds loc[-1]."""
    path, t, parent = [], root, None
    for i, el in enumerate(loc):
        is_tag = (i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "backends"
                  and el in ("cloud", "local"))
        stripped = _strip_optional(t) if t is not None else None
        if isinstance(stripped, type) and issubclass(stripped, BaseModel):
            parent = stripped
        elif not is_tag:
            parent = None
        t = _step(t, el) if t is not None else None
        if not is_tag:
            path.append(el)
    return tuple(path), parent


def unknown_key(key: Any, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")


def _message(err: dict, parent: type | None, key: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return unknown_key(key, list(parent.model_fields) if parent else [])
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return err["msg"]


def add_validation_errors(report: Report, root: type, exc: ValidationError,
                          prefix: tuple) -> None:
    """Each of pydantic's errors as a problem; `prefix` is where the validated value sits under
    `root` (the inventory's top-level model)."""
    for err in exc.errors(include_url=False, include_input=False):
        path, parent = _clean_loc(root, prefix + tuple(err["loc"]))
        report.add(path, _message(err, parent, path[-1] if path else None))
