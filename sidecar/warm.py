"""Keep each wizard's prompt prefix computed on its local model servers, before it is needed.

A wizard's first turn on a local model costs a prefill of its whole Hermes prompt (1,750 tokens:
7-9 s on 2 x86 cores for Gemma 3 270M; minutes on a Pi with a bigger model); with the prefix
already computed it costs the user's message. So, for every local server on this host and
every wizard that can fall back onto it, the warmer computes the wizard's stable prefix (the
request Hermes would send, less the user's message) in the background and keeps it:

- what Hermes would send comes from the wizard's own gateway code: deploys/hermes/prefix.py
  runs Hermes' API-server agent against a capture endpoint and writes the request to
  /var/lib/neverdark/wizards/<w>/prefix/<backend>.json (byte-identical to a real turn's system
  prompt and tools), after every deploy that changes an input and each night (the date line);
- when: whenever a server is (re)started, or a wizard's captured request changed;
- how, never delaying a user's turn: in chunks sized to about half a second of prefill, each
  sent only while the server has nothing else to do (llama-cpp-python: no request pending;
  llama-server: no slot busy, nothing deferred), so a turn that arrives waits for one chunk at
  most; llama-cpp-python's launcher also gives way between its own chunks;
- kept: llama-cpp-python's launcher pins the prefix and writes it to disk, restoring it at
  start; llama-server keeps it in the wizard's own slot (`id_slot`, one slot per wizard) and,
  where llama.cpp can use a restored slot (models without sliding-window layers, or swa_full),
  saves it (`/slots/<id>?action=save`) and restores it after a restart instead of recomputing.

`check()` is the cheap readiness probe before a switch onto a local backend: one token after
the wizard's warm prefix, through its own slot, instead of a cold generation that would evict
the prefix or queue behind one.

The daemon's hooks (sidecar/daemon.py): build one `Warmer(cfg, client)` at start, `await
warmer.start()`, `await warmer.close()` on stop, and use `await warmer.check(wizard, backend,
timeout)` (a ProbeResult) for the pre-switch probe of a local target; `warmer.status()` is
what /status can show.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from neverdark import contract
from sidecar.probes import ProbeResult, probe

log = logging.getLogger("sidecar.warm")

CHUNK_SECONDS = 0.5        # prefill per chunk: the most a user's turn can wait behind one
FIRST_CHUNK = 32           # tokens, until the server's speed is known
IDLE_POLL = 0.25           # s between "is the server idle?" looks while waiting to go on
USER_TEXT = ("a", "z z")   # two user messages whose prompts part where the user's text begins


@dataclass
class Target:
    """One wizard's local backend on one server."""

    wizard: str
    backend: str
    model: str
    prefix_path: Path
    slot: int | None = None
    warmed: tuple | None = None        # (server incarnation, prefix digest) last warmed
    info: dict = field(default_factory=dict)
    # llama-server: the prefix tokens last put in the slot, in which incarnation. A request
    # with a shorter prompt would cut the slot back to it, so warming always goes on from
    # what the slot is known to hold; within one incarnation only the wizard's own turns use
    # its slot, and they extend the prefix rather than replace it.
    tokens: list[int] | None = None
    held_in: object = None
    last_task: int | None = None       # the slot's last task when we last looked


@dataclass
class Server:
    base_url: str                      # .../v1, as the backends carry it
    model: str
    targets: list[Target]
    engine: str | None = None
    restores_slots: bool = False
    incarnation: object = None
    speed: float | None = None         # prefill tokens/s seen while warming
    n_decode: float = -1.0

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1")


def load_prefix(path: Path) -> tuple[dict, str] | None:
    """The captured request and a digest of what the prompt is built from (None: none yet)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc.get("messages"), list) or not doc["messages"]:
        return None
    body = {"messages": doc["messages"], "tools": doc.get("tools")}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body, digest


def _with_user(messages: list[dict], text: str) -> list[dict]:
    msgs = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        msgs.append({"role": "user", "content": text})
    else:
        msgs[last]["content"] = text
    return msgs


def _lcp(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Warmer:
    def __init__(self, cfg, client: httpx.AsyncClient, *, interval: float = 5.0,
                 chunk_seconds: float = CHUNK_SECONDS,
                 state_root: Path = Path(contract.LLAMA_STATE_DIR),
                 prefix_path=None) -> None:
        """`prefix_path(wizard, backend)` and `state_root` are where the host keeps things
        (tests point them elsewhere)."""
        self.client = client
        self.interval = interval
        self.chunk_seconds = chunk_seconds
        self.state_root = Path(state_root)
        prefix_path = prefix_path or (lambda w, b: Path(contract.wizard_prefix(w, b)))
        servers: dict[str, Server] = {}
        for w in cfg.wizards.values():
            for b in w.backends:
                if b.kind != "local":
                    continue
                s = servers.setdefault(b.base_url, Server(b.base_url, b.model, []))
                s.targets.append(Target(w.name, b.name, b.model, prefix_path(w.name, b.name)))
        for s in servers.values():
            names = [t.wizard for t in s.targets]
            for t in s.targets:
                t.slot = contract.llama_slot(t.wizard, names)
        self.servers = list(servers.values())
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()

    # --- the daemon's hooks ----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(s), name=f"warm-{s.model}")
                       for s in self.servers]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def poke(self) -> None:
        """Look again now (a deploy or a switch happened)."""
        self._wake.set()

    def status(self) -> dict:
        return {s.model: {"engine": s.engine, "base_url": s.base_url,
                          "restores_slots": s.restores_slots,
                          "prefill_tokens_per_s": s.speed and round(s.speed, 1),
                          "wizards": {t.wizard: {"slot": t.slot, "warm": t.warmed is not None
                                                 and t.warmed[0] == s.incarnation, **t.info}
                                      for t in s.targets}}
                for s in self.servers}

    async def check(self, wizard: str, backend: str, timeout: float) -> ProbeResult:
        """Readiness of a local backend for `wizard`: one generated token after its warm
        prefix (its own slot on llama-server); a plain deep probe where no prefix is known."""
        s, t = self._find(wizard, backend)
        started = time.monotonic()
        loaded = load_prefix(t.prefix_path) if t else None
        if s is None or t is None or loaded is None:
            return await self._plain(wizard, backend, timeout)
        body, _ = loaded
        try:
            async with asyncio.timeout(timeout):
                await self._identify(s)
                if s.engine == "llama-server":
                    tokens = await self._prefix_tokens(s, body)
                    r = await self.client.post(f"{s.root}/completion", timeout=timeout, json={
                        "prompt": tokens + tokens[-1:], "n_predict": 1, "id_slot": t.slot,
                        "cache_prompt": True})
                else:
                    r = await self.client.post(f"{s.base_url}/chat/completions", timeout=timeout,
                                               json={"messages": _with_user(body["messages"],
                                                                            "ping"),
                                                     "max_tokens": 1})
        except (httpx.HTTPError, OSError, asyncio.TimeoutError, ValueError) as exc:
            return ProbeResult(backend, False, "timeout" if isinstance(
                exc, (asyncio.TimeoutError, httpx.TimeoutException)) else "refused", None, None,
                time.monotonic() - started, f"warm check: {type(exc).__name__}: {exc}"[:300])
        latency = time.monotonic() - started
        if r.status_code != 200:
            return ProbeResult(backend, False, "http_5xx" if r.status_code >= 500
                               else "bad_response", r.status_code, None, latency,
                               f"warm check: HTTP {r.status_code}")
        data = r.json()
        cached = (data.get("timings") or {}).get("cache_n")
        return ProbeResult(backend, True, "ok", 200, None, latency,
                           f"warm check (cached {cached})" if cached is not None
                           else "warm check")

    # --- the loop -----------------------------------------------------------------------------

    def _find(self, wizard: str, backend: str) -> tuple[Server | None, Target | None]:
        for s in self.servers:
            for t in s.targets:
                if t.wizard == wizard and t.backend == backend:
                    return s, t
        return None, None

    async def _plain(self, wizard: str, backend: str, timeout: float) -> ProbeResult:
        s, t = self._find(wizard, backend)
        if s is None:
            return ProbeResult(backend, False, "bad_response", None, None, 0.0,
                               f"{wizard} has no local backend {backend}")

        @dataclass
        class _B:
            name: str
            kind: str
            base_url: str
            model: str
            api_key: str | None = None

        return await probe(_B(backend, "local", s.base_url, s.model), self.client, timeout,
                           deep=True)

    async def _run(self, s: Server) -> None:
        while True:
            try:
                await self._tick(s)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 -- log and keep going; warming is best effort
                log.exception("warm tick failed", extra={"model": s.model})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()

    async def _tick(self, s: Server) -> None:
        try:
            r = await self.client.get(f"{s.root}/health", timeout=2.0)
            up = r.status_code == 200
        except httpx.TimeoutException:
            # Slow, not gone: a server starved of CPU (every slot decoding on a Pi) answers
            # late. Taking that for a restart would throw each warm prefix away and compute it
            # again, in the slots the users' turns need, exactly when the host is busiest.
            # A real restart still shows: refused while down, 503 while loading, and a
            # decode counter that went back (_identify).
            return
        except httpx.HTTPError:
            up = False
        if not up:
            s.incarnation = None
            return
        await self._identify(s)
        if s.engine == "llama-server":
            await self._evictions(s)
        for t in s.targets:
            loaded = load_prefix(t.prefix_path)
            if loaded is None:
                t.info["error"] = f"no captured prefix at {t.prefix_path} yet"
                continue
            body, digest = loaded
            if t.warmed == (s.incarnation, digest):
                continue
            t.info.pop("error", None)
            ok = await (self._warm_native(s, t, body) if s.engine == "llama-server"
                        else self._warm_python(s, t, body))
            if ok:
                t.warmed = (s.incarnation, digest)

    async def _identify(self, s: Server) -> None:
        """Engine, and an identity of the running process: a restart changes it."""
        if s.engine is None:
            self._read_server_json(s)
        if s.engine is None:
            props = (await self.client.get(f"{s.root}/props", timeout=5.0)).json()
            s.engine = props.get("engine") or "llama-server"
        if s.engine == "llama-server":
            # llama-server has no start time on show; its decode counter only grows.
            text = (await self.client.get(f"{s.root}/metrics", timeout=5.0)).text
            n = next((float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("llamacpp:n_decode_total")), 0.0)
            if s.incarnation is None or n < s.n_decode:
                s.incarnation = ("llama-server", time.time())
            s.n_decode = n
        else:
            st = (await self.client.get(f"{s.root}/neverdark/status", timeout=5.0)).json()
            s.incarnation = ("llama-cpp-python", st.get("pid"), st.get("started_at"))

    def _read_server_json(self, s: Server) -> None:
        """What the deploy wrote about the server (engine, slots, restorable slots)."""
        try:
            info = json.loads((self.state_root / s.model / contract.LLAMA_SERVER_JSON)
                              .read_text())
        except (OSError, ValueError):
            return
        s.engine = info.get("engine")
        s.restores_slots = bool(info.get("restores_slots"))
        for t in s.targets:
            slot = (info.get("slots") or {}).get(t.wizard)
            if isinstance(slot, int):
                t.slot = slot

    # --- llama-cpp-python ---------------------------------------------------------------------

    async def _idle_python(self, s: Server) -> None:
        while True:
            st = (await self.client.get(f"{s.root}/neverdark/status", timeout=5.0)).json()
            if not st.get("pending"):
                return
            await asyncio.sleep(IDLE_POLL)

    async def _warm_python(self, s: Server, t: Target, body: dict) -> bool:
        chunk = FIRST_CHUNK
        started = time.monotonic()
        while True:
            await self._idle_python(s)
            if s.speed:
                chunk = max(16, int(s.speed * self.chunk_seconds))
            r = await self.client.post(f"{s.root}/neverdark/warm", timeout=600.0, json={
                "key": t.wizard, "messages": body["messages"], "tools": body.get("tools"),
                "chunk": chunk})
            if r.status_code != 200:
                t.info["error"] = f"warm: HTTP {r.status_code}: {r.text[:200]}"
                return False
            res = r.json()
            if res.get("ok"):
                if res.get("evaluated") and res.get("seconds"):
                    s.speed = res["evaluated"] / max(res["seconds"], 1e-3)
                t.info.update(tokens=res["tokens"], evaluated=res["evaluated"],
                              seconds=round(time.monotonic() - started, 2))
                log.info("prefix warm", extra={"wizard": t.wizard, "model": s.model,
                                               "tokens": res["tokens"],
                                               "evaluated": res["evaluated"]})
                return True
            await asyncio.sleep(IDLE_POLL)     # preempted: a turn came first

    # --- llama-server -------------------------------------------------------------------------

    async def _prefix_tokens(self, s: Server, body: dict) -> list[int]:
        """The stable prefix in the server's own template and tokenizer."""
        out = []
        for text in USER_TEXT:
            r = await self.client.post(f"{s.root}/apply-template", timeout=30.0, json={
                "messages": _with_user(body["messages"], text), "tools": body.get("tools")})
            r.raise_for_status()
            t = await self.client.post(f"{s.root}/tokenize", timeout=30.0, json={
                "content": r.json()["prompt"], "add_special": True, "parse_special": True})
            t.raise_for_status()
            out.append(t.json()["tokens"])
        return out[0][:_lcp(*out)]

    async def _evictions(self, s: Server) -> None:
        """A request another client sent without naming a slot (a health check of its own,
        Hermes' per-turn fallback with the primary's prompt) lands in the least recently used
        idle slot and replaces what it held.

        What /slots tells about the slot's last task is its size: `n_prompt_tokens`, the tokens
        the slot holds now. A slot holding fewer tokens than the prefix lost it (a short request
        cut it back; how much of the start survived is unknown, so all of it is computed
        again). A slot holding more may be a turn of the wizard's own (the prefix, then the
        conversation) or a long foreign prompt: it is taken as kept. Computing the prefix
        again after each of the wizard's own turns would cut its conversation back to the
        prefix in the slot and spend a prefill per turn. (Not `n_prompt_tokens_cache`:
        llama-server zeroes a slot's stats when its task ends, so an idle slot shows 0 there.
        The prompt's text is only shown with LLAMA_SERVER_SLOTS_DEBUG, which also logs it.) A
        long foreign prompt that did replace the prefix is found by the check before a switch,
        which computes what is missing."""
        slots = {x.get("id"): x for x in
                 (await self.client.get(f"{s.root}/slots", timeout=5.0)).json()}
        for t in s.targets:
            x = slots.get(t.slot)
            if x is None or t.held_in != s.incarnation or t.tokens is None:
                continue
            task = x.get("id_task")
            if task == t.last_task or x.get("is_processing"):
                continue
            t.last_task = task
            held = x.get("n_prompt_tokens") or 0
            if held < len(t.tokens) - 1:
                log.info("prefix evicted", extra={"wizard": t.wizard, "model": s.model,
                                                  "held": held, "tokens": len(t.tokens)})
                t.tokens = []
                t.warmed = None
                t.info["evicted"] = t.info.get("evicted", 0) + 1

    async def _idle_native(self, s: Server, t: Target) -> None:
        """Until no slot is busy and no request waits for one."""
        while True:
            slots = (await self.client.get(f"{s.root}/slots", timeout=5.0)).json()
            busy = any(x.get("is_processing") for x in slots)
            if not busy:
                text = (await self.client.get(f"{s.root}/metrics", timeout=5.0)).text
                deferred = next((float(line.split()[-1]) for line in text.splitlines()
                                 if line.startswith("llamacpp:requests_deferred")), 0.0)
                if not deferred:
                    return
            await asyncio.sleep(IDLE_POLL)

    async def _warm_native(self, s: Server, t: Target, body: dict) -> bool:
        tokens = await self._prefix_tokens(s, body)
        started = time.monotonic()
        restored = None
        if t.held_in == s.incarnation and t.tokens is not None:
            done = _lcp(t.tokens, tokens)      # the old prefix's shared part is still there
        elif s.restores_slots:
            restored = await self._restore(s, t)
            done = restored if restored and restored <= len(tokens) else 0
        else:
            done = 0
        evaluated = 0
        chunk = FIRST_CHUNK
        first = True
        while first or done < len(tokens):
            first = False
            await self._idle_native(s, t)
            if s.speed:
                chunk = max(16, int(s.speed * self.chunk_seconds))
            upto = min(len(tokens), done + chunk)
            r = await self.client.post(f"{s.root}/completion", timeout=600.0, json={
                "prompt": tokens[:upto], "n_predict": 0, "id_slot": t.slot,
                "cache_prompt": True})
            if r.status_code != 200:
                t.info["error"] = f"warm: HTTP {r.status_code}: {r.text[:200]}"
                t.held_in = None
                return False
            timings = r.json().get("timings") or {}
            n, ms = timings.get("prompt_n") or 0, timings.get("prompt_ms") or 0.0
            evaluated += n
            if n > 8 and ms > 0:
                s.speed = n / (ms / 1000.0)
            done = upto
            t.tokens, t.held_in = tokens[:upto], s.incarnation
        if s.restores_slots:
            await self.client.post(f"{s.root}/slots/{t.slot}?action=save", timeout=60.0,
                                   json={"filename": f"{t.wizard}.slot"})
        slots = (await self.client.get(f"{s.root}/slots", timeout=5.0)).json()
        t.last_task = next((x.get("id_task") for x in slots if x.get("id") == t.slot), None)
        t.info.update(tokens=len(tokens), evaluated=evaluated, restored=restored,
                      seconds=round(time.monotonic() - started, 2))
        log.info("prefix warm", extra={"wizard": t.wizard, "model": s.model,
                                       "tokens": len(tokens), "evaluated": evaluated,
                                       "restored": restored})
        return True

    async def _restore(self, s: Server, t: Target) -> int | None:
        r = await self.client.post(f"{s.root}/slots/{t.slot}?action=restore", timeout=60.0,
                                   json={"filename": f"{t.wizard}.slot"})
        if r.status_code != 200:
            return None
        return r.json().get("n_restored")


# --- `python -m sidecar.warm`: warm once, now (operators, tests, benchmarks) ----------------------

async def warm_once(cfg, timeout: float) -> dict:
    """Warm every wizard's prefix on every local server of this host, then report."""
    async with httpx.AsyncClient() as client:
        warmer = Warmer(cfg, client, interval=0.5)
        await warmer.start()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                st = warmer.status()
                if all(w["warm"] for s in st.values() for w in s["wizards"].values()):
                    break
                await asyncio.sleep(0.5)
        finally:
            await warmer.close()
        return warmer.status()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from sidecar import config
    ap = argparse.ArgumentParser(prog="python -m sidecar.warm",
                                 description="warm every wizard's local prompt prefix once")
    ap.add_argument("--config", default=contract.SIDECAR_CONFIG)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    cfg = config.load(args.config)
    st = asyncio.run(warm_once(cfg, args.timeout))
    print(json.dumps(st, indent=1, sort_keys=True))
    ok = all(w["warm"] for s in st.values() for w in s["wizards"].values())
    if not ok:
        print("not every prefix is warm", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
