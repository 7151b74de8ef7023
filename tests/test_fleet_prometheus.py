"""A real Prometheus (Debian's `prometheus`, on the runner) scrapes the test fleet's sidecars
over their private addresses with each host's token, as `neverdark prometheus` writes them; a
cloud outage makes NeverdarkWizardOnFallback fire and, after recovery, resolve, read from
Prometheus' own HTTP API; a scrape without the token is refused (issue 18 item 4). The same
drill is timed as the operator lives it: `neverdark panel` (over SSH), the webhook's notices by
incident (one when the trouble begins, one when it is over) and the alert, step by step.

The bed is redeployed with `sidecar: {metrics: private}` (each host's private_address its own
address on the fleet's links) for this module and back to the shared loopback inventory after
it (and once more to see it converge to no changes): each deploy is about 20 s, cheaper than
making every fleet test run private. The operator's testinfra
checks of the token file and the private listener run against that deploy. The rule's
`for: 15m` is rewritten to 10s for the drill, the scrape and evaluation intervals are 2s.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from neverdark import contract, prometheus
from testbed import prometheus_server
from testbed.prometheus_server import api
from testbed.wait import wait_until

pytestmark = [pytest.mark.fleet]

ALERT = "NeverdarkWizardOnFallback"
SETTLE = 20         # s a wizard stays calm before its incident's recovered notice
PANEL_INTERVAL = 3  # s, `neverdark panel`'s default


def fallback_alerts(base: str) -> dict[str, str]:
    """{wizard: state} of the fallback alert as Prometheus has it now (pending or firing)."""
    return {a["labels"]["wizard"]: a["state"] for a in api(base, "alerts")["alerts"]
            if a["labels"]["alertname"] == ALERT}


def open_incidents(events: list[dict]) -> set[str]:
    """The wizards whose last incident notice has no recovered notice after it."""
    open_: set[str] = set()
    for e in events:
        if e.get("notice") == "incident":
            open_.add(e["wizard"])
        elif e.get("notice") == "recovered":
            open_.discard(e["wizard"])
    return open_


def units_evidence(bed, base: str) -> str:
    """What Prometheus and each host say of the units' memory, for a failure's message."""
    said = [f"Prometheus: {api(base, 'query', query='neverdark_unit_memory_bytes')['result']}"]
    unit = contract.llama_unit("*")
    for host in ("vps1", "pi1"):
        said.append(f"--- {host}\n" + bed.ssh(host, (
            "exec 2>&1; systemctl show -p Id,ActiveState,ControlGroup,MemoryCurrent,MainPID "
            f"'{unit}'; for d in /sys/fs/cgroup/systemd/system.slice/neverdark-*; do "
            "echo $d: $(cat $d/cgroup.procs $d/*/cgroup.procs 2>/dev/null); done; "
            f"journalctl -u {contract.SIDECAR_UNIT} -n 20 --no-pager"), check=False)[-3000:])
    return "\n".join(said)


class Timeline:
    """Steps of a drill, shown in seconds from its first; `see` keeps a step's first time, and
    `has` counts the steps seen since the phase began (`start`)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, str]] = []
        self._seen: set[str] = set()
        self._phase: set[str] = set()

    def start(self, t: float, what: str) -> None:
        self._phase = set()
        self.steps.append((t, what))

    def add(self, t: float, what: str) -> None:
        self.steps.append((t, what))

    def see(self, what: str, now_true: bool) -> None:
        if now_true and what not in self._seen:
            self._seen.add(what)
            self._phase.add(what)
            self.steps.append((time.monotonic(), what))

    def has(self, n: int) -> bool:
        return len(self._phase) >= n

    def text(self) -> str:
        first = min(t for t, _ in self.steps)
        return "\n".join(f"  t+{t - first:6.1f} s  {what}" for t, what in sorted(self.steps))


class Panel:
    """`neverdark panel` on the operator's machine (this runner), read as the page reads it."""

    def __init__(self, bed, inventory, log: Path) -> None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        env = dict(os.environ, NEVERDARK_INVENTORY=str(inventory),
                   NEVERDARK_SECRETS=str(bed.secrets_path))
        self.log = log
        with open(log, "wb") as out:        # what it said, for a panel that did not start
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("neverdark")), "panel", "--listen",
                 self.url.removeprefix("http://"), "--interval", str(PANEL_INTERVAL)],
                env=env, stdout=out, stderr=subprocess.STDOUT)

    def state(self, wizard: str) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/api/status", timeout=5) as r:
                return json.loads(r.read())["wizards"][wizard]["state"]
        except (OSError, ValueError, KeyError):
            return None

    def __enter__(self) -> "Panel":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def private_fleet(bed, first_deploy):
    """The bed deployed with metrics: private; its inventory's path. Back to loopback after."""
    doc = bed.inventory(bed.default_wizards())
    doc["sidecar"]["metrics"] = "private"
    doc["sidecar"]["hooks"]["settle"] = SETTLE     # notices by incident, as an operator has them
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
        try:
            memory = wait_until(units_seen, 60, "every unit's memory scraped")
        except AssertionError as e:     # seen once in a whole run (2026-12-06): say what was there
            raise AssertionError(f"{e}\n{units_evidence(bed, base)}") from None
        llama = contract.llama_unit("gemma3-270m")
        assert set(memory) == {("vps1", llama), ("pi1", llama),
                               *((h, contract.wizard_unit(w)) for h, w in
                                 (("vps1", "merlin"), ("vps1", "gandalf"), ("pi1", "radagast")))}
        assert all(v > 20 * 2**20 for v in memory.values()), memory    # a real process's RSS
        assert memory[("vps1", llama)] > 150 * 2**20, memory            # the 253 MB model mapped
        up_units = api(base, "query", query='neverdark_unit_active{job="neverdark"} == 1')
        assert len(up_units["result"]) == 5, up_units

        # The drill, as the operator lives it: the panel on the operator's machine, the
        # webhook notices (by incident: settle 20 s), Prometheus' alert; each sampled every
        # half second, the first time each is seen kept as a step of the timeline.
        wait_until(lambda: not open_incidents(bed.hooks.seen()), 120,
                   "no incident open before the drill")
        timeline = Timeline()
        with Panel(bed, private_fleet, tmp_path / "panel.log") as panel:
            try:
                wait_until(lambda: panel.state("merlin") == "primary", 120, "the panel: merlin")
            except AssertionError as e:
                raise AssertionError(f"{e}; the panel said: {panel.log.read_text()[-3000:]}")
            t0, wall0 = time.monotonic(), time.time()
            claude.fault({"type": "fail", "status": 503, "times": None})
            timeline.start(t0, "claude answers 503 (the outage begins)")

            def outage_seen() -> bool:
                alerts = fallback_alerts(base)
                timeline.see("merlin shown on fallback in the panel",
                             panel.state("merlin") == "fallback")
                timeline.see("merlin's alert pending in Prometheus", "merlin" in alerts)
                timeline.see("merlin's alert firing", alerts.get("merlin") == "firing")
                timeline.see("gandalf's alert firing", alerts.get("gandalf") == "firing")
                for w in ("merlin", "gandalf"):
                    timeline.see(f"{w}: incident notice (webhook)", any(
                        e.get("notice") == "incident" for e in bed.hooks.seen(t0, wizard=w)))
                return timeline.has(4 + 2)
            wait_until(outage_seen, 180, "the outage seen everywhere", every=0.5)
            [alert] = [a for a in api(base, "alerts")["alerts"]
                       if a["labels"]["alertname"] == ALERT and a["labels"]["wizard"] == "merlin"]
            assert alert["labels"]["instance"] == "vps1" and alert["labels"]["job"] == "neverdark"
            assert float(alert["value"]) == 1      # local: backend number 1 of merlin's chain
            assert "radagast" not in fallback_alerts(base)     # pi1's wizard stays calm

            t1, wall1 = time.monotonic(), time.time()
            claude.recover()
            timeline.start(t1, "claude recovered")

            def recovery_seen() -> bool:
                alerts = fallback_alerts(base)
                timeline.see("merlin shown on primary in the panel",
                             panel.state("merlin") == "primary")
                timeline.see("both alerts resolved", not {"merlin", "gandalf"} & set(alerts))
                for w in ("merlin", "gandalf"):
                    timeline.see(f"{w}: recovered notice (webhook)", any(
                        e.get("notice") == "recovered" for e in bed.hooks.seen(t1, wizard=w)))
                return timeline.has(4)
            wait_until(recovery_seen, 300, "the recovery seen everywhere", every=0.5)
        assert api(base, "query", query='neverdark_active_index{job="neverdark",'
                                        'wizard="merlin"}')["result"][0]["value"][1] == "0"
        # The sidecar's own switches, from its records, on the same clock.
        moves = bed.sidecar_status("vps1")["wizards"]["merlin"]["transitions"]
        over = next(t for t in moves if t["at"] >= wall0 and t["kind"] == "failover" and t["ok"])
        back = next(t for t in moves if t["at"] >= wall1 and t["kind"] == "failback" and t["ok"])
        timeline.add(t0 + over["at"] - wall0, "merlin switched to local by its sidecar")
        timeline.add(t1 + back["at"] - wall1, "merlin switched back to claude")
        # One notice per wizard when its trouble began and one when it was over: the failover,
        # the alerts and the failback between them folded in (an escalation only if it got
        # worse: a switch that failed).
        for w in ("merlin", "gandalf"):
            notices = [e.get("notice") for e in bed.hooks.seen(t0, wizard=w)]
            assert [n for n in notices if n != "escalation"] == ["incident", "recovered"], (
                w, bed.hooks.seen(t0, wizard=w))
        [recovered] = bed.hooks.seen(t1, wizard="merlin", notice="recovered")
        assert recovered["incident"]["events"].get("failback", 0) >= 1, recovered
        [opened] = bed.hooks.seen(t0, wizard="merlin", notice="incident")
        print(f"\nthe drill as the operator sees it ({ALERT} for: 10s, 2 s scrapes, the panel "
              f"every {PANEL_INTERVAL} s, notices settle {SETTLE} s):\n{timeline.text()}\n"
              f"  merlin's incident notice: {json.dumps(opened)}\n"
              f"  merlin's recovered notice: {recovered['detail']}")
    finally:
        claude.recover()
        prom.terminate()
        prom.wait(30)
