//! `minicluster down` and `gc` leave nothing behind: no namespace, process,
//! veth, iptables rule or file. Runs alone in its own test binary (cargo runs
//! test binaries one after another), because `gc` removes every cluster.
//!
//! Two tests, each with its own cluster (`cargo test --test cleanup gc`):
//! - `down_leaves_nothing_behind`
//! - `gc_removes_what_a_killed_daemon_left`
//!
//! Both compare the machine's namespaces, links and iptables with what
//! they were before their cluster, and `gc` removes every cluster: they
//! take turns (a lock), whatever `--test-threads` says.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::*;

fn netns_list() -> Vec<String> {
    let o = run({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    let mut v: Vec<String> = stdout(&o)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Processes that belong to the cluster whose state dir is `cluster_dir`:
/// its daemon (`minicluster serve --name N`) and anything whose command line
/// mentions the dir (nginx, dnsmasq configs live there).
fn processes_of(cluster_dir: &str) -> Vec<String> {
    let name = cluster_dir.rsplit('/').next().unwrap_or("");
    let daemon = format!("serve --name {name} ");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if let Ok(cmd) = std::fs::read(p.join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if (cmd.contains(cluster_dir) || cmd.contains(&daemon)) && !cmd.contains("cargo") {
                found.push(cmd);
            }
        }
    }
    found
}

fn host_links() -> String {
    let o = run({
        let mut c = Command::new("ip");
        c.args(["-o", "link", "show"]);
        c
    });
    let mut lines: Vec<String> = stdout(&o)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    lines.sort();
    lines.join(",")
}

fn host_iptables() -> String {
    let o = run({
        let mut c = Command::new("iptables-save");
        c.env("LC_ALL", "C");
        c
    });
    stdout(&o)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One test at a time.
static TURN: Mutex<()> = Mutex::new(());

#[test]
fn down_leaves_nothing_behind() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let before = (netns_list(), host_links(), host_iptables());
    let Some(c) = cluster("gc", 2) else { return };
    let name = c.name().to_string();
    let dir = format!("/run/minicluster/{name}");
    assert!(
        netns_list()
            .iter()
            .any(|n| n.starts_with(&format!("mc-{name}-")))
    );
    assert!(!processes_of(&dir).is_empty() || Path::new(&dir).exists());
    c.down().expect("down");
    assert_eq!(netns_list(), before.0, "namespaces left after down");
    assert_eq!(host_links(), before.1, "links left in the host namespace");
    assert_eq!(host_iptables(), before.2, "host iptables changed");
    assert!(
        processes_of(&dir).is_empty(),
        "processes left: {:?}",
        processes_of(&dir)
    );
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
    assert!(
        !Path::new("/etc/netns").exists()
            || std::fs::read_dir("/etc/netns")
                .map(|d| d.flatten().all(|e| !e
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("mc-{name}-"))))
                .unwrap_or(true),
        "/etc/netns entries left"
    );
}

/// A cluster whose daemon was killed leaves debris that gc removes.
#[test]
fn gc_removes_what_a_killed_daemon_left() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let before = netns_list();
    let Some(c2) = cluster("gd", 1) else { return };
    let name2 = c2.name().to_string();
    let dir2 = format!("/run/minicluster/{name2}");
    let pid = std::fs::read_to_string(format!("{dir2}/pid")).expect("pid file");
    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
    std::mem::forget(c2); // the crash: no orderly down
    let mc = Path::new(env!("CARGO_BIN_EXE_minicluster"));
    let mut gc = Command::new(mc);
    gc.arg("gc");
    let o = run(gc);
    assert!(o.status.success(), "gc: {}", stderr(&o));
    assert_eq!(netns_list(), before, "namespaces left after gc");
    assert!(
        processes_of(&dir2).is_empty(),
        "processes left after gc: {:?}",
        processes_of(&dir2)
    );
    assert!(!Path::new(&dir2).exists(), "{dir2} left after gc");
}
