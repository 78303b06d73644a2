#!/usr/bin/env bash
# httproute.sh - the gateway's HTTP proxy (gateway/src/httproute.rs) on
# loopback, measured with wrk against the same upstream reached directly.
#
#   bash bench/httproute.sh            # builds the bench binary (release) first
#   ROUNDS=5 DURATION=10 CONNECTIONS=32 WRK_THREADS=1 bash bench/httproute.sh
#
# Paths (each wrk run: keep-alive connections, GET /, ~20-byte body):
#   direct   wrk -> upstream
#   splice   wrk -> splice_or_502 (global mode: raw bytes) -> upstream
#   header   wrk -> serve() with `x-burrow-route: bench` (matches the rule,
#            goes to the "laptop" upstream) -> upstream
#   fallback wrk -> the pass-through without the header (the "cluster"
#            fallback; byte for byte, passthrough.rs)
#   full     wrk -> serve() alone without the header (the full proxy, as
#            header mode carried every request before the pass-through)
# header and fallback run as the gateway runs them: passthrough::serve,
# which hands a connection to serve() at its first routed request.
# The upstream is nginx (1 worker) when installed, else the bench binary's
# own hyper server (UPSTREAM=hyper forces it). Rounds are interleaved so that
# a change in machine load hits every path alike; the median round is shown.
# Everything listens on 127.0.0.1 only; every process started is stopped on
# exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
WRK_THREADS=${WRK_THREADS:-1}
UPSTREAM=${UPSTREAM:-nginx}
TARGET=${CARGO_TARGET_DIR:-target}

command -v wrk >/dev/null || { echo "httproute.sh: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$BENCH_BIN # a prebuilt httproute_bench, e.g. to compare two versions
else
    cargo build -q --release -p burrow-gateway --example httproute_bench
    BIN="$TARGET/release/examples/httproute_bench"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# A line "key=value ..." printed by the bench binary, once it listens.
wait_line() {
    local file=$1
    for _ in $(seq 100); do
        if [ -s "$file" ]; then head -1 "$file"; return; fi
        sleep 0.1
    done
    echo "httproute.sh: $file stayed empty" >&2
    exit 1
}

if [ "$UPSTREAM" = nginx ] && command -v nginx >/dev/null; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$tmp/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$port;
        location / { return 200 "hello from upstream\n"; }
    }
}
EOF
    nginx -c "$tmp/nginx.conf" -p "$tmp" &
    pids+=($!)
    upstream="127.0.0.1:$port"
    upstream_desc="nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), 1 worker"
    for _ in $(seq 50); do
        curl -fsS "http://$upstream/" >/dev/null 2>&1 && break
        sleep 0.1
    done
else
    "$BIN" upstream >"$tmp/upstream.out" &
    pids+=($!)
    upstream=$(wait_line "$tmp/upstream.out" | sed 's/^upstream=//')
    upstream_desc="hyper (bench binary)"
fi

"$BIN" proxy --upstream "$upstream" >"$tmp/proxy.out" &
proxy_pid=$!
pids+=($proxy_pid)
line=$(wait_line "$tmp/proxy.out")
header=$(echo "$line" | sed 's/.*header=\([^ ]*\).*/\1/')
splice=$(echo "$line" | sed 's/.*splice=\([^ ]*\).*/\1/')
full=$(echo "$line" | sed 's/.*full=\([^ ]*\).*/\1/')

# Sanity: every path answers, and header mode really routes.
curl -fsS "http://$upstream/" >/dev/null
curl -fsS "http://$splice/" >/dev/null
curl -fsS -H 'x-burrow-route: bench' "http://$header/" >/dev/null
curl -fsS "http://$header/" >/dev/null
curl -fsS "http://$full/" >/dev/null

# CPU time (user + system, clock ticks) used so far by the proxy process.
proxy_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# wrk output -> "rps p50_ms p99_ms errors"
parse() {
    awk '
        function ms(v) {
            if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
            if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
            if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
            return v
        }
        /Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx|Socket errors/ { err = err $0 ";" }
        END { printf "%.0f %.3f %.3f %s\n", rps, p50, p99, (err == "" ? "-" : err) }
    '
}

run() { # path url [header]
    local out before after
    before=$(proxy_ticks)
    if [ -n "${3:-}" ]; then
        out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "$3" "$2")
    else
        out=$(wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$2")
    fi
    after=$(proxy_ticks)
    # Proxy CPU per request: less sensitive to machine load than req/s.
    local requests cpu
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu=$(awk -v t=$((after - before)) -v n="$requests" -v us="$TICK_US" 'BEGIN { printf "%.1f", (n > 0 ? t * us / n : 0) }')
    echo "$1 $(echo "$out" | parse | awk -v c="$cpu" '{ $4 = c " " $4; print }')" | tee -a "$tmp/results"
}

echo "# $(date -u +%FT%TZ) nproc $(nproc), kernel $(uname -r), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# upstream: $upstream_desc; wrk -t$WRK_THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds"
echo "# path rps p50_ms p99_ms proxy_cpu_us_per_request errors"
for round in $(seq "$ROUNDS"); do
    run direct "http://$upstream/"
    run splice "http://$splice/"
    run header "http://$header/" "x-burrow-route: bench"
    run fallback "http://$header/"
    run full "http://$full/"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Median round per path (by rps), then ratios to direct and to splice.
python3 - "$tmp/results" <<'EOF'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    path, rps, p50, p99, cpu, *_ = line.split()
    rows.setdefault(path, []).append((float(rps), float(p50), float(p99), float(cpu)))
med = {}
for path, rs in rows.items():
    rs.sort()
    med[path] = rs[len(rs) // 2]
d, s = med["direct"], med["splice"]
print()
print("| path | req/s (median round) | p50 | p99 | req/s vs direct | req/s vs splice | p50 vs splice | p99 vs splice | proxy CPU per request (median) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for path in ["direct", "splice", "header", "fallback", "full"]:
    r, p50, p99, _ = med[path]
    cpu = statistics.median(x[3] for x in rows[path])
    cpu = "-" if path == "direct" else f"{cpu:.1f} µs"
    print(f"| {path} | {r:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {r/d[0]:.2f} | {r/s[0]:.2f} | {p50/s[1]:.2f} | {p99/s[2]:.2f} | {cpu} |")
print()
print("all rounds (req/s):", {p: [int(x[0]) for x in rs] for p, rs in rows.items()})
EOF
