"""deploys/hermes/prefix.py against the real gateway: what it captures, without any turn or
model, is what a real Hermes 0.19.0 gateway then sends the local backend, byte for byte (the
system prompt and the tools), so the warmer computes the very prefix real turns reuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import yaml

from neverdark import hermes_config as hc
from testbed import runtimes
from testbed.hermes_gateway import Gateway
from testbed.llmock import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploys" / "hermes"))
import prefix  # noqa: E402  (the script the deploy installs, imported for its capture server)


def wizard(local_url: str) -> dict:
    return {"name": "merlin", "api_port": free_port(), "api_key_secret": "API_KEY",
            "telegram_token_secret": None, "telegram_allowed_users": [], "telegram_api_url": None,
            "persona": "You are Merlin, keeper of the northern tower.",
            "notice": hc.DEFAULT_NOTICE, "backends": [
                {"name": "claude", "kind": "anthropic", "model": "claude-sonnet-4-5",
                 "base_url": "http://127.0.0.1:9/anthropic", "api_key_secret": "ANTHROPIC",
                 "context_length": 200000, "max_tokens": 1024, "profile": "full", "tools": None},
                {"name": "local", "kind": "local", "model": "gemma3-270m",
                 "base_url": local_url, "api_key_secret": None, "context_length": 65536,
                 "max_tokens": 64, "profile": "lean", "tools": []}]}


def test_the_captured_prefix_is_what_the_gateway_sends(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), prefix._Capture)
    server.model = "gemma3-270m"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prefix._Capture.bodies = []
    spec = wizard(f"http://127.0.0.1:{server.server_address[1]}/v1")
    secrets = {"API_KEY": "nd-test-" + "k" * 24, "ANTHROPIC": "sk-ant-test-0000"}
    gw = Gateway.for_wizard(tmp_path / "gw", spec, secrets)
    try:
        gw.activate("local")
        r = gw.post([{"role": "user", "content": "Hello, who are you?"}])
        assert r.status_code == 200, r.text
        sent = [b for b in prefix._Capture.bodies if isinstance(b.get("messages"), list)][0]
        variant = tmp_path / "local.yaml"
        variant.write_text(gw.variants["local"])
        out = tmp_path / "prefix.json"
        proc = subprocess.run(
            [str(runtimes.HERMES_BIN.parent / "python"), str(REPO / "deploys/hermes/prefix.py"),
             "--variant", str(variant), "--out", str(out)],
            env={"PATH": "/usr/bin:/bin", "HOME": str(gw.home), "HERMES_HOME": str(gw.home),
                 "LANG": "C.UTF-8"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        gw.stop()
        server.shutdown()
    captured = json.loads(out.read_text())
    assert captured["messages"][0] == sent["messages"][0]          # the system prompt
    assert captured.get("tools") == sent.get("tools")
    assert [m["role"] for m in captured["messages"]] == [m["role"] for m in sent["messages"]]
    assert captured["model"] == sent["model"] == "gemma3-270m"
    assert "Merlin" in captured["messages"][0]["content"]
    # Written for the sidecar to read (group), never for everyone.
    assert out.stat().st_mode & 0o777 == 0o640
    # The variant it ran with is the deploy's own, untouched (its base_url pointed elsewhere
    # only inside the capture's private managed dir).
    assert yaml.safe_load(variant.read_text())["model"]["base_url"] == spec["backends"][1]["base_url"]
