//! The kubelet of the one node: pods bound to it (`spec.nodeName`) become
//! processes in their own network and IPC namespaces (and private mount and
//! UTS namespaces per container), with the pod's environment, its
//! admitted sysctls (the safe set; anything else rejects the pod with
//! `SysctlForbidden`), ConfigMap/Secret volumes (group `fsGroup` as the
//! kubelet sets it), the service-account token where in-cluster config
//! expects it, and the security context's user, groups, no-new-privileges
//! and read-only root. Pod status (phase, IPs, conditions,
//! containerStatuses) follows the processes and their readiness.
//! Container output is captured as a runtime does (CRI log files per
//! instance) and served to the API server's `pods/{name}/log`.
//!
//! Must never: create anything on the machine's filesystem outside the
//! cluster's state dir for a pod (a mount point missing on the machine is
//! made in a container root of its own), or write a sysctl outside a pod's
//! own namespaces.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use minicluster_apiserver::logs::{LogOptions, LogSource, LogStream};
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ApiError, EventType, Store};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast::error::RecvError, mpsc, watch};

use crate::ctx::{ClusterCtx, KUBERNETES_SERVICE_IP, NODE_NAME, NODE_UNDERLAY_IP};
use crate::images::{self, ImageInput, ImagePaths};
use crate::net;

const PODS: &str = "core/v1/pods";

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `mc-<cluster>-p-<first 8 hex of the uid>`.
pub fn pod_netns_name(cluster: &str, uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    net::netns_name_for_pod(cluster, &hex)
}

/// `<state_dir>/pods/<ns>_<pod>/`.
pub fn pod_dir(ctx: &ClusterCtx, ns: &str, pod: &str) -> PathBuf {
    ctx.state_dir.join("pods").join(format!("{ns}_{pod}"))
}

/// A container's log: `<state_dir>/pods/<ns>_<pod>/<container>.log`.
pub fn log_path(ctx: &ClusterCtx, ns: &str, pod: &str, container: &str) -> PathBuf {
    pod_dir(ctx, ns, pod).join(format!("{container}.log"))
}

// ---------------------------------------------------------------------------
// IP allocation

const FIRST_POD_IP: u32 = u32::from_be_bytes([10, 244, 0, 2]);
const LAST_POD_IP: u32 = u32::from_be_bytes([10, 244, 255, 254]);

/// The first address at or after `cursor` (wrapping) in
/// 10.244.0.2–10.244.255.254 that is not in `in_use`.
pub fn pick_ip(in_use: &HashSet<Ipv4Addr>, cursor: u32) -> Option<Ipv4Addr> {
    let span = LAST_POD_IP - FIRST_POD_IP + 1;
    let start = cursor.clamp(FIRST_POD_IP, LAST_POD_IP) - FIRST_POD_IP;
    (0..span)
        .map(|i| Ipv4Addr::from(FIRST_POD_IP + (start + i) % span))
        .find(|ip| !in_use.contains(ip))
}

#[derive(Default)]
struct IpPool {
    held: HashSet<Ipv4Addr>,
    cursor: u32,
}

impl IpPool {
    /// Allocates an address not held here nor used by any pod in the store.
    /// Walks forward so that a freed address is not reused at once (stale
    /// conntrack entries, clients with old answers).
    fn allocate(&mut self, store: &Store) -> Option<Ipv4Addr> {
        let mut in_use = self.held.clone();
        for p in store.list(must(PODS), None).0 {
            if let Some(ip) = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()) {
                in_use.insert(ip);
            }
        }
        let ip = pick_ip(&in_use, self.cursor.max(FIRST_POD_IP))?;
        self.cursor = u32::from(ip) + 1;
        self.held.insert(ip);
        Some(ip)
    }
}

// ---------------------------------------------------------------------------
// Environment

/// Reads a ConfigMap or Secret's data as bytes (`kind` is `configmaps` or
/// `secrets`; Secret `data` is base64, `stringData` plain; ConfigMap
/// `binaryData` base64).
pub fn object_data(kind: &str, obj: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let b64 = |v: &Value| {
        v.as_str().and_then(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .ok()
        })
    };
    if kind == "secrets" {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
        for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
    } else {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
        for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
    }
    out
}

/// Looks up a ConfigMap/Secret (`configmaps`/`secrets`, name) in the pod's
/// namespace.
pub type Lookup<'a> = &'a dyn Fn(&str, &str) -> Option<Value>;

/// What environment variables are made from.
pub struct EnvSources<'a> {
    pub pod: &'a Value,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    /// Services of the pod's namespace (service links).
    pub services: &'a [Value],
    pub lookup: Lookup<'a>,
}

/// `$(VAR)` expansion as Kubernetes does it (`$$` escapes, unknown
/// references stay as they are).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(j) => {
                    let name = &body[..j];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_ref(
    pod: &Value,
    path: &str,
    pod_ip: Option<Ipv4Addr>,
    host_ip: Ipv4Addr,
) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let bracket = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => s(&pod["metadata"]["name"]),
        "metadata.namespace" => s(&pod["metadata"]["namespace"]),
        "metadata.uid" => s(&pod["metadata"]["uid"]),
        "spec.nodeName" => s(&pod["spec"]["nodeName"]),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        "status.podIP" | "status.podIPs" => pod_ip.map(|i| i.to_string()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        _ => {
            if let Some(k) = bracket("metadata.labels['") {
                s(&pod["metadata"]["labels"][k.as_str()])
            } else if let Some(k) = bracket("metadata.annotations['") {
                s(&pod["metadata"]["annotations"][k.as_str()])
            } else {
                return Err(format!("unsupported fieldRef {path:?}"));
            }
        }
    })
}

fn key_ref(src: &EnvSources<'_>, kind: &str, r: &Value) -> Result<Option<String>, String> {
    let name = r["name"].as_str().unwrap_or("");
    let key = r["key"].as_str().unwrap_or("");
    let optional = r["optional"].as_bool() == Some(true);
    let what = if kind == "secrets" {
        "secret"
    } else {
        "configmap"
    };
    match (src.lookup)(kind, name) {
        None if optional => Ok(None),
        None => Err(format!("{what} \"{name}\" not found")),
        Some(obj) => match object_data(kind, &obj).remove(key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if optional => Ok(None),
            None => Err(format!("couldn't find key {key} in {what} {name}")),
        },
    }
}

fn env_name(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

/// A container's environment, as the kubelet builds it: service links and
/// `KUBERNETES_*` first, then `envFrom`, then `env` (later wins; `$(VAR)`
/// expanded against what came before), `HOSTNAME` = pod name. An error is a
/// CreateContainerConfigError message.
pub fn resolve_env(
    container: &Value,
    src: &EnvSources<'_>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    let pod = src.pod;
    env.insert(
        "HOSTNAME".to_string(),
        pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
    );
    let k = KUBERNETES_SERVICE_IP;
    for (n, v) in [
        ("KUBERNETES_SERVICE_HOST", k.to_string()),
        ("KUBERNETES_SERVICE_PORT", "443".to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443".to_string()),
        ("KUBERNETES_PORT", format!("tcp://{k}:443")),
        ("KUBERNETES_PORT_443_TCP", format!("tcp://{k}:443")),
        ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".to_string()),
        ("KUBERNETES_PORT_443_TCP_PORT", "443".to_string()),
        ("KUBERNETES_PORT_443_TCP_ADDR", k.to_string()),
    ] {
        env.insert(n.to_string(), v);
    }
    if pod["spec"]["enableServiceLinks"].as_bool() != Some(false) {
        for svc in src.services {
            let Some(ip) = crate::proxy::cluster_ip(svc) else {
                continue;
            };
            let name = env_name(svc["metadata"]["name"].as_str().unwrap_or(""));
            let ports = crate::proxy::service_ports(svc);
            let Some(first) = ports.first() else { continue };
            env.insert(format!("{name}_SERVICE_HOST"), ip.to_string());
            env.insert(format!("{name}_SERVICE_PORT"), first.port.to_string());
            let proto = first.protocol.to_ascii_lowercase();
            env.insert(
                format!("{name}_PORT"),
                format!("{proto}://{ip}:{}", first.port),
            );
            for p in &ports {
                let proto = p.protocol.to_ascii_lowercase();
                if !p.name.is_empty() {
                    env.insert(
                        format!("{name}_SERVICE_PORT_{}", env_name(&p.name)),
                        p.port.to_string(),
                    );
                }
                let base = format!("{name}_PORT_{}_{}", p.port, p.protocol.to_ascii_uppercase());
                env.insert(base.clone(), format!("{proto}://{ip}:{}", p.port));
                env.insert(format!("{base}_PROTO"), proto);
                env.insert(format!("{base}_PORT"), p.port.to_string());
                env.insert(format!("{base}_ADDR"), ip.to_string());
            }
        }
    }
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or("");
        let (kind, r) = if from["configMapRef"].is_object() {
            ("configmaps", &from["configMapRef"])
        } else if from["secretRef"].is_object() {
            ("secrets", &from["secretRef"])
        } else {
            continue;
        };
        let name = r["name"].as_str().unwrap_or("");
        match (src.lookup)(kind, name) {
            Some(obj) => {
                for (k, v) in object_data(kind, &obj) {
                    env.insert(
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if r["optional"].as_bool() == Some(true) => {}
            None => {
                let what = if kind == "secrets" {
                    "secret"
                } else {
                    "configmap"
                };
                return Err(format!("{what} \"{name}\" not found"));
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else {
            continue;
        };
        let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
            Some(expand(v, &env))
        } else if let Some(vf) = e.get("valueFrom") {
            if vf["configMapKeyRef"].is_object() {
                key_ref(src, "configmaps", &vf["configMapKeyRef"])?
            } else if vf["secretKeyRef"].is_object() {
                key_ref(src, "secrets", &vf["secretKeyRef"])?
            } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(pod, path, src.pod_ip, src.host_ip)?)
            } else if vf["resourceFieldRef"].is_object() {
                Some("0".to_string())
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.insert(name.to_string(), v);
        }
    }
    Ok(env)
}

// ---------------------------------------------------------------------------
// Volumes

/// One file of a volume: relative path, contents, mode.
pub type VolumeFile = (String, Vec<u8>, u32);

/// Files of a ConfigMap/Secret/projected/downwardAPI volume
/// (relative path → contents, mode). `Ok(None)`: not a file volume
/// (emptyDir, hostPath, ...).
pub fn volume_files(
    vol: &Value,
    src: &EnvSources<'_>,
    token: &dyn Fn() -> String,
    ca_pem: &str,
) -> Result<Option<Vec<VolumeFile>>, String> {
    let mut files = Vec::new();
    let default_mode = |v: &Value| v["defaultMode"].as_u64().map(|m| m as u32).unwrap_or(0o644);
    let keyed =
        |kind: &str, v: &Value, name: &str, files: &mut Vec<VolumeFile>| -> Result<(), String> {
            let optional = v["optional"].as_bool() == Some(true);
            let mode = default_mode(v);
            let what = if kind == "secrets" {
                "secret"
            } else {
                "configmap"
            };
            let Some(obj) = (src.lookup)(kind, name) else {
                if optional {
                    return Ok(());
                }
                return Err(format!("{what} \"{name}\" not found"));
            };
            let data = object_data(kind, &obj);
            match v["items"].as_array() {
                Some(items) => {
                    for it in items {
                        let key = it["key"].as_str().unwrap_or("");
                        let path = it["path"].as_str().unwrap_or(key);
                        let m = it["mode"].as_u64().map(|m| m as u32).unwrap_or(mode);
                        match data.get(key) {
                            Some(b) => files.push((path.to_string(), b.clone(), m)),
                            None if optional => {}
                            None => {
                                return Err(format!("couldn't find key {key} in {what} {name}"));
                            }
                        }
                    }
                }
                None => {
                    for (k, b) in data {
                        files.push((k, b, mode));
                    }
                }
            }
            Ok(())
        };
    let downward = |v: &Value, files: &mut Vec<VolumeFile>| -> Result<(), String> {
        for it in v["items"].as_array().into_iter().flatten() {
            let path = it["path"].as_str().unwrap_or("");
            if let Some(fp) = it["fieldRef"]["fieldPath"].as_str() {
                let val = match fp {
                    "metadata.labels" | "metadata.annotations" => {
                        let field = fp.trim_start_matches("metadata.");
                        src.pod["metadata"][field]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| format!("{k}=\"{}\"\n", v.as_str().unwrap_or("")))
                                    .collect::<String>()
                            })
                            .unwrap_or_default()
                    }
                    _ => field_ref(src.pod, fp, src.pod_ip, src.host_ip)?,
                };
                files.push((path.to_string(), val.into_bytes(), 0o644));
            }
        }
        Ok(())
    };
    if vol["configMap"].is_object() {
        let v = &vol["configMap"];
        keyed(
            "configmaps",
            v,
            v["name"].as_str().unwrap_or(""),
            &mut files,
        )?;
    } else if vol["secret"].is_object() {
        let v = &vol["secret"];
        keyed(
            "secrets",
            v,
            v["secretName"].as_str().unwrap_or(""),
            &mut files,
        )?;
    } else if vol["downwardAPI"].is_object() {
        downward(&vol["downwardAPI"], &mut files)?;
    } else if vol["projected"].is_object() {
        for s in vol["projected"]["sources"].as_array().into_iter().flatten() {
            if s["serviceAccountToken"].is_object() {
                let path = s["serviceAccountToken"]["path"].as_str().unwrap_or("token");
                files.push((path.to_string(), token().into_bytes(), 0o644));
            } else if s["configMap"].is_object() {
                let v = &s["configMap"];
                let name = v["name"].as_str().unwrap_or("");
                if name == "kube-root-ca.crt" && (src.lookup)("configmaps", name).is_none() {
                    files.push(("ca.crt".to_string(), ca_pem.as_bytes().to_vec(), 0o644));
                } else {
                    keyed("configmaps", v, name, &mut files)?;
                }
            } else if s["secret"].is_object() {
                let v = &s["secret"];
                keyed("secrets", v, v["name"].as_str().unwrap_or(""), &mut files)?;
            } else if s["downwardAPI"].is_object() {
                downward(&s["downwardAPI"], &mut files)?;
            }
        }
    } else {
        return Ok(None);
    }
    Ok(Some(files))
}

/// A path without `..` or leading `/` (keys, subPaths).
fn safe_rel(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if path.components().all(|c| matches!(c, Component::Normal(_))) && !p.is_empty() {
        Some(path.to_path_buf())
    } else {
        None
    }
}

/// Directories 0755 all the way down (non-root containers read the
/// service-account files whatever the daemon's umask).
fn set_tree_perms(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        for e in fs::read_dir(dir)?.flatten() {
            set_tree_perms(&e.path())?;
        }
    }
    Ok(())
}

fn write_files(dir: &Path, files: &[VolumeFile]) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for (rel, data, mode) in files {
        let rel = safe_rel(rel).with_context(|| format!("bad file name {rel:?} in a volume"))?;
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode & 0o777))?;
    }
    Ok(())
}

/// The kubelet's `SetVolumeOwnership` for `fsGroup`: every file and
/// directory of the volume gets group `fs_group` and group read (and write,
/// unless the volume is read-only, as Secret, ConfigMap, downward API and
/// projected volumes are) added to its mode; directories also group search
/// and setgid. Symlinks keep their mode.
pub fn set_volume_ownership(path: &Path, fs_group: u32, readonly: bool) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    std::os::unix::fs::lchown(path, None, Some(fs_group))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mut mask = if readonly { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2110; // setgid, group search
    }
    let mode = meta.permissions().mode() & 0o7777;
    fs::set_permissions(path, fs::Permissions::from_mode(mode | mask))?;
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            set_volume_ownership(&e?.path(), fs_group, readonly)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Sysctls

/// The sysctls a kubelet allows without `--allowed-unsafe-sysctls` (the
/// kubelet's `SafeSysctlAllowlist` on a kernel new enough for all of them).
/// This kubelet allows no unsafe ones.
pub const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// A sysctl name with `.` separators (`net/ipv4/conf/eth0.100/forwarding`
/// → `net.ipv4.conf.eth0/100.forwarding`), as the kubelet normalises them.
pub fn normalize_sysctl(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '/' => '.',
                '.' => '/',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// Where a normalised sysctl lives under `/proc/sys`.
fn sysctl_path(name: &str) -> String {
    let rel: String = name
        .chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect();
    format!("/proc/sys/{rel}")
}

/// The pod's `securityContext.sysctls` as the kubelet admits them: every
/// name in [`SAFE_SYSCTLS`] (and not of a namespace the pod shares with the
/// host), else the rejection message (`forbidden sysctl: "x" not
/// allowlisted`, reason `SysctlForbidden`). Ok: (name, value) pairs,
/// normalised.
pub fn admit_sysctls(pod: &Value) -> Result<Vec<(String, String)>, String> {
    let spec = &pod["spec"];
    let mut out = Vec::new();
    for s in spec["securityContext"]["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = normalize_sysctl(s["name"].as_str().unwrap_or(""));
        let value = s["value"].as_str().unwrap_or("").to_string();
        if !SAFE_SYSCTLS.contains(&name.as_str()) {
            return Err(format!("forbidden sysctl: \"{name}\" not allowlisted"));
        }
        let (host_ns, ns) = if name.starts_with("net.") {
            (spec["hostNetwork"].as_bool() == Some(true), "net")
        } else {
            (spec["hostIPC"].as_bool() == Some(true), "ipc")
        };
        if host_ns {
            return Err(format!(
                "forbidden sysctl: \"{name}\" not allowed with host {ns} enabled"
            ));
        }
        out.push((name, value));
    }
    Ok(out)
}

/// Writes the pod's admitted sysctls: `net.*` in its network namespace, the
/// IPC ones in a new IPC namespace shared by its containers. Returns that
/// namespace (held open by the file; it goes when the file and the pod's
/// processes are gone).
fn pod_namespaces(netns: &str, sysctls: &[(String, String)]) -> anyhow::Result<fs::File> {
    for (name, value) in sysctls.iter().filter(|(n, _)| n.starts_with("net.")) {
        net::netns_sysctl(netns, name, value)
            .with_context(|| format!("write sysctl key {name}"))?;
    }
    let ipc: Vec<(String, String)> = sysctls
        .iter()
        .filter(|(n, _)| !n.starts_with("net."))
        .cloned()
        .collect();
    std::thread::spawn(move || -> anyhow::Result<fs::File> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC)
            .context("creating the pod's IPC namespace")?;
        for (name, value) in &ipc {
            fs::write(sysctl_path(name), value)
                .with_context(|| format!("write sysctl key {name}"))?;
        }
        fs::File::open("/proc/thread-self/ns/ipc").context("opening the pod's IPC namespace")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the IPC namespace thread panicked"))?
}

/// Marks a pod the kubelet refused to admit: phase Failed with the reason
/// and `Pod was rejected: <message>`, and a Warning event, as the kubelet's
/// `rejectPod` does. Nothing of the pod is started.
fn reject_pod(store: &Store, pod: &Value, reason: &str, message: &str) {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
    let name = pod["metadata"]["name"].as_str().unwrap_or("");
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    tracing::warn!("kubelet: rejecting pod {ns}/{name}: {reason}: {message}");
    let status = json!({
        "phase": "Failed",
        "reason": reason,
        "message": format!("Pod was rejected: {message}"),
        "qosClass": "BestEffort",
        "startTime": now(),
    });
    let rt = pod_rt();
    let _ = store.update_with(rt, ns, name, |obj| {
        if obj["metadata"]["uid"].as_str() != Some(uid.as_str()) {
            return Err(ApiError::conflict(rt, "", "replaced"));
        }
        obj["status"] = status;
        Ok(())
    });
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": format!("{name}.{nanos:x}"), "namespace": ns},
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns, "uid": uid,
            "resourceVersion": pod["metadata"]["resourceVersion"],
        },
        "reason": reason,
        "message": message,
        "type": "Warning",
        "source": {"component": "kubelet", "host": NODE_NAME},
        "reportingComponent": "kubelet",
        "reportingInstance": NODE_NAME,
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "count": 1,
    });
    if let Err(e) = store.create(must("core/v1/events"), ns, event) {
        tracing::debug!("kubelet: event for {ns}/{name}: {e:?}");
    }
}

// ---------------------------------------------------------------------------
// Starting processes

/// A bind mount done in the child, in order.
struct BindOp {
    src: CString,
    dst: CString,
    recursive: bool,
    readonly: bool,
}

/// A container root of its own, for containers with mount points that do
/// not exist on the machine: an overlay of the machine's `/` (and of any
/// other mount a mount point is created in) whose upper layers live on a
/// tmpfs mounted in the container's mount namespace only, the machine's
/// other mounts bound in, the missing mount points made in it, chroot. The
/// machine's filesystem never sees the mount points; the tmpfs goes with
/// the container's last process.
struct NewRoot {
    /// The tmpfs (an empty directory in the container's work dir).
    layer: CString,
    /// The new root (another empty directory there).
    root: CString,
    /// Directories made on the tmpfs: the upper and work dirs.
    layer_dirs: Vec<CString>,
    /// The new root's overlay, then the machine's other mounts, parents
    /// first.
    mounts: Vec<RootMount>,
    /// Missing mount points in the new root, parents first: (path, is a
    /// directory).
    stubs: Vec<(CString, bool)>,
}

/// One mount of a [`NewRoot`].
enum RootMount {
    /// An overlay at `dst` (`lowerdir=<machine path>,upperdir=...`).
    Overlay { dst: CString, options: CString },
    /// A machine mount bound in recursively at `dst`.
    Bind { src: CString, dst: CString },
}

/// Everything the child does between fork and exec, prepared beforehand so
/// that the child only makes syscalls (no allocation after fork).
struct ChildSetup {
    netns: fs::File,
    /// The pod's IPC namespace.
    ipc: Option<fs::File>,
    hostname: CString,
    new_root: Option<NewRoot>,
    binds: Vec<BindOp>,
    readonly_root: bool,
    /// The working directory, entered once the mounts are in place.
    workdir: CString,
    no_new_privs: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    /// Supplementary groups (`fsGroup`, `supplementalGroups`).
    groups: Vec<libc::gid_t>,
}

fn cstr(p: &Path) -> anyhow::Result<CString> {
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
    fn apply(&self) -> std::io::Result<()> {
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
fn host_target(run_dir: &Path, container_path: &str) -> PathBuf {
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
fn resolve_container_path(path: &Path) -> PathBuf {
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
fn new_root(work_dir: &Path, missing: &[(PathBuf, bool)]) -> anyhow::Result<(PathBuf, NewRoot)> {
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
fn supplementary_groups(pod: &Value) -> Vec<libc::gid_t> {
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

fn security_context(pod: &Value, c: &Value) -> (Option<u32>, Option<u32>, bool, bool) {
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

// ---------------------------------------------------------------------------
// Probes

#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// Ready while alive.
    Alive,
    Tcp(u16),
    Http {
        port: u16,
        path: String,
    },
    Exec(Vec<String>),
}

fn port_of(c: &Value, v: &Value) -> Option<u16> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n).ok();
    }
    let name = v.as_str()?;
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    c["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

fn tcp_ports(c: &Value) -> Vec<u16> {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
        })
        .collect()
}

fn probe_of(c: &Value) -> Probe {
    let rp = &c["readinessProbe"];
    if rp["tcpSocket"].is_object()
        && let Some(p) = port_of(c, &rp["tcpSocket"]["port"])
    {
        return Probe::Tcp(p);
    }
    if rp["httpGet"].is_object()
        && let Some(p) = port_of(c, &rp["httpGet"]["port"])
    {
        return Probe::Http {
            port: p,
            path: rp["httpGet"]["path"].as_str().unwrap_or("/").to_string(),
        };
    }
    if let Some(cmd) = rp["exec"]["command"].as_array() {
        return Probe::Exec(
            cmd.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        );
    }
    match tcp_ports(c).first() {
        Some(&p) => Probe::Tcp(p),
        None => Probe::Alive,
    }
}

// ---------------------------------------------------------------------------
// One pod

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

fn pod_rt() -> &'static minicluster_apiserver::ResourceType {
    must(PODS)
}

impl PodRun {
    fn lookup(&self) -> impl Fn(&str, &str) -> Option<Value> + '_ {
        move |kind: &str, name: &str| {
            let key = format!("core/v1/{kind}");
            self.store.get(must(&key), &self.ns, name).ok()
        }
    }

    fn restart_policy(&self) -> &str {
        self.pod["spec"]["restartPolicy"]
            .as_str()
            .unwrap_or("Always")
    }

    fn prepare_volumes(&mut self) -> Result<(), String> {
        let services: Vec<Value> = Vec::new();
        let lookup = self.lookup();
        let src = EnvSources {
            pod: &self.pod,
            pod_ip: Some(self.ip),
            host_ip: NODE_UNDERLAY_IP,
            services: &services,
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
            match volume_files(vol, &src, &token, &self.ctx.ca_pem)? {
                Some(files) => {
                    if dir.exists() {
                        let _ = fs::remove_dir_all(&dir);
                    }
                    write_files(&dir, &files).map_err(|e| format!("{e:#}"))?;
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
        let services = self.store.list(must("core/v1/services"), Some(&self.ns)).0;
        let env = {
            let lookup = self.lookup();
            let src = EnvSources {
                pod: &self.pod,
                pod_ip: Some(self.ip),
                host_ip: NODE_UNDERLAY_IP,
                services: &services,
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
        let mut host_names = vec![self.name.clone()];
        if let (Some(h), Some(sub)) = (
            self.pod["spec"]["hostname"].as_str(),
            self.pod["spec"]["subdomain"].as_str(),
        ) {
            host_names.insert(0, format!("{h}.{sub}.{}.svc.cluster.local", self.ns));
            host_names.push(h.to_string());
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
            write_files(
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
            hostname: CString::new(self.name.as_bytes()).context("pod name")?,
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
            "qosClass": "BestEffort",
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

async fn run_pod(
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

// ---------------------------------------------------------------------------
// Logs

/// The CRI logs of a container: `<state_dir>/pods/<ns>_<pod>/logs/<container>/`,
/// one `<n>.log` per instance (`n` counts starts from 0), as a kubelet keeps
/// `/var/log/pods/<ns>_<pod>_<uid>/<container>/<restart>.log`.
pub fn cri_log_dir(ctx: &ClusterCtx, ns: &str, pod: &str, container: &str) -> PathBuf {
    pod_dir(ctx, ns, pod).join("logs").join(container)
}

/// A CRI entry is cut into partial (`P`) entries beyond this many bytes.
const CRI_MAX_LINE: usize = 16 * 1024;

/// One CRI log line.
fn cri_line(stream: &str, partial: bool, content: &[u8]) -> Vec<u8> {
    let ts = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    let mut out = Vec::with_capacity(content.len() + ts.len() + 12);
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if partial { b" P " } else { b" F " });
    out.extend_from_slice(content);
    out.push(b'\n');
    out
}

/// Appends `data` of `stream` to `pending` and returns the CRI lines that
/// are complete (and partial ones for overlong lines).
fn cri_lines(stream: &str, pending: &mut Vec<u8>, data: &[u8]) -> Vec<u8> {
    pending.extend_from_slice(data);
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
        out.extend(cri_line(stream, false, &pending[..pos]));
        pending.drain(..=pos);
    }
    while pending.len() >= CRI_MAX_LINE {
        out.extend(cri_line(stream, true, &pending[..CRI_MAX_LINE]));
        pending.drain(..CRI_MAX_LINE);
    }
    out
}

async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    r: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Copies a container's stdout and stderr, as the runtime's shim does, to
/// its raw log (`<container>.log`: every instance's bytes as written, for
/// people and tests) and its CRI log (`logs/<container>/<n>.log`:
/// `<RFC 3339 time> <stream> <F|P> <line>`, what `kubectl logs` reads).
/// Writes `done` once both streams are closed.
async fn copy_logs(
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    mut raw: fs::File,
    mut cri: fs::File,
    done: PathBuf,
) {
    use std::io::Write;
    let (mut out, mut err) = (Some(stdout), Some(stderr));
    let (mut out_buf, mut err_buf) = (vec![0u8; 8192], vec![0u8; 8192]);
    let mut pending = [Vec::new(), Vec::new()];
    const STREAMS: [&str; 2] = ["stdout", "stderr"];
    while out.is_some() || err.is_some() {
        let (i, r) = tokio::select! {
            r = read_some(&mut out, &mut out_buf) => (0, r),
            r = read_some(&mut err, &mut err_buf) => (1, r),
        };
        match r {
            Ok(n) if n > 0 => {
                let data = if i == 0 { &out_buf[..n] } else { &err_buf[..n] };
                let lines = cri_lines(STREAMS[i], &mut pending[i], data);
                let _ = cri.write_all(&lines);
                let _ = raw.write_all(data);
            }
            _ => {
                if i == 0 {
                    out = None;
                } else {
                    err = None;
                }
                if !pending[i].is_empty() {
                    let _ = cri.write_all(&cri_line(STREAMS[i], false, &pending[i]));
                    pending[i].clear();
                }
            }
        }
    }
    let _ = fs::write(done, "");
}

/// One entry of a CRI log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CriEntry {
    /// As written (RFC 3339 with nanoseconds).
    ts: String,
    time: Option<SystemTime>,
    stream: String,
    partial: bool,
    content: Vec<u8>,
}

fn parse_cri_line(line: &[u8]) -> Option<CriEntry> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let ts = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let stream = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let tag = parts.next()?;
    let content = parts.next().unwrap_or_default().to_vec();
    Some(CriEntry {
        time: humantime::parse_rfc3339(&ts).ok(),
        ts,
        stream,
        partial: tag == b"P",
        content,
    })
}

/// Reads a CRI log as it grows: only complete lines come out.
struct CriReader {
    file: tokio::fs::File,
    rest: Vec<u8>,
}

impl CriReader {
    async fn next_entries(&mut self) -> std::io::Result<Vec<CriEntry>> {
        let mut buf = Vec::new();
        self.file.read_to_end(&mut buf).await?;
        self.rest.extend_from_slice(&buf);
        let Some(end) = self.rest.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = self.rest.drain(..=end).collect();
        Ok(complete
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(parse_cri_line)
            .collect())
    }
}

/// What `kubectl logs` prints for `entries`: `since` and `tail_lines`
/// applied (tail counts whole lines), each entry's content with its
/// newline, prefixed by its time with `timestamps`.
fn render_log(entries: &[CriEntry], opts: &LogOptions) -> Vec<u8> {
    let kept: Vec<&CriEntry> = entries
        .iter()
        .filter(|e| opts.since.is_none_or(|s| e.time.is_none_or(|t| t >= s)))
        .collect();
    let start = match opts.tail_lines {
        None => 0,
        Some(n) => {
            // Index of the first entry of the last `n` whole lines.
            let mut lines = 0u64;
            let mut start = kept.len();
            for (i, e) in kept.iter().enumerate().rev() {
                if !e.partial {
                    if lines == n {
                        break;
                    }
                    lines += 1;
                }
                start = i;
            }
            if n == 0 { kept.len() } else { start }
        }
    };
    render_entries(&kept[start..], opts.timestamps)
}

fn render_entries(entries: &[&CriEntry], timestamps: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if timestamps {
            out.extend_from_slice(e.ts.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&e.content);
        if !e.partial {
            out.push(b'\n');
        }
    }
    out
}

/// Which instance's log a request means, from the container's status (as
/// the kubelet's `validateContainerLogStatus`): the latest instance, or
/// the one before it with `previous`; else the kubelet's refusal.
fn log_instance(
    status: &Value,
    pod: &str,
    container: &str,
    previous: bool,
    latest: Option<u32>,
) -> Result<u32, String> {
    let state = &status["state"];
    let last = &status["lastState"];
    let waiting = state["waiting"].is_object();
    let not_found =
        || format!("previous terminated container \"{container}\" in pod \"{pod}\" not found");
    if previous {
        if !last["terminated"].is_object() {
            return Err(not_found());
        }
        let latest = latest.ok_or_else(not_found)?;
        // While a restart waits, the latest instance is the terminated one.
        return if waiting {
            Ok(latest)
        } else {
            latest.checked_sub(1).ok_or_else(not_found)
        };
    }
    let ok = state["running"].is_object()
        || state["terminated"].is_object()
        || last["terminated"].is_object();
    if ok && let Some(n) = latest {
        return Ok(n);
    }
    if let Some(reason) = state["waiting"]["reason"].as_str() {
        let why = match reason {
            "ErrImagePull" => "image can't be pulled".to_string(),
            "ImagePullBackOff" => "trying and failing to pull image".to_string(),
            r => r.to_string(),
        };
        return Err(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start: {why}"
        ));
    }
    Err(format!(
        "container \"{container}\" in pod \"{pod}\" is waiting to start - no logs yet"
    ))
}

/// The highest `<n>.log` in `dir`.
fn latest_instance(dir: &Path) -> Option<u32> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u32>()
                .ok()
        })
        .max()
}

/// How often a follow looks for more.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The kubelet's log endpoint for the API server's `pods/{name}/log`:
/// reads the container's CRI log; with `follow`, keeps sending what is
/// appended until the instance's output is closed, a newer instance
/// starts, the pod goes, or the client does.
pub fn log_source(store: Arc<Store>, ctx: ClusterCtx) -> LogSource {
    Arc::new(move |pod: Value, opts: LogOptions| {
        let (store, ctx) = (store.clone(), ctx.clone());
        Box::pin(async move { serve_log(store, ctx, pod, opts).await })
    })
}

async fn serve_log(
    store: Arc<Store>,
    ctx: ClusterCtx,
    pod: Value,
    opts: LogOptions,
) -> Result<LogStream, ApiError> {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let container = opts.container.clone();
    let status = ["containerStatuses", "initContainerStatuses"]
        .iter()
        .flat_map(|k| pod["status"][k].as_array().into_iter().flatten())
        .find(|s| s["name"].as_str() == Some(container.as_str()))
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is not available"
            ))
        })?;
    let dir = cri_log_dir(&ctx, &ns, &name, &container);
    let latest = latest_instance(&dir);
    let n = log_instance(&status, &name, &container, opts.previous, latest)
        .map_err(ApiError::bad_request)?;
    let path = dir.join(format!("{n}.log"));
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\": reading its log: {e}"
        ))
    })?;
    let mut reader = CriReader {
        file,
        rest: Vec::new(),
    };
    let first = reader.next_entries().await.map_err(|e| {
        ApiError::new(
            500,
            "InternalError",
            format!("reading {}: {e}", path.display()),
        )
    })?;
    let head = render_log(&first, &opts);
    let follow = opts.follow && Some(n) == latest;
    if !follow {
        return Ok(futures::stream::iter([Bytes::from(head)]).boxed());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if !head.is_empty() && tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        let done = dir.join(format!("{n}.done"));
        let newer = dir.join(format!("{}.log", n + 1));
        let pods = must(PODS);
        loop {
            // Decide before reading, so whatever came before the end is sent.
            let ended = done.exists()
                || newer.exists()
                || store
                    .get(pods, &ns, &name)
                    .map(|p| p["metadata"]["uid"].as_str() != Some(uid.as_str()))
                    .unwrap_or(true);
            let entries = match reader.next_entries().await {
                Ok(e) => e,
                Err(_) => return,
            };
            let kept: Vec<&CriEntry> = entries
                .iter()
                .filter(|e| opts.since.is_none_or(|s| e.time.is_none_or(|t| t >= s)))
                .collect();
            let chunk = render_entries(&kept, opts.timestamps);
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if ended {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
            }
        }
    });
    Ok(
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
            .boxed(),
    )
}

// ---------------------------------------------------------------------------
// The kubelet

struct PodHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    ip: Ipv4Addr,
}

struct Kubelet {
    store: Arc<Store>,
    ctx: ClusterCtx,
    pods: HashMap<String, PodHandle>,
    ips: Arc<Mutex<IpPool>>,
}

fn on_this_node(pod: &Value) -> bool {
    pod["spec"]["nodeName"].as_str() == Some(NODE_NAME)
}

impl Kubelet {
    fn ensure(&mut self, pod: &Value) {
        let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
        if uid.is_empty() || self.pods.contains_key(&uid) || !on_this_node(pod) {
            return;
        }
        if matches!(
            pod["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        ) {
            return;
        }
        // Admission, as the kubelet's sysctl handler does it.
        if let Err(message) = admit_sysctls(pod) {
            reject_pod(&self.store, pod, "SysctlForbidden", &message);
            return;
        }
        let ip = {
            let mut pool = self.ips.lock().unwrap_or_else(|p| p.into_inner());
            pool.allocate(&self.store)
        };
        let Some(ip) = ip else {
            tracing::error!("kubelet: no free pod IP");
            return;
        };
        let (stop, rx) = watch::channel(false);
        let ips = self.ips.clone();
        let fut = run_pod(self.store.clone(), self.ctx.clone(), pod.clone(), ip, rx);
        let task = tokio::spawn(async move {
            fut.await;
            ips.lock()
                .unwrap_or_else(|p| p.into_inner())
                .held
                .remove(&ip);
        });
        self.pods.insert(uid, PodHandle { stop, task, ip });
    }

    fn stop(&mut self, uid: &str) {
        if let Some(h) = self.pods.remove(uid) {
            let _ = h.stop.send(true);
            tracing::debug!("kubelet: stopping pod {uid} ({})", h.ip);
            // The task frees its IP and cleans up on its own.
            drop(h.task);
        }
    }

    fn sync_all(&mut self) {
        let pods = self.store.list(pod_rt(), None).0;
        let live: HashSet<String> = pods
            .iter()
            .filter(|p| on_this_node(p))
            .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !live.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            self.stop(&uid);
        }
        for p in &pods {
            self.ensure(p);
        }
    }

    async fn shutdown(&mut self) {
        let handles: Vec<PodHandle> = self.pods.drain().map(|(_, h)| h).collect();
        for h in &handles {
            let _ = h.stop.send(true);
        }
        for h in handles {
            let _ = h.task.await;
        }
    }
}

/// Runs the kubelet until the store's watch channel closes (then stops every
/// pod it started).
pub async fn run(store: Arc<Store>, ctx: ClusterCtx) -> anyhow::Result<()> {
    let (_, mut rx) = store
        .watch(None)
        .map_err(|e| anyhow::anyhow!("watch: {e:?}"))?;
    let mut k = Kubelet {
        store,
        ctx,
        pods: HashMap::new(),
        ips: Arc::new(Mutex::new(IpPool::default())),
    };
    k.sync_all();
    loop {
        match rx.recv().await {
            Ok(ev) if ev.resource.key() == PODS => {
                let uid = ev.object["metadata"]["uid"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                match ev.kind {
                    EventType::Deleted => k.stop(&uid),
                    _ => k.ensure(&ev.object),
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => k.sync_all(),
            Err(RecvError::Closed) => {
                k.shutdown().await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_allocation_skips_used_and_wraps() {
        let mut used = HashSet::new();
        assert_eq!(pick_ip(&used, 0), Some(Ipv4Addr::new(10, 244, 0, 2)));
        used.insert(Ipv4Addr::new(10, 244, 0, 2));
        used.insert(Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(pick_ip(&used, 0), Some(Ipv4Addr::new(10, 244, 0, 4)));
        assert_eq!(
            pick_ip(&used, LAST_POD_IP + 5),
            Some(Ipv4Addr::new(10, 244, 255, 254))
        );
        used.insert(Ipv4Addr::new(10, 244, 255, 254));
        assert_eq!(
            pick_ip(&used, LAST_POD_IP),
            Some(Ipv4Addr::new(10, 244, 0, 4))
        );
        assert_eq!(
            pick_ip(&used, u32::from(Ipv4Addr::new(10, 244, 1, 0))),
            Some(Ipv4Addr::new(10, 244, 1, 0))
        );
    }

    fn pod() -> Value {
        json!({
            "metadata": {"name": "echo-1", "namespace": "default", "uid": "abcdef12-3456", "labels": {"app": "echo"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "burrow"},
        })
    }

    fn lookup(kind: &str, name: &str) -> Option<Value> {
        match (kind, name) {
            ("configmaps", "cfg") => Some(json!({"data": {"GREETING": "hello", "MODE": "fast"}})),
            ("secrets", "sec") => Some(json!({"data": {"TOKEN": "czNjcjN0"}})),
            _ => None,
        }
    }

    #[test]
    fn env_resolution() {
        let pod = pod();
        let services = vec![
            json!({"metadata": {"name": "redis-main", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "redis", "port": 6379}]}}),
        ];
        let src = EnvSources {
            pod: &pod,
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 9)),
            host_ip: NODE_UNDERLAY_IP,
            services: &services,
            lookup: &lookup,
        };
        let c = json!({
            "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"}],
            "env": [
                {"name": "PLAIN", "value": "x-$(GREETING)-$$(GREETING)-$(NOPE)"},
                {"name": "MODE", "value": "slow"},
                {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": true}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}
            ]
        });
        let env = resolve_env(&c, &src).expect("env");
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("GREETING"), Some("hello"));
        assert_eq!(get("S_TOKEN"), Some("s3cr3t"));
        assert_eq!(get("PLAIN"), Some("x-hello-$(GREETING)-$(NOPE)"));
        assert_eq!(get("MODE"), Some("slow"));
        assert_eq!(get("CM"), Some("hello"));
        assert_eq!(get("SECRET"), Some("s3cr3t"));
        assert_eq!(get("OPT"), None);
        assert_eq!(get("POD_NAME"), Some("echo-1"));
        assert_eq!(get("POD_NS"), Some("default"));
        assert_eq!(get("POD_UID"), Some("abcdef12-3456"));
        assert_eq!(get("POD_IP"), Some("10.244.0.9"));
        assert_eq!(get("HOST_IP"), Some("192.168.240.1"));
        assert_eq!(get("NODE"), Some("node-1"));
        assert_eq!(get("SA"), Some("burrow"));
        assert_eq!(get("APP"), Some("echo"));
        assert_eq!(get("HOSTNAME"), Some("echo-1"));
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("REDIS_MAIN_SERVICE_HOST"), Some("10.96.0.50"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT"), Some("6379"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT_REDIS"), Some("6379"));
        assert_eq!(get("REDIS_MAIN_PORT_6379_TCP_ADDR"), Some("10.96.0.50"));

        let bad = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing key"),
            "couldn't find key nope in configmap cfg"
        );
        let bad = json!({"envFrom": [{"secretRef": {"name": "gone"}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing"),
            "secret \"gone\" not found"
        );
    }

    #[test]
    fn volumes_as_files() {
        let pod = pod();
        let src = EnvSources {
            pod: &pod,
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 9)),
            host_ip: NODE_UNDERLAY_IP,
            services: &[],
            lookup: &lookup,
        };
        let token = || "tok".to_string();
        let files = |v: Value| {
            volume_files(&v, &src, &token, "CA")
                .expect("volume")
                .expect("files")
        };
        let f = files(json!({"name": "c", "configMap": {"name": "cfg"}}));
        assert_eq!(f.len(), 2);
        let f = files(
            json!({"name": "s", "secret": {"secretName": "sec", "items": [{"key": "TOKEN", "path": "a/t", "mode": 256}]}}),
        );
        assert_eq!(f, vec![("a/t".to_string(), b"s3cr3t".to_vec(), 0o400)]);
        let f = files(json!({"name": "p", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
        ]}}));
        let names: Vec<&str> = f.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["token", "ca.crt", "namespace"]);
        assert_eq!(f[2].1, b"default");
        assert!(
            volume_files(&json!({"name": "e", "emptyDir": {}}), &src, &token, "CA")
                .expect("ok")
                .is_none()
        );
        assert!(
            volume_files(
                &json!({"name": "x", "configMap": {"name": "nope"}}),
                &src,
                &token,
                "CA"
            )
            .is_err()
        );
    }

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

    #[test]
    fn sysctls_are_admitted_like_the_kubelet() {
        assert_eq!(
            normalize_sysctl("net/ipv4/conf/eth0.100/forwarding"),
            "net.ipv4.conf.eth0/100.forwarding"
        );
        assert_eq!(
            normalize_sysctl("net.ipv4.ping_group_range"),
            "net.ipv4.ping_group_range"
        );
        assert_eq!(
            sysctl_path("net.ipv4.conf.eth0/100.forwarding"),
            "/proc/sys/net/ipv4/conf/eth0.100/forwarding"
        );
        let pod = |sysctls: Value| json!({"spec": {"securityContext": {"sysctls": sysctls}}});
        assert_eq!(
            admit_sysctls(&pod(json!([
                {"name": "net.ipv4.ping_group_range", "value": "0 2147483647"},
                {"name": "net/ipv4/ip_unprivileged_port_start", "value": "1024"},
                {"name": "kernel.shm_rmid_forced", "value": "1"},
            ]))),
            Ok(vec![
                (
                    "net.ipv4.ping_group_range".to_string(),
                    "0 2147483647".to_string()
                ),
                (
                    "net.ipv4.ip_unprivileged_port_start".to_string(),
                    "1024".to_string()
                ),
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
            ])
        );
        assert_eq!(admit_sysctls(&json!({"spec": {}})), Ok(vec![]));
        assert_eq!(
            admit_sysctls(&pod(json!([
                {"name": "net.ipv4.ping_group_range", "value": "0 1"},
                {"name": "net.core.somaxconn", "value": "1024"},
            ]))),
            Err("forbidden sysctl: \"net.core.somaxconn\" not allowlisted".to_string())
        );
        let mut host = pod(json!([{"name": "net.ipv4.tcp_syncookies", "value": "1"}]));
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(
            admit_sysctls(&host),
            Err(
                "forbidden sysctl: \"net.ipv4.tcp_syncookies\" not allowed with host net enabled"
                    .to_string()
            )
        );
    }

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

    fn entry(ts: &str, stream: &str, partial: bool, content: &str) -> CriEntry {
        CriEntry {
            ts: ts.to_string(),
            time: humantime::parse_rfc3339(ts).ok(),
            stream: stream.to_string(),
            partial,
            content: content.as_bytes().to_vec(),
        }
    }

    #[test]
    fn cri_logs_are_written_and_served() {
        let mut pending = Vec::new();
        let out = cri_lines("stdout", &mut pending, b"one\ntwo\nthr");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first = parse_cri_line(lines[0].as_bytes()).expect("parse");
        assert_eq!((first.stream.as_str(), first.partial), ("stdout", false));
        assert_eq!(first.content, b"one");
        assert!(first.time.is_some(), "{}", lines[0]);
        assert_eq!(pending, b"thr");
        let long = vec![b'x'; CRI_MAX_LINE + 10];
        let out = cri_lines("stderr", &mut pending, &long);
        let e = parse_cri_line(out.strip_suffix(b"\n").expect("newline")).expect("parse");
        assert!(e.partial && e.content.len() == CRI_MAX_LINE);
        assert_eq!(pending.len(), 13);
        assert_eq!(
            parse_cri_line(b"2024-01-01T00:00:00.5Z stdout F ")
                .expect("empty")
                .content,
            b""
        );

        let entries = vec![
            entry("2024-01-01T00:00:01.000000001Z", "stdout", false, "a"),
            entry("2024-01-01T00:00:02.000000001Z", "stderr", true, "b1-"),
            entry("2024-01-01T00:00:02.500000001Z", "stderr", false, "b2"),
            entry("2024-01-01T00:00:03.000000001Z", "stdout", false, "c"),
        ];
        let opts = |f: &dyn Fn(&mut LogOptions)| {
            let mut o = LogOptions::default();
            f(&mut o);
            o
        };
        assert_eq!(render_log(&entries, &opts(&|_| {})), b"a\nb1-b2\nc\n");
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(2))),
            b"b1-b2\nc\n"
        );
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(0))),
            b""
        );
        assert_eq!(
            render_log(&entries, &opts(&|o| o.tail_lines = Some(9))),
            b"a\nb1-b2\nc\n"
        );
        let since = humantime::parse_rfc3339("2024-01-01T00:00:02.2Z").expect("time");
        assert_eq!(
            render_log(&entries, &opts(&|o| o.since = Some(since))),
            b"b2\nc\n"
        );
        assert_eq!(
            render_log(&entries[3..], &opts(&|o| o.timestamps = true)),
            b"2024-01-01T00:00:03.000000001Z c\n"
        );
    }

    #[test]
    fn log_instances_follow_the_container_status() {
        let running = json!({"state": {"running": {}}, "lastState": {}});
        assert_eq!(log_instance(&running, "p", "c", false, Some(0)), Ok(0));
        assert_eq!(
            log_instance(&running, "p", "c", true, Some(0)),
            Err("previous terminated container \"c\" in pod \"p\" not found".to_string())
        );
        let restarted =
            json!({"state": {"running": {}}, "lastState": {"terminated": {"exitCode": 3}}});
        assert_eq!(log_instance(&restarted, "p", "c", false, Some(2)), Ok(2));
        assert_eq!(log_instance(&restarted, "p", "c", true, Some(2)), Ok(1));
        let backoff = json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": {"exitCode": 3}}});
        assert_eq!(log_instance(&backoff, "p", "c", false, Some(2)), Ok(2));
        assert_eq!(log_instance(&backoff, "p", "c", true, Some(2)), Ok(2));
        let pulling = json!({"state": {"waiting": {"reason": "ErrImagePull"}}, "lastState": {}});
        assert_eq!(
            log_instance(&pulling, "bad", "x", false, None),
            Err(
                "container \"x\" in pod \"bad\" is waiting to start: image can't be pulled"
                    .to_string()
            )
        );
        let creating = json!({"state": {"waiting": {"reason": "ContainerCreating"}}});
        assert_eq!(
            log_instance(&creating, "p", "c", false, None),
            Err("container \"c\" in pod \"p\" is waiting to start: ContainerCreating".to_string())
        );
    }

    /// A follow ends when a newer instance starts, and its task goes when
    /// the client does.
    #[tokio::test]
    async fn follows_end_with_the_instance_or_the_client() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ctx = ClusterCtx {
            name: "unit".into(),
            state_dir: tmp.path().to_path_buf(),
            bin_dir: tmp.path().to_path_buf(),
            ca_pem: String::new(),
            issue_token: Arc::new(|_, _| String::new()),
        };
        let store = Arc::new(Store::new());
        store
            .create(
                must("core/v1/namespaces"),
                "",
                json!({"metadata": {"name": "default"}}),
            )
            .expect("ns");
        let pod = store
            .create(
                must(PODS),
                "default",
                json!({"metadata": {"name": "p"}, "spec": {"nodeName": NODE_NAME, "containers": [{"name": "c", "image": "x"}]},
                       "status": {"containerStatuses": [{"name": "c", "state": {"running": {}}, "lastState": {}}]}}),
            )
            .expect("pod");
        let dir = cri_log_dir(&ctx, "default", "p", "c");
        fs::create_dir_all(&dir).expect("log dir");
        fs::write(dir.join("0.log"), cri_line("stdout", false, b"first")).expect("log");
        let source = log_source(store.clone(), ctx.clone());
        let opts = LogOptions {
            container: "c".into(),
            follow: true,
            ..LogOptions::default()
        };
        let mut stream = source(pod.clone(), opts.clone()).await.expect("stream");
        assert_eq!(
            stream.next().await.expect("head"),
            Bytes::from_static(b"first\n")
        );
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(dir.join("0.log"))
            .expect("open");
        std::io::Write::write_all(&mut log, &cri_line("stderr", false, b"second")).expect("append");
        let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert_eq!(
            next.expect("in time").expect("more"),
            Bytes::from_static(b"second\n")
        );
        fs::write(dir.join("1.log"), "").expect("newer instance");
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert_eq!(end.expect("ends in time"), None);

        // A client that goes away: the follow's task lets go of the store.
        fs::remove_file(dir.join("1.log")).expect("rm");
        let stream = source(pod, opts).await.expect("stream");
        let held = Arc::strong_count(&store);
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&store) >= held {
            assert!(Instant::now() < deadline, "the follow outlived its client");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Root-only: a node, a laptop, kubelet + kube-proxy + DNS on a bare store,
/// real nginx and busybox-style pods, traffic through ClusterIPs and names.
#[cfg(test)]
mod e2e {
    use super::*;
    use crate::net::tests::{Guard, root_or_skip, test_ctx};
    use crate::net::{create_laptop, create_node, netns_exec};

    fn create(store: &Store, key: &str, ns: &str, obj: Value) -> Value {
        store.create(must(key), ns, obj).expect("create")
    }

    async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ready_ip(store: &Store, ns: &str, name: &str) -> Option<String> {
        let p = store.get(must(PODS), ns, name).ok()?;
        let ready = p["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready
            .then(|| p["status"]["podIP"].as_str().map(str::to_string))
            .flatten()
    }

    #[test]
    fn pods_services_dns_and_laptop_isolation() {
        if !root_or_skip("pods_services_dns_and_laptop_isolation") {
            return;
        }
        let ctx = test_ctx("k");
        let _guard = Guard(ctx.name.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            create_node(&ctx).expect("node");
            let laptop = create_laptop(&ctx, 1).expect("laptop");
            crate::dns::start_corp_dns(&ctx).expect("corp dns");
            let store = Arc::new(Store::new());
            for ns in ["default", "kube-system"] {
                create(&store, "core/v1/namespaces", "", json!({"metadata": {"name": ns}}));
            }
            tokio::spawn(run(store.clone(), ctx.clone()));
            tokio::spawn(crate::proxy::run(store.clone(), ctx.clone()));
            tokio::spawn(crate::dns::run(store.clone(), ctx.clone()));
            create(&store, "core/v1/services", "kube-system", json!({"metadata": {"name": "kube-dns"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}));
            // kube-dns's endpoints at the cluster DNS's first instance; the
            // mirroring controller makes its slice (and follows the DNS's
            // rolling replacements).
            let dns_port = crate::dns::FIRST_PORT;
            create(&store, "core/v1/endpoints", "kube-system", json!({"metadata": {"name": "kube-dns"},
                "subsets": [{"addresses": [{"ip": "10.244.0.1"}], "ports": [
                    {"name": "dns", "port": dns_port, "protocol": "UDP"}, {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"}]}]}));
            tokio::spawn(crate::informer::run(
                store.clone(),
                crate::endpoints::MirrorController::default(),
                crate::informer::Lag::NONE,
            ));
            create(&store, "core/v1/services", "default", json!({"metadata": {"name": "kubernetes"},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}}));
            create(&store, "core/v1/services", "default", json!({"metadata": {"name": "web"},
                "spec": {"clusterIP": "10.96.0.20", "type": "NodePort",
                         "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]}}));
            create(&store, "core/v1/configmaps", "default", json!({"metadata": {"name": "cfg"}, "data": {"GREETING": "hi", "conf.txt": "file-from-cm"}}));
            let t0 = Instant::now();
            create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "web-1"},
                "spec": {"nodeName": NODE_NAME, "containers": [{"name": "nginx", "image": "nginx:1.25",
                    "ports": [{"name": "http", "containerPort": 80}]}]}}));
            create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "caller"},
                "spec": {"nodeName": NODE_NAME,
                    "securityContext": {"runAsUser": 65534},
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                    "containers": [{"name": "sh", "image": "busybox",
                        "command": ["sleep", "infinity"],
                        "envFrom": [{"configMapRef": {"name": "cfg"}}],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/run/cfg"}],
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true}}]}}));
            create(&store, "core/v1/pods", "default", json!({"metadata": {"name": "bad"},
                "spec": {"nodeName": NODE_NAME, "containers": [{"name": "x", "image": "quay.io/nope/nope"}]}}));
            let web_ip = wait_for("web-1 ready", 20, || ready_ip(&store, "default", "web-1")).await;
            eprintln!("web-1 ready after {:?} (includes creating the 100 MiB file)", t0.elapsed());
            let t1 = Instant::now();
            let caller_ip = wait_for("caller ready", 10, || ready_ip(&store, "default", "caller")).await;
            eprintln!("caller ready {:?} later", t1.elapsed());
            let bad = wait_for("bad pod status", 10, || {
                let p = store.get(must(PODS), "default", "bad").ok()?;
                (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull").then_some(p)
            })
            .await;
            assert_eq!(bad["status"]["phase"], "Pending");

            // Endpoints, as the endpoints controller would write them.
            create(&store, "discovery.k8s.io/v1/endpointslices", "default", json!({
                "metadata": {"name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                "endpoints": [{"addresses": [web_ip], "conditions": {"ready": true}}]}));

            let node = ctx.node_netns();
            let caller_ns = pod_netns_name(&ctx.name, store.get(must(PODS), "default", "caller").expect("caller")["metadata"]["uid"].as_str().unwrap_or(""));
            let curl = |ns: &str, url: &str| netns_exec(ns, "curl", &["-sS", "--max-time", "3", url]);
            // Pod IP from the node, ClusterIP from the node.
            assert!(curl(&node, &format!("http://{web_ip}/index.html")).expect("pod ip").contains("nginx"));
            let sums = fs::read_to_string(ctx.state_dir.join("www/SHA256SUMS")).expect("sums");
            let got = wait_for("ClusterIP DNAT", 5, || {
                netns_exec(&node, "curl", &["-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{size_download}", "http://10.96.0.20/1k.bin"]).ok()
            })
            .await;
            assert_eq!(got, "1024");
            // From a pod, by name (cluster DNS through 10.96.0.10, search
            // list, hairpin DNAT on the shared bridge).
            let page = wait_for("web by name", 5, || curl(&caller_ns, "http://web/index.html").ok()).await;
            assert!(page.contains("nginx"), "{page}");
            let big = netns_exec(&caller_ns, "sh", &["-c", "curl -sS --max-time 20 http://web.default.svc.cluster.local/100m.bin | sha256sum"]).expect("big");
            let want = sums.lines().find(|l| l.ends_with("100m.bin")).and_then(|l| l.split_whitespace().next()).unwrap_or("?");
            assert!(big.starts_with(want), "{big} vs {want}");
            // Records follow the controllers (informer lag, then a DNS
            // instance swap): wait for them, as a client retrying would.
            let want_srv = "0 100 80 web.default.svc.cluster.local.";
            wait_for("the SRV record", 10, || {
                let srv = netns_exec(&caller_ns, "dig", &["+short", "SRV", "_http._tcp.web.default.svc.cluster.local"]).ok()?;
                (srv.trim() == want_srv).then_some(())
            })
            .await;
            let dashed = caller_ip.replace('.', "-");
            wait_for("the pod's A record", 10, || {
                let a = netns_exec(&caller_ns, "dig", &["+short", &format!("{dashed}.default.pod.cluster.local")]).ok()?;
                (a.trim() == caller_ip).then_some(())
            })
            .await;
            let nx = netns_exec(&caller_ns, "dig", &["nope.default.svc.cluster.local"]).expect("dig");
            assert!(nx.contains("NXDOMAIN"), "{nx}");
            let tcp = netns_exec(&caller_ns, "dig", &["+tcp", "+short", "kubernetes.default.svc.cluster.local"]).expect("dig tcp");
            assert_eq!(tcp.trim(), "10.96.0.1");
            assert!(crate::dns::probe(&ctx));

            // The caller's process: user, capabilities, mounts, env, hostname.
            let pid = store.get(must(PODS), "default", "caller").expect("caller")["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .and_then(|s| s.strip_prefix("mc://"))
                .and_then(|s| s.parse::<u32>().ok())
                .expect("pid");
            let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
            assert!(status.lines().any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")), "{status}");
            assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")));
            assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')));
            let root = format!("/proc/{pid}/root");
            assert_eq!(fs::read_to_string(format!("{root}/run/secrets/kubernetes.io/serviceaccount/token")).expect("token"), "token-default-default");
            assert_eq!(fs::read_to_string(format!("{root}/run/cfg/conf.txt")).expect("cm file"), "file-from-cm");
            assert!(fs::read_to_string(format!("{root}/etc/resolv.conf")).expect("resolv").contains("ndots:5"));
            let environ = fs::read(format!("/proc/{pid}/environ")).expect("environ");
            assert!(String::from_utf8_lossy(&environ).contains("GREETING=hi"));
            let mounts = fs::read_to_string(format!("/proc/{pid}/mounts")).expect("mounts");
            assert!(mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/") && l.contains(" ro,")), "{mounts}");

            // NodePort from the laptop works, nothing else of the cluster.
            assert!(curl(&laptop, "http://192.168.240.1:30080/index.html").expect("nodeport").contains("nginx"));
            assert!(curl(&laptop, "http://10.96.0.20/").is_err());
            assert!(curl(&laptop, &format!("http://{web_ip}/")).is_err());
            let corp = netns_exec(&laptop, "dig", &["+short", "intranet.example"]).expect("corp dig");
            assert_eq!(corp.trim(), "192.168.240.80");

            // No endpoints → refused at once.
            store.delete(must("discovery.k8s.io/v1/endpointslices"), "default", "web-x").expect("delete slice");
            // While the rules change a request may still time out; within
            // 5 s it must be refused at once (curl exit 7).
            let err = wait_for("REJECT", 5, || {
                curl(&node, "http://10.96.0.20/").err().filter(|e| format!("{e:#}").contains("curl: (7)"))
            })
            .await;
            assert!(format!("{err:#}").contains("curl: (7)"), "{err:#}");

            // Deleting a pod stops it and removes its namespace.
            let web_uid = store.get(must(PODS), "default", "web-1").expect("web")["metadata"]["uid"].as_str().unwrap_or("").to_string();
            store.delete(must(PODS), "default", "web-1").expect("delete");
            let web_ns = pod_netns_name(&ctx.name, &web_uid);
            let web_dir = pod_dir(&ctx, "default", "web-1");
            wait_for("web-1 gone", 10, || (!net::netns_exists(&web_ns) && !web_dir.exists()).then_some(())).await;
        });
        drop(rt);
    }

    #[test]
    fn restarts_and_completion() {
        if !root_or_skip("restarts_and_completion") {
            return;
        }
        let ctx = test_ctx("r");
        let _guard = Guard(ctx.name.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            create_node(&ctx).expect("node");
            let store = Arc::new(Store::new());
            create(&store, "core/v1/namespaces", "", json!({"metadata": {"name": "default"}}));
            tokio::spawn(run(store.clone(), ctx.clone()));
            let pod = |name: &str, policy: &str, script: &str| {
                json!({"metadata": {"name": name}, "spec": {"nodeName": NODE_NAME, "restartPolicy": policy,
                    "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", script]}]}})
            };
            create(&store, "core/v1/pods", "default", pod("crash", "Always", "echo out; exit 3"));
            create(&store, "core/v1/pods", "default", pod("ok", "Never", "exit 0"));
            create(&store, "core/v1/pods", "default", pod("fail", "Never", "exit 2"));
            let get = |name: &str| store.get(must(PODS), "default", name).expect("pod");
            let crash = wait_for("restarts", 10, || {
                let p = get("crash");
                (p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(2)).then_some(p)
            })
            .await;
            assert_eq!(crash["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 3);
            assert_eq!(crash["status"]["phase"], "Running");
            wait_for("Succeeded", 10, || (get("ok")["status"]["phase"] == "Succeeded").then_some(())).await;
            let f = wait_for("Failed", 10, || {
                let p = get("fail");
                (p["status"]["phase"] == "Failed").then_some(p)
            })
            .await;
            assert_eq!(f["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 2);
            // Output is copied from the containers' pipes as it comes: the
            // raw log has every instance's, the CRI logs one each.
            wait_for("two instances' output", 10, || {
                let log = fs::read_to_string(log_path(&ctx, "default", "crash", "c")).ok()?;
                log.starts_with("out\nout\n").then_some(())
            })
            .await;
            let dir = cri_log_dir(&ctx, "default", "crash", "c");
            // Two exits so far: instances 0 and 1 logged, a third may be
            // waiting out its back-off.
            let latest = latest_instance(&dir).expect("CRI logs");
            assert!(latest >= 1, "{latest}");
            let prev = fs::read_to_string(dir.join(format!("{}.log", latest - 1))).expect("previous");
            assert!(prev.ends_with(" stdout F out\n"), "{prev:?}");
            if let Some(older) = latest.checked_sub(2) {
                assert!(!dir.join(format!("{older}.log")).exists(), "older instances are collected");
            }
        });
        drop(rt);
    }
}
