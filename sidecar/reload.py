"""SIGHUP (`systemctl reload neverdark-sidecar`): load the config again and apply the difference.

An invalid config, or listeners that cannot be had, are refused and logged, and the running config
is kept. Otherwise: a wizard added starts; a wizard removed stops once any switch in flight has
finished; a changed wizard takes its new config between two probe rounds, keeping its policy's
memory (Policy.reconfigure: stay, holds, dwell, damping, pin, budget), except what was observed
of a backend whose probe target changed; unchanged wizards are not touched beyond refreshing an
active config whose variant a deploy rewrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING

from sidecar import config as config_mod, jsonlog
from sidecar.config import ConfigError, WizardConfig
from sidecar.control import serve as serve_control
from sidecar.http_api import TokenError
from sidecar.runner import WizardRunner

if TYPE_CHECKING:
    from sidecar.daemon import Daemon

log = logging.getLogger("sidecar")


def fresh_backends(old: WizardConfig, new: WizardConfig) -> set[str]:
    """Backends of `new` also in `old` by name whose probe target changed (kind, URL, model, key,
    context): what was observed of them was about something else. A variant's path is not part
    of what a probe sees."""
    before = {b.name: replace(b, variant=None) for b in old.backends}
    return {b.name for b in new.backends
            if b.name in before and replace(b, variant=None) != before[b.name]}


async def reload(d: "Daemon") -> bool:
    """Load the config file again and apply it; False (and nothing changed) if it is invalid."""
    try:
        new = await asyncio.to_thread(config_mod.load, d.cfg.path)
    except ConfigError as exc:
        log.error("reload refused: invalid config; the running one is kept",
                  extra={"error": str(exc)})
        return False
    # New listeners first: if one cannot be had, nothing has changed yet.
    http = control = private = None
    token = d.metrics_token
    try:
        if new.listen != d.cfg.listen:
            http = await d.api().start(*new.listen)
        if new.control_socket != d.cfg.control_socket:
            control = await serve_control(new.control_socket, d.handle_control)
        new.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        for server in (http, control):
            if server is not None:
                server.close()
        log.error("reload refused: cannot apply it; the running config is kept",
                  extra={"error": f"{type(exc).__name__}: {exc}"})
        return False
    # The private listener (for Prometheus) never refuses a reload: one that cannot start is
    # logged and retried by the daemon, and the wizards' changes still apply.
    if new.private_listen != d.cfg.private_listen:
        private, token = await d.try_start_private(new)    # (None, None): off, or not yet
    elif new.private_listen is not None:
        try:
            token = await d.read_metrics_token(new)        # a deploy may have replaced it
        except TokenError as exc:
            log.error("the metrics token could not be read again; the one read before is kept",
                      extra={"error": str(exc)})
    old, d.cfg = d.cfg, new
    jsonlog.add_secrets(new.secrets)
    if http is not None:
        d.http.close()
        d.http = http
    d.metrics_token = token
    if new.private_listen != old.private_listen:
        if d.private is not None:
            d.private.close()
        d.private = private
    if control is not None:
        d.control.close()
        try:
            os.unlink(old.control_socket)
        except FileNotFoundError:
            pass
        d.control = control
    serving = {n: r for n, r in d.runners.items() if not r.retiring}
    removed = [n for n in serving if n not in new.wizards]
    # Against the config the runner will have once it takes what an earlier reload gave it.
    changed = [n for n, w in new.wizards.items() if n in serving
               and (serving[n].pending or serving[n].w) != w]
    added = [n for n in new.wizards if n not in serving]
    for name in removed:
        retire(d, name)
        d.events.notices.forget(name)
    for name in changed:
        runner = serving[name]
        runner.reconfigure(new.wizards[name], fresh_backends(runner.pending or runner.w,
                                                             new.wizards[name]))
    for name in added:
        if name in d.retiring:  # removed and added back: the old task finishes first
            await asyncio.gather(d.retiring[name], return_exceptions=True)
        try:
            runner = WizardRunner(new.wizards[name], d)
        except Exception:  # noqa: BLE001 -- one wizard's files must not stop the others
            log.exception("cannot start wizard after reload", extra={"wizard": name})
            continue
        d.start_runner(name, runner)
    unchanged = [n for n in new.wizards if n not in added and n not in changed]
    for name in unchanged:
        # A deploy may have rewritten the variant a wizard is on (a changed one does this when
        # it takes its new config).
        d.runners[name].refresh_active()
    log.warning("config reloaded", extra={
        "added": added, "removed": removed, "changed": changed, "unchanged": unchanged})
    return True


def retire(d: "Daemon", name: str) -> None:
    """Stop a removed wizard: at once between rounds, after the switch in flight otherwise."""
    runner, task = d.runners[name], d.runner_tasks.pop(name)
    runner.retire()
    if not runner.switching:
        task.cancel()  # between rounds, probing or confirming: nothing to finish

    async def finish() -> None:
        await asyncio.gather(task, return_exceptions=True)
        runner.fail_waiters(f"{name} was removed from the sidecar's config by a reload")
        runner.save(force=True)
        if d.runners.get(name) is runner:
            del d.runners[name]
        log.warning("wizard removed", extra={"wizard": name, "active": runner.policy.active})

    done = asyncio.get_running_loop().create_task(finish(), name=f"retire-{name}")
    d.retiring[name] = done
    done.add_done_callback(lambda _t: d.retiring.pop(name, None))
