"""A real `hermes gateway run` configured by neverdark.hermes_config, and a recording relay.

Shared by tests/test_hermes_config.py, tests/test_lean.py and bench/lean_bench.py:

- `KeyTap`: a loopback TCP relay in front of a backend (LLMock or a real llama server) that keeps
  every request head and body passing through, unchanged. LLMock's request log has bodies but no
  headers, and a llama server keeps neither.
- `Gateway`: the real gateway with its own HERMES_HOME and HERMES_MANAGED_DIR, the files written
  exactly as the deploy writes them, and `activate(backend)` doing what the sidecar does (an atomic
  copy of the backend's variant over the managed config).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping

import httpx

from neverdark import hermes_config as hc
from testbed import runtimes

HERMES_BIN = runtimes.HERMES_BIN
CHAT_TIMEOUT = 300


class KeyTap:
    """A relay in front of one backend that keeps every request line, its headers and body."""

    HEAD = re.compile(rb"(GET|POST|PUT|DELETE|PATCH) (\S+) HTTP/1\.[01]\r\n((?:[^\r\n]+\r\n)*)\r\n")

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self._streams: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            seen = bytearray()
            with self._lock:
                self._streams.append(seen)
            threading.Thread(target=self._pipe, args=(client, upstream, seen), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, seen: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if seen is not None:
                    with self._lock:
                        seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _messages(self):
        with self._lock:
            blobs = [bytes(s) for s in self._streams]
        for blob in blobs:
            pos = 0
            while (m := self.HEAD.search(blob, pos)):
                headers = {}
                for line in m.group(3).decode("latin-1").split("\r\n"):
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                body = blob[m.end():m.end() + n]
                pos = m.end() + n
                yield m.group(1).decode(), m.group(2).decode(), headers, body

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        return [(method, path, headers) for method, path, headers, _ in self._messages()]

    def bodies(self, path_part: str) -> list[dict]:
        """The JSON bodies of every POST whose path contains `path_part`, in order."""
        return [json.loads(body) for method, path, _, body in self._messages()
                if method == "POST" and path_part in path and body]

    def keys(self, path_part: str) -> set[str]:
        """Every credential sent with a request whose path contains `path_part`."""
        found = set()
        for _method, path, headers in self.requests():
            if path_part in path:
                for name in ("x-api-key", "x-goog-api-key"):
                    if name in headers:
                        found.add(headers[name])
                auth = headers.get("authorization", "")
                if auth.lower().startswith("bearer "):
                    found.add(auth[7:])
        return found

    def clear(self) -> None:
        with self._lock:
            self._streams.clear()

    def close(self) -> None:
        self.sock.close()


def write_atomic(path: Path, text: str, mode: int = 0o640) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


class GatewayError(RuntimeError):
    pass


class Gateway:
    """`hermes gateway run` on the wizard's port, with its own HERMES_HOME and HERMES_MANAGED_DIR,
    its files rendered by neverdark.hermes_config exactly as the deploy renders them."""

    def __init__(self, root: Path, wizard: dict, secrets: Mapping[str, str],
                 start_timeout: float = 90) -> None:
        if not HERMES_BIN.exists():
            raise GatewayError(f"Hermes not found at {HERMES_BIN}: set NEVERDARK_HERMES_BIN or "
                               + runtimes.INSTALL_HINT)
        self.wizard = wizard
        self.home = root / "home"
        self.managed = root / "managed"
        root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(mode=0o700)
        self.managed.mkdir(mode=0o750)
        self.port = wizard["api_port"]
        self.key = secrets[wizard["api_key_secret"]]
        self.rendered = {
            "config.yaml": hc.render_base_config(wizard),
            ".env": hc.render_env(wizard, secrets),
            "SOUL.md": hc.render_soul(wizard),
        }
        for name, text in self.rendered.items():
            write_atomic(self.home / name, text, 0o600)
        self.variants = {b["name"]: hc.render_variant(wizard, b["name"]) for b in wizard["backends"]}
        self.activate(wizard["backends"][0]["name"])
        self.log_path = root / "gateway.log"
        self._log = self.log_path.open("wb")
        # A clean environment: an inherited OPENAI_API_KEY or CUSTOM_BASE_URL would change
        # which key or URL Hermes uses.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "HERMES_HOME": str(self.home), "HERMES_MANAGED_DIR": str(self.managed)}
        self.proc = subprocess.Popen([str(HERMES_BIN), "gateway", "run"], env=env, cwd=self.home,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_health(start_timeout)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def activate(self, backend: str, text: str | None = None) -> None:
        """What the sidecar does: atomically copy a deploy-owned variant over the active file."""
        write_atomic(self.managed / "config.yaml", self.variants[backend] if text is None else text)

    def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayError(f"hermes gateway exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.root}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise GatewayError(f"hermes gateway not healthy within {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def post(self, messages: list[dict], session: str | None = None,
             timeout: float = CHAT_TIMEOUT) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        if session:
            headers["X-Hermes-Session-Id"] = session
        return httpx.post(f"{self.root}/v1/chat/completions", headers=headers,
                          json={"model": self.wizard["name"], "messages": messages},
                          timeout=timeout)

    def session(self, session_id: str) -> dict:
        r = httpx.get(f"{self.root}/api/sessions/{session_id}",
                      headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
