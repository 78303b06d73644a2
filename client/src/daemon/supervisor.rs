//! The connection's supervisor: follows the gateway's pods, re-registers
//! on a new pod and every heartbeat, and points the transport at it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::StaticSecret;
use burrow_deploy::Cluster;
use burrow_deploy::install::{self, GatewayPod};

use super::*;
use crate::protocol::Status;

pub(super) struct Supervisor {
    pub(super) cluster: Cluster,
    pub(super) namespace: String,
    pub(super) version: String,
    pub(super) key: StaticSecret,
    pub(super) address: IpAddr,
    pub(super) pod: GatewayPod,
    pub(super) relay: Option<PortForward>,
    pub(super) reset: Arc<std::sync::atomic::AtomicBool>,
    pub(super) status: Arc<std::sync::Mutex<Status>>,
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
}

/// Follows the gateway's pods with a watch; when the Ready pod is replaced,
/// re-registers (same key, previous address) and points the transport at
/// the new pod, retrying every half second until the new pod answers.
/// Re-registers every [`HEARTBEAT`] too.
pub(super) async fn supervise(mut s: Supervisor) {
    use futures::StreamExt as _;
    let mut pods = Box::pin(install::watch_ready(&s.cluster, &s.namespace, &s.version));
    let mut target = s.pod.clone();
    let mut next_register = tokio::time::Instant::now() + HEARTBEAT;
    loop {
        tokio::select! {
            event = pods.next() => match event {
                Some(Ok(Some(pod))) => {
                    if pod.name != target.name {
                        tracing::info!(old = %s.pod.name, new = %pod.name, "gateway pod changed: re-registering");
                        next_register = tokio::time::Instant::now();
                    }
                    target = pod;
                }
                // No Ready pod right now: a later event brings one.
                Some(Ok(None)) => {}
                Some(Err(e)) => {
                    tracing::warn!("{e}");
                    if let Ok(mut st) = s.status.lock() {
                        st.last_reconnect_error = Some(e.to_string());
                    }
                }
                None => {
                    pods = Box::pin(install::watch_ready(&s.cluster, &s.namespace, &s.version));
                }
            },
            _ = tokio::time::sleep_until(next_register) => {}
            _ = s.stop.wait_for(|v| *v) => return,
        }
        if tokio::time::Instant::now() < next_register {
            continue;
        }
        let changed = target.name != s.pod.name;
        match register(&s.cluster, &target, &s.key, Some(s.address)).await {
            Ok(reg) => {
                next_register = tokio::time::Instant::now() + HEARTBEAT;
                if reg.address != s.address {
                    tracing::warn!(old = %s.address, new = %reg.address, "the gateway gave a different tunnel address");
                }
                if changed {
                    if let Some(r) = &s.relay {
                        let _ = r.pod.send(target.clone());
                    }
                    s.reset.store(true, std::sync::atomic::Ordering::Release);
                    if let Ok(mut st) = s.status.lock() {
                        st.reconnects += 1;
                        st.gateway_pod = target.name.clone();
                        st.gateway_pod_ip = target.ip.clone();
                        st.last_reconnect_error = None;
                    }
                    s.pod = target.clone();
                }
            }
            Err(e) => {
                tracing::warn!("re-registering with {}: {e:#}", target.name);
                if let Ok(mut st) = s.status.lock() {
                    st.last_reconnect_error = Some(format!("{e:#}"));
                }
                let retry = if changed {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(5)
                };
                next_register = tokio::time::Instant::now() + retry;
            }
        }
    }
}
