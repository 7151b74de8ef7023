"""A real Prometheus (Debian's `prometheus`, on the runner) scrapes the test fleet's sidecars
over their private addresses with each host's token, as `neverdark prometheus` writes them; a
cloud outage makes NeverdarkWizardOnFallback fire and, after recovery, resolve, read from
Prometheus' own HTTP API; a scrape without the token is refused (issue 18 item 4).

The bed is redeployed with `sidecar: {metrics: private}` (each host's private_address its own
address on the fleet's links) for this module and back to the shared loopback inventory after
it (and once more to see it converge to no changes): each deploy is about 20 s, cheaper than
making every fleet test run private. The operator's testinfra
checks of the token file and the private listener run against that deploy. The rule's
`for: 15m` is rewritten to 10s for the drill, the scrape and evaluation intervals are 2s.
"""

from __future__ import annotations

import stat
import time
import urllib.error
import urllib.request

import pytest
import yaml

from neverdark import contract, prometheus
from testbed import prometheus_server
from testbed.prometheus_server import api
from testbed.wait import wait_until

pytestmark = [pytest.mark.fleet]

ALERT = "NeverdarkWizardOnFallback"


def fallback_alerts(base: str) -> dict[str, str]:
    """{wizard: state} of the fallback alert as Prometheus has it now (pending or firing)."""
    return {a["labels"]["wizard"]: a["state"] for a in api(base, "alerts")["alerts"]
            if a["labels"]["alertname"] == ALERT}


@pytest.fixture(scope="module")
def private_fleet(bed, first_deploy):
    """The bed deployed with metrics: private; its inventory's path. Back to loopback after."""
    doc = bed.inventory(bed.default_wizards())
    doc["sidecar"]["metrics"] = "private"
    for h in doc["hosts"].values():
        h["private_address"] = h["address"]
    path = bed.run_dir / "fleet-private.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:                               # even a failed private deploy is undone after
        t0 = time.monotonic()
        result = bed.deploy(path)
        assert result.rc == 0, result.output[-6000:]
        print(f"\ndeploy with metrics: private: {time.monotonic() - t0:.0f} s, "
              f"{result.changed} changes")
        again = bed.deploy(path)       # the token made once: converges to no changes
        assert again.rc == 0 and again.changed == 0, again.changed_ops
        yield path
    finally:
        bed.clouds_up()
        t0 = time.monotonic()
        result = bed.deploy()          # back to the shared loopback inventory
        assert result.rc == 0, result.output[-6000:]
        print(f"\ndeploy back to loopback: {time.monotonic() - t0:.0f} s, "
              f"{result.changed} changes")
        # the token is gone with the private listener
        for host in ("vps1", "pi1"):
            assert bed.ssh(host, f"test -e {contract.METRICS_TOKEN_FILE} && echo left "
                                 "|| echo gone").strip() == "gone", host


def test_testinfra_token_and_private_listener_checks_pass(bed, private_fleet):
    """tests/infra's token file (0600, the sidecar user's), listening sockets (loopback and the
    private address only) and 401-without-token checks, against the private deploy."""
    proc = bed.testinfra("-rA", "-k", "metrics_token or private_metrics or ports_listen "
                         "or owners_and_modes", inventory=private_fleet)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # both hosts ran every selected check, none was skipped
    assert proc.stdout.count("PASSED") == 8 and "SKIPPED" not in proc.stdout, proc.stdout[-4000:]


def test_prometheus_scrapes_the_fleet_and_the_fallback_alert_fires_and_resolves(
        bed, private_fleet, tmp_path):
    prometheus_server.binary()              # a clear failure without it
    fleet = bed.validated(private_fleet)
    hosts = prometheus.hosts_scraped(fleet)
    assert hosts == ["pi1", "vps1"]
    out = tmp_path / "prom"
    proc = bed.neverdark("prometheus", "--out", str(out), "--interval", "2s",
                         inventory=private_fleet, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in hosts:
        token_file = out / "tokens" / host
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in proc.stdout + proc.stderr
    # One more job scraping vps1 with no token: Prometheus must see it refused.
    cfg = yaml.safe_load((out / "prometheus.yml").read_text())
    [vps1_job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "neverdark-vps1"]
    bare = {k: v for k, v in vps1_job.items() if k != "authorization"}
    bare["job_name"] = "no-token"
    bare["relabel_configs"] = [{"target_label": "job", "replacement": "no-token"}]
    cfg["scrape_configs"].append(bare)
    (out / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    rules = (out / "alerts.yml").read_text()
    assert rules.count("        for: 15m\n") == 1
    (out / "alerts.yml").write_text(rules.replace("        for: 15m\n", "        for: 10s\n"))

    # And from here, as a client would: 401 with a Bearer challenge.
    [target] = bare["static_configs"][0]["targets"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{target}/metrics", timeout=10)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")

    for wizard, host in (("merlin", "vps1"), ("gandalf", "vps1"), ("radagast", "pi1")):
        bed.wait_active(host, wizard, {"merlin": "claude", "gandalf": "claude",
                                       "radagast": "local"}[wizard], timeout=300)
    prom, base = prometheus_server.start(out / "prometheus.yml", tmp_path)
    claude = bed.mocks["vps1/anthropic"]
    try:
        def up() -> dict | None:
            found = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
                     for r in api(base, "query", query="up")["result"]}
            ours = [v for (job, _), v in found.items() if job == "neverdark"]
            return found if len(found) == 3 and ours == ["1", "1"] else None
        seen = wait_until(up, 120, "every target scraped")
        assert seen[("neverdark", "vps1")] == "1" and seen[("neverdark", "pi1")] == "1", seen
        assert [v for (job, _), v in seen.items() if job == "no-token"] == ["0"], seen
        [bare_target] = [t for t in api(base, "targets")["activeTargets"]
                         if t["labels"]["job"] == "no-token"]
        assert "401" in bare_target["lastError"], bare_target
        # The sidecars' own samples, labelled as the rules and the dashboard select them.
        active = api(base, "query", query='neverdark_active_backend{job="neverdark"} == 1')
        assert {(r["metric"]["instance"], r["metric"]["wizard"], r["metric"]["backend"])
                for r in active["result"]} == {("vps1", "merlin", "claude"),
                                               ("vps1", "gandalf", "claude"),
                                               ("pi1", "radagast", "local")}
        assert fallback_alerts(base) == {}
        # Each model server's and gateway's memory and state (sidecar/units.py: on this v1
        # runner's containers, their processes' resident memory).
        def units_seen() -> dict | None:
            found = {(r["metric"]["instance"], r["metric"]["unit"]): float(r["value"][1])
                     for r in api(base, "query",
                                  query='neverdark_unit_memory_bytes{job="neverdark"}')["result"]}
            return found if len(found) == 5 else None
        memory = wait_until(units_seen, 60, "every unit's memory scraped")
        llama = contract.llama_unit("gemma3-270m")
        assert set(memory) == {("vps1", llama), ("pi1", llama),
                               *((h, contract.wizard_unit(w)) for h, w in
                                 (("vps1", "merlin"), ("vps1", "gandalf"), ("pi1", "radagast")))}
        assert all(v > 20 * 2**20 for v in memory.values()), memory    # a real process's RSS
        assert memory[("vps1", llama)] > 150 * 2**20, memory            # the 253 MB model mapped
        up_units = api(base, "query", query='neverdark_unit_active{job="neverdark"} == 1')
        assert len(up_units["result"]) == 5, up_units

        t0 = time.monotonic()
        claude.fault({"type": "fail", "status": 503, "times": None})
        pending = wait_until(lambda: fallback_alerts(base).get("merlin"), 120,
                             "merlin's fallback seen by Prometheus", every=0.5)
        seen_s = time.monotonic() - t0
        wait_until(lambda: fallback_alerts(base).get("merlin") == "firing", 120,
                   "the alert firing", every=0.5)
        fired_s = time.monotonic() - t0
        [alert] = [a for a in api(base, "alerts")["alerts"]
                   if a["labels"]["alertname"] == ALERT and a["labels"]["wizard"] == "merlin"]
        assert alert["labels"]["instance"] == "vps1" and alert["labels"]["job"] == "neverdark"
        assert float(alert["value"]) == 1      # local: backend number 1 of merlin's chain
        # gandalf shares vps1's claude: on gpt-4.1, its own alert; radagast on pi1 is calm.
        wait_until(lambda: fallback_alerts(base).get("gandalf") == "firing", 60,
                   "gandalf's alert firing", every=0.5)
        assert "radagast" not in fallback_alerts(base)

        t1 = time.monotonic()
        claude.recover()
        wait_until(lambda: "merlin" not in fallback_alerts(base)
                   and "gandalf" not in fallback_alerts(base), 300,
                   "the alerts resolved", every=0.5)
        resolved_s = time.monotonic() - t1
        assert api(base, "query", query='neverdark_active_index{job="neverdark",'
                                        'wizard="merlin"}')["result"][0]["value"][1] == "0"
        print(f"\n{ALERT} (for: 10s, 2 s scrapes): merlin's fallback in Prometheus "
              f"{seen_s:.1f} s after the outage began (alert {pending}), firing at "
              f"{fired_s:.1f} s; both alerts gone {resolved_s:.1f} s after it ended")
    finally:
        claude.recover()
        prom.terminate()
        prom.wait(30)
