"""sidecar/warm.py against real engines on the runner (the units' own command lines, the real
Gemma 3 270M GGUF): each wizard's prefix is computed before its first turn, a turn then
evaluates little more than the user's message, wizards sharing a server do not evict each
other, and a restarted server gets its prefixes back. Asserted from each server's own counters
(tokens a request evaluated, llama-server's `timings.cache_n`), not from wall time.

Small contexts keep the starts quick; n_ctx 65536 is the benchmark's (bench/llama_engine_bench.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from neverdark import contract
from sidecar.warm import Warmer
from testbed.localserver import LocalServer, server_spec

PERSONA = {
    "merlin": "You are Merlin, keeper of the northern tower. ",
    "gandalf": "You are Gandalf, a grey wanderer who speaks in riddles. ",
}
RULES = " ".join(f"Rule {i}: be brief, name sources, never invent facts about topic {i}."
                 for i in range(14))


def system(wizard: str) -> str:
    return PERSONA[wizard] + RULES


def write_prefixes(tmp: Path) -> callable:
    for w in PERSONA:
        (tmp / f"{w}.json").write_text(json.dumps({"messages": [
            {"role": "system", "content": system(w)},
            {"role": "user", "content": "neverdark prefix capture"}], "tools": None}))
    return lambda w, b: tmp / f"{w}.json"


def config(base_url: str) -> SimpleNamespace:
    return SimpleNamespace(wizards={w: SimpleNamespace(name=w, backends=(
        SimpleNamespace(name="local", kind="local", base_url=base_url, model="gemma3-270m"),))
        for w in PERSONA})


def chat(server: LocalServer, wizard: str, text: str) -> dict:
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=300, json={
        "messages": [{"role": "system", "content": system(wizard)},
                     {"role": "user", "content": text}], "max_tokens": 4})
    r.raise_for_status()
    return r.json()


def evaluated(server: LocalServer, answer: dict) -> tuple[int, int]:
    """(prompt tokens evaluated, prompt tokens) of the request that gave `answer`: both engines
    report it in the completion's `timings`."""
    t = answer["timings"]
    return t["prompt_n"], t["prompt_n"] + t["cache_n"]


async def turns_are_warm(server: LocalServer, wizards, text: str) -> None:
    """A turn from each of `wizards` evaluates little more than its own message: its prefix
    was there."""
    for w in wizards:
        answer = await asyncio.to_thread(chat, server, w, text)
        n, total = evaluated(server, answer)
        assert n < 30 and total > 150, (w, n, total)


async def until_warm(warmer: Warmer, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = warmer.status()["gemma3-270m"]
        if all(w["warm"] for w in st["wizards"].values()):
            return st
        await asyncio.sleep(0.3)
    raise AssertionError(f"not warm in {timeout} s: {warmer.status()}")


def run_warm(server: LocalServer, prefix_path, state_root: Path, steps) -> None:
    async def main():
        async with httpx.AsyncClient() as client:
            warmer = Warmer(config(server.base_url), client, interval=0.3,
                            state_root=state_root, prefix_path=prefix_path)
            await warmer.start()
            try:
                for step in steps:
                    await step(warmer)
            finally:
                await warmer.close()
    asyncio.run(main())


@pytest.mark.parametrize("engine", ["llama-cpp-python", "llama-server"])
def test_each_wizard_is_warm_before_its_first_turn_and_after_a_restart(tmp_path, engine):
    spec = server_spec(engine, tuple(PERSONA), n_ctx=4096)
    server = LocalServer(spec, tmp_path / "state", tmp_path / "server.log").start()
    prefixes = write_prefixes(tmp_path)
    seen = {}

    async def warm_then_turns(warmer):
        st = await until_warm(warmer)
        seen["first"] = st
        # interleaved: no eviction
        await turns_are_warm(server, ("merlin", "gandalf", "merlin", "gandalf"), "Hi?")
        check = await warmer.check("merlin", "local", 60)
        assert check.ok, check

    async def after_restart(warmer):
        await asyncio.to_thread(server.restart)
        warmer.poke()
        await asyncio.sleep(1.0)
        st = await until_warm(warmer)
        seen["restart"] = st
        await turns_are_warm(server, PERSONA, "Again?")

    try:
        run_warm(server, prefixes, tmp_path, [warm_then_turns, after_restart])
    finally:
        server.stop()
    first, again = seen["first"]["wizards"], seen["restart"]["wizards"]
    # Computed before any turn (less the few tokens the two prompts share at their start).
    assert all(first[w]["evaluated"] >= first[w]["tokens"] - 20 for w in PERSONA), first
    if engine == "llama-cpp-python":
        # Read back from disk at start: nothing evaluated again.
        assert all(again[w]["evaluated"] == 0 for w in PERSONA), again
    else:
        # Gemma 3 has sliding-window layers: without swa_full llama.cpp would not use a
        # restored slot, so the warmer recomputed it (in chunks, in the background).
        assert all(again[w]["evaluated"] >= again[w]["tokens"] - 20 for w in PERSONA), again


def test_llama_server_restores_saved_slots_with_swa_full(tmp_path):
    """With swa_full (priced by the memory fit) a restarted llama-server reads each slot back:
    the warmer's first request after the restore evaluates one token."""
    spec = server_spec("llama-server", tuple(PERSONA), n_ctx=4096, swa_full=True)
    state = tmp_path / "state"
    server = LocalServer(spec, state, tmp_path / "server.log").start()
    (tmp_path / "gemma3-270m").mkdir()
    (tmp_path / "gemma3-270m" / contract.LLAMA_SERVER_JSON).write_text(json.dumps({
        "engine": "llama-server", "restores_slots": True,
        "slots": {w: contract.llama_slot(w, PERSONA) for w in PERSONA}}))
    prefixes = write_prefixes(tmp_path)
    seen = {}

    async def steps(warmer):
        await until_warm(warmer)
        await asyncio.to_thread(server.restart)
        warmer.poke()
        await asyncio.sleep(1.0)
        seen["restart"] = await until_warm(warmer)
        await turns_are_warm(server, ("gandalf",), "Hm?")

    try:
        run_warm(server, prefixes, tmp_path, [steps])
    finally:
        server.stop()
    again = seen["restart"]["wizards"]
    for w in PERSONA:
        assert again[w]["restored"] == again[w]["tokens"] and again[w]["evaluated"] <= 1, again


def test_a_prefix_evicted_from_its_slot_is_computed_again(tmp_path):
    """A short request that names no slot (another client's health check) takes the least
    recently used idle slot on llama-server and cuts a wizard's prefix back; the warmer sees it
    in the slot's last task and recomputes it. The wizards' own turns after it are not taken
    for one."""
    spec = server_spec("llama-server", tuple(PERSONA), n_ctx=4096)
    server = LocalServer(spec, tmp_path / "state", tmp_path / "server.log").start()
    prefixes = write_prefixes(tmp_path)
    seen = {}

    async def steps(warmer):
        await until_warm(warmer)
        r = await asyncio.to_thread(httpx.post, f"{server.base_url}/chat/completions",
                                    json={"messages": [{"role": "user", "content": "ping"}],
                                          "max_tokens": 1}, timeout=120)
        assert r.status_code == 200
        warmer.poke()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = warmer.status()["gemma3-270m"]["wizards"]
            if any(w.get("evicted") for w in st.values()) and all(w["warm"] for w in st.values()):
                break
            await asyncio.sleep(0.3)
        await turns_are_warm(server, PERSONA, "Hi?")
        await asyncio.sleep(1.5)    # ticks that look at the slots after the turns
        # The wizards' own turns are no eviction: each leaves its prefix and its conversation
        # in its slot (llama-server zeroes an idle slot's cache counters, which once passed
        # for one after every turn and cut the conversation back to the prefix).
        seen["status"] = warmer.status()["gemma3-270m"]["wizards"]

    try:
        run_warm(server, prefixes, tmp_path, [steps])
    finally:
        server.stop()
    assert sum(w.get("evicted", 0) for w in seen["status"].values()) == 1, seen


def test_a_stalled_server_keeps_its_prefixes(tmp_path):
    """A server that answers late (stopped for 4 s here, as one starved of CPU would be) has not
    restarted: the warmer's health look times out, and the prefixes in the slots stay where
    they are instead of being thrown away and computed again in the users' slots."""
    spec = server_spec("llama-server", tuple(PERSONA), n_ctx=4096)
    server = LocalServer(spec, tmp_path / "state", tmp_path / "server.log").start()
    prefixes = write_prefixes(tmp_path)
    warmed = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage() == "prefix warm":
                warmed.append(record.wizard)

    handler, logger = Count(), logging.getLogger("sidecar.warm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def steps(warmer):
        await until_warm(warmer)
        assert sorted(warmed) == sorted(PERSONA)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(4.0)        # two health looks of 2 s time out meanwhile
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(2.0)            # several ticks with the server answering again
        await until_warm(warmer)
        await turns_are_warm(server, PERSONA, "Still?")

    try:
        run_warm(server, prefixes, tmp_path, [steps])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        server.stop()
    assert sorted(warmed) == sorted(PERSONA), warmed     # none computed a second time
