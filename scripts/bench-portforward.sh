#!/usr/bin/env bash
# bench-portforward.sh - the port-forward transport against the path it rides
# on (issue 17, point 1), side by side in one run in the miniature cluster:
#
#   kubectl   `kubectl port-forward pod/<web pod> 18080:80` in the laptop
#             namespace, downloads from http://127.0.0.1:18080/100m.bin
#             (skipped, said, when this kubectl cannot port-forward through
#             the API server stand-in)
#   raw       `mc-flows pf-get`: plain kube-rs WebSocket port-forwards to the
#             pod's port 80 (one per download), an HTTP GET on each
#   burrow    `burrow connect --transport port-forward`, downloads from
#             http://web.default.svc.cluster.local/100m.bin (same nginx pod:
#             the web Deployment is scaled to one replica for the run)
#
# All go laptop -> API server stand-in -> kubelet -> pod; burrow adds
# WireGuard, the gateway's userspace TCP and its dial to the pod. Measures,
# in turn each rep: one 100 MiB download (MB/s), and 4 parallel 100 MiB
# downloads (MB/s of all bytes over the wall time). Medians of REPS, and the
# ratios burrow/kubectl and burrow/raw.
#
# Run as root after `cargo build --release -p burrow -p burrow-gateway -p burrow-tests`:
#
#   REPS=5 bash scripts/bench-portforward.sh
#
# Env: REPS=5 BURROW_BIN_DIR=target/release BURROW_CONNECT_ARGS="" (extra
# flags for burrow connect). Everything lives in the cluster's namespaces and
# is removed at exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
BIN=$(readlink -f "${BURROW_BIN_DIR:-target/release}")
MC=$BIN/minicluster
NAME=pf$$
RUN_DIR=$(mktemp -d /tmp/burrow-bench-pf.XXXXXX)
PF_PID=
cleanup() {
    [ -n "$PF_PID" ] && kill "$PF_PID" 2>/dev/null || true
    "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$BIN/burrow" disconnect >/dev/null 2>&1 || true
    "$MC" down --name "$NAME" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

log "starting the miniature cluster $NAME"
"$MC" up --name "$NAME" >/dev/null
KC=$("$MC" kubeconfig --name "$NAME")
HKC=$("$MC" kubeconfig --name "$NAME" --host)
lap() { "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$@"; }
kubectl --kubeconfig "$HKC" scale deployment web --replicas 1 >/dev/null
for _ in $(seq 100); do
    n=$(kubectl --kubeconfig "$HKC" get pods -l app=web -o name | wc -l)
    [ "$n" = 1 ] && break
    sleep 0.2
done
POD=$(kubectl --kubeconfig "$HKC" get pods -l app=web -o jsonpath='{.items[0].metadata.name}')
log "web pod: $POD"

lap kubectl --kubeconfig "$KC" port-forward "pod/$POD" 18080:80 >"$RUN_DIR/kubectl-pf.log" 2>&1 &
PF_PID=$!
KUBECTL=1
for _ in $(seq 50); do
    lap curl -sf -o /dev/null --max-time 2 http://127.0.0.1:18080/1k.bin && break
    kill -0 "$PF_PID" 2>/dev/null || break
    sleep 0.2
done
if ! lap curl -sf -o /dev/null --max-time 5 http://127.0.0.1:18080/1k.bin; then
    log "kubectl port-forward does not work here: $(tr '\n' ' ' <"$RUN_DIR/kubectl-pf.log")"
    KUBECTL=0
fi

# shellcheck disable=SC2086
lap "$BIN/burrow" connect --kubeconfig "$KC" --transport port-forward ${BURROW_CONNECT_ARGS:-} >/dev/null
lap "$BIN/burrow" status
WEB=http://web.default.svc.cluster.local

raw() { # MB/s of $1 downloads through plain port-forwards
    lap "$BIN/mc-flows" pf-get --kubeconfig "$KC" --pod "default/$POD" --port 80 \
        --path /100m.bin --parallel "$1" | awk '/^@@/ {print $3}'
}
one() { # MB/s of one download of $1
    lap curl -sSf -o /dev/null -w '%{speed_download}\n' "$1/100m.bin" |
        awk '{printf "%.1f\n", $1 / 1e6}'
}
four() { # MB/s of 4 parallel downloads of $1 (all bytes / wall time)
    lap bash -c '
        s=$(date +%s%N)
        pids=
        for i in 1 2 3 4; do curl -sSf -o /dev/null "$1/100m.bin" & pids="$pids $!"; done
        ok=0 codes=
        for p in $pids; do
            if wait "$p"; then ok=$((ok + 1)); else codes="$codes $?"; fi
        done
        e=$(date +%s%N)
        [ "$ok" = 4 ] || { echo "a download of $1/100m.bin failed (curl exit$codes)" >&2; exit 1; }
        awk -v ns=$((e - s)) "BEGIN {printf \"%.1f\n\", 4 * 104857600 / (ns / 1e9) / 1e6}"
    ' _ "$1"
}

k1=() b1=() k4=() b4=() r1=() r4=()
for r in $(seq "$REPS"); do
    if [ "$KUBECTL" = 1 ]; then
        k1+=("$(one http://127.0.0.1:18080)")
        k4+=("$(four http://127.0.0.1:18080)")
    else
        k1+=(0) k4+=(0)
    fi
    r1+=("$(raw 1)")
    r4+=("$(raw 4)")
    b1+=("$(one $WEB)")
    b4+=("$(four $WEB)")
    log "rep $r: 1 download: kubectl ${k1[-1]} raw ${r1[-1]} burrow ${b1[-1]} MB/s; 4 downloads: kubectl ${k4[-1]} raw ${r4[-1]} burrow ${b4[-1]} MB/s"
done
mk1=$(median "${k1[@]}") mb1=$(median "${b1[@]}") mk4=$(median "${k4[@]}") mb4=$(median "${b4[@]}")
mr1=$(median "${r1[@]}") mr4=$(median "${r4[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else printf "-"}'; }
echo
echo "| measure (median of $REPS) | kubectl port-forward | raw port-forward (kube-rs) | burrow --transport port-forward | burrow / kubectl | burrow / raw |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| 1 × 100 MiB download | $mk1 MB/s | $mr1 MB/s | $mb1 MB/s | $(ratio "$mb1" "$mk1") | $(ratio "$mb1" "$mr1") |"
echo "| 4 × 100 MiB in parallel | $mk4 MB/s | $mr4 MB/s | $mb4 MB/s | $(ratio "$mb4" "$mk4") | $(ratio "$mb4" "$mr4") |"
echo
echo "runs: kubectl 1: ${k1[*]}; raw 1: ${r1[*]}; burrow 1: ${b1[*]}; kubectl 4: ${k4[*]}; raw 4: ${r4[*]}; burrow 4: ${b4[*]}"
echo "(nproc $(nproc), kernel $(uname -r), $(date -u '+%F %H:%M UTC'), load before: $(cut -d' ' -f1-3 /proc/loadavg), binaries in $BIN)"
