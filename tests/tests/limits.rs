//! Acceptance of the gateway's limits (issue 13, points 4 and 5), in one
//! miniature cluster with two laptops running `burrow connect` and the
//! gateway it installs, with its default limits:
//!
//! - 4: laptop 1 opens 5,000 TCP connections and 5,000 UDP flows, beyond
//!   its caps: what is past them is refused (TCP: "connection refused";
//!   UDP: no answer) and counted in the gateway's metrics, while laptop 2's
//!   `curl http://web` and DNS keep working; laptop 1 works again once its
//!   flows are gone.
//! - 5: 2,000 TCP connections to the framed NodePort that never make a
//!   valid WireGuard handshake are all closed by the gateway (reset at
//!   once beyond the per-source cap, the rest by the handshake deadline)
//!   while laptop 2 connects over the framed transport (`--transport
//!   port-forward`), whose connection outlives the deadline.
//!
//! One cluster for the binary (common::shared), the `flows` workload
//! applied by the first test; each point is a test of its own (`cargo test
//! --test limits framed`):
//! - `one_laptop_past_its_caps_the_other_keeps_working` (4)
//! - `framed_connections_that_never_handshake_are_closed` (5)
//!
//! Both load the gateway and count its metrics, so each takes the cluster
//! alone.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use burrow_tests::ctx::NODE_UNDERLAY_IP;
use burrow_tests::gateway;
use common::*;

/// What laptop 1 opens: more than the default caps of either kind.
const TCP_CONNECTIONS: usize = 5000;
const UDP_FLOWS: usize = 5000;
/// Connections to the framed NodePort that never handshake.
const IDLE_CONNECTIONS: usize = 2000;

struct Setup<'a> {
    c: &'a Cluster,
    mc_flows: PathBuf,
    dir: PathBuf,
    flows_ip: String,
    redis_ip: String,
    udp_echo_ip: String,
    caller_pod: String,
}

/// A background command, killed if the test ends before it does.
struct Background {
    what: String,
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Background {
    fn spawn(mut cmd: Command, what: &str) -> Background {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            what: what.to_string(),
            child,
            lines,
        }
    }

    /// The next line of output within `limit` (a deadline for a hang).
    fn line(&mut self, limit: Duration) -> String {
        self.lines
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("{}: no output line within {limit:?}: {e}", self.what))
    }

    /// Closes stdin and waits for the exit within `limit`; the remaining
    /// output lines and whether it exited 0.
    fn finish(mut self, limit: Duration) -> (Vec<String>, bool) {
        drop(self.child.stdin.take());
        let status = eventually(limit, &format!("{} to exit", self.what), || {
            self.child.try_wait().expect("try_wait")
        });
        let rest = self.lines.try_iter().collect();
        (rest, status.success())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The numbers after each word of `words` in `line` ("established 4096
/// refused 904 ...").
fn numbers(line: &str, words: &[&str]) -> Vec<usize> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .map(|w| {
            tokens
                .windows(2)
                .find(|p| p[0] == *w)
                .and_then(|p| p[1].parse().ok())
                .unwrap_or_else(|| panic!("no number after {w:?} in {line:?}"))
        })
        .collect()
}

impl Setup<'_> {
    fn at(&self, n: usize) -> Laptop<'_> {
        Laptop::new(self.c, n, self.dir.join(format!("run{n}")))
    }

    fn mc_flows(&self, n: usize, args: &[&str]) -> Command {
        let mut all = vec![self.mc_flows.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        self.at(n).on(&all)
    }

    fn curl(&self, n: usize, url: &str) -> Output {
        run(self.at(n).on(&["curl", "-sS", "--max-time", "10", url]))
    }

    /// `curl http://web/` (a cluster name: DNS, then TCP) answers nginx's
    /// page in laptop `n`.
    fn assert_web(&self, n: usize) {
        let o = self.curl(n, "http://web/");
        assert!(
            o.status.success() && stdout(&o).contains("Welcome to nginx"),
            "curl http://web/ from laptop {n}: {} {}\ndaemon log:\n{}",
            o.status,
            stderr(&o),
            self.at(n).daemon_log()
        );
    }

    /// `name` (asked for the first time in the test, so not from the
    /// stub's cache) resolves to `ip` in laptop `n`.
    fn assert_resolves(&self, n: usize, name: &str, ip: &str) {
        let o = run(self.at(n).on(&["getent", "hosts", name]));
        assert!(
            o.status.success() && stdout(&o).split_whitespace().next() == Some(ip),
            "getent hosts {name} in laptop {n}: {} {:?}, expected {ip}\ndaemon log:\n{}",
            o.status,
            stdout(&o),
            self.at(n).daemon_log()
        );
    }

    fn gateway_pod(&self) -> String {
        jsonpath(
            self.c,
            &["get", "pods", "-n", gateway::NAMESPACE],
            "{.items[0].metadata.name}",
        )
    }

    /// The gateway's metrics, scraped from the caller pod.
    fn metrics(&self) -> String {
        let pod_ip = jsonpath(
            self.c,
            &["get", "pods", "-n", gateway::NAMESPACE],
            "{.items[0].status.podIP}",
        );
        let url = format!("http://{pod_ip}:{}/metrics", gateway::METRICS_PORT);
        ok(self.c.exec(
            &format!("pod/default/{}", self.caller_pod),
            &["curl", "-sS", "--max-time", "5", &url],
        ))
    }

    fn sample(text: &str, name: &str, labels: &str) -> f64 {
        gateway::sample(text, name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}} in:\n{text}"))
    }
}

/// The binary's cluster: both points load the gateway.
fn lm_alone() -> Option<SharedCluster> {
    shared_cluster_alone("lm", 2)
}

/// The `flows` pod's IP, once it is applied and Ready.
static FLOWS_IP: OnceLock<String> = OnceLock::new();

/// The laptops (run dirs in the cluster's state dir) and the addresses
/// the points use; the `flows` workload applied on first use.
fn setup(c: &Cluster) -> Setup<'_> {
    let mc_flows = PathBuf::from(env!("CARGO_BIN_EXE_mc-flows"));
    let flows_ip = FLOWS_IP
        .get_or_init(|| {
            kubectl_apply(c, &flows_yaml(&mc_flows));
            flows_pod_ready(c).1
        })
        .clone();
    let dir = c.state_dir().join("limits");
    std::fs::create_dir_all(&dir).expect("the laptops' run dirs");
    Setup {
        c,
        mc_flows,
        dir,
        flows_ip,
        redis_ip: jsonpath(
            c,
            &["get", "svc", "-n", "data", "redis"],
            "{.spec.clusterIP}",
        ),
        udp_echo_ip: jsonpath(c, &["get", "svc", "udp-echo"], "{.spec.clusterIP}"),
        caller_pod: pod_of(c, "default", "caller"),
    }
}

/// 4 one laptop past its caps; the other keeps working
#[test]
fn one_laptop_past_its_caps_the_other_keeps_working() {
    let Some(ref c) = lm_alone() else { return };
    let s = setup(c);

    s.at(1).connect_ok(&[]);
    s.at(2).connect_ok(&[]);
    s.assert_web(1);
    s.assert_web(2);
    let before = s.metrics();
    let cap = |limit: &str| {
        Setup::sample(
            &before,
            "burrow_gateway_laptop_flow_limit",
            &format!("limit=\"{limit}\""),
        ) as usize
    };
    let refused = |text: &str, limit: &str| {
        Setup::sample(
            text,
            "burrow_gateway_flows_refused_total",
            &format!("limit=\"{limit}\""),
        ) as usize
    };
    let (tcp_cap, udp_cap) = (cap("tcp_flows"), cap("udp_flows"));
    assert!(
        tcp_cap < TCP_CONNECTIONS && udp_cap < UDP_FLOWS,
        "the default caps ({tcp_cap} TCP, {udp_cap} UDP) are not below what the test opens"
    );
    eprintln!("limits: per-laptop caps {tcp_cap} TCP flows, {udp_cap} UDP flows");

    // Laptop 1: 5,000 TCP connections, held open.
    let to = format!("{}:{FLOWS_PORT}", s.flows_ip);
    let n = TCP_CONNECTIONS.to_string();
    let mut hold = Background::spawn(
        s.mc_flows(1, &["hold", "--to", &to, "--connections", &n]),
        "mc-flows hold in laptop 1",
    );
    let line = hold.line(Duration::from_secs(300));
    eprintln!("limits: laptop 1, {TCP_CONNECTIONS} TCP connections: {line}");
    let got = numbers(
        &line,
        &["established", "refused", "timed-out", "failed", "reset"],
    );
    let (established, refused_tcp) = (got[0], got[1]);
    assert_eq!(
        (got[2], got[3], got[4]),
        (0, 0, 0),
        "every connection is established or refused: {line}"
    );
    assert!(
        established <= tcp_cap && established + 32 >= tcp_cap,
        "{established} connections established, the cap is {tcp_cap}: {line}"
    );
    // A new connection now is refused at once, as a user sees it.
    let url = format!("http://{}:{FLOWS_PORT}/", s.flows_ip);
    let o = run(s.at(1).on(&["curl", "-v", "--max-time", "10", &url]));
    assert!(
        o.status.code() == Some(7) && stderr(&o).contains("Connection refused"),
        "curl {url} from laptop 1 at its cap: {} {}",
        o.status,
        stderr(&o)
    );

    // Laptop 1: 5,000 UDP flows (DNS answers count against the
    // same cap for 60 s, hence the slack).
    let out = ok(s.mc_flows(
        1,
        &[
            "udp-flows",
            "--to",
            &to,
            "--flows",
            &UDP_FLOWS.to_string(),
            "--rounds",
            "5",
        ],
    ));
    eprintln!("limits: laptop 1, {UDP_FLOWS} UDP flows: {}", out.trim());
    let answered = numbers(&out, &["answered"])[0];
    assert!(
        answered <= udp_cap && answered + 64 >= udp_cap,
        "{answered} UDP flows answered, the cap is {udp_cap}: {out}"
    );

    // Laptop 2 is not held back, over TCP, UDP (DNS) and both.
    s.assert_web(2);
    s.assert_resolves(2, "redis.data.svc.cluster.local", &s.redis_ip);
    let echo = format!(
        "echo limits | timeout 10 socat -T3 - UDP:{}:9000",
        s.udp_echo_ip
    );
    let echoed = ok(s.at(2).on(&["sh", "-c", &echo]));
    assert!(echoed.contains("limits"), "UDP echo answered {echoed:?}");

    // Counted, without naming the laptop.
    let after = s.metrics();
    let tcp_refusals = refused(&after, "tcp_flows") - refused(&before, "tcp_flows");
    let udp_refusals = refused(&after, "udp_flows") - refused(&before, "udp_flows");
    eprintln!("limits: refusals counted: {tcp_refusals} TCP, {udp_refusals} UDP");
    assert!(
        tcp_refusals > refused_tcp.saturating_sub(1),
        "{refused_tcp} connections refused, {tcp_refusals} refusals counted"
    );
    assert!(
        udp_refusals >= UDP_FLOWS - udp_cap,
        "{} UDP flows beyond the cap, {udp_refusals} refusals counted",
        UDP_FLOWS - udp_cap
    );
    for line in after.lines().filter(|l| l.contains("refused")) {
        assert!(
            !line.contains("198.19.") && !line.contains("peer="),
            "a refusal metric names a laptop: {line}"
        );
    }
    // Logged once per laptop and cap, not per refusal.
    let log = ok(kubectl(
        s.c,
        &["logs", "-n", gateway::NAMESPACE, &s.gateway_pod()],
    ));
    for what in ["TCP flows", "UDP flows"] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("laptop at its cap") && l.contains(what))
            .collect();
        assert_eq!(lines.len(), 1, "log lines for the {what} cap: {lines:#?}");
    }

    let (rest, exited) = hold.finish(Duration::from_secs(60));
    assert!(exited, "mc-flows hold: {rest:?}");
    // Laptop 1 works again once its flows are gone (its UDP flows
    // idle out after 60 s: its DNS until then is refused).
    eventually(
        Duration::from_secs(120),
        "laptop 1 working again after its flows are gone",
        || {
            let o = s.curl(1, "http://web/");
            (o.status.success() && stdout(&o).contains("Welcome to nginx")).then_some(())
        },
    );
}

/// 5 framed connections that never handshake are closed; a laptop connects meanwhile
#[test]
fn framed_connections_that_never_handshake_are_closed() {
    let Some(ref c) = lm_alone() else { return };
    let s = setup(c);
    // The gateway installed, laptop 1 connected (as after point 4).
    if !s.at(1).connected() {
        s.at(1).connect_ok(&[]);
    }

    if s.at(2).connected() {
        ok(s.at(2).burrow(&["disconnect"]));
    }
    let node_port = jsonpath(
        s.c,
        &["get", "svc", "-n", gateway::NAMESPACE, gateway::NAME],
        "{.spec.ports[?(@.name==\"framed\")].nodePort}",
    );
    let before = s.metrics();
    let to = format!("{NODE_UNDERLAY_IP}:{node_port}");
    let n = IDLE_CONNECTIONS.to_string();
    let mut idle = Background::spawn(
        s.mc_flows(1, &["idle-connections", "--to", &to, "--connections", &n]),
        "mc-flows idle-connections in laptop 1",
    );
    let line = idle.line(Duration::from_secs(120));
    eprintln!("limits: {IDLE_CONNECTIONS} connections to the framed NodePort: {line}");
    // Connections beyond a cap may be reset before the connect
    // returns: closed at once, as far as the prober can tell.
    let got = numbers(&line, &["opened", "reset-at-once"]);
    assert_eq!(
        got[0] + got[1],
        IDLE_CONNECTIONS,
        "every connection to {to} opens: {line}"
    );

    // Meanwhile laptop 2 connects over the framed transport.
    let out = s.at(2).connect_ok(&["--transport", "port-forward"]);
    eprintln!("connect output:\n{out}");
    let st = s.at(2).status_json();
    assert_eq!(st["transport"], "port-forward", "{st}");
    s.assert_web(2);
    s.assert_resolves(2, "udp-echo.default.svc.cluster.local", &s.udp_echo_ip);

    let (rest, all_closed) = idle.finish(Duration::from_secs(150));
    eprintln!("limits: {rest:?}");
    assert!(
        all_closed,
        "the gateway did not close every connection: {rest:?}"
    );
    let after = s.metrics();
    let delta = |name: &str, labels: &str| {
        Setup::sample(&after, name, labels) - Setup::sample(&before, name, labels)
    };
    let refused = delta(
        "burrow_gateway_framed_connections_refused_total",
        "reason=\"source_limit\"",
    ) + delta(
        "burrow_gateway_framed_connections_refused_total",
        "reason=\"total_limit\"",
    );
    let timed_out = delta(
        "burrow_gateway_framed_connections_timed_out_total",
        "reason=\"handshake\"",
    );
    eprintln!(
        "limits: framed connections reset at a cap: {refused}, closed at the handshake deadline: {timed_out}"
    );
    assert!(
        timed_out >= 1.0 && refused + timed_out >= IDLE_CONNECTIONS as f64,
        "{IDLE_CONNECTIONS} connections, {refused} refused and {timed_out} timed out"
    );

    // Laptop 2's connection outlived the deadline: traffic without
    // a reconnect.
    s.assert_web(2);
    let st = s.at(2).status_json();
    assert_eq!(st["transport"], "port-forward", "{st}");
    assert_eq!(st["reconnects"], 0, "{st}");
}
