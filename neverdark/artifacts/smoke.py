"""Run a built llama-server on this machine before deploying it: directly on its own arch, under
qemu-user on another (with the cross toolchain's libc as sysroot and the oldest CPU the build
targets, a Pi 4's), to check it starts, answers and has every flag the engine passes.

    python -m neverdark.artifacts smoke --arch aarch64 --model M.gguf
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from neverdark.arches import arch_spec
from neverdark.artifacts.cache import cached
from neverdark.artifacts.errors import ArtifactError

# What the engine passes to llama-server: each must appear in its --help.
SERVER_FLAGS = ["--parallel", "-np", "--slot-save-path", "--cache-reuse", "-ctk", "-ctv",
                "--metrics", "--swa-full", "--ctx-size", "-c", "--threads", "-t", "--host",
                "--port", "--alias", "--jinja", "--chat-template"]


def server_command(arch: str, server: Path) -> tuple[list[str], dict]:
    """argv prefix and extra environment to run `arch`'s llama-server on this machine: directly
    on its own arch, else under qemu-user (`apt-get install qemu-user-static`) with the cross
    toolchain's libc as the sysroot and the oldest CPU the build targets (a Pi 4's)."""
    spec = arch_spec(arch)
    if os.uname().machine == arch:
        return [str(server)], {}
    qemu = shutil.which(f"qemu-{arch}-static") or shutil.which(f"qemu-{arch}")
    if not qemu:
        raise ArtifactError(f"no qemu-{arch}-static to run the {arch} llama-server here: "
                            "apt-get install qemu-user-static")
    env = {"QEMU_CPU": spec.qemu_cpu} if spec.qemu_cpu else {}
    return [qemu, "-L", f"/usr/{spec.cross}", str(server)], env


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def serve(arch: str, server: Path, model: Path, *args: str, timeout: float = 600,
          log: Path | None = None):
    """Run llama-server on `model` on a free loopback port until /health says 200; yields
    (base URL, Popen). Extra `args` go to the server (-c, -np, --metrics...)."""
    port = _free_port()
    prefix, extra_env = server_command(arch, server)
    cmd = [*prefix, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **extra_env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ArtifactError(f"llama-server exited {proc.returncode} before it was "
                                    f"ready: {' '.join(cmd)}" + (f"; log {log}" if log else ""))
            try:
                if _http(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ArtifactError(f"llama-server not ready in {timeout:.0f} s: {' '.join(cmd)}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def server_version(arch: str, server: Path) -> str:
    prefix, env = server_command(arch, server)
    r = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    if r.returncode != 0:
        raise ArtifactError(f"llama-server --version failed ({r.returncode}): {r.stderr[-2000:]}")
    return (r.stdout + r.stderr).strip()


def missing_server_flags(arch: str, server: Path) -> list[str]:
    """Which of SERVER_FLAGS (what the engine passes) llama-server's --help does not list."""
    prefix, env = server_command(arch, server)
    r = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    words = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][a-z0-9-]*)", r.stdout + r.stderr))
    return [f for f in SERVER_FLAGS if f not in words]


def check(arch: str, model: Path, n_predict: int = 8, timeout: float = 600) -> dict:
    """Start the cached llama-server for `arch` on `model`, wait for /health, one completion."""
    a = cached(arch)
    if a is None:
        raise ArtifactError(f"{arch} artifacts are not built: python -m neverdark.artifacts "
                            f"build --arch {arch}")
    t = time.monotonic()
    with serve(arch, a.server, model, "-c", "2048", "-np", "1", "-t", str(os.cpu_count() or 2),
               timeout=timeout) as (url, _):
        ready = time.monotonic() - t
        status, body = _http(url + "/completion", {"prompt": "The capital of France is",
                                                   "n_predict": n_predict}, timeout=timeout)
    if status != 200:
        raise ArtifactError(f"/completion answered {status}: {body[:500]!r}")
    reply = json.loads(body)
    return {"arch": arch, "ready_s": round(ready, 1), "content": reply.get("content"),
            "tokens_predicted": reply.get("tokens_predicted"),
            "version": server_version(arch, a.server)}
