"""Move one wizard to another backend: install its variant, restart, verify, or roll back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import httpx

from sidecar import flip
from sidecar.gateway import GatewayControl, SystemdControl, verify, wait_ready

log = logging.getLogger(__name__)

# Hermes sleeps with backoff after more than 5 starts in 120 s (gateway.respawn_storm), and
# systemd's default StartLimitBurst is 5 per 10 s: keep every unit at 4 restarts per window.
STORM_WINDOW = 120.0
STORM_MAX = 4

_restarts: dict[str, deque[float]] = defaultdict(deque)


def restart_wait(wizard, now: float | None = None) -> float:
    """Seconds before a switch of `wizard` could restart its gateway (0: now, or never needed)."""
    if not getattr(wizard, "restart", True):
        return 0.0
    now = time.monotonic() if now is None else now
    times = _restarts[wizard.unit]
    while times and now - times[0] >= STORM_WINDOW:
        times.popleft()
    return 0.0 if len(times) < STORM_MAX else times[0] + STORM_WINDOW - now


def _storm_refusal(wizard) -> str:
    return (f"{wizard.unit} already restarted {STORM_MAX} times in {STORM_WINDOW:.0f}s "
            "(Hermes' respawn-storm brake and systemd's start limit)")


@dataclass
class SwitchResult:
    ok: bool
    rolled_back: bool
    detail: str
    timings: dict[str, float] = field(default_factory=dict)


def _backend(wizard, ref):
    if ref is None or not isinstance(ref, str):
        return ref
    for b in wizard.backends:
        if b.name == ref:
            return b
    raise KeyError(f"wizard {wizard.name} has no backend {ref!r}")


async def _restart_and_verify(wizard, target, control: GatewayControl, client: httpx.AsyncClient,
                              timings: dict, prefix: str, ready_timeout: float,
                              verify_timeout: float) -> tuple[bool, str]:
    # By default (restart false) the gateway is not restarted: Hermes re-reads the config per
    # API request and rebuilds a Telegram chat's agent when the model changes, so the flip is
    # already live; a restart would refuse API turns and drop queued Telegram updates.
    if getattr(wizard, "restart", True):
        now = time.monotonic()
        if restart_wait(wizard, now) > 0:
            return False, f"restart refused: {_storm_refusal(wizard)}"
        _restarts[wizard.unit].append(now)
        t = time.monotonic()
        try:
            await control.restart()
        except Exception as exc:  # noqa: BLE001 -- any failure to restart is a failed switch
            return False, f"restart failed: {exc}"
        timings[f"{prefix}restart"] = time.monotonic() - t
    t = time.monotonic()
    try:
        await wait_ready(control, wizard.api_port, client, ready_timeout)
    except TimeoutError as exc:
        return False, str(exc)
    timings[f"{prefix}ready"] = time.monotonic() - t
    verdict = await verify(wizard, target, client, verify_timeout)
    timings[f"{prefix}first_turn"] = verdict.latency
    return verdict.ok, verdict.detail


async def switch(wizard, to, previous, client: httpx.AsyncClient, systemctl: list[str], *,
                 control: GatewayControl | None = None, ready_timeout: float = 60.0,
                 verify_timeout: float = 300.0) -> SwitchResult:
    """`to`/`previous` are backends or their names; `previous` None means nothing to roll back to.

    `control` replaces systemd (tests drive a real supervisor); `verify_timeout` must cover a
    local model's cold first turn (minutes on a Pi).
    """
    to, previous = _backend(wizard, to), _backend(wizard, previous)
    control = control or SystemdControl(systemctl, wizard.unit)
    timings: dict[str, float] = {}
    started = time.monotonic()
    # Refuse before touching the file: a switch that cannot restart must not half-happen.
    if restart_wait(wizard, started) > 0:
        return SwitchResult(False, False, f"switch to {to.name} refused: {_storm_refusal(wizard)}",
                            timings)
    try:
        await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
    except (OSError, ValueError) as exc:
        return SwitchResult(False, False, f"install of {to.name} failed: {exc}", timings)
    timings["install"] = time.monotonic() - started
    ok, detail = await _restart_and_verify(wizard, to, control, client, timings, "",
                                           ready_timeout, verify_timeout)
    if ok:
        timings["total"] = time.monotonic() - started
        return SwitchResult(True, False, detail, timings)

    log.warning("switch of %s to %s failed: %s", wizard.name, to.name, detail)
    if previous is None:
        timings["total"] = time.monotonic() - started
        return SwitchResult(False, False, f"{detail}; no previous backend to roll back to", timings)
    try:
        await asyncio.to_thread(flip.atomic_install, previous.variant, wizard.active_config)
    except (OSError, ValueError) as exc:
        timings["total"] = time.monotonic() - started
        return SwitchResult(False, False, f"{detail}; rollback install failed: {exc}", timings)
    # Hermes re-reads the managed config per request, so the restored file already steers new
    # API turns even if the restart below is refused; the restart drops cached messaging agents.
    rb_ok, rb_detail = await _restart_and_verify(wizard, previous, control, client, timings,
                                                 "rollback_", ready_timeout, verify_timeout)
    timings["total"] = time.monotonic() - started
    state = "rolled back" if rb_ok else f"rollback unverified ({rb_detail})"
    return SwitchResult(False, True, f"{detail}; {state} to {previous.name}", timings)
