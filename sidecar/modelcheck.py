"""`python -m sidecar.modelcheck [WIZARD..] [--budget S] [--backend NAME]`: is a wizard's local
fallback fast enough for a conversation? Run as root on the host (`neverdark model check` over
SSH); one JSON line per wizard on stdout, the result also left in MODEL_CHECK_DIR/<wizard>.json
(atomically, 0644) for the sidecar's /metrics.

What it sends is the wizard's real prompt: Hermes itself, run as the wizard's user with the local
variant, builds the request (sidecar/hermes_prompt.py: system prompt with persona and notice,
tool schemas, one user turn), and that body goes to the wizard's own local backend, streamed:

1. cold: the same body with a unique marker at the start of the system prompt, so no cached
   prefix applies on any engine: first-token latency of a full prefill, the prefill rate;
2. prime: the real body (its answer becomes the conversation's history). This also puts the
   wizard's own prefix back where a single-context engine (llama-cpp-python) lost it to step 1;
   engines with slots or a prompt cache answer it from there;
3. warm: the prime's conversation plus a new user turn: the first token of a warm turn.

Rates come from the engine's own `timings` (both engines neverdark runs send them in the last
streamed chunk), else from the client's clock. The verdict: a warm turn, its first token plus
ANSWER_TOKENS at the decode rate, within the interactive budget or over it.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from neverdark import contract
from sidecar import config
from sidecar.atomic import write_atomic

PLATFORM = "telegram"          # whose prompt: the interactive case the budget is for
NEXT_TURN = "Thanks. In one sentence, what can you do for me?"
REQUEST_TIMEOUT = 1800.0       # a cold Hermes-sized prefill on an emulated or slow Pi: minutes
CAPTURE_TIMEOUT = 180.0
RESULT_MODE = 0o644            # figures, no secrets: the sidecar and operators read them


class CheckError(RuntimeError):
    pass


@dataclass
class Completion:
    """One streamed completion as the client saw it, with the engine's timings if it sent them."""
    first_token_s: float | None   # request sent -> first content (None: no content came)
    wall_s: float
    text: str
    content_chunks: int
    decode_span_s: float          # first content -> last content, the client's clock
    prompt_tokens: int | None = None     # evaluated by the engine (cache hits excluded)
    cached_tokens: int | None = None
    prompt_ms: float | None = None
    generated_tokens: int | None = None
    predicted_ms: float | None = None
    queue_ms: float | None = None        # waiting for the engine (llama_launcher's lock only)


def _apply_chunk(c: Completion, chunk: dict) -> None:
    t = chunk.get("timings")
    if isinstance(t, dict):
        c.prompt_tokens, c.cached_tokens = t.get("prompt_n"), t.get("cache_n")
        c.prompt_ms = t.get("prompt_ms")
        c.generated_tokens, c.predicted_ms = t.get("predicted_n"), t.get("predicted_ms")
        c.queue_ms = t.get("queue_ms")
    usage = chunk.get("usage")
    if isinstance(usage, dict) and c.prompt_tokens is None:
        c.prompt_tokens = usage.get("prompt_tokens")
        c.generated_tokens = usage.get("completion_tokens")


def stream(client: httpx.Client, url: str, body: dict, api_key: str | None) -> Completion:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    c = Completion(None, 0.0, "", 0, 0.0)
    start = time.monotonic()
    last = None
    with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            raise CheckError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            _apply_chunk(c, chunk)
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    now = time.monotonic() - start
                    if c.first_token_s is None:
                        c.first_token_s = now
                    last = now
                    c.text += text
                    c.content_chunks += 1
    c.wall_s = time.monotonic() - start
    if c.first_token_s is not None and last is not None:
        c.decode_span_s = last - c.first_token_s
    return c


def first_token(c: Completion) -> float:
    """First-token latency; an answer with no content (the model stopped at once) took its
    prefill and one token: its wall time."""
    return c.first_token_s if c.first_token_s is not None else c.wall_s


def prefill_rate(c: Completion) -> tuple[float | None, str]:
    if c.prompt_tokens and c.prompt_ms:
        return c.prompt_tokens / (c.prompt_ms / 1000), "engine"
    if c.prompt_tokens:
        return c.prompt_tokens / first_token(c), "client"
    return None, "none"


def decode_rate(*completions: Completion) -> tuple[float | None, str]:
    """Tokens over time across the completions (three answers of the same length: steadier
    than any one), by the engine's timings when it sent them, else the client's clock."""
    timed = [c for c in completions if c.generated_tokens and c.predicted_ms]
    if timed:
        return (sum(c.generated_tokens for c in timed)
                / (sum(c.predicted_ms for c in timed) / 1000)), "engine"
    clocked = [c for c in completions if c.content_chunks > 1 and c.decode_span_s > 0]
    if clocked:
        return (sum(c.content_chunks - 1 for c in clocked)
                / sum(c.decode_span_s for c in clocked)), "client"
    return None, "none"


def request_body(captured: dict, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {k: v for k, v in captured.items() if k not in ("messages", "max_tokens", "stream",
                                                               "stream_options", "model")}
    # ignore_eos: llama.cpp's server generates the whole answer (a rate needs tokens); engines
    # that do not know the key ignore it.
    body.update(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)
    return body


def measure(base_url: str, model: str, captured: dict, *, api_key: str | None = None,
            budget_s: float = contract.INTERACTIVE_BUDGET_S,
            answer_tokens: int = contract.ANSWER_TOKENS,
            timeout: float = REQUEST_TIMEOUT) -> dict:
    """Cold, prime and warm completions of the captured prompt on the backend at `base_url`."""
    messages = captured.get("messages")
    if not messages or messages[0].get("role") != "system":
        raise CheckError("the captured request has no system message first")
    url = base_url.rstrip("/") + "/chat/completions"
    marked = [dict(messages[0], content=f"[model check {secrets.token_hex(8)}]\n"
                   + str(messages[0]["content"])), *messages[1:]]
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=10)) as client:
        cold = stream(client, url, request_body(captured, model, marked, answer_tokens), api_key)
        prime = stream(client, url, request_body(captured, model, messages, answer_tokens), api_key)
        turn = [*messages, {"role": "assistant", "content": prime.text},
                {"role": "user", "content": NEXT_TURN}]
        warm = stream(client, url, request_body(captured, model, turn, answer_tokens), api_key)
    prefill, prefill_from = prefill_rate(cold)
    decode, decode_from = decode_rate(cold, prime, warm)
    if decode is None:
        raise CheckError("no decode rate: the backend generated no tokens in three completions")
    warm_turn = first_token(warm) + answer_tokens / decode
    return {
        "model": model, "budget_s": budget_s, "answer_tokens": answer_tokens,
        "prompt_tokens": cold.prompt_tokens, "tools": len(captured.get("tools") or ()),
        "first_token_s": {"cold": round(first_token(cold), 3), "warm": round(first_token(warm), 3)},
        "prefill_tokens_per_s": None if prefill is None else round(prefill, 2),
        "decode_tokens_per_s": round(decode, 2),
        "rates_from": {"prefill": prefill_from, "decode": decode_from},
        "warm_turn_s": round(warm_turn, 2), "within_budget": warm_turn <= budget_s,
        # the answers' length, not their text: the file is world-readable, and the model
        # answered the wizard's real prompt (its persona, its memories)
        "completions": {k: {f: x for f, x in asdict(v).items() if f != "text"}
                        | {"answer_chars": len(v.text)}
                        for k, v in (("cold", cold), ("prime", prime), ("warm", warm))},
    }


# --- the wizard's prompt, from Hermes as its user ------------------------------------------------

def capture_prompt(w: config.WizardConfig, backend: config.BackendConfig, *,
                   hermes_python: str, platform: str = PLATFORM, as_user: str | None = None,
                   lib: str | None = None, timeout: float = CAPTURE_TIMEOUT) -> dict:
    """The body the wizard's gateway would send `backend` (sidecar/hermes_prompt.py)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(w.home), "LANG": "C.UTF-8",
           "PYTHONPATH": lib or str(Path(__file__).resolve().parent.parent)}
    argv = [hermes_python, "-m", "sidecar.hermes_prompt", "--home", str(w.home),
            "--variant", "-", "--platform", platform]
    if as_user is not None:
        argv = ["runuser", "-u", as_user, "--", "env", "-i",
                *(f"{k}={v}" for k, v in env.items()), *argv]
    try:
        variant = Path(backend.variant).read_text()
    except OSError as exc:
        raise CheckError(f"{backend.variant}: cannot read the variant: {exc.strerror}") from None
    try:
        proc = subprocess.run(argv, input=variant, capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=str(w.home))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckError(f"capturing {w.name}'s prompt from Hermes: {exc}") from None
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
        raise CheckError(f"capturing {w.name}'s prompt from Hermes failed (exit "
                         f"{proc.returncode}): {tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CheckError(f"capturing {w.name}'s prompt: Hermes gave no request body") from None


def pick_backend(w: config.WizardConfig, name: str | None) -> config.BackendConfig:
    if name is not None:
        b = next((b for b in w.backends if b.name == name), None)
        if b is None:
            raise CheckError(f"wizard {w.name} has no backend {name!r} "
                             f"(it has {', '.join(x.name for x in w.backends)})")
        return b
    b = next((b for b in w.backends if b.kind == "local"), None)
    if b is None:
        raise CheckError(f"wizard {w.name} has no local backend (--backend names another)")
    return b


def save(directory: Path, wizard: str, result: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    dest = directory / f"{wizard}.json"
    write_atomic(dest, (json.dumps(result, allow_nan=False, sort_keys=True) + "\n").encode(),
                 mode=RESULT_MODE)
    return dest


def check_wizard(cfg: config.SidecarConfig, wizard: str, *, backend: str | None, budget: float,
                 hermes_python: str, as_user: bool, lib: str | None, platform: str = PLATFORM,
                 wall=time.time) -> dict:
    w = cfg.wizards.get(wizard)
    if w is None:
        raise CheckError(f"unknown wizard {wizard!r} (on this host: {', '.join(cfg.wizards)})")
    b = pick_backend(w, backend)
    captured = capture_prompt(w, b, hermes_python=hermes_python, lib=lib, platform=platform,
                              as_user=contract.wizard_user(wizard) if as_user else None)
    result = {"ok": True, "wizard": wizard, "backend": b.name, "kind": b.kind,
              "platform": platform, "timestamp": round(wall(), 3),
              **measure(b.base_url, b.model, captured, api_key=b.api_key, budget_s=budget)}
    result["path"] = str(save(cfg.model_check_dir, wizard, result))
    return result


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.modelcheck", description=__doc__)
    parser.add_argument("wizards", nargs="*", help="default: every wizard with a local backend")
    parser.add_argument("--budget", type=float, default=contract.INTERACTIVE_BUDGET_S)
    parser.add_argument("--backend", default=None, help="default: the wizard's first local one")
    parser.add_argument("--platform", choices=("telegram", "api_server"), default=PLATFORM,
                        help="whose prompt Hermes builds (toolsets and hints differ)")
    parser.add_argument("--config", default=contract.SIDECAR_CONFIG)
    parser.add_argument("--hermes-python", default=f"{contract.venv('hermes')}/bin/python")
    parser.add_argument("--lib", default=contract.SIDECAR_LIB,
                        help="PYTHONPATH that holds this sidecar package, for Hermes' Python")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error("--budget must be a positive number of seconds")
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 2
    names = args.wizards or [n for n, w in cfg.wizards.items()
                             if args.backend or any(b.kind == "local" for b in w.backends)]
    if not names:
        print(json.dumps({"ok": False, "error": "no wizard on this host has a local backend"}))
        return 2
    worst = 0
    for name in names:
        # As root, Hermes runs as the wizard's own user (its home, its files); a test runs as is.
        as_user = os.geteuid() == 0 and _user_exists(contract.wizard_user(name))
        try:
            result = check_wizard(cfg, name, backend=args.backend, budget=args.budget,
                                  hermes_python=args.hermes_python, as_user=as_user, lib=args.lib,
                                  platform=args.platform)
        except (CheckError, httpx.HTTPError, OSError, ValueError) as exc:
            print(json.dumps({"ok": False, "wizard": name, "error": str(exc) or type(exc).__name__}),
                  flush=True)
            worst = 2
            continue
        print(json.dumps(result), flush=True)
        if not result["within_budget"]:
            worst = max(worst, 1)
    return worst


if __name__ == "__main__":
    sys.exit(main())
