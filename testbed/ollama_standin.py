"""A stand-in Ollama server on loopback, speaking Ollama's real API shapes.

Ollama is a Go binary that is not installable here; what neverdark reads from it is small and
documented: `GET /api/tags` (pulled models), `GET /api/ps` (loaded models, each with its
`context_length`), `POST /api/show` (`parameters` as Modelfile text, e.g. "num_ctx 4096"),
`GET /api/version`, and the OpenAI-compatible `GET /v1/models` and `POST /v1/chat/completions`
(JSON, or server-sent events with `stream: true`) that Hermes talks to.

    with OllamaStandIn({"qwen2.5:0.5b": {"num_ctx": 65536}}) as ollama:
        ollama.root            # http://127.0.0.1:PORT  (the inventory's base_url)
        ollama.chats           # every chat completion request body received
        ollama.load("qwen2.5:0.5b", context=8192)   # as `ollama run` would: now in /api/ps
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIGEST = "sha256:" + "0" * 64


class OllamaStandIn:
    def __init__(self, models: dict[str, dict], answer: str = "Plain answer from ollama.") -> None:
        """`models`: name -> {"num_ctx": N (in its Modelfile parameters, optional),
        "trained": N (model_info context_length)}."""
        self.models = {self._norm(n): dict(v) for n, v in models.items()}
        self.answer = answer
        self.loaded: dict[str, int] = {}
        self.chats: list[dict] = []
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status: int, doc) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> dict:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return json.loads(raw or b"{}")

            def do_GET(self):  # noqa: N802 -- http.server's naming
                if self.path == "/api/tags":
                    return self._json(200, {"models": [stand_in._tag(n) for n in stand_in.models]})
                if self.path == "/api/ps":
                    return self._json(200, {"models": [stand_in._ps(n, c) for n, c in
                                                       stand_in.loaded.items()]})
                if self.path == "/api/version":
                    return self._json(200, {"version": "0.12.6"})
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [
                        {"id": n, "object": "model", "created": 1730000000,
                         "owned_by": "library"} for n in stand_in.models]})
                if self.path in ("/", "/api"):
                    body = b"Ollama is running"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                return self._json(404, {"error": "404 page not found"})

            def do_HEAD(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):  # noqa: N802
                body = self._body()
                if self.path == "/api/show":
                    name = stand_in._norm(body.get("model") or body.get("name") or "")
                    if name not in stand_in.models:
                        return self._json(404, {"error": f"model '{name}' not found"})
                    return self._json(200, stand_in._show(name))
                if self.path == "/v1/chat/completions":
                    name = stand_in._norm(body.get("model") or "")
                    if name not in stand_in.models:
                        return self._json(404, {"error": {"message": f"model \"{name}\" not "
                                                          "found, try pulling it first",
                                                          "type": "api_error"}})
                    with stand_in._lock:
                        stand_in.chats.append(body)
                    stand_in.load(name)
                    if body.get("stream"):
                        return self._stream(name)
                    return self._json(200, stand_in._completion(name, body))
                return self._json(404, {"error": "404 page not found"})

            def _stream(self, name: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                base = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": name,
                        "system_fingerprint": "fp_ollama"}
                chunks = [{"index": 0, "delta": {"role": "assistant",
                                                 "content": stand_in.answer},
                           "finish_reason": None},
                          {"index": 0, "delta": {"role": "assistant", "content": ""},
                           "finish_reason": "stop"}]
                for choice in chunks:
                    self.wfile.write(b"data: " + json.dumps({**base, "choices": [choice]}).encode()
                                     + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def _norm(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    def load(self, name: str, context: int | None = None) -> None:
        """What Ollama does on a request or `ollama run`: load the model with its num_ctx
        (Modelfile), else the server default, 4096."""
        name = self._norm(name)
        with self._lock:
            self.loaded[name] = context or self.models[name].get("num_ctx") or 4096

    def _tag(self, name: str) -> dict:
        return {"name": name, "model": name, "modified_at": "2025-10-01T12:00:00Z",
                "size": 397821319, "digest": DIGEST[7:],
                "details": {"parent_model": "", "format": "gguf", "family": "qwen2",
                            "families": ["qwen2"], "parameter_size": "494.03M",
                            "quantization_level": "Q4_K_M"}}

    def _ps(self, name: str, context: int) -> dict:
        return {**self._tag(name), "expires_at": "2030-01-01T00:00:00Z", "size_vram": 0,
                "context_length": context}

    def _show(self, name: str) -> dict:
        spec = self.models[name]
        params = ["stop \"<|im_start|>\"", "stop \"<|im_end|>\""]
        if spec.get("num_ctx"):
            params.append(f"num_ctx                        {spec['num_ctx']}")
        return {"license": "Apache License 2.0",
                "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {name}\n",
                "parameters": "\n".join(params),
                "template": "{{ .Prompt }}",
                "details": self._tag(name)["details"],
                "model_info": {"general.architecture": "qwen2",
                               "qwen2.context_length": spec.get("trained", 32768),
                               "qwen2.block_count": 24},
                "capabilities": ["completion", "tools"],
                "modified_at": "2025-10-01T12:00:00Z"}

    def _completion(self, name: str, body: dict) -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                "model": name, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                      "content": self.answer},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 42, "completion_tokens": 5, "total_tokens": 47}}

    def __enter__(self) -> "OllamaStandIn":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
