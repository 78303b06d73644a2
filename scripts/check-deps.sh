#!/usr/bin/env bash
# The dependency rule of the workspace (ARCHITECTURE.md, "Code map"):
#   client → {api, deploy, dns, netstack}, gateway → {api, deploy, netstack},
#   deploy → api, dns → api; nothing depends on burrow-gateway; inside the client,
#   only main.rs and cli/ import the commands, and the modules below them
#   form layers (tunnel ← daemon, dns ← protocol ← daemon).
# Checked on the normal (non-dev) dependency graph: the `burrow` binary
# must not contain the gateway. (client's tests/laptop_dial.rs drives the
# gateway's data path as a dev-dependency; that never reaches the binary.)
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
# Every crate's normal dependency tree, once (a failing `cargo tree` must
# fail the check, never pass it vacuously).
tree() {
    cargo tree --offline -q -p "$1" -e normal --prefix none "${@:2}" || {
        echo "check-deps: cargo tree -p $1 failed" >&2
        exit 2
    }
}
for pkg in burrow burrow-deploy burrow-api burrow-dns burrow-netstack; do
    deps=$(tree "$pkg")
    if grep -q '^burrow-gateway ' <<<"$deps"; then
        echo "check-deps: $pkg depends on burrow-gateway (see: cargo tree -p $pkg -i burrow-gateway -e normal)" >&2
        fail=1
    fi
done
# The small shared crate stays small: no Kubernetes client, no runtime.
api_deps=$(tree burrow-api)
for heavy in kube tokio hyper axum; do
    if grep -q "^$heavy " <<<"$api_deps"; then
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
        burrow-dns) echo "burrow-api" ;;
        *) echo "" ;;
    esac
}
for pkg in burrow burrow-gateway burrow-deploy burrow-api burrow-dns burrow-netstack; do
    direct_tree=$(tree "$pkg" --depth 1)
    direct=$(awk 'NR > 1 && $1 ~ /^burrow-/ {print $1}' <<<"$direct_tree" | sort -u)
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
# The layers below the commands (no cycles): what each module may import
# of the client's others.
#   tunnel ← daemon;  dns ← protocol ← daemon;  sandbox, progress: alone.
client_allowed() {
    case "$1" in
        tunnel) echo "tunnel" ;;
        dns | progress | sandbox) echo "" ;;
        protocol) echo "dns" ;;
        daemon) echo "daemon dns protocol tunnel" ;;
    esac
}
for m in tunnel dns progress sandbox protocol daemon; do
    files=$(ls -d "client/src/$m" "client/src/$m.rs" 2>/dev/null || true)
    [ -n "$files" ] || { echo "check-deps: client module $m not found" >&2; fail=1; continue; }
    used=$(grep -rhoE 'crate::[a-z_]+' $files | sed 's/crate:://' | sort -u || true)
    for u in $used; do
        if [ "$u" != "$m" ] && ! [[ " $(client_allowed "$m") " == *" $u "* ]]; then
            echo "check-deps: client module $m imports crate::$u, which its layer does not allow" >&2
            fail=1
        fi
    done
done
if [ "$fail" = 0 ]; then
    echo "check-deps: the dependency rule holds"
fi
exit "$fail"
