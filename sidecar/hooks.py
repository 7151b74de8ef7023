"""Tell operators about failovers: a command, a webhook, a Telegram message. Never raises."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import time

import httpx

log = logging.getLogger(__name__)

TELEGRAM_API = "https://api.telegram.org"
_TELEGRAM_LIMIT = 4096

_BOT_TOKEN_IN_URL = re.compile(r"/bot[^/\s]+/")


class _RedactBotToken(logging.Filter):
    """httpx logs every request URL at INFO, and Telegram's URL carries the bot token."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "/bot" in msg:
            record.msg = _BOT_TOKEN_IN_URL.sub("/bot***/", msg)
            record.args = None
        return True


for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).addFilter(_RedactBotToken())


def _get(hooks, name):
    return hooks.get(name) if isinstance(hooks, dict) else getattr(hooks, name, None)


def _scrub(text: str, secrets: dict[str, str]) -> str:
    for value in secrets.values():
        if value:
            text = text.replace(value, "***")
    return _BOT_TOKEN_IN_URL.sub("/bot***/", text)


async def _command(command: str, payload: bytes, timeout: float) -> str:
    # No shell: the payload is data, and the command line comes whole from root-owned config.
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(command), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        await asyncio.wait_for(proc.communicate(payload), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"hook command killed after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"hook command exited {proc.returncode}")
    return "exit 0"


async def _webhook(url: str, event: dict, client: httpx.AsyncClient, timeout: float) -> str:
    r = await client.post(url, json=event, timeout=timeout)
    if r.status_code >= 300:
        raise RuntimeError(f"webhook answered HTTP {r.status_code}")
    return f"HTTP {r.status_code}"


def render(event: dict) -> str:
    """A short human line for chat, then the whole event as JSON."""
    head = " ".join(f"{k}={v}" for k, v in event.items() if isinstance(v, (str, int, float, bool)))
    text = f"neverdark: {head}\n{json.dumps(event, sort_keys=True, default=str)}"
    return text[:_TELEGRAM_LIMIT]


async def _telegram(cfg: dict, event: dict, secrets: dict[str, str], client: httpx.AsyncClient,
                    base: str, timeout: float) -> str:
    token = secrets.get(cfg.get("token_env") or "")
    if not token:
        raise RuntimeError(f"telegram token {cfg.get('token_env')!r} not in the secrets file")
    r = await client.post(f"{base.rstrip('/')}/bot{token}/sendMessage", timeout=timeout,
                          json={"chat_id": cfg.get("chat_id"), "text": render(event),
                                "disable_web_page_preview": True})
    if r.status_code >= 300:
        raise RuntimeError(f"telegram answered HTTP {r.status_code}")
    return f"HTTP {r.status_code}"


async def _timed(job) -> tuple[bool, str, float]:
    started = time.monotonic()
    try:
        detail = await job
    except Exception as exc:  # noqa: BLE001 -- a hook's failure is its outcome, never ours
        return False, f"{type(exc).__name__}: {exc}", time.monotonic() - started
    return True, detail, time.monotonic() - started


async def deliver(event: dict, hooks, secrets: dict[str, str], client: httpx.AsyncClient, *,
                  telegram_base: str = TELEGRAM_API,
                  timeout: float = 10.0) -> dict[str, tuple[bool, str, float]]:
    """Run every configured hook at once, each bounded by `timeout`: for each hook, (delivered,
    what happened, seconds), the text scrubbed of every secret."""
    if hooks is None:
        return {}
    jobs: dict[str, object] = {}
    if _get(hooks, "command"):
        payload = json.dumps(event, default=str).encode()
        jobs["command"] = _command(_get(hooks, "command"), payload, timeout)
    if _get(hooks, "webhook"):
        jobs["webhook"] = _webhook(_get(hooks, "webhook"), event, client, timeout)
    if _get(hooks, "telegram"):
        jobs["telegram"] = _telegram(_get(hooks, "telegram"), event, secrets, client,
                                     telegram_base, timeout)
    results = await asyncio.gather(*(_timed(job) for job in jobs.values()))
    return {name: (ok, _scrub(detail, secrets), seconds)
            for name, (ok, detail, seconds) in zip(jobs, results)}


def outcome(ok: bool, detail: str) -> str:
    """A delivery's outcome for /metrics: 'ok', 'timeout' (the hook did not answer in time) or
    'error' (it answered no, or could not be reached)."""
    if ok:
        return "ok"
    kind = detail.partition(":")[0]
    return "timeout" if "Timeout" in kind else "error"


async def notify(event: dict, hooks, secrets: dict[str, str], client: httpx.AsyncClient, *,
                 telegram_base: str = TELEGRAM_API,
                 timeout: float = 10.0) -> dict[str, tuple[bool, str, float]]:
    """deliver(), with failures logged; returns deliver()'s outcomes."""
    outcomes = await deliver(event, hooks, secrets, client, telegram_base=telegram_base,
                             timeout=timeout)
    for name, (ok, detail, _) in outcomes.items():
        if not ok:
            log.warning("%s hook failed: %s", name, detail)
    return outcomes
