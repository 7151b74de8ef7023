"""A real Prometheus (Debian's `prometheus`, which scripts/setup.sh installs) scrapes a real
sidecar daemon's private listener with the config `neverdark prometheus` writes: the token gets
its samples in, a scrape without it is refused (401: the target is down), and alert rules from
monitoring/alerts.yml fire from the sidecar's own metrics (and resolve: a drill against real
LLMock servers moves the wizard to its fallback and back), all read from Prometheus' HTTP API.

On the runner, without the test fleet: the daemon runs here (testbed/sidecar_outputs.py: both
backends refused, so its wizard goes dark; or two LLMock servers for the drill), its private
listener on 127.0.0.2 (the listener does not depend on the address; the inventory's private
address is the config's target, rewritten to where this daemon listens). The rules' `for:` is
rewritten to 2s. The switch flips the active config only (no gateway here, as in
tests/test_sidecar_daemon.py). The same over the test fleet's private addresses is the fleet
test's to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path

import yaml

from neverdark import prometheus
from neverdark.inventory import validate
from sidecar import config, flip
from sidecar.daemon import Daemon
from sidecar.switch import SwitchResult
from testbed.hermes_gateway import variant
from testbed import prometheus_server
from testbed.llmock import LLMock, free_port
from testbed.prometheus_server import api
from testbed.sidecar_outputs import fake_units, write_config

TOKEN = "f00dfeedf00dfeedf00dfeedf00dfeed"
DATA = Path(__file__).parent / "data" / "inventories"


def poll(check, timeout: float, what: str):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:          # Prometheus still starting
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def scrape_dir(tmp_path: Path, target: str) -> Path:
    """`neverdark prometheus`'s output for a one-host fleet, its target pointed at `target`, and
    a second job scraping the same listener with no token."""
    doc = yaml.safe_load((DATA / "minimal.yaml").read_text())
    doc["sidecar"] = {"metrics": "private"}
    doc["hosts"]["vps"]["private_address"] = "10.1.2.3"
    (tmp_path / "secrets.env").write_text("ANTHROPIC_API_KEY=sk-ant-scrape-test-0001\n"
                                          "NEVERDARK_API_KEY_MERLIN=nd-scrape-test-api-key-1\n")
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    fleet = validate(tmp_path / "fleet.yaml", env={})
    out = tmp_path / "prom"
    prometheus.write(fleet, out, token=lambda f, h: TOKEN, interval="1s")
    cfg = yaml.safe_load((out / "prometheus.yml").read_text())
    cfg["global"]["evaluation_interval"] = "1s"
    [job] = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    bare = {k: v for k, v in job.items() if k != "authorization"}
    bare["job_name"] = "no-token"
    bare["relabel_configs"] = [{"target_label": "job", "replacement": "no-token"}]
    cfg["scrape_configs"].append(bare)
    (out / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    rules = (out / "alerts.yml").read_text()
    for wait in ("1m", "15m"):          # NeverdarkWizardDark's, NeverdarkWizardOnFallback's
        assert rules.count(f"        for: {wait}\n") == 1
        rules = rules.replace(f"        for: {wait}\n", "        for: 2s\n")
    (out / "alerts.yml").write_text(rules)
    return out


def test_a_real_prometheus_scrapes_the_private_listener_and_the_dark_alert_fires(tmp_path):
    prometheus_server.binary()              # a clear failure without it
    cfg = config.load(write_config(tmp_path / "sidecar"))
    tok = tmp_path / "metrics.token"
    tok.write_text(TOKEN + "\n")
    os.chmod(tok, 0o600)
    listen = ("127.0.0.2", free_port())
    cfg = dataclasses.replace(cfg, private_listen=listen, metrics_token_file=tok)
    show, cgroup = fake_units(tmp_path / "sidecar")
    out = scrape_dir(tmp_path, f"{listen[0]}:{listen[1]}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def up() -> dict | None:
        found = {r["metric"]["job"]: r["value"][1] for r in api(base, "query", query="up")["result"]}
        return found if len(found) == 2 else None

    def observe() -> dict:
        seen = {"up": poll(up, 60, "both targets scraped")}
        seen["targets"] = {t["labels"]["job"]: t for t in api(base, "targets")["activeTargets"]}
        seen["firing"] = poll(lambda: [a for a in api(base, "alerts")["alerts"]
                                       if a["labels"]["alertname"] == "NeverdarkWizardDark"
                                       and a["state"] == "firing"], 60, "the dark alert firing")
        seen["oom"] = api(base, "query", query='neverdark_unit_oom_kills_total{job="neverdark"}')
        return seen

    async def scenario() -> dict:
        daemon = Daemon(cfg, systemctl=["false"], show=show, cgroup_root=cgroup)
        await daemon.start()
        prom, _ = prometheus_server.start(out / "prometheus.yml", tmp_path, port)
        try:
            return await asyncio.to_thread(observe)
        finally:
            prom.terminate()
            await asyncio.to_thread(prom.wait, 30)
            await daemon.close()

    seen = asyncio.run(scenario())
    assert seen["up"] == {"neverdark": "1", "no-token": "0"}
    assert "401" in seen["targets"]["no-token"]["lastError"]
    assert seen["targets"]["neverdark"]["labels"]["instance"] == "vps"
    [alert] = seen["firing"]
    assert alert["labels"]["wizard"] == "merlin" and alert["labels"]["instance"] == "vps"
    assert alert["labels"]["severity"] == "critical"
    kills = {r["metric"]["unit"]: r["value"][1] for r in seen["oom"]["result"]}
    assert kills == {"neverdark-llama-gemma-test.service": "0",
                     "neverdark-wizard-merlin.service": "2"}


# --- a drill: the fallback alert fires and resolves ----------------------------------------------

async def flip_only(wizard, to, previous, client, systemctl, *, restart_permit=None):
    """The real atomic flip of the active config; no gateway to restart or verify here."""
    await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
    return SwitchResult(True, False, "flipped (no gateway here)", {})


def live_config(root: Path, primary: LLMock, fallback: LLMock) -> Path:
    """write_config's daemon, its backends the two LLMock servers; probes every 0.3 s."""
    path = write_config(root)
    doc = yaml.safe_load(path.read_text())
    w = doc["wizards"]["merlin"]
    claude, local = w["backends"]
    variant(Path(claude["variant"]), provider="anthropic", model="claude-test",
            base_url=primary.anthropic_base)
    variant(Path(local["variant"]), provider="custom", model="gemma-test",
            base_url=fallback.openai_base)
    flip.atomic_install(Path(claude["variant"]), Path(w["active_config"]))
    claude["base_url"], local["base_url"] = primary.anthropic_base, fallback.openai_base
    doc["probe"] = {"interval": 0.3, "timeout": 2, "fall": 2, "rise": 2, "min_dwell": 3}
    path.write_text(yaml.safe_dump(doc))
    return path


def firing(base: str, name: str) -> list[dict]:
    return [a for a in api(base, "alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_the_fallback_alert_fires_during_a_drill_and_resolves_after_it(tmp_path):
    prometheus_server.binary()              # a clear failure without it
    primary, fallback = LLMock(tmp_path), LLMock(tmp_path)
    try:
        cfg = config.load(live_config(tmp_path / "sidecar", primary, fallback))
        tok = tmp_path / "metrics.token"
        tok.write_text(TOKEN + "\n")
        os.chmod(tok, 0o600)
        listen = ("127.0.0.2", free_port())
        cfg = dataclasses.replace(cfg, private_listen=listen, metrics_token_file=tok)
        out = scrape_dir(tmp_path, f"{listen[0]}:{listen[1]}")
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def drill(policy) -> dict:
            seen = {}
            poll(lambda: policy.active == "claude" and policy.health["claude"].healthy
                 and policy.health["local"].healthy, 60, "both backends healthy")
            poll(lambda: api(base, "query", query='neverdark_active_index{job="neverdark"} == 0'
                             )["result"], 60, "Prometheus seeing merlin on its primary")
            assert not firing(base, "NeverdarkWizardOnFallback")
            t0 = time.monotonic()
            primary.fault({"type": "fail", "status": 503, "times": None})
            poll(lambda: policy.active == "local", 60, "failover")
            seen["failover_s"] = time.monotonic() - t0
            seen["fired"] = poll(lambda: firing(base, "NeverdarkWizardOnFallback"), 60,
                                 "the fallback alert firing")
            seen["fired_s"] = time.monotonic() - t0
            t1 = time.monotonic()
            primary.reset()
            poll(lambda: policy.active == "claude", 60, "failback")
            seen["failback_s"] = time.monotonic() - t1
            poll(lambda: not [a for a in api(base, "alerts")["alerts"]
                              if a["labels"]["alertname"] == "NeverdarkWizardOnFallback"], 60,
                 "the fallback alert resolved")
            seen["resolved_s"] = time.monotonic() - t1
            seen["transitions"] = [t["kind"] for t in policy.transitions]
            return seen

        async def scenario() -> dict:
            daemon = Daemon(cfg, systemctl=["false"], show=["false"], switch_fn=flip_only)
            await daemon.start()
            prom, _ = prometheus_server.start(out / "prometheus.yml", tmp_path, port)
            try:
                return await asyncio.to_thread(drill, daemon.runners["merlin"].policy)
            finally:
                prom.terminate()
                await asyncio.to_thread(prom.wait, 30)
                await daemon.close()

        seen = asyncio.run(scenario())
    finally:
        primary.stop()
        fallback.stop()
    assert seen["transitions"] == ["failover", "failback"]
    [alert] = seen["fired"]
    assert alert["labels"]["wizard"] == "merlin" and alert["labels"]["instance"] == "vps"
    assert float(alert["value"]) == 1                      # backend number 1: the fallback
    # Fired only after the rule's `for:` (2 s here) past the failover, and well within the
    # scrape and evaluation rounds (1 s each) after that.
    assert seen["failover_s"] + 2 <= seen["fired_s"] <= seen["failover_s"] + 15, seen
    print(f"\nfailover {seen['failover_s']:.1f} s, alert firing {seen['fired_s']:.1f} s after "
          f"the outage began; failback {seen['failback_s']:.1f} s, alert gone "
          f"{seen['resolved_s']:.1f} s after it ended")
