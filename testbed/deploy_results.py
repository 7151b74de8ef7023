"""What a deploy run did, read from pyinfra's closing results table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class DeployResult:
    rc: int
    output: str
    changed: int
    errors: int
    unchanged: int
    changed_ops: list[str] = field(default_factory=list)


def parse_results(output: str) -> tuple[int, int, int, list[str]]:
    """Counts from pyinfra's closing results table (Success = changed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    changed_ops = []
    total = (0, 0, 0)
    in_table = False
    for line in plain.splitlines():
        if line.startswith("--> Results:"):
            in_table = True
            continue
        if not in_table or not line.strip() or line.strip().startswith("Operation "):
            continue
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 5:
            in_table = line.startswith("    ")
            continue
        num = [0 if c == "-" else int(c) for c in cols[-4:] if re.fullmatch(r"-|\d+", c)]
        if len(num) != 4:
            continue
        if cols[0] == "Grand total":
            total = (num[1], num[2], num[3])
            in_table = False
        elif num[1]:
            changed_ops.append(cols[0])
    return (*total, changed_ops)
