"""neverdark.hermes_config against the real Hermes gateway and real LLMocks.

Each LLMock sits behind a KeyTap, a loopback TCP relay that records the request heads passing
through, because LLMock's request log has bodies but no headers, and the key a backend receives is
the point of half of these checks. The relay forwards bytes unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from neverdark import hermes_config as hc
from testbed import runtimes
from testbed.llmock import LLMock, free_port

HERMES_BIN = runtimes.HERMES_BIN
CHAT_TIMEOUT = 120


class KeyTap:
    """A relay in front of one LLMock that keeps every request line and its headers."""

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
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
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

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        with self._lock:
            blobs = [bytes(s) for s in self._streams]
        out = []
        for blob in blobs:
            for m in self.HEAD.finditer(blob):
                headers = {}
                for line in m.group(3).decode("latin-1").split("\r\n"):
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                out.append((m.group(1).decode(), m.group(2).decode(), headers))
        return out

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


class Backend:
    """A real LLMock, reached through a KeyTap."""

    def __init__(self, log_dir: Path) -> None:
        self.mock = LLMock(log_dir)
        self.tap = KeyTap(self.mock.port)

    def posts(self) -> list[dict]:
        return [r for r in self.mock.requests() if r["method"] == "POST"]

    def reset(self) -> None:
        self.mock.reset()
        self.tap.clear()

    def stop(self) -> None:
        self.tap.close()
        self.mock.stop()


def require_hermes() -> Path:
    if not HERMES_BIN.exists():
        pytest.fail(f"Hermes not found at {HERMES_BIN}: set NEVERDARK_HERMES_BIN or "
                    + runtimes.INSTALL_HINT)
    return HERMES_BIN


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, text: str, mode: int = 0o640) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def make_wizard(anthropic: Backend, openai: Backend, google: Backend, local: Backend,
                api_port: int) -> dict:
    return {
        "name": "merlin",
        "api_port": api_port,
        "api_key_secret": "MERLIN_API",
        "telegram_token_secret": None,
        "telegram_allowed_users": [],
        "persona": "You are Merlin, the fleet's wizard. Sign every answer with a star.",
        "notice": None,  # the default notice
        "backends": [
            {"name": "claude", "kind": "anthropic", "model": "claude-sonnet-test",
             "base_url": f"{anthropic.tap.root}/anthropic", "api_key_secret": "ANTHROPIC_MERLIN",
             "context_length": 200000, "max_tokens": 512},
            {"name": "gpt", "kind": "openai", "model": "gpt-test",
             "base_url": f"{openai.tap.root}/v1", "api_key_secret": "OPENAI_MERLIN",
             "context_length": 128000, "max_tokens": 512},
            # Hermes 0.19.0 speaks Gemini's native API only to URLs containing Google's host name
            # (a plain substring test); anything else gets OpenAI chat-completions at
            # <base_url>/chat/completions. The userinfo part carries that name while the request
            # still goes to LLMock's native Gemini routes. Production URLs need no such thing.
            {"name": "gemini", "kind": "google", "model": "gemini-test",
             "base_url": google.tap.root.replace("http://", "http://generativelanguage.googleapis.com@")
             + "/gemini/v1beta",
             "api_key_secret": "GOOGLE_MERLIN", "context_length": 1000000, "max_tokens": 512},
            # Named like the real local model on purpose: Hermes' built-in table gives "gemma"
            # 8,192 tokens, below its 64K floor, unless the context is pinned.
            {"name": "local", "kind": "local", "model": "gemma3-270m",
             "base_url": f"{local.tap.root}/v1", "api_key_secret": None,
             "context_length": 65536, "max_tokens": 256},
        ],
    }


SECRETS = {
    "MERLIN_API": "nd-api-" + secrets.token_hex(16),
    # Hermes sends keys starting sk-ant-api as x-api-key; any other sk-ant- key is taken for an
    # OAuth token (Bearer, plus a "You are Claude Code" system block).
    "ANTHROPIC_MERLIN": "sk-ant-api03-" + secrets.token_hex(12),
    "OPENAI_MERLIN": "sk-openai-" + secrets.token_hex(12),
    "GOOGLE_MERLIN": "AIza-" + secrets.token_hex(12),
    "UNRELATED": "must-not-appear-" + secrets.token_hex(8),
}


class Gateway:
    """`hermes gateway run` on a free port, with its own HERMES_HOME and HERMES_MANAGED_DIR."""

    def __init__(self, root: Path, wizard: dict) -> None:
        hermes = require_hermes()
        self.wizard = wizard
        self.home = root / "home"
        self.managed = root / "managed"
        self.home.mkdir(mode=0o700)
        self.managed.mkdir(mode=0o750)
        self.port = wizard["api_port"]
        self.key = SECRETS[wizard["api_key_secret"]]
        self.rendered = {
            "config.yaml": hc.render_base_config(wizard),
            ".env": hc.render_env(wizard, SECRETS),
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
        self.proc = subprocess.Popen([str(hermes), "gateway", "run"], env=env, cwd=self.home,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_health(90)

    def activate(self, backend: str) -> None:
        """What the sidecar does: atomically copy a deploy-owned variant over the active file."""
        write_atomic(self.managed / "config.yaml", self.variants[backend])

    def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"hermes gateway exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"hermes gateway not healthy within {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def chat(self, text: str) -> tuple[dict, str | None]:
        """One turn; returns the completion and the model its session says answered."""
        auth = {"Authorization": f"Bearer {self.key}"}
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", headers=auth,
                       json={"model": "merlin", "messages": [{"role": "user", "content": text}]},
                       timeout=CHAT_TIMEOUT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "stop", (body, self.log_tail())
        path = hc.session_path(r.headers)
        assert path, dict(r.headers)
        session = httpx.get(f"http://127.0.0.1:{self.port}{path}", headers=auth, timeout=10)
        session.raise_for_status()
        assert hc.answered_by(body) is None  # the completion only echoes the requested name
        return body, hc.answered_by(session.json())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("hermes-config")
    backends: dict[str, Backend] = {}
    gateway = None
    try:
        for name in ("anthropic", "openai", "google", "local"):
            backends[name] = Backend(root)
        wizard = make_wizard(backends["anthropic"], backends["openai"], backends["google"],
                             backends["local"], free_port())
        gateway = Gateway(root, wizard)
        yield gateway, backends
    finally:
        if gateway is not None:
            gateway.stop()
        for b in backends.values():
            b.stop()


@pytest.fixture
def live(fleet):
    gateway, backends = fleet
    for b in backends.values():
        b.reset()
    yield gateway, backends
    for b in backends.values():
        b.reset()


def only_post(backends: dict[str, Backend], expected: str) -> dict:
    """The single generation request of this turn, asserting no other backend got one."""
    for name, b in backends.items():
        if name != expected:
            assert [r["path"] for r in b.posts()] == [], f"{name} was called"
    posts = backends[expected].posts()
    assert len(posts) == 1, posts
    return posts[0]


def system_text(request: dict) -> str:
    body = request["body"]
    if "system" in body:  # Anthropic
        return "\n".join(part["text"] for part in body["system"])
    if "systemInstruction" in body:  # Gemini
        return "\n".join(part["text"] for part in body["systemInstruction"]["parts"])
    return body["messages"][0]["content"]  # OpenAI


# --- on the real gateway -----------------------------------------------------------------------


def test_primary_serves_with_its_own_key(live):
    gateway, backends = live
    gateway.activate("claude")
    _, model = gateway.chat("hello")
    req = only_post(backends, "anthropic")
    assert req["path"] == "/anthropic/v1/messages"
    assert req["model"] == "claude-sonnet-test"
    assert backends["anthropic"].tap.keys("/v1/messages") == {SECRETS["ANTHROPIC_MERLIN"]}
    system = system_text(req)
    assert "You are Merlin" in system
    assert hc.DEFAULT_NOTICE not in system
    assert "Claude Code" not in system
    assert model == "claude-sonnet-test"
    assert hc.backend_for_model(gateway.wizard, model) == "claude"


def test_switch_to_openai_variant_takes_the_next_request(live):
    gateway, backends = live
    pid = gateway.proc.pid
    gateway.activate("gpt")
    _, model = gateway.chat("are you there?")
    req = only_post(backends, "openai")
    assert req["path"] == "/v1/chat/completions"
    assert req["model"] == "gpt-test"
    assert backends["openai"].tap.keys("/chat/completions") == {SECRETS["OPENAI_MERLIN"]}
    system = system_text(req)
    assert hc.DEFAULT_NOTICE in system and "You are Merlin" in system
    assert model == "gpt-test"
    assert gateway.proc.pid == pid and gateway.proc.poll() is None  # no restart


def test_switch_to_google_variant_speaks_native_gemini(live):
    gateway, backends = live
    gateway.activate("gemini")
    _, model = gateway.chat("and now?")
    req = only_post(backends, "google")
    assert req["path"] == "/gemini/v1beta/models/gemini-test:streamGenerateContent"
    assert backends["google"].tap.keys(":streamGenerateContent") == {SECRETS["GOOGLE_MERLIN"]}
    assert hc.DEFAULT_NOTICE in system_text(req)
    assert model == "gemini-test"


def test_switch_to_local_variant_sends_no_cloud_key(live):
    gateway, backends = live
    gateway.activate("local")
    _, model = gateway.chat("small brain?")
    req = only_post(backends, "local")
    assert req["model"] == "gemma3-270m"
    assert req["body"]["max_tokens"] == 256
    assert backends["local"].tap.keys("/chat/completions") == {hc.LOCAL_API_KEY}
    assert hc.DEFAULT_NOTICE in system_text(req)
    assert model == "gemma3-270m"


def test_back_on_the_primary_the_notice_is_gone(live):
    gateway, backends = live
    gateway.activate("claude")
    gateway.chat("welcome back")
    assert hc.DEFAULT_NOTICE not in system_text(only_post(backends, "anthropic"))


def test_per_turn_fallback_takes_the_next_backend_on_429(live):
    gateway, backends = live
    gateway.activate("claude")
    backends["anthropic"].mock.fault({"type": "fail", "status": 429, "retry_after": 7,
                                      "times": None})
    _, model = gateway.chat("primary is rate limited")
    assert [r["fault"] for r in backends["anthropic"].posts()] == ["scenario:429"]
    served = backends["openai"].posts()
    assert [r["status"] for r in served] == [200]
    assert backends["openai"].tap.keys("/chat/completions") == {SECRETS["OPENAI_MERLIN"]}
    assert backends["google"].posts() == [] and backends["local"].posts() == []
    assert model == "gpt-test"  # the session record follows the fallback


def test_per_turn_fallback_runs_down_to_the_local_model(live):
    gateway, backends = live
    gateway.activate("claude")
    for name in ("anthropic", "openai", "google"):
        backends[name].mock.fault({"type": "fail", "status": 429, "retry_after": 7,
                                   "times": None})
    _, model = gateway.chat("everything is down")
    for name in ("anthropic", "openai", "google"):
        assert {r["status"] for r in backends[name].posts()} == {429}, name
    # Each fallback got its own key, never the primary's.
    assert backends["openai"].tap.keys("/chat/completions") == {SECRETS["OPENAI_MERLIN"]}
    assert backends["google"].tap.keys(":streamGenerateContent") == {SECRETS["GOOGLE_MERLIN"]}
    assert backends["local"].tap.keys("/chat/completions") == {hc.LOCAL_API_KEY}
    # Served: the pinned 65,536-token context kept Hermes from refusing "gemma" at 8,192.
    assert [(r["status"], r["model"]) for r in backends["local"].posts()] == [(200, "gemma3-270m")]
    assert model == "gemma3-270m"


def test_hermes_left_the_deploy_owned_files_alone(fleet):
    """Runs after the turns, switches and fallbacks above: a re-deploy would find nothing to do."""
    gateway, _ = fleet
    for name, text in gateway.rendered.items():
        assert (gateway.home / name).read_text() == text, f"Hermes rewrote {name}"
        assert (gateway.home / name).stat().st_mode & 0o777 == 0o600, name
    assert gateway.proc.poll() is None, gateway.log_tail()


# --- rendering, no gateway ---------------------------------------------------------------------


def wizard_for(*kinds: str, **extra) -> dict:
    backends = []
    for i, kind in enumerate(kinds):
        backends.append({
            "name": f"{kind}{i}", "kind": kind, "model": f"model-{kind}{i}",
            "base_url": f"http://127.0.0.1:{9000 + i}/v1",
            "api_key_secret": None if kind == "local" else f"SECRET_{kind.upper()}{i}",
            "context_length": 65536, "max_tokens": 1024})
    return {"name": "w", "api_port": 8642, "api_key_secret": "W_API", "telegram_token_secret": None,
            "persona": None, "notice": None, "backends": backends, **extra}


def secrets_for(wizard: dict) -> dict:
    return {name: f"value-of-{name}-0123456789" for name in hc.secret_names(wizard)} | {
        "UNRELATED": "value-of-unrelated"}


def parse_env(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_env_holds_exactly_what_the_chain_needs():
    w = wizard_for("anthropic", "openai", "google", "local")
    env = parse_env(hc.render_env(w, secrets_for(w)))
    assert env == {"API_SERVER_KEY": "value-of-W_API-0123456789",
                   "ANTHROPIC_API_KEY": "value-of-SECRET_ANTHROPIC0-0123456789",
                   "NEVERDARK_KEY_W__OPENAI1": "value-of-SECRET_OPENAI1-0123456789",
                   "GOOGLE_API_KEY": "value-of-SECRET_GOOGLE2-0123456789"}
    w = wizard_for("openai", "local")
    assert set(parse_env(hc.render_env(w, secrets_for(w)))) == {"API_SERVER_KEY",
                                                                "NEVERDARK_KEY_W__OPENAI0"}


def test_env_never_sets_variables_that_redirect_hermes():
    w = wizard_for("openai", "openai", "local", telegram_token_secret="TG",
                   telegram_allowed_users=[42, 7])
    env = parse_env(hc.render_env(w, secrets_for(w)))
    assert not {"CUSTOM_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"} & set(env)
    assert env["TELEGRAM_BOT_TOKEN"] == "value-of-TG-0123456789"
    assert env["TELEGRAM_ALLOWED_USERS"] == "42,7"
    assert {"NEVERDARK_KEY_W__OPENAI0", "NEVERDARK_KEY_W__OPENAI1"} <= set(env)


def test_env_quotes_values_dotenv_would_mangle():
    w = wizard_for("openai")
    s = secrets_for(w) | {"W_API": "a b'c#d$e"}
    line = hc.render_env(w, s).splitlines()[0]
    assert line == "API_SERVER_KEY='a b\\'c#d$e'"
    for bad in ("two\nlines", "sk-${HOME}"):
        with pytest.raises(ValueError):
            hc.render_env(w, s | {"W_API": bad})


def test_two_backends_of_a_fixed_key_provider_need_one_key():
    w = wizard_for("anthropic", "anthropic")
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        hc.render_env(w, secrets_for(w))
    w["backends"][1]["api_key_secret"] = w["backends"][0]["api_key_secret"]
    assert "ANTHROPIC_API_KEY" in parse_env(hc.render_env(w, secrets_for(w)))


def test_rendered_files_hold_no_secret_value():
    w = wizard_for("anthropic", "openai", "google", "local", telegram_token_secret="TG")
    values = secrets_for(w).values()
    texts = [hc.render_base_config(w), hc.render_soul(w), hc.render_soul(w, degraded=True)]
    texts += [hc.render_variant(w, b["name"]) for b in w["backends"]]
    for text in texts:
        for v in values:
            assert v not in text


def test_variants_set_every_model_leaf_the_base_sets():
    w = wizard_for("anthropic", "openai", "google", "local")
    base_model = yaml.safe_load(hc.render_base_config(w))["model"]
    for b in w["backends"]:
        variant = yaml.safe_load(hc.render_variant(w, b))
        assert set(variant["model"]) >= set(base_model), b["name"]
    local = yaml.safe_load(hc.render_variant(w, "local3"))["model"]
    assert local == {"provider": "custom", "default": "model-local3",
                     "base_url": "http://127.0.0.1:9003/v1", "api_key": hc.LOCAL_API_KEY,
                     "context_length": 65536, "max_tokens": 1024}
    assert yaml.safe_load(hc.render_variant(w, "google2"))["model"]["provider"] == "gemini"


def test_notice_only_in_fallback_variants():
    w = wizard_for("anthropic", "local", notice="Small brain today.")
    assert yaml.safe_load(hc.render_variant(w, "anthropic0"))["agent"]["environment_hint"] == ""
    assert yaml.safe_load(hc.render_variant(w, "local1"))["agent"]["environment_hint"] == \
        "Small brain today."


def test_base_config_chain_and_pins():
    w = wizard_for("anthropic", "openai", "local")
    base = yaml.safe_load(hc.render_base_config(w))
    assert base["fallback_providers"] == [
        {"provider": "custom", "model": "model-openai1", "base_url": "http://127.0.0.1:9001/v1",
         "key_env": "NEVERDARK_KEY_W__OPENAI1"},
        {"provider": "custom", "model": "model-local2", "base_url": "http://127.0.0.1:9002/v1",
         "api_key": hc.LOCAL_API_KEY}]
    assert base["providers"]["neverdark-local2"] == {
        "base_url": "http://127.0.0.1:9002/v1", "models": {"model-local2": {"context_length": 65536}}}
    assert base["security"] == {"tirith_enabled": False, "allow_lazy_installs": False}
    assert base["platforms"]["api_server"] == {"enabled": True,
                                               "extra": {"host": "127.0.0.1", "port": 8642}}
    assert "telegram" not in base["platforms"]


def test_context_below_hermes_floor_is_refused():
    w = wizard_for("local")
    w["backends"][0]["context_length"] = 32768
    with pytest.raises(ValueError, match="64000"):
        hc.render_variant(w, "local0")


def test_rendering_is_deterministic():
    w = wizard_for("anthropic", "openai", "google", "local")
    assert hc.render_base_config(w) == hc.render_base_config(w)
    assert hc.render_env(w, secrets_for(w)) == hc.render_env(w, secrets_for(w))


def test_answered_by_reads_only_session_records():
    assert hc.answered_by({"object": "hermes.session", "session": {"model": "m"}}) == "m"
    assert hc.answered_by({"object": "chat.completion", "model": "merlin"}) is None
    assert hc.session_path({"X-Hermes-Session-Id": "api-1"}) == "/api/sessions/api-1"
    assert hc.session_path({}) is None


def test_a_hermes_rewrite_keeps_variable_names(fleet, tmp_path):
    """Hermes does rewrite config.yaml on some user actions (here `hermes config set`; on a
    host: Telegram /model --global, "always" approvals): it must keep `${VAR}`/key_env names,
    never write the values it resolved. Run on a copy so the gateway's home stays as deployed."""
    gateway, _ = fleet
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for name, text in gateway.rendered.items():
        write_atomic(home / name, text, 0o600)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "HERMES_HOME": str(home)}
    done = subprocess.run([str(require_hermes()), "config", "set", "agent.max_turns", "50"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (home / "config.yaml").read_text()
    assert text != gateway.rendered["config.yaml"]
    doc = yaml.safe_load(text)
    assert doc["agent"]["max_turns"] == 50
    assert doc["model"]["api_key"] is not None and doc["model"]["api_key"].startswith("${")
    assert [e.get("key_env") for e in doc["fallback_providers"]][:2] == ["NEVERDARK_KEY_MERLIN__GPT",
                                                                         "GOOGLE_API_KEY"]
    for value in SECRETS.values():
        assert value not in text


def test_telegram_api_url_points_hermes_at_a_self_hosted_bot_api():
    w = wizard_for("openai", "local", telegram_token_secret="TG", telegram_allowed_users=[42])
    assert yaml.safe_load(hc.render_base_config(w))["platforms"]["telegram"] == {"enabled": True}
    w["telegram_api_url"] = "http://10.0.0.5:8081/bot"
    telegram = yaml.safe_load(hc.render_base_config(w))["platforms"]["telegram"]
    assert telegram == {"enabled": True, "extra": {"base_url": "http://10.0.0.5:8081/bot"}}
