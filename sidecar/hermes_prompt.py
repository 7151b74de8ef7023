"""What a wizard's gateway sends its local backend, captured from Hermes itself.

Run with Hermes' own Python (the wizard's venv), as the wizard's user, by sidecar/modelcheck.py:

    HERMES_PYTHON -m sidecar.hermes_prompt --home HOME --variant - [--platform telegram] < VARIANT

It builds an agent the way the gateway's platforms do (Hermes' own config loading, toolsets for
the platform, system prompt: persona, notice, hints, memories as configured), with the local
variant as its managed config but its base_url pointed at a loopback listener here, sends one
user turn, and prints the chat-completion request body the listener received (one JSON line).
The listener answers with one short streamed reply, so nothing reaches a model and no tool runs.

Rebuilding the prompt from parts (SOUL.md, hints, tool schemas) would drift from Hermes; this
runs Hermes' own request assembly. The wizard's home is not written: Hermes gets a scratch
HERMES_HOME holding copies of what shapes the prompt (config.yaml, SOUL.md, memories/), not its
.env (secrets: the local backend needs none, and Telegram must not be polled from here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

USER_TURN = "Hello, are you there?"
PROMPT_FILES = ("config.yaml", "SOUL.md")
PROMPT_DIRS = ("memories",)


class _Capture(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def log_message(self, *args) -> None:   # stdout carries the answer only
        pass

    def do_GET(self) -> None:   # Hermes' endpoint detection: /v1/models, /props, ...
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.do_GET()
            return
        body = json.loads(raw)
        self.bodies.append(body)
        chunk = {"id": "capture", "object": "chat.completion.chunk", "created": 0,
                 "model": body.get("model", ""),
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Yes."},
                              "finish_reason": "stop"}]}
        if body.get("stream"):
            data = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            ctype = "text/event-stream"
        else:
            chunk["object"] = "chat.completion"
            chunk["choices"][0]["message"] = chunk["choices"][0].pop("delta")
            data = json.dumps(chunk).encode()
            ctype = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def scratch_home(home: Path, variant: str, base_url: str, into: Path) -> tuple[Path, Path]:
    """(HERMES_HOME, HERMES_MANAGED_DIR) under `into`: the prompt's inputs, the variant redirected."""
    h, managed = into / "home", into / "managed"
    h.mkdir(mode=0o700)
    managed.mkdir(mode=0o700)
    for name in PROMPT_FILES:
        if (home / name).is_file():
            shutil.copyfile(home / name, h / name)
    for name in PROMPT_DIRS:
        if (home / name).is_dir():
            shutil.copytree(home / name, h / name)
    doc = yaml.safe_load(variant) or {}
    doc.setdefault("model", {})["base_url"] = base_url
    (managed / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return h, managed


def capture(home: Path, variant: str, platform: str) -> dict:
    """The first chat-completion body Hermes sends for one user turn; `variant`: its YAML text."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    with tempfile.TemporaryDirectory(prefix="neverdark-prompt-") as tmp:
        h, managed = scratch_home(home, variant, base_url, Path(tmp))
        os.environ.update(HERMES_HOME=str(h), HERMES_MANAGED_DIR=str(managed))
        for name in ("CUSTOM_BASE_URL", "OPENAI_BASE_URL", "HERMES_ENVIRONMENT_HINT"):
            os.environ.pop(name, None)
        # Imported only now: Hermes reads HERMES_HOME at import.
        from gateway.run import _load_gateway_config, _resolve_gateway_model, \
            _resolve_runtime_agent_kwargs
        from hermes_cli.tools_config import _get_platform_tools
        from run_agent import AIAgent

        runtime = _resolve_runtime_agent_kwargs()
        model = runtime.pop("model", None) or _resolve_gateway_model()
        agent = AIAgent(model=model, **runtime, max_iterations=1, quiet_mode=True,
                        verbose_logging=False, platform=platform,
                        enabled_toolsets=sorted(_get_platform_tools(_load_gateway_config(), platform)),
                        session_id="neverdark-model-check")
        agent.run_conversation(USER_TURN)
    server.shutdown()
    if not _Capture.bodies:
        raise RuntimeError("Hermes sent no chat completion to the capture listener")
    return _Capture.bodies[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.hermes_prompt")
    parser.add_argument("--home", required=True, type=Path, help="the wizard's HERMES_HOME")
    parser.add_argument("--variant", required=True,
                        help="the local backend's variant file, or - to read it on stdin (the "
                             "caller, root, can read /etc/neverdark; the wizard's user need not)")
    parser.add_argument("--platform", default="telegram")
    args = parser.parse_args(argv)
    # Hermes prints to stdout; the body goes out on the original stdout, last.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    variant = sys.stdin.read() if args.variant == "-" else Path(args.variant).read_text()
    body = capture(args.home, variant, args.platform)
    out.write(json.dumps(body) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
