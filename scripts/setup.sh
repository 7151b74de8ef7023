#!/usr/bin/env bash
# Set up this machine to run neverdark's demo and tests: system packages, the runner venv and
# the wheelhouse the test hosts install from. Safe to re-run; reuses caches when present.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0     # a cold setup's cost is reported at the end (README: "How long make test takes")

# mmdebstrap builds the test hosts' images; qemu-user-static + binfmt-support run the aarch64
# (Raspberry Pi) test hosts on an x86_64 runner; cmake, ninja and the compilers build the host
# artifacts (neverdark.artifacts: the llama-cpp-python wheel and llama-server, x86_64 and
# cross-compiled aarch64); prometheus ships promtool (the alert rules' tests) and chromium is
# the headless browser the panel's test drives.
need_apt=()
for pkg in mmdebstrap systemd-container iproute2 openssh-client sudo qemu-user-static \
           binfmt-support cmake ninja-build g++ gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
           prometheus chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.neverdark-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing neverdark and its test dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi

# llama-cpp-python has no wheel on PyPI and no host has a compiler: build the host artifacts
# (wheel + llama-server per arch: 253 s x86_64 and 211 s aarch64 on an idle 2-core machine,
# cold) once into $NEVERDARK_CACHE/artifacts; the test hosts' wheelhouse and the tests reuse
# them.
.venv/bin/python -m neverdark.artifacts build --arch x86_64 --arch aarch64 >/dev/null
llama_wheel=$(.venv/bin/python -c 'from neverdark import artifacts; print(artifacts.ensure("x86_64").wheel)')
llama_stamp=.venv/.neverdark-llama
if [ "$(cat "$llama_stamp" 2>/dev/null)" != "$llama_wheel" ] \
        || ! .venv/bin/python -c 'import llama_cpp.server' 2>/dev/null; then
    echo "setup: installing llama-cpp-python[server] into .venv from $llama_wheel"
    .venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$llama_wheel"
    .venv/bin/pip install -q --disable-pip-version-check "$llama_wheel[server]"
    echo "$llama_wheel" > "$llama_stamp"
fi

# The real Hermes gateway, in a venv of its own, for the sidecar's and config tests.
if [ ! -x .venv-hermes/bin/hermes ]; then
    echo "setup: installing hermes-agent 0.19.0 into .venv-hermes"
    python3 -m venv .venv-hermes
    .venv-hermes/bin/pip install -q --disable-pip-version-check \
        'hermes-agent[anthropic,messaging]==0.19.0'
fi
echo "setup: ready in ${SECONDS} s"
