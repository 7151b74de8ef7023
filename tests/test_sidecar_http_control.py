"""The sidecar's two local channels over real sockets: HTTP on 127.0.0.1 and the control socket,
including a refused peer (a real process running as `nobody`)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from sidecar import control
from sidecar.http_api import HttpApi
from sidecar.metrics import Metrics
from sidecar.probes import ProbeResult
from testbed.metrics_text import value
from testbed.llmock import free_port


def run_with_http(api: HttpApi, requests):
    """Start the API on a free loopback port and run `requests(base)` in a thread against it."""
    async def main():
        port = free_port()
        server = await api.start("127.0.0.1", port)
        try:
            return await asyncio.to_thread(requests, f"http://127.0.0.1:{port}")
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(main())


def test_http_status_metrics_healthz():
    m = Metrics()
    m.probe("merlin", ProbeResult("claude", True, "ok", 200, None, 0.03, ""))
    m.probe("merlin", ProbeResult("claude", False, "http_5xx", 503, None, 0.2, ""))
    m.probe("merlin", ProbeResult("claude", False, "passive", 500, None, 0.0, ""))
    m.transition("merlin", "failover")
    health = {"ok": True}
    api = HttpApi(lambda: {"wizards": {"merlin": {"active": "claude"}}},
                  lambda: m.render({"merlin": (["claude", "local"], "local", True)}),
                  lambda: health["ok"])

    def requests(base):
        out = {}
        out["status"] = httpx.get(f"{base}/status")
        out["metrics"] = httpx.get(f"{base}/metrics")
        out["healthz"] = httpx.get(f"{base}/healthz")
        health["ok"] = False
        out["unhealthy"] = httpx.get(f"{base}/healthz")
        out["missing"] = httpx.get(f"{base}/nope")
        out["post"] = httpx.post(f"{base}/status")
        with httpx.Client() as c:  # garbage request line
            out["raw"] = c.get(f"{base}/status?x=1")
        return out

    r = run_with_http(api, requests)
    assert r["status"].status_code == 200
    assert r["status"].json() == {"wizards": {"merlin": {"active": "claude"}}}
    assert r["healthz"].status_code == 200 and r["unhealthy"].status_code == 503
    assert r["missing"].status_code == 404 and r["post"].status_code == 405
    assert r["raw"].status_code == 200
    text = r["metrics"].text
    assert r["metrics"].headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(text.splitlines())
    assert value(text, "neverdark_active_backend", wizard="merlin", backend="local") == 1
    assert value(text, "neverdark_active_backend", wizard="merlin", backend="claude") == 0
    assert value(text, "neverdark_dark", wizard="merlin") == 1
    assert value(text, "neverdark_transitions_total", wizard="merlin", kind="failover") == 1
    assert value(text, "neverdark_probe_failures_total", wizard="merlin", backend="claude", reason="http_5xx") == 1
    assert value(text, "neverdark_probe_failures_total", wizard="merlin", backend="claude", reason="passive") == 1
    assert value(text, "neverdark_probe_latency_seconds_bucket", wizard="merlin", backend="claude", le="0.05") == 1
    assert value(text, "neverdark_probe_latency_seconds_bucket", wizard="merlin", backend="claude", le="+Inf") == 2
    assert value(text, "neverdark_probe_latency_seconds_count", wizard="merlin", backend="claude") == 2
    assert "# TYPE neverdark_probe_latency_seconds histogram" in lines


def test_http_survives_a_bad_request_line():
    api = HttpApi(lambda: {}, lambda: "", lambda: True)

    def requests(base):
        import socket
        host, port = base.rsplit(":", 1)
        with socket.create_connection(("127.0.0.1", int(port))) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            first = s.recv(100)
        return first, httpx.get(f"{base}/healthz").status_code

    first, after = run_with_http(api, requests)
    assert first.startswith(b"HTTP/1.1 400") and after == 200


def with_control(tmp_path, handler, client):
    path = tmp_path / "run" / "control.sock"

    async def main():
        server = await control.serve(path, handler)
        try:
            return await asyncio.to_thread(client, path)
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(main())


def test_control_round_trip_and_socket_mode(tmp_path):
    seen = []

    async def handler(request, uid):
        seen.append((request, uid))
        return {"ok": True, "echo": request}

    def client(path):
        mode = stat.S_IMODE(path.stat().st_mode)
        reply = control.control_request(path, {"op": "failover", "wizard": "merlin", "to": "local"})
        bad = control.control_request(path, {"op": "explode"})
        return mode, reply, bad

    mode, reply, bad = with_control(tmp_path, handler, client)
    assert mode == 0o660
    assert reply == {"ok": True, "echo": {"op": "failover", "wizard": "merlin", "to": "local"}}
    assert seen == [({"op": "failover", "wizard": "merlin", "to": "local"}, os.geteuid())]
    assert bad["ok"] is False and "op one of failover, pin, release, status" in bad["error"]


def _as_nobody(path, conn):
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        conn.send(control.control_request(path, {"op": "status"}, timeout=20))
    except Exception as exc:  # report, so the parent's assertion shows it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def test_control_refuses_other_users_by_peer_credentials(tmp_path):
    """The socket is opened up to 0666 here so that `nobody` can connect at all: the refusal
    must come from the SO_PEERCRED check, not from file permissions."""
    calls = []

    async def handler(request, uid):
        calls.append(uid)
        return {"ok": True}

    def client(path):
        os.chmod(path, 0o666)
        os.chmod(path.parent, 0o755)
        # A forked child that drops to nobody: a real other-user peer without exec'ing anything.
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_as_nobody, args=(str(path), child_end))
        proc.start()
        reply = parent_end.recv() if parent_end.poll(30) else {"error": "no reply"}
        proc.join(10)
        return reply

    # pytest's tmp_path sits under a 0700 directory that nobody cannot traverse.
    public = Path(tempfile.mkdtemp(prefix="nd-control-"))
    try:
        os.chmod(public, 0o755)
        reply = with_control(public, handler, client)
    finally:
        shutil.rmtree(public)
    assert reply.get("ok") is False and "uid 65534 may not control" in reply["error"], reply
    assert calls == []


def test_peer_allowed_rules():
    import grp
    ops = grp.struct_group(("neverdark-ops", "x", 4242, ["alice"]))
    assert control.peer_allowed(0, 0, 999, None)
    assert control.peer_allowed(999, 999, 999, None)
    assert not control.peer_allowed(65534, 65534, 999, None)
    assert control.peer_allowed(65534, 4242, 999, ops)
    assert not control.peer_allowed(65534, 65534, 999, ops)


def test_control_request_without_sidecar(tmp_path):
    with pytest.raises(control.ControlError, match="no sidecar listening"):
        control.control_request(tmp_path / "none.sock", {"op": "status"})


def test_status_and_control_replies_are_strict_json(tmp_path):
    """A NaN or Infinity reaching /status or a control reply is an error there, never a document
    that strict JSON parsers refuse."""
    api = HttpApi(lambda: {"held_for": float("inf")}, lambda: "", lambda: True)
    r = run_with_http(api, lambda base: httpx.get(f"{base}/status"))
    assert r.status_code == 503 and b"Infinity" not in r.content

    async def handler(request, uid):
        return {"ok": True, "held_for": float("nan")}

    reply = with_control(tmp_path, handler,
                         lambda path: control.control_request(path, {"op": "status"}))
    assert reply["ok"] is False and "not representable as JSON" in reply["error"]


def _one_shot_server(path: Path, answer: bytes) -> threading.Thread:
    """A stand-in for a sidecar that dies mid-request: reads the request, writes `answer`
    (nothing, or part of a reply), and closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(answer)
        conn.close()
        srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("answer", [b"", b'{"ok": true, "wizard": "mer'],
                         ids=["nothing", "half a reply"])
def test_a_connection_closed_before_the_reply_is_an_interruption(tmp_path, answer):
    path = tmp_path / "c.sock"
    t = _one_shot_server(path, answer)
    with pytest.raises(control.ControlInterrupted, match="closed the connection before replying"):
        control.control_request(path, {"op": "failover", "wizard": "merlin"}, timeout=10)
    t.join(5)


def test_ctl_reconnects_after_an_interruption_and_reports_where_the_wizard_is(tmp_path):
    """sidecar.ctl against a socket that dies mid-request and a 'restarted' sidecar (a real
    control server) that is still checking the wizard for a while, then reports it on local."""
    from sidecar import ctl
    path = tmp_path / "c.sock"
    polls = []
    record = {"kind": "manual", "from": "claude", "to": "local", "ok": True,
              "reason": "switch to local requested by operator; completed after a sidecar restart"}

    async def restarted(request, uid):
        polls.append(request["op"])
        busy = len(polls) < 3
        return {"ok": True, "status": {"wizards": {"merlin": {
            "active": "local", "pinned": None, "forced": None, "switching": busy,
            "intent": {"to": "local"} if busy else None,
            "transitions": [] if busy else [record]}}}}

    async def main():
        t = _one_shot_server(path, b"")
        with pytest.raises(control.ControlInterrupted):
            await asyncio.to_thread(control.control_request, path,
                                    {"op": "failover", "wizard": "merlin", "to": "local"})
        t.join(5)
        ctl_run = asyncio.get_running_loop().run_in_executor(None, lambda: ctl.after_restart(
            str(path), {"op": "failover", "wizard": "merlin", "to": "local"},
            {"active": "claude"}, reconnect_for=30, sleep=lambda s: time.sleep(0.1)))
        await asyncio.sleep(0.5)   # the sidecar "restarts": nobody listens for a moment
        path.unlink()
        server = await control.serve(path, restarted)
        try:
            return await ctl_run
        finally:
            server.close()
            await server.wait_closed()

    reply = asyncio.run(main())
    assert reply["ok"] and reply["interrupted"] and reply["active"] == "local"
    assert reply["transition"] == record and "now on local" in reply["note"]
    assert polls.count("status") >= 3


def test_ctl_gives_up_after_its_bound(tmp_path):
    from sidecar import ctl
    started = time.monotonic()
    reply = ctl.after_restart(str(tmp_path / "gone.sock"), {"op": "pin", "wizard": "merlin"},
                              None, reconnect_for=1.0, sleep=lambda s: time.sleep(0.1))
    assert not reply["ok"] and reply["interrupted"] and "within 1s" in reply["error"]
    assert time.monotonic() - started < 5
