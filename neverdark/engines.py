"""The two local model engines: how each is run, and what each really serves.

Both run under the same unit (`neverdark-llama-<model>.service`), listen on the same port
(on loopback, or on the host's private address with a key when wizards of other hosts use the
model: docs/crosshost.md; the key comes from the unit's EnvironmentFile, never argv), answer `/health` without waiting for a generation, speak the OpenAI chat API Hermes uses,
and keep each wizard's prompt prefix in their own prompt cache once a turn has computed it (the
sidecar's check turn before a switch onto the model does, through the wizard's real gateway):

llama-cpp-python   the llama_launcher package, run as `python -m llama_launcher`: one
                   context, requests one at a time; its RAM prompt cache holds saved states
                   (a wizard's prefix and conversation) bounded in bytes, the least recently
                   used evicted first.
llama-server       llama.cpp's own server (neverdark.artifacts builds it from the same pinned
                   source): one slot per wizard that can fall back onto the model (`-np`), so
                   no wizard evicts another's prefix or waits for another's turn; its own
                   `/health`, `/props`, `/slots` and `--metrics`; its RAM prompt cache is off
                   (`-cram 0`): the slots are the cache.

A server restart loses the prefixes on both: the next turn computes them again.

The context: llama-server caps every slot at the model's training context (GGUF
`<arch>.context_length`: 32,768 for Gemma 3 270M) whatever `-c` says, and Hermes refuses a model
under 64,000 tokens. So a model trained for less runs on llama-server only with
`server.extend_context: true`, which raises the cap (`--override-kv`) the way llama-cpp-python
serves any n_ctx: past its training context the model may answer worse.

The chat template (topology.LlamaServer.template, decided by neverdark.models.template):
`model`, the GGUF's own, runs as Jinja on both engines (llama-server `--jinja`;
llama-cpp-python with no `--chat_format` takes the GGUF's tokenizer.chat_template); any other
name is a built-in template (chatml for a GGUF without one). llama-server runs a built-in one
with `--no-jinja`: under Jinja it would read the name as the template's text (only `chatml` is
special-cased), and a request carrying tools is then refused (400 "tools param requires --jinja
flag") instead of having them pasted into the system prompt by llama.cpp's generic tool format:
tools reach a model only through --jinja and a template that renders them (docs/templates.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from neverdark import contract
from neverdark.models import template

KV_TYPE_IDS = {"f16": 1, "q4_0": 2, "q8_0": 8}   # ggml_type values llama-cpp-python's CLI takes
NATIVE_BINARY = f"{contract.LLAMA_SERVER_LINK}/llama-server"
LAUNCHER = "llama_launcher"          # the package, run with `python -m` from contract.LLAMA_LIB
PYTHON = f"{contract.venv('llama')}/bin/python"
# llama-server's built-in chat templates that neverdark's chat_format names map to one to one.
# (llama-server --help, commit 0c1e570; a name it lacks makes it exit at start.)
NATIVE_TEMPLATES = frozenset((
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r",
    "deepseek", "deepseek2", "deepseek3", "exaone3", "exaone4", "falcon3", "gemma", "gigachat",
    "glmedge", "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense",
    "hunyuan-moe", "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip",
    "llama3", "llama4", "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken",
    "mistral-v7", "mistral-v7-tekken", "monarch", "openchat", "orion", "phi3", "phi4",
    "rwkv-world", "seed_oss", "smolvlm", "vicuna", "vicuna-orca", "yandex", "zephyr"))


# llama-cpp-python's chat formats stop at these strings; llama-server only at the model's own
# end-of-generation tokens unless told.
TEMPLATE_STOPS = {"chatml": "<|im_end|>"}


@dataclass(frozen=True)
class Context:
    """What a server serves each wizard, and why."""

    served: int | None      # tokens one request may hold (None: unknown, cannot be checked)
    limit: str              # the reason, for messages


def served_context(engine: str, n_ctx: int, training: int | None, extend: bool) -> Context:
    if engine == "llama-cpp-python" or extend:
        why = "n_ctx" if engine == "llama-cpp-python" else "n_ctx (extend_context)"
        return Context(n_ctx, why)
    if training is None:
        return Context(None, "training context unknown")
    if training < n_ctx:
        return Context(training, f"the model's training context {training}, where "
                                  "llama-server caps every slot")
    return Context(n_ctx, "n_ctx")


def template_args(name: str) -> list[str]:
    """llama-server's chat template flags for LlamaServer.template `name`."""
    if name == template.MODEL:
        return ["--jinja"]
    return ["--no-jinja", "--chat-template", name]


def native_argv(s, binary: str = NATIVE_BINARY, model_path: str | None = None) -> list[str]:
    """llama-server's command line for a topology.LlamaServer `s` (the paths can be pointed
    elsewhere to run the same command off a host, as the tests and benchmarks do)."""
    slots = len(s.wizards) or 1
    argv = [binary, "--model", model_path or s.model_path, "--alias", s.model,
            "--host", s.listen, "--port", str(s.port),
            # one slot per wizard, each with its own n_ctx (a separate, not a shared, KV pool)
            "--ctx-size", str(s.n_ctx * slots), "--parallel", str(slots), "--no-kv-unified",
            "--threads", str(s.threads), "--threads-batch", str(s.threads),
            *template_args(s.template),
            "--metrics",
            # the slots are the prompt cache: no second copy in RAM
            "--cache-ram", "0", "--ctx-checkpoints", str(s.ctx_checkpoints),
            "--cache-reuse", str(s.cache_reuse),
            # A request goes to the idle slot holding at least half of its prompt, else to the
            # least recently used one. llama.cpp's 0.1 lets any short request (a health ping:
            # 7 of its 25 tokens are the chat template's) take over a wizard's warm slot.
            "--slot-prompt-similarity", "0.5", "--no-webui"]
    if s.template in TEMPLATE_STOPS:
        # The template's end-of-turn marker is plain text to a model whose vocabulary lacks it
        # (Gemma under chatml): llama-server would generate to max_tokens past it, where
        # llama-cpp-python's chatml format stops there. The same stop for every request.
        argv += ["--reverse-prompt", TEMPLATE_STOPS[s.template]]
    if s.swa_full:
        argv.append("--swa-full")
    if s.kv_type != "f16":
        argv += ["--cache-type-k", s.kv_type, "--cache-type-v", s.kv_type, "--flash-attn", "on"]
    if s.mlock:
        argv += ["--load-mode", "mmap+mlock"]
    if s.extend_context and s.training_context and s.n_ctx > s.training_context:
        argv += ["--override-kv", f"{s.architecture}.context_length=int:{s.n_ctx}"]
    return argv


def python_argv(s, python: str = PYTHON, model_path: str | None = None) -> list[str]:
    """The launcher's command line (llama-cpp-python's own server options); it finds the
    package on the PYTHONPATH `environment` sets."""
    argv = [python, "-m", LAUNCHER, "--model", model_path or s.model_path, "--model_alias", s.model,
            "--host", s.listen, "--port", str(s.port),
            "--n_ctx", str(s.n_ctx), "--n_threads", str(s.threads),
            "--n_threads_batch", str(s.threads)]
    if s.template != template.MODEL:
        # without one it takes the GGUF's tokenizer.chat_template (Jinja, or the built-in
        # format it recognises the text as), and llama-2 for a GGUF without one
        argv += ["--chat_format", s.template]
    argv += ["--logits_all", "false", "--interrupt_requests", "false"]
    if s.kv_type != "f16":
        kv = str(KV_TYPE_IDS[s.kv_type])
        argv += ["--type_k", kv, "--type_v", kv, "--flash_attn", "true"]
    argv += ["--use_mlock", "true" if s.mlock else "false", "--verbose", "false"]
    return argv


def argv(s) -> list[str]:
    return native_argv(s) if s.engine == "llama-server" else python_argv(s)


# glibc gives each thread that allocates its own arena and keeps what was freed in it: the HTTP
# threads of both servers took llama-cpp-python's RSS ~75 MB higher under three wizards' turns.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}


def environment(s, launcher_lib: str = contract.LLAMA_LIB) -> dict[str, str]:
    """The unit's environment (`launcher_lib`: where the llama_launcher package is, pointed
    elsewhere to run the same command off a host)."""
    if s.engine == "llama-server":
        return dict(MALLOC_ENV)
    return {**MALLOC_ENV, "PYTHONPATH": launcher_lib,
            "NEVERDARK_SWA_FULL": "true" if s.swa_full else "false",
            "NEVERDARK_CACHE_BYTES": str(s.prompt_cache_bytes)}
