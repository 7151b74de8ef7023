#!/usr/bin/env bash
# Set up this machine to run neverdark's demo and tests: system packages, the runner venv, the
# host artifacts (neverdark.artifacts) and the Hermes venv. Safe to re-run; reuses caches.
#
#   ./scripts/setup.sh          everything `make test` needs
#   ./scripts/setup.sh --demo   what `make demo` needs first: the packages and .venv; the demo
#                               builds the artifacts its own fleet runs, beside its other work
#
# Cold, the compile is most of it: it starts as soon as the toolchain and .venv's pip are
# there and runs in the background while the venvs install (which wait on downloads and disk
# more than on the 2 cores); the llama wheel goes into .venv once it is built.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0     # a cold setup's cost is reported at the end (README: "How long make test takes")
demo=false
case "${1:-}" in
    --demo) demo=true ;;
    "") ;;
    *) echo "usage: $0 [--demo]" >&2; exit 2 ;;
esac
say() { printf 'setup [%4d s]: %s\n' "$SECONDS" "$*"; }

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
    say "apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi

# llama-cpp-python has no wheel on PyPI and no host has a compiler: the host artifacts (wheel +
# llama-server per arch) are built once into $NEVERDARK_CACHE/artifacts; the test hosts'
# wheelhouse and the tests reuse them. neverdark.artifacts needs only the stdlib, so it runs
# from the checkout before neverdark is installed; both arches at once, which fills the gaps
# where one build waits on a single job (configure, unpack, a link, the largest files).
build_pid=""
if ! $demo; then
    say "building the host artifacts in the background (x86_64 and aarch64: wheel and" \
        "llama-server; log ${NEVERDARK_CACHE:-/var/cache/neverdark}/logs/artifacts-*.log)"
    .venv/bin/python -m neverdark.artifacts build --arch x86_64 --arch aarch64 >/dev/null &
    build_pid=$!
fi

stamp=.venv/.neverdark-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing neverdark and its test dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$stamp"
fi

if $demo; then
    say "ready for the demo (it builds the artifacts its fleet runs)"
    exit 0
fi

# The real Hermes gateway, in a venv of its own, for the sidecar's and config tests.
if [ ! -x .venv-hermes/bin/hermes ]; then
    say "installing hermes-agent 0.19.0 into .venv-hermes"
    python3 -m venv .venv-hermes
    .venv-hermes/bin/pip install -q --disable-pip-version-check \
        'hermes-agent[anthropic,messaging]==0.19.0'
fi

if ! wait "$build_pid"; then
    say "the host artifact build failed (its error is above; the log names the step)"
    exit 1
fi
llama_wheel=$(.venv/bin/python -c 'from neverdark import artifacts; print(artifacts.ensure("x86_64").wheel)')
llama_stamp=.venv/.neverdark-llama
if [ "$(cat "$llama_stamp" 2>/dev/null)" != "$llama_wheel" ] \
        || ! .venv/bin/python -c 'import llama_cpp.server' 2>/dev/null; then
    say "installing llama-cpp-python[server] into .venv from $llama_wheel"
    .venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$llama_wheel"
    .venv/bin/pip install -q --disable-pip-version-check "$llama_wheel[server]"
    echo "$llama_wheel" > "$llama_stamp"
fi
say "ready"
