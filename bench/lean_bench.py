"""What a fallback turn costs on the local model, lean profile on and off.

    .venv/bin/python bench/lean_bench.py [--gen-tokens N]

Runs on the runner with real parts: a real `hermes gateway run` (hermes-agent 0.19.0), its
primary an LLMock, its local backend the deployed launcher (llama_launcher on llama-cpp-python,
with the unit's command line: chatml, n_ctx 65536, 2 threads) with the real Gemma 3 270M. For each profile the
llama server is restarted (a cold prefix), the wizard is switched onto it the way the sidecar
does, and three turns are timed:

  cold   a new conversation, first turn, nothing cached
  next   the same conversation's next turn (its prefix restored from the context)
  warm   another new conversation (the system prompt cached)

Each turn is broken down by the engine's own counters (sidecar.engine: a /metrics scrape before
and after): requests, prompt tokens as the server counts them and how many came from its cache,
queue, prefill, generated tokens, generation, cache save, and the gateway's share of the wall
time. Then it projects the same token counts onto a Raspberry Pi 5 and a 4-core VPS running
Gemma E2B/E4B-class models from published llama.cpp rates (sources below). Prints figures only;
nothing is asserted. Serialise it with other heavy runs: flock /tmp/neverdark-heavy.lock ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from neverdark import contract  # noqa: E402
from neverdark import hermes_config as hc  # noqa: E402
from sidecar import engine  # noqa: E402
from testbed.hermes_gateway import Gateway  # noqa: E402
from testbed.llama_server import LlamaServer  # noqa: E402
from testbed.llmock import LLMock, free_port  # noqa: E402

TURNS = (("cold", "new", "Hello Merlin, how are you today?"),
         ("next", "same", "What can you do for me while your usual model is away?"),
         ("warm", "new", "Good morning! Is anything wrong?"))

# Published llama.cpp rates, tokens/s (prompt processing, generation). Pi 5 figures as collected
# in shared/FIELD-NOTES.md ("Local takeover"); the x86 row is an i7-10750H laptop CPU at 3
# threads running Gemma 4 E2B Q4_0 (pt13762104.github.io, "Taking a look at Gemma 4 E2B (QAT)",
# 2026-06-06: pp1024 71-84, tg256 18-20), standing in for a 4-core VPS. E4B on x86 is scaled from
# E2B by the Pi 5's E4B/E2B ratios (pp x0.73, tg x0.54): an estimate, marked so.
RATES = [
    ("Pi 5, Gemma 4 E2B Q4_K_M", 30.0, 6.3, ""),
    ("Pi 5, Gemma 4 E4B Q4_0", 22.0, 3.4, ""),
    ("4-core VPS, Gemma 4 E2B Q4_0", 71.0, 18.0, ""),
    ("4-core VPS, Gemma 4 E4B", 52.0, 9.7, " (est.)"),
]
# Pi 5 prompt processing slows as the context fills: 29 tok/s at 728 tokens, 7.7 at 12.7K
# (FIELD-NOTES); applied to prompts past 4,000 tokens.
LONG_PROMPT_FACTOR = 7.7 / 29


def wizard(mock: LLMock, llama_port: int, profile: str) -> dict:
    local = {"name": "local", "kind": "local", "model": "gemma3-270m",
             "base_url": f"http://127.0.0.1:{llama_port}/v1", "api_key_secret": None,
             "context_length": 65536, "max_tokens": 256, "profile": profile,
             "tools": [] if profile == "lean" else None}
    return {"name": "merlin", "api_port": free_port(), "api_key_secret": "API",
            "telegram_token_secret": None, "telegram_allowed_users": [],
            "persona": "You are Merlin, the fleet's wizard.", "notice": None,
            "backends": [{"name": "claude", "kind": "anthropic", "model": "claude-bench",
                          "base_url": mock.root + "/anthropic", "api_key_secret": "ANT",
                          "context_length": 200000, "max_tokens": 1024}, local]}


async def scrape(base_url: str) -> engine.EngineTotals | None:
    async with httpx.AsyncClient() as c:
        return await engine.scrape(c, base_url)


def tokens_of(base_url: str, text: str) -> int:
    r = httpx.post(contract.url_root(base_url) + "/extras/tokenize", json={"input": text}, timeout=60)
    r.raise_for_status()
    return len(r.json()["tokens"])


def run_profile(root: Path, profile: str, secrets_: dict) -> dict:
    mock = LLMock(root)
    llama_port = free_port()
    w = wizard(mock, llama_port, profile)
    gw = None
    llama = LlamaServer(root, port=llama_port)
    result = {"profile": profile, "turns": []}
    try:
        gw = Gateway.for_wizard(root / f"gw-{profile}", w, secrets_)
        gw.activate("local")
        session = None
        for name, conv, text in TURNS:
            before = asyncio.run(scrape(llama.base_url))
            started = time.monotonic()
            r = gw.post([{"role": "user", "content": text}], session=session if conv == "same" else None)
            wall = time.monotonic() - started
            after = asyncio.run(scrape(llama.base_url))
            r.raise_for_status()
            session = r.headers.get("X-Hermes-Session-Id")
            calls = gw.session(session)["session"].get("api_call_count") or None
            b = engine.breakdown(wall, after - before, calls)
            answer = r.json()["choices"][0]["message"]["content"] or ""
            result["turns"].append({"turn": name, **b.as_dict(), "answer": answer[:60]})
    finally:
        if gw is not None:
            gw.stop()
        llama.stop()
        mock.stop()
    return result


def tool_schema_tokens(root: Path, secrets_: dict) -> int:
    """The full profile's tool schemas as JSON, in Gemma tokens (what chatml drops)."""
    from testbed.hermes_gateway import KeyTap
    mock = LLMock(root)
    tap = KeyTap(mock.port)
    llama = LlamaServer(root, n_ctx=32768)
    gw = None
    try:
        w = wizard(mock, tap.port, "full")
        w["backends"][1]["base_url"] = tap.root + "/v1"
        gw = Gateway.for_wizard(root / "gw-tools", w, secrets_)
        gw.activate("local")
        gw.post([{"role": "user", "content": "hello"}])
        body = tap.bodies("/chat/completions")[-1]
        return tokens_of(llama.base_url, json.dumps(body.get("tools") or []))
    finally:
        if gw is not None:
            gw.stop()
        llama.stop()
        tap.close()
        mock.stop()


def projection(results: dict, tools_tokens: int, gen_tokens: int) -> list[str]:
    lines = ["| host, model | profile | cold first turn | next turn | new conversation (warm) |",
             "|---|---|---|---|---|"]
    for label, pp, tg, note in RATES:
        for profile in ("lean", "full", "full+tools"):
            turns = {t["turn"]: t for t in results["full" if profile != "lean" else "lean"]["turns"]}
            cells = []
            for name in ("cold", "next", "warm"):
                t = turns[name]
                evaluated = t["prompt_tokens"] - (t["cached_tokens"] or 0)
                if profile == "full+tools":
                    evaluated += tools_tokens if name == "cold" else 0
                rate = pp * (LONG_PROMPT_FACTOR if evaluated > 4000 else 1.0)
                secs = evaluated / rate + gen_tokens / tg
                cells.append(f"{secs:,.0f} s" if secs < 120 else f"{secs / 60:,.1f} min")
            lines.append(f"| {label}{note} | {profile} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-tokens", type=int, default=60,
                        help="answer length for the projection (a brief answer: ~60 tokens)")
    args = parser.parse_args()
    secrets_ = {"API": "nd-api-" + secrets.token_hex(16),
                "ANT": "sk-ant-api03-" + secrets.token_hex(8)}
    root = Path(tempfile.mkdtemp(prefix="neverdark-lean-bench-"))
    results = {p: run_profile(root, p, secrets_) for p in ("lean", "full")}
    tools = tool_schema_tokens(root, secrets_)
    print("Real gateway, real Gemma 3 270M on llama_launcher (2 threads), per turn:")
    for profile, res in results.items():
        print(f"\nprofile {profile}:")
        for t in res["turns"]:
            per = t["prompt_tokens"] / t["requests"] if t.get("requests") else t["prompt_tokens"]
            print(f"  {t['turn']:5} {engine.format_breakdown(t)}")
            print(f"        prompt per request: {per:,.0f} tokens")
            print(f"        answer: {t['answer']!r}")
    print(f"\nfull profile's 16 tool schemas, were they carried: +{tools:,} prompt tokens")
    print(f"\nProjection (prompt tokens above / published prompt rate + {args.gen_tokens} "
          "generated tokens / published generation rate; gateway overhead not included):\n")
    for line in projection(results, tools, args.gen_tokens):
        print(line)
    print(json.dumps({"results": results, "tools_tokens": tools}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
