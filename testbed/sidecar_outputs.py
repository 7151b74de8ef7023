"""What a real sidecar daemon serves, for tests that must match it: its `/status` document and
its `/metrics` text, read over its own HTTP API after its first probe rounds.

The daemon runs in this process with a real config file (one wizard, a cloud primary and a local
fallback, both pointing at closed loopback ports: every probe fails with `refused`, so it
counts failures and, with nothing healthy, never switches). Its units are read from a cgroup v2
tree written here and a stand-in `systemctl show` (the runner has no systemd to ask): the
model server's unit active with a limit, the gateway's failed after an OOM kill. The monitoring test compares the
metric families with monitoring/metrics.txt; the status test compares the stand-in sidecar's
document with the status.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from pathlib import Path

import httpx
import yaml

from sidecar import config, flip, modelcheck
from sidecar.daemon import Daemon
from testbed.hermes_gateway import variant
from testbed.llmock import free_port


MODEL_UNIT = "neverdark-llama-gemma-test.service"
GATEWAY_UNIT = "neverdark-wizard-merlin.service"
UNITS = {MODEL_UNIT: {"ActiveState": "active", "NRestarts": "1",
                      "memory.current": "123456789", "memory.max": "536870912",
                      "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n"},
         GATEWAY_UNIT: {"ActiveState": "failed", "NRestarts": "4",
                        "memory.current": "0", "memory.max": "max",
                        "memory.events": "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n"}}


def fake_units(root: Path) -> tuple[list[str], Path]:
    """(a stand-in `systemctl` command, a cgroup v2 root) describing UNITS."""
    cgroup = root / "cgroup"
    (cgroup / "system.slice").mkdir(parents=True, exist_ok=True)
    (cgroup / "cgroup.controllers").write_text("cpu memory pids\n")
    blocks = []
    for unit, u in UNITS.items():
        d = cgroup / "system.slice" / unit
        d.mkdir(exist_ok=True)
        for f in ("memory.current", "memory.max", "memory.events"):
            (d / f).write_text(u[f] + ("" if u[f].endswith("\n") else "\n"))
        blocks.append(f"Id={unit}\nActiveState={u['ActiveState']}\nNRestarts={u['NRestarts']}\n"
                      f"ControlGroup=/system.slice/{unit}\nMemoryCurrent=[not set]\n")
    script = root / "systemctl.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        blocks = {dict(zip(UNITS, blocks))!r}
        assert sys.argv[1:3] == ["show", "-p"], sys.argv
        units = sys.argv[sys.argv.index("--") + 1:]
        print("\\n".join(blocks.get(u, f"Id={{u}}\\nActiveState=inactive\\nNRestarts=0\\n")
                          for u in units))
        """))
    return [sys.executable, str(script)], cgroup


def write_config(root: Path, hooks: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dead = [free_port(), free_port()]
    variants = root / "backends"
    variants.mkdir(exist_ok=True)
    claude = variant(variants / "claude.yaml", provider="anthropic", model="claude-test",
                     base_url=f"http://127.0.0.1:{dead[0]}")
    local = variant(variants / "local.yaml", provider="custom", model="gemma-test",
                    base_url=f"http://127.0.0.1:{dead[1]}/v1")
    active = root / "managed" / "config.yaml"
    active.parent.mkdir(exist_ok=True)
    flip.atomic_install(claude, active)
    env = root / "sidecar.env"
    env.write_text("KEY_MERLIN__CLAUDE=sk-ant-outputs-test-0001\n"
                   "API_KEY_MERLIN=nd-api-key-outputs-test-0000001\n")
    os.chmod(env, 0o600)
    # A `neverdark model check` result for the local fallback, as sidecar.modelcheck leaves it
    # (figures of the test fleet's vps1), so /metrics carries the model-check families.
    checks = root / "model-check"
    modelcheck.save(checks, "merlin", {
        "ok": True, "wizard": "merlin", "backend": "local", "kind": "local", "model": "gemma-test",
        "platform": "telegram", "timestamp": time.time(), "budget_s": 10.0, "answer_tokens": 60,
        "first_token_s": {"cold": 9.5, "warm": 3.1}, "prefill_tokens_per_s": 52.8,
        "decode_tokens_per_s": 3.5, "warm_turn_s": 20.24, "within_budget": False})
    doc = {"listen": f"127.0.0.1:{free_port()}",
           "control_socket": str(root / "run" / "control.sock"), "model_check_dir": str(checks),
           "state_dir": str(root / "state"), "secrets_file": str(env),
           "probe": {"interval": 0.2, "timeout": 1, "fall": 2, "rise": 2},
           "hooks": hooks or {},
           "units": [MODEL_UNIT],
           "wizards": {"merlin": {
               "unit": "neverdark-wizard-merlin.service", "api_port": free_port(),
               "api_key_env": "API_KEY_MERLIN", "home": str(root / "home"),
               "active_config": str(active),
               "backends": [
                   {"name": "claude", "kind": "anthropic", "base_url": f"http://127.0.0.1:{dead[0]}",
                    "model": "claude-test", "api_key_env": "KEY_MERLIN__CLAUDE",
                    "variant": str(claude)},
                   {"name": "local", "kind": "local", "base_url": f"http://127.0.0.1:{dead[1]}/v1",
                    "model": "gemma-test", "variant": str(local)}]}}}
    path = root / "sidecar.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _read(path: Path, rounds: int, timeout: float, during) -> tuple[dict, str, object]:
    cfg = config.load(path)
    show, cgroup = fake_units(path.parent)
    daemon = Daemon(cfg, systemctl=["false"], show=show, cgroup_root=cgroup)
    await daemon.start()
    try:
        deadline = time.monotonic() + timeout
        base = f"http://{cfg.listen[0]}:{cfg.listen[1]}"
        async with httpx.AsyncClient() as client:
            while True:
                status = (await client.get(f"{base}/status")).json()
                fails = [h["fails"] for w in status["wizards"].values()
                         for h in w["backends"].values()]
                if fails and min(fails) >= rounds:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {rounds} probe rounds within {timeout}s: {status}")
                await asyncio.sleep(0.1)
            metrics = (await client.get(f"{base}/metrics")).text
        seen = await asyncio.to_thread(during, cfg) if during else None
    finally:
        await daemon.close()
    return status, metrics, seen


def sidecar_outputs(root: Path, rounds: int = 3, timeout: float = 60, during=None,
                    hooks: dict | None = None) -> tuple[dict, str, object]:
    """(the /status document, the /metrics text, what `during(cfg)` returned) of a real daemon
    after `rounds` probe rounds; `during` runs (in a thread) while the daemon still serves."""
    return asyncio.run(_read(write_config(root, hooks), rounds, timeout, during))
