"""The demo: the built-in test fleet, deployed the way an operator deploys a real one.

    make demo        (runs scripts/setup.sh --demo, then this)

Boots two Debian 12 hosts with systemd-nspawn (an x86_64 VPS and an aarch64 Raspberry Pi under
qemu-user, as tests/test_fleet_mixed_arch.py does), starts LLMock servers
as their cloud APIs, writes an inventory with three wizards, runs
`pyinfra inventory deploys/fleet.py`, re-runs it to show it changes nothing, prints where
each wizard and model runs and the `neverdark status` table, then takes merlin's cloud API down
(503) and brings it back while talking to merlin, and prints the measured failover and failback
times (outage start to the first answer from the local model, recovery to the first answer from
the primary), then drills merlin onto its local model and back with `neverdark drill`, which
shows where each fallback turn's time goes.

It says at once what it will deploy and what that needs built or fetched, and prepares those
side by side, each cached for the next run: per arch, what its hosts' engine runs
(neverdark.artifacts: the llama-cpp-python wheel; llama-server only for a fleet that uses it),
then the wheelhouse the hosts install from; the hosts' Debian images; the model file. The
compile takes the CPUs, the rest mostly waits on downloads and the disk. Lines that start a
phase carry the seconds since the demo started.
"""

from __future__ import annotations

import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

from neverdark import artifacts, plan
from testbed import fleet as testfleet, wheelhouse
from testbed.outage import first_answer_from
from testbed.bed import MIXED_HOSTS, Testbed

LOCAL, CLOUD = "gemma3-270m", "claude-sonnet-4-5"


STARTED = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    """A line that starts or ends a phase, with the seconds since the demo started."""
    say(f"[{time.monotonic() - STARTED:5.0f} s] {text}")


def show(bed, *command: str) -> None:
    proc = bed.neverdark(*command, timeout=120)
    for line in (proc.stdout + proc.stderr).splitlines():
        say("  " + line)
    say()


def secs(value: float | None) -> str:
    return "no answer" if value is None else f"{value:.1f} s"


def outage(bed) -> None:
    """merlin's cloud API goes dark (503) and comes back; a user keeps talking throughout."""
    merlin = bed.client("merlin")
    claude = bed.mocks["vps1/anthropic"]
    first = merlin.turn("Hello Merlin!")
    say(f"merlin answers from {first.model} in {first.latency:.1f} s")
    say("\n--- outage: vps1's Anthropic API (LLMock) now answers every request with 503 ---")
    t0 = time.monotonic()
    claude.fault({"type": "fail", "status": 503, "times": None})
    down = first_answer_from(merlin, LOCAL, t0)
    bed.wait_active("vps1", "merlin", "local")
    say(f"  outage start -> first answer from the local model: {secs(down.seconds)} "
        f"({len(down.turns)} turns, {down.failed} failed)")
    switch = bed.sidecar_status("vps1")["wizards"]["merlin"]["transitions"][-1]
    say(f"  sidecar: {switch['from']} -> {switch['to']} ({switch['reason']}), verified switch "
        f"took {switch['timings'].get('total', 0):.1f} s")
    turn = merlin.turn("How are you feeling?")
    say(f"  a turn now: answered by {turn.model} in {turn.latency:.1f} s: {turn.content[:70]!r}")
    say("\n$ neverdark status")
    show(bed, "status")
    say("--- recovery: the API answers again ---")
    t1 = time.monotonic()
    claude.recover()
    up = first_answer_from(merlin, CLOUD, t1)
    say(f"  recovery -> first answer from the primary again: {secs(up.seconds)} "
        f"({len(up.turns)} turns, {up.failed} failed; failback waits for rise passes and the "
        f"dwell on the fallback)")
    bed.wait_active("vps1", "merlin", "claude")
    say(f"\nfailover {secs(down.seconds)}, failback {secs(up.seconds)}, "
        f"failed turns {down.failed + up.failed}\n")
    say("$ neverdark status")
    show(bed, "status")


def drill(bed) -> None:
    """Where a fallback turn's time goes: the operator's drill onto the local model, each turn
    broken down by the engine's own counters (queue, prompt and cache hits, prefill, generation,
    cache save, gateway)."""
    say("$ neverdark drill merlin --to local --turns 2")
    proc = bed.neverdark("drill", "merlin", "--to", "local", "--turns", "2", timeout=900)
    for line in (proc.stdout + proc.stderr).splitlines():
        say("  " + line)
    say()


def host_line(spec) -> str:
    return (f"{spec.name} ({spec.profile}, {spec.arch}"
            f"{' under qemu-user' if spec.emulated else ''}, {spec.memory_mb} MB)")


def prepare(bed: Testbed) -> bool:
    """Build or fetch, side by side, what the fleet needs that is cached between runs: per arch
    the artifacts its hosts' engine runs and then that arch's wheelhouse; the host images; the
    model file. Each line says whether it was cached or how long it took."""
    models = bed.default_models()
    parts = tuple(p for p in artifacts.PARTS
                  if p in {artifacts.ENGINE_PART[m["engine"]] for m in models.values()})
    what = " and ".join({"wheel": "llama-cpp-python wheel", "server": "llama-server"}[p]
                        for p in parts)
    arches = sorted({spec.arch for spec in bed.host_specs})
    on = ", ".join(f"{name} on {m['engine']}" for name, m in models.items())
    say(f"  local model: {on}, which every host runs: so per arch ({', '.join(arches)}) the "
        f"{what}")

    def timed(job) -> tuple[str, float]:
        t = time.monotonic()
        return job(), time.monotonic() - t

    def engine(arch: str) -> str:
        was = artifacts.cached(arch, parts) is not None
        a, _ = timed(lambda: artifacts.ensure(arch, parts, quiet=True))
        had = wheelhouse.is_complete(wheelhouse.DEFAULT, arch)
        _, took = timed(lambda: wheelhouse.ensure_default_wheelhouse(arch))
        c = a.stamp["cpu_seconds"]
        built = ("cached" if was else f"built in {a.stamp['seconds']['total']:.0f} s (CPU "
                 f"{c['total']:.0f} s)")
        return (f"{arch} {what}: {built}; its wheelhouse: "
                f"{'cached' if had else f'filled in {took:.0f} s'}")

    def images() -> str:
        done = [(arch, testfleet.ensure_image(arch, log=lambda _: None)[1]) for arch in arches]
        return "host images: " + ", ".join(
            f"{arch} {'cached' if built is None else f'built in {built:.0f} s'}"
            for arch, built in done)

    def model() -> str:
        path, took = timed(bed.gguf_path)
        return f"model file: {path.name} ({path.stat().st_size / 1e6:.0f} MB, {took:.0f} s)"

    todo = {f"the {arch} engine": (lambda a=arch: engine(a)) for arch in arches}
    todo["the host images"] = images
    todo["the model file"] = model
    for arch in arches:
        if artifacts.cached(arch, parts) is None:
            minutes = sum(artifacts.build.EXPECTED_SECONDS[arch][p] for p in parts) / 60
            say(f"  {arch}: compiling the {what}: about {minutes:.0f} min alone on 2 idle "
                f"cores; log {artifacts.cache.log_path(arch)}")
    step(f"preparing {', '.join(todo)}, side by side")
    failed = []
    with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
        jobs = {pool.submit(job): name for name, job in todo.items()}
        for done in concurrent.futures.as_completed(jobs):
            try:
                step("  " + done.result())
            except Exception as e:   # the others finish; the demo stops after them
                failed.append(jobs[done])
                step(f"  {jobs[done]} failed: {type(e).__name__}: {e}")
    return not failed


def main() -> int:
    keep = "--keep" in sys.argv
    run_dir = Path(tempfile.mkdtemp(prefix="neverdark-demo-"))
    step(f"neverdark demo: working in {run_dir}")
    bed = Testbed(run_dir, hosts=MIXED_HOSTS)
    say("  the fleet: " + ", ".join(host_line(spec) for spec in bed.host_specs))
    say("  then: deploy it twice (`pyinfra inventory deploys/fleet.py`), `neverdark status`, "
        "an outage of merlin's cloud API and its recovery, `neverdark drill merlin`")
    if not prepare(bed):
        say("demo stopped: what the fleet needs could not be prepared (above)")
        return 1
    step("booting the test fleet")
    with bed:
        say("test fleet up: " + ", ".join(f"{n} ({h['profile']}, {h['arch']}"
                                          f"{' under qemu-user' if h.get('emulated') else ''}, "
                                          f"{h['address']}, ssh as {h['user']})"
                                          for n, h in bed.fleet.hosts.items()))
        say(f"inventory: {bed.inventory_path}\n")
        fleet = bed.validated()
        for arch, parts in artifacts.needed(fleet).items():
            artifacts.ensure(arch, parts)     # what the deploy uploads: prepared above
        say("$ neverdark validate     (every host's memory budget)")
        show(bed, "validate")
        say("where everything runs:")
        for line in plan.summary(fleet):
            say("  " + line)
        say()
        step("$ pyinfra -y inventory deploys/fleet.py")
        t = time.monotonic()
        first = bed.deploy()
        if first.rc != 0:
            say(first.output[-5000:])
            say("deploy failed")
            return 1
        say(f"  fresh deploy: {first.changed} changes in {time.monotonic() - t:.0f} s")
        t = time.monotonic()
        again = bed.deploy()
        say(f"  second run:   {again.changed} changes in {time.monotonic() - t:.0f} s\n")

        step("$ neverdark status")
        show(bed, "status")
        outage(bed)
        drill(bed)
        step("demo done")
        if keep:
            say(f"\n--keep: hosts stay up; ssh -F {bed.fleet.ssh_config} vps1 ; Ctrl-C to end")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
