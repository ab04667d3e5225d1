#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, when it is missing:
#   etcd (Debian package etcd-server, /usr/bin/etcd) for crates/fulcrum-discovery/tests/integration/etcd.rs.
# Idempotent and quiet; needs root (apt-get). Called from .ci/run.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: etcd is missing and installing it needs root (apt-get install etcd-server)" >&2
    exit 1
fi

echo "install-test-deps: installing etcd-server"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
# The package enables a system etcd service; the tests start their own on other ports.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
command -v etcd >/dev/null
echo "install-test-deps: $(etcd --version | head -n 1)"
