//! Acceptance of `burrow reroute` (issue 6), in one miniature cluster with
//! two laptops and the real binaries. Callers are the `caller` pod; the
//! laptops run their own `mc-echo` (answering with POD_NAME laptop-alice /
//! laptop-bob) and redis-server on 127.0.0.1, started by the first test.
//!
//! One cluster for the binary (common::shared); each acceptance point is a
//! test of its own (`cargo test --test reroute header_routes`):
//! - `a_developer_without_patch_rights_gets_403_and_nothing_changes` (5)
//! - `errors_name_the_missing_service_or_port`
//! - `global_reroute_reaches_the_laptop_and_stop_restores_exactly` (1)
//! - `a_service_made_by_kubectl_create_service_is_rerouted`
//! - `nothing_listening_locally_is_a_502_and_a_log_line`
//! - `raw_tcp_redis_reaches_the_laptops_redis_server` (3)
//! - `header_routes_of_two_laptops_keep_alive_and_h2c` (2)
//! - `kill_9_of_the_daemon_the_lease_runs_out_and_the_service_is_restored` (4a)
//! - `gateway_pod_deleted_the_reroute_resumes_on_the_new_pod` (4b)
//! - `disconnect_and_uninstall_restore` (6)
//!
//! The two that only read take the cluster shared; every point that
//! reroutes a Service, kills a daemon, replaces the gateway pod or
//! uninstalls takes it alone and leaves every Service as it was
//! (`reroute` connects a laptop that is not connected, and installs the
//! gateway when it is missing). The Services and pods are compared with
//! what they were before the binary's first reroute.

mod common;

use std::process::Child;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

/// The binary's cluster, shared with the other points.
fn rr() -> Option<SharedCluster> {
    shared_cluster("rr", 2)
}

/// The binary's cluster, for points that reroute or disturb it.
fn rr_alone() -> Option<SharedCluster> {
    shared_cluster_alone("rr", 2)
}

/// The Services and pods before any reroute.
struct Before {
    echo: Value,
    redis: Value,
    pods: Vec<(String, String)>,
}

static BEFORE: OnceLock<Before> = OnceLock::new();
/// The laptops' servers (running until the cluster goes).
static SERVERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The laptops with their run dirs in `<state dir>/<dir>`; the laptops'
/// servers started and the cluster's state recorded on first use.
fn setup<'a>(c: &'a Cluster, dir: &str) -> (Setup<'a>, &'static Before) {
    let s = Setup::shared(c, dir);
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    if servers.is_empty() {
        servers.push(s.echo_server(1, "laptop-alice", 3000));
        servers.push(s.echo_server(2, "laptop-bob", 3000));
        servers.push(s.spawn(
            1,
            &[],
            &[
                "redis-server",
                "--port",
                "6390",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        ));
        eventually(Duration::from_secs(10), "local redis up", || {
            run(s.on(1, &["redis-cli", "-p", "6390", "ping"]))
                .status
                .success()
                .then_some(())
        });
        ok(s.on(
            1,
            &["redis-cli", "-p", "6390", "set", "whoami", "the-laptop"],
        ));
    }
    drop(servers);
    // Recorded by the first point: no point leaves a reroute behind.
    let before = BEFORE.get_or_init(|| Before {
        echo: s.svc("default", "echo"),
        redis: s.svc("data", "redis"),
        pods: s.pods(),
    });
    (s, before)
}

/// 5 no permission to patch Services: 403, nothing changes
#[test]
fn a_developer_without_patch_rights_gets_403_and_nothing_changes() {
    let Some(ref c) = rr() else { return };
    // Laptop 2 with a run dir of its own that nothing ever connects:
    // the refusal must start no daemon there.
    let (s, b) = setup(c, "reroute-limited");
    // No other point changes `echo` meanwhile (they take the cluster alone).
    let echo_before = s.svc("default", "echo");
    let limited = c.limited_kubeconfig();
    let o = run(s.burrow_with(
        2,
        Some(&limited),
        &["reroute", "echo", "--port", "8080:3000"],
    ));
    assert!(
        !o.status.success(),
        "the developer's reroute must fail: {}",
        stdout(&o)
    );
    let err = stderr(&o);
    eprintln!("developer's reroute: {err}");
    assert!(
        err.contains("403") && err.contains("patch") && err.contains("services"),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    let now = s.svc("default", "echo");
    assert_eq!(
        now["metadata"]["resourceVersion"], echo_before["metadata"]["resourceVersion"],
        "the Service changed"
    );
    s.assert_restored("default", "echo", &b.echo);
    assert!(
        !s.run_dir(2).join("daemon.sock").exists(),
        "a daemon was started"
    );
}

/// errors: Service missing, port missing
#[test]
fn errors_name_the_missing_service_or_port() {
    let Some(ref c) = rr() else { return };
    let (s, _) = setup(c, "reroute");
    let kc = c.kubeconfig();
    let o = run(s.burrow_with(1, Some(&kc), &["reroute", "nope", "--port", "80:3000"]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("Service nope not found in namespace default") && err.contains("echo"),
        "{err}"
    );
    let o = run(s.burrow_with(1, Some(&kc), &["reroute", "echo", "--port", "9999:3000"]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("has no port 9999") && err.contains("8080 (http, TCP)"),
        "{err}"
    );
}

/// 1 global reroute reaches the laptop; --stop restores exactly
#[test]
fn global_reroute_reaches_the_laptop_and_stop_restores_exactly() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    let out = s.reroute(1, &["echo", "--port", "http:3000"]);
    assert!(out.contains("rerouted default/echo port 8080"), "{out}");
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    // A second laptop's global reroute is refused, naming the holder.
    let kc = c.kubeconfig();
    let o = run(s.burrow_with(2, Some(&kc), &["reroute", "echo", "--port", "8080:3000"]));
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("already rerouted to laptop")
            && err.contains("since")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    let list = ok(s.burrow(1, &["reroute", "--list", "-o", "json"]));
    let list: Value = serde_json::from_str(&list).expect("list json");
    assert_eq!(list[0]["service"], "echo", "{list}");
    assert_eq!(list[0]["mine"], true, "{list}");
    let out = s.stop(1, "echo", "default");
    assert!(out.contains("restored default/echo"), "{out}");
    assert_ne!(s.echo_pod(&[]), "laptop-alice");
    assert!(s.echo_pod(&[]).starts_with("echo-"));
    s.assert_restored("default", "echo", &b.echo);
    assert_eq!(s.pods(), b.pods, "pods were restarted or replaced");
}

/// A Service made by `kubectl create service` (its port named `8080-8080`,
/// an RFC 1123 label that is not an IANA service name) is rerouted and
/// restored like any other
#[test]
fn a_service_made_by_kubectl_create_service_is_rerouted() {
    let Some(ref c) = rr_alone() else { return };
    let (s, _) = setup(c, "reroute");
    ok(kubectl(
        c,
        &[
            "create",
            "service",
            "clusterip",
            "echo-kc",
            "--tcp=8080:8080",
        ],
    ));
    ok(kubectl(
        c,
        &["set", "selector", "service", "echo-kc", "app=echo"],
    ));
    let url = "http://echo-kc.default:8080/";
    let out = s.reroute(1, &["echo-kc", "--port", "8080:3000"]);
    assert!(out.contains("rerouted default/echo-kc port 8080"), "{out}");
    assert_eq!(pod_field(&s.curl_in_caller(&[url])), "laptop-alice");
    let out = s.stop(1, "echo-kc", "default");
    assert!(out.contains("restored default/echo-kc"), "{out}");
    let pod = pod_field(&s.curl_in_caller(&[url]));
    assert!(pod.starts_with("echo-"), "{pod}");
    ok(kubectl(c, &["delete", "service", "echo-kc"]));
}

/// nothing listening locally: 502 at once, a log line on the laptop
#[test]
fn nothing_listening_locally_is_a_502_and_a_log_line() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    s.reroute(1, &["echo", "--port", "8080:3999", "--protocol", "http"]);
    let o = run(in_caller(
        c,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "http://echo.default:8080/",
        ],
    ));
    assert_eq!(stdout(&o).trim(), "502", "{}", stderr(&o));
    let log = std::fs::read_to_string(s.run_dir(1).join("daemon.log")).unwrap_or_default();
    assert!(log.contains("nothing answers on 127.0.0.1:3999"), "{log}");
    s.stop(1, "echo", "default");
    s.assert_restored("default", "echo", &b.echo);
}

/// 3 raw TCP: redis.data:6379 to the laptop's redis-server
#[test]
fn raw_tcp_redis_reaches_the_laptops_redis_server() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    s.reroute(1, &["redis", "-n", "data", "--port", "6379:6390"]);
    let got = ok(in_caller(
        c,
        &["redis-cli", "-h", "redis.data", "get", "whoami"],
    ));
    assert_eq!(got.trim(), "the-laptop");
    s.stop(1, "redis", "data");
    let got = ok(in_caller(
        c,
        &["redis-cli", "-h", "redis.data", "get", "whoami"],
    ));
    assert_eq!(got.trim(), "", "the cluster's redis has no such key");
    s.assert_restored("data", "redis", &b.redis);
}

/// 2 header routes of two laptops, keep-alive and h2c
#[test]
fn header_routes_of_two_laptops_keep_alive_and_h2c() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    s.reroute(
        1,
        &[
            "echo",
            "--port",
            "8080:3000",
            "--header",
            "x-burrow-route=alice",
        ],
    );
    s.reroute(
        2,
        &[
            "echo",
            "--port",
            "8080:3000",
            "--header",
            "x-burrow-route=bob",
        ],
    );
    let url = "http://echo.default:8080/";
    // One curl, one connection, four requests.
    let o = run(in_caller(
        c,
        &[
            "curl",
            "-sS",
            "-v",
            "--max-time",
            "10",
            url,
            "-H",
            "x-burrow-route: alice",
            "--next",
            url,
            "--next",
            url,
            "-H",
            "x-burrow-route: bob",
            "--next",
            url,
        ],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let got = pods_in(&stdout(&o));
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0], "laptop-alice");
    assert!(got[1].starts_with("echo-"), "{got:?}");
    assert_eq!(got[2], "laptop-bob");
    assert!(got[3].starts_with("echo-"), "{got:?}");
    let verbose = stderr(&o);
    assert!(
        verbose.matches("Re-using existing connection").count() >= 3,
        "not one keep-alive connection:\n{verbose}"
    );
    // h2c with prior knowledge: the same per stream.
    let h2 = ["--http2-prior-knowledge"];
    for (header, want) in [("alice", "laptop-alice"), ("bob", "laptop-bob")] {
        let h = format!("x-burrow-route: {header}");
        let body = s.curl_in_caller(&[h2[0], url, "-H", &h]);
        assert_eq!(pod_field(&body), want);
        let v: Value = serde_json::from_str(body.trim()).expect("json");
        assert_eq!(v["version"], "HTTP/2.0");
    }
    assert!(pod_field(&s.curl_in_caller(&[h2[0], url])).starts_with("echo-"));
    s.stop(2, "echo", "default");
    assert_eq!(s.echo_pod(&["-H", "x-burrow-route: alice"]), "laptop-alice");
    s.stop(1, "echo", "default");
    s.assert_restored("default", "echo", &b.echo);
}

/// 4a kill -9 of the daemon: the lease runs out, the Service is restored
#[test]
fn kill_9_of_the_daemon_the_lease_runs_out_and_the_service_is_restored() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    s.reroute(1, &["echo", "--port", "8080:3000"]);
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    let pid = s.daemon_pid(1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the daemon");
    let killed = Instant::now();
    // A bound for a hang, not a performance assertion: the lease is 12 s
    // (the gateway's `reroute::LEASE`), plus the reaper tick and the restore.
    eventually(
        Duration::from_secs(30),
        "selector restored after the lease",
        || (!s.selector("default", "echo").is_null()).then_some(()),
    );
    eprintln!("restored {:?} after kill -9", killed.elapsed());
    s.assert_restored("default", "echo", &b.echo);
    assert!(s.echo_pod(&[]).starts_with("echo-"));
    // The next command cleans the dead daemon's leftovers.
    ok(s.burrow(1, &["disconnect"]));
}

/// 4b gateway pod deleted: the reroute resumes on the new pod
#[test]
fn gateway_pod_deleted_the_reroute_resumes_on_the_new_pod() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    s.reroute(2, &["echo", "--port", "8080:3000"]);
    assert_eq!(s.echo_pod(&[]), "laptop-bob");
    let old = ok(kubectl(
        c,
        &[
            "get",
            "pods",
            "-n",
            "burrow-system",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    ));
    ok(kubectl(
        c,
        &[
            "delete",
            "pod",
            "-n",
            "burrow-system",
            old.trim(),
            "--wait=false",
        ],
    ));
    eventually(
        Duration::from_secs(90),
        "laptop-bob answers through the new gateway pod",
        || {
            let pods = run(kubectl(
                c,
                &["get", "pods", "-n", "burrow-system", "-o", "name"],
            ));
            if stdout(&pods).contains(old.trim()) {
                return None;
            }
            let o = run(in_caller(
                c,
                &["curl", "-s", "--max-time", "3", "http://echo.default:8080/"],
            ));
            let body = stdout(&o);
            (o.status.success() && body.contains("laptop-bob")).then_some(())
        },
    );
    let st: Value =
        serde_json::from_str(&ok(s.burrow(2, &["status", "-o", "json"]))).expect("status");
    assert!(st["reconnects"].as_u64().unwrap_or(0) >= 1, "{st}");
    // Leave the Service as it was for the next point.
    s.stop(2, "echo", "default");
    s.assert_restored("default", "echo", &b.echo);
}

/// 6 disconnect and uninstall restore
#[test]
fn disconnect_and_uninstall_restore() {
    let Some(ref c) = rr_alone() else { return };
    let (s, b) = setup(c, "reroute");
    // Laptop 2 holds a reroute when it disconnects.
    s.reroute(2, &["echo", "--port", "8080:3000"]);
    ok(s.burrow(2, &["disconnect"]));
    s.assert_restored("default", "echo", &b.echo);
    s.reroute(1, &["echo", "--port", "8080:3000"]);
    s.reroute(1, &["redis", "-n", "data", "--port", "6379:6390"]);
    let kc = c.kubeconfig();
    let out = ok(s.burrow_with(1, Some(&kc), &["uninstall"]));
    assert!(
        out.contains("restoring rerouted Service default/echo"),
        "{out}"
    );
    s.assert_restored("default", "echo", &b.echo);
    s.assert_restored("data", "redis", &b.redis);
    let _ = run(s.burrow(1, &["disconnect"]));
    assert_eq!(s.pods(), b.pods, "pods were restarted or replaced");
}
