//! Datagrams of any size through the tunnel (issue 17, acceptance point 1),
//! with the real `burrow` and `burrow-gateway` in a miniature cluster:
//! 1,400-, 8,000- and 65,000-byte UDP datagrams (and the largest IPv4
//! carries) from a laptop to `udp-echo` come back whole — the laptop's
//! kernel fragments them at the tunnel MTU, the gateway reassembles them,
//! and fragments the echoes for the laptop's kernel to reassemble — over
//! the UDP transport (laptop 1) and over the port-forward transport
//! (laptop 2); a large ping too.

mod common;

use std::sync::Mutex;

use burrow_tests::cluster::Cluster;
use common::*;

/// The sizes acceptance names, the tunnel MTU's edge, and IPv4's largest.
const SIZES: &str = "1392,1393,1400,8000,65000,65507";

/// One connect at a time (the first installs the gateway).
static CONNECTING: Mutex<()> = Mutex::new(());

fn dg() -> Option<SharedCluster> {
    shared_cluster("dg", 2)
}

/// Laptop `n` connected with `transport` (connects when it is not).
fn connected<'a>(c: &'a Cluster, n: usize, transport: &str) -> Laptop<'a> {
    let l = Laptop::new(c, n, c.state_dir().join(format!("burrow-run-dg{n}")));
    let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
    if !l.connected() {
        l.connect_ok(&["--transport", transport]);
    }
    let st = l.status_json();
    assert_eq!(st["transport"], transport, "{st}");
    l
}

/// `mc-flows udp-sizes` to `udp-echo` with [`SIZES`]: a command line.
fn udp_sizes() -> Vec<String> {
    let mc_flows = bin_dir().join("mc-flows");
    [
        mc_flows.to_str().expect("utf-8 path"),
        "udp-sizes",
        "--to",
        "udp-echo.default.svc.cluster.local:9000",
        "--sizes",
        SIZES,
    ]
    .map(String::from)
    .to_vec()
}

fn round_trips(l: &Laptop) {
    let args = udp_sizes();
    let out = run(l.on(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        out.status.success(),
        "datagrams through laptop {} did not all come back:\n{}{}\n{}",
        l.n,
        stdout(&out),
        stderr(&out),
        diagnosis(l)
    );
    // A ping larger than the MTU (the echo request reassembled, the reply
    // fragmented) to the node's pod-network address.
    let ping = run(l.on(&["ping", "-c", "1", "-W", "5", "-s", "8000", "10.244.0.1"]));
    assert!(
        ping.status.success(),
        "an 8,000-byte ping through laptop {}: {}{}",
        l.n,
        stdout(&ping),
        stderr(&ping)
    );
}

/// What a failure needs to be told apart: whether `udp-echo` answers the
/// same sizes without burrow (from the caller pod; the socat echo it used
/// to be could go silent for good), what the gateway counted and logged,
/// and what the cluster (kube-proxy) did meanwhile.
fn diagnosis(l: &Laptop) -> String {
    let args = udp_sizes();
    let direct = run(in_caller(
        l.c,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let gateway = stdout(&run(kubectl(
        l.c,
        &[
            "get",
            "pods",
            "-n",
            "burrow-system",
            "-l",
            "app.kubernetes.io/name=burrow-gateway",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )));
    let metrics = run(l.c.exec(
        &format!("pod/burrow-system/{}", gateway.trim()),
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:9090/metrics",
        ],
    ));
    let drops: String = stdout(&metrics)
        .lines()
        .filter(|line| {
            !line.starts_with('#')
                && (line.contains("drop") || line.contains("udp") || line.contains("fragment"))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    format!(
        "the same sizes from the caller pod, without burrow ({}):\n{}{}\n\
         daemon log:\n{}\ngateway metrics (drops, UDP):\n{}{}\ngateway log:\n{}\n\
         cluster log:\n{}",
        direct.status,
        stdout(&direct),
        stderr(&direct),
        l.daemon_log(),
        drops,
        stderr(&metrics),
        gateway_log(l.c, 200),
        burrow_tests::cluster::tail(&l.c.state_dir().join("log"), 60)
    )
}

#[test]
fn large_datagrams_over_the_udp_transport() {
    let Some(ref c) = dg() else { return };
    round_trips(&connected(c, 1, "udp"));
}

#[test]
fn large_datagrams_over_the_port_forward_transport() {
    let Some(ref c) = dg() else { return };
    round_trips(&connected(c, 2, "port-forward"));
}
