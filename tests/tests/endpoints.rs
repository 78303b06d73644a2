//! The miniature cluster's endpoint controllers, as a user sees them with
//! kubectl (issue 14): a Service's selector removed and put back — what
//! burrow's reroute does — leaves what a real cluster leaves, and the
//! Service's name answers throughout.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
const MIRROR_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

fn json(c: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = ok(kubectl(c, &all));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

/// Every EndpointSlice of `default/echo`: (name, managed-by, sorted ready
/// addresses).
fn slices(c: &Cluster) -> Vec<(String, String, Vec<String>)> {
    let list = json(
        c,
        &[
            "get",
            "endpointslices",
            "-n",
            "default",
            "-l",
            &format!("{SERVICE_NAME}=echo"),
        ],
    );
    let mut out: Vec<(String, String, Vec<String>)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let mut ips: Vec<String> = s["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
                .filter_map(|e| e["addresses"][0].as_str().map(str::to_string))
                .collect();
            ips.sort();
            (
                s["metadata"]["name"].as_str().unwrap_or("").to_string(),
                s["metadata"]["labels"][MANAGED_BY]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                ips,
            )
        })
        .collect();
    out.sort();
    out
}

fn of(all: &[(String, String, Vec<String>)], manager: &str) -> Vec<(String, Vec<String>)> {
    all.iter()
        .filter(|(_, m, _)| m == manager)
        .map(|(n, _, ips)| (n.clone(), ips.clone()))
        .collect()
}

/// The ready pod IPs of `app=echo`, sorted.
fn echo_ips(c: &Cluster, want: usize) -> Vec<String> {
    eventually(Duration::from_secs(60), "echo pods ready", || {
        let pods = json(c, &["get", "pods", "-n", "default", "-l", "app=echo"]);
        let mut ips: Vec<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"].get("deletionTimestamp").is_none())
            .filter(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_string))
            .collect();
        ips.sort();
        (ips.len() == want).then_some(ips)
    })
}

/// `getent ahosts NAME` (A and AAAA, like redis-cli's resolver) in a tight
/// loop inside the caller pod's network namespace, until `stop` exists;
/// prints `ok=N fail=M` and every failure.
fn resolve_loop(c: &Cluster, name: &str, stop: &std::path::Path) -> Child {
    let caller = pod_of(c, "default", "caller");
    let script = format!(
        "i=0; f=0; while [ ! -e '{}' ]; do \
           if out=$(getent ahosts {name} 2>&1) && [ -n \"$out\" ]; then i=$((i+1)); \
           else f=$((f+1)); echo \"failure: $out\"; fi; \
         done; echo \"ok=$i fail=$f\"",
        stop.display()
    );
    let mut cmd = c.exec(&format!("pod/default/{caller}"), &["sh", "-c", &script]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("starting the resolve loop")
}

fn finish_loop(child: Child, stop: &std::path::Path) -> (u64, u64, String) {
    std::fs::write(stop, b"").expect("stop file");
    let out = child.wait_with_output().expect("resolve loop");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or("").to_string();
    let num = |key: &str| -> u64 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    (num("ok="), num("fail="), text)
}

fn curl_echo(c: &Cluster) -> String {
    ok(in_caller(
        c,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://echo.default:8080/",
        ],
    ))
}

#[test]
fn selector_removed_and_restored_like_a_real_cluster() {
    let Some(c) = cluster("eps", 1) else { return };
    let pods = echo_ips(&c, 2);
    let before = eventually(Duration::from_secs(20), "the controller's slice", || {
        let all = slices(&c);
        let ctl = of(&all, SLICE_CONTROLLER);
        (ctl.len() == 1 && ctl[0].1 == pods && of(&all, MIRROR_CONTROLLER).is_empty())
            .then_some(ctl)
    });
    let ep = json(&c, &["get", "endpoints", "echo", "-n", "default"]);
    assert_eq!(
        ep["metadata"]["labels"]["endpoints.kubernetes.io/managed-by"], "endpoint-controller",
        "{ep}"
    );
    assert!(
        ep["metadata"]["labels"]
            .get("endpointslice.kubernetes.io/skip-mirror")
            .is_none(),
        "the endpoints controller does not set skip-mirror: {ep}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let stop = dir.path().join("stop");
    let looping = resolve_loop(&c, "echo.default", &stop);

    // The selector goes: the Endpoints and the controller's slice stay as
    // they were, a mirrored slice with the pods' addresses appears, and
    // callers still reach the pods.
    ok(kubectl(
        &c,
        &[
            "patch",
            "svc",
            "echo",
            "-n",
            "default",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/spec/selector"}]"#,
        ],
    ));
    let mirrored = eventually(Duration::from_secs(10), "a mirrored slice", || {
        let m = of(&slices(&c), MIRROR_CONTROLLER);
        (m.len() == 1 && m[0].1 == pods).then_some(m)
    });
    let sl = json(
        &c,
        &["get", "endpointslice", &mirrored[0].0, "-n", "default"],
    );
    assert_eq!(
        sl["metadata"]["ownerReferences"][0]["kind"], "Endpoints",
        "{sl}"
    );
    assert_eq!(
        sl["metadata"]["labels"]["endpoints.kubernetes.io/managed-by"], "endpoint-controller",
        "the Endpoints' labels are mirrored: {sl}"
    );
    assert_eq!(of(&slices(&c), SLICE_CONTROLLER), before);
    let ep = json(&c, &["get", "endpoints", "echo", "-n", "default"]);
    assert_eq!(
        ep["subsets"][0]["addresses"].as_array().map(Vec::len),
        Some(2),
        "{ep}"
    );
    assert!(curl_echo(&c).contains("echo-"));

    // A new pod while there is no selector: nobody adds it anywhere.
    ok(kubectl(
        &c,
        &["scale", "deploy", "echo", "-n", "default", "--replicas=3"],
    ));
    let three = echo_ips(&c, 3);
    // A Service with a named port appears (as burrow's shadow Service does):
    // the cluster DNS replaces itself to serve its SRV record.
    ok(kubectl(
        &c,
        &[
            "create",
            "service",
            "clusterip",
            "dns-roll",
            "-n",
            "default",
            "--tcp=81:81",
        ],
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(of(&slices(&c), SLICE_CONTROLLER), before);
    assert_eq!(of(&slices(&c), MIRROR_CONTROLLER), mirrored);

    // The selector comes back: the mirrored slice goes, the controller's
    // slice (the same one) and the Endpoints list all three pods.
    ok(kubectl(
        &c,
        &[
            "patch",
            "svc",
            "echo",
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"selector":{"app":"echo"}}}"#,
        ],
    ));
    eventually(Duration::from_secs(10), "current slices", || {
        let all = slices(&c);
        let ctl = of(&all, SLICE_CONTROLLER);
        (of(&all, MIRROR_CONTROLLER).is_empty()
            && ctl.len() == 1
            && ctl[0].0 == before[0].0
            && ctl[0].1 == three)
            .then_some(())
    });
    eventually(Duration::from_secs(10), "current Endpoints", || {
        let ep = json(&c, &["get", "endpoints", "echo", "-n", "default"]);
        (ep["subsets"][0]["addresses"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    ok(kubectl(
        &c,
        &["delete", "service", "dns-roll", "-n", "default"],
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert!(curl_echo(&c).contains("echo-"));

    let (answered, failed, text) = finish_loop(looping, &stop);
    eprintln!("echo.default resolved {answered} times, {failed} failures");
    assert_eq!(failed, 0, "the Service's name stopped resolving:\n{text}");
    assert!(answered >= 20, "the loop hardly ran: {text}");
}
