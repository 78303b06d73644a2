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
//!
//! One module per concern: `ip` (pod IPs), `env` (a container's
//! environment), `volumes` (files and `fsGroup`), `sysctls` (admission),
//! `spawn` (what a container's process does between fork and exec, its own
//! root), `probes`, `pod` (one pod's run: starts, restarts, status), `logs`
//! (CRI logs and `pods/log`); the loop over the node's pods is here.
//!
//! Not done: init containers (ignored), volume updates after a ConfigMap
//! or Secret changes.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use minicluster_apiserver::{EventType, Store};
use serde_json::Value;
use tokio::sync::{broadcast::error::RecvError, watch};

use crate::ctx::{ClusterCtx, NODE_NAME};
use crate::net;

use self::ip::IpPool;
use self::pod::{pod_rt, run_pod};
use self::sysctls::{admit_sysctls, reject_pod};

#[cfg(test)]
mod e2e;
mod env;
mod ip;
mod logs;
mod pod;
mod probes;
mod spawn;
mod sysctls;
mod volumes;

pub use logs::log_source;

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
