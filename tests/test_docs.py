"""The docs stay honest: what README.md and docs/*.md name exists, the README stays a map, and a
big module says why it is one module.

What a page names is checked, not what it might name: a page another change adds later is
checked once it exists, and a link to it fails until then. Named means:
- a repository path: a token that starts with one of the repository's top-level folders
  (`neverdark/plan.py`, `templates/<component>/`, `deploys/{base,models}/`: `<...>` and `*` match
  any name, braces expand), or a link's target, relative to the page, with its `#anchor` checked
  against the target page's headings (GitHub's rule);
- a `make` target, a `neverdark` subcommand (from the click group in neverdark/cli.py, groups
  one level down): in code (inline spans and fenced blocks), where commands are written;
- a python module: `python -m X` (X must have a `__main__` where it is a package), and dotted
  names under the repository's packages (`sidecar.engine`, `neverdark.inventory.find_inventory`:
  past the last module, the first name must be defined there).
"""

from __future__ import annotations

import ast
import glob
import itertools
import re
import subprocess
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 220
MODULE_MAX_LINES = 420
WHY = "Why one module"

# Folders outside the repository that earlier notes cited as if they were in it.
FOREIGN = ("shared",)
PACKAGES = ("neverdark", "sidecar", "deploys", "testbed", "llama_launcher", "tests", "bench")
# A dotted name ending in one of these is a file name (`sidecar.yaml`), not a module.
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "env", "service", "timer", "sock", "conf",
                 "gguf", "txt", "j2", "svg", "png", "html", "css", "js", "toml", "whl", "so",
                 "log", "lock", "token", "d"}


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def top_folders() -> list[str]:
    return sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name != "__pycache__") + [".ci", *FOREIGN]


# --- reading a page ------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)")
INLINE = re.compile(r"`([^`]+)`")


def split_code(text: str) -> tuple[str, list[tuple[int, str]]]:
    """(the page with fenced blocks blanked, [(line, code)]): the lines of fenced blocks, and
    inline spans (one may wrap over lines) with the line each starts on."""
    prose, code, fenced = [], [], False
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            prose.append("\n")
        elif fenced:
            code.append((n, line))
            prose.append("\n")
        else:
            prose.append(line)
    blanked = "".join(prose)          # the same lines, so a line number holds in both
    code += [(line_of(blanked, m.start(1)), m.group(1)) for m in INLINE.finditer(blanked)]
    return blanked, code


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def at(line: int, snippet: str, pos: int) -> int:
    """The line of position `pos` in a code snippet that starts on `line`."""
    return line + snippet.count("\n", 0, pos)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    blanked, _ = split_code(text)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", blanked, re.M)}


# --- what a page names ---------------------------------------------------------------------------

def expand(pattern: str) -> list[str]:
    """`a/{b,c}/<d>` -> globs `a/b/*`, `a/c/*`."""
    pattern = re.sub(r"<[^<>/]*>", "*", pattern)
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return list(itertools.chain.from_iterable(
        expand(pattern[:m.start()] + alt + pattern[m.end():]) for alt in m.group(1).split(",")))


def path_exists(name: str) -> bool:
    return all(glob.glob(str(REPO / g)) for g in expand(name.rstrip("/")))


def path_problems(page: Path, text: str) -> list[str]:
    folders = "|".join(re.escape(f) for f in top_folders())
    token = re.compile(rf"(?<![\w./~$-])((?:{folders})/[\w.{{}},<>*/-]*)")
    out = []
    for m in token.finditer(text):
        name = m.group(1).rstrip(".,")
        if not path_exists(name):
            out.append(f"{page.name}:{line_of(text, m.start())}: path {name} does not exist")
    for m in re.finditer(r"[\w./-]*FIELD-NOTES[\w.-]*", text):
        if not list(REPO.rglob("FIELD-NOTES*")):
            out.append(f"{page.name}:{line_of(text, m.start())}: {m.group(0)} is not in the "
                       "repository")
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def link_problems(page: Path, text: str) -> list[str]:
    out = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):      # https:, mailto:
            continue
        where = f"{page.name}:{line_of(text, m.start())}: link {target}"
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if REPO not in dest.parents and dest != REPO:
            out.append(f"{where} leaves the repository")
        elif not dest.exists():
            out.append(f"{where}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return out


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


def make_problems(page: Path, text: str, code) -> list[str]:
    targets = make_targets()
    out = []
    for line, snippet in code:
        for m in re.finditer(r"(?<![\w./-])make\s+([a-z][\w-]*)(?!\s*=)", snippet):
            if m.group(1) not in targets:
                out.append(f"{page.name}:{at(line, snippet, m.start())}: make target "
                           f"{m.group(1)} is not in the Makefile ({', '.join(sorted(targets))})")
    return out


def cli_tree() -> dict[str, set[str] | None]:
    """Each `neverdark` subcommand, with its own subcommands where it is a group."""
    from neverdark.cli import main
    ctx = click.Context(main)
    tree = {}
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        tree[name] = (set(cmd.list_commands(click.Context(cmd)))
                      if isinstance(cmd, click.Group) else None)
    return tree


def command_problems(page: Path, text: str, code, tree) -> list[str]:
    out = []
    for line, snippet in code:
        for m in re.finditer(r"(?<![\w./-])neverdark[ \t]+([a-z][\w-]*)(?:[ \t]+([a-z][\w-]*))?",
                             snippet):
            where = f"{page.name}:{at(line, snippet, m.start())}"
            first, second = m.group(1), m.group(2)
            if first not in tree:
                out.append(f"{where}: `neverdark {first}` is not a subcommand "
                           f"({', '.join(sorted(tree))})")
            elif tree[first] is not None and second and second not in tree[first]:
                out.append(f"{where}: `neverdark {first} {second}` is not a subcommand "
                           f"({', '.join(sorted(tree[first]))})")
    return out


def defined_names(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_problem(dotted: str, runnable: bool) -> str | None:
    """Why `dotted` is not a module of the repository (or a name in one), or None."""
    parts = dotted.split(".")
    here = REPO
    for i, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
            continue
        if (here / f"{part}.py").is_file():
            rest = parts[i + 1:]
            if rest and runnable:
                return f"{'.'.join(parts[:i + 1])} is a module file, not a package"
            if rest and rest[0] not in defined_names(here / f"{part}.py"):
                return f"{rest[0]} is not defined in {'.'.join(parts[:i + 1])}"
            return None
        init = here / "__init__.py"
        if i > 0 and not runnable and init.is_file() and part in defined_names(init):
            return None
        return f"no module {'.'.join(parts[:i + 1])}"
    if runnable and not (here / "__main__.py").is_file():
        return f"package {dotted} has no __main__"
    if not runnable and not (here / "__init__.py").is_file() and here != REPO:
        return f"{dotted} is a folder, not a package"
    return None


def inventory_keys() -> dict[str, set[str]]:
    """The inventory's sections named like a package (`sidecar.probe` is the inventory's key, as
    docs/inventory.md writes it), with their keys."""
    from neverdark import schema
    sections = schema.Fleet.model_fields
    out = {}
    for name in PACKAGES:
        if name in sections:
            model = sections[name].annotation
            out[name] = set(getattr(model, "model_fields", {}))
    return out


def module_problems(page: Path, text: str) -> list[str]:
    keys = inventory_keys()
    out, run = [], set()
    for m in re.finditer(r"python3?\s+-m\s+([A-Za-z_][\w.]*)", text):
        name = m.group(1).rstrip(".")
        run.add(m.start(1))
        if name.split(".")[0] not in PACKAGES:
            continue                    # pip, pytest, venv: not the repository's
        why = module_problem(name, runnable=True)
        if why:
            out.append(f"{page.name}:{line_of(text, m.start())}: python -m {name}: {why}")
    pkgs = "|".join(PACKAGES)
    for m in re.finditer(rf"(?<![\w./-])((?:{pkgs})(?:\.[A-Za-z_]\w*)+)", text):
        name = m.group(1)
        if m.start(1) in run:
            continue                    # checked above, as something to run
        first, second = name.split(".")[:2]
        if name.rsplit(".", 1)[1] in FILE_SUFFIXES or second in keys.get(first, ()):
            continue
        why = module_problem(name, runnable=False)
        if why:
            out.append(f"{page.name}:{line_of(text, m.start())}: module {name}: {why}")
    return out


def problems(page: Path, text: str, tree) -> list[str]:
    _, code = split_code(text)
    return [*path_problems(page, text), *link_problems(page, text),
            *make_problems(page, text, code), *command_problems(page, text, code, tree),
            *module_problems(page, text)]


# --- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree():
    return cli_tree()


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_what_a_page_names_exists(page, tree):
    assert problems(page, page.read_text(encoding="utf-8"), tree) == []


def test_the_checks_catch_what_does_not_exist(tree):
    """Each kind of name, wrong, is reported with its line; the same names right are not."""
    page = REPO / "docs" / "example.md"
    bad = "\n".join([
        "See `neverdark/no_such_module.py` and [the guide](no-such-page.md).",
        "Cited from shared/FIELD-NOTES.md, and FIELD-NOTES again.",
        "[sidecar](sidecar.md#no-such-heading) [out](../../elsewhere.md)",
        "```sh", "make no-such-target", "neverdark no-such-command", "neverdark model no-such",
        "python -m sidecar.no_such", "```",
        "`python -m neverdark.panel` and neverdark.contract.NO_SUCH_NAME.",
    ])
    found = problems(page, bad, tree)
    expected = [
        "example.md:1: path neverdark/no_such_module.py does not exist",
        "example.md:2: path shared/FIELD-NOTES.md does not exist",
        "example.md:2: shared/FIELD-NOTES.md is not in the repository",
        "example.md:2: FIELD-NOTES is not in the repository",
        "example.md:1: link no-such-page.md: no-such-page.md does not exist",
        "example.md:3: link sidecar.md#no-such-heading: no heading #no-such-heading in docs/sidecar.md",
        "example.md:3: link ../../elsewhere.md leaves the repository",
        "example.md:5: make target no-such-target",
        "example.md:6: `neverdark no-such-command` is not a subcommand",
        "example.md:7: `neverdark model no-such` is not a subcommand",
        "example.md:8: python -m sidecar.no_such: no module sidecar.no_such",
        "example.md:10: python -m neverdark.panel: package neverdark.panel has no __main__",
        "example.md:10: module neverdark.contract.NO_SUCH_NAME: NO_SUCH_NAME is not defined",
    ]
    for want in expected:
        assert any(f.startswith(want) for f in found), (want, found)
    assert len(found) == len(expected), found

    good = "\n".join([
        "See `neverdark/plan.py`, `templates/<component>/`, `deploys/{base,models}/`.",
        "[sidecar](sidecar.md#probes) [readme](../README.md#first-commands)",
        "```sh", "make test PYTEST_ARGS=x", "neverdark model add SOURCE", "neverdark drill merlin",
        "python -m sidecar.drill", "python -m neverdark.artifacts show", "```",
        "neverdark.inventory.find_inventory, sidecar.engine, sidecar.yaml on a host, and the",
        "inventory's sidecar.probe; `python -m neverdark.contract`, `python -m llama_launcher`.",
    ])
    assert problems(page, good, tree) == []


def test_readme_is_a_map():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"


def python_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split()
        return [REPO / f for f in listed if (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):     # not a git checkout
        return [p for p in REPO.rglob("*.py")
                if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]


def test_a_big_module_says_why_it_is_one():
    missing = []
    for f in python_files():
        text = f.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MODULE_MAX_LINES and WHY not in (ast.get_docstring(ast.parse(text)) or ""):
            missing.append(f"{f.relative_to(REPO)} ({n} lines)")
    assert missing == [], (f"modules over {MODULE_MAX_LINES} lines without a {WHY!r} paragraph "
                           f"in their docstring (split them, or say why not): {missing}")
