"""The hosts' network: one /24 per run, a /30 link per host to the runner, and host-to-host
traffic routed through the runner, confined to the run's /24.

Each host has `ve-<machine>` on the runner (the runner's address of the /30) and `host0` inside
(the host's address), and a route to the run's /24 via the runner's address on its own link.
The runner forwards between the run's links only:

- forwarding is switched on per link (`net.ipv4.conf.<link>.forwarding`), never globally
  (`net.ipv4.ip_forward` stays as it was), so nothing that arrives on another interface is
  forwarded to the hosts;
- what arrives on a run's link is routed by the run's own table (a policy rule `iif <link>`,
  priority RULE_PRIORITY): the run's /30s and an `unreachable default`, so a host can reach the
  other hosts of its run and nothing else through the runner (another run's /24, the runner's
  uplink: refused), even with a default route of its own;
- no NAT: a host sees the other hosts' own addresses as the source, so its firewall can tell
  the fleet's hosts from others (an outsider host of the same run included: it has an address
  of its own in the /24).

What arrives addressed to the runner itself (the file server, stand-ins bound to a link's
runner-side address) is delivered locally before the run's table is consulted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess
from pathlib import Path

from testbed.fleet.base import NET, PREFIX, REGISTRY, FleetError, sh

RULE_PRIORITY = 10213           # before `main` (32766); `local` (0) is consulted first
TABLE_BASE = 0x6E640000         # "nd": run <id> routes with table TABLE_BASE + int(id, 16)
LINK_RE = re.compile(rf"ve-{PREFIX}([0-9a-f]{{4}})-")


def _links() -> list[str]:
    out = sh(["ip", "-o", "link", "show"], check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def run_table(run_id: str) -> int:
    return TABLE_BASE + int(run_id, 16)


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


def open_run(run_id: str) -> None:
    """The run's routing table: refuses whatever no host of the run is (filled by wire())."""
    table = str(run_table(run_id))
    sh(["ip", "route", "flush", "table", table], check=False)
    sh(["ip", "route", "replace", "unreachable", "default", "table", table])


def wire(link: str, pid1: int, runner_addr: str, host_addr: str, subnet: str,
         run_id: str) -> None:
    """Addresses on both ends of the host's link, its route to the run's /24, and forwarding
    from the link through the run's table (works while the host is still booting)."""
    table = str(run_table(run_id))
    block = str(ipaddress.ip_interface(f"{host_addr}/30").network)
    sh(["ip", "addr", "add", f"{runner_addr}/30", "dev", link])
    sh(["ip", "link", "set", link, "up"])
    inside = ["nsenter", "-t", str(pid1), "-n", "ip"]
    sh([*inside, "addr", "add", f"{host_addr}/30", "dev", "host0"])
    sh([*inside, "link", "set", "host0", "up"])
    sh([*inside, "route", "add", subnet, "via", runner_addr, "dev", "host0"])
    sh(["ip", "route", "replace", block, "dev", link, "table", table])
    sh(["ip", "rule", "add", "iif", link, "lookup", table, "priority", str(RULE_PRIORITY)])
    Path(f"/proc/sys/net/ipv4/conf/{link}/forwarding").write_text("1")


def _rules() -> list[tuple[str, str]]:
    """(iif link, table) of every rule at RULE_PRIORITY."""
    found = []
    for line in _ip("-o", "rule", "show", "priority", str(RULE_PRIORITY)).stdout.splitlines():
        m = re.search(r"\biif (\S+).*\blookup (\S+)", line)
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def _tables() -> set[int]:
    """Route tables of ours (TABLE_BASE + a run id) that hold routes."""
    out = _ip("route", "show", "table", "all").stdout
    return {int(t) for t in re.findall(r"\btable (\d+)", out)
            if 0 <= int(t) - TABLE_BASE <= 0xFFFF}


def _drop_rule(link: str, table: str) -> None:
    while _ip("rule", "del", "iif", link, "lookup", table,
              "priority", str(RULE_PRIORITY)).returncode == 0:
        pass


def close_run(run_id: str) -> None:
    """Undo open_run() and wire() for every link of the run (the links themselves go with the
    containers' network namespaces, or unlink())."""
    for link, table in _rules():
        if link.startswith(f"ve-{PREFIX}{run_id}-"):
            _drop_rule(link, table)
    _ip("route", "flush", "table", str(run_table(run_id)))


def unlink(link: str) -> None:
    if link in _links():
        _ip("link", "del", link)


def leftovers(run_id: str) -> list[str]:
    """What of the run's routing is left on the runner: rules, its table's routes."""
    left = [f"rule iif {link} lookup {table}" for link, table in _rules()
            if link.startswith(f"ve-{PREFIX}{run_id}-")]
    if run_table(run_id) in _tables():
        left.append(f"table {run_table(run_id)}")
    return left


def clear_stale(live_ids: set[str]) -> list[str]:
    """Remove links, rules and tables of our naming whose run is not live; what was removed."""
    cleared = []
    for link in _links():
        m = LINK_RE.match(link)
        if m and m.group(1) not in live_ids:
            _ip("link", "del", link)
            cleared.append(f"link {link}")
    for link, table in _rules():
        m = LINK_RE.match(link)
        if m and m.group(1) not in live_ids:
            _drop_rule(link, table)
            cleared.append(f"rule iif {link}")
    for table in _tables():
        if f"{table - TABLE_BASE:04x}" not in live_ids:
            _ip("route", "flush", "table", str(table))
            cleared.append(f"table {table}")
    return cleared
