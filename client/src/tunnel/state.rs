//! The state file of a running `burrow up`: what it changed, so that a later
//! `burrow up` or `burrow down` can undo it if the process was killed.
//!
//! `burrow up` writes `<run dir>/up-<ifname>.json` before it makes any
//! change (created exclusively, so two `up`s on one name cannot both
//! proceed), updates it once the device exists and once the tunnel is ready,
//! and removes it after its own cleanup. A file whose process is gone (or is
//! a different process under the same pid) is stale: [`clean_stale`] removes
//! what it names and then the file.
//!
//! A non-persistent TUN device (the only kind `burrow up` creates) and every
//! route through it disappear with the last file descriptor on it, so after a
//! SIGKILL the kernel has usually removed both already; the state file is
//! then all that is left. [`clean_stale`] still checks, and deletes the
//! device only if both its name and its interface index match what the file
//! recorded, so a device someone else created since is never touched.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::tunnel::netlink::Netlink;

/// Where the files of one tunnel live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub state: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
}

impl Paths {
    pub fn new(run_dir: &Path, ifname: &str) -> Self {
        Self {
            state: run_dir.join(format!("up-{ifname}.json")),
            log: run_dir.join(format!("up-{ifname}.log")),
            dir: run_dir.to_owned(),
        }
    }

    fn tmp(&self) -> PathBuf {
        self.state.with_extension("json.tmp")
    }

    pub fn ensure_dir(&self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }
}

/// What a `burrow up` process has changed, or is about to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    /// The process's start time (clock ticks since boot), so a reused pid
    /// is not mistaken for ours.
    pub start_time: u64,
    /// Inode of the network namespace the device lives in.
    pub netns: u64,
    pub ifname: String,
    /// Set once the device exists.
    pub ifindex: Option<u32>,
    /// Routes through the device that `up` adds (or added).
    pub routes: Vec<IpNet>,
    pub config: PathBuf,
    /// The tunnel is up and passing traffic.
    pub ready: bool,
}

impl State {
    /// A state for this process.
    pub fn for_this_process(
        ifname: &str,
        routes: Vec<IpNet>,
        config: PathBuf,
    ) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let start_time = read_process(pid)
            .and_then(|p| {
                p.map(|p| p.start_time)
                    .ok_or(io::ErrorKind::NotFound.into())
            })
            .context("cannot read this process's start time from /proc")?;
        Ok(Self {
            pid,
            start_time,
            netns: current_netns()?,
            ifname: ifname.to_owned(),
            ifindex: None,
            routes,
            config,
            ready: false,
        })
    }

    /// Write the file for the first time; fails if one exists.
    pub fn create(&self, paths: &Paths) -> anyhow::Result<()> {
        paths.ensure_dir()?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&paths.state)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                    "another `burrow up` on {} started at the same time ({} exists)",
                    self.ifname,
                    paths.state.display()
                ),
                _ => anyhow::Error::new(e)
                    .context(format!("cannot create {}", paths.state.display())),
            })?;
        f.write_all(&self.to_json()?)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", paths.state.display()))
    }

    /// Replace the file atomically.
    pub fn update(&self, paths: &Paths) -> anyhow::Result<()> {
        let tmp = paths.tmp();
        fs::write(&tmp, self.to_json()?)
            .and_then(|()| fs::rename(&tmp, &paths.state))
            .with_context(|| format!("cannot write {}", paths.state.display()))
    }

    fn to_json(&self) -> anyhow::Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self).context("cannot encode the state")?;
        v.push(b'\n');
        Ok(v)
    }
}

/// Remove the state file (and a leftover temporary one).
pub fn remove(paths: &Paths) -> anyhow::Result<()> {
    let _ = fs::remove_file(paths.tmp());
    match fs::remove_file(&paths.state) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", paths.state.display())),
    }
}

/// What an existing state file says.
#[derive(Debug)]
pub enum Previous {
    /// No state file.
    None,
    /// Its process still runs.
    Running(State),
    /// Its process is gone: cleanup is due.
    Stale(State),
    /// The file cannot be read as a state; it names nothing to undo.
    Unreadable(String),
}

/// Read the state file and tell whether its process still runs.
pub fn inspect(paths: &Paths) -> anyhow::Result<Previous> {
    let text = match fs::read(&paths.state) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Previous::None),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", paths.state.display()));
        }
    };
    let state: State = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => return Ok(Previous::Unreadable(e.to_string())),
    };
    Ok(if is_running(&state) {
        Previous::Running(state)
    } else {
        Previous::Stale(state)
    })
}

/// Whether the process a state names is still that `burrow` process: same
/// start time, and the same program name as this one (`burrow`, or whatever
/// the binary is called).
pub fn is_running(state: &State) -> bool {
    let own_name = match read_process(std::process::id()) {
        Ok(Some(me)) => me.comm,
        _ => return true,
    };
    match read_process(state.pid) {
        Ok(Some(p)) => p.is_same_burrow(state.start_time, &own_name),
        // Unreadable /proc: assume it runs rather than undo its work.
        Err(_) => true,
        Ok(None) => false,
    }
}

/// The fields of `/proc/<pid>/stat` we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub comm: String,
    pub state: char,
    pub start_time: u64,
}

impl ProcessInfo {
    fn is_same_burrow(&self, start_time: u64, name: &str) -> bool {
        // Zombies and dead tasks have exited: nothing will clean up after
        // them any more.
        !matches!(self.state, 'Z' | 'X' | 'x') && self.start_time == start_time && self.comm == name
    }
}

/// Parse `/proc/<pid>/stat`: `pid (comm) state ppid ... starttime(22) ...`.
/// The comm may itself contain spaces and parentheses, hence the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcessInfo> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    // Fields 4..=21 come before starttime (field 22); `state` was field 3.
    let start_time = rest.nth(18)?.parse().ok()?;
    Some(ProcessInfo {
        comm,
        state,
        start_time,
    })
}

fn read_process(pid: u32) -> io::Result<Option<ProcessInfo>> {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text)
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // ESRCH while reading: it exited meanwhile.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Inode of this process's network namespace.
pub fn current_netns() -> anyhow::Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")
        .context("cannot read /proc/self/ns/net")?
        .ino())
}

/// Undo what a stale state names, remove its file, and say what was done in
/// one line.
pub async fn clean_stale(nl: &Netlink, state: &State, paths: &Paths) -> anyhow::Result<String> {
    let what = format!(
        "cleaned up after `burrow up` (pid {}) on {}, which did not exit cleanly",
        state.pid, state.ifname
    );
    let outcome = if state.netns != current_netns()? {
        // Its namespace's device went with the process; nothing here is
        // its.
        "it ran in another network namespace; removed its state file".to_owned()
    } else {
        let device = match state.ifindex {
            Some(index) => nl
                .link_name(index)
                .await?
                .filter(|name| *name == state.ifname)
                .map(|_| index),
            None => None,
        };
        match device {
            Some(index) => {
                let mut routes = 0;
                for net in &state.routes {
                    if nl.del_route(index, *net).await? {
                        routes += 1;
                    }
                }
                nl.del_link(index).await?;
                format!(
                    "removed device {} with {routes} route(s) and its state file",
                    state.ifname
                )
            }
            None => "its device and routes were already gone; removed its state file".to_owned(),
        }
    };
    remove(paths)?;
    Ok(format!("{what}: {outcome}"))
}

/// Remove an unreadable state file, in one line.
pub fn clean_unreadable(paths: &Paths, why: &str) -> anyhow::Result<String> {
    remove(paths)?;
    Ok(format!(
        "removed unreadable state file {} ({why}); it named nothing to undo",
        paths.state.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line from a kernel 6.1 /proc/<pid>/stat, comm with a space and
    // a parenthesis.
    const STAT: &str = "4242 (burrow (x) 1) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                        12 5 0 0 20 0 3 0 987654 123456789 2000 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17003 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn parses_proc_stat() {
        let p = parse_stat(STAT).expect("parses");
        assert_eq!(p.comm, "burrow (x) 1");
        assert_eq!(p.state, 'S');
        assert_eq!(p.start_time, 987654);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = read_process(std::process::id())
            .expect("readable")
            .expect("exists");
        assert!(matches!(me.state, 'R' | 'S'), "{me:?}");
        assert!(me.start_time > 0);
        assert_eq!(read_process(u32::MAX).expect("readable"), None);
    }

    #[test]
    fn liveness_needs_same_start_time_name_and_no_zombie() {
        let p = |comm: &str, state, start_time| ProcessInfo {
            comm: comm.into(),
            state,
            start_time,
        };
        assert!(p("burrow", 'S', 7).is_same_burrow(7, "burrow"));
        assert!(
            !p("burrow", 'S', 8).is_same_burrow(7, "burrow"),
            "pid reused"
        );
        assert!(!p("bash", 'S', 7).is_same_burrow(7, "burrow"), "not burrow");
        assert!(!p("burrow", 'Z', 7).is_same_burrow(7, "burrow"), "zombie");
    }

    fn state(pid: u32, start_time: u64) -> State {
        State {
            pid,
            start_time,
            netns: 1,
            ifname: "bt0".into(),
            ifindex: Some(9),
            routes: vec!["10.77.0.0/24".parse().expect("net")],
            config: "/etc/wg.conf".into(),
            ready: true,
        }
    }

    #[test]
    fn state_file_round_trip_and_inspection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(&dir.path().join("run"), "bt0");
        assert!(matches!(inspect(&paths).expect("inspect"), Previous::None));

        // This very process: running.
        let me = State::for_this_process("bt0", vec![], "/x.conf".into()).expect("me");
        me.create(&paths).expect("create");
        assert!(
            me.create(&paths).is_err(),
            "a second create must fail while the file exists"
        );
        match inspect(&paths).expect("inspect") {
            Previous::Running(s) => assert_eq!(s, me),
            other => panic!("{other:?}"),
        }

        // Same pid, other start time: a reused pid, so stale.
        let reused = state(std::process::id(), me.start_time + 1);
        reused.update(&paths).expect("update");
        match inspect(&paths).expect("inspect") {
            Previous::Stale(s) => assert_eq!(s, reused),
            other => panic!("{other:?}"),
        }

        // A pid that does not exist: stale.
        state(u32::MAX, 1).update(&paths).expect("update");
        assert!(matches!(
            inspect(&paths).expect("inspect"),
            Previous::Stale(_)
        ));

        fs::write(&paths.state, b"{not json").expect("write");
        let Previous::Unreadable(why) = inspect(&paths).expect("inspect") else {
            panic!("unreadable expected");
        };
        let line = clean_unreadable(&paths, &why).expect("clean");
        assert!(line.starts_with("removed unreadable state file"), "{line}");
        assert!(matches!(inspect(&paths).expect("inspect"), Previous::None));
        remove(&paths).expect("removing twice is fine");
    }
}
