"""The real Hermes gateway for tests, the demo and benchmarks, and a recording relay.

- `Gateway`: `hermes gateway run` with its own HERMES_HOME and HERMES_MANAGED_DIR, configured
  either exactly as the deploy configures a wizard (`Gateway.for_wizard`) or with only its API
  server (`Gateway.bare`), optionally under a supervisor that restarts it as its unit would
  (`supervised=True`: the sidecar's GatewayControl).
- `variant()`: a minimal backend variant for a bare gateway's managed config.
- `KeyTap`: a loopback TCP relay in front of a backend (LLMock or a real llama server) that keeps
  every request head and body passing through, unchanged. LLMock's request log has bodies but no
  headers, and a llama server keeps neither.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets as pysecrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping

import httpx
import yaml

from neverdark import hermes_config as hc
from testbed import runtimes, wait
from testbed.llmock import free_port

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


class GatewayError(wait.NotReady):
    """The gateway is missing, died or did not come up; the message carries its log tail."""


# A unit's RestartForceExitStatus=75 and ExecReload=kill -USR1 without systemd: Hermes drains and
# exits 75 on SIGUSR1, and this restarts it, writing each child's pid where restart() looks for
# it. A stop signals the whole process group, so the supervisor only has to stop restarting.
SUPERVISOR = r"""
import os, signal, subprocess, sys
pidfile, argv = sys.argv[1], sys.argv[2:]
stopping = False
def stop(_sig, _frame):
    global stopping
    stopping = True
signal.signal(signal.SIGTERM, stop)
rc = 0
while not stopping:
    child = subprocess.Popen(argv)
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(child.pid))
    os.replace(tmp, pidfile)
    rc = child.wait()
    if rc != 75:
        break
sys.exit(rc)
"""


def variant(path: Path, *, provider: str, model: str, base_url: str) -> Path:
    """A minimal backend variant (the managed config's `model:` section) for a bare gateway."""
    doc = {"model": {"provider": provider, "default": model, "base_url": base_url,
                     "api_key": "sk-neverdark-test-" + provider,
                     # Set explicitly: otherwise Hermes looks cloud models up online.
                     "context_length": 128000, "max_tokens": 256}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Gateway:
    """`hermes gateway run` from the pinned hermes venv, with its own HERMES_HOME (`home`) and
    HERMES_MANAGED_DIR (`managed`), its API server on loopback, in a clean environment.

    Two ways to configure it:
    - `Gateway.for_wizard(root, wizard, secrets)`: the wizard's files rendered by
      neverdark.hermes_config exactly as the deploy renders them; `activate(backend)` does what
      the sidecar does.
    - `Gateway.bare(root, active)`: a minimal config (the API server only) whose managed
      directory is `active`'s, so the caller's own variants (`variant()`) are flipped into it.

    `supervised=True` runs it under a small real supervisor that restarts it when it exits 75, the
    way the unit's RestartForceExitStatus=75 does; `restart()` sends SIGUSR1 exactly as the unit's
    ExecReload would. With `gateway_pid()` and `is_active()` that is the sidecar's GatewayControl.
    Only systemd itself is absent (no PID-1 systemd here)."""

    def __init__(self, root: Path, home: Mapping[str, str], *, port: int, key: str,
                 managed: Path, variants: Mapping[str, str] | None = None,
                 wizard: dict | None = None, supervised: bool = False,
                 start_timeout: float = 90) -> None:
        """`home`: file name -> text for HERMES_HOME (written 0600); `variants`: backend name ->
        managed config text, the first active at start."""
        if not HERMES_BIN.exists():
            raise GatewayError(f"Hermes not found at {HERMES_BIN}: set NEVERDARK_HERMES_BIN or "
                               + runtimes.INSTALL_HINT)
        self.wizard, self.port, self.key, self.supervised = wizard, port, key, supervised
        self.home, self.managed = root / "home", managed
        self.rendered = dict(home)
        self.variants = dict(variants or {})
        root.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(mode=0o700)
        self.managed.mkdir(mode=0o750, parents=True, exist_ok=True)
        for name, text in self.rendered.items():
            write_atomic(self.home / name, text, 0o600)
        if self.variants:
            self.activate(next(iter(self.variants)))
        self.pidfile = root / "gateway.pid"
        self.log_path = root / "gateway.log"
        self._log = self.log_path.open("wb")
        argv = [str(HERMES_BIN), "gateway", "run"]
        if supervised:
            argv = [sys.executable, "-c", SUPERVISOR, str(self.pidfile), *argv]
        # A clean environment: an inherited OPENAI_API_KEY or CUSTOM_BASE_URL would change
        # which key or URL Hermes uses.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
               "HERMES_HOME": str(self.home), "HERMES_MANAGED_DIR": str(self.managed)}
        self.proc = subprocess.Popen(argv, env=env, cwd=self.home, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait.wait_http(f"{self.root}/health", self.proc, timeout=start_timeout,
                       what="hermes gateway", log=self.log_path, error=GatewayError,
                       on_fail=self.stop)

    @classmethod
    def for_wizard(cls, root: Path, wizard: dict, secrets: Mapping[str, str],
                   **options) -> Gateway:
        """The wizard's gateway as the deploy configures it, on the wizard's api_port."""
        home = {"config.yaml": hc.render_base_config(wizard),
                ".env": hc.render_env(wizard, secrets),
                "SOUL.md": hc.render_soul(wizard)}
        variants = {b["name"]: hc.render_variant(wizard, b["name"]) for b in wizard["backends"]}
        return cls(root, home, port=wizard["api_port"], key=secrets[wizard["api_key_secret"]],
                   managed=root / "managed", variants=variants, wizard=wizard, **options)

    @classmethod
    def bare(cls, root: Path, active: Path, **options) -> Gateway:
        """A gateway with only its API server configured, on a free port with a fresh key; its
        managed config is `active`, which the caller has installed already."""
        port, key = free_port(), "nd-test-" + pysecrets.token_hex(16)
        config = {"security": {"tirith_enabled": False, "allow_lazy_installs": False},
                  "platforms": {"api_server": {"enabled": True, "extra": {
                      "host": "127.0.0.1", "port": port, "key": key}}}}
        # Hermes' anthropic provider reads its key only from the environment / HERMES_HOME/.env,
        # never from model.api_key; .env is re-read every turn.
        home = {"config.yaml": yaml.safe_dump(config),
                ".env": "ANTHROPIC_API_KEY=sk-ant-neverdark-test\n"}
        return cls(root, home, port=port, key=key, managed=active.parent, **options)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def activate(self, backend: str, text: str | None = None) -> None:
        """What the sidecar does: atomically copy a deploy-owned variant over the active file."""
        write_atomic(self.managed / "config.yaml", self.variants[backend] if text is None else text)

    def log_tail(self) -> str:
        self._log.flush()
        return wait.log_tail(self.log_path)

    def post(self, messages: list[dict], session: str | None = None,
             timeout: float = CHAT_TIMEOUT) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        if session:
            headers["X-Hermes-Session-Id"] = session
        model = self.wizard["name"] if self.wizard else "hermes-agent"
        return httpx.post(f"{self.root}/v1/chat/completions", headers=headers,
                          json={"model": model, "messages": messages}, timeout=timeout)

    def session(self, session_id: str) -> dict:
        r = httpx.get(f"{self.root}/api/sessions/{session_id}",
                      headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    # GatewayControl: what systemctl restart / is-active do for the real unit.

    def gateway_pid(self) -> int | None:
        """The running `hermes gateway run` process (under a supervisor: its latest child)."""
        if not self.supervised:
            return self.proc.pid if self.proc.poll() is None else None
        try:
            return int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None

    async def restart(self) -> None:
        """SIGUSR1, as the unit's ExecReload; returns once the supervisor has started a new one."""
        if not self.supervised:
            raise GatewayError("restart() needs a supervised gateway (supervised=True)")
        old = self.gateway_pid()
        os.kill(old, signal.SIGUSR1)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            new = self.gateway_pid()
            if new is not None and new != old:
                return
            if self.proc.poll() is not None:
                raise GatewayError(f"supervisor exited {self.proc.returncode}:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        raise GatewayError(f"gateway did not come back after SIGUSR1:\n{self.log_tail()}")

    async def is_active(self) -> bool:
        pid = self.gateway_pid()
        if self.proc.poll() is not None or pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM to the process group (the gateway, and its supervisor if any), as systemd's
        stop signals a unit's whole cgroup; SIGKILL if it is not gone in 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
