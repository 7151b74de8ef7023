"""Deploy kit benchmark: prints figures for the README (not a timed test).

    .venv/bin/python bench/deploy_bench.py

- fresh deploy and no-op re-run of the 2-host test fleet, and the changes the re-run reports;
- the sidecar on real systemd: from its decision to a verified flip (write, gateway restart,
  /health, one real turn through the gateway on the new backend), for an outage of vps1's
  Anthropic stand-in (merlin: claude -> local, gandalf: claude -> gpt) and its recovery;
- on the local backend (llama-cpp-python serving Gemma 3 270M, as deployed): first and
  repeated answer to a Hermes-sized prompt (~9K tokens), and the server's RSS at n_ctx 65536.
  Reference figures measured on this kind of machine (FIELD-NOTES): native llama-server 23.1 s
  then 0.26 s and 0.54 GB RSS; llama-cpp-python server 37.5 s then 0.32 s.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.bed import Testbed  # noqa: E402

PROMPT_WORDS = 6500  # ~9K Gemma tokens, the size of one Hermes request


def timed_completion(bed: Testbed, host: str, port: int, system: str) -> tuple[float, dict]:
    script = ("import json,sys,time,urllib.request as u\n"
              "body=json.dumps({'messages':[{'role':'system','content':sys.stdin.read()},"
              "{'role':'user','content':'Say hello.'}],'max_tokens':8}).encode()\n"
              f"r=u.Request('http://127.0.0.1:{port}/v1/chat/completions',data=body,"
              "headers={'content-type':'application/json'})\n"
              "t=time.monotonic();x=json.load(u.urlopen(r,timeout=600))\n"
              "print(json.dumps({'s':time.monotonic()-t,'usage':x['usage']}))\n")
    out = bed.fleet.ssh(host, f"python3 -c {shlex.quote(script)}", input=system)
    data = json.loads(out.strip().splitlines()[-1])
    return data["s"], data["usage"]


def switch_timings(bed: Testbed, host: str, since: str) -> list[dict]:
    out = bed.fleet.ssh(host, f"journalctl -u neverdark-sidecar -o cat --no-pager --since '{since}'"
                              " | grep '\"switch done\"' || true")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wait_switches(bed: Testbed, host: str, since: str, count: int, timeout: float = 240) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = switch_timings(bed, host, since)
        if len(done) >= count:
            return done
        time.sleep(2)
    raise TimeoutError(f"{count} switches not seen on {host} within {timeout}s")


def print_switches(title: str, switches: list[dict]) -> None:
    print(title)
    for s in switches:
        t = s["timings"]
        print(f"  {s['wizard']:8} {s['from']:>6} -> {s['to']:6} ok={s['ok']}  total {t['total']:5.1f} s"
              f" (restart {t.get('restart', 0):.1f}, ready {t.get('ready', 0):.1f},"
              f" first turn {t.get('first_turn', 0):.1f})")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="neverdark-bench-") as tmp, Testbed(Path(tmp)) as bed:
        t = time.monotonic()
        first = bed.deploy()
        fresh = time.monotonic() - t
        assert first.rc == 0, first.output[-3000:]
        t = time.monotonic()
        again = bed.deploy()
        noop = time.monotonic() - t
        print(f"fresh deploy, 2 hosts:        {fresh:7.1f} s ({first.changed} changes)")
        print(f"no-op re-run, 2 hosts:        {noop:7.1f} s ({again.changed} changes)")

        # The pi host's server is used by one wizard only: no prompt cache, one context.
        system = " ".join(f"rule{i % 97} applies to case {i}." for i in range(PROMPT_WORDS // 5))
        first_s, usage = timed_completion(bed, "pi1", 8081, system)
        repeat_s, _ = timed_completion(bed, "pi1", 8081, system)
        print(f"Hermes-sized prompt ({usage['prompt_tokens']} tokens), Gemma 3 270M, 2 threads:")
        print(f"  first answer:               {first_s:7.2f} s")
        print(f"  same prefix again:          {repeat_s:7.2f} s")
        rss = bed.fleet.ssh("pi1", "ps -o rss= -p $(systemctl show -p MainPID --value "
                                   "neverdark-llama-gemma3-270m.service)").strip()
        print(f"llama server RSS, n_ctx 65536: {int(rss) / 1024 / 1024:6.2f} GB "
              "(native llama-server: 0.54 GB, FIELD-NOTES)")

        since = bed.fleet.ssh("vps1", "date '+%Y-%m-%d %H:%M:%S'").strip()
        primary = bed.mocks["vps1/anthropic"]
        primary.scenario([{"type": "fail", "status": 503, "times": None}])
        print_switches("sidecar, vps1 Anthropic outage (503), decision to verified flip:",
                       wait_switches(bed, "vps1", since, 2))
        since = bed.fleet.ssh("vps1", "date '+%Y-%m-%d %H:%M:%S'").strip()
        primary.reset()
        print_switches("sidecar, recovery (after rise and min_dwell), decision to verified flip:",
                       wait_switches(bed, "vps1", since, 2))


if __name__ == "__main__":
    main()
