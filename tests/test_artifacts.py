"""Host artifacts (neverdark.artifacts): the real builds, checked the way a host would see them.

Every test takes the artifacts from `ensure()`, which builds them once (minutes per arch on 2
cores; scripts/setup.sh does it before the tests) and then reuses the cache. No test here needs
a fresh compile: the cache and lock tests copy a real build into a private cache instead.
aarch64 binaries run under qemu-user (qemu-user-static, Pi 4 CPU).
"""

from __future__ import annotations

import json
import os
import re
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
        names = z.namelist()
    libs = {Path(n).name for n in names if n.startswith("llama_cpp/lib/")}
    assert {"libllama.so", "libggml.so", "libggml-cpu.so", "libggml-base.so"} <= libs
    # Only what a host loads: no multimodal library, no llama.cpp `common`, no second copies
    # of the libraries (lib/), headers or full-version names beside the SONAMEs.
    assert not any("mtmd" in n or "llama-common" in n for n in libs), libs
    assert {n.split("/")[0] for n in names} == {"llama_cpp", f"llama_cpp_python-"
                                                f"{versions.LLAMA_VERSION}.dist-info"}
    assert not [n for n in libs if re.search(r"\.so\.\d+\.", n)], libs
    bundle = {p.name for p in built.server_dir.iterdir()}
    assert {"llama-server", "libllama.so.0", "libggml-cpu.so.0"} <= bundle
    for f in built.server_dir.iterdir():
        info = artifacts.elf_info(f)
        assert info.machine == E_MACHINE[arch], f
        assert not any("gomp" in n for n in info.needed), f
        glibc = artifacts.max_symbol_version(f)
        assert glibc is None or artifacts.version_tuple(glibc[6:]) <= (2, 36), (f, glibc)
    stamp = built.stamp
    assert stamp["arch"] == arch and stamp["llama_cpp_commit"] == versions.LLAMA_CPP_COMMIT
    assert stamp["cmake_args"] == artifacts.build.cmake_args(artifacts.ARCHES[arch])
    assert stamp["parts"] == ["wheel", "server"] and stamp["recipe"] == artifacts.build.RECIPE
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


def test_the_trimmed_x86_wheel_loads_and_completes(tmp_path):
    """The wheel's llama_cpp, with only the libraries the wheel ships (no mtmd, no common, no
    full-version names), loads the real Gemma 3 270M and completes: nothing it needs was cut."""
    a = artifacts.ensure("x86_64", ("wheel",))
    with zipfile.ZipFile(a.wheel) as z:
        z.extractall(tmp_path / "wheel")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "wheel")!r})
        import llama_cpp
        assert llama_cpp.__file__.startswith({str(tmp_path)!r}), llama_cpp.__file__
        llm = llama_cpp.Llama(model_path={str(runtimes.gguf())!r}, n_ctx=256, n_threads=2,
                              verbose=False)
        out = llm("The capital of France is", max_tokens=4)
        print(out["usage"]["completion_tokens"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and int(done.stdout.split()[-1]) > 0, done.stderr[-3000:]


def _private_cache(tmp_path: Path, arch: str, parts=artifacts.PARTS) -> Path:
    """A private $NEVERDARK_CACHE holding a copy of the real `arch` build (no compile), with
    only `parts` in it."""
    real = artifacts.ensure(arch)
    cache = tmp_path / "cache"
    folder = cache / "artifacts" / arch / real.dir.name
    shutil.copytree(real.dir, folder)
    if "server" not in parts:
        shutil.rmtree(folder / "llama-server")
        stamp = json.loads((folder / "stamp.json").read_text())
        stamp["parts"] = ["wheel"]
        stamp["files"] = {n: r for n, r in stamp["files"].items()
                          if not n.startswith("llama-server/")}
        (folder / "stamp.json").write_text(json.dumps(stamp))
    return cache


def _fake_build(real: Path, count: Path) -> str:
    """Source of a stand-in for build.build_parts (the question is the lock, the renames and
    the stamp, not the compiler): copies the real build's files, sleeping $SLOW s half way."""
    return textwrap.dedent(f"""
        import os, shutil, time
        from pathlib import Path
        def build_parts(arch, work, out, log, *, server, sdist, venv, jobs=None):
            with open({str(count)!r}, "a") as f:
                f.write(("server" if server else "wheel") + "\\n")
            real = Path({str(real)!r})
            out.mkdir(parents=True, exist_ok=True)
            fresh = not (work / "tree.ok").is_file()
            wheel = next(real.glob("*.whl"))
            if fresh:
                shutil.copy2(wheel, out / wheel.name)
            time.sleep(float(os.environ.get("SLOW", "0")))
            if server:
                shutil.copytree(real / "llama-server", out / "llama-server")
            else:
                (work / "tree.ok").write_text(wheel.name)
            return {{"wheel": wheel.name if fresh else None,
                     "seconds": {{"wheel": 1.0, **({{"server": 1.0}} if server else {{}})}},
                     "cpu_seconds": {{}}}}
    """)


def test_cache_reuses_and_rejects_a_modified_artifact(tmp_path, monkeypatch):
    """A second ensure() is a lookup; a folder whose file no longer matches its stamp's sha256
    (or that has no stamp: a killed build) is never taken for a good one."""
    cache = _private_cache(tmp_path, "x86_64")
    monkeypatch.setattr(artifacts.cache, "CACHE", cache)
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


def test_a_wheel_only_folder_serves_the_wheel_and_gets_the_server_added_in_place(
        tmp_path, monkeypatch):
    """What a host runs decides what is built: a folder with the wheel alone is cached for the
    wheel, not for llama-server; ensure() with the server adds it beside the wheel (the wheel's
    path and sha256 unchanged, the stamp written last), and a server folder left by a killed
    build, not named in the stamp, is neither taken nor kept."""
    real = artifacts.ensure("x86_64")
    cache = _private_cache(tmp_path, "x86_64", ("wheel",))
    monkeypatch.setattr(artifacts.cache, "CACHE", cache)
    wheel_only = artifacts.cached("x86_64", ("wheel",))
    assert wheel_only and wheel_only.parts == ("wheel",)
    assert artifacts.cached("x86_64") is None and artifacts.cached("x86_64", ("server",)) is None
    assert artifacts.ensure("x86_64", ("wheel",)) == wheel_only       # a lookup, no build
    shutil.copytree(real.server_dir, wheel_only.server_dir)            # a killed build's
    (wheel_only.server_dir / "llama-server").write_bytes(b"torn")
    assert artifacts.cached("x86_64") is None
    count = tmp_path / "builds"
    namespace: dict = {}
    exec(_fake_build(real.dir, count), namespace)
    monkeypatch.setattr(artifacts.build, "build_parts", namespace["build_parts"])
    full = artifacts.ensure("x86_64", quiet=True)
    assert count.read_text().split() == ["server"]
    assert full.dir == wheel_only.dir and full.parts == ("wheel", "server")
    assert full.wheel == wheel_only.wheel
    assert full.stamp["files"][full.wheel.name] == wheel_only.stamp["files"][full.wheel.name]
    assert artifacts.sha256_of(full.server) == artifacts.sha256_of(real.server)
    assert artifacts.cached("x86_64") == full
    assert not list(full.dir.parent.glob(".build-*"))      # the tree went with the server


def test_parallel_callers_build_once_and_a_killed_build_leaves_nothing(tmp_path):
    """Three processes call ensure() on an empty private cache at once; the build step (a
    stand-in copying the real build's files) runs once, and all three get the same folder. A
    build killed half way leaves no folder that cached() accepts; the next ensure() builds
    again and clears the leftovers."""
    real = artifacts.ensure("x86_64")
    cache = tmp_path / "cache"
    count = tmp_path / "builds"
    script = _fake_build(real.dir, count) + textwrap.dedent(f"""
        from neverdark import artifacts
        artifacts.cache.CACHE = Path({str(cache)!r})
        artifacts.build.build_parts = build_parts
        print(artifacts.ensure("x86_64", quiet=True).dir)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "SLOW": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1 and count.read_text().split() == ["server"]
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifacts.cache, "CACHE", cache)
        assert artifacts.cached("x86_64") is None       # ...are not taken for an artifact
        assert artifacts.cached("x86_64", ("wheel",)) is None
    out = subprocess.run([sys.executable, "-c", script], env={**env, "SLOW": "0"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == final and not list(final.parent.glob(".build-*"))


def test_what_a_fleet_needs_is_what_its_hosts_run(tmp_path):
    """needed(): per arch, the wheel where a model runs on llama-cpp-python, the server where
    one runs on llama-server, nothing for an arch whose hosts run no local model."""
    from neverdark.inventory import validate
    from tests.test_engines import SECRETS, inventory
    from tests.test_inventory import write_inventory
    fleet = validate(write_inventory(tmp_path, inventory("llama-cpp-python"), SECRETS), env={})
    assert artifacts.needed(fleet) == {"x86_64": ("wheel",)}
    fleet.hosts["vps"] = fleet.hosts["vps"].model_copy(update={"arch": "aarch64"})
    assert artifacts.needed(fleet) == {"aarch64": ("wheel",)}
    native = inventory(server="{threads: 2, extend_context: true}",
                       extra="    training_context: 32768\n    architecture: gemma3\n")
    fleet = validate(write_inventory(tmp_path, native, SECRETS), env={})
    assert artifacts.needed(fleet) == {"x86_64": ("server",)}
    fleet.wizards.clear()
    assert artifacts.needed(fleet) == {}


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


def test_the_build_command_needs_only_the_stdlib(tmp_path):
    """scripts/setup.sh starts the compile from the checkout before neverdark and its
    dependencies are installed: the package and its command line import with no site-packages."""
    repo = Path(__file__).resolve().parent.parent
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from neverdark.artifacts import __main__ as m; "
              "sys.exit(m.main(['check', '--arch', 'x86_64', sys.argv[2]]))")
    done = subprocess.run([sys.executable, "-S", "-c", script, str(repo), shutil.which("cmake")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 1 and "minimal host" in done.stdout, done.stderr[-2000:]


def test_host_cpu_check():
    """x86_64 needs x86-64-v3 (AVX2, FMA, F16C, BMI2); the runner and test hosts have them."""
    assert artifacts.host_cpu_problems("x86_64") == []
    old_vps = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"
    assert artifacts.host_cpu_problems("x86_64", old_vps) == ["avx2", "bmi2", "fma", "f16c"]
    pi4 = "Features\t: fp asimd evtstrm crc32 cpuid\n"
    assert artifacts.host_cpu_problems("aarch64", pi4) == []
