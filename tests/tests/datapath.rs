//! Acceptance of the data path (issue 3): a laptop's traffic through the
//! tunnel to the gateway pod and on into the cluster — one cluster (two
//! laptops) for the group.
//!
//! The gateway is deployed the way a user would (`kubectl apply` of
//! `deploy/manifests/gateway.yaml`, its Secret, its NodePort Service); the
//! laptops reach it at the node's underlay address and the NodePort.
//! The laptop side is `burrow up` (target/debug/burrow). Set
//! `BURROW_E2E_LAPTOP=wireguard-go` to run the gateway points (1-4) against
//! wireguard-go instead, which tells a gateway bug from a client bug; the
//! client-only points (5b, 6) are then skipped.
//!
//! One cluster and one gateway for the binary (common::shared), set up by
//! the first test; each acceptance point is a test of its own (`cargo test
//! --test datapath thousand`):
//! - `the_laptop_reaches_the_cluster` (1)
//! - `failures_look_like_failures` (2)
//! - `a_thousand_parallel_flows` (3)
//! - `the_gateway_isolates` (4)
//! - `a_wireguard_go_laptop_reaches_the_gateway` (5a)
//! - `burrow_up_to_a_wireguard_go_peer` (5b)
//! - `burrow_leaves_nothing_behind` (6)
//!
//! Every point brings laptop 1's tunnel up (4 also laptop 2's) under the
//! same interface name and routes, and takes it down when done, so each
//! takes the cluster alone.

mod common;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use burrow_tests::cluster::Cluster;
use burrow_tests::gateway::{self, Gateway, KeyPair};
use burrow_tests::tunnel::{self, BurrowUp, TunnelConfig, WireguardGo};
use common::*;
use nix::sys::signal::Signal;

/// The gateway's peers (each its own key), by tunnel address: laptop 1,
/// laptop 2, and the wireguard-go laptop of point 5a. wireguard-go must not
/// reuse burrow's key: boringtun stamps handshakes with TAI64 base 2^62+37,
/// wireguard-go (like the kernel) with 2^62+10, so for 27 s after a burrow
/// handshake the gateway rejects wireguard-go's with the same key as
/// replayed.
const LAPTOP1_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const LAPTOP2_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const WIREGUARD_GO_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 4);
const PEERS: [Ipv4Addr; 3] = [LAPTOP1_IP, LAPTOP2_IP, WIREGUARD_GO_IP];
/// What a laptop routes into the tunnel: the Service and pod CIDRs.
const CLUSTER_CIDRS: [&str; 2] = ["10.96.0.0/12", "10.244.0.0/16"];
/// An address in the pod network with no pod behind it.
const NO_POD_IP: &str = "10.244.255.254";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaptopSide {
    Burrow,
    WireguardGo,
}

/// What every point uses: set up once (the gateway deployed, the `flows`
/// workload applied, the addresses read).
struct Fixture {
    gw: Gateway,
    side: LaptopSide,
    burrow: PathBuf,
    mc_flows: PathBuf,
    web_ip: String,
    web_pod_ip: String,
    redis_ip: String,
    udp_echo_ip: String,
    caller_pod: String,
    caller_ip: String,
    flows_ip: String,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// Everything the points share.
struct Setup<'a> {
    c: &'a Cluster,
    gw: &'static Gateway,
    side: LaptopSide,
    burrow: PathBuf,
    mc_flows: PathBuf,
    /// Tunnel configs and logs (in the cluster's state dir: gone with it).
    dir: PathBuf,
    web_ip: String,
    web_pod_ip: String,
    redis_ip: String,
    udp_echo_ip: String,
    caller_pod: String,
    caller_ip: String,
    flows_ip: String,
}

/// The binary's cluster: every point brings laptop 1 up and down.
fn dp_alone() -> Option<SharedCluster> {
    shared_cluster_alone("dp", 2)
}

fn fixture(c: &Cluster) -> Fixture {
    let side = match std::env::var("BURROW_E2E_LAPTOP").as_deref() {
        Ok("wireguard-go") => LaptopSide::WireguardGo,
        Ok("burrow") | Err(_) => LaptopSide::Burrow,
        Ok(other) => panic!("BURROW_E2E_LAPTOP={other}: use burrow or wireguard-go"),
    };
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_minicluster"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let burrow = bin_dir.join("burrow");
    if side == LaptopSide::Burrow {
        burrow_has_up(&burrow);
    }
    let gw = gateway::deploy(c, &PEERS).expect("deploying the gateway");
    eprintln!(
        "datapath: gateway {} at {} (pod IP {}), laptop side: {side:?}",
        gw.pod,
        gw.endpoint(),
        gw.pod_ip
    );
    let mc_flows = PathBuf::from(env!("CARGO_BIN_EXE_mc-flows"));
    let mut apply = kubectl(c, &["apply", "-f", "-"]);
    apply.stdin(Stdio::piped());
    feed_and_check(apply, &flows_yaml(&mc_flows));

    let jsonpath = |args: &[&str]| ok(kubectl(c, args)).trim().to_string();
    let svc_ip = |ns: &str, name: &str| {
        jsonpath(&[
            "get",
            "svc",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
    };
    let pod_ip = |ns: &str, pod: &str| {
        jsonpath(&[
            "get",
            "pod",
            pod,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.podIP}",
        ])
    };
    let web_pod = pod_of(c, "default", "web");
    let caller_pod = pod_of(c, "default", "caller");
    let (flows_pod, _) = flows_pod_ready(c);
    Fixture {
        web_ip: svc_ip("default", "web"),
        web_pod_ip: pod_ip("default", &web_pod),
        redis_ip: svc_ip("data", "redis"),
        udp_echo_ip: svc_ip("default", "udp-echo"),
        caller_ip: pod_ip("default", &caller_pod),
        caller_pod,
        flows_ip: pod_ip("default", &flows_pod),
        gw,
        side,
        burrow,
        mc_flows,
    }
}

/// Runs point `run` on the binary's cluster, alone; `needs_burrow`: it
/// tests the client itself (skipped when the laptop side is wireguard-go).
fn point(name: &str, run: fn(&Setup), needs_burrow: bool) {
    let Some(ref c) = dp_alone() else { return };
    let f = FIXTURE.get_or_init(|| fixture(c));
    let s = Setup {
        c,
        gw: &f.gw,
        side: f.side,
        burrow: f.burrow.clone(),
        mc_flows: f.mc_flows.clone(),
        dir: c.state_dir().join("datapath"),
        web_ip: f.web_ip.clone(),
        web_pod_ip: f.web_pod_ip.clone(),
        redis_ip: f.redis_ip.clone(),
        udp_echo_ip: f.udp_echo_ip.clone(),
        caller_pod: f.caller_pod.clone(),
        caller_ip: f.caller_ip.clone(),
        flows_ip: f.flows_ip.clone(),
    };
    if needs_burrow && s.side != LaptopSide::Burrow {
        eprintln!("datapath: {name}: skipped (needs burrow up)");
        return;
    }
    let start = Instant::now();
    eprintln!("datapath: {name} ...");
    match catch_unwind(AssertUnwindSafe(|| run(&s))) {
        Ok(()) => eprintln!("datapath: {name}: ok ({:.1?})", start.elapsed()),
        Err(e) => {
            eprintln!(
                "datapath: {name}: FAILED ({:.1?}); gateway log:\n{}",
                start.elapsed(),
                s.gw.log_tail(15)
            );
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn the_laptop_reaches_the_cluster() {
    point(
        "1 the laptop reaches the cluster",
        reaches_the_cluster,
        false,
    );
}

#[test]
fn failures_look_like_failures() {
    point(
        "2 failures look like failures",
        failures_look_like_failures_,
        false,
    );
}

#[test]
fn a_thousand_parallel_flows() {
    point(
        "3 a thousand parallel flows",
        thousand_parallel_flows,
        false,
    );
}

#[test]
fn the_gateway_isolates() {
    point("4 the gateway isolates", gateway_isolates, false);
}

#[test]
fn a_wireguard_go_laptop_reaches_the_gateway() {
    point(
        "5a wireguard-go laptop to the gateway",
        wireguard_go_laptop,
        false,
    );
}

#[test]
fn burrow_up_to_a_wireguard_go_peer() {
    point(
        "5b burrow up to a wireguard-go peer",
        burrow_to_wireguard_go,
        true,
    );
}

#[test]
fn burrow_leaves_nothing_behind() {
    point(
        "6 burrow leaves nothing behind",
        burrow_leaves_nothing_behind_,
        true,
    );
}

/// Fails unless `burrow` exists and has an `up` subcommand.
fn burrow_has_up(burrow: &Path) {
    let o = Command::new(burrow)
        .args(["up", "--help"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build it: cargo build -p burrow)",
                burrow.display()
            )
        });
    assert!(
        o.status.success(),
        "{} has no `up` subcommand yet (rebuild: cargo build -p burrow; or run the gateway points with BURROW_E2E_LAPTOP=wireguard-go): {}",
        burrow.display(),
        stderr(&o)
    );
}

// ---------------------------------------------------------------- helpers

/// Runs `cmd` with `input` on stdin and asserts success.
fn feed_and_check(mut cmd: Command, input: &str) {
    let shown = format!("{cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let o = child.wait_with_output().expect("wait");
    assert!(o.status.success(), "{shown}: {}", stderr(&o));
}

/// Runs `cmd` to completion within `limit` (killed and a failure after
/// it: a hang, not a slow run).
fn run_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.unwrap_or_else(|e| panic!("{shown}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            panic!("{shown} did not finish within {limit:?}");
        }
    }
}

/// Asserts success within `limit`; returns stdout.
fn ok_within(cmd: Command, limit: Duration) -> String {
    let shown = format!("{cmd:?}");
    let o = run_within(cmd, limit);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// A running command we talk to through stdin and stdout (socat).
struct Interactive {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<Vec<u8>>,
    eof: bool,
    seen: Vec<u8>,
}

impl Interactive {
    fn spawn(mut cmd: Command, what: &str) -> Interactive {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Interactive {
            what: what.to_string(),
            stdin: child.stdin.take(),
            child,
            out,
            eof: false,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, data: &[u8]) {
        let what = &self.what;
        self.stdin
            .as_mut()
            .unwrap_or_else(|| panic!("{what}: stdin already closed"))
            .write_all(data)
            .unwrap_or_else(|e| panic!("{what}: writing stdin: {e}"));
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Reads until the output so far ends with `want`, within `limit`.
    fn expect(&mut self, want: &[u8], limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.seen.ends_with(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{}: output ended before {:?}; got {:?}",
                    self.what,
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&self.seen)
                ),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{}: no {:?} within {limit:?}; got {:?}",
                    self.what,
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
        self.seen.clear();
    }

    /// Reads to end of output within `limit`; returns what came before it.
    fn expect_eof(&mut self, limit: Duration) -> Vec<u8> {
        let deadline = Instant::now() + limit;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.eof = true,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{}: output still open after {limit:?} (got {:?})",
                    self.what,
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
        std::mem::take(&mut self.seen)
    }

    /// Waits for the process to exit by itself within `limit`.
    fn expect_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running {limit:?} after its connection closed",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One laptop end of a tunnel to the gateway.
enum Laptop {
    Burrow(BurrowUp),
    WireguardGo(WireguardGo),
}

impl Laptop {
    fn ifname(&self) -> &str {
        match self {
            Laptop::Burrow(b) => b.ifname(),
            Laptop::WireguardGo(w) => w.ifname(),
        }
    }
}

impl Setup<'_> {
    /// `laptop` (1 or 2) as a [`Cluster::exec`] target.
    fn laptop(&self, laptop: usize) -> String {
        if laptop == 1 {
            "laptop".into()
        } else {
            format!("laptop{laptop}")
        }
    }

    fn netns(&self, laptop: usize) -> String {
        self.c.netns(&self.laptop(laptop)).expect("laptop netns")
    }

    /// The tunnel config of the gateway's peer with address `tunnel_ip`,
    /// routing the cluster CIDRs and `extra` into the tunnel.
    fn config(&self, tunnel_ip: Ipv4Addr, extra: &[&str]) -> TunnelConfig {
        let peer = self
            .gw
            .peers
            .iter()
            .find(|p| p.tunnel_ip == tunnel_ip)
            .unwrap_or_else(|| panic!("the gateway has no peer {tunnel_ip}"));
        TunnelConfig {
            private_key: peer.keys.private_key.clone(),
            address: format!("{}/32", peer.tunnel_ip),
            mtu: 1420,
            listen_port: None,
            peer_public_key: self.gw.keys.public_key.clone(),
            endpoint: Some(self.gw.endpoint()),
            allowed_ips: CLUSTER_CIDRS
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect(),
            persistent_keepalive: Some(25),
        }
    }

    /// Interface names are unique per cluster: wireguard-go's control
    /// sockets and burrow's state are machine-wide.
    fn ifname(&self, kind: &str) -> String {
        format!("{kind}-{}", self.c.name())
    }

    /// `burrow up` in laptop `laptop` with config `config`.
    fn burrow_up(&self, laptop: usize, config: &TunnelConfig) -> BurrowUp {
        BurrowUp::start(
            &self.burrow,
            &self.netns(laptop),
            &self.ifname(&format!("bw{laptop}")),
            config,
            &self.dir,
        )
        .unwrap_or_else(|e| panic!("burrow up in {}: {e:#}", self.laptop(laptop)))
    }

    fn wireguard_go(&self, laptop: usize, config: &TunnelConfig) -> WireguardGo {
        WireguardGo::start(
            &self.netns(laptop),
            &self.ifname(&format!("wg{laptop}")),
            config,
            &self.dir,
        )
        .unwrap_or_else(|e| panic!("wireguard-go in {}: {e:#}", self.laptop(laptop)))
    }

    /// The tunnel of laptop `laptop` (as peer `PEERS[laptop - 1]`) to the
    /// gateway, with the laptop side under test.
    fn tunnel(&self, laptop: usize, extra_routes: &[&str]) -> Laptop {
        let config = self.config(PEERS[laptop - 1], extra_routes);
        match self.side {
            LaptopSide::Burrow => Laptop::Burrow(self.burrow_up(laptop, &config)),
            LaptopSide::WireguardGo => Laptop::WireguardGo(self.wireguard_go(laptop, &config)),
        }
    }

    /// `args` run in laptop `laptop`.
    fn on(&self, laptop: usize, args: &[&str]) -> Command {
        self.c.exec(&self.laptop(laptop), args)
    }

    /// `burrow ARGS` run in laptop `laptop`, with the state directory
    /// `BurrowUp` gives it.
    fn burrow_cmd(&self, laptop: usize, args: &[&str]) -> Command {
        let mut all = vec![self.burrow.to_str().expect("path")];
        all.extend_from_slice(args);
        let mut cmd = self.on(laptop, &all);
        cmd.env(tunnel::BURROW_RUN_DIR, tunnel::burrow_run_dir(&self.dir));
        cmd
    }

    /// The gateway's metrics, scraped from the caller pod.
    fn metrics(&self) -> anyhow::Result<String> {
        gateway::scrape(self.c, &format!("pod/default/{}", self.caller_pod), self.gw)
    }

    /// TCP flows the gateway holds now, read from the caller pod.
    fn tcp_flows_open(&self) -> f64 {
        let text = self.metrics().expect("scraping the gateway's metrics");
        gateway::sample(&text, "burrow_gateway_flows_open", "proto=\"tcp\"")
            .unwrap_or_else(|| panic!("no open-flows sample:\n{text}"))
    }

    /// A gateway drop counter, read from the caller pod.
    fn dropped(&self, reason: &str) -> f64 {
        let text = self.metrics().expect("scraping the gateway's metrics");
        gateway::sample(
            &text,
            "burrow_gateway_packets_dropped_total",
            &format!("reason=\"{reason}\""),
        )
        .unwrap_or_else(|| panic!("no dropped-packets sample for reason {reason}:\n{text}"))
    }

    /// `curl` from laptop `laptop`: its output (status checked by the
    /// caller).
    fn curl(&self, laptop: usize, args: &[&str]) -> std::process::Output {
        let mut all = vec!["curl", "-sS"];
        all.extend_from_slice(args);
        // Every call gives curl its own, shorter, time limit.
        run_within(self.on(laptop, &all), Duration::from_secs(330))
    }

    /// Asserts that `http://<ip>/` answers with nginx's page from laptop
    /// `laptop`.
    fn assert_web(&self, laptop: usize, ip: &str) {
        let url = format!("http://{ip}/");
        let o = self.curl(laptop, &["--max-time", "10", &url]);
        assert!(
            o.status.success() && stdout(&o).contains("Welcome to nginx"),
            "curl {url} from {}: {} {}{}",
            self.laptop(laptop),
            o.status,
            stdout(&o),
            stderr(&o)
        );
    }
}

/// Waits until something listens on TCP `port` in `target` (of
/// [`Cluster::exec`]).
fn wait_listening(c: &Cluster, target: &str, port: u16) {
    eventually(
        Duration::from_secs(10),
        &format!("a listener on port {port} in {target}"),
        || {
            let o = run(c.exec(target, &["ss", "-Hltn", &format!("sport = :{port}")]));
            stdout(&o).contains(&format!(":{port}")).then_some(())
        },
    );
}

/// The sha256 the web root lists for `file`.
fn expected_sha256(c: &Cluster, file: &str) -> String {
    let sums = std::fs::read_to_string(c.state_dir().join("www/SHA256SUMS"))
        .expect("the web root's SHA256SUMS");
    sums.lines()
        .find_map(|l| {
            let (sum, name) = l.split_once("  ")?;
            (name == file).then(|| sum.to_string())
        })
        .unwrap_or_else(|| panic!("{file} not in SHA256SUMS:\n{sums}"))
}

// ------------------------------------------------------------------ points

/// 1: HTTP to a ClusterIP and a pod IP, 100 MiB intact, redis, UDP, ping.
fn reaches_the_cluster(s: &Setup) {
    let _tunnel = s.tunnel(1, &[]);
    s.assert_web(1, &s.web_ip);
    s.assert_web(1, &s.web_pod_ip);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("100m.bin");
    let url = format!("http://{}/100m.bin", s.web_ip);
    let o = s.curl(
        1,
        &[
            "-f",
            "--max-time",
            "300",
            "-o",
            file.to_str().expect("path"),
            "-w",
            "%{size_download}",
            &url,
        ],
    );
    assert!(o.status.success(), "curl {url}: {}", stderr(&o));
    assert_eq!(stdout(&o), "104857600", "bytes of {url}");
    let mut sha = Command::new("sha256sum");
    sha.arg(&file);
    let sum = ok(sha);
    assert_eq!(
        sum.split_whitespace().next(),
        Some(expected_sha256(s.c, "100m.bin").as_str()),
        "sha256 of {url} through the tunnel"
    );

    let pong = ok_within(
        s.on(1, &["redis-cli", "-h", &s.redis_ip, "ping"]),
        Duration::from_secs(30),
    );
    assert_eq!(pong.trim(), "PONG", "redis-cli -h {} ping", s.redis_ip);

    let target = format!("UDP:{}:9000", s.udp_echo_ip);
    let mut udp = Interactive::spawn(s.on(1, &["socat", "-", &target]), "socat to udp-echo");
    for i in 1..=5 {
        let line = format!("datagram {i}\n");
        udp.send(line.as_bytes());
        udp.expect(line.as_bytes(), Duration::from_secs(10));
    }
    udp.close_stdin();

    let out = ok_within(
        s.on(
            1,
            &["ping", "-c", "3", "-i", "0.2", "-W", "5", &s.web_pod_ip],
        ),
        Duration::from_secs(30),
    );
    assert!(out.contains("3 received"), "ping {}: {out}", s.web_pod_ip);
}

/// 2: refused is refused, no pod is a timeout, and a close travels both
/// ways.
fn failures_look_like_failures_(s: &Setup) {
    let _tunnel = s.tunnel(1, &[]);
    let url = format!("http://{}:81/", s.web_pod_ip);
    let o = s.curl(1, &["-v", "--connect-timeout", "5", &url]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "curl {url} (nothing listens on 81) must fail to connect: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("Connection refused"),
        "curl {url}: expected a refused connection: {}",
        stderr(&o)
    );

    let url = format!("http://{NO_POD_IP}/");
    let o = s.curl(1, &["--connect-timeout", "3", &url]);
    assert_eq!(
        o.status.code(),
        Some(28),
        "curl {url} (no pod there) must time out: {}",
        stderr(&o)
    );

    let caller = format!("pod/default/{}", s.caller_pod);
    for (case, port, server_closes) in [
        ("server closes", 7101, true),
        ("client closes", 7102, false),
    ] {
        let listen = format!("TCP-LISTEN:{port},reuseaddr");
        let mut server = Interactive::spawn(
            s.c.exec(&caller, &["socat", &listen, "STDIO"]),
            &format!("{case}: server socat in the caller pod"),
        );
        wait_listening(s.c, &caller, port);
        let connect = format!("TCP:{}:{port}", s.caller_ip);
        let mut client = Interactive::spawn(
            s.on(1, &["socat", "STDIO", &connect]),
            &format!("{case}: client socat in the laptop"),
        );
        client.send(b"hello from the laptop\n");
        server.expect(b"hello from the laptop\n", Duration::from_secs(10));
        server.send(b"hello from the pod\n");
        client.expect(b"hello from the pod\n", Duration::from_secs(10));
        let metrics = s.metrics().expect("scraping the gateway's metrics");
        let established = gateway::sample(
            &metrics,
            "burrow_gateway_tcp_flows",
            "state=\"established\"",
        );
        assert!(
            established.is_some_and(|n| n >= 1.0),
            "{case}: the gateway's metrics show no established TCP flow while one is open:\n{metrics}"
        );
        let limit = Duration::from_secs(10);
        if server_closes {
            server.close_stdin();
            let rest = client.expect_eof(limit);
            assert!(rest.is_empty(), "{case}: unexpected {rest:?}");
            client.expect_exit(limit);
            server.expect_exit(limit);
        } else {
            client.close_stdin();
            let rest = server.expect_eof(limit);
            assert!(rest.is_empty(), "{case}: unexpected {rest:?}");
            server.expect_exit(limit);
            client.expect_exit(limit);
        }
    }
}

/// 3: 1,000 connections at once, 64 KiB each way on each.
fn thousand_parallel_flows(s: &Setup) {
    let _tunnel = s.tunnel(1, &[]);
    let to = format!("{}:{FLOWS_PORT}", s.flows_ip);
    let mc_flows = s.mc_flows.to_str().expect("path");
    let o = run_within(
        s.on(
            1,
            &[
                mc_flows,
                "echo-clients",
                "--to",
                &to,
                "--connections",
                "1000",
                "--bytes",
                "65536",
                "--limit-secs",
                "180",
            ],
        ),
        Duration::from_secs(240),
    );
    eprintln!("datapath: {}", stdout(&o).lines().next().unwrap_or(""));
    assert!(
        o.status.success() && stdout(&o).starts_with("1000/1000 "),
        "mc-flows echo-clients to {to} ({}):\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    // All closed at once: the gateway lets go of every flow (the last ACKs
    // of a burst of closes must not be lost on the way; a few that are, on
    // a loaded machine, cost their flows a FIN retransmission: within the
    // gateway stack's RTO, which backs off to at most 60 s).
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let open = loop {
        let open = s.tcp_flows_open();
        if open == 0.0 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if open == 0.0 {
        eprintln!(
            "datapath: the gateway let go of every flow {:.1}s after the clients finished",
            started.elapsed().as_secs_f64()
        );
        gateway_reports_its_heap(s);
        return;
    }
    let metrics = s
        .metrics()
        .unwrap_or_else(|e| format!("(scraping the gateway failed: {e:#})"));
    let kept: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("burrow_gateway_tcp_flows{")
                || l.starts_with("burrow_gateway_packets_dropped_total{")
        })
        .collect();
    let links = run_within(s.on(1, &["ip", "-s", "link"]), Duration::from_secs(10));
    panic!(
        "{open} TCP flows still open at the gateway 90 s after 1,000 connections closed\n{}\nlaptop links:\n{}",
        kept.join("\n"),
        stdout(&links)
    );
}

/// The gateway's heap as its allocator counts it (for operators, and
/// `scripts/soak.sh`): bytes held, within the pages it keeps (jemalloc's
/// "resident" is an upper bound: pages mapped but never touched count, so
/// it is printed next to the RSS, not compared with it).
fn gateway_reports_its_heap(s: &Setup) {
    let text = s.metrics().expect("scraping the gateway's metrics");
    let pid = gateway::process_id(s.c, s.gw).expect("the gateway's process");
    let rss_kib: f64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the gateway's status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let kind = |k: &str| {
        gateway::sample(
            &text,
            "burrow_gateway_allocator_bytes",
            &format!("kind=\"{k}\""),
        )
        .unwrap_or_else(|| panic!("no allocator {k} sample:\n{text}"))
    };
    let (allocated, resident) = (kind("allocated"), kind("resident"));
    eprintln!(
        "datapath: gateway heap {:.1} MiB allocated, {:.1} MiB resident, RSS {:.1} MiB",
        allocated / 1048576.0,
        resident / 1048576.0,
        rss_kib / 1024.0
    );
    assert!(
        allocated > 0.0 && allocated <= resident,
        "allocated {allocated} resident {resident} RSS {rss_kib} KiB"
    );
}

/// 4: no privileges, no peer to peer, no forged sources.
fn gateway_isolates(s: &Setup) {
    // The process: non-root, no capabilities.
    let pid = gateway::process_id(s.c, s.gw).expect("the gateway's process");
    let exe = gateway::process_exe(pid).expect("its executable");
    assert_eq!(
        exe.file_name().and_then(|n| n.to_str()),
        Some("burrow-gateway"),
        "the gateway pod's process is {}",
        exe.display()
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid"), "65532 65532 65532 65532", "gateway Uid");
    assert_eq!(field("Gid"), "65532 65532 65532 65532", "gateway Gid");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "gateway {caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "gateway NoNewPrivs");

    // Laptop 2 routes laptop 1's tunnel address into its tunnel: the
    // gateway must not deliver it.
    let one = s.tunnel(1, &[]);
    let listen = format!("TCP-LISTEN:7200,bind={LAPTOP1_IP},reuseaddr,fork");
    let _listener = Interactive::spawn(
        s.on(1, &["socat", &listen, "EXEC:echo reached laptop 1"]),
        "a server on laptop 1's tunnel address",
    );
    wait_listening(s.c, &s.laptop(1), 7200);
    let two = s.tunnel(2, &["100.64.0.0/24"]);
    s.assert_web(2, &s.web_pod_ip);
    let before = s.dropped("peer_to_peer");
    let o = run_within(
        s.on(
            2,
            &[
                "ping",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "2",
                &LAPTOP1_IP.to_string(),
            ],
        ),
        Duration::from_secs(30),
    );
    assert!(
        !o.status.success() && stdout(&o).contains(" 0 received"),
        "laptop 2 pinged laptop 1's tunnel address: {}",
        stdout(&o)
    );
    let url = format!("http://{LAPTOP1_IP}:7200/");
    let o = s.curl(2, &["--connect-timeout", "3", &url]);
    assert_eq!(
        o.status.code(),
        Some(28),
        "laptop 2 must not connect to {url}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let after = s.dropped("peer_to_peer");
    assert!(
        after > before,
        "the gateway's peer_to_peer drop counter did not grow ({before} → {after})"
    );
    drop(two);

    // A second address on laptop 1's tunnel device: packets from it are
    // forged as far as the gateway knows.
    let forged = "100.64.0.99";
    let dev = one.ifname().to_string();
    ok(s.on(
        1,
        &["ip", "addr", "add", &format!("{forged}/32"), "dev", &dev],
    ));
    let before = s.dropped("forged_source");
    let url = format!("http://{}/", s.web_pod_ip);
    let o = s.curl(1, &["--interface", forged, "--connect-timeout", "3", &url]);
    assert_eq!(
        o.status.code(),
        Some(28),
        "curl --interface {forged} {url} must get no answer: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let after = s.dropped("forged_source");
    assert!(
        after > before,
        "the gateway's forged_source drop counter did not grow ({before} → {after})"
    );
    // The peer's own traffic still flows.
    s.assert_web(1, &s.web_pod_ip);
}

/// 5a: wireguard-go (configured with `wg`) as the laptop, the gateway pod
/// as its peer.
fn wireguard_go_laptop(s: &Setup) {
    let wg = s.wireguard_go(1, &s.config(WIREGUARD_GO_IP, &[]));
    s.assert_web(1, &s.web_ip);
    s.assert_web(1, &s.web_pod_ip);
    let pong = ok_within(
        s.on(1, &["redis-cli", "-h", &s.redis_ip, "ping"]),
        Duration::from_secs(30),
    );
    assert_eq!(pong.trim(), "PONG");
    let handshakes = wg.show("latest-handshakes").expect("wg show");
    let when: u64 = handshakes
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        when > 0,
        "wg show {} latest-handshakes: {handshakes}",
        wg.ifname()
    );
}

/// 5b: `burrow up` against wireguard-go in the node namespace, which
/// forwards to the pod network with the kernel.
fn burrow_to_wireguard_go(s: &Setup) {
    let node_keys = KeyPair::generate().expect("keys");
    let laptop_keys = KeyPair::generate().expect("keys");
    let port = 51999;
    let node = s.c.netns("node").expect("node netns");
    let laptop_tunnel_ip = "100.64.1.2";
    let _node_wg = WireguardGo::start(
        &node,
        &s.ifname("wgn"),
        &TunnelConfig {
            private_key: node_keys.private_key.clone(),
            address: "100.64.1.1/32".into(),
            mtu: 1420,
            listen_port: Some(port),
            peer_public_key: laptop_keys.public_key.clone(),
            endpoint: None,
            allowed_ips: vec![format!("{laptop_tunnel_ip}/32")],
            persistent_keepalive: None,
        },
        &s.dir,
    )
    .expect("wireguard-go in the node namespace");
    let _laptop = s.burrow_up(
        1,
        &TunnelConfig {
            private_key: laptop_keys.private_key.clone(),
            address: format!("{laptop_tunnel_ip}/32"),
            mtu: 1420,
            listen_port: None,
            peer_public_key: node_keys.public_key.clone(),
            endpoint: Some(format!("192.168.240.1:{port}").parse().expect("endpoint")),
            allowed_ips: vec!["10.244.0.0/16".into()],
            persistent_keepalive: Some(25),
        },
    );
    s.assert_web(1, &s.web_pod_ip);
}

/// Asserts that laptop 1 has no tunnel device and no cluster route left.
fn assert_clean(s: &Setup, after: &str) {
    let netns = s.netns(1);
    let links = tunnel::links(&netns).expect("ip link");
    assert_eq!(
        links,
        ["lo", "eth0"],
        "links left in the laptop after {after}"
    );
    let routes = tunnel::routes(&netns).expect("ip route");
    let stray: Vec<&String> = routes
        .iter()
        .filter(|r| !r.contains(" dev eth0 "))
        .collect();
    assert!(
        stray.is_empty(),
        "routes left in the laptop after {after}: {stray:?}"
    );
    let mut list = Command::new("ip");
    list.args(["netns", "pids", &netns]);
    let pids = ok(list);
    assert!(
        pids.trim().is_empty(),
        "processes left in the laptop after {after}: {pids}"
    );
}

/// 6: SIGTERM, SIGINT, SIGKILL then `burrow up`, SIGKILL then `burrow
/// down`, and `--background` with `burrow down`.
fn burrow_leaves_nothing_behind_(s: &Setup) {
    assert_clean(s, "the earlier points");
    let config = s.config(LAPTOP1_IP, &[]);
    let ifname = s.ifname("bw1");
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let up = s.burrow_up(1, &config);
        s.assert_web(1, &s.web_pod_ip);
        let log = up.log_tail(20);
        let status = up.stop(signal).expect("burrow up stops");
        assert!(
            status.success(),
            "burrow up exited with {status} on {signal}:\n{log}"
        );
        assert_clean(s, &format!("{signal}"));
    }

    let up = s.burrow_up(1, &config);
    up.stop(Signal::SIGKILL).expect("SIGKILL");
    let again = s.burrow_up(1, &config);
    s.assert_web(1, &s.web_pod_ip);
    again.stop(Signal::SIGTERM).expect("burrow up stops");
    assert_clean(s, "SIGKILL, burrow up, SIGTERM");

    let up = s.burrow_up(1, &config);
    up.stop(Signal::SIGKILL).expect("SIGKILL");
    ok_within(
        s.burrow_cmd(1, &["down", "--name", &ifname]),
        Duration::from_secs(30),
    );
    assert_clean(s, "SIGKILL, burrow down");

    // The config file `burrow_up` wrote for this interface.
    let conf = s.dir.join(format!("{ifname}.conf"));
    let o = run_within(
        s.burrow_cmd(
            1,
            &[
                "up",
                "--background",
                "--wg-config",
                conf.to_str().expect("path"),
                "--name",
                &ifname,
            ],
        ),
        Duration::from_secs(30),
    );
    assert!(
        o.status.success(),
        "burrow up --background: {}{}",
        stdout(&o),
        stderr(&o)
    );
    s.assert_web(1, &s.web_pod_ip);
    ok_within(
        s.burrow_cmd(1, &["down", "--name", &ifname]),
        Duration::from_secs(30),
    );
    assert_clean(s, "burrow up --background, burrow down");
}
