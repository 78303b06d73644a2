//! Acceptance of `burrow connect` (issue 4): from a kubeconfig alone (no
//! gateway installed) to a usable cluster network, in the laptop
//! namespaces of one miniature cluster (two laptops). The real binaries:
//! `burrow` (target/debug) and `burrow-gateway` (the gateway image).
//!
//! One cluster for the binary (common::shared); each acceptance point is a
//! test of its own (`cargo test --test connect overlap`):
//! - `errors_give_a_reason_and_what_to_do_and_leave_nothing`
//! - `connect_installs_the_gateway_traffic_and_status` (1, 2a)
//! - `disconnect_leaves_nothing` (4a)
//! - `an_older_gateway_is_upgraded_or_kept_with_no_upgrade`
//! - `nodeport_blocked_falls_back_to_port_forward` (2b)
//! - `overlap_refused_and_exclude_connects` (5)
//! - `two_laptops_do_not_reach_each_other` (6)
//! - `gateway_pod_replaced_traffic_resumes_without_a_command` (3)
//! - `disconnect_all_and_uninstall_leave_no_object` (4b)
//!
//! Every point connects, disconnects, installs or uninstalls, so each
//! takes the cluster alone and first brings it to the state it starts
//! from: the points that need a cluster without burrow (the errors, the
//! first connect) disconnect the laptops and uninstall the gateway if it is
//! there; the others connect (which installs it) or disconnect as they
//! need.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use burrow_tests::cluster::Cluster;
use common::*;

/// The binary's cluster; every point changes the laptops or the gateway.
fn cn_alone() -> Option<SharedCluster> {
    shared_cluster_alone("cn", 2)
}

struct Setup<'a> {
    c: &'a Cluster,
    dir: std::path::PathBuf,
    web_ip: String,
    web_pod_ip: String,
    redis_ip: String,
    udp_echo_ip: String,
}

impl Setup<'_> {
    fn at(&self, n: usize) -> Laptop<'_> {
        Laptop::new(self.c, n, self.dir.join(format!("run{n}")))
    }

    fn kubeconfig(&self) -> String {
        self.c.kubeconfig().display().to_string()
    }

    fn assert_traffic(&self, n: usize) {
        for ip in [&self.web_ip, &self.web_pod_ip] {
            let url = format!("http://{ip}/");
            let o = run(self.at(n).on(&["curl", "-sS", "--max-time", "10", &url]));
            assert!(
                o.status.success() && stdout(&o).contains("Welcome to nginx"),
                "curl {url} from laptop {n}: {} {}\ndaemon log:\n{}",
                o.status,
                stderr(&o),
                self.at(n).daemon_log()
            );
        }
        let pong = ok(self.at(n).on(&["redis-cli", "-h", &self.redis_ip, "ping"]));
        assert_eq!(pong.trim(), "PONG", "redis-cli ping");
        let script = format!(
            "echo burrow-udp | timeout 10 socat -T3 - UDP:{}:9000",
            self.udp_echo_ip
        );
        let echoed = ok(self.at(n).on(&["sh", "-c", &script]));
        assert!(
            echoed.contains("burrow-udp"),
            "UDP echo answered {echoed:?}"
        );
    }

    /// Nothing of burrow left in laptop `n`: no device, route, socket or
    /// daemon.
    fn assert_clean(&self, n: usize) {
        let links = ok(self.at(n).on(&["ip", "-o", "link"]));
        assert!(!links.contains("burrow0"), "device left: {links}");
        let routes = ok(self.at(n).on(&["ip", "route"]));
        assert!(
            !routes.contains("burrow0") && !routes.contains("10.96.0.0/12"),
            "routes left: {routes}"
        );
        assert!(
            !self.at(n).run_dir().join("daemon.sock").exists(),
            "daemon socket left"
        );
        for (pid, cmdline) in self.at(n).processes() {
            assert!(
                !(cmdline.contains("burrow") && cmdline.contains("daemon")),
                "daemon still running: {pid} {cmdline}"
            );
        }
    }
}

impl<'a> Setup<'a> {
    /// The laptops of `c` (run dirs in its state dir) and the addresses
    /// the points reach.
    fn new(c: &'a Cluster) -> Self {
        let dir = c.state_dir().join("connect");
        std::fs::create_dir_all(&dir).expect("the laptops' run dirs");
        Setup {
            c,
            dir,
            web_ip: jsonpath(c, &["get", "svc", "web"], "{.spec.clusterIP}"),
            web_pod_ip: jsonpath(
                c,
                &["get", "pods", "-l", "app=web"],
                "{.items[0].status.podIP}",
            ),
            redis_ip: jsonpath(
                c,
                &["get", "svc", "-n", "data", "redis"],
                "{.spec.clusterIP}",
            ),
            udp_echo_ip: jsonpath(c, &["get", "svc", "udp-echo"], "{.spec.clusterIP}"),
        }
    }

    /// Laptop `n` connected (with the defaults when it was not).
    fn connected(&self, n: usize) {
        if !self.at(n).connected() {
            self.at(n).connect_ok(&[]);
        }
    }

    /// Laptop `n` disconnected.
    fn disconnected(&self, n: usize) {
        if self.at(n).connected() {
            self.at(n).disconnect();
        }
    }

    fn gateway_installed(&self) -> bool {
        run(kubectl(self.c, &["get", "ns", "burrow-system"]))
            .status
            .success()
    }

    /// No laptop connected and no gateway installed.
    fn no_gateway(&self) {
        for n in [1, 2] {
            self.disconnected(n);
        }
        if self.gateway_installed() {
            let kc = self.kubeconfig();
            ok(self.at(1).burrow(&["uninstall", "--kubeconfig", &kc]));
        }
    }

    /// The gateway installed, no laptop connected.
    fn gateway_up_laptops_off(&self) {
        if !self.gateway_installed() {
            self.connected(1);
        }
        for n in [1, 2] {
            self.disconnected(n);
        }
    }
}

/// errors: each a reason and what to do, nothing left
#[test]
fn errors_give_a_reason_and_what_to_do_and_leave_nothing() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    // Before anything is installed.
    s.no_gateway();

    let limited = s.c.limited_kubeconfig().display().to_string();
    // A user who may not install, before anything is installed.
    let o = run(s.at(1).burrow(&["connect", "--kubeconfig", &limited]));
    let err = stderr(&o);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        err.contains("403") && err.contains("burrow install"),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.trim_start().starts_with("hint:")),
        "{err}"
    );
    s.assert_clean(1);
    assert!(
        !s.at(1).run_dir().join("daemon.sock").exists(),
        "a failed connect left its daemon running"
    );
    // A context the kubeconfig does not have.
    let kc = s.kubeconfig();
    let o = run(s
        .at(1)
        .burrow(&["connect", "--kubeconfig", &kc, "--context", "nope"]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("\"nope\"") && err.contains("available contexts"),
        "{err}"
    );
    // An API server that does not answer.
    let text = std::fs::read_to_string(s.c.kubeconfig()).expect("kubeconfig");
    let dead = s.dir.join("dead-kubeconfig");
    std::fs::write(&dead, text.replace(":6443", ":6555")).expect("write");
    let dead = dead.display().to_string();
    let o = run(s.at(1).burrow(&["connect", "--kubeconfig", &dead]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot reach the API server") && err.contains("hint:"),
        "{err}"
    );
    // Not root.
    let bin = bin_dir().join("burrow").display().to_string();
    let o = run(s.at(1).on(&[
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        &bin,
        "connect",
    ]));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("root") && err.contains("sudo"), "{err}");
    s.assert_clean(1);
    // Nothing was installed by any of these.
    let ns = run(kubectl(s.c, &["get", "ns", "burrow-system"]));
    assert!(
        !ns.status.success(),
        "burrow-system exists: {}",
        stdout(&ns)
    );
}

/// 1 connect installs the gateway; traffic; status
#[test]
fn connect_installs_the_gateway_traffic_and_status() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    // From a kubeconfig alone: no gateway installed.
    s.no_gateway();

    let out = s.at(1).connect_ok(&[]);
    eprintln!("connect output:\n{out}");
    assert!(out.contains("installing the gateway"), "{out}");
    // The gateway's NetworkPolicy came with it (stored, not enforced,
    // in the miniature cluster: the traffic below passes beside it).
    let policy = jsonpath(
        s.c,
        &[
            "get",
            "networkpolicy",
            "-n",
            "burrow-system",
            "burrow-gateway",
        ],
        "{.spec.podSelector.matchLabels}",
    );
    assert!(policy.contains("burrow-gateway"), "{policy}");
    s.assert_traffic(1);
    let st = s.at(1).status_json();
    assert_eq!(st["connected"], true, "{st}");
    assert!(st["transport"].is_string(), "{st}");
    // 2a: the NodePort is reachable, so auto picks UDP.
    assert_eq!(st["transport"], "udp", "{st}");
    let again = s.at(1).connect_ok(&[]);
    assert!(again.contains("already connected"), "{again}");
    // The daemon's lines name the session they belong to (the second
    // connect's included): the laptop's tunnel address and transport.
    let tunnel = st["tunnel_address"].as_str().expect("tunnel address");
    let session = format!("laptop={tunnel} transport=\"udp\"}}");
    let log = s.at(1).daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("already connected") && l.contains(&session)),
        "no line of the session's span ({session}) in the daemon log:\n{log}"
    );
    // An open connection shows in status as a flow at the gateway.
    let mut sub = s
        .at(1)
        .on(&["redis-cli", "-h", &s.redis_ip, "subscribe", "burrow"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-cli subscribe");
    let flows = eventually(Duration::from_secs(10), "a TCP flow in status", || {
        let st = s.at(1).status_json();
        st["tcp_flows"].as_u64().filter(|n| *n >= 1)
    });
    let _ = sub.kill();
    let _ = sub.wait();
    let human = ok(s.at(1).burrow(&["status"]));
    assert!(human.contains("flows:") && human.contains("TCP"), "{human}");
    // What was dropped on the laptop: the data path's count, and the
    // kernel's count for the TUN device (read from the daemon's namespace).
    let st = s.at(1).status_json();
    assert!(st["packets_dropped"].is_u64(), "{st}");
    assert!(
        st["tun_queue_dropped"].is_u64(),
        "the TUN device's drop count is unknown: {st}"
    );
    assert!(
        human.contains("dropped:") && human.contains(st["device"].as_str().unwrap_or("?")),
        "{human}"
    );
    eprintln!("status showed {flows} TCP flow(s) with one connection open");
}

/// 4a disconnect leaves nothing
#[test]
fn disconnect_leaves_nothing() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    s.connected(1);

    s.at(1).disconnect();
    s.assert_clean(1);
    let st = s.at(1).status_json();
    assert_eq!(st["connected"], false, "{st}");
}

/// upgrade: an older gateway is upgraded, or kept with --no-upgrade
#[test]
fn an_older_gateway_is_upgraded_or_kept_with_no_upgrade() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    s.gateway_up_laptops_off();

    // Make the installed gateway look like an older release: the
    // Deployment and its pods carry version 0.0.9.
    let patch = r#"{"metadata":{"labels":{"app.kubernetes.io/version":"0.0.9"}},"spec":{"template":{"metadata":{"labels":{"app.kubernetes.io/version":"0.0.9"}}}}}"#;
    ok(kubectl(
        s.c,
        &[
            "-n",
            "burrow-system",
            "patch",
            "deployment",
            "burrow-gateway",
            "--type",
            "merge",
            "-p",
            patch,
        ],
    ));
    let out = s.at(1).connect_ok(&["--no-upgrade"]);
    assert!(out.contains("keeping it (--no-upgrade)"), "{out}");
    assert_eq!(s.at(1).status_json()["gateway_version"], "0.0.9");
    s.assert_traffic(1);
    s.at(1).disconnect();
    let out = s.at(1).connect_ok(&[]);
    assert!(
        out.contains("upgrading the gateway from version 0.0.9 to"),
        "{out}"
    );
    let st = s.at(1).status_json();
    assert_ne!(st["gateway_version"], "0.0.9", "{st}");
    s.assert_traffic(1);
    s.at(1).disconnect();
    s.assert_clean(1);
}

/// 2b NodePort blocked: port-forward
#[test]
fn nodeport_blocked_falls_back_to_port_forward() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    s.gateway_up_laptops_off();

    let port = jsonpath(
        c,
        &["get", "svc", "-n", "burrow-system", "burrow-gateway"],
        "{.spec.ports[?(@.name==\"wireguard\")].nodePort}",
    );
    let rule = [
        "iptables", "-I", "INPUT", "-p", "udp", "--dport", &port, "-j", "DROP",
    ];
    ok(c.exec("node", &rule));
    let rule2 = [
        "iptables", "-I", "FORWARD", "-p", "udp", "--dport", "51820", "-j", "DROP",
    ];
    ok(c.exec("node", &rule2));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let out = s.at(1).connect_ok(&[]);
        eprintln!("connect output:\n{out}");
        let st = s.at(1).status_json();
        assert_eq!(st["transport"], "port-forward", "{st}");
        assert!(
            st["transport_reason"]
                .as_str()
                .unwrap_or("")
                .contains("UDP"),
            "{st}"
        );
        s.assert_traffic(1);

        // Break the port-forward stream (the API server connection is
        // reset) while the same gateway pod keeps running: the daemon
        // reopens it and says so in status.
        let before = s.at(1).status_json()["reconnects"].as_u64().unwrap_or(0);
        let reset = [
            "iptables",
            "-I",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "6443",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ];
        ok(s.at(1).on(&reset));
        // Traffic makes the relay write into the reset connection.
        let url = format!("http://{}/", s.web_ip);
        let _ = run(s.at(1).on(&["curl", "-sS", "--max-time", "2", &url]));
        let mut undo = reset.to_vec();
        undo[1] = "-D";
        ok(s.at(1).on(&undo));
        eventually(
            Duration::from_secs(30),
            "traffic after the stream reset",
            || {
                run(s.at(1).on(&["curl", "-sS", "--max-time", "2", &url]))
                    .status
                    .success()
                    .then_some(())
            },
        );
        // The flows move to the streams still open at once, so traffic
        // may work before the broken stream is back: status says so once
        // it is reopened.
        let st = eventually(
            Duration::from_secs(15),
            "status saying the stream was reopened",
            || {
                let st = s.at(1).status_json();
                (st["reconnects"].as_u64().unwrap_or(0) > before
                    && st["last_reconnect_error"]
                        .as_str()
                        .unwrap_or("")
                        .contains("port-forward stream reopened"))
                .then_some(st)
            },
        );
        assert_eq!(st["transport"], "port-forward", "{st}");
        s.assert_traffic(1);
        s.at(1).disconnect();
        s.assert_clean(1);
    }));
    let mut del = rule.to_vec();
    del[1] = "-D";
    let _ = run(c.exec("node", &del));
    let mut del2 = rule2.to_vec();
    del2[1] = "-D";
    let _ = run(c.exec("node", &del2));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// 5 overlap refused, --exclude connects
#[test]
fn overlap_refused_and_exclude_connects() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    s.gateway_up_laptops_off();

    // A /24 of the Service range that holds none of the workloads.
    let known = [
        &s.web_ip,
        &s.redis_ip,
        &s.udp_echo_ip,
        &"10.96.0.10".to_string(),
    ];
    let other = ["10.111.250", "10.108.3", "10.99.77", "10.104.12"]
        .into_iter()
        .find(|p| !known.iter().any(|ip| ip.starts_with(&format!("{p}."))))
        .map(|p| format!("{p}.0/24"))
        .expect("a free /24");
    // Another VPN's route: a veth pair stands in for its device.
    ok(s.at(1).on(&[
        "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]));
    ok(s.at(1).on(&["ip", "link", "set", "other0", "up"]));
    ok(s.at(1).on(&["ip", "link", "set", "other1", "up"]));
    ok(s.at(1).on(&["ip", "route", "add", &other, "dev", "other0"]));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let o = s.at(1).connect(&[]);
        assert!(!o.status.success(), "connect must refuse: {}", stdout(&o));
        let err = stderr(&o);
        assert!(err.contains(&other) && err.contains("--exclude"), "{err}");
        s.assert_clean_device(1);
        s.at(1).connect_ok(&["--exclude", &other]);
        s.assert_traffic(1);
        let routes = ok(s.at(1).on(&["ip", "route"]));
        assert!(routes.contains(&format!("{other} dev other0")), "{routes}");
    }));
    let _ = run(s.at(1).on(&["ip", "link", "del", "other0"]));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// 6 two laptops
#[test]
fn two_laptops_do_not_reach_each_other() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);

    if !s.at(1).run_dir().join("daemon.sock").exists() {
        s.at(1).connect_ok(&[]);
    }
    s.at(2).connect_ok(&[]);
    s.assert_traffic(1);
    s.assert_traffic(2);
    let a1 = s.at(1).status_json()["tunnel_address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let a2 = s.at(2).status_json()["tunnel_address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(a1, a2);
    // Route the other laptop's address into the tunnel: the gateway
    // must still not forward between peers.
    let _ = run(s
        .at(1)
        .on(&["ip", "route", "add", &format!("{a2}/32"), "dev", "burrow0"]));
    let o = run(s.at(1).on(&["ping", "-c", "2", "-W", "2", &a2]));
    assert!(!o.status.success(), "laptop 1 reached laptop 2 at {a2}");
    let _ = run(s.at(1).on(&["ip", "route", "del", &format!("{a2}/32")]));
}

/// 3 gateway pod replaced: traffic resumes without a command
#[test]
fn gateway_pod_replaced_traffic_resumes_without_a_command() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);

    if !s.at(1).run_dir().join("daemon.sock").exists() {
        s.at(1).connect_ok(&[]);
    }
    // A download loop running across the replacement.
    let script = format!(
        "while :; do curl -s -m 2 -o /dev/null http://{}/1k && echo ok; sleep 0.1; done",
        s.web_ip
    );
    let mut download = s
        .at(1)
        .on(&["sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("download loop");
    std::thread::sleep(Duration::from_millis(500));
    let old = jsonpath(
        c,
        &["get", "pods", "-n", "burrow-system"],
        "{.items[0].metadata.name}",
    );
    ok(kubectl(
        c,
        &["delete", "pod", "-n", "burrow-system", &old, "--wait=false"],
    ));
    // Wait for the replacement to be Ready, then time the recovery.
    let ready = eventually(Duration::from_secs(60), "new gateway pod ready", || {
        let o = run(kubectl(
            c,
            &[
                "get",
                "pods",
                "-n",
                "burrow-system",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ],
        ));
        stdout(&o)
            .lines()
            .any(|l| !l.starts_with(&old) && l.ends_with("True"))
            .then(Instant::now)
    });
    let url = format!("http://{}/", s.web_ip);
    // Measured 5.03–5.05 s in six runs of 2026-12-06: the first handshake
    // to the new pod is lost and boringtun retries after its 5 s
    // REKEY_TIMEOUT, so a 5 s window failed about once in seven. The
    // issue's 5 s target is not met (issue 17, point 4, still open);
    // this checks that traffic resumes without a command, and prints the
    // time.
    eventually(
        Duration::from_secs(10),
        "traffic through the new pod",
        || {
            let o = run(s.at(1).on(&["curl", "-sS", "--max-time", "1", &url]));
            o.status.success().then_some(())
        },
    );
    eprintln!(
        "recovered {:?} after the new pod was ready",
        ready.elapsed()
    );
    let _ = download.kill();
    let _ = download.wait();
    let st = s.at(1).status_json();
    assert!(st["reconnects"].as_u64().unwrap_or(0) >= 1, "{st}");
    // As found for the next point: one gateway pod, the old one gone.
    eventually(Duration::from_secs(60), "the old gateway pod gone", || {
        let o = run(kubectl(
            c,
            &["get", "pods", "-n", "burrow-system", "-o", "name"],
        ));
        (o.status.success() && !stdout(&o).contains(&old)).then_some(())
    });
}

/// 4b disconnect all, uninstall leaves no object
#[test]
fn disconnect_all_and_uninstall_leave_no_object() {
    let Some(ref c) = cn_alone() else { return };
    let s = Setup::new(c);
    // Something to uninstall: the gateway and both laptops connected.
    s.connected(1);
    s.connected(2);

    for n in [1, 2] {
        if s.at(n).run_dir().join("daemon.sock").exists() {
            s.at(n).disconnect();
        }
        s.assert_clean(n);
    }
    let kc = s.kubeconfig();
    ok(s.at(1).burrow(&["uninstall", "--kubeconfig", &kc]));
    let o = run(kubectl(c, &["get", "namespace", "burrow-system"]));
    assert!(!o.status.success(), "namespace burrow-system still there");
    let o = ok(kubectl(
        c,
        &["get", "all,secret,sa", "-n", "burrow-system", "-o", "name"],
    ));
    assert!(o.trim().is_empty(), "objects left: {o}");
    let o = ok(kubectl(c, &["get", "networkpolicy", "-A", "-o", "name"]));
    assert!(o.trim().is_empty(), "NetworkPolicy left: {o}");
    let o = ok(kubectl(
        c,
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            "app.kubernetes.io/managed-by=burrow",
            "-o",
            "name",
        ],
    ));
    assert!(o.trim().is_empty(), "cluster-wide objects left: {o}");
}

impl Setup<'_> {
    /// No burrow device in laptop `n` (after a refusal).
    fn assert_clean_device(&self, n: usize) {
        let links = ok(self.at(n).on(&["ip", "-o", "link"]));
        assert!(!links.contains("burrow0"), "device left: {links}");
    }
}
