"""neverdark.hermes_config against the real Hermes gateway and real LLMocks.

Each LLMock sits behind a KeyTap, a loopback TCP relay that records the request heads passing
through, because LLMock's request log has bodies but no headers, and the key a backend receives is
the point of half of these checks. The relay forwards bytes unchanged.

Why one module: the tests share one real gateway and four LLMocks behind their relays (the
module-scoped `fleet` fixture); split, each file would start its own.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from neverdark import hermes_config as hc
from testbed import hermes_gateway, runtimes
from testbed.hermes_gateway import KeyTap, write_atomic
from testbed.llmock import LLMock, free_port

HERMES_BIN = runtimes.HERMES_BIN
CHAT_TIMEOUT = 120


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


class Gateway(hermes_gateway.Gateway):
    """The real gateway (Gateway.for_wizard with this module's SECRETS), and a turn helper that
    checks the basics."""

    def chat(self, text: str) -> tuple[dict, str | None]:
        """One turn; returns the completion and the model its session says answered."""
        r = self.post([{"role": "user", "content": text}], timeout=CHAT_TIMEOUT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "stop", (body, self.log_tail())
        path = hc.session_path(r.headers)
        assert path, dict(r.headers)
        session = httpx.get(f"{self.root}{path}", headers={"Authorization": f"Bearer {self.key}"},
                            timeout=10)
        session.raise_for_status()
        assert hc.answered_by(body) is None  # the completion only echoes the requested name
        return body, hc.answered_by(session.json())


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
        require_hermes()
        gateway = Gateway.for_wizard(root, wizard, SECRETS)
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
    w = wizard_for("anthropic", "openai", "local", notice="Small brain today.")
    assert yaml.safe_load(hc.render_variant(w, "anthropic0"))["agent"]["environment_hint"] == ""
    assert yaml.safe_load(hc.render_variant(w, "openai1"))["agent"]["environment_hint"] == \
        "Small brain today."
    # A lean (local) fallback also says what it cannot do, and asks for short answers.
    local = yaml.safe_load(hc.render_variant(w, "local2"))["agent"]["environment_hint"]
    assert local.startswith("Small brain today. Right now you cannot remember things between "
                            "conversations, read or write files, run commands, schedule tasks "
                            "or search the web")
    assert local.endswith(hc.BREVITY_HINT)


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


# --- what the small model gets: the lean profile on the real gateway --------------------------

PROFILE_KEYS = ("agent", "platform_toolsets", "platform_hints", "memory")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The real llama server with the real Gemma 3 270M: it counts prompt tokens as it sees them."""
    from testbed.llama_server import LlamaServer, LlamaServerError
    try:
        server = LlamaServer(tmp_path_factory.mktemp("llama"), n_ctx=8192)
    except LlamaServerError as e:
        pytest.fail(str(e))
    yield server
    server.stop()


def served_prompt_tokens(llama, body: dict) -> int:
    """What the llama server counts for a request body Hermes sent (its `usage`)."""
    body = {**body, "max_tokens": 1, "stream": False}
    body.pop("stream_options", None)
    r = httpx.post(f"{llama.base_url}/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]


def test_lean_local_variant_sends_a_small_prompt_and_no_tools(live, llama):
    gateway, backends = live
    memories = gateway.home / "memories"
    memories.mkdir(exist_ok=True)
    (memories / "MEMORY.md").write_text("The user's cat is called Sprocket-7731.\n")
    try:
        gateway.activate("claude")
        gateway.chat("remember my cat?")
        primary = only_post(backends, "anthropic")
        for b in backends.values():
            b.reset()
        gateway.activate("local")
        gateway.chat("small brain?")
        lean = only_post(backends, "local")["body"]
        for b in backends.values():
            b.reset()
        gateway.activate("claude")
        gateway.chat("remember my cat?")
        back = only_post(backends, "anthropic")
    finally:
        (memories / "MEMORY.md").unlink()
    system = lean["messages"][0]["content"]
    assert not lean.get("tools")                       # by configuration, not dropped unseen
    assert lean["max_tokens"] == 256
    assert hc.DEFAULT_NOTICE in system and "You are Merlin" in system
    assert "cannot remember things between conversations, read or write files" in system
    assert hc.BREVITY_HINT in system and hc.LEAN_PLATFORM_HINTS["api_server"] in system
    assert "Sprocket-7731" not in system               # memory injection off
    assert "You're responding through an API server" not in system  # Hermes' own hint replaced
    tokens = served_prompt_tokens(llama, lean)
    assert tokens < 600, tokens                        # measured 453 (FIELD-NOTES: 1,735 full)
    # Failback restores everything the primary had: its tools, its hint, its memory.
    assert len(primary["body"]["tools"]) == len(back["body"]["tools"]) >= 10
    assert system_text(back) == system_text(primary)
    assert "Sprocket-7731" in system_text(back)
    assert hc.DEFAULT_NOTICE not in system_text(back)


def test_full_profile_local_variant_for_comparison(live, llama):
    """The same local backend on the full profile: the prompt the server counts is ~4x larger
    (and Hermes' 16 tool schemas ride along for chatml to drop)."""
    gateway, backends = live
    full = dict(next(b for b in gateway.wizard["backends"] if b["name"] == "local"),
                profile="full", tools=None)
    wizard = dict(gateway.wizard, backends=[*gateway.wizard["backends"][:3], full])
    gateway.activate("local", hc.render_variant(wizard, "local"))
    try:
        gateway.chat("small brain?")
    finally:
        gateway.activate("claude")
    body = only_post(backends, "local")["body"]
    assert len(body["tools"]) >= 10
    assert served_prompt_tokens(llama, body) > 1500


def test_variants_set_every_profile_key():
    w = wizard_for("anthropic", "openai", "local")
    docs = [yaml.safe_load(hc.render_variant(w, b["name"])) for b in w["backends"]]
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k
    keys = [{k for k in leaves(d) if k.split(".")[0] in PROFILE_KEYS} for d in docs]
    assert keys[0] == keys[1] == keys[2]
    full, lean = docs[0], docs[2]
    assert full["platform_toolsets"] == {"api_server": None, "telegram": None}
    assert lean["platform_toolsets"] == {"api_server": [], "telegram": []}
    assert full["agent"]["tool_use_enforcement"] == "auto" and lean["agent"]["tool_use_enforcement"] is False
    assert (full["memory"], lean["memory"]) == (hc.FULL_MEMORY, hc.LEAN_MEMORY)
    assert "&" not in hc.render_variant(w, "local2")  # no YAML anchors for Hermes to trip on


def test_a_chosen_toolset_list_reaches_the_variant():
    w = wizard_for("anthropic", "local")
    w["backends"][1]["tools"] = ["memory", "todo"]
    doc = yaml.safe_load(hc.render_variant(w, "local1"))
    assert doc["platform_toolsets"]["telegram"] == ["memory", "todo"]
    assert doc["memory"] == hc.FULL_MEMORY            # the memory tool keeps its notes
    assert "remember things" not in doc["agent"]["environment_hint"]
    w["backends"][1]["tools"] = ["memroy"]
    with pytest.raises(ValueError, match="memroy"):
        hc.render_variant(w, "local1")


def test_toolset_names_are_hermes_own():
    """HERMES_TOOLSETS is what the installed Hermes calls its configurable toolsets."""
    python = require_hermes().parent / "python"
    out = subprocess.run(
        [str(python), "-c", "from hermes_cli.tools_config import CONFIGURABLE_TOOLSETS as C;"
                            "print(' '.join(k for k, _, _ in C))"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "HERMES_HOME": "/tmp/neverdark-no-home"})
    assert out.returncode == 0, out.stderr
    assert tuple(out.stdout.split()) == hc.HERMES_TOOLSETS


# --- the sidecar's check turn through the real gateway ----------------------------------------

def _verify(gateway, backend: str, kind: str, model: str, check, attempts: int = 1):
    import asyncio
    from types import SimpleNamespace
    from sidecar.gateway import verify
    wizard = SimpleNamespace(api_port=gateway.port, api_key=gateway.key)
    target = SimpleNamespace(name=backend, kind=kind, model=model,
                             base_url="http://127.0.0.1:9/v1")  # no engine counters here

    async def run():
        async with httpx.AsyncClient() as client:
            return await verify(wizard, target, client, CHAT_TIMEOUT, check=check,
                                attempts=attempts)
    return asyncio.run(run())


def test_check_turn_refuses_an_echo_of_its_question(live):
    from sidecar.gateway import check_turn
    gateway, backends = live
    gateway.activate("local")
    check = check_turn()
    backends["local"].mock.fault({"type": "reply", "text": check.question, "times": None})
    v = _verify(gateway, "local", "local", "gemma3-270m", check)
    assert not v.ok and "echoes" in v.detail, v
    backends["local"].mock.reset()
    backends["local"].mock.fault({"type": "reply", "text": f"Sure: {check.expected}.", "times": None})
    v = _verify(gateway, "local", "local", "gemma3-270m", check_turn_with(check))
    assert v.ok and v.recognised, v


def check_turn_with(check):
    """The same question with a fresh first message (a fresh Hermes session)."""
    from sidecar.gateway import CheckTurn
    msgs = [dict(m) for m in check.messages]
    msgs[0]["content"] += "0"
    msgs[1]["content"] += "0"
    return CheckTurn(msgs, check.question, check.expected)


def test_check_turn_refuses_an_empty_answer(live):
    from sidecar.gateway import check_turn
    gateway, backends = live
    gateway.activate("local")
    # Every other backend refuses too, so Hermes' own fallback after its empty-answer retries
    # has nowhere to go and the turn ends as the model left it.
    for name in ("anthropic", "openai", "google"):
        backends[name].mock.fault({"type": "fail", "status": 429, "retry_after": 7, "times": None})
    backends["local"].mock.fault({"type": "reply", "text": "", "times": None})
    v = _verify(gateway, "local", "local", "gemma3-270m", check_turn())
    assert not v.ok, v
    assert "empty" in v.detail or "answered nothing" in v.detail or "error" in v.detail, v
    # Hermes resent the empty answer's request: every resend hit the same small prompt.
    assert len(backends["local"].posts()) >= 2


def test_check_turn_retries_a_wrong_answer_and_not_a_wrong_model(live):
    """A small model misses a check now and then: another check (a new conversation) follows,
    up to three; another model answering is not retried."""
    from sidecar.gateway import CHECK_WORDS, check_turn
    gateway, backends = live
    gateway.activate("local")
    backends["local"].mock.fault({"type": "reply", "text": "maddox", "times": None})
    v = _verify(gateway, "local", "local", "gemma3-270m", check_turn(), attempts=3)
    assert not v.ok and "(check 3 of 3)" in v.detail, v
    per_check = len(backends["local"].posts()) // 3
    backends["local"].mock.reset()
    # Only chat completions count down (Hermes sends a local server a few GETs before a turn).
    backends["local"].mock.fault({"type": "reply", "text": "maddox", "times": per_check,
                                  "match": {"path": "/v1/chat/completions"}},
                                 {"type": "reply", "text": " ".join(CHECK_WORDS), "times": None})
    v = _verify(gateway, "local", "local", "gemma3-270m", check_turn(), attempts=3)
    assert v.ok and v.recognised and "(check 2 of 3)" in v.detail, (v, per_check)
    posts = len(backends["local"].posts())
    v = _verify(gateway, "local", "local", "not-the-model", check_turn(), attempts=3)
    assert not v.ok and "not local's" in v.detail and "check" not in v.detail.split(":")[0], v
    assert len(backends["local"].posts()) - posts == 1


def test_check_turn_on_a_cloud_target_reports_an_unrecognised_answer(live):
    from sidecar.gateway import check_turn
    gateway, backends = live
    gateway.activate("gpt")
    v = _verify(gateway, "gpt", "openai", "gpt-test", check_turn())
    assert v.ok and v.recognised is False and "without the check word" in v.detail, v
