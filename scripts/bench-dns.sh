#!/usr/bin/env bash
# The DNS stub against cluster DNS itself, in one run of the miniature
# cluster: dnsperf in the laptop namespace asks burrow's stub (tunnel
# address, port 53) for cached cluster names; dnsperf in the node namespace
# asks the cluster's dnsmasq directly (10.244.0.1, no tunnel) for the same
# names. Throughput: unlimited rate, CLIENTS clients, SECS seconds. Latency:
# p50 from a paced run (RATE qps, `dnsperf -v` per-query latencies).
# Goal (issue 5): stub qps >= 0.8x dnsmasq's, stub p50 <= 1 ms.
# STUB_BIN=<release build of burrow-dns's `stub` example>: also measures that
# stub (same code, optimised) on 127.0.0.53 in the laptop, its misses going
# through the same tunnel; for when the daemon is a debug build.
# Run as root after `cargo build --release -p burrow -p burrow-gateway -p burrow-tests`
# (BURROW_BIN_DIR=target/release), or with the debug build (default).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BURROW_BIN_DIR:-target/debug}
SECS=${SECS:-10}
CLIENTS=${CLIENTS:-4}
RATE=${RATE:-2000}
MC=$BIN/minicluster
# The burrow binary measured (e.g. a release build beside a debug cluster).
BURROW=${BURROW:-$BIN/burrow}
NAME=bd$$
RUN_DIR=$(mktemp -d /tmp/burrow-bench-dns.XXXXXX)
cleanup() {
    [ -s "$RUN_DIR/stub.pid" ] && kill "$(cat "$RUN_DIR/stub.pid")" 2>/dev/null || true
    "$MC" exec --name "$NAME" laptop -- "$BURROW" --run-dir "$RUN_DIR" disconnect >/dev/null 2>&1 || true
    "$MC" down --name "$NAME" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
"$MC" up --name "$NAME" >/dev/null
KC=$("$MC" kubeconfig --name "$NAME")
lap() { "$MC" exec --name "$NAME" laptop -- "$@"; }
node() { "$MC" exec --name "$NAME" node -- "$@"; }
lap "$BURROW" --run-dir "$RUN_DIR" connect --kubeconfig "$KC" >/dev/null
STUB=$(lap "$BURROW" --run-dir "$RUN_DIR" status -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["dns_stub"]["stub"].rsplit(":",1)[0])')

NAMES=$RUN_DIR/names.txt
cat >"$NAMES" <<'EOF'
web.default.svc.cluster.local A
echo.default.svc.cluster.local A
redis.data.svc.cluster.local A
db-0.db.data.svc.cluster.local A
db.data.svc.cluster.local A
kubernetes.default.svc.cluster.local A
udp-echo.default.svc.cluster.local A
_http._tcp.echo.default.svc.cluster.local SRV
EOF
# Warm the stub's cache.
lap dnsperf -s "$STUB" -d "$NAMES" -n 1 >/dev/null

qps() { # server, ns-runner: queries per second at full rate
    "$2" dnsperf -s "$1" -d "$NAMES" -l "$SECS" -c "$CLIENTS" -q 200 \
        | awk '/Queries per second/ {print $4}'
}
p50() { # server, ns-runner: median latency in ms at RATE qps
    "$2" dnsperf -v -s "$1" -d "$NAMES" -l 5 -Q "$RATE" \
        | awk '$1 == ">" && $2 == "NOERROR" {print $NF}' | sort -g \
        | awk '{a[NR]=$1} END {if (NR) printf "%.3f", a[int((NR+1)/2)] * 1000; else print "nan"}'
}
stub_qps=$(qps "$STUB" lap)
dnsmasq_qps=$(qps 10.244.0.1 node)
stub_p50=$(p50 "$STUB" lap)
dnsmasq_p50=$(p50 10.244.0.1 node)
if [ -n "${STUB_BIN:-}" ]; then
    lap sh -c "echo \$\$ > $RUN_DIR/stub.pid; exec $STUB_BIN 127.0.0.53:53 10.96.0.10:53 192.168.240.53:53 cluster.local default" >/dev/null 2>&1 &
    for _ in $(seq 50); do lap dig +time=1 +tries=1 @127.0.0.53 web.default.svc.cluster.local >/dev/null 2>&1 && break; sleep 0.1; done
    lap dnsperf -s 127.0.0.53 -d "$NAMES" -n 1 >/dev/null
    rel_qps=$(qps 127.0.0.53 lap)
    rel_p50=$(p50 127.0.0.53 lap)
    echo "release stub (127.0.0.53): ${rel_qps} qps, p50 ${rel_p50} ms at ${RATE} qps"
    awk -v a="$rel_qps" -v b="$dnsmasq_qps" -v c="$rel_p50" -v d="$dnsmasq_p50" \
        'BEGIN {printf "ratio release stub/dnsmasq: qps %.2fx, p50 %.2fx\n", a / b, c / d}'
fi
stats=$(lap "$BURROW" --run-dir "$RUN_DIR" status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin)["dns_stub"]; print("hits %d, misses %d" % (d["hits"], d["misses"]))')
echo "stub ($STUB):        ${stub_qps} qps, p50 ${stub_p50} ms at ${RATE} qps"
echo "dnsmasq (10.244.0.1): ${dnsmasq_qps} qps, p50 ${dnsmasq_p50} ms at ${RATE} qps"
awk -v a="$stub_qps" -v b="$dnsmasq_qps" -v c="$stub_p50" -v d="$dnsmasq_p50" \
    'BEGIN {printf "ratio stub/dnsmasq: qps %.2fx (goal >= 0.8x), p50 %.2fx; stub p50 %s ms (goal <= 1 ms)\n", a / b, c / d, c}'
echo "stub cache: $stats"
echo "(dnsperf -l $SECS -c $CLIENTS -q 200; nproc $(nproc), kernel $(uname -r), $(date -u '+%F %H:%M') UTC, burrow $BURROW)"
