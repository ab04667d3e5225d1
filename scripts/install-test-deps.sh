#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, when it is missing:
#   etcd (Debian package etcd-server, /usr/bin/etcd) for the discovery, registration and mesh tests;
#   PostgreSQL (Debian package postgresql) for the batch store's tests on a server;
#   Chromium (Debian package chromium, /usr/bin/chromium) for the dashboard's browser test;
#   playwright-core (tests/browser, from its package-lock.json) to drive that Chromium.
# Idempotent and quiet; needs root for apt-get. Called from .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)

if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: missing ${packages[*]}; installing them needs root (apt-get install)" >&2
        exit 1
    fi
    echo "install-test-deps: installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    # The etcd package enables a system etcd service; the tests start their own on other ports.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
    # Likewise the postgresql package may start a cluster of its own: the tests start theirs.
    if [[ " ${packages[*]} " == *" postgresql "* ]]; then
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now postgresql >/dev/null 2>&1 || true
        elif command -v pg_lsclusters >/dev/null 2>&1; then
            pg_lsclusters -h 2>/dev/null | while read -r version cluster _ state _; do
                [ "$state" = online ] && pg_ctlcluster "$version" "$cluster" stop || true
            done
        fi
    fi
fi
echo "install-test-deps: $(etcd --version | head -n 1)"
echo "install-test-deps: $(ls -d /usr/lib/postgresql/*/bin/postgres | tail -n 1) $("$(ls -d /usr/lib/postgresql/*/bin/postgres | tail -n 1)" --version)"
echo "install-test-deps: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: no version')"

# The browser driver, without its own browser download (playwright-core never downloads one).
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "install-test-deps: npm ci in tests/browser"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
