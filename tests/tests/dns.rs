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
//! Every point runs even when an earlier one failed; the failures are
//! listed at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

struct Setup<'a> {
    laptop: Laptop<'a>,
    _dir: tempfile::TempDir,
    /// `/etc/netns/<laptop>/resolv.conf` on the host.
    resolv_conf: PathBuf,
    original: Vec<u8>,
}

impl Setup<'_> {
    fn current(&self) -> Vec<u8> {
        std::fs::read(&self.resolv_conf).expect("read the laptop's resolv.conf")
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

    /// The daemon's pid in the laptop namespace.
    fn daemon_pid(&self) -> Option<String> {
        self.laptop
            .processes()
            .into_iter()
            .find(|(_, cmdline)| cmdline.contains("burrow") && cmdline.contains(" daemon"))
            .map(|(pid, _)| pid)
    }
}

#[test]
fn dns_acceptance() {
    let Some(c) = cluster("dn", 1) else { return };
    let netns = c.netns("laptop").expect("laptop netns");
    let resolv_conf = Path::new("/etc/netns").join(&netns).join("resolv.conf");
    let original = std::fs::read(&resolv_conf).expect("the laptop has its own resolv.conf");
    // Safety first: inside the laptop, /etc/resolv.conf must be that file,
    // bind-mounted (never the machine's own).
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
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Setup {
        laptop: Laptop::new(&c, 1, dir.path().join("run")),
        _dir: dir,
        resolv_conf,
        original,
    };
    let web_ip = jsonpath(&c, &["get", "svc", "web"], "{.spec.clusterIP}");
    let db0_ip = jsonpath(&c, &["get", "pod", "-n", "data", "db-0"], "{.status.podIP}");

    let mut points = Points::new("dns");
    let mut point = |name: &str, f: &dyn Fn()| points.point(name, f);

    point("connect rewrites resolv.conf to the stub", &|| {
        let out = s.laptop.connect_ok(&[]);
        eprintln!("connect output:\n{out}");
        let st = s.laptop.status_json();
        let dns = &st["dns_stub"];
        assert_eq!(dns["mode"], "resolv.conf", "{st}");
        let tunnel = st["tunnel_address"].as_str().unwrap_or_default();
        assert_eq!(dns["stub"], format!("{tunnel}:53"), "{st}");
        let now = String::from_utf8_lossy(&s.current()).into_owned();
        assert!(now.contains(&format!("nameserver {tunnel}\n")), "{now}");
        assert!(
            now.contains(
                "search default.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
            ),
            "{now}"
        );
        // The corporate resolver is the stub's upstream.
        assert_eq!(dns["upstreams"][0], "192.168.240.53:53", "{st}");
    });

    point("1a curl http://web", &|| {
        let out = s
            .laptop
            .ok(&["curl", "-sS", "--max-time", "10", "http://web/"]);
        assert!(out.contains("Welcome to nginx"), "{out}");
    });

    point("1b curl http://echo.default:8080", &|| {
        let out = s.laptop.ok(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://echo.default:8080/",
        ]);
        assert!(out.contains("echo-"), "the echo pod's answer: {out}");
    });

    point("1c redis-cli -h redis.data ping", &|| {
        let out = s.laptop.ok(&["redis-cli", "-h", "redis.data", "ping"]);
        assert_eq!(out.trim(), "PONG");
    });

    point("1d getent hosts db-0.db.data.svc.cluster.local", &|| {
        let out = s
            .laptop
            .ok(&["getent", "hosts", "db-0.db.data.svc.cluster.local"]);
        assert!(out.starts_with(&format!("{db0_ip} ")), "{out}");
        // The same pod by its StatefulSet-style short name, the headless
        // Service, and the pod's own `a-b-c-d.ns.pod` name.
        for name in [
            "db-0.db.data".to_string(),
            "db.data".to_string(),
            format!("{}.data.pod.cluster.local", db0_ip.replace('.', "-")),
            format!("{}.data.pod", db0_ip.replace('.', "-")),
        ] {
            let out = s.laptop.ok(&["getent", "hosts", &name]);
            assert!(out.starts_with(&format!("{db0_ip} ")), "{name}: {out}");
        }
    });

    point(
        "1e dig SRV _http._tcp.echo.default.svc.cluster.local",
        &|| {
            let out = s.laptop.ok(&[
                "dig",
                "+short",
                "SRV",
                "_http._tcp.echo.default.svc.cluster.local",
            ]);
            assert!(
                out.contains("8080 echo.default.svc.cluster.local."),
                "SRV answer: {out:?}"
            );
        },
    );

    point(
        "1f intranet.example and wiki from the corporate resolver",
        &|| {
            let out = s.laptop.ok(&["getent", "hosts", "intranet.example"]);
            assert!(out.starts_with("192.168.240.80 "), "{out}");
            // A short corporate name through the laptop's own search list.
            let out = s.laptop.ok(&["getent", "hosts", "wiki"]);
            assert!(out.starts_with("192.168.240.81 "), "{out}");
        },
    );

    point("1g nosuch.default is NXDOMAIN", &|| {
        let out = s
            .laptop
            .ok(&["dig", "+tries=1", "+time=5", "nosuch.default"]);
        assert!(out.contains("status: NXDOMAIN"), "{out}");
        let o = run(s.laptop.on(&["getent", "hosts", "nosuch.default"]));
        assert_eq!(o.status.code(), Some(2), "getent: {}", stdout(&o));
    });

    point("AAAA of a cluster name is empty NOERROR; PTR; TCP", &|| {
        let out = s
            .laptop
            .ok(&["dig", "AAAA", "web.default.svc.cluster.local"]);
        assert!(
            out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
            "{out}"
        );
        let out = s.laptop.ok(&["dig", "+short", "-x", &web_ip]);
        assert_eq!(out.trim(), "web.default.svc.cluster.local.", "PTR {web_ip}");
        // A pod IP: its name under the headless Service.
        let out = s.laptop.ok(&["dig", "+short", "-x", &db0_ip]);
        assert_eq!(
            out.trim(),
            "db-0.db.data.svc.cluster.local.",
            "PTR {db0_ip}"
        );
        let out = s
            .laptop
            .ok(&["dig", "+tcp", "+short", "web.default.svc.cluster.local"]);
        assert_eq!(out.trim(), web_ip, "over TCP");
        let out = s.laptop.ok(&["getent", "hosts", "web"]);
        assert!(out.starts_with(&format!("{web_ip} ")), "{out}");
    });

    point("status shows the cache", &|| {
        let st = s.laptop.status_json();
        let dns = &st["dns_stub"];
        assert!(dns["hits"].as_u64().unwrap_or(0) > 0, "{st}");
        assert!(dns["misses"].as_u64().unwrap_or(0) > 0, "{st}");
        assert!(
            dns["namespaces"].as_str().unwrap_or("").contains("data"),
            "{st}"
        );
        let human = ok(s.laptop.burrow(&["status"]));
        assert!(
            human.contains("DNS stub:") && human.contains("hits"),
            "{human}"
        );
        // Bound to the tunnel address only: not an open resolver.
        let listening = ok(s.laptop.on(&["ss", "-Hlnu", "sport", "=", ":53"]));
        let tunnel = st["tunnel_address"].as_str().unwrap_or_default();
        assert!(
            listening.contains(&format!("{tunnel}:53"))
                && !listening.contains("0.0.0.0:53")
                && !listening.contains("*:53"),
            "{listening}"
        );
    });

    point("2a disconnect restores resolv.conf byte for byte", &|| {
        s.laptop.disconnect();
        s.assert_original("after disconnect");
        let o = run(s.laptop.on(&["getent", "hosts", "web"]));
        assert!(!o.status.success(), "web resolves after disconnect");
        let out = s.laptop.ok(&["getent", "hosts", "intranet.example"]);
        assert!(out.starts_with("192.168.240.80 "), "{out}");
    });

    point(
        "2b kill -9, next connect and disconnect restore it",
        &|| {
            s.laptop.connect_ok(&[]);
            assert_ne!(
                s.current(),
                s.original,
                "connect did not rewrite resolv.conf"
            );
            let pid = s.daemon_pid().expect("the daemon's pid");
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
            assert_ne!(s.current(), s.original);
            // ...which the next start puts back before writing its own.
            s.laptop.connect_ok(&[]);
            let out = s
                .laptop
                .ok(&["curl", "-sS", "--max-time", "10", "http://web/"]);
            assert!(out.contains("Welcome to nginx"), "{out}");
            s.laptop.disconnect();
            s.assert_original("after kill -9, connect, disconnect");
        },
    );

    point("2c kill -9, then disconnect alone restores it", &|| {
        s.laptop.connect_ok(&[]);
        let pid = s.daemon_pid().expect("the daemon's pid");
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
        let out = s.laptop.disconnect();
        assert!(out.contains("restored"), "{out}");
        s.assert_original("after kill -9, disconnect");
    });

    point("--dns=off leaves resolv.conf alone", &|| {
        s.laptop.connect_ok(&["--dns", "off"]);
        s.assert_original("connected with --dns=off");
        let st = s.laptop.status_json();
        assert_eq!(st["dns_stub"]["mode"], "off", "{st}");
        let out = s.laptop.ok(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{web_ip}/"),
        ]);
        assert!(out.contains("Welcome to nginx"), "{out}");
        s.laptop.disconnect();
        s.assert_original("after --dns=off");
    });

    // Whatever failed above: never leave the laptop's file changed.
    if s.current() != s.original {
        let _ = run(s.laptop.burrow(&["disconnect"]));
    }
    points.finish();
}
