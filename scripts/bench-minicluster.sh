#!/usr/bin/env bash
# Times `minicluster up` (to every workload pod Running and cluster DNS
# answering) and `minicluster down`, RUNS times; prints each run and the median.
# Run as root after `cargo build -p burrow-tests`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
MC=target/debug/minicluster
NAME=bench$$
[ -x "$MC" ] || { echo "build first: cargo build -p burrow-tests" >&2; exit 1; }
trap '"$MC" down --name "$NAME" >/dev/null 2>&1 || true' EXIT
ups=(); downs=()
for i in $(seq "$RUNS"); do
    s=$(date +%s%N)
    "$MC" up --name "$NAME" >/dev/null
    m=$(date +%s%N)
    "$MC" down --name "$NAME" >/dev/null
    e=$(date +%s%N)
    ups+=($(( (m - s) / 1000000 ))); downs+=($(( (e - m) / 1000000 )))
    echo "run $i: up ${ups[-1]} ms, down ${downs[-1]} ms"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median: up $(median "${ups[@]}") ms, down $(median "${downs[@]}") ms (runs: $RUNS, nproc $(nproc), kernel $(uname -r))"
