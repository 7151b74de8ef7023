"""The two local model engines side by side, Gemma 3 270M at n_ctx 65536 on 2 threads.

    .venv/bin/python bench/llama_engine_bench.py [--seconds 60] [--fleet-report PATH]

Each engine runs with the command line and environment its unit gets (neverdark.engines via
testbed.localserver), on the runner, with a real Hermes prompt: deploys/hermes/prefix.py
captures what Hermes 0.19.0 would send a local backend for three wizards (same config
neverdark renders, different personas). Printed, one table per question:

1. Memory: RSS when ready, and after the load of question 4 (three wizards at once), against
   the memory fit's figure for the same server and against native llama-server at rest.
2. A new conversation's first turn: prefix warm (sidecar/warm.py warmed it), restored after a
   restart (llama-cpp-python reads it back; llama-server recomputes it for Gemma's
   sliding-window layers unless swa_full), and cold; wall time and the prompt tokens the
   server evaluated (its own counters).
3. Decode tokens/s: the engine's own counters over 128 generated tokens (EOS suppressed),
   against llama-bench where neverdark.artifacts built one (it does not yet: the native
   server's own counters stand in, as said in the output).
4. Queue wait per turn with 1, 2 and 3 wizards on the server, each sending new conversations
   back to back for --seconds: turn latency less the same turn's latency alone.

--fleet-report adds the test fleet's capacity drill (tests/test_fleet_engines.py writes
engine-report.json in its run directory): RSS of the deployed servers after minutes of real
Hermes turns from two wizards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncio  # noqa: E402

import httpx  # noqa: E402

from neverdark import hermes_config, memory_fit  # noqa: E402
from sidecar.warm import Warmer, _with_user  # noqa: E402
from testbed import runtimes  # noqa: E402
from testbed.localserver import LocalServer, gemma_model, server_spec  # noqa: E402

WIZARDS = ("gandalf", "merlin", "radagast")
PERSONAS = {"merlin": "You are Merlin, keeper of the northern tower.",
            "gandalf": "You are Gandalf, a grey wanderer who speaks in riddles.",
            "radagast": "You are Radagast, friend of birds and beasts."}
POLICY = None


def capture_prompts(tmp: Path) -> dict[str, Path]:
    """What Hermes would send each wizard's local backend, captured with Hermes' own code."""
    hermes_python = runtimes.HERMES_BIN.parent / "python"
    out = {}
    for w in WIZARDS:
        home = tmp / w / "home"
        home.mkdir(parents=True)
        spec = {"name": w, "api_port": 8642, "api_key_secret": "K", "telegram_token_secret": None,
                "telegram_allowed_users": [], "telegram_api_url": None, "persona": PERSONAS[w],
                "notice": hermes_config.DEFAULT_NOTICE, "backends": [
                    {"name": "claude", "kind": "anthropic", "model": "claude-sonnet-4-5",
                     "base_url": "http://127.0.0.1:9/anthropic", "api_key_secret": "A",
                     "context_length": 200000, "max_tokens": 1024},
                    {"name": "local", "kind": "local", "model": "gemma3-270m",
                     "base_url": "http://127.0.0.1:9/v1", "api_key_secret": None,
                     "context_length": 65536, "max_tokens": 64}]}
        (home / "config.yaml").write_text(hermes_config.render_base_config(spec))
        (home / "SOUL.md").write_text(hermes_config.render_soul(spec))
        (home / ".env").write_text("API_SERVER_KEY=bench-key-0123456789abcdef\n")
        variant = tmp / w / "local.yaml"
        variant.write_text(hermes_config.render_variant(spec, "local"))
        out[w] = tmp / w / "prefix.json"
        subprocess.run([str(hermes_python), str(REPO / "deploys/hermes/prefix.py"),
                        "--variant", str(variant), "--out", str(out[w])], check=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(home), "HERMES_HOME": str(home),
                            "LANG": "C.UTF-8"}, capture_output=True)
    return out


def messages(prefix: Path, text: str) -> list[dict]:
    return _with_user(json.loads(prefix.read_text())["messages"], text)


def config(base_url: str, wizards) -> object:
    from types import SimpleNamespace
    return SimpleNamespace(wizards={w: SimpleNamespace(name=w, backends=(SimpleNamespace(
        name="local", kind="local", base_url=base_url, model="gemma3-270m"),)) for w in wizards})


def warm(server: LocalServer, prefixes: dict, wizards, tmp: Path) -> dict:
    async def main():
        async with httpx.AsyncClient() as client:
            w = Warmer(config(server.base_url, wizards), client, interval=0.3, state_root=tmp,
                       prefix_path=lambda wz, b: prefixes[wz])
            await w.start()
            try:
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    st = w.status()["gemma3-270m"]["wizards"]
                    if all(x["warm"] for x in st.values()):
                        return st
                    await asyncio.sleep(0.3)
                raise RuntimeError(f"not warm: {w.status()}")
            finally:
                await w.close()
    return asyncio.run(main())


def turn(server: LocalServer, msgs: list[dict], max_tokens: int = 16, **extra) -> dict:
    t = time.monotonic()
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=900,
                   json={"messages": msgs, "max_tokens": max_tokens, **extra})
    r.raise_for_status()
    ans = r.json()
    ans["wall_s"] = time.monotonic() - t
    ans["evaluated"] = ans["timings"]["prompt_n"]    # both engines report llama.cpp's timings
    return ans


DECODE_PROMPT = "Once upon a time, in a land of dragons and wizards,"
GEMMA_STOPS = (1, 106)   # <eos>, <end_of_turn>: suppressed so that 128 tokens are generated


def decode_rate(server: LocalServer) -> float:
    """Generated tokens/s over 128 tokens on a short prompt (what llama-bench's tg128 runs),
    from llama-server's own timings; llama-cpp-python has none, so its stream is timed from
    the first token to the last."""
    if server.spec.engine == "llama-server":
        r = httpx.post(f"{server.root}/completion", timeout=900, json={
            "prompt": DECODE_PROMPT, "n_predict": 128, "ignore_eos": True,
            "temperature": 0, "cache_prompt": False}).json()
        return r["timings"]["predicted_per_second"]
    stamps = []
    with httpx.stream("POST", f"{server.base_url}/completions", timeout=900, json={
            "prompt": DECODE_PROMPT, "max_tokens": 128, "stream": True, "temperature": 0,
            "logit_bias": {str(t): -100.0 for t in GEMMA_STOPS}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else 0.0


def load(server: LocalServer, prefixes: dict, wizards, seconds: float) -> list[float]:
    """Each wizard sends new conversations back to back; every turn's latency."""
    lat: list[float] = []
    stop = time.monotonic() + seconds

    def run(w):
        n = 0
        while time.monotonic() < stop:
            n += 1
            lat.append(turn(server, messages(prefixes[w], f"{w} question {n}: hello?"))["wall_s"])
    threads = [threading.Thread(target=run, args=(w,)) for w in wizards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def engine_run(engine: str, prefixes: dict, seconds: float, tmp: Path) -> dict:
    res: dict = {"engine": engine}
    spec = server_spec(engine, WIZARDS, prompt_tokens=POLICY.prompt_tokens)
    model = gemma_model(engine)
    res["fit_mb"] = {n: memory_fit.server_mb(model, n, POLICY) for n in (1, 3)}
    server = LocalServer(spec, tmp / engine / "state", tmp / f"{engine}.log").start()
    try:
        res["ready_s"] = round(server.ready_s, 1)
        res["rss_ready_mb"] = round(server.rss_mb())
        cold = turn(server, messages(prefixes["merlin"], "Hello, who are you?"))
        res["cold"] = {"wall_s": round(cold["wall_s"], 2), "evaluated": cold["evaluated"]}
        # Before warming: on llama-server a request that names no slot takes the least
        # recently used one, and this one would evict a warm prefix.
        res["decode_tok_s"] = round(decode_rate(server), 1)
        res["warmup"] = warm(server, prefixes, WIZARDS, tmp / engine)
        fresh = turn(server, messages(prefixes["gandalf"], "A new conversation: hello?"))
        res["warm"] = {"wall_s": round(fresh["wall_s"], 2), "evaluated": fresh["evaluated"]}
        solo = load(server, prefixes, WIZARDS[:1], seconds)
        res["queue"] = {1: {"median_s": round(statistics.median(solo), 2), "wait_s": 0.0}}
        for n in (2, 3):
            lat = load(server, prefixes, WIZARDS[:n], seconds)
            res["queue"][n] = {"median_s": round(statistics.median(lat), 2),
                               "wait_s": round(statistics.median(lat) - statistics.median(solo), 2)}
        res["rss_after_load_mb"] = round(server.rss_mb())
        server.restart()
        res["restart_warm"] = warm(server, prefixes, WIZARDS, tmp / engine)
        again = turn(server, messages(prefixes["radagast"], "After a restart: hello?"))
        res["restored"] = {"wall_s": round(again["wall_s"], 2), "evaluated": again["evaluated"]}
    finally:
        server.stop()
    return res


def native_at_rest(tmp: Path) -> int:
    """Native llama-server, one slot, nothing but the model: the yardstick for RSS."""
    spec = server_spec("llama-server", ("merlin",))
    s = LocalServer(spec, tmp / "rest" / "state", tmp / "rest.log").start()
    try:
        return round(s.rss_mb())
    finally:
        s.stop()


def main() -> None:
    global POLICY
    from neverdark.schema import MemoryPolicy
    POLICY = MemoryPolicy()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--fleet-report", type=Path)
    ap.add_argument("--engines", default="llama-cpp-python,llama-server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nd-engine-bench-") as d:
        tmp = Path(d)
        prefixes = capture_prompts(tmp / "prompts")
        rest = native_at_rest(tmp)
        runs = [engine_run(e, prefixes, args.seconds, tmp) for e in args.engines.split(",")]
    print(json.dumps({"native_at_rest_mb": rest, "runs": runs}, indent=1))
    print("\nGemma 3 270M Q4_K_M, n_ctx 65536, 2 threads; prompt: Hermes 0.19.0's own request "
          f"({runs[0]['warmup']['merlin']['tokens']} prefix tokens)")
    print("| engine | RSS ready | RSS after 3-wizard load | fit (1 / 3 wizards) | "
          "vs native at rest, same contexts | cold first turn | warm first turn | "
          "restored first turn | decode tok/s | queue wait 1 / 2 / 3 wizards |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        q = r["queue"]
        # llama-cpp-python has one context: native with one slot; llama-server: itself, ready.
        base = rest if r["engine"] == "llama-cpp-python" else r["rss_ready_mb"]
        print(f"| {r['engine']} | {r['rss_ready_mb']} MB | {r['rss_after_load_mb']} MB | "
              f"{r['fit_mb'][1]} / {r['fit_mb'][3]} MB | {r['rss_after_load_mb'] / base:.2f}x | "
              f"{r['cold']['wall_s']} s ({r['cold']['evaluated']} tok) | "
              f"{r['warm']['wall_s']} s ({r['warm']['evaluated']} tok) | "
              f"{r['restored']['wall_s']} s ({r['restored']['evaluated']} tok) | "
              f"{r['decode_tok_s']} | {q[1]['wait_s']} / {q[2]['wait_s']} / {q[3]['wait_s']} s |")
    print(f"\nload average at the end: {open('/proc/loadavg').read().split()[:3]} on "
          f"{__import__('os').cpu_count()} cores (timings are only as quiet as the machine).")
    print(f"native llama-server at rest (1 slot): {rest} MB. llama-bench is not built by "
          "neverdark.artifacts: decode is each server's own measure (llama-server's timings; "
          "llama-cpp-python's stream, first to last token).")
    if args.fleet_report and args.fleet_report.exists():
        rep = json.loads(args.fleet_report.read_text())
        print("\nTest fleet capacity drill (tests/test_fleet_engines.py):")
        for name, fig in rep.items():
            if name.startswith("capacity"):
                unit = next(u for u in fig["peak_rss_mb"] if u.startswith("neverdark-llama"))
                print(f"  {name}: llama peak RSS {fig['peak_rss_mb'][unit]} MB (fit "
                      f"{fig['fit']['server_mb']} MB), gateways "
                      f"{[v for u, v in fig['peak_rss_mb'].items() if 'wizard' in u]} MB "
                      f"(fit {fig['fit']['gateway_mb']}), turns "
                      f"{ {w: (t['answered'], t['sent']) for w, t in fig['turns'].items()} }")


if __name__ == "__main__":
    main()
