//! One laptop of a miniature cluster: `burrow` run in its namespace with
//! its own run dir, its status, its daemon's log, commands beside it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use burrow_tests::cluster::Cluster;
use serde_json::Value;

use super::*;

/// Laptop `n` of a cluster (1: `laptop`, 2: `laptop2`, ...).
pub struct Laptop<'a> {
    pub c: &'a Cluster,
    pub n: usize,
    run_dir: PathBuf,
}

/// The directory of the test binaries (`burrow`, `mc-echo`, ...).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_minicluster"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

impl<'a> Laptop<'a> {
    /// Laptop `n` of `c`, whose burrow keeps its state in `run_dir`.
    pub fn new(c: &'a Cluster, n: usize, run_dir: PathBuf) -> Self {
        Laptop { c, n, run_dir }
    }

    /// The laptop's target name for `minicluster exec`.
    pub fn name(&self) -> String {
        if self.n == 1 {
            "laptop".into()
        } else {
            format!("laptop{}", self.n)
        }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// `args` run inside the laptop's namespace.
    pub fn on(&self, args: &[&str]) -> Command {
        self.c.exec(&self.name(), args)
    }

    /// Runs `args` in the laptop; stdout on success, else a panic with the
    /// daemon's log.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = run(self.on(args));
        assert!(
            o.status.success(),
            "{args:?} in laptop {} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
            self.n,
            o.status,
            stdout(&o),
            stderr(&o),
            self.daemon_log()
        );
        stdout(&o)
    }

    /// `burrow --run-dir <laptop's> ARGS [--kubeconfig K]` in the laptop.
    pub fn burrow_with(&self, kubeconfig: Option<&Path>, args: &[&str]) -> Command {
        let burrow = bin_dir().join("burrow");
        let mut all = vec![
            burrow.to_str().expect("utf-8 path").to_string(),
            "--run-dir".into(),
            self.run_dir.to_str().expect("utf-8 path").to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        if let Some(k) = kubeconfig {
            all.push("--kubeconfig".into());
            all.push(k.display().to_string());
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.on(&refs)
    }

    /// `burrow --run-dir <laptop's> ARGS` in the laptop.
    pub fn burrow(&self, args: &[&str]) -> Command {
        self.burrow_with(None, args)
    }

    /// The last lines of the daemon's log.
    pub fn daemon_log(&self) -> String {
        burrow_tests::cluster::tail(&self.run_dir.join("daemon.log"), 60)
    }

    /// `burrow connect --kubeconfig <admin's> EXTRA`.
    pub fn connect(&self, extra: &[&str]) -> Output {
        let kc = self.c.kubeconfig().display().to_string();
        let mut args = vec!["connect", "--kubeconfig", &kc];
        args.extend_from_slice(extra);
        run(self.burrow(&args))
    }

    /// As [`Laptop::connect`], asserting success; stdout.
    pub fn connect_ok(&self, extra: &[&str]) -> String {
        let o = self.connect(extra);
        assert!(
            o.status.success(),
            "burrow connect {extra:?} in laptop {} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}\ncluster log:\n{}",
            self.n,
            o.status,
            stdout(&o),
            stderr(&o),
            self.daemon_log(),
            burrow_tests::cluster::tail(&self.c.state_dir().join("log"), 40)
        );
        stdout(&o)
    }

    /// `burrow disconnect`, asserting success; stdout.
    pub fn disconnect(&self) -> String {
        ok(self.burrow(&["disconnect"]))
    }

    /// Whether the daemon's socket is there.
    pub fn connected(&self) -> bool {
        self.run_dir.join("daemon.sock").exists()
    }

    /// `burrow status -o json`.
    pub fn status_json(&self) -> Value {
        let out = ok(self.burrow(&["status", "-o", "json"]));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status -o json: {e}: {out}"))
    }

    /// Pids of the processes in the laptop's namespace, with their command
    /// lines.
    pub fn processes(&self) -> Vec<(String, String)> {
        let ns = self.c.netns(&self.name()).expect("netns");
        let pids = ok({
            let mut c = Command::new("ip");
            c.args(["netns", "pids", &ns]);
            c
        });
        pids.split_whitespace()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                (pid.to_string(), cmdline)
            })
            .collect()
    }

    /// Starts `args` in the laptop in the background (output discarded).
    pub fn spawn(&self, env: &[(&str, &str)], args: &[&str]) -> Child {
        let mut all = vec!["env".to_string()];
        all.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.on(&refs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn in laptop")
    }
}
