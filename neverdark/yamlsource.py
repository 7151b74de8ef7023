"""Reading the inventory's YAML, with the line of every key, for any file at all.

Whatever the file holds, this ends in data or in problems with a line number, within bounded
time and memory: the file's size is capped, its bytes must be UTF-8 text without control
characters, nesting depth and the number of values (aliases counted as what they expand to) are
limited while the document is composed, before anything walks it, and a value PyYAML cannot
build (a timestamp with month 13, an integer of 5,000 digits) is a problem, not a traceback.
The line index visits each node once, so an alias is never walked again under its new path.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from neverdark.problems import Problem, Report

# An inventory for a hundred hosts and three hundred wizards is about 7,000 values in 100 kB;
# these bounds are well above any real fleet and keep a hostile file to a second or two
# (PyYAML's pure-Python scanner reads about 1 MB/s, its composer about 20,000 values/s).
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32        # the inventory's own deepest path is 6 levels
MAX_VALUES = 20_000   # scalars, mappings and sequences, every alias counted as its expansion
MAX_INT_DIGITS = 1000  # Python refuses int() of 4,300+ digits; the schema bounds the rest

# C0 and C1 controls but tab, LF and CR; DEL; the Unicode line and paragraph separators (PyYAML
# would count them as line breaks and every later line number would be off); non-characters.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff]"
                        "|\r(?!\n)")
# In values, escapes like "\0" or "\ud800" can still produce these (and lone surrogates).
_FORBIDDEN_IN_VALUES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufffe\uffff"
                                  "\ud800-\udfff]")
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}


class _Refused(yaml.MarkedYAMLError):
    """A bound was hit while composing or building the document."""


def read_text(path: Path, report: Report) -> str | None:
    """The file's text, or None with a problem: not a regular file, too big, not UTF-8, or a
    control character (each with its line)."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would wait forever; fstat then refuses it.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                report.problems.append(Problem(report.file, None, "(file)",
                                               "not a regular file: name the YAML file itself"))
                return None
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        report.problems.append(Problem(report.file, None, "(file)",
                                       f"cannot read: {e.strerror or type(e).__name__}"))
        return None
    if len(data) > MAX_BYTES:
        report.problems.append(Problem(
            report.file, None, "(file)", f"is {st.st_size:,} bytes; an inventory may be at most "
                                         f"{MAX_BYTES:,} bytes (1 MiB)"))
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        report.problems.append(Problem(
            report.file, line, "(file)", f"not UTF-8 text: byte 0x{data[e.start]:02x} at "
                                         f"column {column} (save the file as UTF-8)"))
        return None
    bad = _FORBIDDEN.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        what = ("a carriage return not followed by a line feed" if bad.group() == "\r"
                else f"the control character U+{ord(bad.group()):04X}")
        report.problems.append(Problem(report.file, line, "(file)",
                                       f"{what} at column {column}: an inventory is plain text"))
        return None
    return text


class _Loader(yaml.SafeLoader):
    """SafeLoader with bounds checked while composing, and values it cannot build reported."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0          # of the node being composed
        self._deepest = 0        # deepest level reached, aliases counted at their expansion
        self._values = 0         # values composed so far, aliases counted at their expansion
        self._aliases = 0        # aliases met so far
        self._open: set[str] = set()                   # anchors still being composed
        self._size: dict[str, tuple[int, int]] = {}    # anchor -> (values, height)

    def _reach(self, depth: int, values: int, mark: yaml.Mark) -> None:
        self._values += values
        aliased = ", counting what each alias expands to" if self._aliases else ""
        if self._values > MAX_VALUES:
            raise _Refused(None, None, f"more than {MAX_VALUES:,} values{aliased}: far more "
                           "than any fleet needs" + (" (an alias bomb?)" if aliased else ""), mark)
        if depth > MAX_DEPTH:
            raise _Refused(None, None, f"nested more than {MAX_DEPTH} levels deep{aliased}; "
                           "the inventory needs 6", mark)
        self._deepest = max(self._deepest, depth)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(None, None, f"alias *{event.anchor} is inside its own anchor "
                               f"&{event.anchor}: a recursive structure", event.start_mark)
            values, height = self._size.get(event.anchor, (1, 1))
            self._aliases += 1
            self._reach(self._depth + height, values, event.start_mark)
            return super().compose_node(parent, index)
        anchor = event.anchor
        outer, start = self._deepest, self._values
        self._depth += 1
        self._deepest = 0
        if anchor is not None:
            self._open.add(anchor)
        try:
            self._reach(self._depth, 1, event.start_mark)
            node = super().compose_node(parent, index)
            if anchor is not None:
                self._size[anchor] = (self._values - start, self._deepest - self._depth + 1)
            return node
        finally:
            self._open.discard(anchor)
            self._deepest = max(outer, self._deepest)
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, OverflowError, TypeError) as e:
            kind = node.tag.rsplit(":", 1)[-1]
            raise _Refused(None, None, f"cannot read this value as {kind}: {e}; quote it if it "
                           "is text", node.start_mark) from None

    def construct_yaml_int(self, node):
        digits = sum(c.isdigit() for c in node.value)
        if digits > MAX_INT_DIGITS:
            raise _Refused(None, None, f"an integer of {digits} digits: out of range for every "
                           "setting", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        # A key that YAML reads as a number, boolean or null (`42:`, `yes:`, `~:`) becomes its
        # source text, so nothing downstream meets a key that is not a string; the line index
        # reports it.
        if not isinstance(node, yaml.MappingNode):
            raise ConstructorError(None, None, f"expected a mapping node, but found {node.id}",
                                   node.start_mark)
        self.flatten_mapping(node)
        mapping = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str) and isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
            try:
                hash(key)
            except TypeError:
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       "found a key that is a list or mapping",
                                       key_node.start_mark) from None
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _index_lines(loader: _Loader, root: yaml.Node, report: Report) -> None:
    """report.lines: path -> line of its key. Each node is visited once: under an alias the
    deepest recorded line is the alias's own key."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple, int]] = [(root, (), 1)]
    while stack:
        node, path, line = stack.pop()
        report.lines.setdefault(path, line)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # resolve << merges as the constructor will
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node)
                key_line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    kind = _KINDS.get(type(key), f"a {type(key).__name__}")
                    key = key_node.value
                    report.lines[path + (key,)] = key_line
                    report.add(path + (key,), f"the key {key!r} is read as {kind}, not text: "
                                              "quote it if it is a name")
                if key in first:
                    report.lines[path + (key,)] = key_line
                    report.add(path + (key,), f"duplicate key (first at line {first[key]}); "
                                              "YAML would silently keep only the last one")
                first.setdefault(key, key_line)
                stack.append((value_node, path + (key,), key_line))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, path + (i,), item.start_mark.line + 1))


def _check_values(data: Any, report: Report) -> None:
    """Control characters and lone surrogates written as escapes ("\\0", "\\ud800"), in keys or
    values: none of them belongs in a name, a path, a URL or a persona. The walk is bounded by
    MAX_VALUES (aliases were counted at their expansion)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            bad = _FORBIDDEN_IN_VALUES.search(value)
            if bad:
                report.add(path, f"contains the control character U+{ord(bad.group()):04X} "
                                 "(written as an escape)")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and _FORBIDDEN_IN_VALUES.search(k):
                    report.add(path + (k,), "the key contains a control character "
                                            "(written as an escape)")
                else:
                    stack.append((v, path + (k,)))
        elif isinstance(value, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(value))


def load_yaml(text: str, report: Report) -> Any:
    """The document, with report.lines filled: path tuple -> line of its key (1-based)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _index_lines(loader, node, report)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        # Only the problem text, not PyYAML's snippet: the offending line might hold a secret.
        mark = e.problem_mark or e.context_mark
        words = "; ".join(x for x in (e.context, e.problem) if x)
        syntax = not isinstance(e, (_Refused, ComposerError, ConstructorError))
        report.problems.append(Problem(report.file, mark.line + 1 if mark else None, "(yaml)",
                                       ("YAML syntax: " if syntax else "") + words))
        return None
    except yaml.YAMLError as e:  # a ReaderError, should a character slip past read_text
        report.problems.append(Problem(report.file, None, "(yaml)", f"cannot read: {e}"))
        return None
    finally:
        loader.dispose()
    _check_values(data, report)
    return data


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "load_yaml", "read_text"]
