#!/usr/bin/env bash
# e2e.sh - burrow's data path end to end (issue 3), measured side by side with
# the peers in the same run. Extends ../shared/bench/peers.sh (same topology,
# same measures, same peers) with a `burrow` path, memory, UDP receive-buffer
# drops and a 10,000 idle TCP flows test. Run as root from anywhere:
#
#   cargo build --release -p burrow -p burrow-gateway      # or with CARGO_TARGET_DIR
#   BURROW_BIN_DIR=/work/target-release/release bash bench/e2e.sh [PATH...]
#
# Topology (every address lives only inside namespaces this script creates and
# removes, also on failure or timeout; the machine's own routes, resolver and
# firewall are not touched):
#
#   $NS_LAP  lap0 192.168.77.1/24  <-veth->  gw0 192.168.77.2/24  $NS_GW
#   $NS_GW   gwp  10.244.1.1/24    <-veth->  pod0 10.244.1.10/24  $NS_POD
#   (namespace names default to e2e-lap, e2e-gw, e2e-pod so that a concurrent
#    peers.sh, which uses lap/gw/pod, is not disturbed)
#   With DELAY_MS on a kernel without sch_netem, a fourth namespace $NS_WAN
#   (e2e-wan) sits on the lap-gw link, same addresses on lap0 and gw0:
#   $NS_LAP  lap0 <-veth-> wan-lap  $NS_WAN  wan-gw <-veth-> gw0  $NS_GW
#   where mc-wire (tests/src/bin/mc-wire.rs) carries every frame between
#   wan-lap and wan-gw DELAY_MS later (see DELAY_MS below).
#
#   pod runs: iperf3 -s (:5201), nginx (:80, /1k = 1 KiB, /100m = 100 MiB),
#             socat TCP echo (:7); for the flows test a Python asyncio server
#             (:9000) that accepts and holds every connection (and echoes)
#   gw  runs: wireguard-go (wgg, 10.99.0.2, udp 51820), sshd (192.168.77.2:22),
#             and for the burrow path burrow-gateway (udp 51830, framed tcp
#             51831, metrics tcp 9090) as uid 65532 with no capabilities
#
# PATHs measured from lap to the pod server 10.244.1.10, each set up and torn
# down in turn (only one of them routes 10.244.0.0/16 in lap at any time):
#   direct    kernel routing lap -> gw -> pod (the physical ceiling)
#   burrow    `burrow up --background` in lap (TUN bw0, 10.98.0.1/32, route
#             10.244.0.0/16 dev bw0) -> WireGuard -> burrow-gateway in gw, which
#             terminates TCP in its userspace stack and dials the pod itself
#             (gw's ip_forward is 0 meanwhile: nothing can bypass the gateway)
#   wggo      wireguard-go in lap (wgl, 10.99.0.1) and gw; lap routes
#             10.244.0.0/16 over wgl; gw forwards + masquerades
#   sshuttle  sshuttle -r root@192.168.77.2 10.244.0.0/16 (sshd in gw, key auth)
#   onetun    onetun (boringtun + smoltcp) in lap, local ports 15201/18080/10007
#             forwarded over WireGuard to the wireguard-go peer in gw, then to pod
#   sshuttle_nlc  same as sshuttle, with --no-latency-control (not by default)
#   burrow_framed same as burrow, over B_STREAMS (4) TCP connections to the
#             gateway's framed port (`burrow up --framed-streams`): the framed
#             transport a port-forward carries, without the API server (not by
#             default; TCP in TCP shows under loss)
# (default: direct burrow wggo sshuttle onetun; name some to run only those)
#
# Measures (each REPS times, the median is reported), as peers.sh:
#   iperf3 TCP 1 stream, 4 streams (-P 4), reverse (-R), DUR seconds each
#   wrk -t1 -c1 --latency on /1k (p50/p99, req/s)
#   wrk -t1 -c50 -H 'Connection: close' on /1k (new connections/s)
#   TCP echo round trip (64 B ping-pong, ECHO_N rounds: 2000, 400 with DELAY_MS; p50/p99)
#   curl GET of /100m (MB/s)
#   CPU during the 1-stream run: machine, tunnel processes, per GB, steal
# and in addition:
#   UDP RcvbufErrors (/proc/net/snmp) in lap and gw, before/after every iperf3
#     run (every path; for burrow these are the client's and the gateway's
#     sockets, for wggo the two wireguard-go sockets)
#   per-process and per-thread CPU of both tunnel ends during the iperf3 runs
#     (burrow, wggo; per-thread detail in the notes for burrow)
#   RSS (VmRSS, /proc/<pid>/status) of both tunnel ends: idle (after the
#     handshake and one connect, before the measures) and after the measures;
#     VmHWM (peak) too
#   burrow only: FLOWS (10,000) concurrent idle TCP flows from lap through one
#     gateway to the pod: time to open, how many reach the pod, gateway RSS and
#     CPU while they idle, an echo over every flow, RSS after they close
# Results: a markdown table of medians, the issue-3 targets as ratios, raw
# values and notes to $RESULTS, raw TSV beside it (<name>-raw.tsv). The whole
# run takes about 30 min with the defaults on 2 cores.
#
# Env: REPS=3 DUR=10 RESULTS=/tmp/burrow-e2e-results.md
#      BURROW_BIN_DIR=<repo>/target/release (holds burrow and burrow-gateway)
#      FLOWS=10000 (0: skip the flows test)  FLOWS_CONC=256 (connects in flight)
#      MEASURES="tcp1 tcp4 tcpR wrk-c1 wrk-conn echo get100m" (the default: all;
#             name some to run only those, e.g. MEASURES= FLOWS=10000 for the
#             flows test alone, MEASURES=get100m REPS=10 for the download)
#      B_GW_ARGS="" (extra burrow-gateway flags, e.g. --tcp-buffer 65536)
#      MAX_SECONDS=4200 (whole run is bounded by this), KEEP_WORK=0,
#      HOLD=1 (build topology + servers, set up the first PATH named, then wait;
#             for profiling: e.g. HOLD=1 bash bench/e2e.sh burrow)
#      QUIET_CORES=0.3 QUIET_WAIT=120: before each measure wait (at most QUIET_WAIT s)
#      until other processes use at most QUIET_CORES cores; the load seen is reported
#      NS_LAP=e2e-lap NS_GW=e2e-gw NS_POD=e2e-pod
#      DELAY_MS=0 LOSS=0: impair the underlay each direction: DELAY_MS=25 LOSS=1 is a
#             50 ms RTT with 1 % loss each way (iptables statistic, PREROUTING of lap
#             and gw), e.g.
#             DELAY_MS=25 LOSS=3 MEASURES="tcp1 wrk-c1" bash bench/e2e.sh direct burrow burrow_framed wggo
#             The delay is tc netem on lap0 and gw0 where the kernel has sch_netem;
#             else (DELAY_EMU=auto picks, =netem or =wire forces) a userspace wire:
#             mc-wire ($WIRE_BIN, default $BURROW_BIN_DIR/mc-wire, built by
#             `cargo build --release -p burrow-tests --bin mc-wire`) in namespace
#             $NS_WAN between lap0 and gw0, AF_PACKET sockets on both sides, each
#             frame sent on DELAY_MS after it arrived, in order, 64 MiB queue each way
#             (drops when full), at real-time priority WIRE_RT=20 (chrt -f; 0: none). $NS_WAN has no address, no bridge, ip_forward 0:
#             frames cross only through mc-wire. Segmentation and checksum offloads
#             are off on lap0, gw0 and the wire's interfaces (ethtool; mc-wire moves
#             frames of at most the MTU), so loss hits single packets. mc-wire's
#             counts (forwarded, dropped, its socket's kernel drops) and the ping
#             RTT across the underlay go to the notes. Its ceiling is the direct
#             path's throughput with DELAY_MS=0.001 DELAY_EMU=wire.
# Needs: Debian 12 packages (installed with apt-get -y if missing), onetun
# (cargo install onetun --locked, if cargo exists and onetun is missing),
# setpriv (util-linux), and release builds of burrow and burrow-gateway.
set -uo pipefail

SELF=$(readlink -f "$0")
HERE=$(dirname "$SELF")
REPO=$(dirname "$HERE")
REPS=${REPS:-3}
DUR=${DUR:-10}
RESULTS=${RESULTS:-/tmp/burrow-e2e-results.md}
MAX_SECONDS=${MAX_SECONDS:-4200}
BURROW_BIN_DIR=${BURROW_BIN_DIR:-$REPO/target/release}
FLOWS=${FLOWS:-10000}
FLOWS_CONC=${FLOWS_CONC:-256}
MEASURES=${MEASURES-tcp1 tcp4 tcpR wrk-c1 wrk-conn echo get100m}
DEFAULT_PATHS="direct burrow wggo sshuttle onetun"

# Bound the whole run in time: re-exec under timeout(1); the EXIT/TERM trap tears down.
if [ -z "${E2E_INNER:-}" ]; then
  exec timeout -k 20 "$MAX_SECONDS" env E2E_INNER=1 bash "$SELF" "$@"
fi

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
PATHS=${*:-$DEFAULT_PATHS}

NS_LAP=${NS_LAP:-e2e-lap} NS_GW=${NS_GW:-e2e-gw} NS_POD=${NS_POD:-e2e-pod}
NS_WAN=${NS_WAN:-e2e-wan}
DELAY_MS=${DELAY_MS:-0} DELAY_EMU=${DELAY_EMU:-auto}
WIRE_BIN=${WIRE_BIN:-$BURROW_BIN_DIR/mc-wire}
WIRE=0   # 1 when mc-wire carries the underlay (decided in build_topology)
# echo rounds: 2000, or 400 with DELAY_MS (2000 round trips of 50 ms are 100 s a path)
ECHO_N=${ECHO_N:-$([ "$DELAY_MS" = 0 ] && echo 2000 || echo 400)}
POD_IP=10.244.1.10
GW_LAP_IP=192.168.77.2
WG_PORT=51820
# burrow: ports of the gateway, the client's device and tunnel address, the
# unprivileged user the gateway runs as
B_WG_PORT=51830 B_FRAMED_PORT=51831 B_METRICS_PORT=9090
B_IF=bw0 B_LAP_IP=10.98.0.1
B_UID=65532
# fd limit for the gateway and the flows test's client and server: FLOWS plus room,
# at most the hard limit (without CAP_SYS_RESOURCE it cannot be raised)
NOFILE=$((FLOWS + 4096)); [ "$NOFILE" -lt 65536 ] && NOFILE=65536
HARD_NOFILE=$(ulimit -Hn); [ "$HARD_NOFILE" != unlimited ] && [ "$NOFILE" -gt "$HARD_NOFILE" ] && NOFILE=$HARD_NOFILE
# the flows test opens FLOWS from one laptop, above the gateway's default
# per-laptop cap (4096 TCP flows): raise it for this laptop's flows
B_TCP_CAP=$((FLOWS + 64)); [ "$B_TCP_CAP" -lt 4096 ] && B_TCP_CAP=4096
BURROW=$BURROW_BIN_DIR/burrow
BURROW_GW=$BURROW_BIN_DIR/burrow-gateway
PY=/usr/bin/python3
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

WORK=$(mktemp -d /tmp/e2e.XXXXXX)
# nginx's files live on tmpfs: this VM runs DAMON proactive reclaim, which evicts the
# page cache of a file on disk within minutes and makes the direct path disk-bound
WWW=$(mktemp -d /dev/shm/e2e-www.XXXXXX)
# the gateway's configuration, readable by its unprivileged user only
GWDIR=$(mktemp -d /tmp/e2e-gw.XXXXXX); chmod 755 "$GWDIR"
RAW=$WORK/raw.tsv          # path <tab> metric <tab> rep <tab> value
NOTES=$WORK/notes.txt
: >"$RAW"; : >"$NOTES"
PIDS=()                    # every background process this script started

# ---------------------------------------------------------------- cleanup
kill_pid() { local p=$1; kill "$p" 2>/dev/null; }
teardown_ns() {
  local ns p
  for ns in "$NS_LAP" "$NS_GW" "$NS_POD" "$NS_WAN"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      # processes still inside our namespaces were started by this script (or a
      # previous run of it); end them one by one by pid (burrow up removes its
      # device and routes on SIGTERM)
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
    fi
  done
  sleep 0.5
  for ns in "$NS_LAP" "$NS_GW" "$NS_POD" "$NS_WAN"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
      ip netns del "$ns" 2>/dev/null
    fi
  done
}
cleanup() {
  local rc=$?
  # A second signal (timeout(1) forwards its own, profile.sh kills the HOLD
  # run) must not cut the teardown short: namespaces, servers and the
  # 100 MiB file in /dev/shm were left behind that way.
  trap - EXIT
  trap '' INT TERM
  if [ "${REPORTED:-1}" = 0 ] && [ -s "$RAW" ] && [ "${HOLD:-0}" != 1 ]; then
    write_report "PARTIAL: the run stopped early (exit $rc; MAX_SECONDS=$MAX_SECONDS)." 2>/dev/null
    log "partial results: $RESULTS"
  fi
  log "teardown"
  for p in "${PIDS[@]}"; do kill_pid "$p"; done
  teardown_ns
  rm -rf "$WWW" "$GWDIR"
  if [ "${KEEP_WORK:-0}" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 143' INT TERM

# ---------------------------------------------------------------- packages
need_pkgs() {
  local missing=() b pkg
  for pair in iperf3:iperf3 wrk:wrk nginx:nginx-light socat:socat sshuttle:sshuttle \
              wireguard-go:wireguard-go wg:wireguard-tools sshd:openssh-server \
              ssh:openssh-client curl:curl iptables:iptables ip:iproute2 setpriv:util-linux; do
    b=${pair%%:*}; pkg=${pair#*:}
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1 ||
      { timeout 300 apt-get update >>"$WORK/apt.log" 2>&1
        timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >>"$WORK/apt.log" 2>&1; } ||
      { tail -20 "$WORK/apt.log" >&2; echo "apt-get failed" >&2; exit 1; }
  fi
  [ -x "$PY" ] || { echo "$PY missing" >&2; exit 1; }
}
ONETUN=""
need_onetun() {
  ONETUN=$(command -v onetun 2>/dev/null || true)
  [ -z "$ONETUN" ] && [ -x "$HOME/.cargo/bin/onetun" ] && ONETUN=$HOME/.cargo/bin/onetun
  if [ -z "$ONETUN" ] && command -v cargo >/dev/null 2>&1; then
    log "cargo install onetun --locked (several minutes on 2 cores)"
    timeout 1500 cargo install onetun --locked >"$WORK/cargo.log" 2>&1 || tail -5 "$WORK/cargo.log" >&2
    [ -x "$HOME/.cargo/bin/onetun" ] && ONETUN=$HOME/.cargo/bin/onetun
  fi
  [ -n "$ONETUN" ] || echo "onetun: not available (no cargo / build failed)" >>"$NOTES"
}
need_burrow() {
  local b
  for b in "$BURROW" "$BURROW_GW"; do
    [ -x "$b" ] || { echo "burrow: $b missing; build with cargo build --release -p burrow -p burrow-gateway (or set BURROW_BIN_DIR)" >>"$NOTES"; return 1; }
  done
}

# ---------------------------------------------------------------- helper (python)
cat >"$WORK/h.py" <<'PYEOF'
import json, os, re, socket, statistics, sys, time

def snap(roots):
    """whole-machine busy ticks, total ticks, ticks of roots + all descendants"""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8]); busy = v[0] + v[1] + v[2] + v[5] + v[6]; steal = v[7]
    kids, ticks = {}, {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try:
            s = open(f'/proc/{d}/stat').read()
        except OSError:
            continue
        rest = s[s.rfind(')') + 2:].split()
        ppid = int(rest[1]); ticks[int(d)] = int(rest[11]) + int(rest[12])
        kids.setdefault(ppid, []).append(int(d))
    tun, todo, seen = 0, [int(r) for r in roots if r], set()
    while todo:
        p = todo.pop()
        if p in seen: continue
        seen.add(p); tun += ticks.get(p, 0); todo += kids.get(p, [])
    print(busy, total, tun, steal)

def cpu(before, after, secs):
    b = [int(x) for x in before.split()]; a = [int(x) for x in after.split()]
    hz = os.sysconf('SC_CLK_TCK'); ncpu = os.cpu_count()
    machine = (a[0] - b[0]) / max(1, a[1] - b[1]) * ncpu
    tun = (a[2] - b[2]) / hz / float(secs)
    steal = (a[3] - b[3]) / max(1, a[1] - b[1]) * 100
    print(f'{machine:.2f} {tun:.2f} {steal:.1f}')

def tsnap(labelled):
    """per-thread ticks of processes given as label=pid: label:tid:comm:ticks ..."""
    out = []
    for lp in labelled:
        label, pid = lp.split('=')
        try:
            tids = os.listdir(f'/proc/{pid}/task')
        except OSError:
            continue
        for tid in tids:
            try:
                s = open(f'/proc/{pid}/task/{tid}/stat').read()
            except OSError:
                continue
            comm = s[s.find('(') + 1:s.rfind(')')].replace(' ', '_').replace(':', '_')
            rest = s[s.rfind(')') + 2:].split()
            out.append(f'{label}:{tid}:{comm}:{int(rest[11]) + int(rest[12])}')
    print(' '.join(out))

def tcpu(before, after, secs):
    """line 1: cores per label (label=cores ...); line 2: busiest threads per label"""
    hz = os.sysconf('SC_CLK_TCK')
    b = {tuple(x.split(':')[:2]): int(x.split(':')[3]) for x in before.split()}
    per, threads = {}, {}
    for x in after.split():
        label, tid, comm, t = x.split(':')
        c = (int(t) - b.get((label, tid), 0)) / hz / float(secs)
        per[label] = per.get(label, 0) + c
        threads.setdefault(label, []).append((c, comm, tid))
    print(' '.join(f'{k}={v:.2f}' for k, v in per.items()))
    parts = []
    for label, ts in threads.items():
        ts.sort(reverse=True)
        busy = [f'{comm}/{tid} {c:.2f}' for c, comm, tid in ts if c >= 0.01][:4]
        parts.append(f'{label} {per[label]:.2f} cores [' + ', '.join(busy) + f'] of {len(ts)} threads')
    print('; '.join(parts))

def idle(secs):
    """machine busy cores and steal % over SECS seconds (taken while no test runs)"""
    def rd():
        with open('/proc/stat') as f:
            return [int(x) for x in f.readline().split()[1:]]
    a = rd(); time.sleep(float(secs)); b = rd()
    d = [y - x for x, y in zip(a, b)]; tot = max(1, sum(d[:8]))
    print(f'{(d[0]+d[1]+d[2]+d[5]+d[6])/tot*os.cpu_count():.2f} {d[7]/tot*100:.1f}')

def iperf(path):
    try:
        j = json.load(open(path))
    except Exception as e:
        print('FAIL', 'bad-json'); return
    if 'error' in j:
        sent = j.get('end', {}).get('sum_sent', {}).get('bytes', 0)
        print('FAIL', re.sub(r'\s+', '_', j['error'])[:80] + f'_(client_had_sent_{sent/1e6:.0f}_MB)'); return
    e = j['end']
    print(f"{e['sum_received']['bits_per_second']/1e9:.3f}", e.get('sum_sent', {}).get('retransmits', 0))

UNIT = {'us': 1, 'ms': 1e3, 's': 1e6}
def dur_us(t):
    m = re.fullmatch(r'([\d.]+)(us|ms|s)', t)
    return float(m.group(1)) * UNIT[m.group(2)]

def wrk(path):
    t = open(path).read()
    rps = re.search(r'Requests/sec:\s+([\d.]+)', t)
    if not rps:
        print('FAIL', 'no-output'); return
    # wrk pads a value in seconds ("1.05s ") with a space: a p99 above 1 s was lost
    lat = dict(re.findall(r'^\s+(50|99)%\s+(\S+)\s*$', t, re.M))
    err = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', t)
    non2xx = re.search(r'Non-2xx or 3xx responses: (\d+)', t)
    nerr = sum(int(x) for x in err.groups()) if err else 0
    p50 = dur_us(lat['50']) if '50' in lat else -1
    p99 = dur_us(lat['99']) if '99' in lat else -1
    print(f"{float(rps.group(1)):.0f} {p50:.0f} {p99:.0f} {nerr} {int(non2xx.group(1)) if non2xx else 0}")

def echo(host, port, n):
    port, n = int(port), int(n)
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg, lat = b'x' * 64, []
    for i in range(n + 100):
        t = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < 64:
            d = s.recv(64 - got)
            if not d: raise SystemExit('eof')
            got += len(d)
        if i >= 100: lat.append(time.perf_counter_ns() - t)
    lat.sort()
    print(f"{lat[len(lat)//2]/1000:.0f} {lat[int(len(lat)*0.99)]/1000:.0f}")

def flows_server(host, port):
    """accept every connection and hold it; echo whatever arrives"""
    import asyncio
    class S(asyncio.Protocol):
        def connection_made(self, t): self.t = t
        def data_received(self, d): self.t.write(d)
    async def main():
        srv = await asyncio.get_running_loop().create_server(
            S, host, int(port), backlog=4096, reuse_address=True)
        async with srv:
            await srv.serve_forever()
    asyncio.run(main())

def flows_client(host, port, n, conc, gofile):
    """open N connections (CONC connects in flight, 4 tries each), print
    'OPEN <opened> <seconds> <errors>', hold them until GOFILE exists, then send
    one byte on each and print 'ECHO <answered> <alive> <seconds>', close all"""
    import asyncio
    port, n, conc = int(port), int(n), int(conc)
    class C(asyncio.Protocol):
        def __init__(self): self.t = None; self.lost = False; self.ev = None
        def connection_made(self, t): self.t = t
        def data_received(self, d):
            if self.ev is not None and not self.ev.done(): self.ev.set_result(True)
        def connection_lost(self, e):
            self.lost = True
            if self.ev is not None and not self.ev.done(): self.ev.set_result(False)
    async def main():
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(conc)
        conns, errs = [], {}
        async def one():
            for _ in range(4):
                async with sem:
                    try:
                        _, p = await asyncio.wait_for(loop.create_connection(C, host, port), 20)
                        conns.append(p); return
                    except Exception as e:
                        k = type(e).__name__; errs[k] = errs.get(k, 0) + 1
                await asyncio.sleep(1)
        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        print(f'OPEN {len(conns)} {time.monotonic() - t0:.1f} {json.dumps(errs, separators=(",", ":"))}', flush=True)
        end = time.monotonic() + 900
        while not os.path.exists(gofile) and time.monotonic() < end:
            await asyncio.sleep(0.2)
        alive = 0
        for p in conns:
            p.ev = loop.create_future()
            if p.lost: p.ev.set_result(False)
            else: alive += 1; p.t.write(b'x')
        t0 = time.monotonic()
        ok = 0
        if conns:
            done, _ = await asyncio.wait([p.ev for p in conns], timeout=60)
            ok = sum(1 for f in done if f.result())
        print(f'ECHO {ok} {alive} {time.monotonic() - t0:.1f}', flush=True)
        for p in conns:
            p.t.close()
        await asyncio.sleep(1)
    asyncio.run(main())

def med(xs):
    return statistics.median(xs) if xs else None

def report(raw, notes, out, meta):
    rows = {}
    for line in open(raw):
        p, m, r, v = line.rstrip('\n').split('\t')
        rows.setdefault(p, {}).setdefault(m, []).append(v)
    def oks(p, m):
        return [float(v) for v in rows.get(p, {}).get(m, []) if not v.startswith('FAIL')]
    def num(p, m, fmt):
        vals = rows.get(p, {}).get(m, [])
        ok = oks(p, m)
        bad = [v for v in vals if v.startswith('FAIL')]
        if not ok:
            return 'fail' if bad else '-'
        m = med(ok)
        s = fmt.format(m) if not (fmt == '{:.2f}' and 0 < abs(m) < 0.1) else f'{m:.3f}'
        if fmt == 'max': s = f'{med(ok):.2f} / {max(ok):.2f}'
        if fmt == 'sum': s = f'{sum(ok):.0f}'
        if bad: s += f' ({len(bad)}/{len(vals)} fail)'
        return s
    cols = [
        ('TCP 1 str Gbit/s', 'tcp1', '{:.2f}'),
        ('TCP 4 str Gbit/s', 'tcp4', '{:.2f}'),
        ('TCP -R Gbit/s', 'tcpR', '{:.2f}'),
        ('HTTP 1KiB c1 p50 us', 'lat_p50', '{:.0f}'),
        ('p99 us', 'lat_p99', '{:.0f}'),
        ('c1 req/s', 'lat_rps', '{:.0f}'),
        ('new conn/s (c50, close)', 'conn_rps', '{:.0f}'),
        ('echo RTT p50 us', 'echo_p50', '{:.0f}'),
        ('echo p99 us', 'echo_p99', '{:.0f}'),
        ('GET 100MiB MB/s', 'get100m', '{:.0f}'),
        ('CPU, 1 str: machine cores busy (of 2)', 'cpu_machine', '{:.2f}'),
        ('CPU, 1 str: tunnel processes, cores', 'cpu_tunnel', '{:.2f}'),
        ('CPU, 1 str: gateway end / client end, cores', 'cpu_gw_tcp1', 'gwcli:tcp1'),
        ('CPU, -R: gateway end / client end, cores', 'cpu_gw_tcpR', 'gwcli:tcpR'),
        ('CPU, 1 str: machine CPU-s per GB', 'cpu_machine_s_per_gb', '{:.2f}'),
        ('CPU, 1 str: tunnel CPU-s per GB', 'cpu_tunnel_s_per_gb', '{:.2f}'),
        ('steal % during 1 str', 'steal_pct', '{:.1f}'),
        ('UDP RcvbufErrors during 1 str: lap / gw (sum of reps)', 'udpdrop_lap_tcp1', 'lapgw:tcp1'),
        ('UDP RcvbufErrors during 4 str: lap / gw (sum of reps)', 'udpdrop_lap_tcp4', 'lapgw:tcp4'),
        ('UDP RcvbufErrors during -R: lap / gw (sum of reps)', 'udpdrop_lap_tcpR', 'lapgw:tcpR'),
        ('RSS idle MiB: gateway end / client end', 'rss_gw_idle', 'mem:idle'),
        ('RSS after the measures MiB: gateway / client', 'rss_gw_after', 'mem:after'),
        ('peak RSS (VmHWM) MiB: gateway / client', 'hwm_gw_after', 'mem:hwm'),
        ('FLOWS idle TCP flows: opened / reached pod / echoed', 'flows_opened', 'flows'),
        ('FLOWS flows: seconds to open', 'flows_open_s', '{:.1f}'),
        ('FLOWS flows: gateway RSS MiB (peak)', 'flows_rss_gw', 'flowsrss'),
        ('FLOWS flows: gateway CPU while idle, cores', 'flows_gw_idle_cores', '{:.3f}'),
        ('FLOWS flows: gateway RSS MiB after closing', 'flows_rss_gw_closed', '{:.1f}'),
        ('background load before each measure, cores (median / max)', 'bg_cores', 'max'),
    ]
    def cell(p, key, fmt):
        if fmt.startswith('gwcli:'):
            w = fmt.split(':')[1]
            a, b = num(p, f'cpu_gw_{w}', '{:.2f}'), num(p, f'cpu_cli_{w}', '{:.2f}')
            return '-' if a == b == '-' else f'{a} / {b}'
        if fmt.startswith('lapgw:'):
            w = fmt.split(':')[1]
            a, b = num(p, f'udpdrop_lap_{w}', 'sum'), num(p, f'udpdrop_gw_{w}', 'sum')
            return '-' if a == b == '-' else f'{a} / {b}'
        if fmt.startswith('mem:'):
            w = fmt.split(':')[1]
            k = {'idle': ('rss_gw_idle', 'rss_cli_idle'), 'after': ('rss_gw_after', 'rss_cli_after'),
                 'hwm': ('hwm_gw_after', 'hwm_cli_after')}[w]
            a, b = num(p, k[0], '{:.1f}'), num(p, k[1], '{:.1f}')
            return '-' if a == b == '-' else f'{a} / {b}'
        if fmt == 'flows':
            a, b, c = (num(p, k, '{:.0f}') for k in ('flows_opened', 'flows_in_pod', 'flows_echoed'))
            return '-' if a == b == c == '-' else f'{a} / {b} / {c}'
        if fmt == 'flowsrss':
            a, b = num(p, 'flows_rss_gw', '{:.1f}'), num(p, 'flows_hwm_gw', '{:.1f}')
            return '-' if a == b == '-' else f'{a} ({b})'
        return num(p, key, fmt)
    nflows = os.environ.get('FLOWS', '10000')
    order = [p for p in ['direct', 'burrow', 'burrow_framed', 'wggo', 'sshuttle', 'sshuttle_nlc', 'onetun'] if p in rows]
    order += [p for p in rows if p not in order]
    L = []
    L.append('# burrow data path vs peers (bench/e2e.sh)\n')
    L.append(meta.strip() + '\n')
    L.append('Medians of ' + os.environ.get('REPS', '3') + ' runs each. '
             'Client in `lap`, server `10.244.1.10` in `pod`, tunnel end in `gw`. '
             '"gateway end" is burrow-gateway / the gw wireguard-go, "client end" burrow up / the lap wireguard-go.\n')
    L.append('| metric | ' + ' | '.join(order) + ' |')
    L.append('|---|' + '---:|' * len(order))
    for title, key, fmt in cols:
        cells = [cell(p, key, fmt) for p in order]
        if all(c == '-' for c in cells): continue
        L.append(f'| {title.replace("FLOWS", nflows)} | ' + ' | '.join(cells) + ' |')
    L.append('')
    L += targets(rows, oks, nflows)
    L.append('Raw values (run order):\n')
    L.append('| path | metric | values |')
    L.append('|---|---|---|')
    for p in order:
        for m, vals in rows[p].items():
            L.append(f'| {p} | {m} | {" ".join(vals)} |')
    n = open(notes).read().strip()
    if n:
        L.append('\nNotes from the run:\n')
        L += ['- ' + x for x in n.splitlines()]
    open(out, 'w').write('\n'.join(L) + '\n')

def targets(rows, oks, nflows):
    """issue 3's targets for burrow, as ratios of medians"""
    if 'burrow' not in rows:
        return []
    def m(p, k):
        v = oks(p, k)
        return med(v) if v else None
    def ratio(a, b):
        return a / b if a is not None and b else None
    def fmt(x, d=2):
        return '-' if x is None else f'{x:.{d}f}'
    def verdict(ok):
        return 'n/a' if ok is None else ('**met**' if ok else '**missed**')
    T = []
    r = ratio(m('burrow', 'tcp1'), m('wggo', 'tcp1'))
    T.append(('single-stream TCP >= 3x wireguard-go', f'{fmt(r)}x ({fmt(m("burrow", "tcp1"), 3)} vs {fmt(m("wggo", "tcp1"), 3)} Gbit/s)',
              None if r is None else r >= 3))
    r = ratio(m('burrow', 'tcp1'), m('sshuttle', 'tcp1'))
    T.append(('single-stream TCP >= 10x sshuttle', f'{fmt(r)}x ({fmt(m("burrow", "tcp1"), 3)} vs {fmt(m("sshuttle", "tcp1"), 3)} Gbit/s)',
              None if r is None else r >= 10))
    r = ratio(m('burrow', 'lat_p50'), m('wggo', 'lat_p50'))
    T.append(('1 KiB request p50 <= 1.0x wireguard-go', f'{fmt(r)}x ({fmt(m("burrow", "lat_p50"), 0)} vs {fmt(m("wggo", "lat_p50"), 0)} us)',
              None if r is None else r <= 1.0))
    r = ratio(m('burrow', 'conn_rps'), m('wggo', 'conn_rps'))
    T.append(('new connections/s >= 1.5x wireguard-go', f'{fmt(r)}x ({fmt(m("burrow", "conn_rps"), 0)} vs {fmt(m("wggo", "conn_rps"), 0)} /s)',
              None if r is None else r >= 1.5))
    lap, gw = oks('burrow', 'udpdrop_lap_tcp1'), oks('burrow', 'udpdrop_gw_tcp1')
    ok = None if not (lap or gw) else sum(lap) + sum(gw) == 0
    T.append(('no UDP receive-buffer drops under a single bulk stream',
              f'lap {sum(lap):.0f} + gw {sum(gw):.0f} RcvbufErrors over {len(lap)} runs', ok))
    o, pod, rss, hwm = m('burrow', 'flows_opened'), m('burrow', 'flows_in_pod'), m('burrow', 'flows_rss_gw'), m('burrow', 'flows_hwm_gw')
    peak = max(x for x in (rss, hwm) if x is not None) if (rss is not None or hwm is not None) else None
    ok = None if peak is None else (peak <= 150 and pod is not None and pod >= int(nflows))
    T.append((f'{nflows} idle TCP flows, gateway RSS <= 150 MiB',
              f'{fmt(pod, 0)} flows in pod, RSS {fmt(rss, 1)} MiB (peak {fmt(hwm, 1)})', ok))
    g = m('burrow', 'rss_gw_idle')
    T.append(('idle RSS gateway <= 20 MiB', f'{fmt(g, 1)} MiB', None if g is None else g <= 20))
    c = m('burrow', 'rss_cli_idle')
    T.append(('idle RSS client <= 30 MiB', f'{fmt(c, 1)} MiB', None if c is None else c <= 30))
    L = ['Issue 3 targets (burrow, medians of the same run):\n', '| target | measured | |', '|---|---|---|']
    L += [f'| {a} | {b} | {verdict(c)} |' for a, b, c in T]
    L.append('')
    return L

if __name__ == '__main__':
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == 'snap': snap(args)
    elif cmd == 'cpu': cpu(*args)
    elif cmd == 'tsnap': tsnap(args)
    elif cmd == 'tcpu': tcpu(*args)
    elif cmd == 'idle': idle(*args)
    elif cmd == 'iperf': iperf(*args)
    elif cmd == 'wrk': wrk(*args)
    elif cmd == 'echo': echo(*args)
    elif cmd == 'flows_server': flows_server(*args)
    elif cmd == 'flows_client': flows_client(*args)
    elif cmd == 'report': report(*args)
PYEOF
H() { "$PY" "$WORK/h.py" "$@"; }

# ---------------------------------------------------------------- topology
bg() {   # bg NS LOGNAME cmd... : start a background process inside NS, remember its pid
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
  local p=$!
  PIDS+=("$p"); echo "$p" >"$WORK/$name.pid"
}
wait_for() {  # wait_for SECONDS cmd... : poll until cmd succeeds
  local t=$1; shift; local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && return 1
    sleep 0.2
  done
}
tcp_open() { inns "$1" timeout 2 bash -c "exec 3<>/dev/tcp/$2/$3" ; }

build_topology() {
  teardown_ns   # leftovers of an earlier run
  log "building namespaces $NS_LAP / $NS_GW / $NS_POD"
  ip netns add "$NS_LAP"; ip netns add "$NS_GW"; ip netns add "$NS_POD"
  if [ "$DELAY_MS" != 0 ]; then
    case $DELAY_EMU in
      netem) WIRE=0 ;;
      wire) WIRE=1 ;;
      auto)  # sch_netem present? (a probe on lap's loopback, removed at once)
        if inns "$NS_LAP" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
          inns "$NS_LAP" tc qdisc del dev lo root; WIRE=0
        else WIRE=1; fi ;;
      *) echo "DELAY_EMU is auto, netem or wire" >&2; exit 1 ;;
    esac
  fi
  if [ "$WIRE" = 1 ]; then
    [ -x "$WIRE_BIN" ] || { echo "DELAY_MS without sch_netem needs mc-wire ($WIRE_BIN): cargo build --release -p burrow-tests --bin mc-wire" >&2; exit 1; }
    command -v ethtool >/dev/null 2>&1 || [ -x /usr/sbin/ethtool ] ||
      timeout 600 apt-get install -y --no-install-recommends ethtool >>"$WORK/apt.log" 2>&1 ||
      { echo "DELAY_MS with mc-wire needs ethtool" >&2; exit 1; }
    ip netns add "$NS_WAN"
    # the wire's namespace must not take part: no IPv6 (no link-local chatter),
    # no forwarding, and no address is ever given to its interfaces
    inns "$NS_WAN" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    inns "$NS_WAN" sysctl -qw net.ipv6.conf.default.disable_ipv6=1
    inns "$NS_WAN" sysctl -qw net.ipv4.ip_forward=0
    ip link add lap0 netns "$NS_LAP" type veth peer name wan-lap netns "$NS_WAN"
    ip link add gw0 netns "$NS_GW" type veth peer name wan-gw netns "$NS_WAN"
    inns "$NS_WAN" ip link set lo up
    local i
    for i in lap0:"$NS_LAP" gw0:"$NS_GW" wan-lap:"$NS_WAN" wan-gw:"$NS_WAN"; do
      # frames of at most the MTU with their checksums filled in: mc-wire moves
      # them one by one (a TSO/GSO or checksum-partial frame would not cross)
      inns "${i#*:}" ethtool -K "${i%%:*}" tx off tso off gso off gro off >/dev/null 2>&1 ||
        { echo "ethtool -K ${i%%:*} failed" >&2; exit 1; }
    done
    inns "$NS_WAN" ip link set wan-lap up
    inns "$NS_WAN" ip link set wan-gw up
    [ -z "$(inns "$NS_WAN" ip -br addr show | awk '$1 != "lo" && $3 != ""')" ] ||
      { echo "the wire's namespace has addresses" >&2; exit 1; }
    # real-time priority (WIRE_RT, 0: none): on a busy machine a descheduled wire
    # would add its wait to the link's delay; it sleeps in poll between frames
    if [ "${WIRE_RT:-20}" != 0 ]; then
      bg "$NS_WAN" wire chrt -f "${WIRE_RT:-20}" "$WIRE_BIN" --a wan-lap --b wan-gw --delay-ms "$DELAY_MS"
    else
      bg "$NS_WAN" wire "$WIRE_BIN" --a wan-lap --b wan-gw --delay-ms "$DELAY_MS"
    fi
  else
    ip link add lap0 netns "$NS_LAP" type veth peer name gw0 netns "$NS_GW"
  fi
  ip link add gwp netns "$NS_GW" type veth peer name pod0 netns "$NS_POD"
  inns "$NS_LAP" ip addr add 192.168.77.1/24 dev lap0
  inns "$NS_GW"  ip addr add 192.168.77.2/24 dev gw0
  inns "$NS_GW"  ip addr add 10.244.1.1/24 dev gwp
  inns "$NS_POD" ip addr add 10.244.1.10/24 dev pod0
  for ns in "$NS_LAP" "$NS_GW" "$NS_POD"; do inns "$ns" ip link set lo up; done
  inns "$NS_LAP" ip link set lap0 up
  inns "$NS_GW"  ip link set gw0 up
  inns "$NS_GW"  ip link set gwp up
  inns "$NS_POD" ip link set pod0 up
  inns "$NS_POD" ip route add default via 10.244.1.1
  inns "$NS_GW"  sysctl -qw net.ipv4.ip_forward=1
  for ns in "$NS_LAP" "$NS_GW" "$NS_POD"; do
    inns "$ns" sysctl -qw net.ipv4.tcp_tw_reuse=1
    inns "$ns" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
  done
  inns "$NS_GW" iptables -t nat -A POSTROUTING -s 10.99.0.0/24 -o gwp -j MASQUERADE
}

start_pod_services() {
  log "pod: iperf3, nginx, socat echo"
  mkdir -p "$WORK/nginx-tmp"
  head -c 1024 /dev/urandom >"$WWW/1k"
  head -c $((100 * 1024 * 1024)) /dev/urandom >"$WWW/100m"
  cat >"$WORK/nginx.conf" <<EOF
user root;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 10000000; keepalive_timeout 65;
  default_type application/octet-stream;
  client_body_temp_path $WORK/nginx-tmp/body; proxy_temp_path $WORK/nginx-tmp/proxy;
  fastcgi_temp_path $WORK/nginx-tmp/fcgi; uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
  scgi_temp_path $WORK/nginx-tmp/scgi;
  server { listen $POD_IP:80 backlog=4096; root $WWW; }
}
EOF
  bg "$NS_POD" nginx nginx -c "$WORK/nginx.conf" -g 'daemon off;'
  bg "$NS_POD" iperf3 iperf3 -s -B "$POD_IP" -p 5201 --idle-timeout 60
  bg "$NS_POD" socat socat TCP-LISTEN:7,bind=$POD_IP,reuseaddr,fork,backlog=128 PIPE
  inns "$NS_POD" sysctl -qw net.core.somaxconn=4096
  wait_for 10 tcp_open "$NS_POD" "$POD_IP" 80 && wait_for 10 tcp_open "$NS_POD" "$POD_IP" 5201 &&
    wait_for 10 tcp_open "$NS_POD" "$POD_IP" 7 || { echo "pod services did not start" >&2; exit 1; }
}
listening() { inns "$1" ss -Hltn "sport = :$2" | grep -q .; }
listening_udp() { inns "$1" ss -Hlun "sport = :$2" | grep -q .; }
restart_iperf_server() {
  local p; p=$(cat "$WORK/iperf3.pid")
  kill "$p" 2>/dev/null; wait "$p" 2>/dev/null
  bg "$NS_POD" iperf3 iperf3 -s -B "$POD_IP" -p 5201 --idle-timeout 60
  wait_for 10 listening "$NS_POD" 5201
}

start_gw_wireguard() {
  log "gw: wireguard-go wgg"
  umask 077
  for k in gw lap onetun bgw blap; do wg genkey >"$WORK/$k.key"; wg pubkey <"$WORK/$k.key" >"$WORK/$k.pub"; done
  umask 022
  bg "$NS_GW" wg-gw env WG_PROCESS_FOREGROUND=1 wireguard-go -f wgg
  wait_for 10 inns "$NS_GW" ip link show wgg || { echo "wireguard-go (gw) did not start" >&2; exit 1; }
  inns "$NS_GW" wg set wgg listen-port $WG_PORT private-key "$WORK/gw.key" \
    peer "$(cat "$WORK/lap.pub")" allowed-ips 10.99.0.1/32 \
    peer "$(cat "$WORK/onetun.pub")" allowed-ips 10.99.0.3/32
  inns "$NS_GW" ip addr add 10.99.0.2/24 dev wgg
  inns "$NS_GW" ip link set wgg mtu 1420 up
}

# ---------------------------------------------------------------- per-path setup
# Each sets T_HOST/T_IPERF/T_HTTP/T_ECHO (what the client in lap dials),
# TUN_ROOTS (pids whose process trees are the tunnel, for CPU accounting) and
# SPLIT ("gw=<pid> cli=<pid>": the two tunnel ends, for per-process/thread CPU).
T_HOST=$POD_IP T_IPERF=5201 T_HTTP=80 T_ECHO=7 TUN_ROOTS="" SPLIT=""

setup_direct() {
  inns "$NS_LAP" ip route add 10.244.0.0/16 via "$GW_LAP_IP"
  T_HOST=$POD_IP T_IPERF=5201 T_HTTP=80 T_ECHO=7 TUN_ROOTS="" SPLIT=""
}
teardown_direct() { inns "$NS_LAP" ip route del 10.244.0.0/16 2>/dev/null; }

rcvbuf_errors() {  # rcvbuf_errors NS : cumulative UDP RcvbufErrors of the namespace
  inns "$1" awk '/^Udp:/{if(!h){for(i=1;i<=NF;i++)k[i]=$i;h=1}else{for(i=1;i<=NF;i++)if(k[i]=="RcvbufErrors")print $i}}' /proc/net/snmp
}
udp_drops() {  # UDP receive-buffer overflows (cumulative) of the sockets in lap and gw
  local ns
  for ns in "$NS_LAP" "$NS_GW"; do
    echo "UDP RcvbufErrors in $ns $1 (cumulative): $(rcvbuf_errors "$ns")"
  done >>"$NOTES"
}
mib() {  # mib PID FIELD : VmRSS / VmHWM of a process in MiB
  awk -v f="$2:" '$1==f{printf "%.1f\n", $2/1024; found=1} END{if(!found)print "FAIL"}' "/proc/$1/status" 2>/dev/null || echo FAIL
}
rec_mem() {  # rec_mem PATH WHEN : RSS (and peak) of both tunnel ends
  local p=$1 when=$2 gw cli
  gw=${SPLIT#gw=}; gw=${gw%% *}; cli=${SPLIT##*cli=}
  [ -n "$gw" ] && rec "$p" "rss_gw_$when" 1 "$(mib "$gw" VmRSS)"
  [ -n "$cli" ] && rec "$p" "rss_cli_$when" 1 "$(mib "$cli" VmRSS)"
  if [ "$when" = after ]; then
    [ -n "$gw" ] && rec "$p" hwm_gw_after 1 "$(mib "$gw" VmHWM)"
    [ -n "$cli" ] && rec "$p" hwm_cli_after 1 "$(mib "$cli" VmHWM)"
  fi
  log "  $p RSS $when: gateway end $(mib "$gw" VmRSS) MiB, client end $(mib "$cli" VmRSS) MiB"
}

setup_wggo() {
  bg "$NS_LAP" wg-lap env WG_PROCESS_FOREGROUND=1 wireguard-go -f wgl
  wait_for 10 inns "$NS_LAP" ip link show wgl || return 1
  inns "$NS_LAP" wg set wgl private-key "$WORK/lap.key" \
    peer "$(cat "$WORK/gw.pub")" endpoint "$GW_LAP_IP:$WG_PORT" \
    allowed-ips 10.99.0.0/24,10.244.0.0/16 persistent-keepalive 25
  inns "$NS_LAP" ip addr add 10.99.0.1/24 dev wgl
  inns "$NS_LAP" ip link set wgl mtu 1420 up
  inns "$NS_LAP" ip route add 10.244.0.0/16 dev wgl
  T_HOST=$POD_IP T_IPERF=5201 T_HTTP=80 T_ECHO=7
  TUN_ROOTS="$(cat "$WORK/wg-lap.pid") $(cat "$WORK/wg-gw.pid")"
  SPLIT="gw=$(cat "$WORK/wg-gw.pid") cli=$(cat "$WORK/wg-lap.pid")"
  wait_for 15 tcp_open "$NS_LAP" "$POD_IP" 7 || return 1
  sleep 2; rec_mem wggo idle
}
post_wggo() { rec_mem wggo after; }
teardown_wggo() {
  inns "$NS_LAP" wg show wgl transfer 2>/dev/null |
    awk '{printf "wggo: lap wireguard-go counters: rx=%s tx=%s bytes\n", $2, $3}' >>"$NOTES"
  udp_drops "after wggo"
  kill "$(cat "$WORK/wg-lap.pid")" 2>/dev/null; sleep 0.5
  inns "$NS_LAP" ip link del wgl 2>/dev/null; SPLIT=""; true
}

start_sshd() {
  [ -f "$WORK/ssh/sshd_config" ] && return 0
  log "gw: sshd on $GW_LAP_IP:22"
  mkdir -p "$WORK/ssh" /run/sshd
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/id_ed25519"
  cp "$WORK/ssh/id_ed25519.pub" "$WORK/ssh/authorized_keys"
  cat >"$WORK/ssh/sshd_config" <<EOF
ListenAddress $GW_LAP_IP
Port 22
HostKey $WORK/ssh/host_ed25519
PidFile $WORK/ssh/sshd.pid
AuthorizedKeysFile $WORK/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
EOF
  bg "$NS_GW" sshd /usr/sbin/sshd -D -e -f "$WORK/ssh/sshd_config"
  wait_for 10 tcp_open "$NS_GW" "$GW_LAP_IP" 22
}
SSHUTTLE_EXTRA=""
setup_sshuttle() {
  start_sshd || return 1
  # lap needs a route so connect() gets as far as sshuttle's nat REDIRECT; gw stops
  # forwarding so that a packet that escaped sshuttle would be dropped, not measured
  inns "$NS_LAP" ip route add 10.244.0.0/16 via "$GW_LAP_IP"
  inns "$NS_GW" sysctl -qw net.ipv4.ip_forward=0
  bg "$NS_LAP" sshuttle sshuttle $SSHUTTLE_EXTRA -r "root@$GW_LAP_IP" 10.244.0.0/16 \
    -e "ssh -i $WORK/ssh/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
  wait_for 30 grep -q "Connected" "$WORK/sshuttle.log" || { tail -5 "$WORK/sshuttle.log" >&2; return 1; }
  T_HOST=$POD_IP T_IPERF=5201 T_HTTP=80 T_ECHO=7
  TUN_ROOTS="$(cat "$WORK/sshuttle.pid") $(cat "$WORK/sshd.pid")"
  wait_for 15 tcp_open "$NS_LAP" "$POD_IP" 7
}
teardown_sshuttle() {
  kill -INT "$(cat "$WORK/sshuttle.pid")" 2>/dev/null   # lets sshuttle remove its iptables rules
  local i; for i in $(seq 50); do kill -0 "$(cat "$WORK/sshuttle.pid")" 2>/dev/null || break; sleep 0.2; done
  kill "$(cat "$WORK/sshuttle.pid")" 2>/dev/null
  inns "$NS_LAP" ip route del 10.244.0.0/16 2>/dev/null
  # sshuttle removes its own nat rules on exit; make sure nothing is left in lap
  inns "$NS_LAP" iptables -t nat -F; inns "$NS_LAP" iptables -t nat -X
  inns "$NS_GW" sysctl -qw net.ipv4.ip_forward=1; true
}
setup_sshuttle_nlc() { SSHUTTLE_EXTRA=--no-latency-control; setup_sshuttle; }
teardown_sshuttle_nlc() { teardown_sshuttle; SSHUTTLE_EXTRA=""; }

start_onetun() {
  bg "$NS_LAP" onetun "$ONETUN" \
    127.0.0.1:15201:$POD_IP:5201:TCP 127.0.0.1:18080:$POD_IP:80:TCP 127.0.0.1:10007:$POD_IP:7:TCP \
    --endpoint-addr "$GW_LAP_IP:$WG_PORT" --endpoint-public-key "$(cat "$WORK/gw.pub")" \
    --private-key-file "$WORK/onetun.key" --source-peer-ip 10.99.0.3 --keep-alive 10 --log info
  TUN_ROOTS="$(cat "$WORK/onetun.pid") $(cat "$WORK/wg-gw.pid")"
  SPLIT="gw=$(cat "$WORK/wg-gw.pid") cli=$(cat "$WORK/onetun.pid")"
  wait_for 15 tcp_open "$NS_LAP" 127.0.0.1 18080
}
stop_onetun() {
  local p; p=$(cat "$WORK/onetun.pid" 2>/dev/null) || return 0
  kill "$p" 2>/dev/null; wait "$p" 2>/dev/null
  cat "$WORK/onetun.log" >>"$WORK/onetun-all.log" 2>/dev/null; rm -f "$WORK/onetun.pid"
}
setup_onetun() {
  [ -n "$ONETUN" ] || { echo "onetun binary missing" >"$WORK/onetun.log"; return 1; }
  T_HOST=127.0.0.1 T_IPERF=15201 T_HTTP=18080 T_ECHO=10007
  start_onetun || return 1
  sleep 1
  # a forwarded connection must really reach the pod: check one echo
  inns "$NS_LAP" timeout 10 "$PY" "$WORK/h.py" echo 127.0.0.1 10007 10 >/dev/null
}
# onetun 0.3.10 stops forwarding for good once a reader of its internal event bus
# (tokio broadcast, capacity 1000) lags ("Failed to read event bus"), which a bulk
# upload triggers; so every measure gets a fresh onetun, and lags are noted.
fresh_onetun() { stop_onetun; start_onetun; sleep 0.5; }
after_onetun() {
  local what=$1 n
  n=$(grep -c "Failed to read event bus" "$WORK/onetun.log" 2>/dev/null); n=${n:-0}
  [ "$n" -gt 0 ] && echo "onetun $what: event bus lagged ($n x 'Failed to read event bus'); forwarding stalled" >>"$NOTES"
  true
}
teardown_onetun() {
  udp_drops "after onetun"
  inns "$NS_GW" wg show wgg transfer 2>/dev/null | grep "^$(cat "$WORK/onetun.pub")" |
    awk '{printf "onetun: gw wireguard-go counters for the onetun peer: rx=%s tx=%s bytes\n", $2, $3}' >>"$NOTES"
  stop_onetun; cp "$WORK/onetun-all.log" "$WORK/onetun.log" 2>/dev/null; SPLIT=""; true
}

# ---- burrow: burrow-gateway in gw (unprivileged), `burrow up` in lap
B_GW_PID="" B_CLI_PID=""
B_RUN=$WORK/burrow-run
setup_burrow() {
  need_burrow || { echo "burrow binaries missing in $BURROW_BIN_DIR" >"$WORK/burrow.log"; return 1; }
  # the gateway terminates TCP and dials the pod itself: no kernel forwarding in gw
  inns "$NS_GW" sysctl -qw net.ipv4.ip_forward=0
  cat >"$GWDIR/gw.conf" <<EOF
[Interface]
PrivateKey = $(cat "$WORK/bgw.key")

[Peer]
PublicKey = $(cat "$WORK/blap.pub")
AllowedIPs = $B_LAP_IP/32
EOF
  chown "$B_UID:$B_UID" "$GWDIR/gw.conf"; chmod 600 "$GWDIR/gw.conf"
  cat >"$WORK/burrow-lap.conf" <<EOF
[Interface]
PrivateKey = $(cat "$WORK/blap.key")
Address = $B_LAP_IP/32
MTU = 1420

[Peer]
PublicKey = $(cat "$WORK/bgw.pub")
Endpoint = $GW_LAP_IP:${B_ENDPOINT_PORT:-$B_WG_PORT}
AllowedIPs = 10.244.0.0/16
PersistentKeepalive = 25
EOF
  chmod 600 "$WORK/burrow-lap.conf"
  # uid/gid 65532, no supplementary groups, no capabilities (effective, permitted,
  # inheritable, ambient, bounding), no_new_privs; only the fd limit is raised first
  bg "$NS_GW" burrow-gw bash -c "ulimit -n $NOFILE && exec setpriv --reuid=$B_UID --regid=$B_UID --clear-groups \
    --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs \
    '$BURROW_GW' --config '$GWDIR/gw.conf' --wg-port $B_WG_PORT --framed-port $B_FRAMED_PORT \
    --metrics-port $B_METRICS_PORT --max-tcp-flows-per-laptop $B_TCP_CAP ${B_GW_ARGS:-}"
  B_GW_PID=$(cat "$WORK/burrow-gw.pid")
  wait_for 10 listening "$NS_GW" "$B_METRICS_PORT" || { tail -5 "$WORK/burrow-gw.log" >&2; return 1; }
  echo "burrow-gateway runs as $(awk '/^Uid:/{printf "uid %s", $2} /^CapEff:/{printf ", CapEff %s", $2} /^CapBnd:/{printf ", CapBnd %s", $2} /^NoNewPrivs:/{printf ", NoNewPrivs %s", $2}' "/proc/$B_GW_PID/status"), fd limit $(awk '/open files/{print $4}' "/proc/$B_GW_PID/limits")" >>"$NOTES"
  mkdir -p "$B_RUN"
  # shellcheck disable=SC2086
  inns "$NS_LAP" "$BURROW" up --wg-config "$WORK/burrow-lap.conf" --name "$B_IF" --background \
    --run-dir "$B_RUN" ${B_UP_ARGS:-} >>"$WORK/burrow.log" 2>&1 || { tail -5 "$WORK/burrow.log" "$B_RUN/up-$B_IF.log" >&2; return 1; }
  B_CLI_PID=$("$PY" -c "import json; print(json.load(open('$B_RUN/up-$B_IF.json'))['pid'])") || return 1
  T_HOST=$POD_IP T_IPERF=5201 T_HTTP=80 T_ECHO=7
  TUN_ROOTS="$B_GW_PID $B_CLI_PID"
  SPLIT="gw=$B_GW_PID cli=$B_CLI_PID"
  echo "burrow: lap routes: $(inns "$NS_LAP" ip -4 route | tr '\n' ';')" >>"$NOTES"
  wait_for 15 tcp_open "$NS_LAP" "$POD_IP" 7 || return 1
  sleep 2; rec_mem burrow idle
}
# burrow_framed: the same, over B_STREAMS (4) TCP connections to the gateway's framed
# port (what the port-forward transport reaches, without the API server): TCP in TCP
setup_burrow_framed() { B_ENDPOINT_PORT=$B_FRAMED_PORT B_UP_ARGS="--framed-streams ${B_STREAMS:-4}" setup_burrow; }
post_burrow_framed() { rec_mem burrow_framed after; }
teardown_burrow_framed() { teardown_burrow; }
b_metrics() { inns "$NS_GW" curl -s --max-time 5 "http://127.0.0.1:$B_METRICS_PORT/metrics"; }
post_burrow() {
  rec_mem burrow after
  inns "$NS_GW" ss -Huanm "sport = :$B_WG_PORT" | tr -s ' \n' ' ' | sed 's/^/burrow: gateway UDP socket: /' >>"$NOTES"; echo >>"$NOTES"
  # the only UDP socket in lap while this path is up is the client's
  inns "$NS_LAP" ss -Huanm | tr -s ' \n' ' ' | sed 's/^/burrow: client UDP socket: /' >>"$NOTES"; echo >>"$NOTES"
  [ "$FLOWS" -gt 0 ] && run_flows burrow
  true
}
teardown_burrow() {
  local m
  m=$(b_metrics)
  echo "burrow: gateway metrics at the end (non-zero drops/errors, totals): $(echo "$m" |
    grep -E '^burrow_gateway_(packets_dropped_total|dial_errors_total|flows_opened_total|wireguard_datagrams_total)' |
    awk '$NF != 0' | tr '\n' ';' | cut -c1-1500)" >>"$NOTES"
  udp_drops "after burrow"
  inns "$NS_LAP" "$BURROW" down --name "$B_IF" --run-dir "$B_RUN" >>"$WORK/burrow.log" 2>&1 ||
    echo "burrow down failed: $(tail -2 "$WORK/burrow.log" | tr '\n' ' ')" >>"$NOTES"
  inns "$NS_LAP" ip link show "$B_IF" >/dev/null 2>&1 && echo "burrow: $B_IF still exists after burrow down" >>"$NOTES"
  inns "$NS_LAP" ip -4 route | grep -q '^10\.244\.' && echo "burrow: a 10.244 route is left in lap after burrow down" >>"$NOTES"
  kill "$B_GW_PID" 2>/dev/null
  local i; for i in $(seq 25); do kill -0 "$B_GW_PID" 2>/dev/null || break; sleep 0.2; done
  cat "$B_RUN/up-$B_IF.log" >>"$WORK/burrow.log" 2>/dev/null
  inns "$NS_GW" sysctl -qw net.ipv4.ip_forward=1; SPLIT=""; true
}

# ---- FLOWS concurrent idle TCP flows through one gateway
run_flows() {
  local p=$1 gw=${SPLIT#gw=} line opened secs errs in_pod before after idle_cores echo_line
  gw=${gw%% *}
  log "  $p: $FLOWS idle TCP flows"
  quiet "$p" "flows"
  bg "$NS_POD" flows-srv bash -c "ulimit -n $NOFILE && exec $PY $WORK/h.py flows_server $POD_IP 9000"
  wait_for 10 listening "$NS_POD" 9000 || { echo "$p flows: server did not start" >>"$NOTES"; return; }
  rm -f "$WORK/flows.go"
  bg "$NS_LAP" flows-cli bash -c "ulimit -n $NOFILE && exec $PY $WORK/h.py flows_client $POD_IP 9000 $FLOWS $FLOWS_CONC $WORK/flows.go"
  if ! wait_for 400 grep -q '^OPEN' "$WORK/flows-cli.log"; then
    echo "$p flows: the client did not finish opening within 400 s: $(tail -c 300 "$WORK/flows-cli.log" | tr '\n' ' ')" >>"$NOTES"
    rec "$p" flows_opened 1 FAIL
  else
    read -r _ opened secs errs < <(grep '^OPEN' "$WORK/flows-cli.log")
    sleep 5
    in_pod=$(inns "$NS_POD" ss -Htn state established "( sport = :9000 )" | wc -l)
    rec "$p" flows_opened 1 "$opened"; rec "$p" flows_open_s 1 "$secs"; rec "$p" flows_in_pod 1 "$in_pod"
    rec "$p" flows_rss_gw 1 "$(mib "$gw" VmRSS)"; rec "$p" flows_hwm_gw 1 "$(mib "$gw" VmHWM)"
    echo "$p flows: opened $opened in $secs s (connect errors, retried: $errs); in pod $in_pod established; gateway: $(b_metrics | grep -E '^burrow_gateway_(flows_open|dials_pending)' | tr '\n' ' '), $(ls "/proc/$gw/fd" | wc -l) fds, threads $(ls "/proc/$gw/task" | wc -l)" >>"$NOTES"
    before=$(H snap "$gw"); sleep 10; after=$(H snap "$gw")
    idle_cores=$(H cpu "$before" "$after" 10 | awk '{print $2}')
    rec "$p" flows_gw_idle_cores 1 "$idle_cores"
    log "  $p flows: opened $opened in $secs s, $in_pod in pod, gateway RSS $(mib "$gw" VmRSS) MiB, idle CPU $idle_cores cores"
  fi
  touch "$WORK/flows.go"
  wait_for 120 grep -q '^ECHO' "$WORK/flows-cli.log"
  echo_line=$(grep '^ECHO' "$WORK/flows-cli.log")
  if [ -n "$echo_line" ]; then
    read -r _ ok alive esecs <<<"$echo_line"
    rec "$p" flows_echoed 1 "$ok"
    echo "$p flows: one byte echoed over $ok of $alive open flows in $esecs s" >>"$NOTES"
  else
    rec "$p" flows_echoed 1 FAIL
  fi
  wait_for 60 bash -c "! kill -0 $(cat "$WORK/flows-cli.pid") 2>/dev/null"
  kill "$(cat "$WORK/flows-cli.pid")" 2>/dev/null
  # wait (at most 60 s) until the gateway has let go of every flow
  local waited=0
  while [ $waited -lt 60 ] && ! b_metrics | grep -qx 'burrow_gateway_flows_open{proto="tcp"} 0'; do
    sleep 1; waited=$((waited + 1))
  done
  sleep 2
  rec "$p" flows_rss_gw_closed 1 "$(mib "$gw" VmRSS)"
  echo "$p flows: $waited s after the client exited, gateway: $(b_metrics | grep -E '^burrow_gateway_(flows_open|dials_pending)' | tr '\n' ' ')" >>"$NOTES"
  log "  $p flows: echoed $echo_line; gateway RSS after closing $(mib "$gw" VmRSS) MiB"
  kill "$(cat "$WORK/flows-srv.pid")" 2>/dev/null
}

# ---------------------------------------------------------------- measures
rec() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }

run_iperf() {  # run_iperf PATH METRIC REP extra-args...
  local path=$1 metric=$2 rep=$3; shift 3
  local j="$WORK/iperf-$path-$metric-$rep.json" before after res tb ta tc ub_lap ub_gw
  # a fresh iperf3 server each time: a stalled tunnel can leave the old one "busy"
  restart_iperf_server || log "  iperf3 server restart failed"
  ub_lap=$(rcvbuf_errors "$NS_LAP"); ub_gw=$(rcvbuf_errors "$NS_GW")
  [ -n "$SPLIT" ] && tb=$(H tsnap $SPLIT)
  before=$(H snap $TUN_ROOTS)
  inns "$NS_LAP" timeout $((DUR + 20)) iperf3 -c "$T_HOST" -p "$T_IPERF" -t "$DUR" -J \
    --connect-timeout 5000 "$@" >"$j" 2>>"$WORK/iperf-client.err"
  after=$(H snap $TUN_ROOTS)
  [ -n "$SPLIT" ] && ta=$(H tsnap $SPLIT)
  rec "$path" "udpdrop_lap_$metric" "$rep" $(( $(rcvbuf_errors "$NS_LAP") - ub_lap ))
  rec "$path" "udpdrop_gw_$metric" "$rep" $(( $(rcvbuf_errors "$NS_GW") - ub_gw ))
  res=$(H iperf "$j")
  rec "$path" "$metric" "$rep" "${res%% *}"
  case $res in
    FAIL*) echo "$path $metric rep $rep: iperf3 failed: ${res#FAIL }" >>"$NOTES"; restart_iperf_server ;;
    *) rec "$path" "${metric}_retr" "$rep" "${res##* }"
       if [ "$metric" = tcp1 ]; then
         read -r m t st < <(H cpu "$before" "$after" "$DUR")
         rec "$path" cpu_machine "$rep" "$m"; rec "$path" cpu_tunnel "$rep" "$t"; rec "$path" steal_pct "$rep" "$st"
         # CPU-seconds per GB carried (GB = 1e9 bytes): cores * 8 / (Gbit/s)
         rec "$path" cpu_machine_s_per_gb "$rep" "$("$PY" -c "g=${res%% *}; print(round($m*8/g,2) if g>0 else 'FAIL')")"
         rec "$path" cpu_tunnel_s_per_gb "$rep" "$("$PY" -c "g=${res%% *}; print(round($t*8/g,2) if g>0 else 'FAIL')")"
       fi
       if [ -n "$SPLIT" ]; then
         tc=$(H tcpu "$tb" "$ta" "$DUR")
         local kv
         for kv in $(echo "$tc" | head -1); do rec "$path" "cpu_${kv%%=*}_$metric" "$rep" "${kv#*=}"; done
         [ "$path" = burrow ] && echo "burrow $metric #$rep per-thread cores: $(echo "$tc" | tail -1)" >>"$NOTES"
       fi ;;
  esac
  log "  $path $metric #$rep: $res"
  sleep 1
}

run_wrk_lat() {
  local path=$1 rep=$2 o="$WORK/wrk-lat-$1-$2.txt" res
  inns "$NS_LAP" timeout $((DUR + 20)) wrk -t1 -c1 -d"${DUR}s" --timeout 5s --latency \
    "http://$T_HOST:$T_HTTP/1k" >"$o" 2>&1
  res=$(H wrk "$o")
  log "  $path wrk c1 #$rep: rps p50 p99 errs non2xx = $res"
  case $res in
    FAIL*) rec "$path" lat_rps "$rep" FAIL; rec "$path" lat_p50 "$rep" FAIL; rec "$path" lat_p99 "$rep" FAIL
           echo "$path wrk c1 rep $rep failed: $(tail -c 200 "$o" | tr '\n' ' ')" >>"$NOTES" ;;
    *) read -r rps p50 p99 errs non2xx <<<"$res"
       rec "$path" lat_rps "$rep" "$rps"; rec "$path" lat_p50 "$rep" "$p50"; rec "$path" lat_p99 "$rep" "$p99"
       [ "$errs$non2xx" = 00 ] || echo "$path wrk c1 rep $rep: socket errors $errs, non-2xx $non2xx" >>"$NOTES" ;;
  esac
  sleep 1
}

run_wrk_conn() {
  local path=$1 rep=$2 o="$WORK/wrk-conn-$1-$2.txt" res tb ta
  [ "$path" = burrow ] && tb=$(H tsnap $SPLIT)
  inns "$NS_LAP" timeout $((DUR + 20)) wrk -t1 -c50 -d"${DUR}s" --timeout 5s -H 'Connection: close' \
    "http://$T_HOST:$T_HTTP/1k" >"$o" 2>&1
  [ "$path" = burrow ] && { ta=$(H tsnap $SPLIT)
    echo "burrow conn #$rep per-thread cores: $(H tcpu "$tb" "$ta" "$DUR" | tail -1)" >>"$NOTES"; }
  res=$(H wrk "$o")
  log "  $path wrk c50 close #$rep: rps p50 p99 errs non2xx = $res"
  case $res in
    FAIL*) rec "$path" conn_rps "$rep" FAIL
           echo "$path wrk c50 close rep $rep failed: $(tail -c 200 "$o" | tr '\n' ' ')" >>"$NOTES" ;;
    *) read -r rps p50 p99 errs non2xx <<<"$res"
       rec "$path" conn_rps "$rep" "$rps"
       [ "$errs$non2xx" = 00 ] || echo "$path wrk c50 close rep $rep: socket errors $errs, non-2xx $non2xx" >>"$NOTES" ;;
  esac
  sleep 2
}

run_echo() {
  local path=$1 rep=$2 res
  # ECHO_N rounds (+100 to warm up): 60 s for them, plus 4 RTTs a round with DELAY_MS
  res=$(inns "$NS_LAP" timeout "$(awk -v n="$ECHO_N" -v d="$DELAY_MS" 'BEGIN {printf "%d", 60 + (n + 100) * 8 * d / 1000}')" \
    "$PY" "$WORK/h.py" echo "$T_HOST" "$T_ECHO" "$ECHO_N" 2>&1) || res="FAIL $res"
  log "  $path echo #$rep: p50 p99 us = $res"
  case $res in
    FAIL*) rec "$path" echo_p50 "$rep" FAIL; rec "$path" echo_p99 "$rep" FAIL
           echo "$path echo rep $rep failed: $(echo "$res" | tail -1)" >>"$NOTES" ;;
    *) rec "$path" echo_p50 "$rep" "${res%% *}"; rec "$path" echo_p99 "$rep" "${res##* }" ;;
  esac
}

run_get() {
  local path=$1 rep=$2 res
  res=$(inns "$NS_LAP" timeout 90 curl -s -o /dev/null --max-time 80 -w '%{http_code} %{speed_download} %{size_download}' \
    "http://$T_HOST:$T_HTTP/100m" 2>&1)
  log "  $path GET 100MiB #$rep: code B/s bytes = $res"
  read -r code speed size <<<"$res"
  if [ "$code" = 200 ] && [ "$size" = $((100 * 1024 * 1024)) ]; then
    rec "$path" get100m "$rep" "$("$PY" -c "print(round($speed/1e6,1))")"
  else
    rec "$path" get100m "$rep" FAIL; echo "$path GET 100MiB rep $rep failed: $res" >>"$NOTES"
  fi
}

QUIET_CORES=${QUIET_CORES:-0.3}   # background load (cores busy) under which a measure may start
QUIET_WAIT=${QUIET_WAIT:-120}     # seconds to wait for that at most, before each measure
quiet() {  # quiet PATH LABEL : wait until the machine is quiet, record the background load
  local p=$1 label=$2 end=$((SECONDS + QUIET_WAIT)) out busy
  while :; do
    out=$(H idle 1); busy=${out%% *}
    "$PY" -c "import sys; sys.exit(0 if $busy <= $QUIET_CORES else 1)" && break
    if [ $SECONDS -ge $end ]; then
      echo "$p $label: started although the machine was busy ($busy cores in use by other processes)" >>"$NOTES"; break
    fi
    log "  background load $busy cores; waiting"; sleep 2
  done
  rec "$p" bg_cores 0 "$busy"
}
hooked() {  # hooked PATH LABEL cmd... : optional fresh_PATH before and after_PATH after a measure
  local p=$1 label=$2; shift 2
  if declare -F "fresh_$p" >/dev/null; then "fresh_$p" || log "  $p: fresh start failed"; fi
  quiet "$p" "$label"
  "$@"
  if declare -F "after_$p" >/dev/null; then "after_$p" "$label"; fi
}
m_on() { case " $MEASURES " in *" $1 "*) return 0 ;; esac; return 1; }
measure_path() {
  local p=$1 rep
  log "== $p: setup"
  if ! "setup_$p"; then
    log "== $p: setup FAILED"
    echo "$p: setup failed (log tail: $(tail -c 300 "$WORK/$p.log" "$WORK/sshuttle.log" "$WORK/burrow-gw.log" 2>/dev/null | tr '\n' ' '))" >>"$NOTES"
    for m in tcp1 tcp4 tcpR lat_p50 lat_p99 lat_rps conn_rps echo_p50 echo_p99 get100m; do rec "$p" "$m" 0 FAIL; done
    "teardown_$p"; return
  fi
  for rep in $(seq "$REPS"); do
    m_on tcp1 && hooked "$p" "tcp1 #$rep" run_iperf "$p" tcp1 "$rep"
    m_on tcp4 && hooked "$p" "tcp4 #$rep" run_iperf "$p" tcp4 "$rep" -P 4
    m_on tcpR && hooked "$p" "tcpR #$rep" run_iperf "$p" tcpR "$rep" -R
    m_on wrk-c1 && hooked "$p" "wrk-c1 #$rep" run_wrk_lat "$p" "$rep"
    m_on wrk-conn && hooked "$p" "wrk-conn #$rep" run_wrk_conn "$p" "$rep"
    m_on echo && hooked "$p" "echo #$rep" run_echo "$p" "$rep"
    m_on get100m && hooked "$p" "get100m #$rep" run_get "$p" "$rep"
  done
  if declare -F "post_$p" >/dev/null; then "post_$p"; fi
  log "== $p: teardown"
  "teardown_$p"
  local lf
  case $p in wggo) lf=wg-lap ;; sshuttle*) lf=sshuttle ;; burrow*) lf=burrow-gw ;; *) lf=$p ;; esac
  for lf in $lf $(case $p in burrow*) echo burrow ;; esac); do
    if [ -s "$WORK/$lf.log" ] && grep -qiE "error|panic" "$WORK/$lf.log"; then
      echo "$p: $lf log has $(grep -ciE "error|panic" "$WORK/$lf.log") error lines, most common: $(grep -iE "error|panic" "$WORK/$lf.log" | sed -E 's/^ *[0-9TZ:.-]+ +//; s/[0-9]+/N/g' | sort | uniq -c | sort -rn | head -2 | cut -c1-160 | tr -s ' \n' ' ')" >>"$NOTES"
    fi
    cp "$WORK/$lf.log" "$WORK/$p-run-$lf.log" 2>/dev/null
  done
  true
}

stop_wire() {  # end mc-wire and put its counts in the notes
  [ "$WIRE" = 1 ] && [ -s "$WORK/wire.pid" ] || return 0
  local p; p=$(cat "$WORK/wire.pid")
  # bg's pid is `ip netns exec`, which execs (chrt, which execs) mc-wire; it
  # stops within 50 ms
  kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null
  sed 's/^/wire: /' "$WORK/wire.log" >>"$NOTES"
}

REPORTED=0 T0=$SECONDS
write_report() {  # write_report [remark]
  local meta
  meta="Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Machine: nproc=$(nproc), kernel $(uname -r), $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//'), $(free -g | awk '/Mem:/{print $2}') GiB RAM.
Versions: $(iperf3 --version | head -1 | awk '{print $1, $2}'), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), $(nginx -v 2>&1 | sed 's/.*: //'), wireguard-go $(wireguard-go --version | head -1 | awk '{print $2}'), sshuttle $(sshuttle --version), $(ssh -V 2>&1 | cut -d, -f1)${ONETUN:+, onetun $("$ONETUN" --version 2>/dev/null | awk '{print $2}')}, $("$BURROW" --version 2>/dev/null) and $("$BURROW_GW" --version 2>/dev/null) from $BURROW_BIN_DIR.
Run took $(( (SECONDS - T0) / 60 )) min; DUR=${DUR}s per measure, REPS=$REPS, FLOWS=$FLOWS, underlay delay ${DELAY_MS:-0} ms and loss ${LOSS:-0} % each way. Produced by bench/e2e.sh (paths: $PATHS).${1:+ $1}"
  REPS=$REPS FLOWS=$FLOWS H report "$RAW" "$NOTES" "$RESULTS" "$meta"
  cp "$RAW" "${RESULTS%.md}-raw.tsv" 2>/dev/null || true
}

# ---------------------------------------------------------------- main
need_pkgs
case " $PATHS " in *" onetun "*) need_onetun ;; esac
case " $PATHS " in *" burrow "*) need_burrow || { echo "burrow binaries missing in $BURROW_BIN_DIR" >&2; exit 1; } ;; esac
build_topology
if [ "$DELAY_MS" != 0 ] && [ "$WIRE" = 0 ]; then
  # a delay each way on the underlay with sch_netem
  inns "$NS_LAP" tc qdisc add dev lap0 root netem delay "${DELAY_MS}ms" limit 100000 &&
    inns "$NS_GW" tc qdisc add dev gw0 root netem delay "${DELAY_MS}ms" limit 100000 ||
    { echo "tc netem failed (DELAY_EMU=wire uses mc-wire instead)" >&2; exit 1; }
fi
if [ "$DELAY_MS" != 0 ]; then
  # the emulated RTT, before any loss is added: expect 2 x DELAY_MS + the base
  inns "$NS_LAP" ping -q -n -c 1 -W 2 "$GW_LAP_IP" >/dev/null 2>&1   # ARP, which crosses too
  rtt=$(inns "$NS_LAP" ping -q -n -c 20 -i 0.05 -W 2 "$GW_LAP_IP" 2>&1 |
    awk -F' = ' '/^rtt|^round-trip/{split($2, a, "/"); print a[2] " ms avg, " a[1] " min, " a[3] " max (20 pings)"}')
  [ -n "$rtt" ] || { echo "no ping across the delayed underlay" >&2; exit 1; }
  log "underlay RTT: $rtt"
  echo "underlay delay by $([ "$WIRE" = 1 ] && echo "mc-wire (userspace, AF_PACKET; offloads off on lap0/gw0)" || echo "tc netem"); ping lap -> gw RTT: $rtt" >>"$NOTES"
fi
if [ "${LOSS:-0}" != 0 ]; then
  # random loss on the underlay, each direction, where a packet arrives (iptables
  # statistic in PREROUTING of lap and gw: a drop in OUTPUT would fail the sender's
  # send with EPERM instead of losing the packet on the way)
  p=$(awk -v l="$LOSS" 'BEGIN {printf "%.4f", l / 100}')
  inns "$NS_LAP" iptables -t mangle -A PREROUTING -i lap0 -m statistic --mode random --probability "$p" -j DROP
  inns "$NS_GW" iptables -t mangle -A PREROUTING -i gw0 -m statistic --mode random --probability "$p" -j DROP
fi
if [ "$DELAY_MS" != 0 ] || [ "${LOSS:-0}" != 0 ]; then
  echo "underlay impaired: ${DELAY_MS:-0} ms delay and ${LOSS:-0} % loss each direction" >>"$NOTES"
fi
start_pod_services
start_gw_wireguard
if [ "${HOLD:-0}" = 1 ]; then   # debugging/profiling aid: keep the topology (and one path) up
  echo "WORK=$WORK" >&2
  if [ $# -gt 0 ]; then
    log "HOLD=1: setting up $1"; "setup_$1" || log "setup_$1 failed"
    log "HOLD=1: $1 up (TUN_ROOTS=$TUN_ROOTS, SPLIT=$SPLIT)"
  fi
  log "HOLD=1: topology up; kill $$ (or wait MAX_SECONDS) to tear down"
  sleep "$MAX_SECONDS" & wait $!; exit 0
fi
T0=$SECONDS
for p in $PATHS; do
  declare -F "setup_$p" >/dev/null || { echo "unknown path $p" >&2; continue; }
  measure_path "$p"
done

stop_wire
write_report
REPORTED=1
log "results: $RESULTS"
cat "$RESULTS"
