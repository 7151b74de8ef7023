"""Host artifacts (neverdark.artifacts): the real builds, checked the way a host would see them.

Every test takes the artifacts from `ensure()`, which builds them once (about 10 minutes for
x86_64 and 15 for aarch64 on 2 cores; scripts/setup.sh does it before the tests) and then reuses
the cache. No test here needs a fresh compile: the cache and lock tests copy a real build into a
private cache instead. aarch64 binaries run under qemu-user (qemu-user-static, Pi 4 CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from neverdark import artifacts, versions
from testbed import runtimes, wheelhouse

E_MACHINE = {"x86_64": 62, "aarch64": 183}


@pytest.fixture(scope="module", params=["x86_64", "aarch64"])
def built(request) -> artifacts.Artifacts:
    return artifacts.ensure(request.param)


def test_artifacts_are_what_they_claim(built):
    """Wheel tag, ELF machine of every .so and of llama-server, glibc <= 2.36, only base-system
    libraries (no libgomp), RUNPATH $ORIGIN for the bundled ones."""
    arch = built.arch
    assert built.wheel.name == f"llama_cpp_python-{versions.LLAMA_VERSION}-py3-none-linux_{arch}.whl"
    assert artifacts.wheel_problems(built.wheel, arch) == []
    assert artifacts.server_problems(built.server_dir, arch) == []
    assert artifacts.elf_info(built.server).machine == E_MACHINE[arch]
    with zipfile.ZipFile(built.wheel) as z:
        libs = {Path(n).name for n in z.namelist() if n.startswith("llama_cpp/lib/")}
    assert {"libllama.so", "libggml-cpu.so", "libggml-base.so", "libmtmd.so"} <= libs
    bundle = {p.name for p in built.server_dir.iterdir()}
    assert {"llama-server", "libllama.so.0", "libggml-cpu.so.0"} <= bundle
    for f in built.server_dir.iterdir():
        info = artifacts.elf_info(f)
        assert info.machine == E_MACHINE[arch], f
        assert not any("gomp" in n for n in info.needed), f
        glibc = artifacts.max_symbol_version(f)
        assert glibc is None or artifacts._version_tuple(glibc[6:]) <= (2, 36), (f, glibc)
    stamp = built.stamp
    assert stamp["arch"] == arch and stamp["llama_cpp_commit"] == versions.LLAMA_CPP_COMMIT
    assert stamp["cmake_args"] == artifacts.ARCHES[arch].cmake_args
    assert stamp["files"][built.wheel.name]["sha256"] == artifacts.sha256_of(built.wheel)
    assert stamp["seconds"]["wheel"] > 0 and stamp["seconds"]["server"] > 0


def test_llama_server_has_what_the_engine_uses(built):
    """--version names the vendored llama.cpp commit; --help lists every flag the engine passes.
    aarch64: under qemu-user with a Pi 4 CPU (cortex-a72: no armv8.2 instruction may appear)."""
    version = artifacts.server_version(built.arch, built.server)
    assert versions.LLAMA_CPP_COMMIT[:7] in version, version
    assert artifacts.missing_server_flags(built.arch, built.server) == []


def test_checks_catch_what_would_not_run_on_a_host(built, tmp_path, monkeypatch):
    """The checks can fail: wrong arch, a library a minimal host lacks, a too-new glibc symbol,
    a wrong wheel tag, a bundled library without RUNPATH $ORIGIN."""
    other = "aarch64" if built.arch == "x86_64" else "x86_64"
    assert any("e_machine" in p for p in artifacts.server_problems(built.server_dir, other))
    wrong = tmp_path / built.wheel.name.replace(built.arch, other)
    shutil.copy(built.wheel, wrong)
    problems = artifacts.wheel_problems(wrong, other)
    assert problems and all("e_machine" in p for p in problems)
    assert any("platform tag" in p for p in artifacts.wheel_problems(built.wheel, other))
    # cmake links libcurl, libarchive...: absent on a minimal host
    assert any("minimal host" in p for p in artifacts.elf_problems(
        Path(shutil.which("cmake")).resolve(), "x86_64"))
    monkeypatch.setitem(artifacts.HOST_SYMBOL_LIMITS, "GLIBC", (2, 17))
    assert any("GLIBC_2." in p and "Debian 12 has up to GLIBC_2.17" in p
               for p in artifacts.elf_problems(built.server_dir / "libllama.so.0", built.arch,
                                               {p.name for p in built.server_dir.iterdir()}))
    monkeypatch.undo()
    lib = tmp_path / "libllama.so.0"
    shutil.copy(built.server_dir / "libllama.so.0", lib)
    assert artifacts.elf_info(lib).runpath == "$ORIGIN"
    with pytest.raises(artifacts.ArtifactError, match="shorter than"):
        artifacts.set_runpath(lib, "/a/path/longer/than/origin")
    artifacts.set_runpath(lib, "/x")
    assert artifacts.elf_info(lib).runpath == "/x"
    assert any("RUNPATH is '/x'" in p for p in artifacts.elf_problems(lib, built.arch,
                                                                     {"libggml.so.0"}))


def test_x86_llama_server_serves_gemma(tmp_path):
    """The real x86_64 llama-server on the real Gemma 3 270M GGUF, with the engine's flags:
    /health 503 -> 200, a completion, /metrics, a slot saved to --slot-save-path."""
    a = artifacts.ensure("x86_64")
    slots = tmp_path / "slots"
    slots.mkdir()
    with artifacts.serve("x86_64", a.server, runtimes.gguf(), "-c", "4096", "-np", "2",
                         "-t", "2", "--metrics", "--slot-save-path", str(slots),
                         "--cache-reuse", "256", "-ctk", "q8_0", "--swa-full",
                         "--alias", "gemma", "--jinja", timeout=180,
                         log=tmp_path / "server.log") as (url, _):
        status, body = artifacts._http(url + "/completion", {
            "prompt": "The capital of France is", "n_predict": 8, "id_slot": 0}, timeout=120)
        assert status == 200, body
        reply = json.loads(body)
        assert reply["tokens_predicted"] > 0 and reply["content"]
        status, body = artifacts._http(url + "/v1/models")
        assert status == 200 and json.loads(body)["data"][0]["id"] == "gemma"
        status, body = artifacts._http(url + "/metrics")
        assert status == 200 and b"llamacpp:prompt_tokens_total" in body
        status, body = artifacts._http(url + "/slots/0?action=save", {"filename": "s0.bin"})
        assert status == 200, body
        assert (slots / "s0.bin").stat().st_size > 0


def test_aarch64_llama_server_completes_under_qemu(tmp_path):
    """The cross-built aarch64 llama-server runs Gemma 3 270M under qemu-user as a Pi 4 CPU
    (cortex-a72, armv8.0): /health 200 and a short completion (emulated: about a minute)."""
    a = artifacts.ensure("aarch64")
    with artifacts.serve("aarch64", a.server, runtimes.gguf(), "-c", "1024", "-np", "1",
                         "-t", "2", timeout=300, log=tmp_path / "server.log") as (url, _):
        status, body = artifacts._http(url + "/completion", {
            "prompt": "The capital of France is", "n_predict": 4}, timeout=300)
    assert status == 200, body
    assert json.loads(body)["tokens_predicted"] > 0


def _private_cache(tmp_path: Path, arch: str) -> Path:
    """A private $NEVERDARK_CACHE holding a copy of the real `arch` build (no compile)."""
    real = artifacts.ensure(arch)
    cache = tmp_path / "cache"
    shutil.copytree(real.dir, cache / "artifacts" / arch / real.dir.name)
    return cache


def test_cache_reuses_and_rejects_a_modified_artifact(tmp_path, monkeypatch):
    """A second ensure() is a lookup; a folder whose file no longer matches its stamp's sha256
    (or that has no stamp: a killed build) is never taken for a good one."""
    cache = _private_cache(tmp_path, "x86_64")
    monkeypatch.setattr(artifacts, "CACHE", cache)
    t = time.monotonic()
    a = artifacts.ensure("x86_64")
    assert time.monotonic() - t < 5 and a.dir.parent.parent == cache / "artifacts"
    assert artifacts.cached("x86_64") == a
    with open(a.server_dir / "libggml.so.0", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert artifacts.cached("x86_64") is None
    (a.dir / "stamp.json").unlink()
    assert artifacts.cached("x86_64") is None


def test_parallel_callers_build_once_and_a_killed_build_leaves_nothing(tmp_path):
    """Three processes call ensure() on an empty private cache at once; the build step (here:
    copying the real build's files, since the question is the lock and the rename, not the
    compiler) runs once, and all three get the same folder. A build killed half way leaves no
    folder that cached() accepts; the next ensure() builds again and clears the leftovers."""
    real = artifacts.ensure("x86_64")
    cache = tmp_path / "cache"
    count = tmp_path / "builds"
    script = textwrap.dedent(f"""
        import json, os, shutil, sys, time
        from pathlib import Path
        from neverdark import artifacts
        artifacts.CACHE = Path({str(cache)!r})
        def build_into(arch, out, work, log, mode="combined", jobs=None):
            with open({str(count)!r}, "a") as f:
                f.write("build\\n")
            shutil.copytree({str(real.dir)!r}, out)
            (out / "stamp.json").unlink()       # written last, as the real build does
            time.sleep(float(os.environ.get("SLOW", "1")))
            stamp = json.loads(Path({str(real.dir / "stamp.json")!r}).read_text())
            (out / "stamp.json").write_text(json.dumps(stamp))
            return stamp
        artifacts.build_into = build_into
        print(artifacts.ensure("x86_64", quiet=True).dir)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1 and count.read_text().count("build") == 1
    final = Path(outs.pop())
    # a build killed half way: the folder is moved away, a new build starts and is killed
    shutil.rmtree(final)
    count.unlink()
    p = subprocess.Popen([sys.executable, "-c", script], env={**env, "SLOW": "30"},
                         stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not count.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    p.kill()
    p.communicate()
    assert not final.exists()
    assert list(final.parent.glob(".build-*"))          # the leftovers...
    old = artifacts.CACHE
    try:
        artifacts.CACHE = cache
        assert artifacts.cached("x86_64") is None       # ...are not taken for an artifact
    finally:
        artifacts.CACHE = old
    out = subprocess.run([sys.executable, "-c", script], env={**env, "SLOW": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == final and not list(final.parent.glob(".build-*"))


def test_aarch64_wheelhouse_has_every_compiled_dependency():
    """The aarch64 wheelhouse: the cross-built llama wheel, an aarch64 manylinux cp311 (or abi3)
    wheel for every compiled dependency of Hermes, the sidecar and llama-cpp-python[server],
    pure wheels shared with x86_64; the closure check (markers evaluated for an aarch64 Debian 12
    host) finds nothing missing."""
    dest = wheelhouse.ensure_default_wheelhouse("aarch64")
    listed = (dest / ".neverdark-wheelhouse-aarch64").read_text().split()[1:]
    assert artifacts.wheelhouse_missing(dest, "aarch64", wheelhouse.REQUIREMENTS) == []
    assert artifacts.ensure("aarch64").wheel.name in listed
    compiled = [n for n in listed if not n.endswith("-none-any.whl")]
    assert all("aarch64" in n for n in compiled), compiled
    names = {n.split("-")[0].lower() for n in compiled}
    assert {"pydantic_core", "numpy", "aiohttp", "pyyaml", "llama_cpp_python"} <= names, names
    assert not any("x86_64" in n for n in listed)


def test_x86_wheelhouse_serves_the_artifact_wheel():
    """The test fleet's wheelhouse takes its llama-cpp-python wheel from neverdark.artifacts."""
    dest = wheelhouse.ensure_default_wheelhouse("x86_64")
    a = artifacts.ensure("x86_64")
    assert artifacts.sha256_of(dest / a.wheel.name) == artifacts.sha256_of(a.wheel)
    assert wheelhouse.is_complete(dest, "x86_64")
    assert artifacts.wheelhouse_missing(dest, "x86_64", wheelhouse.REQUIREMENTS) == []


def test_wheelhouse_closure_check_evaluates_markers_for_the_target(tmp_path):
    """pip download --platform evaluates markers for the runner; the closure check evaluates
    them for the target: a requirement only aarch64 hosts need is missing for aarch64 only."""
    req = 'somepkg>=1; platform_machine == "aarch64"'
    assert artifacts.wheelhouse_missing(tmp_path, "aarch64", [req]) == [req]
    assert artifacts.wheelhouse_missing(tmp_path, "x86_64", [req]) == []
    with zipfile.ZipFile(tmp_path / "somepkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("somepkg-1.0.dist-info/METADATA",
                   "Name: somepkg\nVersion: 1.0\nRequires-Dist: other; extra == 'x'\n")
    assert artifacts.wheelhouse_missing(tmp_path, "aarch64", [req]) == []
    assert artifacts.wheelhouse_missing(tmp_path, "aarch64", ["somepkg[x]"]) == [
        'other; extra == "x"']


def test_host_cpu_check():
    """x86_64 needs x86-64-v3 (AVX2, FMA, F16C, BMI2); the runner and test hosts have them."""
    assert artifacts.host_cpu_problems("x86_64") == []
    old_vps = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"
    assert artifacts.host_cpu_problems("x86_64", old_vps) == ["avx2", "bmi2", "fma", "f16c"]
    pi4 = "Features\t: fp asimd evtstrm crc32 cpuid\n"
    assert artifacts.host_cpu_problems("aarch64", pi4) == []
