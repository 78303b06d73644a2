#!/usr/bin/env bash
# The dependency rule of the workspace (ARCHITECTURE.md, "Code map"):
#   client → {api, deploy, dns, netstack}, gateway → {api, deploy, netstack},
#   deploy → api; nothing depends on burrow-gateway; inside the client,
#   only main.rs and cli/ import the commands.
# Checked on the normal (non-dev) dependency graph: the `burrow` binary
# must not contain the gateway. (client's tests/laptop_dial.rs drives the
# gateway's data path as a dev-dependency; that never reaches the binary.)
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
for pkg in burrow burrow-deploy burrow-api burrow-dns burrow-netstack; do
    if cargo tree --offline -q -p "$pkg" -e normal --prefix none 2>/dev/null | grep -q '^burrow-gateway '; then
        echo "check-deps: $pkg depends on burrow-gateway (see: cargo tree -p $pkg -i burrow-gateway -e normal)" >&2
        fail=1
    fi
done
# The small shared crate stays small: no Kubernetes client, no runtime.
for heavy in kube tokio hyper axum; do
    if cargo tree --offline -q -p burrow-api -e normal --prefix none 2>/dev/null | grep -q "^$heavy "; then
        echo "check-deps: burrow-api depends on $heavy; it holds wire types and pure functions only" >&2
        fail=1
    fi
done
# What each crate may use of the others.
allowed() {
    case "$1" in
        burrow) echo "burrow-api burrow-deploy burrow-dns burrow-netstack" ;;
        burrow-gateway) echo "burrow-api burrow-deploy burrow-netstack" ;;
        burrow-deploy) echo "burrow-api" ;;
        *) echo "" ;;
    esac
}
for pkg in burrow burrow-gateway burrow-deploy burrow-api burrow-dns burrow-netstack; do
    direct=$(cargo tree --offline -q -p "$pkg" -e normal --depth 1 --prefix none 2>/dev/null | awk 'NR > 1 && $1 ~ /^burrow-/ {print $1}' | sort -u)
    for dep in $direct; do
        if ! [[ " $(allowed "$pkg") " == *" $dep "* ]]; then
            echo "check-deps: $pkg depends on $dep, which the rule does not allow" >&2
            fail=1
        fi
    done
done
# Inside the client, modules point one way: main → cli → {protocol, daemon,
# …}; nothing but main.rs and cli/ imports a command module (the daemon
# and the CLI share only `protocol`).
if grep -rln 'crate::cli' client/src | grep -v '^client/src/main.rs$' | grep -v '^client/src/cli/' ; then
    echo "check-deps: the files above import a command module (crate::cli); share types through protocol.rs" >&2
    fail=1
fi
if [ "$fail" = 0 ]; then
    echo "check-deps: the dependency rule holds"
fi
exit "$fail"
