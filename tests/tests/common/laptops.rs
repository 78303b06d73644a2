//! The laptops of a miniature cluster for the end-to-end tests ([`Laptop`]
//! handles with a fresh run dir each), servers started there, the Services
//! and pods as kubectl sees them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use burrow_tests::cluster::Cluster;
use serde_json::Value;

use super::laptop::{Laptop, bin_dir};
use super::*;

pub struct Setup<'a> {
    pub c: &'a Cluster,
    pub bin: PathBuf,
    /// Where the laptops' run dirs are.
    pub dir: PathBuf,
    /// The temp dir `dir` is, when it is one (removed on drop).
    _tmp: Option<tempfile::TempDir>,
}

impl<'a> Setup<'a> {
    /// Laptops of `c`, with the test binaries' directory and a fresh run
    /// dir per laptop.
    pub fn new(c: &'a Cluster) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        Setup {
            c,
            bin: bin_dir(),
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    /// Laptops of a shared cluster whose run dirs outlive one test: in
    /// `<state dir>/<name>` (gone with the cluster).
    pub fn shared(c: &'a Cluster, name: &str) -> Self {
        let dir = c.state_dir().join(name);
        std::fs::create_dir_all(&dir).expect("the laptops' run dirs");
        Setup {
            c,
            bin: bin_dir(),
            dir,
            _tmp: None,
        }
    }

    /// Starts `mc-echo` on 0.0.0.0:`port` of laptop `n`, answering as
    /// `pod`, and waits until it answers.
    pub fn echo_server(&self, n: usize, pod: &str, port: u16) -> Child {
        let echo = self.bin.join("mc-echo").display().to_string();
        let port_text = port.to_string();
        let child = self.spawn(n, &[("POD_NAME", pod), ("PORT", &port_text)], &[&echo]);
        let url = format!("http://127.0.0.1:{port}/healthz");
        eventually(
            std::time::Duration::from_secs(10),
            "local echo server up",
            || {
                run(self.on(n, &["curl", "-sf", &url]))
                    .status
                    .success()
                    .then_some(())
            },
        );
        child
    }
}

impl Setup<'_> {
    /// Laptop `n`, with its run dir in this setup's temp dir.
    pub fn at(&self, n: usize) -> Laptop<'_> {
        Laptop::new(self.c, n, self.run_dir(n))
    }

    pub fn run_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("run{n}"))
    }

    pub fn on(&self, n: usize, args: &[&str]) -> Command {
        self.at(n).on(args)
    }

    /// `burrow --run-dir <laptop's> ARGS --kubeconfig K` in laptop `n`.
    pub fn burrow_with(&self, n: usize, kubeconfig: Option<&Path>, args: &[&str]) -> Command {
        self.at(n).burrow_with(kubeconfig, args)
    }

    pub fn burrow(&self, n: usize, args: &[&str]) -> Command {
        self.at(n).burrow(args)
    }

    pub fn daemon_log(&self, n: usize) -> String {
        self.at(n).daemon_log()
    }

    /// `burrow reroute ARGS` with the admin kubeconfig; asserts success.
    pub fn reroute(&self, n: usize, args: &[&str]) -> String {
        let mut all = vec!["reroute"];
        all.extend_from_slice(args);
        let kc = self.c.kubeconfig();
        let o = run(self.burrow_with(n, Some(&kc), &all));
        assert!(
            o.status.success(),
            "burrow {all:?} in laptop {n} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            o.status,
            stdout(&o),
            stderr(&o),
            self.daemon_log(n)
        );
        stdout(&o)
    }

    pub fn stop(&self, n: usize, service: &str, ns: &str) -> String {
        let o = run(self.burrow(n, &["reroute", "--stop", service, "-n", ns]));
        assert!(
            o.status.success(),
            "reroute --stop {service} in laptop {n}: {}\n{}\ndaemon log:\n{}",
            stdout(&o),
            stderr(&o),
            self.daemon_log(n)
        );
        stdout(&o)
    }

    /// The body `curl ARGS` from the caller pod prints (success checked).
    pub fn curl_in_caller(&self, args: &[&str]) -> String {
        let mut all = vec!["curl", "-sS", "--max-time", "30"];
        all.extend_from_slice(args);
        ok(in_caller(self.c, &all))
    }

    /// Which "pod" answered `http://echo.default:8080/`.
    pub fn echo_pod(&self, extra: &[&str]) -> String {
        let mut args = vec!["http://echo.default:8080/"];
        args.extend_from_slice(extra);
        pod_field(&self.curl_in_caller(&args))
    }

    pub fn svc(&self, ns: &str, name: &str) -> Value {
        let out = ok(kubectl(
            self.c,
            &["get", "svc", name, "-n", ns, "-o", "json"],
        ));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("svc json: {e}: {out}"))
    }

    /// Pods of every namespace: name → start time (a restarted or
    /// replaced pod changes either).
    pub fn pods(&self) -> Vec<(String, String)> {
        let out = ok(kubectl(
            self.c,
            &[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.startTime} {.status.containerStatuses[*].restartCount}{\"\\n\"}{end}",
            ],
        ));
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter(|l| !l.starts_with("burrow-system/"))
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        v.sort();
        v
    }

    /// The Service's spec and annotations equal `before`'s, and burrow left
    /// nothing beside it.
    pub fn assert_restored(&self, ns: &str, name: &str, before: &Value) {
        let now = self.svc(ns, name);
        assert_eq!(
            now["spec"], before["spec"],
            "spec of {ns}/{name} not restored"
        );
        assert_eq!(
            now["metadata"]["annotations"], before["metadata"]["annotations"],
            "annotations of {ns}/{name} not restored"
        );
        assert_eq!(now["metadata"]["labels"], before["metadata"]["labels"]);
        assert_no_leftovers(self.c, ns, name);
    }

    pub fn selector(&self, ns: &str, name: &str) -> Value {
        self.svc(ns, name)["spec"]["selector"].clone()
    }

    /// Starts `args` in laptop `n` in the background.
    pub fn spawn(&self, n: usize, env: &[(&str, &str)], args: &[&str]) -> Child {
        self.at(n).spawn(env, args)
    }

    pub fn daemon_pid(&self, n: usize) -> i32 {
        let text = std::fs::read_to_string(self.run_dir(n).join("up-burrow0.json"))
            .expect("daemon state file");
        let v: Value = serde_json::from_str(&text).expect("state json");
        v["pid"].as_i64().expect("pid") as i32
    }
}

pub fn pod_field(body: &str) -> String {
    let v: Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("echo answer is not JSON ({e}): {body}"));
    v["pod"].as_str().unwrap_or_default().to_string()
}

/// The "pod" field of an echo answer; None when `body` is not one (a 502
/// page, say).
pub fn pod_field_of(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    v["pod"].as_str().map(str::to_string)
}

/// The "pod" fields of several JSON answers printed back to back.
pub fn pods_in(out: &str) -> Vec<String> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<Value>()
        .map(|v| {
            v.unwrap_or_else(|e| panic!("{e}: {out}"))["pod"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// burrow leaves no shadow Service or EndpointSlice for `ns/name`: they
/// go within seconds of the restore (the shadow outlives burrow's slice
/// by kube-proxy's lag, make-before-break).
pub fn assert_no_leftovers(c: &Cluster, ns: &str, name: &str) {
    let list = || {
        ok(kubectl(
            c,
            &[
                "get",
                "svc,endpointslices",
                "-n",
                ns,
                "-l",
                &format!("burrow.dev/reroute-of={name}"),
                "-o",
                "name",
            ],
        ))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left = list();
        if left.trim().is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "burrow objects left 20 s after the restore: {left}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
