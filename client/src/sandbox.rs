//! The private view `burrow run` gives its command: a mount namespace of
//! its own in which the workload's volumes sit at their `mountPath`s and
//! `/etc/resolv.conf` has the workload namespace's search list, then the
//! command, as the invoking user.
//!
//! `burrow run` (root, multi-threaded) writes a [`Plan`] into a pipe and
//! starts `burrow sandbox-exec` (hidden), a fresh single-threaded process
//! that reads it from fd 3, builds the view and replaces itself with the
//! command (so the command is `run`'s child and gets its signals):
//!
//! 1. `unshare(CLONE_NEWNS)`, every mount private: nothing done here is
//!    seen outside.
//! 2. A tmpfs on the plan's staging directory (an empty directory `run`
//!    made in its run dir), made unbindable; in it a new root that mirrors
//!    `/` (each entry of `/` bound in recursively, symlinks copied) and a
//!    second tmpfs, the store. `chroot` into the new root: the machine's
//!    files are all there, and a missing mount point can be made without
//!    touching the machine's filesystem.
//! 3. Each volume: its mount point made when missing (the nearest existing
//!    directory above it is replaced, in this namespace only, by a tmpfs
//!    mirroring it plus the new entry), then a tmpfs there holding the
//!    files (or, for a `subPath`, a bind from the store), read-only.
//! 4. resolv.conf bound over `/etc/resolv.conf`; user, groups, working
//!    directory; the signals `run` passes on back to their defaults; exec.
//!
//! Secret material is only ever in the pipe, this process's memory and the
//! namespace's tmpfs mounts, which go away with the command's last
//! process.

use std::ffi::CString;
use std::fs;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt, lchown, symlink};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use burrow_deploy::podenv::{Content, Mount};
use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

/// The fd `sandbox-exec` reads its plan from.
pub const PLAN_FD: i32 = 3;

/// What `sandbox-exec` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub argv: Vec<String>,
    /// The command's whole environment.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Who runs it (None: stay root).
    pub user: Option<RunAs>,
    pub mounts: Vec<PlanMount>,
    /// Bound over /etc/resolv.conf when set.
    pub resolv_conf: Option<String>,
    /// An empty directory to build the view in.
    pub staging: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A volume to show at `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanMount {
    pub target: String,
    pub sub_path: Option<String>,
    pub read_only: bool,
    pub secret: bool,
    /// (relative path, contents, mode); None: an empty writable directory.
    pub files: Option<Vec<(String, Vec<u8>, u32)>>,
}

impl PlanMount {
    pub fn from_mount(m: &Mount) -> anyhow::Result<Self> {
        let target = clean_abs(&m.mount_path).with_context(|| {
            format!("mountPath {:?} is not a clean absolute path", m.mount_path)
        })?;
        Ok(Self {
            target,
            sub_path: m.sub_path.clone(),
            read_only: m.read_only,
            secret: m.secret,
            files: match &m.content {
                Content::Empty => None,
                Content::Files(f) => Some(
                    f.iter()
                        .map(|f| (f.path.clone(), f.data.clone(), f.mode))
                        .collect(),
                ),
            },
        })
    }
}

/// What a mount shows at its mountPath: with a `subPath`, one file or a
/// directory of the volume (missing: an empty directory, as the kubelet
/// makes it).
pub enum Shown {
    File(Vec<u8>, u32),
    Dir(PlanMount),
}

impl PlanMount {
    pub fn sub_mount(self) -> Shown {
        let (Some(sub), Some(files)) = (&self.sub_path, &self.files) else {
            return Shown::Dir(self);
        };
        if let Some((_, data, mode)) = files.iter().find(|(p, _, _)| p == sub) {
            return Shown::File(data.clone(), *mode);
        }
        let prefix = format!("{sub}/");
        let inner = files
            .iter()
            .filter_map(|(p, d, m)| Some((p.strip_prefix(&prefix)?.to_string(), d.clone(), *m)))
            .collect();
        Shown::Dir(PlanMount {
            sub_path: None,
            files: Some(inner),
            ..self
        })
    }
}

/// Writes a whole-volume view at `dir` (`--files-dir`: Secret files 0600).
pub fn write_dir_at(dir: &Path, m: &PlanMount, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    write_files(dir, m, owner, true)
}

/// Writes one file of a volume at `path` (`--files-dir`: Secret files
/// 0600).
pub fn write_file_at(
    path: &Path,
    data: &[u8],
    mode: u32,
    secret: bool,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<()> {
    let parent = path.parent().context("a file needs a directory")?;
    let name = path
        .file_name()
        .context("a file needs a name")?
        .to_string_lossy()
        .into_owned();
    let one = PlanMount {
        target: String::new(),
        sub_path: None,
        read_only: true,
        secret,
        files: Some(vec![(name, data.to_vec(), mode)]),
    };
    write_files(parent, &one, owner, true)
}

/// An absolute path without `.`, `..` or empty parts (`/a/b`).
pub fn clean_abs(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|s| *s == "." || *s == "..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

/// Writes a volume's files under `dir` (made), owned by `owner`; with
/// `private`, Secret files are 0600 whatever the pod's mode (a directory
/// on a shared filesystem, `--files-dir`). A file already there (an
/// earlier `--files-dir`) is replaced.
fn write_files(
    dir: &Path,
    m: &PlanMount,
    owner: Option<(u32, u32)>,
    private: bool,
) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let chown = |p: &Path| -> anyhow::Result<()> {
        if let Some((u, g)) = owner {
            lchown(p, Some(u), Some(g)).with_context(|| format!("chown {}", p.display()))?;
        }
        Ok(())
    };
    match &m.files {
        None => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o777))?;
            chown(dir)?;
        }
        Some(files) => {
            for (rel, data, mode) in files {
                let path = dir.join(rel);
                let mut parent = path.parent();
                // Directories made for items' sub-paths.
                let mut made = Vec::new();
                while let Some(p) = parent
                    && p != dir
                    && !p.exists()
                {
                    made.push(p.to_path_buf());
                    parent = p.parent();
                }
                for d in made.iter().rev() {
                    fs::create_dir(d)?;
                    fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
                }
                let mode = if private && m.secret {
                    0o600
                } else {
                    *mode & 0o777
                };
                // Created with no access, then filled, then given its mode.
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("replacing {}", path.display()));
                    }
                    _ => {}
                }
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                std::io::Write::write_all(&mut f, data)?;
                drop(f);
                chown(&path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}

fn bind(src: &Path, dst: &Path, recursive: bool) -> anyhow::Result<()> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), dst, None::<&str>, flags, None::<&str>)
        .with_context(|| format!("bind {} on {}", src.display(), dst.display()))
}

fn tmpfs(dst: &Path, options: &str) -> anyhow::Result<()> {
    mount(
        Some("burrow"),
        dst,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .with_context(|| format!("tmpfs on {}", dst.display()))
}

fn read_only(dst: &Path) -> anyhow::Result<()> {
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .with_context(|| format!("read-only {}", dst.display()))
}

/// An entry of a directory being mirrored.
enum Entry {
    Dir(String, OwnedFd),
    File(String, OwnedFd),
    Link(String, PathBuf),
}

fn open_path(p: &Path) -> anyhow::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_encoded_bytes())?;
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("open {}", p.display()));
    }
    // SAFETY: fd was just opened and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The entries of `dir`, each held open (through the mounts on them).
fn entries(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = fs::symlink_metadata(&path)?.file_type();
        if ft.is_symlink() {
            out.push(Entry::Link(name, fs::read_link(&path)?));
        } else if ft.is_dir() {
            out.push(Entry::Dir(name, open_path(&path)?));
        } else {
            out.push(Entry::File(name, open_path(&path)?));
        }
    }
    Ok(out)
}

/// Recreates `entries` in `dir` (a fresh tmpfs): directories and files
/// bound from what was there, symlinks copied.
fn fill(dir: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    for e in entries {
        match e {
            Entry::Dir(name, fd) => {
                let p = dir.join(name);
                fs::create_dir(&p)?;
                bind(&fd_path(fd), &p, true)?;
            }
            Entry::File(name, fd) => {
                let p = dir.join(name);
                fs::File::create(&p)?;
                bind(&fd_path(fd), &p, false)?;
            }
            Entry::Link(name, target) => symlink(target, dir.join(name))?,
        }
    }
    Ok(())
}

/// Makes `path` (a directory, or a file when `file`) exist in this
/// namespace's view: the nearest existing directory above it is covered by
/// a tmpfs mirroring it, in which the rest is made.
fn ensure(path: &Path, file: bool) -> anyhow::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() != file => return Ok(()),
        Ok(_) => anyhow::bail!(
            "{} exists on this machine as a {}, but the volume needs a {} there",
            path.display(),
            if file { "directory" } else { "file" },
            if file { "file" } else { "directory" }
        ),
        Err(_) => {}
    }
    let mut missing = vec![path.to_path_buf()];
    let mut above = path.parent();
    while let Some(p) = above {
        if p.is_dir() {
            break;
        }
        if fs::symlink_metadata(p).is_ok() {
            anyhow::bail!("{} is in the way of {}", p.display(), path.display());
        }
        missing.push(p.to_path_buf());
        above = p.parent();
    }
    let anchor = above.context("no existing directory above the mount point")?;
    // The new root is a directory of this namespace's own tmpfs: made in
    // directly. Anywhere else, the machine's directory is mirrored first.
    if anchor != Path::new("/") {
        let held = entries(anchor)?;
        let meta = fs::metadata(anchor)?;
        let options = format!(
            "mode={:o},uid={},gid={}",
            meta.permissions().mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
        tmpfs(anchor, &options)?;
        fill(anchor, &held)?;
    }
    for (i, p) in missing.iter().rev().enumerate() {
        if i + 1 == missing.len() && file {
            fs::File::create(p)?;
        } else {
            fs::create_dir(p)?;
            fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// Builds the view (steps 1–4 of the module doc, up to the user).
fn build(plan: &Plan) -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare the mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    let staging = &plan.staging;
    tmpfs(staging, "mode=755")?;
    mount(
        None::<&str>,
        staging,
        None::<&str>,
        MsFlags::MS_UNBINDABLE,
        None::<&str>,
    )
    .context("staging unbindable")?;
    let root = staging.join("root");
    let store = staging.join("store");
    fs::create_dir(&root)?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
    fs::create_dir(&store)?;
    tmpfs(&store, "mode=700")?;
    // The machine's root, mirrored (the staging tmpfs, unbindable, is not
    // copied along with the mount it sits in).
    let top = entries(Path::new("/"))?;
    fill(&root, &top)?;
    drop(top);
    let store_fd = open_path(&store)?;
    nix::unistd::chdir(&root).context("chdir to the new root")?;
    nix::unistd::chroot(".").context("chroot")?;
    let store = fd_path(&store_fd);
    let mut mounts: Vec<&PlanMount> = plan.mounts.iter().collect();
    // Parents first, as container runtimes mount them.
    mounts.sort_by_key(|m| m.target.matches('/').count());
    let owner = plan.user.as_ref().map(|u| (u.uid, u.gid));
    for (i, m) in mounts.iter().enumerate() {
        let target = Path::new(&m.target);
        match &m.sub_path {
            None => {
                ensure(target, false)?;
                tmpfs(target, "mode=755")?;
                write_files(target, m, owner, false)?;
                if m.read_only {
                    read_only(target)?;
                }
            }
            Some(sub) => {
                let vol = store.join(format!("vol-{i}"));
                write_files(&vol, m, owner, false)?;
                let src = vol.join(sub);
                let is_file = fs::metadata(&src).map(|m| m.is_file()).unwrap_or(false);
                if !src.exists() {
                    // The kubelet makes a missing subPath as a directory.
                    fs::create_dir_all(&src)?;
                }
                ensure(target, is_file)?;
                bind(&src, target, false)?;
                if m.read_only {
                    read_only(target)?;
                }
            }
        }
    }
    if let Some(text) = &plan.resolv_conf {
        let p = store.join("resolv.conf");
        fs::write(&p, text)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        let etc = Path::new("/etc/resolv.conf");
        // Through a symlink (systemd-resolved's) to the file it names.
        let dst = fs::canonicalize(etc).unwrap_or_else(|_| etc.to_path_buf());
        ensure(&dst, true)?;
        bind(&p, &dst, false)?;
    }
    drop(store_fd);
    Ok(())
}

/// The command starts with the signals `run` passes on handled by default
/// and none blocked: an ignored SIGINT survives exec (a shell's `cmd &`
/// leaves SIGINT and SIGQUIT ignored), and `run` could not pass Ctrl-C on.
fn default_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGHUP,
    ] {
        // SAFETY: the default disposition; no handler runs.
        unsafe { signal(s, SigHandler::SigDfl) }.with_context(|| format!("resetting {s}"))?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).context("signal mask")?;
    Ok(())
}

fn become_user(u: &RunAs) -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    let groups: Vec<Gid> = u.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&groups).context("setgroups")?;
    setgid(Gid::from_raw(u.gid)).context("setgid")?;
    setuid(Uid::from_raw(u.uid)).context("setuid")?;
    Ok(())
}

/// `burrow sandbox-exec`: never returns on success (the command replaces
/// this process); an error is printed and exits 126/127 like a shell.
pub fn exec_from_fd() -> std::process::ExitCode {
    let mut plan_program = None;
    let result = (|| -> anyhow::Result<std::io::Error> {
        // SAFETY: fd 3 is the plan's pipe, given by `burrow run`.
        let mut pipe = unsafe { fs::File::from_raw_fd(PLAN_FD) };
        let mut text = Vec::new();
        pipe.read_to_end(&mut text).context("reading the plan")?;
        drop(pipe);
        let plan: Plan = serde_json::from_slice(&text).context("the plan")?;
        build(&plan)?;
        nix::unistd::chdir(&plan.cwd)
            .or_else(|_| nix::unistd::chdir("/"))
            .context("chdir")?;
        if let Some(u) = &plan.user {
            become_user(u)?;
        }
        default_signals()?;
        let (program, args) = plan.argv.split_first().context("no command")?;
        plan_program = Some(program.clone());
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).env_clear().envs(plan.env.iter().cloned());
        Ok(cmd.exec())
    })();
    match result {
        Ok(exec_err) => {
            let program = plan_program.unwrap_or_default();
            if exec_err.kind() == std::io::ErrorKind::NotFound {
                eprintln!("burrow: {program}: command not found (in the PATH it was given)");
            } else {
                eprintln!("burrow: cannot run {program}: {exec_err}");
            }
            let code = if exec_err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            std::process::ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("burrow: preparing the command's view failed: {e:#}");
            std::process::ExitCode::from(126)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_must_be_clean() {
        assert_eq!(clean_abs("/etc//app/").as_deref(), Some("/etc/app"));
        assert!(clean_abs("etc/app").is_none());
        assert!(clean_abs("/etc/../root").is_none());
        assert!(clean_abs("/").is_none());
    }

    #[test]
    fn files_get_their_modes_and_sub_paths() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = PlanMount {
            target: "/x".into(),
            sub_path: None,
            read_only: true,
            secret: true,
            files: Some(vec![
                ("a/b.txt".into(), b"hi".to_vec(), 0o440),
                ("c".into(), b"x".to_vec(), 0o644),
            ]),
        };
        write_files(dir.path(), &m, None, false).expect("write");
        let mode = |p: &str| {
            fs::metadata(dir.path().join(p))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("a/b.txt"), 0o440);
        assert_eq!(mode("c"), 0o644);
        assert_eq!(fs::read(dir.path().join("a/b.txt")).expect("read"), b"hi");
        let private = tempfile::tempdir().expect("tmp");
        write_files(private.path(), &m, None, true).expect("write");
        assert_eq!(
            fs::metadata(private.path().join("c"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
}
