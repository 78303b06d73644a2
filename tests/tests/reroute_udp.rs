//! Acceptance of rerouted UDP ports (issue 14, point 5), in one miniature
//! cluster with one laptop and the real binaries: the Service `duo` has
//! 9000/UDP (socat echo in its pod) and 9000/TCP (mc-echo); the laptop runs
//! its own UDP echo on 127.0.0.1:5300 that prefixes `laptop-`, so its
//! replies are told apart from the pod's. Callers are the `caller` pod.
//!
//! One cluster for the binary (common::shared), `duo` and the laptop's
//! echo set up by the first test; each acceptance point is a test of its
//! own (`cargo test --test reroute_udp refusals`):
//! - `refusals_an_ambiguous_port_and_a_header_reroute_of_a_udp_port`
//! - `a_rerouted_udp_port_reaches_the_laptop_tcp_still_the_pods` (5)
//! - `stop_gives_the_service_back`
//!
//! The refusals change nothing and share the cluster; the other two
//! reroute `duo` (each its own reroute) and take it alone, leaving `duo` as
//! it was.

mod common;

use std::process::Child;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

/// The Deployment and Service `duo`.
const DUO: &str = include_str!("../workloads/udp-tcp.yaml");

/// `socat` from the caller pod: one datagram `msg` to `duo.default:9000`,
/// the reply (empty when none came within 2 s).
fn udp_from_caller(c: &Cluster, msg: &str) -> String {
    let script = format!("echo {msg} | socat -t 2 - UDP:duo.default:9000");
    let o = run(in_caller(c, &["sh", "-c", &script]));
    stdout(&o).trim().to_string()
}

fn ru() -> Option<SharedCluster> {
    shared_cluster("ru", 1)
}

/// The binary's cluster, for the points that reroute `duo`.
fn ru_alone() -> Option<SharedCluster> {
    shared_cluster_alone("ru", 1)
}

/// `duo` before any reroute.
static BEFORE: OnceLock<Value> = OnceLock::new();
/// The laptop's UDP echo (running until the cluster goes).
static SERVER: Mutex<Option<Child>> = Mutex::new(None);

/// The laptop (run dir in the cluster's state dir); `duo` applied and
/// answering and the laptop's UDP echo up on first use; `duo` before any
/// reroute.
fn setup(c: &Cluster) -> (Setup<'_>, &'static Value) {
    let s = Setup::shared(c, "reroute-udp");
    let mut started = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    if started.is_none() {
        *started = Some(up(c, &s));
    }
    drop(started);
    let before = BEFORE.get_or_init(|| s.svc("default", "duo"));
    (s, before)
}

/// `duo` applied and answering, the laptop's UDP echo up.
fn up(c: &Cluster, s: &Setup) -> Child {
    kubectl_apply(c, DUO);
    eventually(
        Duration::from_secs(60),
        "duo answers on 9000/UDP and 9000/TCP",
        || {
            let udp = udp_from_caller(c, "hello");
            let tcp = run(in_caller(
                c,
                &["curl", "-s", "--max-time", "3", "http://duo.default:9000/"],
            ));
            (udp == "hello" && stdout(&tcp).contains("duo-")).then_some(())
        },
    );
    let server = s.spawn(
        1,
        &[],
        &[
            "socat",
            "UDP-RECVFROM:5300,bind=127.0.0.1,fork",
            "EXEC:sed -u s/^/laptop-/",
        ],
    );
    eventually(Duration::from_secs(10), "local UDP echo up", || {
        let o = run(s.on(
            1,
            &["sh", "-c", "echo up | socat -t 1 - UDP:127.0.0.1:5300"],
        ));
        (stdout(&o).trim() == "laptop-up").then_some(())
    });
    server
}

/// refusals: an ambiguous port number, a header reroute of a UDP port
#[test]
fn refusals_an_ambiguous_port_and_a_header_reroute_of_a_udp_port() {
    let Some(ref c) = ru() else { return };
    let (s, _) = setup(c);
    // No other point changes `duo` meanwhile (they take the cluster alone).
    let before = s.svc("default", "duo");
    let kc = c.kubeconfig();

    let o = run(s.burrow_with(1, Some(&kc), &["reroute", "duo", "--port", "9000:5300"]));
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("port 9000 for TCP and for UDP") && err.contains("9000/udp"),
        "{err}"
    );
    let o = run(s.burrow_with(
        1,
        Some(&kc),
        &[
            "reroute",
            "duo",
            "--port",
            "9000/udp:5300",
            "--header",
            "x-burrow-route=alice",
        ],
    ));
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    eprintln!("header reroute of a UDP port: {err}");
    assert!(
        err.contains("is UDP")
            && err.contains("header reroutes are HTTP-only")
            && err.contains("a global reroute (without --header) works for UDP"),
        "{err}"
    );
    let now = s.svc("default", "duo");
    assert_eq!(
        now["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"],
        "the Service changed"
    );
    assert_no_leftovers(c, "default", "duo");
}

/// 5 a rerouted UDP port reaches the laptop's UDP echo, TCP still the pods
#[test]
fn a_rerouted_udp_port_reaches_the_laptop_tcp_still_the_pods() {
    let Some(ref c) = ru_alone() else { return };
    let (s, before) = setup(c);

    let out = s.reroute(1, &["duo", "--port", "9000/udp:5300"]);
    assert!(
        out.contains("rerouted default/duo port 9000/udp to 127.0.0.1:5300"),
        "{out}"
    );
    // Right after `reroute` returns, every datagram is the laptop's.
    for i in 0..5 {
        let msg = format!("ping-{i}");
        assert_eq!(
            udp_from_caller(c, &msg),
            format!("laptop-{msg}"),
            "datagram {i} after reroute returned\ndaemon log:\n{}",
            s.daemon_log(1)
        );
    }
    // The TCP port of the same number still reaches the pod.
    let body = s.curl_in_caller(&["http://duo.default:9000/"]);
    assert!(pod_field(&body).starts_with("duo-"), "{body}");
    // The slice lists each port with its protocol.
    let slice = ok(kubectl(
        c,
        &[
            "get",
            "endpointslice",
            "duo-burrow",
            "-n",
            "default",
            "-o",
            "json",
        ],
    ));
    let slice: Value = serde_json::from_str(&slice).expect("slice json");
    let mut protocols: Vec<(String, String)> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["protocol"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    protocols.sort();
    assert_eq!(
        protocols,
        [("tcp".into(), "TCP".into()), ("udp".into(), "UDP".into())]
    );
    let list = ok(s.burrow(1, &["reroute", "--list", "-o", "json"]));
    let list: Value = serde_json::from_str(&list).expect("list json");
    assert_eq!(list[0]["service"], "duo", "{list}");
    assert_eq!(list[0]["port"], 9000, "{list}");
    assert_eq!(list[0]["protocol"], "udp", "{list}");
    assert_eq!(list[0]["local_port"], 5300, "{list}");
    let text = ok(s.burrow(1, &["reroute", "--list"]));
    assert!(
        text.lines()
            .any(|l| l.contains("default/duo") && l.contains(" udp ")),
        "{text}"
    );
    // Leave `duo` as it was.
    s.stop(1, "duo", "default");
    s.assert_restored("default", "duo", before);
}

/// --stop gives the Service back
#[test]
fn stop_gives_the_service_back() {
    let Some(ref c) = ru_alone() else { return };
    let (s, before) = setup(c);
    s.reroute(1, &["duo", "--port", "9000/udp:5300"]);

    let out = s.stop(1, "duo", "default");
    assert!(out.contains("restored default/duo"), "{out}");
    s.assert_restored("default", "duo", before);
    // The pod's echo again (a bound for a hang: the endpoints are
    // restored before --stop returns).
    eventually(Duration::from_secs(10), "the pod's UDP echo again", || {
        (udp_from_caller(c, "back") == "back").then_some(())
    });
    let body = s.curl_in_caller(&["http://duo.default:9000/"]);
    assert!(pod_field(&body).starts_with("duo-"), "{body}");
}
