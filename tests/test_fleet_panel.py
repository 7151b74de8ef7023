"""Issue 18: the operator's panel (`neverdark panel`, on the operator's machine, reading the
hosts over SSH) in headless Chromium, following an outage drill on the test fleet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_fleet_drills import PRIMARY, calm, record  # noqa: F401 (calm: fixture)
from testbed.wait import wait_until as wait_for

pytestmark = [pytest.mark.fleet, pytest.mark.e2e]


PANEL_ROWS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll('#wizards tbody tr')]
  .map(tr => [tr.dataset.wizard, {state: tr.dataset.state, active: tr.dataset.active,
     why: tr.querySelector('.why').textContent}])))"""


def test_the_panel_follows_an_outage_drill_on_the_real_fleet(calm, tmp_path):
    """Issue 18: `neverdark panel` (the operator's command, reading the hosts over SSH) in
    headless Chromium while merlin's cloud API is down and back (LLMock answering 503): merlin
    on its local model and back; the DOM is checked before, during and after, with a
    screenshot of each; the sidecar's own badge says the same."""
    import socket

    from testbed.chromium import Chromium

    bed = calm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NEVERDARK_INVENTORY=str(bed.inventory_path),
               NEVERDARK_SECRETS=str(bed.secrets_path))
    panel = subprocess.Popen([str(Path(sys.executable).with_name("neverdark")), "panel",
                              "--listen", f"127.0.0.1:{port}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: _answers(url), timeout=60, what="the panel answering")
        with Chromium() as browser:
            page = browser.open(url)
            page.wait_for("document.querySelector('tr[data-wizard=merlin]') && "
                          "document.querySelector('tr[data-wizard=merlin]').dataset.active === 'claude'",
                          timeout=60, what="merlin on claude")
            rows = json.loads(page.evaluate(PANEL_ROWS))
            for wizard, (_, primary) in PRIMARY.items():
                assert rows[wizard]["active"] == primary and rows[wizard]["state"] == "primary", rows
            page.screenshot(tmp_path / "drill-before.png")

            bed.wait_healthy("vps1", "merlin", "local")   # what merlin fails over onto
            # The outage drill (tests/test_fleet_drills.py): merlin's cloud API answers 503 until
            # recovered, so merlin stays on its local model for as long as the check takes (a
            # `neverdark drill` on an idle runner is over in seconds, within one poll).
            claude = bed.mocks["vps1/anthropic"]
            t0 = time.monotonic()
            claude.fault({"type": "fail", "status": 503, "times": None})
            try:
                page.wait_for("document.querySelector('tr[data-wizard=merlin]').dataset.active "
                              "=== 'local'", timeout=240, what="merlin shown on local")
                shown_local = time.monotonic() - t0
                rows = json.loads(page.evaluate(PANEL_ROWS))
                assert rows["merlin"]["state"] == "fallback", rows
                page.screenshot(tmp_path / "drill-during.png")
                badge = bed.sidecar_get("vps1", "/wizards/merlin.json")
                assert json.loads(badge)["state"] == "fallback", badge
            finally:
                claude.recover()
            t1 = time.monotonic()
            page.wait_for("document.querySelector('tr[data-wizard=merlin]').dataset.active "
                          "=== 'claude'", timeout=400, what="merlin shown back on claude")
            shown_back = time.monotonic() - t1
            rows = json.loads(page.evaluate(PANEL_ROWS))
            assert rows["merlin"]["state"] == "primary", rows
            page.screenshot(tmp_path / "drill-after.png")
        record(bed, "panel_outage", {"shown_on_local_s": round(shown_local, 1),
                                     "shown_back_after_recovery_s": round(shown_back, 1)})
    finally:
        panel.terminate()
        try:
            out, _ = panel.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            panel.kill()
            out, _ = panel.communicate()
    for name in ("drill-before.png", "drill-during.png", "drill-after.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out


def _answers(url: str) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False
