"""The two local model engines side by side, Gemma 3 270M at n_ctx 65536 on 2 threads.

    .venv/bin/python bench/llama_engine_bench.py [--seconds 60] [--fleet-report PATH]

Each engine runs with the command line and environment its unit gets (neverdark.engines via
testbed.localserver), on the runner, with a real Hermes prompt: what a real Hermes 0.19.0
gateway (testbed.hermes_gateway, configured as the deploy configures three wizards with
different personas) sends its local backend, recorded by an LLMock standing in for the model.
Printed, one table per question:

1. Memory: RSS when ready, and after the load of question 4 (three wizards at once), against
   the memory fit's figure for the same server and against native llama-server at rest.
2. A new conversation's first turn: cold (nothing cached: what the sidecar's check turn pays
   when it switches a wizard onto the model), and warm (after every wizard's check turn, and
   another wizard's turn since: what the engine's own cache kept, llama-server in the wizard's
   slot, llama-cpp-python in its RAM prompt cache); wall time and the prompt tokens the server
   evaluated (its own counters). A server restart empties both caches: the first turn after it
   is a cold one again.
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
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from neverdark import hermes_config, memory_fit  # noqa: E402
from testbed.hermes_gateway import Gateway  # noqa: E402
from testbed.llmock import LLMock, free_port  # noqa: E402
from testbed.localserver import LocalServer, gemma_model, server_spec  # noqa: E402

WIZARDS = ("gandalf", "merlin", "radagast")
PERSONAS = {"merlin": "You are Merlin, keeper of the northern tower.",
            "gandalf": "You are Gandalf, a grey wanderer who speaks in riddles.",
            "radagast": "You are Radagast, friend of birds and beasts."}
POLICY = None


def capture_prompts(tmp: Path) -> dict[str, list[dict]]:
    """What each wizard's real Hermes gateway sends its local backend (recorded by an LLMock
    standing in for the model): the messages of its first turn."""
    out = {}
    tmp.mkdir(parents=True, exist_ok=True)
    mock = LLMock(tmp)
    try:
        for w in WIZARDS:
            spec = {"name": w, "api_port": free_port(), "api_key_secret": "K",
                    "telegram_token_secret": None, "telegram_allowed_users": [],
                    "telegram_api_url": None, "persona": PERSONAS[w],
                    "notice": hermes_config.DEFAULT_NOTICE, "backends": [
                        {"name": "claude", "kind": "anthropic", "model": "claude-sonnet-4-5",
                         "base_url": "http://127.0.0.1:9/anthropic", "api_key_secret": "A",
                         "context_length": 200000, "max_tokens": 1024},
                        {"name": "local", "kind": "local", "model": "gemma3-270m",
                         "base_url": mock.openai_base, "api_key_secret": None,
                         "context_length": 65536, "max_tokens": 64}]}
            gw = Gateway.for_wizard(tmp / w, spec, {"K": "bench-key-0123456789abcdef",
                                                    "A": "sk-ant-bench-0000"})
            try:
                gw.activate("local")
                since = time.monotonic()
                gw.post([{"role": "user", "content": "Hello!"}]).raise_for_status()
                bodies = [r["body"] for r in mock.chats(since)
                          if isinstance((r.get("body") or {}).get("messages"), list)]
                out[w] = bodies[0]["messages"]
            finally:
                gw.stop()
    finally:
        mock.stop()
    return out


def messages(prompt: list[dict], text: str) -> list[dict]:
    """The wizard's prompt with `text` as its user message: a new conversation."""
    msgs = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
    msgs[last]["content"] = text
    return msgs


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


def load(server: LocalServer, prompts: dict, wizards, seconds: float) -> list[float]:
    """Each wizard sends new conversations back to back; every turn's latency."""
    lat: list[float] = []
    stop = time.monotonic() + seconds

    def run(w):
        n = 0
        while time.monotonic() < stop:
            n += 1
            lat.append(turn(server, messages(prompts[w], f"{w} question {n}: hello?"))["wall_s"])
    threads = [threading.Thread(target=run, args=(w,)) for w in wizards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def engine_run(engine: str, prompts: dict, seconds: float, tmp: Path) -> dict:
    res: dict = {"engine": engine}
    spec = server_spec(engine, WIZARDS, prompt_tokens=POLICY.prompt_tokens)
    model = gemma_model(engine)
    res["fit_mb"] = {n: memory_fit.server_mb(model, n, POLICY) for n in (1, 3)}
    server = LocalServer(spec, tmp / f"{engine}.log").start()
    try:
        res["ready_s"] = round(server.ready_s, 1)
        res["rss_ready_mb"] = round(server.rss_mb())
        res["decode_tok_s"] = round(decode_rate(server), 1)
        # Each wizard's check turn, as the sidecar sends one when it switches the wizard onto
        # the model (merlin's is the cold first turn measured); then gandalf's new conversation
        # after radagast's turn took the context (llama-cpp-python) or a slot (llama-server).
        checks = {w: turn(server, messages(prompts[w], "Hello, who are you?"))
                  for w in ("merlin", "radagast", "gandalf")}
        cold = checks["merlin"]
        res["prefix_tokens"] = cold["usage"]["prompt_tokens"]
        res["cold"] = {"wall_s": round(cold["wall_s"], 2), "evaluated": cold["evaluated"]}
        turn(server, messages(prompts["radagast"], "A question in between: why?"))
        fresh = turn(server, messages(prompts["gandalf"], "A new conversation: hello?"))
        res["warm"] = {"wall_s": round(fresh["wall_s"], 2), "evaluated": fresh["evaluated"]}
        solo = load(server, prompts, WIZARDS[:1], seconds)
        res["queue"] = {1: {"median_s": round(statistics.median(solo), 2), "wait_s": 0.0}}
        for n in (2, 3):
            lat = load(server, prompts, WIZARDS[:n], seconds)
            res["queue"][n] = {"median_s": round(statistics.median(lat), 2),
                               "wait_s": round(statistics.median(lat) - statistics.median(solo), 2)}
        res["rss_after_load_mb"] = round(server.rss_mb())
    finally:
        server.stop()
    return res


def native_at_rest(tmp: Path) -> int:
    """Native llama-server, one slot, nothing but the model: the yardstick for RSS."""
    spec = server_spec("llama-server", ("merlin",))
    s = LocalServer(spec, tmp / "rest.log").start()
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
        prompts = capture_prompts(tmp / "prompts")
        rest = native_at_rest(tmp)
        runs = [engine_run(e, prompts, args.seconds, tmp) for e in args.engines.split(",")]
    print(json.dumps({"native_at_rest_mb": rest, "runs": runs}, indent=1))
    print("\nGemma 3 270M Q4_K_M, n_ctx 65536, 2 threads; prompt: Hermes 0.19.0's own request "
          f"({runs[0]['prefix_tokens']} prompt tokens)")
    print("| engine | RSS ready | RSS after 3-wizard load | fit (1 / 3 wizards) | "
          "vs native at rest, same contexts | cold first turn | warm first turn | "
          "decode tok/s | queue wait 1 / 2 / 3 wizards |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        q = r["queue"]
        # llama-cpp-python has one context: native with one slot; llama-server: itself, ready.
        base = rest if r["engine"] == "llama-cpp-python" else r["rss_ready_mb"]
        print(f"| {r['engine']} | {r['rss_ready_mb']} MB | {r['rss_after_load_mb']} MB | "
              f"{r['fit_mb'][1]} / {r['fit_mb'][3]} MB | {r['rss_after_load_mb'] / base:.2f}x | "
              f"{r['cold']['wall_s']} s ({r['cold']['evaluated']} tok) | "
              f"{r['warm']['wall_s']} s ({r['warm']['evaluated']} tok) | "
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
