"""The template copies of the test model (testbed.template_models) served by the real engines,
and the requests the real Hermes gateway sends to a wizard's local backend: for
tests/test_templates_served.py and bench/template_bench.py.

- `hermes_bodies(root)`: the chat request body Hermes sends on a local variant, for three of
  them: `local` (lean, no tools: the default), `tools` (lean, the CHOSEN toolsets) and `full`
  (Hermes' own default toolsets), each as the LLMock standing in for the server received it.
- `serve(engine, family, log_dir)`: one engine started with the unit's command line
  (neverdark.engines) on `family`'s copy with its own template (template "model"), or on the
  test model itself (family None: no template in its GGUF, chatml).
- `rendered(server, body)`: the prompt llama-server makes of a request (POST /apply-template:
  its own template code, no generation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx

from neverdark.models import template
from testbed import template_models
from testbed.hermes_gateway import Gateway
from testbed.llmock import LLMock, free_port
from testbed.localserver import LocalServer, server_spec

CHOSEN = ["memory", "todo"]          # the toolsets the `tools` variant offers
QUESTION = "What is the capital of France?"
PERSONA = "You are Merlin, the fleet's wizard. Sign every answer with a star."
SECRETS = {"MERLIN_API": "nd-api-templates-0123456789abcdef",
           "ANTHROPIC_MERLIN": "sk-ant-api03-templates-0123456789"}


def wizard(primary_root: str, local_root: str, port: int) -> dict:
    """A wizard as neverdark.hermes_config takes it: a cloud primary and three local
    variants of the same server."""
    def local(name: str, tools: list[str] | None, **extra) -> dict:
        return {"name": name, "kind": "local", "model": "gemma3-270m",
                "base_url": f"{local_root}/v1", "api_key_secret": None,
                "context_length": 65536, "max_tokens": 256, "tools": tools, **extra}
    return {
        "name": "merlin", "api_port": port, "api_key_secret": "MERLIN_API",
        "telegram_token_secret": None, "telegram_allowed_users": [],
        "persona": PERSONA, "notice": None,
        "backends": [
            {"name": "claude", "kind": "anthropic", "model": "claude-sonnet-test",
             "base_url": f"{primary_root}/anthropic", "api_key_secret": "ANTHROPIC_MERLIN",
             "context_length": 200000, "max_tokens": 512},
            local("local", []),
            local("tools", CHOSEN),
            local("full", None, profile="full"),
        ],
    }


def hermes_bodies(root: Path) -> dict[str, dict]:
    """Backend name -> the chat request body the real Hermes sent on that local variant."""
    root.mkdir(parents=True, exist_ok=True)
    primary, local = LLMock(root), LLMock(root)
    gateway = None
    try:
        gateway = Gateway.for_wizard(root / "gateway", wizard(primary.root, local.root,
                                                              free_port()), SECRETS)
        bodies = {}
        for name in ("local", "tools", "full"):
            local.reset()
            gateway.activate(name)
            r = gateway.post([{"role": "user", "content": QUESTION}])
            if r.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {r.status_code} {r.text[:300]}\n"
                                   + gateway.log_tail())
            posts = [q for q in local.requests()
                     if q["method"] == "POST" and q["path"].endswith("/chat/completions")]
            if not posts:
                raise RuntimeError(f"{name}: Hermes sent the local backend no chat request")
            bodies[name] = posts[0]["body"]
        return bodies
    finally:
        if gateway is not None:
            gateway.stop()
        primary.stop()
        local.stop()


def serve(engine: str, family: str | None, log_dir: Path, n_ctx: int = 8192) -> LocalServer:
    """One engine serving `family`'s copy with its own template (None: the test model on
    chatml), started (it raises testbed.wait.NotReady when it does not come up)."""
    spec = server_spec(engine, ("merlin",), n_ctx=n_ctx)
    path = None
    if family is not None:
        m = template_models.build(family)
        spec = dataclasses.replace(spec, template=template.MODEL, tools=m.renders_tools)
        path = m.path
    log_dir.mkdir(parents=True, exist_ok=True)
    return LocalServer(spec, log_dir / f"{engine}-{family or 'chatml'}.log",
                       model=path).start(timeout=180)


def rendered(server: LocalServer, body: dict) -> str:
    """The prompt llama-server makes of a request body (no generation)."""
    r = httpx.post(f"{server.root}/apply-template", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["prompt"]


def token_count(server: LocalServer, prompt: str) -> int:
    """llama-server's own tokenization of a rendered prompt as it evaluates it (its special
    tokens parsed, the BOS it adds counted)."""
    r = httpx.post(f"{server.root}/tokenize", json={"content": prompt, "parse_special": True,
                                                    "add_special": True}, timeout=60)
    r.raise_for_status()
    return len(r.json()["tokens"])


def one_token_body(body: dict) -> dict:
    """The same request, answered with one token and not streamed."""
    out = {**body, "max_tokens": 1, "stream": False}
    out.pop("stream_options", None)
    return out


def tool_names(body: dict) -> set[str]:
    return {t["function"]["name"] for t in body.get("tools") or []}
