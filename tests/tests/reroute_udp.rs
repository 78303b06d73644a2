//! Acceptance of rerouted UDP ports (issue 14, point 5), in one miniature
//! cluster with one laptop and the real binaries: the Service `duo` has
//! 9000/UDP (socat echo in its pod) and 9000/TCP (mc-echo); the laptop runs
//! its own UDP echo on 127.0.0.1:5300 that prefixes `laptop-`, so its
//! replies are told apart from the pod's. Callers are the `caller` pod.
//!
//! Every point runs even when an earlier one failed; the failures are
//! listed at the end.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The Deployment and Service `duo`.
const DUO: &str = include_str!("../workloads/udp-tcp.yaml");

/// `socat` from the caller pod: one datagram `msg` to `duo.default:9000`,
/// the reply (empty when none came within 2 s).
fn udp_from_caller(c: &burrow_tests::cluster::Cluster, msg: &str) -> String {
    let script = format!("echo {msg} | socat -t 2 - UDP:duo.default:9000");
    let o = run(in_caller(c, &["sh", "-c", &script]));
    stdout(&o).trim().to_string()
}

#[test]
fn reroute_udp_acceptance() {
    let Some(c) = cluster("ru", 1) else { return };
    let s = Setup::new(&c);
    kubectl_apply(&c, DUO);
    eventually(
        Duration::from_secs(60),
        "duo answers on 9000/UDP and 9000/TCP",
        || {
            let udp = udp_from_caller(&c, "hello");
            let tcp = run(in_caller(
                &c,
                &["curl", "-s", "--max-time", "3", "http://duo.default:9000/"],
            ));
            (udp == "hello" && stdout(&tcp).contains("duo-")).then_some(())
        },
    );
    let mut server = s.spawn(
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
    let before = s.svc("default", "duo");
    let kc = c.kubeconfig();

    let mut points = Points::new("reroute_udp");
    let mut point = |name: &str, f: &dyn Fn()| points.point(name, f);

    point(
        "refusals: an ambiguous port number, a header reroute of a UDP port",
        &|| {
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
            assert_no_leftovers(&c, "default", "duo");
        },
    );

    point(
        "5 a rerouted UDP port reaches the laptop's UDP echo, TCP still the pods",
        &|| {
            let out = s.reroute(1, &["duo", "--port", "9000/udp:5300"]);
            assert!(
                out.contains("rerouted default/duo port 9000/udp to 127.0.0.1:5300"),
                "{out}"
            );
            // Right after `reroute` returns, every datagram is the laptop's.
            for i in 0..5 {
                let msg = format!("ping-{i}");
                assert_eq!(
                    udp_from_caller(&c, &msg),
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
                &c,
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
        },
    );

    point("--stop gives the Service back", &|| {
        let out = s.stop(1, "duo", "default");
        assert!(out.contains("restored default/duo"), "{out}");
        s.assert_restored("default", "duo", &before);
        // The pod's echo again (a bound for a hang: the endpoints are
        // restored before --stop returns).
        eventually(Duration::from_secs(10), "the pod's UDP echo again", || {
            (udp_from_caller(&c, "back") == "back").then_some(())
        });
        let body = s.curl_in_caller(&["http://duo.default:9000/"]);
        assert!(pod_field(&body).starts_with("duo-"), "{body}");
    });

    let _ = run(s.burrow(1, &["disconnect"]));
    let _ = server.kill();
    let _ = server.wait();
    points.finish();
}
