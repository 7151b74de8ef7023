"""The hosts' network: one /24 per run and a /30 link per host to the runner (`ve-<machine>`
on the runner with the runner's address, `host0` inside with the host's)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess

from testbed.fleet.base import NET, PREFIX, REGISTRY, FleetError, sh

LINK_RE = re.compile(rf"ve-{PREFIX}([0-9a-f]{{4}})-")


def _links() -> list[str]:
    out = sh(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def pick_subnet(run_id: str) -> ipaddress.IPv4Network:
    """The run's /24: derived from the run id, the next free one if that is in use (by a
    registered run or by any address of the runner)."""
    used = sh(["ip", "-o", "-4", "addr", "show"], check=False)
    taken = set()
    for entry in REGISTRY.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):
            taken.add(json.loads(entry.read_text())["subnet"])
    blocks = list(NET.subnets(new_prefix=24))
    start = int(run_id, 16) % len(blocks)
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        prefix = ".".join(str(block.network_address).split(".")[:3]) + "."
        if str(block) not in taken and f" {prefix}" not in used:
            return block
    raise FleetError(f"no free /24 in {NET} for the test fleet")


def host_addresses(subnet: str, index: int) -> tuple[str, str]:
    """(runner's address, host's address) of the index-th host's /30 in the run's /24."""
    block = list(ipaddress.ip_network(subnet).subnets(new_prefix=30))[index]
    runner, host = list(block.hosts())[:2]
    return str(runner), str(host)


def wire(link: str, pid1: int, runner_addr: str, host_addr: str) -> None:
    """Addresses on both ends of the host's link (works while the host is still booting)."""
    sh(["ip", "addr", "add", f"{runner_addr}/30", "dev", link])
    sh(["ip", "link", "set", link, "up"])
    inside = ["nsenter", "-t", str(pid1), "-n", "ip"]
    sh([*inside, "addr", "add", f"{host_addr}/30", "dev", "host0"])
    sh([*inside, "link", "set", "host0", "up"])


def unlink(link: str) -> None:
    if link in _links():
        _ip("link", "del", link)


def clear_stale(live_ids: set[str]) -> list[str]:
    """Remove links of our naming whose run is not live; what was removed."""
    cleared = []
    for link in _links():
        m = LINK_RE.match(link)
        if m and m.group(1) not in live_ids:
            _ip("link", "del", link)
            cleared.append(f"link {link}")
    return cleared
