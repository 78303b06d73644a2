//! The laptop's resolver configuration: which mode applies, the
//! resolv.conf rewrite with a byte-exact backup in the daemon's run dir
//! (restored on disconnect and, after a crash, on the next start), and
//! systemd-resolved per-link split DNS.
//!
//! The backup is written (and synced) before the file is touched, so a
//! crash at any point leaves either the original or a backup that restores
//! it. Restore puts the original back only while the file is still the one
//! burrow wrote: a file another program rewrote since is left alone.
//!
//! Not built: macOS. There the stub would be the same; the integration
//! would be a file per routed domain in `/etc/resolver/` (`nameserver
//! <stub>`), removed on disconnect and on the next start after a crash.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The system's resolver file.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved keeps the real upstream servers.
pub const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
const RESOLVED_DIR: &str = "/run/systemd/resolve/";
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";
/// The backup's file names in the run dir.
const BACKUP: &str = "resolv.conf.orig";
const RECORD: &str = "resolv.conf.burrow.json";

/// The laptop's resolv.conf, parsed as the gateway parses its pod's.
pub use burrow_api::resolv::ResolvConf;

/// The search list a pod in `namespace` has, then the laptop's own.
pub fn search_list(namespace: &str, domain: &str, original: &[String]) -> Vec<String> {
    let domain = domain.trim_end_matches('.');
    let mut v = vec![
        format!("{namespace}.svc.{domain}"),
        format!("svc.{domain}"),
        domain.to_owned(),
    ];
    for s in original {
        if !v.contains(s) {
            v.push(s.clone());
        }
    }
    v
}

/// The resolv.conf burrow writes.
pub fn stub_resolv_conf(stub: IpAddr, search: &[String], original: &ResolvConf) -> String {
    let mut t = String::from(
        "# Written by burrow while connected: cluster names and every other name go\n\
         # to burrow's DNS stub. `burrow disconnect` puts the original back.\n",
    );
    t.push_str(&format!("nameserver {stub}\n"));
    t.push_str(&format!("search {}\n", search.join(" ")));
    let options: Vec<&str> = original
        .options
        .iter()
        .map(String::as_str)
        // Options about several servers mean nothing with one stub.
        .filter(|o| !matches!(*o, "rotate"))
        .collect();
    if !options.is_empty() {
        t.push_str(&format!("options {}\n", options.join(" ")));
    }
    t
}

/// How the laptop's resolver is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `/etc/resolv.conf` is rewritten to the stub.
    ResolvConf,
    /// systemd-resolved routes the cluster's domains to the stub on the
    /// TUN device.
    SystemdResolved,
    /// `--dns=off`: nothing changed.
    Off,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::ResolvConf => "resolv.conf",
            Mode::SystemdResolved => "systemd-resolved",
            Mode::Off => "off",
        })
    }
}

/// systemd-resolved manages `path` when it is a link into
/// `/run/systemd/resolve/` and resolved is running (its socket exists) —
/// unless a file is bind-mounted over it (a network namespace entered with
/// `ip netns exec`: its own resolv.conf, resolved does not serve it).
pub fn detect(path: &Path) -> Mode {
    if is_mount_point(path) {
        return Mode::ResolvConf;
    }
    let into_resolved = std::fs::read_link(path)
        .map(|t| t.to_string_lossy().contains(RESOLVED_DIR))
        .unwrap_or(false);
    if into_resolved && Path::new(RESOLVED_SOCKET).exists() {
        Mode::SystemdResolved
    } else {
        Mode::ResolvConf
    }
}

/// Failures of the system integration.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SystemError + 'a {
    move |source| SystemError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the run dir records about a rewrite.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The file rewritten.
    path: PathBuf,
    /// It was a symbolic link to this (restored as a link).
    symlink: Option<PathBuf>,
    /// Exactly what burrow wrote.
    written: String,
}

/// Whether `path` is a mount point (in a network namespace entered with
/// `ip netns exec`, /etc/resolv.conf is a bind mount: it cannot be renamed
/// over, only written in place).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|m| m.replace("\\040", " ").replace("\\011", "\t"))
            .is_some_and(|m| Path::new(&m) == canon)
    })
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path`: in place when it is a mount point, else to a
/// temporary file beside it renamed over it (atomic).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SystemError> {
    if is_mount_point(path) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(io("cannot open", path))?;
        f.write_all(bytes).map_err(io("cannot write", path))?;
        f.sync_all().map_err(io("cannot sync", path))?;
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join(format!(
        ".{}.burrow-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(bytes).map_err(io("cannot write", &tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set permissions of", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot replace", path))?;
    fsync_dir(dir);
    Ok(())
}

/// A rewrite of resolv.conf in progress; [`restore`] undoes it.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// The original file, parsed (its nameservers are the stub's
    /// upstreams).
    pub original: ResolvConf,
}

/// Reads `path` (the original), keeps it in `run_dir`, and replaces it
/// with `make(original)`.
pub fn rewrite(
    path: &Path,
    run_dir: &Path,
    make: impl FnOnce(&ResolvConf) -> String,
) -> Result<Rewritten, SystemError> {
    if run_dir.join(RECORD).exists() {
        return Err(SystemError::Other(format!(
            "a backup of {} from an earlier connection is still in {}; it is restored \
             when the daemon starts (run `burrow disconnect`, then connect again)",
            path.display(),
            run_dir.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(io("cannot read", path))?;
    let symlink = std::fs::symlink_metadata(path)
        .map_err(io("cannot inspect", path))?
        .file_type()
        .is_symlink()
        .then(|| std::fs::read_link(path).map_err(io("cannot read the link", path)))
        .transpose()?;
    let original = ResolvConf::parse(&String::from_utf8_lossy(&bytes));
    let written = make(&original);
    std::fs::create_dir_all(run_dir).map_err(io("cannot create", run_dir))?;
    // Backup first, synced, then the record naming it: a crash before the
    // record leaves the file untouched.
    write_file(&run_dir.join(BACKUP), &bytes, 0o600)?;
    let record = Record {
        path: path.to_owned(),
        symlink,
        written: written.clone(),
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| SystemError::Other(format!("cannot encode the backup record: {e}")))?;
    write_file(&run_dir.join(RECORD), &json, 0o600)?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    if let Err(e) = write_file(path, written.as_bytes(), mode) {
        let _ = std::fs::remove_file(run_dir.join(RECORD));
        let _ = std::fs::remove_file(run_dir.join(BACKUP));
        return Err(e);
    }
    Ok(Rewritten { original })
}

/// Whether `run_dir` holds a backup to restore.
pub fn has_backup(run_dir: &Path) -> bool {
    run_dir.join(RECORD).exists()
}

/// Puts back the file a [`rewrite`] replaced (no-op without a backup).
/// Returns what was done, for the user.
pub fn restore(run_dir: &Path) -> Result<Option<String>, SystemError> {
    let record_path = run_dir.join(RECORD);
    let text = match std::fs::read(&record_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A backup without its record: the crash came before the file
            // was touched.
            let _ = std::fs::remove_file(run_dir.join(BACKUP));
            return Ok(None);
        }
        Err(e) => return Err(io("cannot read", &record_path)(e)),
    };
    let record: Record = serde_json::from_slice(&text).map_err(|e| {
        SystemError::Other(format!(
            "{} is not a burrow backup record ({e}); the original resolver file is in {}",
            record_path.display(),
            run_dir.join(BACKUP).display()
        ))
    })?;
    let backup = run_dir.join(BACKUP);
    let original = std::fs::read(&backup).map_err(io("cannot read the backup", &backup))?;
    let path = &record.path;
    let current = std::fs::read(path).ok();
    let note = if current
        .as_deref()
        .is_some_and(|c| c != record.written.as_bytes())
    {
        format!(
            "{} was changed by another program while connected: left as it is \
             (the original was {})",
            path.display(),
            backup.display()
        )
    } else {
        match &record.symlink {
            Some(target) => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let tmp = dir.join(".resolv.conf.burrow-link");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp).map_err(io("cannot create", &tmp))?;
                std::fs::rename(&tmp, path).map_err(io("cannot replace", path))?;
                fsync_dir(dir);
            }
            None => write_file(path, &original, 0o644)?,
        }
        format!("restored {}", path.display())
    };
    if note.starts_with("restored") {
        let _ = std::fs::remove_file(&backup);
    }
    std::fs::remove_file(&record_path).map_err(io("cannot remove", &record_path))?;
    Ok(Some(note))
}

/// systemd-resolved: the stub as the DNS server of `ifname`, with the
/// cluster's search domains and routing domains (`~<domain>`, `~svc`,
/// `~<namespace>` each, reverse zones of the cluster ranges are left to
/// the global servers). Runs `resolvectl`; the settings die with the
/// device, and [`resolved_revert`] drops them earlier.
pub fn resolved_apply(
    ifname: &str,
    stub: IpAddr,
    search: &[String],
    domain: &str,
    namespaces: &[String],
) -> Result<(), SystemError> {
    resolvectl(&["dns", ifname, &stub.to_string()])?;
    let domain = domain.trim_end_matches('.');
    let mut domains: Vec<String> = search.iter().take(3).cloned().collect();
    domains.push(format!("~{domain}"));
    domains.push("~svc".into());
    for ns in namespaces {
        domains.push(format!("~{ns}"));
    }
    let mut args = vec!["domain", ifname];
    args.extend(domains.iter().map(String::as_str));
    resolvectl(&args)?;
    // Only the routed domains go to the stub, not every name.
    resolvectl(&["default-route", ifname, "false"])
}

/// Drops what [`resolved_apply`] set on `ifname`.
pub fn resolved_revert(ifname: &str) -> Result<(), SystemError> {
    resolvectl(&["revert", ifname])
}

fn resolvectl(args: &[&str]) -> Result<(), SystemError> {
    let out = Command::new("resolvectl")
        .args(args)
        .output()
        .map_err(|e| SystemError::Other(format!("cannot run resolvectl: {e}")))?;
    if !out.status.success() {
        return Err(SystemError::Other(format!(
            "resolvectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const ORIGINAL: &str = "# corporate\nnameserver 192.168.240.53\nnameserver fe80::1%eth0\n\
                            search corp.example\noptions edns0 rotate\n";

    #[test]
    fn parse_and_write() {
        let rc = ResolvConf::parse(ORIGINAL);
        assert_eq!(
            rc.nameservers,
            vec![
                "192.168.240.53".parse::<IpAddr>().expect("literal"),
                "fe80::1".parse::<IpAddr>().expect("literal")
            ]
        );
        assert_eq!(rc.search, vec!["corp.example"]);
        let search = search_list("default", "cluster.local", &rc.search);
        assert_eq!(
            search,
            vec![
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
        let text = stub_resolv_conf("198.19.0.2".parse().expect("literal"), &search, &rc);
        assert!(text.contains("\nnameserver 198.19.0.2\n"));
        assert!(text.contains(
            "\nsearch default.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        ));
        assert!(text.contains("\noptions edns0\n"));
        let stub: IpAddr = "198.19.0.2".parse().expect("literal");
        assert_eq!(rc.upstreams(stub).len(), 2);
        assert_eq!(
            ResolvConf::default().upstreams(stub),
            vec![SocketAddr::from(([127, 0, 0, 1], 53))]
        );
    }

    #[test]
    fn rewrite_and_restore_byte_for_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("resolv.conf");
        let run = dir.path().join("run");
        // No trailing newline, odd spacing: restored exactly.
        let original = b"nameserver   192.168.240.53\n# x\nsearch a.example";
        std::fs::write(&file, original).expect("write");
        let rw = rewrite(&file, &run, |o| {
            stub_resolv_conf("127.0.0.1".parse().expect("literal"), &o.search, o)
        })
        .expect("rewrite");
        assert_eq!(rw.original.search, vec!["a.example"]);
        assert!(
            std::fs::read_to_string(&file)
                .expect("read")
                .contains("nameserver 127.0.0.1")
        );
        assert!(has_backup(&run));
        // A second rewrite while a backup exists is refused.
        assert!(rewrite(&file, &run, |_| String::new()).is_err());
        assert!(restore(&run).expect("restore").is_some());
        assert_eq!(std::fs::read(&file).expect("read"), original);
        assert!(!has_backup(&run));
        assert_eq!(restore(&run).expect("restore"), None);
    }

    #[test]
    fn a_file_changed_by_someone_else_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("resolv.conf");
        let run = dir.path().join("run");
        std::fs::write(&file, "nameserver 10.0.0.1\n").expect("write");
        rewrite(&file, &run, |_| "nameserver 127.0.0.1\n".into()).expect("rewrite");
        std::fs::write(&file, "nameserver 10.9.9.9\n").expect("write");
        let note = restore(&run).expect("restore").expect("a note");
        assert!(note.contains("changed by another program"), "{note}");
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "nameserver 10.9.9.9\n"
        );
    }

    #[test]
    fn symlinks_come_back_as_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("real.conf");
        let file = dir.path().join("resolv.conf");
        let run = dir.path().join("run");
        std::fs::write(&target, "nameserver 10.0.0.1\n").expect("write");
        std::os::unix::fs::symlink(&target, &file).expect("symlink");
        rewrite(&file, &run, |_| "nameserver 127.0.0.1\n".into()).expect("rewrite");
        assert!(
            !std::fs::symlink_metadata(&file)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        // The link's target is untouched.
        assert_eq!(
            std::fs::read_to_string(&target).expect("read"),
            "nameserver 10.0.0.1\n"
        );
        restore(&run).expect("restore");
        assert_eq!(std::fs::read_link(&file).expect("link"), target);
    }
}
