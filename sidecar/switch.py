"""Move one wizard to another backend: install its variant, restart, verify, or roll back.

Whether a gateway may be restarted is the policy's to say (its restart budget, kept with the
wizard's state): the daemon hands `switch` a `restart_permit` that asks it. `check` is the turn a
restarted sidecar runs on the backend a wizard was found on after a switch was interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from neverdark.contract import find_backend
from sidecar import flip
from sidecar.gateway import GatewayControl, SystemdControl, verify, wait_ready

log = logging.getLogger(__name__)

# Counts a restart about to happen and returns None, or returns why it may not happen.
RestartPermit = Callable[[], "str | None"]


def _always() -> str | None:
    return None


@dataclass
class SwitchResult:
    ok: bool
    rolled_back: bool
    detail: str
    timings: dict[str, float] = field(default_factory=dict)
    # (backend, breakdown) of each check turn on a local backend: where its time went
    turns: list[tuple[str, dict]] = field(default_factory=list)


async def _restart_and_verify(wizard, target, control: GatewayControl, client: httpx.AsyncClient,
                              timings: dict, prefix: str, ready_timeout: float,
                              verify_timeout: float, refusal: str | None = None,
                              turns: list | None = None) -> tuple[bool, str]:
    # By default (restart false) the gateway is not restarted: Hermes re-reads the config per
    # API request and rebuilds a Telegram chat's agent when the model changes, so the flip is
    # already live; a restart would refuse API turns and drop queued Telegram updates.
    if getattr(wizard, "restart", True):
        if refusal is not None:
            return False, f"restart refused: {refusal}"
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
    if verdict.breakdown and turns is not None:
        turns.append((target.name, verdict.breakdown))
    return verdict.ok, verdict.detail


async def switch(wizard, to, previous, client: httpx.AsyncClient, systemctl: list[str], *,
                 control: GatewayControl | None = None, restart_permit: RestartPermit | None = None,
                 ready_timeout: float = 60.0, verify_timeout: float = 300.0) -> SwitchResult:
    """`to`/`previous` are backends or their names; `previous` None means nothing to roll back to.

    `control` replaces systemd (tests drive a real supervisor); `restart_permit` is asked before
    each gateway restart (default: always allowed); `verify_timeout` must cover a local model's
    cold first turn (minutes on a Pi).
    """
    to, previous = find_backend(wizard, to), find_backend(wizard, previous)
    control = control or SystemdControl(systemctl, wizard.unit)
    permit = restart_permit or _always
    restarts = getattr(wizard, "restart", True)
    timings: dict[str, float] = {}
    turns: list[tuple[str, dict]] = []
    started = time.monotonic()
    # Ask before touching the file: a switch that cannot restart must not half-happen.
    if restarts and (refusal := permit()) is not None:
        return SwitchResult(False, False, f"switch to {to.name} refused: {refusal}", timings)
    try:
        await asyncio.to_thread(flip.atomic_install, to.variant, wizard.active_config)
    except (OSError, ValueError) as exc:
        return SwitchResult(False, False, f"install of {to.name} failed: {exc}", timings)
    timings["install"] = time.monotonic() - started
    ok, detail = await _restart_and_verify(wizard, to, control, client, timings, "",
                                           ready_timeout, verify_timeout, turns=turns)
    if ok:
        timings["total"] = time.monotonic() - started
        return SwitchResult(True, False, detail, timings, turns)

    log.warning("switch of %s to %s failed: %s", wizard.name, to.name, detail)
    if previous is None:
        timings["total"] = time.monotonic() - started
        return SwitchResult(False, False, f"{detail}; no previous backend to roll back to", timings,
                            turns)
    try:
        await asyncio.to_thread(flip.atomic_install, previous.variant, wizard.active_config)
    except (OSError, ValueError) as exc:
        timings["total"] = time.monotonic() - started
        return SwitchResult(False, False, f"{detail}; rollback install failed: {exc}", timings,
                            turns)
    # Hermes re-reads the managed config per request, so the restored file already steers new
    # API turns even if the restart below is refused; the restart drops cached messaging agents.
    refusal = permit() if restarts else None
    rb_ok, rb_detail = await _restart_and_verify(wizard, previous, control, client, timings,
                                                 "rollback_", ready_timeout, verify_timeout,
                                                 refusal, turns)
    timings["total"] = time.monotonic() - started
    state = "rolled back" if rb_ok else f"rollback unverified ({rb_detail})"
    return SwitchResult(False, True, f"{detail}; {state} to {previous.name}", timings, turns)


async def check(wizard, backend, client: httpx.AsyncClient, systemctl: list[str], *,
                control: GatewayControl | None = None, ready_timeout: float = 60.0,
                verify_timeout: float = 300.0) -> SwitchResult:
    """The check turn: the gateway serves, and a real turn through it is answered by `backend`.

    Run by a sidecar that started and found a switch unfinished (its intent in the state file,
    or an active config other than the saved one), before it trusts that backend. No restart:
    the gateway may be mid-restart already (systemd carries out a restart it was asked for), and
    Hermes re-reads the active config per request.
    """
    backend = find_backend(wizard, backend)
    control = control or SystemdControl(systemctl, wizard.unit)
    timings: dict[str, float] = {}
    t = time.monotonic()
    try:
        await wait_ready(control, wizard.api_port, client, ready_timeout)
    except TimeoutError as exc:
        return SwitchResult(False, False, str(exc), timings)
    timings["ready"] = time.monotonic() - t
    verdict = await verify(wizard, backend, client, verify_timeout)
    timings["check_turn"] = verdict.latency
    return SwitchResult(verdict.ok, False, verdict.detail, timings,
                        [(backend.name, verdict.breakdown)] if verdict.breakdown else [])
