//! One pod's run: its containers started, restarted with back-off, probed
//! and stopped, and its status written as the processes change.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ApiError, Store};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::ctx::{ClusterCtx, NODE_UNDERLAY_IP};
use crate::images::{self, ImageInput, ImagePaths};
use crate::net;

use super::env::{EnvSources, container_hostname, expand, pod_hostname, resolve_env};
use super::logs::copy_logs;
use super::probes::{Probe, probe_of, tcp_ports};
use super::spawn::{
    BindOp, ChildSetup, cstr, find_program, host_target, new_root, resolve_container_path,
    security_context, supplementary_groups,
};
use super::sysctls::{admit_sysctls, pod_namespaces};
use super::volumes::{safe_rel, set_tree_perms, set_volume_ownership, volume_files, write_atomic};
use super::{PODS, now, pod_dir, pod_netns_name};

#[derive(Debug, Clone)]
enum CState {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        started_at: String,
        finished_at: String,
    },
}

struct Ctr {
    spec: Value,
    name: String,
    image: String,
    state: CState,
    pid: Option<u32>,
    /// Bumped per start so late exit events of an old process are ignored.
    generation: u64,
    ready: bool,
    failures: u32,
    restart_count: u32,
    last_state: Option<Value>,
    next_start: Option<Instant>,
    backoff: Duration,
    started: Instant,
    next_probe: Instant,
    ever_started: bool,
    program: String,
    /// Instances started so far: the next one logs to `logs/<name>/<starts>.log`.
    starts: u32,
}

struct Exit {
    idx: usize,
    generation: u64,
    code: i32,
}

struct PodRun {
    store: Arc<Store>,
    ctx: ClusterCtx,
    pod: Value,
    uid: String,
    ns: String,
    name: String,
    ip: Ipv4Addr,
    netns: String,
    dir: PathBuf,
    ctrs: Vec<Ctr>,
    exit_tx: mpsc::UnboundedSender<Exit>,
    conditions: BTreeMap<&'static str, (bool, String)>,
    start_time: String,
    last_written: Value,
    /// Volume name → directory with its contents (or host path).
    volumes: BTreeMap<String, PathBuf>,
    volumes_ready: bool,
    volume_error: Option<String>,
    finished_phase: Option<&'static str>,
    /// The pod's IPC namespace (its sysctls applied).
    ipc: Option<fs::File>,
}

pub(super) fn pod_rt() -> &'static minicluster_apiserver::ResourceType {
    must(PODS)
}

impl PodRun {
    fn lookup(&self) -> impl Fn(&str, &str) -> Option<Value> + '_ {
        move |kind: &str, name: &str| {
            let key = format!("core/v1/{kind}");
            self.store.get(must(&key), &self.ns, name).ok()
        }
    }

    /// The Node's `status.allocatable` (what an unset limit means to the
    /// downward API).
    fn node_allocatable(&self) -> Value {
        self.store
            .get(must("core/v1/nodes"), "", crate::ctx::NODE_NAME)
            .map(|n| n["status"]["allocatable"].clone())
            .unwrap_or_else(|_| json!({}))
    }

    /// The Services service links are made of: the pod's namespace's and
    /// `default/kubernetes`.
    fn link_services(&self) -> Vec<Value> {
        let rt = must("core/v1/services");
        let mut services = self.store.list(rt, Some(&self.ns)).0;
        if self.ns != "default"
            && let Ok(k) = self.store.get(rt, "default", "kubernetes")
        {
            services.push(k);
        }
        services
    }

    fn restart_policy(&self) -> &str {
        self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
    }

    fn prepare_volumes(&mut self) -> Result<(), String> {
        let services: Vec<Value> = Vec::new();
        let alloc = self.node_allocatable();
        let lookup = self.lookup();
        let (pod_ips, host_ips) = ([self.ip], [NODE_UNDERLAY_IP]);
        let src = EnvSources {
            pod: &self.pod,
            pod_ips: &pod_ips,
            host_ips: &host_ips,
            services: &services,
            node_allocatable: &alloc,
            lookup: &lookup,
        };
        let sa = self.pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let token = || (self.ctx.issue_token)(&self.ns, &sa);
        let fs_group = self.pod["spec"]["securityContext"]["fsGroup"]
            .as_u64()
            .and_then(|g| u32::try_from(g).ok());
        let mut vols = BTreeMap::new();
        for vol in self.pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let name = vol["name"].as_str().unwrap_or("").to_string();
            let dir = self.dir.join("volumes").join(&name);
            match volume_files(vol, &src, &token, &self.ctx.ca_pem, fs_group)? {
                Some(files) => {
                    if dir.exists() {
                        let _ = fs::remove_dir_all(&dir);
                    }
                    write_atomic(&dir, &files).map_err(|e| format!("{e:#}"))?;
                    if let Some(g) = fs_group {
                        set_volume_ownership(&dir, g, true)
                            .map_err(|e| format!("applying fsGroup {g}: {e}"))?;
                    }
                    vols.insert(name, dir);
                }
                None => {
                    if let Some(p) = vol["hostPath"]["path"].as_str() {
                        vols.insert(name, PathBuf::from(p));
                    } else {
                        // emptyDir and anything else: an empty directory,
                        // world-writable as the kubelet makes it.
                        fs::create_dir_all(&dir)
                            .and_then(|()| {
                                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                            })
                            .map_err(|e| e.to_string())?;
                        if let Some(g) = fs_group {
                            set_volume_ownership(&dir, g, false)
                                .map_err(|e| format!("applying fsGroup {g}: {e}"))?;
                        }
                        vols.insert(name, dir);
                    }
                }
            }
        }
        drop(lookup);
        self.volumes = vols;
        Ok(())
    }

    /// Prepares files and mounts and spawns container `idx`.
    async fn start(&mut self, idx: usize) -> Result<(), (String, String)> {
        let c = self.ctrs[idx].spec.clone();
        let cname = self.ctrs[idx].name.clone();
        let config_err = |m: String| ("CreateContainerConfigError".to_string(), m);
        let services = self.link_services();
        let alloc = self.node_allocatable();
        let env = {
            let lookup = self.lookup();
            let (pod_ips, host_ips) = ([self.ip], [NODE_UNDERLAY_IP]);
            let src = EnvSources {
                pod: &self.pod,
                pod_ips: &pod_ips,
                host_ips: &host_ips,
                services: &services,
                node_allocatable: &alloc,
                lookup: &lookup,
            };
            resolve_env(&c, &src).map_err(config_err)?
        };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(|s| expand(s, &env)))
                .collect()
        };
        let work_dir = self.dir.join("containers").join(&cname);
        let run_dir = work_dir.join("run");
        let launch = images::map_image(
            &ImageInput {
                image: &self.ctrs[idx].image,
                command: strings(&c["command"]),
                args: strings(&c["args"]),
                tcp_ports: tcp_ports(&c),
                env: &env,
            },
            &ImagePaths {
                state_dir: self.ctx.state_dir.clone(),
                bin_dir: self.ctx.bin_dir.clone(),
                work_dir: work_dir.clone(),
            },
        )
        .map_err(|e| ("ErrImagePull".to_string(), e.to_string()))?;
        self.ctrs[idx].program = launch.program.clone();
        let program = find_program(&launch.program).ok_or_else(|| {
            (
                "RunContainerError".to_string(),
                format!(
                    "executable {:?} not found (image {})",
                    launch.program, self.ctrs[idx].image
                ),
            )
        })?;
        if launch.needs_www {
            let sd = self.ctx.state_dir.clone();
            tokio::task::spawn_blocking(move || images::ensure_www(&sd))
                .await
                .map_err(|e| config_err(e.to_string()))?
                .map_err(|e| config_err(format!("{e:#}")))?;
        }
        let setup = self
            .child_setup(&c, &work_dir, &run_dir, &launch.files)
            .map_err(|e| config_err(format!("{e:#}")))?;
        let raw_log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{cname}.log")))
            .map_err(|e| config_err(format!("opening the log: {e}")))?;
        let instance = self.ctrs[idx].starts;
        let cri_dir = self.dir.join("logs").join(&cname);
        let cri_log = fs::create_dir_all(&cri_dir)
            .and_then(|()| fs::File::create(cri_dir.join(format!("{instance}.log"))))
            .map_err(|e| config_err(format!("opening the log: {e}")))?;
        // Like the kubelet's container GC: the previous instance's log stays
        // (`--previous`), older ones go.
        if let Some(old) = instance.checked_sub(2) {
            let _ = fs::remove_file(cri_dir.join(format!("{old}.log")));
            let _ = fs::remove_file(cri_dir.join(format!("{old}.done")));
        }
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&launch.args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env(
                "HOME",
                if setup.uid.unwrap_or(0) == 0 {
                    "/root"
                } else {
                    "/"
                },
            );
        for (k, v) in &launch.default_env {
            if !env.contains_key(k) {
                cmd.env(k, v);
            }
        }
        // The working dir is entered in the container's own mounts (`apply`).
        cmd.envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: `apply` only makes syscalls on data prepared beforehand.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let mut child = cmd.spawn().map_err(|e| {
            (
                "RunContainerError".to_string(),
                format!("starting {}: {e} (see {cname}.log)", program.display()),
            )
        })?;
        if let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) {
            let done = cri_dir.join(format!("{instance}.done"));
            tokio::spawn(copy_logs(out, err, raw_log, cri_log, done));
        }
        let ctr = &mut self.ctrs[idx];
        ctr.starts += 1;
        ctr.generation += 1;
        ctr.pid = child.id();
        ctr.state = CState::Running { started_at: now() };
        ctr.ready = false;
        ctr.failures = 0;
        ctr.started = Instant::now();
        ctr.next_probe = Instant::now();
        ctr.ever_started = true;
        let (tx, generation) = (self.exit_tx.clone(), ctr.generation);
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    st.code().or(st.signal().map(|s| 128 + s)).unwrap_or(-1)
                }
                Err(_) => -1,
            };
            let _ = tx.send(Exit {
                idx,
                generation,
                code,
            });
        });
        Ok(())
    }

    /// Builds the run dir and the mounts of a container.
    fn child_setup(
        &self,
        c: &Value,
        work_dir: &Path,
        run_dir: &Path,
        files: &[(PathBuf, String)],
    ) -> anyhow::Result<ChildSetup> {
        if run_dir.exists() {
            fs::remove_dir_all(run_dir)?;
        }
        fs::create_dir_all(run_dir)?;
        fs::set_permissions(work_dir, fs::Permissions::from_mode(0o755))?;
        fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
        for (path, text) in files {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        // Binds whose target is on the machine's filesystem (not in the run
        // dir): (src, target as the container sees it, readonly).
        let mut outside: Vec<(PathBuf, PathBuf, bool)> = Vec::new();
        let mut inside: Vec<BindOp> = Vec::new();
        // Mount points missing on the machine: (path, is a directory).
        let mut missing: Vec<(PathBuf, bool)> = Vec::new();
        // /etc/resolv.conf and /etc/hosts.
        let resolv = net::etc_netns_dir(&self.netns).join("resolv.conf");
        let hosts = self.dir.join("hosts");
        // As the kubelet's managed hosts file: the pod's hostname, with its
        // FQDN first when it has a subdomain.
        let h = pod_hostname(&self.pod);
        let mut host_names = vec![h.clone()];
        if let Some(sub) = self.pod["spec"]["subdomain"]
            .as_str()
            .filter(|s| !s.is_empty())
        {
            host_names.insert(0, format!("{h}.{sub}.{}.svc.cluster.local", self.ns));
        }
        fs::write(
            &hosts,
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                self.ip,
                host_names.join(" ")
            ),
        )?;
        for (src, target) in [(resolv, "/etc/resolv.conf"), (hosts, "/etc/hosts")] {
            let real = fs::canonicalize(target).unwrap_or_else(|_| PathBuf::from(target));
            let dst = host_target(run_dir, &real.to_string_lossy());
            if dst.starts_with(run_dir) {
                if let Some(parent) = dst.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::write(&dst, "")?;
                inside.push(BindOp {
                    src: cstr(&src)?,
                    dst: cstr(&dst)?,
                    recursive: false,
                    readonly: false,
                });
            } else if dst.exists() {
                outside.push((src, dst, false));
            }
        }
        // The cluster's state dir stays visible at the same path (nginx
        // configs, the web root) once /run is replaced.
        let state = &self.ctx.state_dir;
        let state_target = host_target(run_dir, &state.to_string_lossy());
        if state_target.starts_with(run_dir) {
            fs::create_dir_all(&state_target)?;
            inside.push(BindOp {
                src: cstr(state)?,
                dst: cstr(&state_target)?,
                recursive: false,
                readonly: false,
            });
        }
        // The service account.
        let automount = c["automountServiceAccountToken"]
            .as_bool()
            .or_else(|| self.pod["spec"]["automountServiceAccountToken"].as_bool())
            != Some(false);
        if automount {
            let sa = self.pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default");
            write_atomic(
                &run_dir.join("secrets/kubernetes.io/serviceaccount"),
                &[
                    (
                        "token".into(),
                        (self.ctx.issue_token)(&self.ns, sa).into_bytes(),
                        0o644,
                    ),
                    ("ca.crt".into(), self.ctx.ca_pem.clone().into_bytes(), 0o644),
                    ("namespace".into(), self.ns.clone().into_bytes(), 0o644),
                ],
            )?;
            set_tree_perms(&run_dir.join("secrets"))?;
        }
        // Volume mounts: those in the run dir get their mount points there
        // (the state dir); the others are never created on the machine.
        let mut volume_binds = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or("");
            let mount_path = m["mountPath"].as_str().unwrap_or("");
            if !mount_path.starts_with('/') {
                anyhow::bail!("volumeMount {vname}: mountPath {mount_path:?} must be absolute");
            }
            let Some(src) = self.volumes.get(vname) else {
                anyhow::bail!("volumeMount {vname}: no volume named {vname:?}");
            };
            let src = match m["subPath"].as_str().filter(|s| !s.is_empty()) {
                Some(sp) => src.join(safe_rel(sp).with_context(|| format!("bad subPath {sp:?}"))?),
                None => src.clone(),
            };
            let under_run = host_target(run_dir, mount_path).starts_with(run_dir);
            let real = if under_run {
                PathBuf::from(mount_path)
            } else {
                resolve_container_path(Path::new(mount_path))
            };
            let dst = host_target(run_dir, &real.to_string_lossy());
            let readonly = m["readOnly"].as_bool() == Some(true);
            if dst.starts_with(run_dir) {
                if !dst.exists() {
                    if src.is_file() {
                        if let Some(parent) = dst.parent() {
                            fs::create_dir_all(parent)?;
                        }
                        fs::write(&dst, "")?;
                    } else {
                        fs::create_dir_all(&dst)
                            .with_context(|| format!("creating mount point {}", dst.display()))?;
                    }
                }
                volume_binds.push((false, src, dst, readonly));
            } else {
                if !dst.exists() {
                    missing.push((dst.clone(), !src.is_file()));
                }
                volume_binds.push((true, src, dst, readonly));
            }
        }
        // Shallower mount points first, so nested mounts land on top.
        volume_binds.sort_by_key(|(out, _, dst, _)| (*out, dst.as_os_str().len()));
        for (out, src, dst, readonly) in volume_binds {
            if out {
                outside.push((src, dst, readonly));
            } else {
                inside.push(BindOp {
                    src: cstr(&src)?,
                    dst: cstr(&dst)?,
                    recursive: false,
                    readonly,
                });
            }
        }
        // A root of its own when a mount point is missing on the machine.
        let new_root = if missing.is_empty() {
            None
        } else {
            Some(new_root(work_dir, &missing)?)
        };
        let in_root = |p: &Path| -> PathBuf {
            match &new_root {
                Some((root, _)) => root.join(p.strip_prefix("/").unwrap_or(p)),
                None => p.to_path_buf(),
            }
        };
        let mut binds = inside;
        for (src, dst, readonly) in outside {
            binds.push(BindOp {
                src: cstr(&src)?,
                dst: cstr(&in_root(&dst))?,
                recursive: false,
                readonly,
            });
        }
        binds.push(BindOp {
            src: cstr(run_dir)?,
            dst: cstr(&in_root(Path::new("/run")))?,
            recursive: true,
            readonly: false,
        });
        let (uid, gid, no_new_privs, readonly_root) = security_context(&self.pod, c);
        let netns =
            fs::File::open(net::netns_path(&self.netns)).context("opening the pod's netns")?;
        let ipc = match &self.ipc {
            Some(f) => Some(f.try_clone().context("the pod's IPC namespace")?),
            None => None,
        };
        Ok(ChildSetup {
            netns,
            ipc,
            hostname: CString::new(container_hostname(&self.pod)).context("pod hostname")?,
            new_root: new_root.map(|(_, nr)| nr),
            binds,
            readonly_root,
            workdir: CString::new(c["workingDir"].as_str().unwrap_or("/")).context("workingDir")?,
            no_new_privs,
            uid,
            gid,
            groups: supplementary_groups(&self.pod),
        })
    }

    async fn probe(&self, idx: usize) -> bool {
        let c = &self.ctrs[idx];
        let node = self.ctx.node_netns();
        let t = Duration::from_secs(1);
        match probe_of(&c.spec) {
            Probe::Alive => true,
            Probe::Tcp(port) => net::dial_in(&node, SocketAddr::from((self.ip, port)), t)
                .await
                .is_ok(),
            Probe::Http { port, path } => {
                let ip = self.ip;
                let fut = async move {
                    let mut s = net::dial_in(&node, SocketAddr::from((ip, port)), t)
                        .await
                        .ok()?;
                    let req = format!(
                        "GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.30\r\n\r\n"
                    );
                    s.write_all(req.as_bytes()).await.ok()?;
                    let mut buf = [0u8; 64];
                    let mut n = 0;
                    while n < 12 {
                        let r = s.read(&mut buf[n..]).await.ok()?;
                        if r == 0 {
                            break;
                        }
                        n += r;
                    }
                    let line = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
                    Some((200..400).contains(&code))
                };
                matches!(tokio::time::timeout(t, fut).await, Ok(Some(true)))
            }
            Probe::Exec(cmd) => self.exec_probe(idx, &cmd).await,
        }
    }

    async fn exec_probe(&self, idx: usize, cmd: &[String]) -> bool {
        let Some((prog, args)) = cmd.split_first() else {
            return false;
        };
        let Some(program) = find_program(prog) else {
            return false;
        };
        let c = &self.ctrs[idx];
        let work_dir = self.dir.join("containers").join(&c.name).join("probe");
        let run_dir = work_dir.join("run");
        if fs::create_dir_all(&work_dir).is_err() {
            return false;
        }
        let Ok(setup) = self.child_setup(&c.spec, &work_dir, &run_dir, &[]) else {
            return false;
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: as for containers.
        unsafe {
            command.pre_exec(move || setup.apply());
        }
        let Ok(mut child) = command.spawn() else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), child.wait()).await,
            Ok(Ok(st)) if st.success()
        )
    }

    fn status(&mut self) -> Value {
        let all_ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready);
        let initialized = self.volumes_ready;
        let now = now();
        for (cond, val) in [
            ("PodScheduled", true),
            ("Initialized", initialized),
            ("ContainersReady", all_ready),
            ("Ready", all_ready),
        ] {
            let e = self.conditions.entry(cond).or_insert((val, now.clone()));
            if e.0 != val {
                *e = (val, now.clone());
            }
        }
        let phase = match self.finished_phase {
            Some(p) => p,
            None if self.ctrs.iter().all(|c| c.ever_started) => "Running",
            None => "Pending",
        };
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let state = match &c.state {
                    CState::Waiting { reason, message } => {
                        let mut w = json!({"reason": reason});
                        if !message.is_empty() {
                            w["message"] = json!(message);
                        }
                        json!({ "waiting": w })
                    }
                    CState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
                    CState::Terminated {
                        exit_code,
                        reason,
                        started_at,
                        finished_at,
                    } => json!({"terminated": {
                        "exitCode": exit_code, "reason": reason,
                        "startedAt": started_at, "finishedAt": finished_at,
                        "containerID": format!("mc://{}", c.pid.unwrap_or(0)),
                    }}),
                };
                let mut s = json!({
                    "name": c.name,
                    "image": c.image,
                    "imageID": format!("mc-image://{}", if c.program.is_empty() { c.image.as_str() } else { c.program.as_str() }),
                    "ready": c.ready,
                    "started": matches!(c.state, CState::Running { .. }),
                    "restartCount": c.restart_count,
                    "state": state,
                    "lastState": c.last_state.clone().unwrap_or_else(|| json!({})),
                });
                if let (Some(pid), true) = (c.pid, c.ever_started) {
                    s["containerID"] = json!(format!("mc://{pid}"));
                }
                s
            })
            .collect();
        let conditions: Vec<Value> = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .iter()
            .map(|k| {
                let (v, t) = &self.conditions[k];
                let mut c = json!({
                    "type": k,
                    "status": if *v { "True" } else { "False" },
                    "lastProbeTime": null,
                    "lastTransitionTime": t,
                });
                if !*v && (*k == "Ready" || *k == "ContainersReady") {
                    let not_ready: Vec<&str> = self
                        .ctrs
                        .iter()
                        .filter(|c| !c.ready)
                        .map(|c| c.name.as_str())
                        .collect();
                    c["reason"] = json!("ContainersNotReady");
                    c["message"] = json!(format!(
                        "containers with unready status: [{}]",
                        not_ready.join(" ")
                    ));
                }
                c
            })
            .collect();
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": NODE_UNDERLAY_IP.to_string(),
            "hostIPs": [{"ip": NODE_UNDERLAY_IP.to_string()}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "qosClass": minicluster_apiserver::admission::pod_qos_class(&self.pod["spec"]),
        });
        if let Some(e) = &self.volume_error {
            status["message"] = json!(e);
        }
        status
    }

    /// Writes the status if it changed. Returns false when the pod is gone.
    fn write_status(&mut self) -> bool {
        let status = self.status();
        if status == self.last_written {
            return true;
        }
        let uid = self.uid.clone();
        let rt = pod_rt();
        let st = status.clone();
        let res = self.store.update_with(rt, &self.ns, &self.name, |obj| {
            if obj["metadata"]["uid"].as_str() != Some(uid.as_str()) {
                return Err(ApiError::conflict(rt, "", "replaced"));
            }
            obj["status"] = st;
            Ok(())
        });
        match res {
            Ok(_) => {
                self.last_written = status;
                true
            }
            Err(e) => {
                tracing::debug!("kubelet: status of {}/{}: {e:?}", self.ns, self.name);
                false
            }
        }
    }

    fn on_exit(&mut self, ex: Exit) {
        let policy = self.restart_policy().to_string();
        let Some(c) = self.ctrs.get_mut(ex.idx) else {
            return;
        };
        if c.generation != ex.generation {
            return;
        }
        let started_at = match &c.state {
            CState::Running { started_at } => started_at.clone(),
            _ => now(),
        };
        let reason = if ex.code == 0 { "Completed" } else { "Error" }.to_string();
        let terminated = CState::Terminated {
            exit_code: ex.code,
            reason: reason.clone(),
            started_at: started_at.clone(),
            finished_at: now(),
        };
        c.ready = false;
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => ex.code != 0,
            _ => true,
        };
        tracing::info!(
            "kubelet: container {} of {}/{} exited with {}",
            c.name,
            self.ns,
            self.name,
            ex.code
        );
        if restart {
            if c.started.elapsed() > Duration::from_secs(10) {
                c.backoff = Duration::from_millis(100);
            }
            c.last_state = Some(json!({"terminated": {
                "exitCode": ex.code, "reason": reason, "startedAt": started_at, "finishedAt": now(),
                "containerID": format!("mc://{}", c.pid.unwrap_or(0)),
            }}));
            c.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}ms restarting failed container={} pod={}_{}({})",
                    c.backoff.as_millis(),
                    c.name,
                    self.name,
                    self.ns,
                    self.uid
                ),
            };
            c.next_start = Some(Instant::now() + c.backoff);
            c.backoff = (c.backoff * 2).min(Duration::from_secs(5));
            c.restart_count += 1;
        } else {
            c.state = terminated;
            c.next_start = None;
        }
        if self
            .ctrs
            .iter()
            .all(|c| matches!(c.state, CState::Terminated { .. }))
        {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(c.state, CState::Terminated { exit_code: 0, .. }));
            self.finished_phase = Some(if ok { "Succeeded" } else { "Failed" });
        }
    }

    /// One round: (re)start due containers, probe. Returns the time until
    /// the next round.
    async fn tick(&mut self) -> Duration {
        if !self.volumes_ready {
            match self.prepare_volumes() {
                Ok(()) => {
                    self.volumes_ready = true;
                    self.volume_error = None;
                }
                Err(e) => {
                    self.volume_error = Some(format!("MountVolume.SetUp failed: {e}"));
                    for c in &mut self.ctrs {
                        c.state = CState::Waiting {
                            reason: "ContainerCreating".into(),
                            message: String::new(),
                        };
                    }
                    return Duration::from_secs(1);
                }
            }
        }
        let mut next = Duration::from_secs(2);
        for idx in 0..self.ctrs.len() {
            if self.ctrs[idx]
                .next_start
                .is_some_and(|t| t <= Instant::now())
            {
                self.ctrs[idx].next_start = None;
                if let Err((reason, message)) = self.start(idx).await {
                    tracing::warn!(
                        "kubelet: {}/{} container {}: {reason}: {message}",
                        self.ns,
                        self.name,
                        self.ctrs[idx].name
                    );
                    let c = &mut self.ctrs[idx];
                    c.state = CState::Waiting { reason, message };
                    c.next_start = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            if let Some(t) = self.ctrs[idx].next_start {
                next = next.min(t.saturating_duration_since(Instant::now()));
            }
        }
        for idx in 0..self.ctrs.len() {
            let c = &self.ctrs[idx];
            if !matches!(c.state, CState::Running { .. }) {
                continue;
            }
            if c.next_probe <= Instant::now() {
                let ok = self.probe(idx).await;
                let c = &mut self.ctrs[idx];
                if ok {
                    c.ready = true;
                    c.failures = 0;
                } else {
                    c.failures += 1;
                    if !c.ready || c.failures >= 3 {
                        c.ready = false;
                    }
                }
                let interval = if c.ready {
                    Duration::from_secs(2)
                } else if c.started.elapsed() < Duration::from_secs(3) {
                    Duration::from_millis(50)
                } else {
                    Duration::from_millis(250)
                };
                c.next_probe = Instant::now() + interval;
            }
            next = next.min(
                self.ctrs[idx]
                    .next_probe
                    .saturating_duration_since(Instant::now()),
            );
        }
        next.max(Duration::from_millis(10))
    }

    /// Stops every process: SIGTERM to each container's process group, SIGKILL
    /// after the grace period (at most 5 s), then anything left in the netns.
    async fn kill_all(&mut self, exit_rx: &mut mpsc::UnboundedReceiver<Exit>) {
        let grace = self.pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
            .min(5);
        let signal_all = |ctrs: &[Ctr], sig: nix::sys::signal::Signal| {
            for c in ctrs
                .iter()
                .filter(|c| matches!(c.state, CState::Running { .. }))
            {
                if let Some(pid) = c.pid {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
                }
            }
        };
        signal_all(&self.ctrs, nix::sys::signal::Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
        while self
            .ctrs
            .iter()
            .any(|c| matches!(c.state, CState::Running { .. }))
        {
            match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
                Ok(Some(ex)) => {
                    if let Some(c) = self.ctrs.get_mut(ex.idx)
                        && c.generation == ex.generation
                    {
                        c.state = CState::Terminated {
                            exit_code: ex.code,
                            reason: "Completed".into(),
                            started_at: String::new(),
                            finished_at: now(),
                        };
                    }
                }
                _ => break,
            }
        }
        signal_all(&self.ctrs, nix::sys::signal::Signal::SIGKILL);
        let netns = self.netns.clone();
        let _ = tokio::task::spawn_blocking(move || net::kill_netns_processes(&netns)).await;
    }
}

pub(super) async fn run_pod(
    store: Arc<Store>,
    ctx: ClusterCtx,
    pod: Value,
    ip: Ipv4Addr,
    mut stop: watch::Receiver<bool>,
) {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let netns = pod_netns_name(&ctx.name, &uid);
    let dir = pod_dir(&ctx, &ns, &name);
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let ctrs = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| Ctr {
            spec: c.clone(),
            name: c["name"].as_str().unwrap_or("").to_string(),
            image: c["image"].as_str().unwrap_or("").to_string(),
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            pid: None,
            generation: 0,
            ready: false,
            failures: 0,
            restart_count: 0,
            last_state: None,
            next_start: Some(Instant::now()),
            backoff: Duration::from_millis(100),
            started: Instant::now(),
            next_probe: Instant::now(),
            ever_started: false,
            program: String::new(),
            starts: 0,
        })
        .collect();
    let mut run = PodRun {
        store,
        ctx: ctx.clone(),
        pod,
        uid,
        ns,
        name,
        ip,
        netns: netns.clone(),
        dir: dir.clone(),
        ctrs,
        exit_tx,
        conditions: BTreeMap::new(),
        start_time: now(),
        last_written: Value::Null,
        volumes: BTreeMap::new(),
        volumes_ready: false,
        volume_error: None,
        finished_phase: None,
        ipc: None,
    };
    // Admitted already (`Kubelet::ensure`).
    let sysctls = admit_sysctls(&run.pod).unwrap_or_default();
    let setup = {
        let (ctx, netns, ns, dir) = (ctx.clone(), netns.clone(), run.ns.clone(), dir.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<fs::File> {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
            if net::netns_exists(&netns) {
                net::kill_netns_processes(&netns);
                net::delete_pod_net(&netns)?;
            }
            net::create_pod_net(&ctx, &netns, ip, &ns)?;
            // The sandbox's sysctls, before any container starts.
            pod_namespaces(&netns, &sysctls)
        })
        .await
    };
    let setup = match setup {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };
    let setup = setup.map(|ipc| run.ipc = Some(ipc));
    if let Err(e) = setup {
        tracing::error!(
            "kubelet: pod {}/{}: creating the sandbox: {e:#}",
            run.ns,
            run.name
        );
        for c in &mut run.ctrs {
            c.state = CState::Waiting {
                reason: "ContainerCreating".into(),
                message: format!("failed to create pod sandbox: {e:#}"),
            };
            c.next_start = None;
        }
        run.write_status();
        let _ = stop.changed().await;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = net::delete_pod_net(&netns);
            let _ = fs::remove_dir_all(&dir);
        })
        .await;
        return;
    }
    run.write_status();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
            Some(ex) = exit_rx.recv() => {
                run.on_exit(ex);
                while let Ok(ex) = exit_rx.try_recv() {
                    run.on_exit(ex);
                }
                wait = Duration::ZERO;
            }
            _ = tokio::time::sleep(wait) => {
                wait = run.tick().await;
            }
        }
        if !run.write_status() && run.store.get(pod_rt(), &run.ns, &run.name).is_err() {
            break;
        }
    }
    run.kill_all(&mut exit_rx).await;
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = net::delete_pod_net(&netns) {
            tracing::warn!("kubelet: {e:#}");
        }
        let _ = fs::remove_dir_all(&dir);
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    #[test]
    fn paths_and_probes() {
        let run = Path::new("/r/c/run");
        assert_eq!(
            host_target(run, "/var/run/secrets/x"),
            Path::new("/r/c/run/secrets/x")
        );
        assert_eq!(host_target(run, "/run/a"), Path::new("/r/c/run/a"));
        assert_eq!(host_target(run, "/run"), Path::new("/r/c/run"));
        assert_eq!(host_target(run, "/runner"), Path::new("/runner"));
        assert_eq!(host_target(run, "/etc/cfg"), Path::new("/etc/cfg"));
        assert!(
            safe_rel("../x").is_none() && safe_rel("/x").is_none() && safe_rel("a/b").is_some()
        );
        let c = json!({"ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9000, "protocol": "UDP"}]});
        assert_eq!(probe_of(&c), Probe::Tcp(8080));
        assert_eq!(
            probe_of(&json!({"ports": [{"containerPort": 9000, "protocol": "UDP"}]})),
            Probe::Alive
        );
        let mut c2 = c.clone();
        c2["readinessProbe"] = json!({"httpGet": {"port": "http", "path": "/healthz"}});
        assert_eq!(
            probe_of(&c2),
            Probe::Http {
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            pod_netns_name("demo", "abcdef12-3456"),
            "mc-demo-p-abcdef12"
        );
    }
}
