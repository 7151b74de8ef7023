"""python -m neverdark.artifacts: build, show, smoke and check the host artifacts."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path

from neverdark import artifacts
from neverdark.arches import ARCHES, UnknownArch
from neverdark.artifacts import cache, elf, smoke, wheelhouse
from neverdark.artifacts.errors import ArtifactError


def show(arch: str) -> str:
    try:
        a = cache.cached(arch, ("wheel",))
    except ArtifactError as e:     # e.g. no cross compiler here to name the recipe by
        return f"{arch}: cannot tell ({e})"
    if a is None:
        return f"{arch}: not built (python -m neverdark.artifacts build --arch {arch})"
    s = a.stamp
    seconds, cpu = s["seconds"], s.get("cpu_seconds", {})
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    lines = [f"{arch}: {a.dir}",
             f"  wheel  {a.wheel.name} ({s['files'][a.wheel.name]['bytes'] / 1e6:.1f} MB)"]
    if "server" in a.parts:
        size = sum(r["bytes"] for n, r in s["files"].items() if n.startswith("llama-server/"))
        lines.append(f"  server {a.server} (bundle {size / 1e6:.1f} MB; needs up to "
                     f"{s['max_glibc']})")
    else:
        lines.append(f"  server not built (python -m neverdark.artifacts build --arch {arch} "
                     "--part server)")
    lines += [f"  built {s['built_at']} in {seconds['total']:.0f} s ({steps}; CPU "
              f"{cpu.get('total', 0):.0f} s) on {s['cpus']} cores",
              f"  flags {' '.join(s['cmake_args'])}"]
    return "\n".join(lines)


def _check(paths: list[Path], arch: str) -> list[str]:
    problems = []
    for path in paths:
        if path.is_dir():
            problems += elf.bundle_problems(path, arch)
        elif path.name.endswith(".whl"):
            problems += elf.wheel_problems(path, arch)
        else:   # its neighbours count as bundled (reached by RUNPATH $ORIGIN)
            problems += elf.elf_problems(path, arch, {p.name for p in path.parent.iterdir()})
    return problems


def _targets(args) -> dict[str, tuple[str, ...]]:
    """{arch: parts} to build: what an inventory's hosts run, or --arch/--part."""
    if args.inventory:
        from neverdark.inventory import InventoryError, validate
        try:
            return cache.needed(validate(args.inventory))
        except InventoryError as e:
            raise ArtifactError(f"{args.inventory} is not a valid inventory:\n{e}") from None
    parts = tuple(p for p in cache.PARTS if p in (args.part or cache.PARTS))
    return {arch: parts for arch in args.arch or [os.uname().machine]}


def _build(targets: dict[str, tuple[str, ...]], house: Path | None) -> int:
    """Every arch at once: on a small machine one build leaves a core idle whenever it waits
    on a single job (configure, a link, its largest files, packing the wheel), and the other
    arch's build takes it."""
    def one(arch: str, parts: tuple[str, ...]) -> str:
        cache.ensure(arch, parts)
        if house:
            wheelhouse.fill(arch, house)
        return show(arch)

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, len(targets))) as pool:
        jobs = {arch: pool.submit(one, arch, parts) for arch, parts in targets.items()}
        for arch, job in jobs.items():
            try:
                print(job.result(), flush=True)
            except ArtifactError as e:
                print(f"artifacts: {arch}: {e}", file=sys.stderr)
                failed = 1
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neverdark.artifacts", description=(
        artifacts.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the wheel and llama-server per arch")
    b.add_argument("--arch", action="append", choices=list(ARCHES))
    b.add_argument("--part", action="append", choices=list(cache.PARTS),
                   help="what to build (default: both; the wheel is always built)")
    b.add_argument("--inventory", type=Path,
                   help="build what this fleet's hosts run (per arch: the wheel where a model "
                   "uses llama-cpp-python, llama-server where one uses it)")
    b.add_argument("--wheelhouse", type=Path, help="also fill this wheelhouse for each arch")
    sub.add_parser("show", help="what is cached")
    sm = sub.add_parser("smoke", help="run the built llama-server (qemu-user for a foreign "
                        "arch) on a GGUF: /health, one completion")
    sm.add_argument("--arch", action="append", choices=list(ARCHES))
    sm.add_argument("--model", type=Path, required=True)
    c = sub.add_parser("check", help="check a wheel, a folder of ELF files (a llama-server "
                       "bundle, an installed llama_cpp/lib) or one ELF file")
    c.add_argument("--arch", default=os.uname().machine, choices=list(ARCHES))
    c.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            targets = _targets(args)
            if not targets:
                print("artifacts: nothing to build (no host runs a local model)")
            return _build(targets, args.wheelhouse)
        elif args.cmd == "smoke":
            for arch in args.arch or [os.uname().machine]:
                print(json.dumps(smoke.check(arch, args.model)))
        elif args.cmd == "show":
            for arch in ARCHES:
                print(show(arch))
        else:
            problems = _check(args.paths, args.arch)
            print("\n".join(problems) or f"ok: {len(args.paths)} path(s) fit a Debian 12 "
                  f"{args.arch} host")
            return 1 if problems else 0
    except (ArtifactError, UnknownArch) as e:
        print(f"artifacts: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
