#!/usr/bin/env bash
# Times `burrow connect` to the first successful request through the tunnel,
# in the miniature cluster: RUNS times with the gateway already installed,
# and RUNS_SCRATCH times from scratch (uninstalled before each run). Then
# compares 100 MiB download throughput over the UDP and the port-forward
# transports. Run as root after `cargo build -p burrow -p burrow-gateway -p burrow-tests`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
RUNS_SCRATCH=${RUNS_SCRATCH:-3}
BIN=${BURROW_BIN_DIR:-target/debug}
MC=$BIN/minicluster
NAME=bc$$
RUN_DIR=$(mktemp -d /tmp/burrow-bench.XXXXXX)
cleanup() {
    "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$BIN/burrow" disconnect >/dev/null 2>&1 || true
    "$MC" down --name "$NAME" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
"$MC" up --name "$NAME" >/dev/null
KC=$("$MC" kubeconfig --name "$NAME")
lap() { "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$@"; }
WEB=$(kubectl --kubeconfig "$("$MC" kubeconfig --name "$NAME" --host)" get svc web -o jsonpath='{.spec.clusterIP}')
now_ms() { date +%s%3N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

one() { # prints ms from connect start to the first 200 from web
    local s e
    s=$(now_ms)
    lap "$BIN/burrow" connect --kubeconfig "$KC" "$@" >/dev/null
    until lap curl -sf -o /dev/null --max-time 2 "http://$WEB/"; do :; done
    e=$(now_ms)
    lap "$BIN/burrow" disconnect >/dev/null
    echo $((e - s))
}

# Install once so the warm runs find it.
lap "$BIN/burrow" install --kubeconfig "$KC" >/dev/null
warm=()
for i in $(seq "$RUNS"); do warm+=("$(one)"); echo "warm run $i: ${warm[-1]} ms"; done
scratch=()
for i in $(seq "$RUNS_SCRATCH"); do
    lap "$BIN/burrow" uninstall --kubeconfig "$KC" >/dev/null
    scratch+=("$(one)"); echo "from-scratch run $i: ${scratch[-1]} ms"
done

throughput() { # MB/s of a 100 MiB download over the given transport
    lap "$BIN/burrow" connect --kubeconfig "$KC" --transport "$1" >/dev/null
    local bps
    bps=$(lap curl -sf -o /dev/null -w '%{speed_download}' "http://$WEB/100m.bin")
    lap "$BIN/burrow" disconnect >/dev/null
    awk -v b="$bps" 'BEGIN {printf "%.1f", b / 1e6}'
}
udp=$(throughput udp); pf=$(throughput port-forward)
echo "connect to first request, gateway installed: median $(median "${warm[@]}") ms (runs: ${warm[*]})"
echo "connect to first request, from scratch: median $(median "${scratch[@]}") ms (runs: ${scratch[*]})"
echo "100 MiB download: udp ${udp} MB/s, port-forward ${pf} MB/s, ratio port-forward/udp $(awk -v a="$pf" -v b="$udp" 'BEGIN {printf "%.2f", a / b}')"
echo "(nproc $(nproc), kernel $(uname -r), $(date -u +%F), binaries in $BIN)"
