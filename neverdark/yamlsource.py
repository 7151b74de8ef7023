"""Loading the inventory's YAML with the line of every key, for problems that name their line."""

from __future__ import annotations

from typing import Any

import yaml

from neverdark.problems import Problem, Report


def _index_lines(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, line: int,
                 lines: dict[tuple, int], report: Report) -> None:
    lines[path] = line
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve << merges as the constructor will
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node)
            key_line = key_node.start_mark.line + 1
            if key in seen:
                report.lines[path + (key,)] = key_line
                report.add(path + (key,), f"duplicate key (first at line {seen[key]}); YAML "
                                          "would silently keep only the last one")
            seen[key] = key_line
            _index_lines(loader, value_node, path + (key,), key_line, lines, report)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(loader, item, path + (i,), item.start_mark.line + 1, lines, report)


def load_yaml(text: str, report: Report) -> Any:
    """The document, with report.lines filled: path tuple -> line of its key (1-based)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _index_lines(loader, node, (), 1, report.lines, report)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        # Only the problem text, not PyYAML's snippet: the offending line might hold a secret.
        mark = e.problem_mark or e.context_mark
        text = "; ".join(x for x in (e.context, e.problem) if x)
        report.problems.append(Problem(report.file, mark.line + 1 if mark else None,
                                       "(yaml)", f"YAML syntax: {text}"))
        return None
    finally:
        loader.dispose()

