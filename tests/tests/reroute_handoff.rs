//! Acceptance of the reroute hand-off (issue 14, points 1, 2, 6 and 7) in
//! one miniature cluster with two laptops and the real binaries: callers
//! in the `caller` pod open a new connection to `echo.default:8080` every
//! 20 ms (`mc-flows http-every`) while laptops turn reroutes on and off, and
//! not one request may fail. The laptops answer with mc-echo as
//! `laptop-alice` / `laptop-bob`; the cluster's pods as `echo-…`.
//!
//! One cluster for the binary (common::shared); each acceptance point is a
//! test of its own (`cargo test --test reroute_handoff header_reroute`):
//! - `reroute_after_connect_uses_its_kubeconfig_and_refuses_another_cluster` (6)
//! - `right_after_reroute_returns_20_of_20_requests_reach_the_laptop` (1)
//! - `global_reroute_on_and_off_no_caller_fails` (2a)
//! - `header_reroute_on_and_off_no_caller_fails` (2b)
//! - `force_takes_a_teammates_route_then_disconnect_no_caller_fails` (2c)
//! - `someone_else_puts_the_selector_back_list_says_so_stop_leaves_it` (7)
//!
//! Each reroutes `echo` and counts who answers, so each takes the cluster
//! alone, and leaves `echo` as it was before the binary's first reroute
//! (`reroute` connects a laptop that is not connected). The laptops'
//! servers are started by the first point and run until the cluster goes.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use common::*;

const HEADER: &str = "x-burrow-route: alice";
/// `reroute` arguments: alice's header route of echo:8080.
const HEADER_ROUTE: &[&str] = &[
    "echo",
    "--port",
    "8080:3000",
    "--header",
    "x-burrow-route=alice",
];

/// A stream of callers in the caller pod.
struct Callers {
    child: Child,
    what: &'static str,
}

/// What a stream of callers saw.
struct Seen {
    /// Answers per answering pod.
    by: BTreeMap<String, usize>,
    failures: Vec<String>,
    max_ms: u64,
}

impl Callers {
    fn start(c: &Cluster, caller: &str, header: Option<&str>, what: &'static str) -> Self {
        let mc_flows = env!("CARGO_BIN_EXE_mc-flows");
        let mut args = vec![
            mc_flows,
            "http-every",
            "--to",
            "echo.default:8080",
            "--every-ms",
            "20",
            "--limit-secs",
            "3",
        ];
        if let Some(h) = header {
            args.extend(["--header", h]);
        }
        let mut cmd = c.exec(&format!("pod/default/{caller}"), &args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("mc-flows http-every");
        Callers { child, what }
    }

    /// Stops the callers; what they saw (`@@ AT STATUS SECONDS POD ERROR`
    /// per request; anything but a 200 failed).
    fn finish(mut self) -> Seen {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().expect("callers output");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{} callers: {}\n{}",
            self.what,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut seen = Seen {
            by: BTreeMap::new(),
            failures: Vec::new(),
            max_ms: 0,
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let ["@@", _at, status, secs, pod, error] = f[..] else {
                continue;
            };
            let ms = (secs.parse::<f64>().unwrap_or(0.0) * 1000.0) as u64;
            seen.max_ms = seen.max_ms.max(ms);
            if status == "200" {
                // Pods by workload: `echo-…` counts as one.
                let who = if pod.starts_with("echo-") {
                    "pods"
                } else {
                    pod
                };
                *seen.by.entry(who.to_string()).or_default() += 1;
            } else {
                seen.failures
                    .push(format!("{ms} ms: status {status} from {pod}: {error}"));
            }
        }
        eprintln!(
            "{} callers: {:?}, {} failed, slowest {} ms",
            self.what,
            seen.by,
            seen.failures.len(),
            seen.max_ms
        );
        seen
    }
}

impl Seen {
    fn total(&self) -> usize {
        self.by.values().sum::<usize>() + self.failures.len()
    }

    fn assert_none_failed(&self, what: &str) {
        assert!(
            self.failures.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            self.failures.len(),
            self.total(),
            self.failures
        );
        assert!(
            self.total() > 20,
            "{what}: too few requests ({})",
            self.total()
        );
    }

    fn count(&self, who: &str) -> usize {
        self.by.get(who).copied().unwrap_or(0)
    }
}

/// Runs both streams of callers (without and with the routing header)
/// around `during`; see [`assert_none_failed`].
fn under_load(c: &Cluster, caller: &str, during: &dyn Fn()) -> (Seen, Seen) {
    let plain = Callers::start(c, caller, None, "header-less");
    let routed = Callers::start(c, caller, Some(HEADER), "header");
    std::thread::sleep(Duration::from_millis(500));
    during();
    std::thread::sleep(Duration::from_millis(1500));
    (plain.finish(), routed.finish())
}

fn assert_none_failed(what: &str, (plain, routed): &(Seen, Seen)) {
    plain.assert_none_failed(&format!("{what}, header-less callers"));
    routed.assert_none_failed(&format!("{what}, header callers"));
}

/// The binary's cluster; every point reroutes `echo`.
fn rh_alone() -> Option<SharedCluster> {
    shared_cluster_alone("rh", 2)
}

/// The caller pod and `echo` before any reroute.
struct Before {
    caller: String,
    echo: serde_json::Value,
}

static BEFORE: OnceLock<Before> = OnceLock::new();
/// The laptops' servers (running until the cluster goes).
static SERVERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The laptops with their run dirs in the cluster's state dir; their
/// servers started and `echo` recorded on first use.
fn setup(c: &Cluster) -> (Setup<'_>, &'static Before) {
    let s = Setup::shared(c, "reroute-handoff");
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    if servers.is_empty() {
        servers.push(s.echo_server(1, "laptop-alice", 3000));
        servers.push(s.echo_server(2, "laptop-bob", 3000));
    }
    drop(servers);
    let before = BEFORE.get_or_init(|| Before {
        caller: pod_of(c, "default", "caller"),
        echo: s.svc("default", "echo"),
    });
    (s, before)
}

/// 6 reroute right after `connect --kubeconfig K` uses K; another cluster is refused
#[test]
fn reroute_after_connect_uses_its_kubeconfig_and_refuses_another_cluster() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);
    // Right after `connect --kubeconfig K`: laptop 1 is not connected before.
    if s.at(1).connected() {
        ok(s.burrow(1, &["disconnect"]));
    }
    let kc = c.kubeconfig();
    let kc_text = kc.display().to_string();

    ok(s.burrow(1, &["connect", "--kubeconfig", &kc_text]));
    // No --kubeconfig (and no KUBECONFIG): the connection's.
    let o = run(s.burrow(1, &["reroute", "echo", "--port", "8080:3000"]));
    assert!(
        o.status.success(),
        "reroute without --kubeconfig: {}\n{}\n{}",
        stdout(&o),
        stderr(&o),
        s.daemon_log(1)
    );
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    // A kubeconfig naming another API server is refused, naming both.
    let text = std::fs::read_to_string(&kc).expect("kubeconfig");
    let other = s.dir.join("other-cluster.yaml");
    let changed = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("server:") {
                "    server: https://192.0.2.10:6443".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::File::create(&other)
        .and_then(|mut f| f.write_all(changed.as_bytes()))
        .expect("write kubeconfig");
    let o = run(s.burrow_with(
        1,
        Some(&other),
        &["reroute", "redis", "-n", "data", "--port", "6379:6390"],
    ));
    let err = stderr(&o);
    assert!(!o.status.success(), "another cluster must be refused");
    assert!(
        err.contains("burrow is connected to") && err.contains("192.0.2.10"),
        "{err}"
    );
    s.stop(1, "echo", "default");
    s.assert_restored("default", "echo", &b.echo);
}

/// 1 right after `reroute` returns, 20 of 20 requests reach the laptop (global, then header)
#[test]
fn right_after_reroute_returns_20_of_20_requests_reach_the_laptop() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);

    s.reroute(1, &["echo", "--port", "8080:3000"]);
    for i in 0..20 {
        assert_eq!(s.echo_pod(&[]), "laptop-alice", "global, request {i}");
    }
    s.stop(1, "echo", "default");
    s.reroute(1, HEADER_ROUTE);
    for i in 0..20 {
        assert_eq!(
            s.echo_pod(&["-H", HEADER]),
            "laptop-alice",
            "header, request {i}"
        );
    }
    s.stop(1, "echo", "default");
    s.assert_restored("default", "echo", &b.echo);
}

/// 2a global reroute on and off: no caller fails
#[test]
fn global_reroute_on_and_off_no_caller_fails() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);

    let seen = under_load(c, &b.caller, &|| {
        s.reroute(1, &["echo", "--port", "8080:3000"]);
        std::thread::sleep(Duration::from_secs(1));
        s.stop(1, "echo", "default");
    });
    s.assert_restored("default", "echo", &b.echo);
    assert_none_failed("global on/off", &seen);
    let (plain, routed) = seen;
    assert!(plain.count("laptop-alice") > 0 && routed.count("laptop-alice") > 0);
}

/// 2b header reroute on and off: no caller fails
#[test]
fn header_reroute_on_and_off_no_caller_fails() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);

    let seen = under_load(c, &b.caller, &|| {
        s.reroute(1, HEADER_ROUTE);
        std::thread::sleep(Duration::from_secs(1));
        s.stop(1, "echo", "default");
    });
    s.assert_restored("default", "echo", &b.echo);
    assert_none_failed("header on/off", &seen);
    let (plain, routed) = seen;
    assert_eq!(
        plain.count("laptop-alice"),
        0,
        "a header-less request reached the laptop"
    );
    assert!(routed.count("laptop-alice") > 0);
}

/// 2c --force takes a teammate's global route, then disconnect: no caller fails
#[test]
fn force_takes_a_teammates_route_then_disconnect_no_caller_fails() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);

    let seen = under_load(c, &b.caller, &|| {
        s.reroute(2, &["echo", "--port", "8080:3000"]);
        std::thread::sleep(Duration::from_secs(1));
        s.reroute(1, &["echo", "--port", "8080:3000", "--force"]);
        std::thread::sleep(Duration::from_secs(1));
        ok(s.burrow(1, &["disconnect"]));
    });
    // The teammate whose route was taken does not take it back
    // once the new holder left: the Service is given back.
    s.assert_restored("default", "echo", &b.echo);
    std::thread::sleep(Duration::from_secs(6));
    let listed = ok(s.burrow(2, &["reroute", "--list"]));
    let log = s.daemon_log(2);
    ok(s.burrow(2, &["disconnect"]));
    assert!(listed.contains("no reroutes"), "{listed}");
    assert!(log.contains("took this reroute over"), "{log}");
    s.assert_restored("default", "echo", &b.echo);
    assert_none_failed("takeover and disconnect", &seen);
    let (plain, _) = seen;
    assert!(plain.count("laptop-bob") > 0 && plain.count("laptop-alice") > 0);
}

/// 7 someone else puts the selector back: --list says so, --stop leaves it
#[test]
fn someone_else_puts_the_selector_back_list_says_so_stop_leaves_it() {
    let Some(ref c) = rh_alone() else { return };
    let (s, b) = setup(c);

    s.reroute(1, &["echo", "--port", "8080:3000"]);
    let newer = r#"{"spec":{"selector":{"app":"echo","track":"stable"}}}"#;
    ok(kubectl(
        c,
        &["patch", "svc", "echo", "--type", "merge", "-p", newer],
    ));
    let started = std::time::Instant::now();
    let listed = eventually(Duration::from_secs(2), "--list shows the change", || {
        let out = ok(s.burrow(1, &["reroute", "--list"]));
        out.contains("someone else put the selector back")
            .then_some(out)
    });
    eprintln!("--list after {:?}:\n{listed}", started.elapsed());
    assert!(listed.contains("app=echo,track=stable"), "{listed}");
    let json = ok(s.burrow(1, &["reroute", "--list", "--output", "json"]));
    assert!(json.contains("\"changed\""), "{json}");
    eventually(Duration::from_secs(15), "the daemon log says so", || {
        s.daemon_log(1)
            .contains("someone else put the selector back")
            .then_some(())
    });
    let out = s.stop(1, "echo", "default");
    assert!(
        out.contains("left in place") && out.contains("track=stable"),
        "{out}\ngateway log:\n{}",
        gateway_log(c, 40)
    );
    let sel = s.selector("default", "echo");
    assert_eq!(sel["track"], "stable", "the newer selector was overwritten");
    assert_no_leftovers(c, "default", "echo");
    let ann = s.svc("default", "echo")["metadata"]["annotations"].clone();
    assert!(
        !ann.to_string().contains("burrow.dev"),
        "burrow's annotations left: {ann}"
    );
    // Give the Service its own selector back for whatever follows.
    let original = serde_json::json!([
        {"op": "replace", "path": "/spec/selector", "value": b.echo["spec"]["selector"]}
    ]);
    ok(kubectl(
        c,
        &[
            "patch",
            "svc",
            "echo",
            "--type",
            "json",
            "-p",
            &original.to_string(),
        ],
    ));
    // The points that follow count every failed request from the first
    // one: wait until echo's pods are served again (the endpoint
    // controller and kube-proxy follow the selector back), five answers in
    // a row.
    eventually(Duration::from_secs(20), "echo served again", || {
        (0..5)
            .all(|_| {
                run(in_caller(
                    c,
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        "2",
                        "http://echo.default:8080/",
                    ],
                ))
                .status
                .success()
            })
            .then_some(())
    });
}
