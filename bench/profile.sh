#!/usr/bin/env bash
# profile.sh - where burrow's single-stream and new-connection time goes,
# measured in load-independent units (instructions and syscalls per MB or per
# connection) so that it can run on a busy machine. Run as root:
#
#   BURROW_BIN_DIR=/work/target-release/release bash bench/profile.sh
#
# Brings up bench/e2e.sh's topology with the burrow path (HOLD=1), then for
# each measure (iperf3 forward, reverse, and wrk with Connection: close) counts
# instructions (perf stat) and syscalls by kind (syscall tracepoints) in the
# gateway and the client, and samples the gateway's and the client's hottest
# functions (perf record). Results: $OUT (default /tmp/burrow-profile.txt).
# Env: DUR=8 (seconds per measure), OUT, BURROW_BIN_DIR, NS_* as e2e.sh.
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
DUR=${DUR:-8}
OUT=${OUT:-/tmp/burrow-profile.txt}
NS_LAP=${NS_LAP:-e2e-lap} NS_GW=${NS_GW:-e2e-gw}
POD_IP=10.244.1.10
SYSCALLS="recvmmsg sendmmsg recvfrom sendto read write readv writev epoll_wait futex sched_yield"

HOLD=1 MAX_SECONDS=900 bash "$HERE/e2e.sh" burrow >/tmp/burrow-profile-hold.log 2>&1 &
HOLD_PID=$!
trap 'kill $HOLD_PID 2>/dev/null; wait $HOLD_PID 2>/dev/null' EXIT
for _ in $(seq 120); do
  grep -q "HOLD=1: topology up" /tmp/burrow-profile-hold.log && break
  sleep 1
done
GW=$(pgrep -n -x burrow-gateway) CLI=$(pgrep -n -f "burrow up --wg-config")
[ -n "$GW" ] && [ -n "$CLI" ] || { echo "burrow path did not come up" >&2; tail /tmp/burrow-profile-hold.log >&2; exit 1; }
: >"$OUT"
say() { echo "$*" | tee -a "$OUT"; }
say "profile.sh $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
say "gateway pid $GW, client pid $CLI, $DUR s per measure"

events() {
  local e="instructions:u,instructions:k,raw_syscalls:sys_enter"
  for s in $SYSCALLS; do e="$e,syscalls:sys_enter_$s"; done
  echo "$e"
}
# count LABEL CMD...: perf stat on both ends while CMD runs; prints per-process counters
count() {
  local label=$1; shift
  perf stat -x, -e "$(events)" -p "$GW" -o /tmp/bp-gw.csv -- sleep "$((DUR + 1))" &
  local pg=$!
  perf stat -x, -e "$(events)" -p "$CLI" -o /tmp/bp-cli.csv -- sleep "$((DUR + 1))" &
  local pc=$!
  "$@"
  wait $pg $pc
  for end in gw cli; do
    say "$label $end: $(awk -F, '/^[0-9]/ {sub(/^syscalls:sys_enter_/, "", $3); sub(/^raw_syscalls:sys_enter/, "syscalls", $3); printf "%s=%s ", $3, $1}' /tmp/bp-$end.csv)"
  done
}
iperf() {
  ip netns exec "$NS_LAP" iperf3 -c "$POD_IP" -t "$DUR" -J "$@" >/tmp/bp-iperf.json 2>&1
  say "iperf3 $*: $(python3 -c "import json; e=json.load(open('/tmp/bp-iperf.json'))['end']; print(e['sum_received']['bytes'], 'bytes', round(e['sum_received']['bits_per_second']/1e9, 3), 'Gbit/s')")"
}
wrkconn() {
  ip netns exec "$NS_LAP" wrk -t1 -c50 -d"${DUR}s" -H 'Connection: close' "http://$POD_IP/1k" >/tmp/bp-wrk.txt 2>&1
  say "wrk -c50 close: $(grep -E '^\s+[0-9]+ requests' /tmp/bp-wrk.txt | tr -s ' ')"
}
count "forward (lap -> pod)" iperf
count "reverse (pod -> lap)" iperf -R
count "new connections" wrkconn

record() {
  local label=$1 pid=$2; shift 2
  perf record -F 999 -g -p "$pid" -o "/tmp/bp-$label.data" -- sleep "$DUR" >/dev/null 2>&1 &
  local pr=$!
  "$@" >/dev/null
  wait $pr
  say "--- $label: top functions (self, % of samples)"
  perf report -i "/tmp/bp-$label.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^\s+[0-9.]+%' | head -25 | tee -a "$OUT" >/dev/null
}
record gw-forward "$GW" iperf
record cli-forward "$CLI" iperf
record gw-reverse "$GW" iperf -R
record cli-reverse "$CLI" iperf -R
record gw-conn "$GW" wrkconn
say "done"
