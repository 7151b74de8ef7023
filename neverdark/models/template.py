"""Chat templates: does a model's template carry tool calling, and which template does its
server use.

A GGUF's `tokenizer.chat_template` is Jinja (Hugging Face's `apply_chat_template` dialect,
which llama-server runs with `--jinja` and llama-cpp-python when no chat_format is given). A
template "carries tools" when it renders the request's `tools` into the prompt: we render it,
sandboxed, with a probe tool and look for the probe's name, the way llama.cpp's own template
capability check does. llama.cpp uses a named `tool_use` template, where the GGUF has one, for
requests with tools, so that one counts too.

The template is untrusted text from a downloaded file: it runs in Jinja's immutable sandbox
(no attribute access to Python internals, ranges bounded), its output is capped, and in the
main thread a timer stops a template that loops without output.
"""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from neverdark.schema import TOOL_CHAT_FORMATS

# `gguf_template` in the inventory: what the model's GGUF carries.
TOOLS, CHAT, NONE = "tools", "chat", "none"
KINDS = (TOOLS, CHAT, NONE)
MODEL = "model"                 # LlamaServer.template: the GGUF's own template
FALLBACK = "chatml"             # for a GGUF without a template
PROBE_TOOL = "neverdark_probe_tool_4f1c"
TOOL_USE = "tool_use"           # the named template llama.cpp takes for requests with tools
MAX_OUTPUT = 1 << 20
RENDER_SECONDS = 5


class TemplateError(Exception):
    pass


@dataclass(frozen=True)
class Inspection:
    kind: str                   # TOOLS, CHAT or NONE
    note: str | None = None     # why tools were not found, when the template failed to render


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(str(message))

    def tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
        return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                          ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@contextmanager
def _time_limit(seconds: int):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TemplateError(f"rendering took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def render(template: str, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = True, **extra) -> str:
    """The prompt a template makes of `messages` (Hugging Face's variables); TemplateError for
    a template that fails, loops or writes more than a megabyte."""
    import jinja2
    try:
        compiled = _environment().from_string(template)
        out, size = [], 0
        with _time_limit(RENDER_SECONDS):
            for chunk in compiled.generate(messages=messages, tools=tools,
                                           add_generation_prompt=add_generation_prompt,
                                           bos_token="<bos>", eos_token="<eos>", **extra):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise TemplateError(f"it renders more than {MAX_OUTPUT} characters")
                out.append(chunk)
    except TemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, ArithmeticError, RecursionError) as e:
        raise TemplateError(f"{type(e).__name__}: {e}") from None
    return "".join(out)


PROBE_TOOLS = [{"type": "function", "function": {
    "name": PROBE_TOOL, "description": "Look up the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
PROBE_MESSAGES = [{"role": "system", "content": "You are a test."},
                  {"role": "user", "content": "What is the weather in Oslo?"}]


def renders_tools(template: str) -> bool:
    """Does the template put the request's tool schemas into the prompt? TemplateError when it
    cannot be rendered at all."""
    try:
        return PROBE_TOOL in render(template, PROBE_MESSAGES, PROBE_TOOLS)
    except TemplateError:
        # Some templates refuse a system message (Gemma 2's): ask again without one.
        return PROBE_TOOL in render(template, PROBE_MESSAGES[1:], PROBE_TOOLS)


def inspect(default: str | None, named: dict[str, str]) -> Inspection:
    """What a GGUF's templates offer (default: tokenizer.chat_template; named: the
    tokenizer.chat_template.<name> ones)."""
    if default is None and not named:
        return Inspection(NONE)
    notes = []
    for label, text in (("tokenizer.chat_template", default),
                        (f"tokenizer.chat_template.{TOOL_USE}", named.get(TOOL_USE))):
        if text is None:
            continue
        try:
            if renders_tools(text):
                return Inspection(TOOLS)
        except TemplateError as e:
            notes.append(f"{label} does not render ({e})")
    return Inspection(CHAT, "; ".join(notes) or None)


@dataclass(frozen=True)
class Served:
    template: str      # MODEL (the GGUF's own) or a chat format / built-in template name
    tools: bool        # the engine and template put tool schemas into the prompt and parse
                       # tool calls back
    why: str           # for validate's output


def served(engine: str, chat_format: str | None, gguf_template: str | None) -> Served:
    """Which template a model's server uses: an explicit chat_format overrides; else the GGUF's
    own; chatml only for a GGUF without one (or whose template is unknown: a url source not on
    this machine that does not declare gguf_template)."""
    if chat_format is not None:
        if engine == "llama-server":
            tools = False   # a built-in template name: no tool-call parsing is promised
        else:
            tools = chat_format in TOOL_CHAT_FORMATS
        return Served(chat_format, tools, f"chat_format {chat_format} (set in the inventory)")
    if gguf_template in (TOOLS, CHAT):
        tools = engine == "llama-server" and gguf_template == TOOLS
        what = ("renders tools" if gguf_template == TOOLS else "carries no tool calling")
        return Served(MODEL, tools, f"its GGUF's own chat template ({what})")
    if gguf_template == NONE:
        return Served(FALLBACK, False, "chatml: its GGUF carries no chat template")
    return Served(FALLBACK, False, "chatml: its chat template is unknown (a url source not on "
                                   "this machine; declare gguf_template, or run `neverdark "
                                   "model add` on the file)")


def tools_problem(engine: str, chat_format: str | None, gguf_template: str | None,
                  name: str) -> str | None:
    """Why a local backend's `tools` cannot reach this model (None: they can)."""
    s = served(engine, chat_format, gguf_template)
    if s.tools:
        return None
    if engine == "llama-server":
        if chat_format is not None:
            return (f"model '{name}' runs on llama-server with chat_format {chat_format}, a "
                    "built-in template that does not parse tool calls: drop chat_format so it "
                    "serves the GGUF's own template (with --jinja), or use tools: []")
        return (f"model '{name}' is served with {s.why}: llama-server (--jinja) puts tool "
                "schemas into the prompt and parses calls back only through a template that "
                "renders tools (Qwen 2.5, Hermes, Llama 3.1...): use tools: [] or such a model")
    what = ("which silently drops tool schemas" if s.template != MODEL else
            "and llama-cpp-python does not parse tool calls back from it")
    return (f"model '{name}' is served by llama-cpp-python with {s.why}, {what}: use "
            "tools: [], engine: llama-server with a model whose template renders tools, or a "
            f"chat_format that carries them ({', '.join(TOOL_CHAT_FORMATS)})")


def summary_lines(fleet) -> list[str]:
    """For `neverdark validate`: the template each model in use is served with, and why."""
    used = {b.local for wz in fleet.wizards.values() for b in wz.backends
            if getattr(b, "local", None) is not None}
    out = []
    for m, model in fleet.models.items():
        if m in used:
            s = served(model.engine, model.chat_format, model.gguf_template)
            out.append(f"model {m}: served with {s.why}"
                       + ("; tools carried" if s.tools else ""))
    return out
