#!/usr/bin/env bash
# Set up this machine to run neverdark's demo and tests: system packages, the runner venv and
# the wheelhouse the test hosts install from. Safe to re-run; reuses caches when present.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in debootstrap systemd-container iproute2 openssh-client sudo; do
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
