#!/usr/bin/env bash
# Installs what burrow's demo and tests need on a fresh Debian 12 machine
# (run as root). The Rust toolchain itself is expected to be present.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: run as root (e.g. sudo bash $0): it installs Debian packages" >&2
    exit 1
fi

PACKAGES=(
    iproute2 iptables procps psmisc curl ca-certificates
    dnsmasq-base nginx-light redis-server redis-tools socat dnsutils
    wireguard-go wireguard-tools iputils-ping iperf3 conntrack dnsperf wrk
    g++ make
)
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# Keep package scripts from starting nginx/redis services on the machine
# itself: the miniature cluster runs its own copies inside namespaces.
policy_created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_created=1
fi
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi

if ! command -v kubectl >/dev/null 2>&1; then
    # Debian's own kubectl (old, but enough for the tests' calls).
    apt-get install -y -q --no-install-recommends kubernetes-client
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install a Rust toolchain (1.88 or newer) first" >&2
    exit 1
fi
# The fuzz targets' driver (scripts/fuzz-smoke.sh, FUZZING.md); pinned.
# libFuzzer itself is C++ and built by libfuzzer-sys (hence g++ above).
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

echo "install-deps: ok (kubectl: $(kubectl version --client 2>/dev/null | head -1))"
