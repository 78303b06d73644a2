#!/usr/bin/env bash
# Benchmarks `burrow reroute` in the miniature cluster: wrk from the caller
# pod to http://echo.default:8080/ answered
#   direct  — by the cluster's echo pods (no reroute),
#   global  — by mc-echo on the laptop, every connection rerouted,
#   header  — by mc-echo on the laptop, requests carrying x-burrow-route,
# and prints requests/s and p50/p99 latency with the ratios to direct.
# The laptop's server is the same program as the pods' (mc-echo).
# Run as root after building (BURROW_BIN_DIR, default target/release, must
# hold burrow, burrow-gateway, minicluster and mc-echo):
#   cargo build --release -p burrow -p burrow-gateway -p burrow-tests
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BURROW_BIN_DIR:-target/release}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
MC=$BIN/minicluster
NAME=br$$
RUN_DIR=$(mktemp -d /tmp/burrow-bench.XXXXXX)
command -v wrk >/dev/null || { echo "bench-reroute: needs wrk (apt-get install wrk)" >&2; exit 1; }
LOCAL=""
cleanup() {
    [ -n "$LOCAL" ] && kill "$LOCAL" 2>/dev/null || true
    "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$BIN/burrow" disconnect >/dev/null 2>&1 || true
    "$MC" down --name "$NAME" >/dev/null 2>&1 || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
"$MC" up --name "$NAME" >/dev/null
KC=$("$MC" kubeconfig --name "$NAME")
KCH=$("$MC" kubeconfig --name "$NAME" --host)
lap() { "$MC" exec --name "$NAME" laptop -- env BURROW_RUN_DIR="$RUN_DIR" "$@"; }
CALLER=$(kubectl --kubeconfig "$KCH" get pods -l app=caller -o jsonpath='{.items[0].metadata.name}')
caller() { "$MC" exec --name "$NAME" "pod/default/$CALLER" -- "$@"; }

"$MC" exec --name "$NAME" laptop -- env POD_NAME=laptop PORT=3000 "$BIN/mc-echo" >/dev/null 2>&1 &
LOCAL=$!
for _ in $(seq 50); do lap curl -sf http://127.0.0.1:3000/healthz >/dev/null 2>&1 && break; sleep 0.1; done

# The ClusterIP, not the name: the miniature cluster's DNS reloads (and
# briefly fails) while a reroute changes the Service.
URL=http://$(kubectl --kubeconfig "$KCH" get svc echo -o jsonpath='{.spec.clusterIP}'):8080/
# Busy CPU time of the whole machine so far, in clock ticks (every
# /proc/stat cpu field but idle and iowait: user, system, softirq...).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# Prints "rps p50_ms p99_ms cpu_us_per_request" for one wrk run from the
# caller pod. CPU per request is the whole machine's busy time (wrk, the
# pods, the gateway, the kernel's softirq work) over the requests done:
# on a machine the benchmark saturates, req/s follows it.
measure() {
    local out before after
    before=$(busy_ticks)
    out=$(caller wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$URL")
    after=$(busy_ticks)
    echo "$out" >&2
    local rps p50 p99 requests cpu
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(awk -v t=$((after - before)) -v n="$requests" -v us="$TICK_US" 'BEGIN { printf "%.1f", (n > 0 ? t * us / n : 0) }')
    echo "$rps $(to_ms "$p50") $(to_ms "$p99") $cpu"
}
to_ms() { # wrk prints 1.23ms, 456.00us or 1.02s
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
        else print v }'
}
check() { # the answer comes from whom we expect
    local who
    # The miniature cluster's DNS reloads when Services change: retry.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        who=$(caller curl -sS --max-time 5 "$@" "$URL" 2>/dev/null) && break
        sleep 0.5
    done
    echo "  answered by: $(echo "$who" | sed -n 's/.*"pod":"\([^"]*\)".*/\1/p')" >&2
}

echo "== direct (cluster pods)" >&2
check
read -r D_RPS D_P50 D_P99 D_CPU < <(measure)

lap "$BIN/burrow" reroute echo --port 8080:3000 --kubeconfig "$KC" >/dev/null
echo "== global reroute" >&2
check
read -r G_RPS G_P50 G_P99 G_CPU < <(measure)
lap "$BIN/burrow" reroute --stop echo >/dev/null

lap "$BIN/burrow" reroute echo --port 8080:3000 --header x-burrow-route=me --kubeconfig "$KC" >/dev/null
echo "== header reroute (every request carries the header)" >&2
check -H "x-burrow-route: me"
read -r H_RPS H_P50 H_P99 H_CPU < <(measure -H "x-burrow-route: me")
echo "== header reroute, requests without the header (to the pods via the shadow)" >&2
check
read -r N_RPS N_P50 N_P99 N_CPU < <(measure)
lap "$BIN/burrow" reroute --stop echo >/dev/null

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
printf '\nwrk -t%s -c%s -d%s, caller pod -> http://echo.default:8080/ (%s)\n' "$THREADS" "$CONNECTIONS" "$DURATION" "$BIN"
printf '%-34s %10s %9s %9s %9s %8s %8s %8s %8s\n' mode "req/s" "p50 ms" "p99 ms" "CPU µs" "rps x" "p50 x" "p99 x" "CPU x"
row() { printf '%-34s %10s %9s %9s %9s %8s %8s %8s %8s\n' "$1" "$2" "$3" "$4" "$5" "$(ratio "$2" "$D_RPS")" "$(ratio "$3" "$D_P50")" "$(ratio "$4" "$D_P99")" "$(ratio "$5" "$D_CPU")"; }
row "direct (cluster pods)" "$D_RPS" "$D_P50" "$D_P99" "$D_CPU"
row "global reroute (laptop)" "$G_RPS" "$G_P50" "$G_P99" "$G_CPU"
row "header reroute, matching (laptop)" "$H_RPS" "$H_P50" "$H_P99" "$H_CPU"
row "header reroute, no header (pods)" "$N_RPS" "$N_P50" "$N_P99" "$N_CPU"
printf '(CPU µs: the whole machine'"'"'s busy time per request, kernel softirq work included)\n'
printf 'header/global req/s: %s\n' "$(ratio "$H_RPS" "$G_RPS")"
