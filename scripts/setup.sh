#!/usr/bin/env bash
# Set up this machine to run neverdark's demo and tests: system packages, the runner venv and
# the wheelhouse the test hosts install from. Safe to re-run; reuses caches when present.
set -euo pipefail
cd "$(dirname "$0")/.."

# mmdebstrap builds the test hosts' images; qemu-user-static + binfmt-support run the aarch64
# (Raspberry Pi) test hosts on an x86_64 runner.
need_apt=()
for pkg in mmdebstrap systemd-container iproute2 openssh-client sudo qemu-user-static \
           binfmt-support; do
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

# llama-cpp-python has no wheel on PyPI and compiles for ~7 minutes on 2 cores: build it once
# into the cache, which the test hosts' wheelhouse reuses too.
cache=${NEVERDARK_CACHE:-/var/cache/neverdark}
mkdir -p "$cache/wheels"
llama_req='llama-cpp-python==0.3.36'
if ! ls "$cache"/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "setup: building the llama-cpp-python wheel (about 7 minutes on 2 cores)"
    .venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$cache/wheels" "$llama_req"
fi
if ! .venv/bin/python -c 'import llama_cpp.server' 2>/dev/null; then
    echo "setup: installing llama-cpp-python[server] into .venv"
    .venv/bin/pip install -q --disable-pip-version-check --find-links "$cache/wheels" \
        "llama-cpp-python[server]==0.3.36"
fi

# The real Hermes gateway, in a venv of its own, for the sidecar's and config tests.
if [ ! -x .venv-hermes/bin/hermes ]; then
    echo "setup: installing hermes-agent 0.19.0 into .venv-hermes"
    python3 -m venv .venv-hermes
    .venv-hermes/bin/pip install -q --disable-pip-version-check \
        'hermes-agent[anthropic,messaging]==0.19.0'
fi
