"""Capture the request a wizard's Hermes gateway would send its local model, without a turn.

    HERMES_HOME=<home> python prefix.py --variant <local variant yaml> --out <file.json>

Runs with the Hermes venv's own python, as the wizard's user, with the wizard's HERMES_HOME
(SOUL.md, skills, memories: everything the system prompt is built from). The variant becomes
the managed config in a private temporary HERMES_MANAGED_DIR, exactly as the sidecar installs
it when it flips the wizard onto the local model, with one change: its base_url points at a
capture server inside this process. The agent is then built by Hermes' own API server code
(`APIServerAdapter._create_agent`, platform api_server, the same toolsets, session id and
model) and runs one turn with an empty history; the capture server records the chat request
and answers it with a canned reply, so no model, tool or session store is touched (the session
database is replaced by None: no stray session in the wizard's history).

What it writes, atomically: {"model", "messages", "tools", "hermes_version", "captured_at"}:
the body Hermes would POST to /v1/chat/completions, less the sampling fields. The sidecar's
warmer (sidecar/warm.py) sends its stable prefix to the local server.

Standard library and Hermes only; the output is readable by the wizard's group (the sidecar).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CANNED = "ok"
# The first user message of the captured turn; the warmer cuts the prompt where it begins.
USER_TEXT = "neverdark prefix capture"
KEEP = ("model", "messages", "tools", "tool_choice")


class _Capture(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def log_message(self, *args) -> None:   # quiet: the unit's journal is for errors
        pass

    def _json(self, status: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, model: str) -> None:
        chunk = {"id": "chatcmpl-neverdark-capture", "object": "chat.completion.chunk",
                 "created": int(time.time()), "model": model}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "content": CANNED}}]},
                  {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}]
        data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        raw = data.encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": self.server.model,
                                                         "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        self.bodies.append(body)
        if body.get("stream"):
            self._sse(body.get("model", ""))
            return
        self._json(200, {
            "id": "chatcmpl-neverdark-capture", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": CANNED}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def _write_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)


def capture(variant: Path) -> dict:
    import yaml  # Hermes' own dependency

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    doc = yaml.safe_load(variant.read_text()) or {}
    model = doc.get("model") or {}
    server.model = model.get("default", "")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory(prefix="neverdark-prefix-") as managed:
            model["base_url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
            doc["model"] = model
            (Path(managed) / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            os.environ["HERMES_MANAGED_DIR"] = managed
            os.environ.pop("CUSTOM_BASE_URL", None)   # it would override base_url

            from gateway.config import PlatformConfig
            from gateway.platforms.api_server import APIServerAdapter

            adapter = APIServerAdapter(PlatformConfig(enabled=True, extra={
                "host": "127.0.0.1", "port": 0, "key": "neverdark-prefix-capture-key"}))
            adapter._ensure_session_db = lambda: None   # no session lands in state.db
            tokens = adapter._bind_api_server_session(chat_id="neverdark-prefix",
                                                      session_key="neverdark-prefix",
                                                      session_id="neverdark-prefix")
            agent = adapter._create_agent(session_id="neverdark-prefix")
            agent.run_conversation(user_message=USER_TEXT, conversation_history=[],
                                   task_id="neverdark-prefix")
            del tokens
    finally:
        server.shutdown()
    chats = [b for b in _Capture.bodies if isinstance(b.get("messages"), list)]
    if not chats:
        raise RuntimeError("Hermes sent no chat request to the capture server")
    body = chats[0]
    return {k: body[k] for k in KEEP if k in body}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    started = time.monotonic()
    request = capture(args.variant)
    try:
        from importlib.metadata import version
        hermes = version("hermes-agent")
    except Exception:  # noqa: BLE001 -- informational only
        hermes = None
    _write_atomic(args.out, {**request, "hermes_version": hermes,
                             "captured_at": int(time.time()), "user_text": USER_TEXT,
                             "seconds": round(time.monotonic() - started, 2)})
    print(f"captured {len(json.dumps(request))} bytes in {time.monotonic() - started:.1f} s "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
