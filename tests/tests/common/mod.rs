//! Shared helpers of the end-to-end tests.
#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use burrow_tests::cluster::{Cluster, ClusterOptions};

pub mod flows;
pub mod laptop;
pub mod laptops;
pub mod shared;
#[allow(unused_imports)]
pub use flows::{FLOWS_PORT, flows_pod_ready, flows_yaml};
#[allow(unused_imports)]
pub use laptop::{Laptop, bin_dir};
#[allow(unused_imports)]
pub use laptops::{Setup, assert_no_leftovers, pod_field, pod_field_of, pods_in};
#[allow(unused_imports)]
pub use shared::{SharedCluster, shared_cluster, shared_cluster_alone};

/// Brings a miniature cluster up for one test group, or returns None (with a
/// message) when the end-to-end gate says to skip.
pub fn cluster(name: &str, laptops: usize) -> Option<Cluster> {
    if !burrow_tests::net::root_or_skip(name) {
        return None;
    }
    let opts = ClusterOptions {
        name: format!("{name}{}", std::process::id() % 10_000),
        workloads: None,
        laptops,
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_minicluster"));
    Some(Cluster::up(bin, &opts).expect("minicluster up"))
}

/// Runs a command to completion, returning its output.
pub fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the command and asserts success, returning stdout.
pub fn ok(cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Polls `f` until it returns Some, for at most `limit` (a deadline for a
/// hang, not a performance assertion).
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("gave up waiting after {limit:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl --kubeconfig <host kubeconfig> ARGS` as a Command.
pub fn kubectl(c: &Cluster, args: &[&str]) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(c.host_kubeconfig()).args(args);
    cmd
}

/// The name of the first pod in `ns` with label `app=<app>`.
pub fn pod_of(c: &Cluster, ns: &str, app: &str) -> String {
    let out = ok(kubectl(
        c,
        &[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    ));
    assert!(!out.trim().is_empty(), "no pod with app={app} in {ns}");
    out.trim().to_string()
}

/// Runs `args` inside the `caller` pod.
pub fn in_caller(c: &Cluster, args: &[&str]) -> Command {
    let caller = pod_of(c, "default", "caller");
    c.exec(&format!("pod/default/{caller}"), args)
}

/// `kubectl ARGS` with `input` on stdin; the output (success not checked).
pub fn kubectl_input(c: &Cluster, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut cmd = kubectl(c, args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("{shown}: writing stdin: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{shown}: {e}"))
}

/// `kubectl apply -f -` of `yaml`, asserting success; stdout.
pub fn kubectl_apply(c: &Cluster, yaml: &str) -> String {
    let o = kubectl_input(c, &["apply", "-f", "-"], yaml);
    assert!(
        o.status.success(),
        "kubectl apply failed ({}):\nstdout: {}\nstderr: {}\ninput:\n{yaml}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Waits until pod `ns/name` is Running and Ready.
pub fn wait_pod_ready(c: &Cluster, ns: &str, name: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("pod {ns}/{name} ready"),
        || {
            let o = run(kubectl(
                c,
                &[
                    "get",
                    "pod",
                    name,
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={.status.phase} {.status.conditions[?(@.type==\"Ready\")].status}",
                ],
            ));
            (stdout(&o).trim() == "Running True").then_some(())
        },
    );
}

/// The gateway's last `lines` log lines (for a failure to show what the
/// gateway saw), or why they could not be read.
pub fn gateway_log(c: &Cluster, lines: usize) -> String {
    let tail = lines.to_string();
    let o = run(kubectl(
        c,
        &[
            "-n",
            "burrow-system",
            "logs",
            "deploy/burrow-gateway",
            "--tail",
            &tail,
        ],
    ));
    format!("{}{}", stdout(&o), stderr(&o))
}

/// `kubectl logs ARGS` once it prints something containing `want`.
pub fn logs_containing(c: &Cluster, args: &[&str], want: &str) -> String {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    eventually(
        Duration::from_secs(20),
        &format!("kubectl logs {} to show {want:?}", args.join(" ")),
        || {
            let o = run(kubectl(c, &all));
            let out = stdout(&o);
            out.contains(want).then_some(out)
        },
    )
}

/// The acceptance points of one test: each runs even when an earlier one
/// failed; `finish` fails the test with every failure.
pub struct Points {
    test: &'static str,
    failures: Vec<String>,
}

impl Points {
    pub fn new(test: &'static str) -> Self {
        Self {
            test,
            failures: Vec::new(),
        }
    }

    pub fn point(&mut self, name: &str, f: &dyn Fn()) {
        let start = Instant::now();
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(()) => eprintln!("{}: point {name}: ok ({:?})", self.test, start.elapsed()),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("{}: point {name}: FAILED: {msg}", self.test);
                self.failures.push(format!("{name}: {msg}"));
            }
        }
    }

    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "failed points:\n{}",
            self.failures.join("\n")
        );
    }
}

/// `kubectl ARGS -o jsonpath=PATH`, trimmed; fails when it prints nothing.
pub fn jsonpath(c: &Cluster, args: &[&str], path: &str) -> String {
    let mut all = args.to_vec();
    let jp = format!("jsonpath={path}");
    all.extend_from_slice(&["-o", &jp]);
    let out = ok(kubectl(c, &all));
    assert!(!out.trim().is_empty(), "kubectl {all:?} printed nothing");
    out.trim().to_string()
}
