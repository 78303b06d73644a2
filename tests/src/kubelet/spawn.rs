//! Starting a container's process: what the child does between fork and
//! exec (mounts, a container root of its own for mount points missing on
//! the machine, user, groups, no-new-privileges), prepared before the fork.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// A bind mount done in the child, in order.
pub(super) struct BindOp {
    pub(super) src: CString,
    pub(super) dst: CString,
    pub(super) recursive: bool,
    pub(super) readonly: bool,
}

/// A container root of its own, for containers with mount points that do
/// not exist on the machine: an overlay of the machine's `/` (and of any
/// other mount a mount point is created in) whose upper layers live on a
/// tmpfs mounted in the container's mount namespace only, the machine's
/// other mounts bound in, the missing mount points made in it, chroot. The
/// machine's filesystem never sees the mount points; the tmpfs goes with
/// the container's last process.
pub(super) struct NewRoot {
    /// The tmpfs (an empty directory in the container's work dir).
    pub(super) layer: CString,
    /// The new root (another empty directory there).
    pub(super) root: CString,
    /// Directories made on the tmpfs: the upper and work dirs.
    pub(super) layer_dirs: Vec<CString>,
    /// The new root's overlay, then the machine's other mounts, parents
    /// first.
    pub(super) mounts: Vec<RootMount>,
    /// Missing mount points in the new root, parents first: (path, is a
    /// directory).
    pub(super) stubs: Vec<(CString, bool)>,
}

/// One mount of a [`NewRoot`].
pub(super) enum RootMount {
    /// An overlay at `dst` (`lowerdir=<machine path>,upperdir=...`).
    Overlay { dst: CString, options: CString },
    /// A machine mount bound in recursively at `dst`.
    Bind { src: CString, dst: CString },
}

/// Everything the child does between fork and exec, prepared beforehand so
/// that the child only makes syscalls (no allocation after fork).
pub(super) struct ChildSetup {
    pub(super) netns: fs::File,
    /// The pod's IPC namespace.
    pub(super) ipc: Option<fs::File>,
    pub(super) hostname: CString,
    pub(super) new_root: Option<NewRoot>,
    pub(super) binds: Vec<BindOp>,
    pub(super) readonly_root: bool,
    /// The working directory, entered once the mounts are in place.
    pub(super) workdir: CString,
    pub(super) no_new_privs: bool,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    /// Supplementary groups (`fsGroup`, `supplementalGroups`).
    pub(super) groups: Vec<libc::gid_t>,
}

pub(super) fn cstr(p: &Path) -> anyhow::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("NUL in path {}", p.display()))
}

/// Writes a fixed message to stderr (the log file) and returns errno.
fn child_fail(msg: &'static [u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    // SAFETY: write(2) on fd 2 with a valid buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
    err
}

/// Mount flags that a bind remount must keep (locked flags otherwise make
/// it fail with EPERM).
unsafe fn kept_flags(path: *const libc::c_char) -> libc::c_ulong {
    // SAFETY: statvfs into a zeroed struct; path is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path, &mut st) != 0 {
            return 0;
        }
        let f = st.f_flag;
        let mut out = 0;
        for (st_flag, ms_flag) in [
            (libc::ST_NOSUID, libc::MS_NOSUID),
            (libc::ST_NODEV, libc::MS_NODEV),
            (libc::ST_NOEXEC, libc::MS_NOEXEC),
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ] {
            if f & st_flag != 0 {
                out |= ms_flag;
            }
        }
        out
    }
}

impl ChildSetup {
    /// Runs in the child between fork and exec.
    pub(super) fn apply(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls on pointers to C strings owned by `self`,
        // which outlives this call; nothing allocates.
        unsafe {
            if libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(child_fail(b"minicluster: setns(net) failed\n"));
            }
            if let Some(ipc) = &self.ipc
                && libc::setns(ipc.as_raw_fd(), libc::CLONE_NEWIPC) != 0
            {
                return Err(child_fail(b"minicluster: setns(ipc) failed\n"));
            }
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) != 0 {
                return Err(child_fail(b"minicluster: unshare(mount, uts) failed\n"));
            }
            let root = c"/".as_ptr();
            if libc::mount(
                std::ptr::null(),
                root,
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(child_fail(b"minicluster: making / private failed\n"));
            }
            let h = self.hostname.as_bytes();
            if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
                return Err(child_fail(b"minicluster: sethostname failed\n"));
            }
            if let Some(nr) = &self.new_root {
                nr.build()?;
            }
            for b in &self.binds {
                let flags = libc::MS_BIND | if b.recursive { libc::MS_REC } else { 0 };
                if libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(child_fail(b"minicluster: a bind mount failed\n"));
                }
                if b.readonly {
                    let flags = libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | kept_flags(b.dst.as_ptr());
                    if libc::mount(
                        std::ptr::null(),
                        b.dst.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(child_fail(b"minicluster: a read-only remount failed\n"));
                    }
                }
            }
            if let Some(nr) = &self.new_root {
                if libc::chroot(nr.root.as_ptr()) != 0 {
                    return Err(child_fail(b"minicluster: chroot failed\n"));
                }
                if libc::chdir(root) != 0 {
                    return Err(child_fail(b"minicluster: chdir / failed\n"));
                }
            }
            if self.readonly_root {
                let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(root);
                if libc::mount(
                    std::ptr::null(),
                    root,
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(child_fail(b"minicluster: read-only remount of / failed\n"));
                }
            }
            if libc::chdir(self.workdir.as_ptr()) != 0 {
                return Err(child_fail(
                    b"minicluster: entering the working dir failed\n",
                ));
            }
            libc::setsid();
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(child_fail(b"minicluster: PR_SET_NO_NEW_PRIVS failed\n"));
            }
            if self.uid.is_some() || self.gid.is_some() || !self.groups.is_empty() {
                if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                    return Err(child_fail(b"minicluster: setgroups failed\n"));
                }
                if let Some(g) = self.gid
                    && libc::setgid(g) != 0
                {
                    return Err(child_fail(b"minicluster: setgid failed\n"));
                }
                if let Some(u) = self.uid
                    && libc::setuid(u) != 0
                {
                    return Err(child_fail(b"minicluster: setuid failed\n"));
                }
            }
        }
        Ok(())
    }
}

impl NewRoot {
    /// Runs in the child: tmpfs, overlays, binds, mount points.
    fn build(&self) -> std::io::Result<()> {
        // SAFETY: as for `ChildSetup::apply`.
        unsafe {
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.layer.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755".as_ptr().cast(),
            ) != 0
            {
                return Err(child_fail(
                    b"minicluster: mounting the root's tmpfs failed\n",
                ));
            }
            for d in &self.layer_dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 {
                    return Err(child_fail(
                        b"minicluster: mkdir on the root's tmpfs failed\n",
                    ));
                }
            }
            for m in &self.mounts {
                match m {
                    RootMount::Overlay { dst, options } => {
                        if libc::mount(
                            c"overlay".as_ptr(),
                            dst.as_ptr(),
                            c"overlay".as_ptr(),
                            0,
                            options.as_ptr().cast(),
                        ) != 0
                        {
                            return Err(child_fail(b"minicluster: mounting an overlay failed\n"));
                        }
                    }
                    RootMount::Bind { src, dst } => {
                        // A mount that cannot be bound (one the machine's
                        // runtime locked, say) is left out.
                        libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        );
                    }
                }
            }
            for (path, dir) in &self.stubs {
                if *dir {
                    if libc::mkdir(path.as_ptr(), 0o755) != 0
                        && *libc::__errno_location() != libc::EEXIST
                    {
                        return Err(child_fail(b"minicluster: creating a mount point failed\n"));
                    }
                } else {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        return Err(child_fail(b"minicluster: creating a mount point failed\n"));
                    }
                    libc::close(fd);
                }
            }
        }
        Ok(())
    }
}

/// Looks a program up on the machine's PATH (plus the sbin directories).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.exists().then_some(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain([
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Where a path inside the container is before `/run` is replaced: paths
/// under `/run` (or `/var/run`) live in the container's own run dir.
pub(super) fn host_target(run_dir: &Path, container_path: &str) -> PathBuf {
    let p = container_path
        .strip_prefix("/var")
        .filter(|r| r.starts_with("/run"))
        .unwrap_or(container_path);
    match p.strip_prefix("/run") {
        Some("") => run_dir.to_path_buf(),
        Some(rest) if rest.starts_with('/') => run_dir.join(rest.trim_start_matches('/')),
        _ => PathBuf::from(p),
    }
}

/// `path` as the container resolves it through the machine's symlinks (its
/// root mirrors the machine's): the deepest existing ancestor made
/// canonical, the missing rest appended.
pub(super) fn resolve_container_path(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut out) = fs::canonicalize(&existing) {
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n.to_os_string());
                existing = p.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Mount points of `/proc/self/mountinfo` (octal escapes undone), without
/// `/`, sorted.
fn machine_mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p != Path::new("/"))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// How a container root of its own is put together, in machine paths.
#[derive(Debug, PartialEq, Eq)]
struct RootPlan {
    /// The machine's mounts to bring into the new root, parents first:
    /// (mount point, overlaid). Overlaid: a mount point is made inside it;
    /// else it is bound in with everything mounted below it.
    mounts: Vec<(PathBuf, bool)>,
    /// Missing mount points to make, parents first: (path, is a
    /// directory).
    stubs: Vec<(PathBuf, bool)>,
}

/// Plans the root for mount points `missing` ((path, is a directory);
/// canonical paths) given the machine's `mount_points` (without `/`) and
/// which paths exist.
fn root_plan(
    mount_points: &[PathBuf],
    missing: &[(PathBuf, bool)],
    exists: &dyn Fn(&Path) -> bool,
) -> RootPlan {
    // The deepest mount point at or above `p`, if any but `/`.
    let owner = |p: &Path| -> Option<PathBuf> {
        mount_points
            .iter()
            .filter(|m| p.starts_with(m))
            .max_by_key(|m| m.components().count())
            .cloned()
    };
    let mut stubs: Vec<(PathBuf, bool)> = Vec::new();
    let mut overlaid: BTreeSet<PathBuf> = BTreeSet::new();
    for (path, is_dir) in missing {
        let parts: Vec<_> = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        let mut cur = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            cur.push(part);
            if exists(&cur) {
                continue;
            }
            let stub = (cur.clone(), i + 1 < parts.len() || *is_dir);
            if !stubs.iter().any(|(p, _)| *p == stub.0) {
                stubs.push(stub);
            }
            if let Some(m) = cur.parent().and_then(owner) {
                overlaid.insert(m);
            }
        }
    }
    // An overlaid mount's parents are overlaid too (a bind would bring the
    // machine's copy of it along).
    for m in overlaid.clone() {
        for p in mount_points {
            if m.starts_with(p) {
                overlaid.insert(p.clone());
            }
        }
    }
    let mut sorted: Vec<&PathBuf> = mount_points.iter().collect();
    sorted.sort_by_key(|m| (m.components().count(), (*m).clone()));
    let mut mounts = Vec::new();
    for m in sorted {
        let parent = m.parent().and_then(owner);
        if parent.is_none_or(|p| overlaid.contains(&p)) {
            mounts.push((m.clone(), overlaid.contains(m)));
        }
    }
    RootPlan { mounts, stubs }
}

/// Prepares a [`NewRoot`] in `work_dir` (`rootfs/`, `layer/`) for the
/// missing mount points; returns the root's path too.
pub(super) fn new_root(
    work_dir: &Path,
    missing: &[(PathBuf, bool)],
) -> anyhow::Result<(PathBuf, NewRoot)> {
    let root = work_dir.join("rootfs");
    let layer = work_dir.join("layer");
    for d in [&root, &layer] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let plan = root_plan(&machine_mount_points(), missing, &|p| p.exists());
    let in_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut layer_dirs = Vec::new();
    let mut overlay = |lower: &Path, n: usize| -> anyhow::Result<CString> {
        let lower_s = lower.to_string_lossy();
        if lower_s.contains([',', ':', '\\']) {
            anyhow::bail!(
                "cannot make a mount point inside {}: its path has ',', ':' or '\\'",
                lower.display()
            );
        }
        let (u, w) = (layer.join(format!("u{n}")), layer.join(format!("w{n}")));
        layer_dirs.push(cstr(&u)?);
        layer_dirs.push(cstr(&w)?);
        Ok(CString::new(format!(
            "lowerdir={lower_s},upperdir={},workdir={}",
            u.display(),
            w.display()
        ))?)
    };
    let mut mounts = vec![RootMount::Overlay {
        dst: cstr(&root)?,
        options: overlay(Path::new("/"), 0)?,
    }];
    for (i, (m, overlaid)) in plan.mounts.iter().enumerate() {
        mounts.push(if *overlaid {
            RootMount::Overlay {
                dst: cstr(&in_root(m))?,
                options: overlay(m, i + 1)?,
            }
        } else {
            RootMount::Bind {
                src: cstr(m)?,
                dst: cstr(&in_root(m))?,
            }
        });
    }
    let stubs = plan
        .stubs
        .iter()
        .map(|(p, dir)| Ok((cstr(&in_root(p))?, *dir)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nr = NewRoot {
        layer: cstr(&layer)?,
        root: cstr(&root)?,
        layer_dirs,
        mounts,
        stubs,
    };
    Ok((root, nr))
}

/// The container process's supplementary groups: the pod's `fsGroup` and
/// `supplementalGroups`, as the runtime adds them.
pub(super) fn supplementary_groups(pod: &Value) -> Vec<libc::gid_t> {
    let sc = &pod["spec"]["securityContext"];
    let mut out: Vec<libc::gid_t> = Vec::new();
    let fs_group = sc["fsGroup"].as_u64();
    let extra = sc["supplementalGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64);
    for g in fs_group.into_iter().chain(extra) {
        if let Ok(g) = libc::gid_t::try_from(g)
            && !out.contains(&g)
        {
            out.push(g);
        }
    }
    out
}

pub(super) fn security_context(pod: &Value, c: &Value) -> (Option<u32>, Option<u32>, bool, bool) {
    let pick = |field: &str| {
        c["securityContext"][field]
            .as_u64()
            .or_else(|| pod["spec"]["securityContext"][field].as_u64())
            .map(|v| v as u32)
    };
    let uid = pick("runAsUser");
    let gid = pick("runAsGroup").or(uid);
    let no_new_privs = c["securityContext"]["allowPrivilegeEscalation"].as_bool() == Some(false);
    let ro = c["securityContext"]["readOnlyRootFilesystem"].as_bool() == Some(true);
    (uid, gid, no_new_privs, ro)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::super::volumes::{set_volume_ownership, write_files};

    #[test]
    fn fs_group_and_supplemental_groups() {
        let pod = json!({"spec": {"securityContext": {"fsGroup": 2000, "supplementalGroups": [3000, 2000]}}});
        assert_eq!(supplementary_groups(&pod), vec![2000, 3000]);
        assert!(supplementary_groups(&json!({"spec": {}})).is_empty());
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("vol");
        write_files(
            &vol,
            &[
                ("key".into(), b"k".to_vec(), 0o400),
                ("sub/other".into(), b"o".to_vec(), 0o640),
            ],
        )
        .expect("files");
        std::os::unix::fs::symlink("key", vol.join("link")).expect("symlink");
        set_volume_ownership(&vol, 2000, true).expect("ownership");
        use std::os::unix::fs::MetadataExt;
        let m = |p: &str| fs::symlink_metadata(vol.join(p)).expect("meta");
        assert_eq!((m("key").gid(), m("key").mode() & 0o7777), (2000, 0o440));
        assert_eq!(
            (m("sub/other").gid(), m("sub/other").mode() & 0o7777),
            (2000, 0o640)
        );
        assert_eq!(m("sub").mode() & 0o7777, 0o2755);
        assert_eq!(m("link").gid(), 2000);
        assert_eq!(m("key").uid(), 0);
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o777)).expect("chmod");
        set_volume_ownership(&empty, 2000, false).expect("ownership");
        assert_eq!(fs::metadata(&empty).expect("meta").mode() & 0o7777, 0o2777);
    }

    #[test]
    fn root_plans_make_mount_points_away_from_the_machine() {
        let mounts: Vec<PathBuf> = ["/proc", "/sys", "/sys/fs/cgroup", "/tmp", "/run/netns"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let existing = [
            "/etc",
            "/tmp",
            "/opt",
            "/proc",
            "/sys",
            "/sys/fs/cgroup",
            "/run",
            "/run/netns",
        ];
        let exists = |p: &Path| existing.iter().any(|e| Path::new(e) == p);
        let plan = root_plan(
            &mounts,
            &[
                (PathBuf::from("/etc/burrow"), true),
                (PathBuf::from("/opt/a/b/c.conf"), false),
                (PathBuf::from("/data"), true),
            ],
            &exists,
        );
        assert_eq!(
            plan.stubs,
            vec![
                (PathBuf::from("/etc/burrow"), true),
                (PathBuf::from("/opt/a"), true),
                (PathBuf::from("/opt/a/b"), true),
                (PathBuf::from("/opt/a/b/c.conf"), false),
                (PathBuf::from("/data"), true),
            ]
        );
        // Everything mounted is bound in whole; nothing is overlaid but `/`.
        assert_eq!(
            plan.mounts,
            vec![
                (PathBuf::from("/proc"), false),
                (PathBuf::from("/sys"), false),
                (PathBuf::from("/tmp"), false),
                (PathBuf::from("/run/netns"), false),
            ]
        );
        // A mount point inside another mount: that mount is overlaid (its
        // children bound in), so the machine's /tmp is never written.
        let plan = root_plan(&mounts, &[(PathBuf::from("/tmp/x/y"), true)], &exists);
        assert_eq!(
            plan.stubs,
            vec![
                (PathBuf::from("/tmp/x"), true),
                (PathBuf::from("/tmp/x/y"), true)
            ]
        );
        assert!(plan.mounts.contains(&(PathBuf::from("/tmp"), true)));
        let plan = root_plan(
            &mounts,
            &[(PathBuf::from("/sys/fs/cgroup/z"), true)],
            &exists,
        );
        assert!(plan.mounts.contains(&(PathBuf::from("/sys"), true)));
        assert!(
            plan.mounts
                .contains(&(PathBuf::from("/sys/fs/cgroup"), true))
        );
        assert_eq!(
            unescape_mount_path("/mnt/with\\040space\\011tab"),
            PathBuf::from("/mnt/with space\ttab")
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = fs::canonicalize(tmp.path()).expect("canonical");
        std::os::unix::fs::symlink(&real, real.join("link")).expect("symlink");
        assert_eq!(
            resolve_container_path(&real.join("link/missing/deeper")),
            real.join("missing/deeper")
        );
    }
}
