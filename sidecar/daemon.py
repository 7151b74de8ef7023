"""The sidecar daemon: start, serve (HTTP, control socket, watchdog), reload on SIGHUP, stop.

It owns what the wizards share: the config, the HTTP client, /status and /metrics, the control
socket, the hooks. Each wizard's loop is a WizardRunner (sidecar/runner.py), one asyncio task
each; a reload is applied by sidecar/reload.py; what is told (logs, metrics, hooks) goes through
sidecar/events.py. Two clocks are injected: `clock` (monotonic, every timer) and `wall` (records).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Awaitable, Callable

import httpx

from sidecar import (badge, hooktest, jsonlog, model_check_metrics, reload as reload_mod, sdnotify,
                     units)
from sidecar.config import SidecarConfig, host_port
from sidecar.control import serve as serve_control
from sidecar.events import Events, iso
from sidecar.http_api import HttpApi, TokenError, read_token
from sidecar.meminfo import memory_status
from sidecar.metrics import Metrics, WizardState
from sidecar.runner import WizardRunner
from sidecar.switch import SwitchResult, check, switch

log = logging.getLogger("sidecar")

DEFAULT_SYSTEMCTL = ("sudo", "-n", "/usr/bin/systemctl")
SYSTEMCTL_ENV = "NEVERDARK_SIDECAR_SYSTEMCTL"
# `systemctl show` for the units' metrics: read-only, so no sudo.
DEFAULT_SHOW = ("/usr/bin/systemctl",)
UNITS_INTERVAL = 15.0   # s between readings of the units (Prometheus' default scrape: 15 s)
PRIVATE_RETRY_S = 10.0  # s between tries of a private listener that could not start
DEFAULT_WAIT = 600.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# switch_fn(wizard, to, previous, client, systemctl, *, restart_permit) -> SwitchResult
SwitchFn = Callable[..., Awaitable[SwitchResult]]
# check_fn(wizard, backend, client, systemctl) -> SwitchResult (ok, detail, timings)
CheckFn = Callable[..., Awaitable[SwitchResult]]


def systemctl_from_env() -> list[str]:
    raw = os.environ.get(SYSTEMCTL_ENV)
    return shlex.split(raw) if raw else list(DEFAULT_SYSTEMCTL)


def read_boot_id() -> str | None:
    """Tells a sidecar restart (the monotonic clock ran on) from a reboot (it began again)."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


class Daemon:
    def __init__(self, cfg: SidecarConfig, *, systemctl: list[str] | None = None,
                 switch_fn: SwitchFn | None = None, check_fn: CheckFn | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, boot_id: str | None = None,
                 show: list[str] | None = None, cgroup_root: Path = units.CGROUP_ROOT) -> None:
        """`clock`: the monotonic clock every timer runs on; `wall`: the time of day, for records
        and the state file; `boot_id`: which boot `clock` counts from (default: the kernel's);
        `show` and `cgroup_root`: where the units' metrics are read (sidecar/units.py)."""
        self.cfg = cfg
        self.systemctl = list(systemctl) if systemctl else systemctl_from_env()
        self.switch_fn = switch_fn or switch
        self.check_fn = check_fn or check
        self.clock = clock
        self.wall = wall
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self.show = list(show) if show else list(DEFAULT_SHOW)
        self.cgroup_root = cgroup_root
        self.metrics = Metrics()
        self.client: httpx.AsyncClient | None = None
        self.events = Events(self.metrics, lambda: self.cfg, lambda: self.client, wall, clock)
        self.private: asyncio.Server | None = None     # the private listener, if configured
        self.metrics_token: bytes | None = None
        self._private_error: str | None = None         # the last reason it could not start
        self.runners: dict[str, WizardRunner] = {}
        self.runner_tasks: dict[str, asyncio.Task] = {}
        self.retiring: dict[str, asyncio.Task] = {}   # removed wizards finishing a switch
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self.http: asyncio.Server | None = None
        self.control: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # start and reloads, one at a time

    # --- what it serves (reads only: no policy changes for a look) ------------------------------

    def status(self) -> dict:
        # the host's memory too: `neverdark status` then needs nothing but this document
        return {"at": iso(self.wall()), "wizards": {n: r.status() for n, r in self.runners.items()},
                "memory": memory_status()}

    def wizard_view(self, name: str) -> dict | None:
        """One wizard's embeddable view (sidecar/badge.py); None for a wizard not served here."""
        runner = self.runners.get(name)
        if runner is None or runner.retiring:
            return None
        return badge.summary(name, [b.name for b in runner.w.backends], runner.status())

    def render_metrics(self) -> str:
        return self.metrics.render({
            n: WizardState([b.name for b in r.w.backends], r.policy.active, r.policy.dark,
                           r.status()) for n, r in self.runners.items() if not r.retiring},
            model_check_metrics.families(self.cfg.model_check_dir, self._serving()))

    def healthy(self) -> bool:
        tasks = [*self.runner_tasks.values(), *self._tasks]
        return (bool(self.runner_tasks) and all(not t.done() for t in tasks)
                and all(r.healthy() for r in self.runners.values()))

    def _status_line(self) -> str:
        parts = [f"{n}:{r.policy.active or '?'}{'(dark)' if r.policy.dark else ''}"
                 f"{'(pinned)' if r.policy.pinned else ''}" for n, r in self.runners.items()]
        return "STATUS=" + " ".join(parts)

    async def handle_control(self, request: dict, peer_uid: int) -> dict:
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == hooktest.OP:
            return await hooktest.handle(self, request)
        runner = self.runners.get(request.get("wizard"))
        if runner is None or runner.retiring:
            return {"ok": False, "error": f"unknown wizard {request.get('wizard')!r} "
                                          f"(on this host: {', '.join(self._serving())})"}
        to = request.get("to")
        if to is not None and not isinstance(to, str):
            return {"ok": False, "error": "'to' must be a backend name"}
        timeout = request.get("timeout", DEFAULT_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            return {"ok": False, "error": "'timeout' must be a positive number of seconds"}
        stay = request.get("stay")
        if stay is not None and (isinstance(stay, bool) or not isinstance(stay, (int, float))
                                 or not 0 < stay < float("inf")):
            return {"ok": False, "error": "'stay' must be a positive number of seconds"}
        reply = await runner.request(op, to, bool(request.get("wait", True)), float(timeout),
                                     None if stay is None else float(stay))
        log.warning("operator request", extra={"op": op, "wizard": runner.w.name, "to": to,
                                               "peer_uid": peer_uid, "ok": reply.get("ok")})
        return reply

    def _serving(self) -> list[str]:
        return [n for n, r in self.runners.items() if not r.retiring]

    # --- lifecycle ----------------------------------------------------------------------------

    def api(self) -> HttpApi:
        return HttpApi(self.status, self.render_metrics, self.healthy, self.wizard_view)

    def private_api(self) -> HttpApi:
        """The private listener's: the same views, every request bearing the token."""
        return HttpApi(self.status, self.render_metrics, self.healthy, self.wizard_view,
                       token=lambda: self.metrics_token)

    async def start_private(self, cfg: SidecarConfig) -> tuple[asyncio.Server | None, bytes | None]:
        """(the private listener, its token) for `cfg`; (None, None) when it asks for none.
        Raises OSError (address not to be had) or http_api.TokenError (no usable token)."""
        if cfg.private_listen is None:
            return None, None
        token = await self.read_metrics_token(cfg)
        server = await self.private_api().start(*cfg.private_listen)
        return server, token

    async def try_start_private(self, cfg: SidecarConfig) -> tuple[asyncio.Server | None,
                                                                   bytes | None]:
        """start_private, but a listener that cannot be had is logged, not raised: it is for
        Prometheus, and failover must not wait on it (a WireGuard or Tailscale address may come
        up after the sidecar; a token may be fixed by the next deploy). _private_loop retries."""
        try:
            result = await self.start_private(cfg)
        except (OSError, TokenError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if error != self._private_error:          # once per distinct error, not per retry
                log.error("private listener not started; failover goes on without it, retried "
                          f"every {PRIVATE_RETRY_S:g} s", extra={
                              "private_listen": host_port(cfg.private_listen),
                              "error": error})
            self._private_error = error
            return None, None
        if self._private_error is not None and result[0] is not None:
            log.warning("private listener started", extra={
                "private_listen": host_port(cfg.private_listen)})
        self._private_error = None
        return result

    async def _private_loop(self) -> None:
        while True:
            await asyncio.sleep(PRIVATE_RETRY_S)
            if self.cfg.private_listen is None or self.private is not None:
                continue
            async with self._lock:                    # not beside a reload
                if self.cfg.private_listen is not None and self.private is None:
                    self.private, self.metrics_token = await self.try_start_private(self.cfg)

    async def read_metrics_token(self, cfg: SidecarConfig) -> bytes:
        """The token file, read again (a deploy may have replaced it: a reload takes it)."""
        token = await asyncio.to_thread(read_token, cfg.metrics_token_file)
        jsonlog.add_secrets({"metrics_token": token.decode()})
        return token

    async def _units_loop(self) -> None:
        while True:
            try:
                self.metrics.units = await units.read_units(
                    self.cfg.watched_units(), self.show, self.cgroup_root)
            except Exception:  # noqa: BLE001 -- the metrics go stale; the sidecar goes on
                log.exception("reading the units failed")
            await asyncio.sleep(UNITS_INTERVAL)

    def start_runner(self, name: str, runner: WizardRunner) -> None:
        self.runners[name] = runner
        self.runner_tasks[name] = asyncio.get_running_loop().create_task(
            runner.run(), name=f"wizard-{name}")

    async def start(self) -> None:
        async with self._lock:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.client = httpx.AsyncClient(follow_redirects=False)
            runners = {n: WizardRunner(w, self) for n, w in self.cfg.wizards.items()}
            self.http = await self.api().start(*self.cfg.listen)
            self.private, self.metrics_token = await self.try_start_private(self.cfg)
            self.control = await serve_control(self.cfg.control_socket, self.handle_control)
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._units_loop(), name="units"))
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._private_loop(), name="private-listener"))
            for name, runner in runners.items():
                self.start_runner(name, runner)
            interval = sdnotify.watchdog_interval()
            if interval:
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self._watchdog(interval), name="watchdog"))
            sdnotify.notify("READY=1\n" + self._status_line())
            private = self.cfg.private_listen
            log.info("sidecar ready", extra={"listen": host_port(self.cfg.listen),
                                             "private_listen": host_port(private)
                                             if private else None,
                                             "control_socket": str(self.cfg.control_socket),
                                             "wizards": list(self.runners),
                                             "watchdog_interval": interval})

    async def _watchdog(self, interval: float) -> None:
        while True:
            # Only a loop that is really working pings: a stalled wizard task lets systemd restart us.
            if self.healthy():
                sdnotify.notify("WATCHDOG=1\n" + self._status_line())
            else:
                log.error("not pinging the watchdog: a wizard loop is stalled or dead")
            await asyncio.sleep(interval)

    def request_reload(self) -> None:
        """The SIGHUP handler: reload in the background (the signal handler must not block)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> bool:
        """Load the config file again and apply it; False (and nothing changed) if it is invalid."""
        async with self._lock:
            sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                return await reload_mod.reload(self)
            finally:
                sdnotify.notify("READY=1\n" + self._status_line())

    def stop(self) -> None:
        self._stopping.set()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        sdnotify.notify("STOPPING=1")
        tasks = [*self.runner_tasks.values(), *self.retiring.values(), *self._tasks,
                 *self._background]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        servers = [s for s in (self.http, self.private, self.control) if s is not None]
        for s in servers:
            s.close()
        for s in servers:
            await s.wait_closed()
        self.http = self.private = self.control = None
        await self.events.close(timeout=10)
        # A switch cancelled here keeps its intent in the file: the next start finishes it.
        for r in self.runners.values():
            r.save(force=True)
        try:
            os.unlink(self.cfg.control_socket)
        except FileNotFoundError:
            pass
        if self.client is not None:
            await self.client.aclose()


async def run(cfg: SidecarConfig, **kwargs) -> None:
    daemon = Daemon(cfg, **kwargs)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.request_reload)
    await daemon.serve_forever()
