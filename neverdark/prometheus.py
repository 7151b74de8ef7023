"""`neverdark prometheus --out DIR`: a Prometheus scrape config and the alert rules for the fleet.

With `sidecar: {metrics: private}` each host's sidecar serves /metrics on its private address,
every request bearing that host's token (contract.METRICS_TOKEN_FILE, made on the host by the
deploy). This reads each token over ssh (as the deploy reaches the host) into DIR/tokens/<host>
(0600, never printed), and writes:

    DIR/prometheus.yml   one scrape config per host (each has its own token), all relabelled
                         job="neverdark" (the rules and the dashboard select on it), instance=<host>
    DIR/alerts.yml       monitoring/alerts.yml, the rules tests/test_monitoring.py checks
    DIR/tokens/<host>    the bearer tokens

Relative paths in a Prometheus config are taken from the config file's directory, so DIR can
be moved as a whole (or mounted into a container) and still work.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import yaml

from neverdark import contract
from neverdark.inventory import Fleet

JOB = "neverdark"
RULES = Path(__file__).resolve().parent.parent / "monitoring" / "alerts.yml"
SCRAPE_INTERVAL = "15s"


class PrometheusError(RuntimeError):
    pass


def target(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


def hosts_scraped(fleet: Fleet) -> list[str]:
    """The hosts that run a sidecar (those with wizards)."""
    return [h for h in sorted(fleet.hosts) if fleet.wizards_on(h)]


def config(fleet: Fleet, hosts: list[str], *, interval: str = SCRAPE_INTERVAL,
           rules: str = "alerts.yml", token_dir: str = "tokens") -> dict:
    if fleet.sidecar.metrics != "private":
        raise PrometheusError("sidecar.metrics is loopback: no sidecar listens beyond its host. "
                              "Set `sidecar: {metrics: private}` (and each host's "
                              "private_address), deploy, then run this again")
    scrapes = []
    for host in hosts:
        scrapes.append({
            "job_name": f"{JOB}-{host}",
            "scrape_interval": interval,
            "metrics_path": "/metrics",
            "authorization": {"type": "Bearer", "credentials_file": f"{token_dir}/{host}"},
            "static_configs": [{"targets": [target(fleet.hosts[host].private_address,
                                                   fleet.sidecar.port)]}],
            # One job for the rules and the dashboard; one scrape config per host only because
            # each host has its own token.
            "relabel_configs": [{"target_label": "job", "replacement": JOB},
                                {"target_label": "instance", "replacement": host}],
        })
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [rules], "scrape_configs": scrapes}


def read_token_over_ssh(fleet: Fleet, host: str) -> str:
    from neverdark import remote
    proc, why = remote.attempt(lambda: remote.run(
        fleet, host, f"cat {contract.METRICS_TOKEN_FILE}", timeout=60))
    if proc is None:
        raise PrometheusError(f"{host}: {why}")
    if proc.returncode != 0:
        raise PrometheusError(f"{host}: cannot read {contract.METRICS_TOKEN_FILE}: "
                              f"{remote.why_no_answer(proc)} (deployed with metrics: private?)")
    token = proc.stdout.strip()
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise PrometheusError(f"{host}: {contract.METRICS_TOKEN_FILE} holds no usable token")
    return token


def _write_private(path: Path, text: str) -> None:
    """0600 from the first byte, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(fleet: Fleet, out: Path, *, token: Callable[[Fleet, str], str] = read_token_over_ssh,
          interval: str = SCRAPE_INTERVAL, rules: Path = RULES) -> list[Path]:
    """Write DIR; returns the files written. Every token is read before anything is written."""
    hosts = hosts_scraped(fleet)
    doc = config(fleet, hosts, interval=interval)
    if not rules.is_file():
        raise PrometheusError(f"{rules}: the alert rules are not there (run from a checkout)")
    tokens = {h: token(fleet, h) for h in hosts}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens").mkdir(mode=0o700, exist_ok=True)
    os.chmod(out / "tokens", 0o700)
    written = []
    for h, value in tokens.items():
        _write_private(out / "tokens" / h, value + "\n")
        written.append(out / "tokens" / h)
    _write(out / "prometheus.yml", "# Written by `neverdark prometheus`; run it again after "
           "changing the fleet.\n" + yaml.safe_dump(doc, sort_keys=False))
    _write(out / "alerts.yml", rules.read_text())
    return [out / "prometheus.yml", out / "alerts.yml", *written]


def check(out: Path) -> str | None:
    """`promtool check config` on DIR's config, if promtool is installed: its complaint, or None."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    proc = subprocess.run([promtool, "check", "config", str(out / "prometheus.yml")],
                          capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()
