"""The sidecar beyond loopback (`sidecar: {metrics: private}`): the config, the token file, a
real daemon's second listener (401 without the token, the views with it), the plan that asks
for it, and `neverdark prometheus`'s scrape config (checked by promtool)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from neverdark import contract, plan, prometheus
from neverdark.inventory import InventoryError, validate
from sidecar import config, daemon as daemon_mod
from sidecar.daemon import Daemon
from sidecar.http_api import HttpApi, TokenError, bearer, read_token
from testbed.llmock import free_port
from testbed.metrics_text import value
from testbed.sidecar_outputs import write_config

TOKEN = "0123456789abcdef0123456789abcdef"
DATA = Path(__file__).parent / "data" / "inventories"


def token_file(path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- the config -------------------------------------------------------------------------------

def with_keys(path: Path, **keys) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc.update(keys)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_private_listen_in_the_config(tmp_path):
    path = write_config(tmp_path / "s")
    assert config.load(path).private_listen is None         # loopback only by default
    tok = str(tmp_path / "metrics.token")
    cfg = config.load(with_keys(path, private_listen="10.0.0.5:9470", metrics_token_file=tok))
    assert cfg.private_listen == ("10.0.0.5", 9470) and cfg.metrics_token_file == Path(tok)
    text, _ = config.dump(cfg)
    path.write_text(text)
    again = config.load(path)
    assert (again.private_listen, again.metrics_token_file) == (("10.0.0.5", 9470), Path(tok))


@pytest.mark.parametrize("keys, field, words", [
    ({"private_listen": "10.0.0.5:9470"}, "metrics_token_file", "required with private_listen"),
    ({"private_listen": "8.8.8.8:9470", "metrics_token_file": "/t"}, "private_listen",
     "not a private address"),
    ({"private_listen": "127.0.0.1:9470", "metrics_token_file": "/t"}, "private_listen",
     "not a private address"),
    ({"private_listen": "10.0.0.5", "metrics_token_file": "/t"}, "private_listen", "HOST:PORT"),
    ({"private_listen": "10.0.0.5:9470", "metrics_token_file": "t"}, "metrics_token_file",
     "absolute path"),
])
def test_private_listen_refused(tmp_path, keys, field, words):
    path = with_keys(write_config(tmp_path / "s"), **keys)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert f"{path}: {field}: " in str(exc.value) and words in str(exc.value)


# --- the token file ---------------------------------------------------------------------------

def test_token_file_rules(tmp_path):
    assert read_token(token_file(tmp_path / "ok")) == TOKEN.encode()
    with pytest.raises(TokenError, match="readable by others .*0640.* must be 0600"):
        read_token(token_file(tmp_path / "group", mode=0o640))
    with pytest.raises(TokenError, match="at least 16"):
        read_token(token_file(tmp_path / "short", "abc\n"))
    with pytest.raises(TokenError, match="at least 16"):
        read_token(token_file(tmp_path / "two", TOKEN + "\n" + TOKEN + "\n"))
    with pytest.raises(TokenError, match="cannot read"):
        read_token(tmp_path / "absent")
    os.symlink(tmp_path / "ok", tmp_path / "link")
    with pytest.raises(TokenError, match="cannot read"):
        read_token(tmp_path / "link")               # O_NOFOLLOW: not a link planted there


def test_bearer_header():
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nauthorization: Bearer  abc \r\n\r\n"
    assert bearer(head) == b"abc"
    assert bearer(b"GET / HTTP/1.1\r\nAuthorization: Basic abc\r\n\r\n") is None
    assert bearer(b"GET / HTTP/1.1\r\nAuthorization: Bearer\r\n\r\n") is None
    assert bearer(b"GET / HTTP/1.1\r\n\r\n") is None


def test_an_api_with_no_token_to_compare_refuses_all():
    api = HttpApi(dict, str, lambda: True, token=lambda: None)
    assert not api.authorized(b"GET / HTTP/1.1\r\nAuthorization: Bearer x\r\n\r\n")


# --- a real daemon's private listener -----------------------------------------------------------

def private_daemon(tmp_path: Path, mode: int = 0o600) -> tuple[Daemon, tuple[str, int]]:
    """A daemon whose private listener is on 127.0.0.2 (the config refuses loopback there; the
    listener's behaviour does not depend on the address, which test_private_listen_* cover)."""
    cfg = config.load(write_config(tmp_path / "s"))
    tok = token_file(tmp_path / "metrics.token", mode=mode)
    private = ("127.0.0.2", free_port())
    cfg = dataclasses.replace(cfg, private_listen=private, metrics_token_file=tok)
    return Daemon(cfg, systemctl=["false"], show=["false"]), private


def test_the_private_listener_wants_the_token(tmp_path):
    d, (host, port) = private_daemon(tmp_path)
    private, loopback = f"http://{host}:{port}", f"http://127.0.0.1:{d.cfg.listen[1]}"

    async def scenario():
        await d.start()
        try:
            async with httpx.AsyncClient() as c:
                good = {"Authorization": f"Bearer {TOKEN}"}
                out = {
                    "none": await c.get(f"{private}/metrics"),
                    "wrong": await c.get(f"{private}/metrics",
                                         headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}),
                    "basic": await c.get(f"{private}/status",
                                         headers={"Authorization": f"Basic {TOKEN}"}),
                    "badge_none": await c.get(f"{private}/wizards/merlin.svg"),
                    "metrics": await c.get(f"{private}/metrics", headers=good),
                    "status": await c.get(f"{private}/status", headers=good),
                    "json": await c.get(f"{private}/wizards/merlin.json", headers=good),
                    "svg": await c.get(f"{private}/wizards/merlin.svg", headers=good),
                    "healthz": await c.get(f"{private}/healthz", headers=good),
                    "loopback": await c.get(f"{loopback}/metrics"),
                }
        finally:
            await d.close()
        return out

    r = asyncio.run(scenario())
    for name in ("none", "wrong", "basic", "badge_none"):
        assert r[name].status_code == 401, name
        assert r[name].headers["www-authenticate"].startswith("Bearer")
        assert "neverdark" not in r[name].text.replace('realm="neverdark"', "")
    assert r["metrics"].status_code == 200
    assert r["metrics"].headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(r["metrics"].text, "neverdark_active_backend", wizard="merlin",
                 backend="claude") is not None
    assert r["status"].status_code == 200 and "merlin" in r["status"].json()["wizards"]
    assert r["json"].json()["wizard"] == "merlin"
    assert r["svg"].headers["content-type"] == "image/svg+xml"
    assert r["healthz"].status_code == 404              # loopback's, for systemd and the CLI
    assert r["loopback"].status_code == 200             # loopback asks for no token


def test_a_listener_that_cannot_start_leaves_failover_running_and_is_retried(tmp_path,
                                                                              monkeypatch):
    """A token readable by others (or an address not up yet) keeps the private listener down,
    logged, never the sidecar: the wizards are probed and served; once the token is fixed, the
    listener comes up within a retry."""
    monkeypatch.setattr(daemon_mod, "PRIVATE_RETRY_S", 0.2)
    d, (host, port) = private_daemon(tmp_path, mode=0o644)

    async def scenario():
        await d.start()
        try:
            assert d.private is None and d.metrics_token is None
            assert "merlin" in d.runners and not d.runner_tasks["merlin"].done()
            async with httpx.AsyncClient() as c:
                assert (await c.get(f"http://127.0.0.1:{d.cfg.listen[1]}/healthz")).status_code \
                    == 200
                with pytest.raises(httpx.ConnectError):
                    await c.get(f"http://{host}:{port}/metrics")
                os.chmod(d.cfg.metrics_token_file, 0o600)
                for _ in range(50):
                    if d.private is not None:
                        break
                    await asyncio.sleep(0.1)
                r = await c.get(f"http://{host}:{port}/metrics",
                                headers={"Authorization": f"Bearer {TOKEN}"})
                return r.status_code
        finally:
            await d.close()

    assert asyncio.run(scenario()) == 200


# --- the inventory and the plan ---------------------------------------------------------------

def inventory(tmp_path: Path, metrics: str | None, private_address: str | None) -> Path:
    doc = yaml.safe_load((DATA / "minimal.yaml").read_text())
    if metrics:
        doc["sidecar"] = {"metrics": metrics}
    if private_address:
        doc["hosts"]["vps"]["private_address"] = private_address
    (tmp_path / "secrets.env").write_text("ANTHROPIC_API_KEY=sk-ant-listen-test-0001\n"
                                          "NEVERDARK_API_KEY_MERLIN=nd-listen-test-api-key-01\n")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_plan_asks_for_the_private_listener(tmp_path):
    fleet = validate(inventory(tmp_path, "private", "10.1.2.3"), env={})
    cfg = plan.sidecar_config_for(fleet, "vps")
    assert cfg.private_listen == ("10.1.2.3", contract.SIDECAR_PORT)
    assert cfg.metrics_token_file == Path(contract.METRICS_TOKEN_FILE)
    assert cfg.units == (contract.llama_unit("gemma"),)
    assert cfg.watched_units() == [contract.llama_unit("gemma"), contract.wizard_unit("merlin")]
    p = plan.host_plan(fleet, "vps")["sidecar"]
    assert p["metrics_token"] == contract.METRICS_TOKEN_FILE
    assert TOKEN not in repr(p)                     # the token is made on the host, not here
    (tmp_path / "l").mkdir()
    loop = validate(inventory(tmp_path / "l", None, "10.1.2.3"), env={})
    assert plan.sidecar_config_for(loop, "vps").private_listen is None
    assert plan.host_plan(loop, "vps")["sidecar"]["metrics_token"] is None


def test_private_metrics_need_a_private_address(tmp_path):
    path = inventory(tmp_path, "private", None)
    with pytest.raises(InventoryError) as exc:
        validate(path, env={})
    found = [str(p) for p in exc.value.problems if "hosts.vps.private_address" in str(p)]
    assert found and "required with sidecar.metrics: private" in found[0]
    assert found[0].startswith(f"{path}:")


# --- neverdark prometheus ---------------------------------------------------------------------

def test_prometheus_config_for_the_fleet(tmp_path):
    fleet = validate(inventory(tmp_path, "private", "10.1.2.3"), env={})
    out = tmp_path / "prom"
    asked = []
    written = prometheus.write(fleet, out, token=lambda f, h: asked.append(h) or TOKEN)
    assert asked == ["vps"]
    tok = out / "tokens" / "vps"
    assert tok in written and tok.read_text() == TOKEN + "\n"
    assert oct(tok.stat().st_mode & 0o777) == "0o600"
    assert oct((out / "tokens").stat().st_mode & 0o777) == "0o700"
    doc = yaml.safe_load((out / "prometheus.yml").read_text())
    [job] = doc["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"10.1.2.3:{contract.SIDECAR_PORT}"]}]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "tokens/vps"}
    assert {"target_label": "job", "replacement": "neverdark"} in job["relabel_configs"]
    assert TOKEN not in (out / "prometheus.yml").read_text()
    assert (out / "alerts.yml").read_text() == prometheus.RULES.read_text()
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package, scripts/setup.sh installs it)"
    proc = subprocess.run([promtool, "check", "config", str(out / "prometheus.yml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert prometheus.check(out) is None


def test_prometheus_refuses_a_loopback_fleet(tmp_path):
    fleet = validate(inventory(tmp_path, None, None), env={})
    with pytest.raises(prometheus.PrometheusError, match="metrics: private"):
        prometheus.write(fleet, tmp_path / "prom", token=lambda f, h: TOKEN)
    assert not (tmp_path / "prom").exists()


def test_ipv6_targets_are_bracketed():
    assert prometheus.target("fd00::5", 9470) == "[fd00::5]:9470"
    assert prometheus.target("10.0.0.5", 9470) == "10.0.0.5:9470"


def test_the_prometheus_command_says_what_to_set(tmp_path):
    from click.testing import CliRunner

    from neverdark.cli import main
    path = inventory(tmp_path, None, None)
    r = CliRunner().invoke(main, ["prometheus", "--out", str(tmp_path / "prom"),
                                  "--inventory", str(path)])
    assert r.exit_code == 1, r.output
    assert "sidecar: {metrics: private}" in r.output
