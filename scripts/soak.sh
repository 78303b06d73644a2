#!/usr/bin/env bash
# soak.sh - one gateway under a steady mixed load for a long time (issue 17,
# point 5), in the miniature cluster, with the real release binaries:
#
#   mc-flows soak in the laptop namespace, through `burrow connect`, to
#   mc-flows' echo server in a pod: BULK flows sending and verifying 4 MiB
#   each over and over on new connections, RR flows exchanging 64 bytes
#   every 100 ms on one connection, IDLE flows exchanging a byte every 30 s
#   (100 flows by default).
#
# Every minute: bytes sent and received back (verified), errors, the RSS
# and CPU of the daemon and of the gateway, and the gateway's heap as its
# allocator counts it (bytes held, and resident pages). At the end: bytes lost
# (sent - received), RSS growth under load from the first minute to the
# last and over the second half of the run, RSS after the flows closed,
# CPU.
# Not a CI test: it runs for DURATION.
#
#   cargo build --release -p burrow -p burrow-gateway -p burrow-tests
#   DURATION=3600 bash scripts/soak.sh        # the hour
#   DURATION=300 bash scripts/soak.sh         # the 5-minute version
#
# Env: DURATION=3600 TRANSPORT=udp (or port-forward) BULK=10 RR=60 IDLE=30
# BURROW_BIN_DIR=target/release. Everything lives in the cluster's
# namespaces and is removed at exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-3600}
TRANSPORT=${TRANSPORT:-udp}
BULK=${BULK:-10} RR=${RR:-60} IDLE=${IDLE:-30}
BIN=$(readlink -f "${BURROW_BIN_DIR:-target/release}")
MC=$BIN/minicluster
NAME=sk$$
RUN_DIR=/run/minicluster/$NAME-burrow
OUT=$(mktemp /tmp/burrow-soak.XXXXXX)
cleanup() {
    local rc=$?
    "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$BIN/burrow" disconnect >/dev/null 2>&1 || true
    "$MC" down --name "$NAME" >/dev/null 2>&1 || true
    # The daemon's log stays only when something went wrong.
    if [ "$rc" = 0 ]; then
        rm -rf "$RUN_DIR" "$OUT"
    else
        echo "daemon log: $RUN_DIR/daemon.log, flows' output: $OUT" >&2
    fi
}
trap cleanup EXIT
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

log "starting the miniature cluster $NAME"
"$MC" up --name "$NAME" >/dev/null
KC=$("$MC" kubeconfig --name "$NAME")
HKC=$("$MC" kubeconfig --name "$NAME" --host)
lap() { "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$@"; }
kubectl --kubeconfig "$HKC" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: flows, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: flows}}
  template:
    metadata: {labels: {app: flows}}
    spec:
      containers:
      - name: echo
        image: debian:12
        command: ["$BIN/mc-flows", "echo-server", "--port", "7000"]
        ports: [{containerPort: 7000}]
        readinessProbe: {tcpSocket: {port: 7000}, periodSeconds: 1}
EOF
IP=
for _ in $(seq 120); do
    IP=$(kubectl --kubeconfig "$HKC" get pods -l app=flows \
        -o jsonpath='{.items[0].status.podIP} {.items[0].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)
    case $IP in *" True") IP=${IP% True}; break ;; esac
    IP=
    sleep 0.5
done
[ -n "$IP" ] || { echo "the flows pod never became Ready" >&2; exit 1; }
lap "$BIN/burrow" connect --kubeconfig "$KC" --transport "$TRANSPORT" >/dev/null
DAEMON=$(pgrep -f "burrow daemon --run-dir $RUN_DIR" || true)
DAEMON=${DAEMON%%$'\n'*}
gateway_pid() { # the gateway's process, in one of this cluster's pod namespaces
    local ns p
    for ns in $(ip netns list | awk "/^mc-$NAME-p-/ {print \$1}"); do
        for p in $(ip netns pids "$ns"); do
            if grep -q burrow-gateway "/proc/$p/cmdline" 2>/dev/null; then echo "$p"; return; fi
        done
    done
}
GATEWAY=$(gateway_pid)
[ -n "$DAEMON" ] && [ -n "$GATEWAY" ] || { echo "daemon or gateway process not found" >&2; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# The gateway's heap as its allocator sees it (burrow_gateway_allocator_bytes
# on its metrics port, from inside its pod's network namespace), in KiB:
# "allocated resident", or "- -" when it does not say.
heap() {
    nsenter -t "$GATEWAY" -n curl -s --max-time 5 http://127.0.0.1:9090/metrics 2>/dev/null | awk '
        /^burrow_gateway_allocator_bytes\{kind="allocated"\}/ {a = int($2 / 1024)}
        /^burrow_gateway_allocator_bytes\{kind="resident"\}/ {r = int($2 / 1024)}
        END {print (a == "" ? "-" : a), (r == "" ? "-" : r)}'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
log "flows: $BULK bulk, $RR request/response, $IDLE idle to $IP:7000 over $TRANSPORT for ${DURATION}s (daemon pid $DAEMON, gateway pid $GATEWAY)"

lap "$BIN/mc-flows" soak --to "$IP:7000" --bulk "$BULK" --rr "$RR" --idle "$IDLE" \
    --duration-secs "$DURATION" --report-secs 60 >"$OUT" 2>&1 &
SOAK=$!
echo "| minute | sent MB | received MB | in flight KB | errors | daemon RSS KiB | gateway RSS KiB | gateway heap allocated KiB | gateway heap resident KiB | daemon CPU % | gateway CPU % |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
d0=$(ticks "$DAEMON") g0=$(ticks "$GATEWAY")
first_d= first_g= minute=0
rss_d=() rss_g=()
d_start=$d0 g_start=$g0
while kill -0 "$SOAK" 2>/dev/null; do
    for _ in $(seq 60); do kill -0 "$SOAK" 2>/dev/null || break; sleep 1; done
    kill -0 "$SOAK" 2>/dev/null || break
    minute=$((minute + 1))
    d1=$(ticks "$DAEMON") g1=$(ticks "$GATEWAY")
    dr=$(rss "$DAEMON") gr=$(rss "$GATEWAY")
    read -r ha hr < <(heap)
    [ -z "$first_d" ] && first_d=$dr first_g=$gr
    rss_d+=("$dr") rss_g+=("$gr")
    last=$(grep '^@@' "$OUT" | tail -1)
    sent=$(sed -n 's/.* sent=\([0-9]*\).*/\1/p' <<<"$last")
    recv=$(sed -n 's/.* received=\([0-9]*\).*/\1/p' <<<"$last")
    infl=$(sed -n 's/.* in_flight=\([0-9]*\).*/\1/p' <<<"$last")
    errs=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$last")
    echo "| $minute | $(( ${sent:-0} / 1000000 )) | $(( ${recv:-0} / 1000000 )) | $(( ${infl:-0} / 1000 )) | ${errs:-?} | $dr | $gr | $ha | $hr | $(( (d1 - d0) * 100 / HZ / 60 )) | $(( (g1 - g0) * 100 / HZ / 60 )) |"
    d0=$d1 g0=$g1
done
set +e
wait "$SOAK"
rc=$?
set -e
dr=$(rss "$DAEMON") gr=$(rss "$GATEWAY")
final=$(grep '^@@' "$OUT" | tail -1)
echo
echo "final: $final"
grep '^error' "$OUT" | head -20 || true
sent=$(sed -n 's/.* sent=\([0-9]*\).*/\1/p' <<<"$final")
recv=$(sed -n 's/.* received=\([0-9]*\).*/\1/p' <<<"$final")
echo "bytes lost: $(( sent - recv )) of $sent sent"
growth() { awk -v a="$1" -v b="$2" 'BEGIN {if (a > 0) printf "%+.1f %%", (b - a) * 100 / a; else print "-"}'; }
# Under load: minute 1 to the last minute, and over the second half of the
# run (bounded caches, e.g. the gateway's warm buffer slots, fill in the
# first minutes; a leak keeps growing in the second half too).
n=${#rss_d[@]}
if [ "$n" -gt 0 ]; then
    h=$(( n / 2 ))
    echo "RSS under load, minute 1 -> $n: daemon ${rss_d[0]} -> ${rss_d[n-1]} KiB ($(growth "${rss_d[0]}" "${rss_d[n-1]}")), gateway ${rss_g[0]} -> ${rss_g[n-1]} KiB ($(growth "${rss_g[0]}" "${rss_g[n-1]}"))"
    echo "RSS under load, second half (minute $((h + 1)) -> $n): daemon $(growth "${rss_d[h]}" "${rss_d[n-1]}"), gateway $(growth "${rss_g[h]}" "${rss_g[n-1]}")"
fi
echo "RSS after the flows closed: daemon $dr KiB, gateway $gr KiB"
echo "CPU over the run: daemon $(( ($(ticks "$DAEMON") - d_start) / HZ )) s, gateway $(( ($(ticks "$GATEWAY") - g_start) / HZ )) s"
echo "soak exit $rc (0: nothing lost or wrong); transport $TRANSPORT; nproc $(nproc), kernel $(uname -r), $(date -u '+%F %H:%M UTC')"
exit "$rc"
