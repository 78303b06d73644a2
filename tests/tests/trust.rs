//! Acceptance of issue 13 (trust), points 1–3, in one miniature cluster
//! with two laptops and the real binaries: laptop 1 reroutes `echo` to its
//! own server and also runs a server on 0.0.0.0:7200 it never reroutes;
//! the attackers are the `caller` pod and laptop 2 (through its own
//! tunnel), trying every TCP port of the gateway pod and laptop 2's own API.
//!
//! One cluster for the binary (common::shared): the first test connects
//! both laptops and reroutes `echo` to laptop 1, and every acceptance point
//! is a test of its own over that state (`cargo test --test trust
//! server_on_7200`):
//! - `nothing_on_the_gateway_pod_or_in_laptop_2s_tunnel_abuses_laptop_1` (1)
//! - `laptop_2_cannot_act_on_laptop_1s_reroute_or_a_service_not_rerouted_to_it` (2)
//! - `laptop_1s_server_on_7200_is_unreachable_from_the_cluster` (3)
//!
//! None of them changes anything when burrow holds (that is what they
//! check), so they share the cluster and may run at the same time.

mod common;

use std::process::Child;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use burrow_tests::cluster::Cluster;
use common::*;
use serde_json::Value;

/// What laptop 1's secret server answers with.
const SECRET: &str = "secret-7200";
/// The gateway's tunnel address (first host of the default tunnel network).
const GATEWAY_TUNNEL: &str = "198.19.0.1";

/// Requests an attacker sends to each port: (method, path, body).
fn attacks(victim_key: &str, victim_key_url: &str) -> Vec<(&'static str, String, String)> {
    let plant = serde_json::json!({
        "public_key": victim_key,
        "namespace": "default", "service": "echo",
        "ports": [{"name": "http", "port": 8080}], "port": 8080,
        "laptop_port": 7200, "protocol": "tcp", "force": true,
        "shadow_ip": "10.244.0.1",
    })
    .to_string();
    let hostile = serde_json::json!({
        "public_key": victim_key,
        "namespace": "kube-system", "service": "kube-dns#",
        "ports": [{"name": "dns", "port": 53}], "port": 53, "laptop_port": 7200,
    })
    .to_string();
    vec![
        ("GET", "/v1/info".into(), String::new()),
        ("GET", "/v1/reroutes".into(), String::new()),
        ("GET", format!("/v1/peers/{victim_key_url}"), String::new()),
        ("GET", "/metrics".into(), String::new()),
        (
            "POST",
            "/v1/peers".into(),
            format!(r#"{{"public_key":"{victim_key}","name":"mallory","nonce":"","proof":""}}"#),
        ),
        ("POST", "/v1/reroutes".into(), plant),
        ("POST", "/v1/reroutes".into(), hostile),
        (
            "POST",
            "/v1/reroutes/stop".into(),
            format!(r#"{{"public_key":"{victim_key}"}}"#),
        ),
        (
            "POST",
            "/v1/reroutes/stop".into(),
            r#"{"namespace":"kube-system","service":"kube-dns#"}"#.into(),
        ),
        (
            "POST",
            "/v1/leases".into(),
            format!(r#"{{"public_key":"{victim_key}"}}"#),
        ),
        (
            "DELETE",
            format!("/v1/peers/{victim_key_url}"),
            String::new(),
        ),
    ]
}

/// `curl` of one attack request; its output (status line, headers, body)
/// whatever happened.
fn curl_args(url: &str, method: &str, body: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "curl",
        "-sS",
        "-i",
        "--max-time",
        "3",
        "-X",
        method,
        "-H",
        "content-type: application/json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !body.is_empty() {
        v.push("--data".into());
        v.push(body.to_string());
    }
    v.push(url.to_string());
    v
}

/// The binary's cluster; no point changes it.
fn tr() -> Option<SharedCluster> {
    shared_cluster("tr", 2)
}

/// Both laptops connected, `echo` rerouted to laptop 1, and what the
/// points look for.
struct Fixture {
    key: String,
    key_url: String,
    laptop1_addr: String,
    hostname: String,
    /// How the gateway would name laptop 1 (`@<hostname>`).
    name: String,
    gw_ip: String,
    /// Every TCP port of the gateway pod.
    ports: Vec<u64>,
    /// The reroute listeners among them.
    listeners: Vec<u64>,
    echo_before: Value,
    dns_before: Value,
    redis_before: Value,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();
/// Laptop 1's servers (running until the cluster goes).
static SERVERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The laptops (run dirs in the cluster's state dir) and the fixture,
/// set up by the first point.
fn setup(c: &Cluster) -> (Setup<'_>, &'static Fixture) {
    let s = Setup::shared(c, "trust");
    let f = FIXTURE.get_or_init(|| fixture(&s));
    (s, f)
}

fn fixture(s: &Setup) -> Fixture {
    let mut servers = SERVERS.lock().unwrap_or_else(|p| p.into_inner());
    servers.push(s.echo_server(1, "laptop-alice", 3000));
    // Listens on 0.0.0.0:7200 and is never rerouted.
    servers.push(s.echo_server(1, SECRET, 7200));
    drop(servers);
    let kc = s.c.kubeconfig().display().to_string();
    for n in [1, 2] {
        let o = run(s.burrow(n, &["connect", "--kubeconfig", &kc]));
        assert!(
            o.status.success(),
            "connect laptop {n}: {}\n{}\n{}",
            stdout(&o),
            stderr(&o),
            s.daemon_log(n)
        );
    }
    // No --kubeconfig: the one `connect` was given is used.
    ok(s.burrow(1, &["reroute", "echo", "--port", "8080:3000"]));
    eventually(
        Duration::from_secs(15),
        "the caller reaches laptop 1",
        || (s.echo_pod(&[]) == "laptop-alice").then_some(()),
    );

    // Laptop 1 as the gateway could know it: key, name, tunnel address.
    let private = std::fs::read_to_string(s.run_dir(1).join("key")).expect("laptop 1's key");
    let private: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(private.trim())
        .expect("base64")
        .try_into()
        .expect("32 bytes");
    let public =
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(private));
    let key = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
    let key_url = base64::engine::general_purpose::URL_SAFE.encode(public.as_bytes());
    let status: Value =
        serde_json::from_str(&ok(s.burrow(1, &["status", "-o", "json"]))).expect("status json");
    let laptop1_addr = status["tunnel_address"]
        .as_str()
        .expect("tunnel address")
        .to_string();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let name = format!("@{hostname}");

    let gw_pod: Value = serde_json::from_str(&ok(kubectl(
        s.c,
        &["get", "pods", "-n", "burrow-system", "-o", "json"],
    )))
    .expect("pods json");
    let gw_ip = gw_pod["items"][0]["status"]["podIP"]
        .as_str()
        .expect("gateway pod IP")
        .to_string();
    // Every TCP port of the gateway pod: its declared ones, the control
    // port, and the reroute listeners burrow's EndpointSlice names.
    let slice: Value = serde_json::from_str(&ok(kubectl(
        s.c,
        &["get", "endpointslice", "echo-burrow", "-o", "json"],
    )))
    .expect("slice json");
    let mut ports: Vec<u64> = vec![51821, 51822, 9090];
    ports.extend(
        slice["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["port"].as_u64()),
    );
    let listeners: Vec<u64> = ports[3..].to_vec();
    assert!(!listeners.is_empty(), "no reroute listener in {slice}");

    let echo_before = s.svc("default", "echo");
    let dns_before = s.svc("kube-system", "kube-dns");
    let redis_before = s.svc("data", "redis");
    Fixture {
        key,
        key_url,
        laptop1_addr,
        hostname,
        name,
        gw_ip,
        ports,
        listeners,
        echo_before,
        dns_before,
        redis_before,
    }
}

impl Fixture {
    /// Fails when `out` names laptop 1 or comes from its 7200.
    fn leaks(&self, who: &str, url: &str, out: &str) {
        let Fixture {
            key,
            key_url,
            hostname,
            name,
            ..
        } = self;
        assert!(
            !out.contains(key.as_str()),
            "{who}: {url} named laptop 1's key:\n{out}"
        );
        assert!(
            !out.contains(key_url.as_str()),
            "{who}: {url} named laptop 1's key:\n{out}"
        );
        assert!(
            hostname.is_empty() || !out.contains(name.as_str()),
            "{who}: {url} named a laptop ({name}):\n{out}"
        );
        assert!(
            !out.contains(SECRET),
            "{who}: {url} reached laptop 1's 7200:\n{out}"
        );
    }
}

/// 1 nothing on the gateway pod or in laptop 2's tunnel abuses laptop 1
#[test]
fn nothing_on_the_gateway_pod_or_in_laptop_2s_tunnel_abuses_laptop_1() {
    let Some(ref c) = tr() else { return };
    let (s, f) = setup(c);
    let (key, key_url, gw_ip) = (&f.key, &f.key_url, &f.gw_ip);
    let (ports, listeners) = (f.ports.clone(), &f.listeners);
    let (echo_before, dns_before) = (&f.echo_before, &f.dns_before);
    let leaks = |who: &str, url: &str, out: &str| f.leaks(who, url, out);

    for (i, (method, path, body)) in attacks(key, key_url).into_iter().enumerate() {
        for port in &ports {
            // The framed port speaks length-framed WireGuard, not
            // HTTP: one try is enough (each waits for curl's
            // timeout).
            if *port == 51821 && i > 0 {
                continue;
            }
            let url = format!("http://{gw_ip}:{port}{path}");
            let args = curl_args(&url, method, &body);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let from_pod = run(in_caller(c, &refs));
            let from_laptop2 = run(s.on(2, &refs));
            if listeners.contains(port) {
                // The rerouted Service answers (laptop 1's echo
                // server, which shows the path asked): it must be
                // that server, never another port of laptop 1.
                for o in [&from_pod, &from_laptop2] {
                    assert!(!stdout(o).contains(SECRET), "{url}: {}", stdout(o));
                }
                continue;
            }
            leaks("caller pod", &url, &stdout(&from_pod));
            leaks("laptop 2", &url, &stdout(&from_laptop2));
            if *port == 51822 {
                assert!(
                    !from_pod.status.success() && !from_laptop2.status.success(),
                    "the registration port answered on the pod IP: {}{}",
                    stdout(&from_pod),
                    stdout(&from_laptop2)
                );
            }
        }
        // Laptop 2's own API in the tunnel acts on laptop 2 only.
        if method == "DELETE" {
            continue;
        }
        let url = format!("http://{GATEWAY_TUNNEL}:51822{path}");
        let args = curl_args(&url, method, &body);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = stdout(&run(s.on(2, &refs)));
        leaks("laptop 2's API", &url, &out);
        if method == "POST" && path == "/v1/reroutes" {
            assert!(
                out.starts_with("HTTP/1.1 4"),
                "laptop 2 planted a reroute: {out}"
            );
        }
        // The caller pod cannot reach the tunnel address at all.
        let out = run(in_caller(c, &refs));
        assert!(!out.status.success(), "the caller reached {url}");
    }
    // 15 s later, laptop 1's reroute still holds: its lease was
    // neither stopped nor taken.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    for (ns, name, before) in [
        ("default", "echo", &echo_before),
        ("kube-system", "kube-dns", &dns_before),
    ] {
        let now = s.svc(ns, name);
        assert_eq!(
            now["metadata"]["uid"], before["metadata"]["uid"],
            "{ns}/{name} replaced"
        );
        assert_eq!(now["spec"], before["spec"], "{ns}/{name} changed");
    }
    let list = ok(s.burrow(1, &["reroute", "--list", "-o", "json"]));
    assert!(list.contains("\"echo\""), "{list}");
}

/// 2 laptop 2 cannot act on laptop 1's reroute or on a Service not rerouted to it
#[test]
fn laptop_2_cannot_act_on_laptop_1s_reroute_or_a_service_not_rerouted_to_it() {
    let Some(ref c) = tr() else { return };
    let (s, f) = setup(c);
    let (echo_before, redis_before) = (&f.echo_before, &f.redis_before);

    // Its user may patch Services, but the gateway only acts on
    // what carries laptop 2's record: stopping echo stops nothing.
    let stop = curl_args(
        &format!("http://{GATEWAY_TUNNEL}:51822/v1/reroutes/stop"),
        "POST",
        r#"{"namespace":"default","service":"echo"}"#,
    );
    let refs: Vec<&str> = stop.iter().map(String::as_str).collect();
    let out = ok(s.on(2, &refs));
    assert!(out.contains(r#""stopped":[]"#), "{out}");
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
    // A Service without laptop 2's record: refused, unchanged.
    let plant = curl_args(
        &format!("http://{GATEWAY_TUNNEL}:51822/v1/reroutes"),
        "POST",
        r#"{"namespace":"data","service":"redis","ports":[{"name":"redis","port":6379}],"port":6379,"laptop_port":7200}"#,
    );
    let refs: Vec<&str> = plant.iter().map(String::as_str).collect();
    let out = ok(s.on(2, &refs));
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("reroute record"), "{out}");
    assert_eq!(
        s.svc("data", "redis")["metadata"]["resourceVersion"],
        redis_before["metadata"]["resourceVersion"]
    );
    // Names that are not Kubernetes names: a clear error, nothing
    // changed, from the CLI and from the API alike.
    let long = "a".repeat(64);
    for bad in ["echo#", "a/b", "x?y", long.as_str()] {
        let o = run(s.burrow_with(
            2,
            Some(&c.kubeconfig()),
            &["reroute", bad, "--port", "8080:3000"],
        ));
        let err = stderr(&o);
        assert!(!o.status.success(), "reroute {bad} succeeded");
        assert!(
            err.contains("not a valid Service name") && err.contains("nothing was changed"),
            "{bad}: {err}"
        );
        let body = serde_json::json!({
            "namespace": "default", "service": bad,
            "ports": [{"name": "http", "port": 8080}], "port": 8080, "laptop_port": 7200,
        })
        .to_string();
        let args = curl_args(
            &format!("http://{GATEWAY_TUNNEL}:51822/v1/reroutes"),
            "POST",
            &body,
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok(s.on(2, &refs));
        assert!(out.starts_with("HTTP/1.1 400"), "{bad}: {out}");
    }
    let now = s.svc("default", "echo");
    assert_eq!(now["metadata"]["uid"], echo_before["metadata"]["uid"]);
    assert_eq!(s.echo_pod(&[]), "laptop-alice");
}

/// 3 laptop 1's server on 0.0.0.0:7200 is unreachable from the cluster
#[test]
fn laptop_1s_server_on_7200_is_unreachable_from_the_cluster() {
    let Some(ref c) = tr() else { return };
    let (s, f) = setup(c);
    let (laptop1_addr, gw_ip, listeners) = (&f.laptop1_addr, &f.gw_ip, f.listeners.clone());
    let leaks = |who: &str, url: &str, out: &str| f.leaks(who, url, out);

    let url = format!("http://{laptop1_addr}:7200/");
    let args = curl_args(&url, "GET", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    for (who, o) in [
        ("caller pod", run(in_caller(c, &refs))),
        ("laptop 2", run(s.on(2, &refs))),
    ] {
        assert!(!o.status.success(), "{who} reached {url}: {}", stdout(&o));
        leaks(who, &url, &stdout(&o));
    }
    // Every reroute listener answers with laptop 1's rerouted
    // server, never the other one.
    for port in &listeners {
        for _ in 0..5 {
            let url = format!("http://{gw_ip}:{port}/");
            let out = ok(in_caller(c, &["curl", "-sS", "--max-time", "5", &url]));
            leaks("caller pod", &url, &out);
            assert_eq!(pod_field(&out), "laptop-alice");
        }
    }
}
