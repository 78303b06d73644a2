//! Acceptance of the laptop's DNS (issue 5), in the laptop namespace of a
//! miniature cluster, resolv.conf mode, with the real `burrow` and
//! `burrow-gateway`: programs on the laptop resolve cluster names as a pod
//! in `default` would, every other name still goes to the laptop's own
//! ("corporate") resolver, and the laptop's resolv.conf comes back byte for
//! byte after `disconnect` and after a `kill -9` of the daemon.
//!
//! Only laptop namespaces are touched: each has its own
//! `/etc/netns/<laptop>/resolv.conf`, bind-mounted over /etc/resolv.conf by
//! `ip netns exec` (checked before burrow runs).
//!
//! One cluster for the binary (common::shared) and one laptop connected on
//! first use: each lookup is a test of its own (`cargo test --test dns
//! srv_of_echo`). Disconnect, `kill -9` and `--dns=off` change the laptop
//! for whoever comes next, so they stay together, in order, in one test
//! that takes the cluster alone (its points all run even when an earlier
//! one failed) and leaves the laptop disconnected.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use burrow_tests::cluster::Cluster;
use common::*;

/// The binary's cluster, shared with the other points.
fn dn() -> Option<SharedCluster> {
    shared_cluster("dn", 1)
}

/// The binary's cluster, for points that change the laptop for the next.
fn dn_alone() -> Option<SharedCluster> {
    shared_cluster_alone("dn", 1)
}

/// The laptop's resolv.conf (`/etc/netns/<laptop>/resolv.conf` on the host)
/// and its content before burrow ran.
struct ResolvConf {
    path: PathBuf,
    original: Vec<u8>,
}

static RESOLV_CONF: OnceLock<ResolvConf> = OnceLock::new();
/// One connect at a time.
static CONNECTING: Mutex<()> = Mutex::new(());

impl ResolvConf {
    fn current(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read the laptop's resolv.conf")
    }

    fn assert_original(&self, when: &str) {
        let now = self.current();
        assert!(
            now == self.original,
            "{when}: the laptop's resolv.conf is not the original:\n{}\n--- original:\n{}",
            String::from_utf8_lossy(&now),
            String::from_utf8_lossy(&self.original)
        );
    }
}

/// Laptop 1, its burrow's run dir in the cluster's state dir (gone with
/// the cluster).
fn laptop(c: &Cluster) -> Laptop<'_> {
    Laptop::new(c, 1, c.state_dir().join("burrow-run-laptop"))
}

/// The laptop's resolv.conf, checked and read before burrow first runs.
fn resolv_conf(c: &Cluster) -> &'static ResolvConf {
    RESOLV_CONF.get_or_init(|| {
        let netns = c.netns("laptop").expect("laptop netns");
        let path = Path::new("/etc/netns").join(&netns).join("resolv.conf");
        let original = std::fs::read(&path).expect("the laptop has its own resolv.conf");
        // Safety first: inside the laptop, /etc/resolv.conf must be that
        // file, bind-mounted (never the machine's own).
        let mounted = ok(c.exec("laptop", &["cat", "/proc/self/mountinfo"]));
        assert!(
            mounted
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/etc/resolv.conf")),
            "/etc/resolv.conf is not bind-mounted in the laptop namespace: refusing to run burrow's DNS there"
        );
        assert_eq!(
            ok(c.exec("laptop", &["cat", "/etc/resolv.conf"])).as_bytes(),
            original.as_slice()
        );
        ResolvConf { path, original }
    })
}

/// The laptop connected with the defaults (connects when it is not).
fn connected(c: &Cluster) -> Laptop<'_> {
    resolv_conf(c);
    let l = laptop(c);
    let _one = CONNECTING.lock().unwrap_or_else(|p| p.into_inner());
    let o = run(l.burrow(&["status", "-o", "json"]));
    let up = o.status.success()
        && serde_json::from_str::<serde_json::Value>(&stdout(&o))
            .is_ok_and(|st| st["connected"] == true);
    if !up {
        let out = l.connect_ok(&[]);
        eprintln!("connect output:\n{out}");
    }
    l
}

/// The daemon's pid in the laptop namespace.
fn daemon_pid(l: &Laptop) -> Option<String> {
    l.processes()
        .into_iter()
        .find(|(_, cmdline)| cmdline.contains("burrow") && cmdline.contains(" daemon"))
        .map(|(pid, _)| pid)
}

fn web_ip(c: &Cluster) -> String {
    jsonpath(c, &["get", "svc", "web"], "{.spec.clusterIP}")
}

fn db0_ip(c: &Cluster) -> String {
    jsonpath(c, &["get", "pod", "-n", "data", "db-0"], "{.status.podIP}")
}

#[test]
fn connect_rewrites_resolv_conf_to_the_stub() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let rc = resolv_conf(c);
    let st = laptop.status_json();
    let dns = &st["dns_stub"];
    assert_eq!(dns["mode"], "resolv.conf", "{st}");
    let tunnel = st["tunnel_address"].as_str().unwrap_or_default();
    assert_eq!(dns["stub"], format!("{tunnel}:53"), "{st}");
    let now = String::from_utf8_lossy(&rc.current()).into_owned();
    assert!(now.contains(&format!("nameserver {tunnel}\n")), "{now}");
    assert!(
        now.contains(
            "search default.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        ),
        "{now}"
    );
    // The corporate resolver is the stub's upstream.
    assert_eq!(dns["upstreams"][0], "192.168.240.53:53", "{st}");
}

#[test]
fn curl_web() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&["curl", "-sS", "--max-time", "10", "http://web/"]);
    assert!(out.contains("Welcome to nginx"), "{out}");
}

#[test]
fn curl_echo_default() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "http://echo.default:8080/",
    ]);
    assert!(out.contains("echo-"), "the echo pod's answer: {out}");
}

#[test]
fn redis_data_ping() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&["redis-cli", "-h", "redis.data", "ping"]);
    assert_eq!(out.trim(), "PONG");
}

#[test]
fn db_0_and_its_other_names() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let db0_ip = db0_ip(c);
    let out = laptop.ok(&["getent", "hosts", "db-0.db.data.svc.cluster.local"]);
    assert!(out.starts_with(&format!("{db0_ip} ")), "{out}");
    // The same pod by its StatefulSet-style short name, the headless
    // Service, and the pod's own `a-b-c-d.ns.pod` name.
    for name in [
        "db-0.db.data".to_string(),
        "db.data".to_string(),
        format!("{}.data.pod.cluster.local", db0_ip.replace('.', "-")),
        format!("{}.data.pod", db0_ip.replace('.', "-")),
    ] {
        let out = laptop.ok(&["getent", "hosts", &name]);
        assert!(out.starts_with(&format!("{db0_ip} ")), "{name}: {out}");
    }
}

#[test]
fn srv_of_echo() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&[
        "dig",
        "+short",
        "SRV",
        "_http._tcp.echo.default.svc.cluster.local",
    ]);
    assert!(
        out.contains("8080 echo.default.svc.cluster.local."),
        "SRV answer: {out:?}"
    );
}

#[test]
fn corporate_names_from_the_corporate_resolver() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&["getent", "hosts", "intranet.example"]);
    assert!(out.starts_with("192.168.240.80 "), "{out}");
    // A short corporate name through the laptop's own search list.
    let out = laptop.ok(&["getent", "hosts", "wiki"]);
    assert!(out.starts_with("192.168.240.81 "), "{out}");
}

#[test]
fn nosuch_default_is_nxdomain() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let out = laptop.ok(&["dig", "+tries=1", "+time=5", "nosuch.default"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let o = run(laptop.on(&["getent", "hosts", "nosuch.default"]));
    assert_eq!(o.status.code(), Some(2), "getent: {}", stdout(&o));
}

#[test]
fn aaaa_empty_ptr_and_tcp() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    let web_ip = web_ip(c);
    let db0_ip = db0_ip(c);
    let out = laptop.ok(&["dig", "AAAA", "web.default.svc.cluster.local"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    let out = laptop.ok(&["dig", "+short", "-x", &web_ip]);
    assert_eq!(out.trim(), "web.default.svc.cluster.local.", "PTR {web_ip}");
    // A pod IP: its name under the headless Service.
    let out = laptop.ok(&["dig", "+short", "-x", &db0_ip]);
    assert_eq!(
        out.trim(),
        "db-0.db.data.svc.cluster.local.",
        "PTR {db0_ip}"
    );
    let out = laptop.ok(&["dig", "+tcp", "+short", "web.default.svc.cluster.local"]);
    assert_eq!(out.trim(), web_ip, "over TCP");
    let out = laptop.ok(&["getent", "hosts", "web"]);
    assert!(out.starts_with(&format!("{web_ip} ")), "{out}");
}

#[test]
fn status_shows_the_cache() {
    let Some(ref c) = dn() else { return };
    let laptop = connected(c);
    // A miss, then a hit, whatever ran before.
    for _ in 0..2 {
        laptop.ok(&["getent", "hosts", "db-0.db.data.svc.cluster.local"]);
    }
    let st = laptop.status_json();
    let dns = &st["dns_stub"];
    assert!(dns["hits"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(dns["misses"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(
        dns["namespaces"].as_str().unwrap_or("").contains("data"),
        "{st}"
    );
    let human = ok(laptop.burrow(&["status"]));
    assert!(
        human.contains("DNS stub:") && human.contains("hits"),
        "{human}"
    );
    // Bound to the tunnel address only: not an open resolver.
    let listening = ok(laptop.on(&["ss", "-Hlnu", "sport", "=", ":53"]));
    let tunnel = st["tunnel_address"].as_str().unwrap_or_default();
    assert!(
        listening.contains(&format!("{tunnel}:53"))
            && !listening.contains("0.0.0.0:53")
            && !listening.contains("*:53"),
        "{listening}"
    );
}

#[test]
fn disconnect_and_kill_restore_resolv_conf() {
    let Some(ref c) = dn_alone() else { return };
    let laptop = connected(c);
    let rc = resolv_conf(c);
    let web_ip = web_ip(c);
    let mut points = Points::new("dns");
    let mut point = |name: &str, f: &dyn Fn()| points.point(name, f);

    point("2a disconnect restores resolv.conf byte for byte", &|| {
        laptop.disconnect();
        rc.assert_original("after disconnect");
        let o = run(laptop.on(&["getent", "hosts", "web"]));
        assert!(!o.status.success(), "web resolves after disconnect");
        let out = laptop.ok(&["getent", "hosts", "intranet.example"]);
        assert!(out.starts_with("192.168.240.80 "), "{out}");
    });

    point(
        "2b kill -9, next connect and disconnect restore it",
        &|| {
            laptop.connect_ok(&[]);
            assert_ne!(
                rc.current(),
                rc.original,
                "connect did not rewrite resolv.conf"
            );
            let pid = daemon_pid(&laptop).expect("the daemon's pid");
            ok({
                let mut k = Command::new("kill");
                k.args(["-9", &pid]);
                k
            });
            common::eventually(
                std::time::Duration::from_secs(10),
                "the daemon to die",
                || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()),
            );
            // The killed daemon leaves its rewrite behind...
            assert_ne!(rc.current(), rc.original);
            // ...which the next start puts back before writing its own.
            laptop.connect_ok(&[]);
            let out = laptop.ok(&["curl", "-sS", "--max-time", "10", "http://web/"]);
            assert!(out.contains("Welcome to nginx"), "{out}");
            laptop.disconnect();
            rc.assert_original("after kill -9, connect, disconnect");
        },
    );

    point("2c kill -9, then disconnect alone restores it", &|| {
        laptop.connect_ok(&[]);
        let pid = daemon_pid(&laptop).expect("the daemon's pid");
        ok({
            let mut k = Command::new("kill");
            k.args(["-9", &pid]);
            k
        });
        common::eventually(
            std::time::Duration::from_secs(10),
            "the daemon to die",
            || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()),
        );
        let out = laptop.disconnect();
        assert!(out.contains("restored"), "{out}");
        rc.assert_original("after kill -9, disconnect");
    });

    point("--dns=off leaves resolv.conf alone", &|| {
        laptop.connect_ok(&["--dns", "off"]);
        rc.assert_original("connected with --dns=off");
        let st = laptop.status_json();
        assert_eq!(st["dns_stub"]["mode"], "off", "{st}");
        let out = laptop.ok(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{web_ip}/"),
        ]);
        assert!(out.contains("Welcome to nginx"), "{out}");
        laptop.disconnect();
        rc.assert_original("after --dns=off");
    });

    // Whatever failed above: never leave the laptop's file changed.
    if rc.current() != rc.original {
        let _ = run(laptop.burrow(&["disconnect"]));
    }
    points.finish();
}
