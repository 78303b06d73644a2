//! The connection's supervisor: follows the gateway's pods, re-registers
//! on a new pod and every heartbeat, and points the transport at it; and
//! brings the tunnel back at once when the laptop wakes up or its network
//! changes ([`underlay`]), saying so in `status`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::StaticSecret;
use burrow_deploy::Cluster;
use burrow_deploy::install::{self, GatewayPod};

use super::underlay::{self, Underlay};
use super::*;
use crate::protocol::Status;
use crate::tunnel::datapath::Sessions;

pub(super) struct Supervisor {
    pub(super) cluster: Cluster,
    pub(super) namespace: String,
    pub(super) version: String,
    pub(super) key: StaticSecret,
    pub(super) address: IpAddr,
    pub(super) pod: GatewayPod,
    pub(super) relay: Option<PortForward>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) status: Arc<std::sync::Mutex<Status>>,
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
    /// Where the tunnel's traffic leaves the laptop for (the UDP endpoint,
    /// or the API server for port-forward): watched for network changes.
    pub(super) underlay_to: Option<SocketAddr>,
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
    let mut look = tokio::time::interval(underlay::TICK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut net = Underlay::new(
        s.underlay_to
            .and_then(|to| underlay::source_towards(to).ok().flatten()),
        std::time::Instant::now(),
    );
    loop {
        let mut change = None;
        tokio::select! {
            _ = look.tick() => {
                match s.underlay_to.map(underlay::source_towards).transpose() {
                    Ok(source) => {
                        change = net.observe(source.flatten(), std::time::Instant::now(), std::time::SystemTime::now());
                    }
                    // Not a network change: look again at the next tick.
                    Err(e) => tracing::debug!(error = %e, "cannot look at the route towards the gateway"),
                }
            }
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
        if let Some(change) = change {
            on_change(&s, &change);
            if change.needs_recovery() {
                next_register = tokio::time::Instant::now();
            }
        }
        if tokio::time::Instant::now() < next_register {
            continue;
        }
        let changed = target.name != s.pod.name;
        match register(&s.cluster, &target, &s.key, Some(s.address)).await {
            Ok(reg) => {
                tracing::debug!(pod = %target.name, known = ?reg.known, "registered with the gateway");
                next_register = tokio::time::Instant::now() + HEARTBEAT;
                // The gateway answered: whatever the routes say (a proxy
                // may carry the API server's traffic), the laptop is not
                // offline.
                s.sessions.set_offline(false);
                if reg.address != s.address {
                    tracing::warn!(old = %s.address, new = %reg.address, "the gateway gave a different tunnel address");
                }
                if !changed && reg.known == Some(false) {
                    // The same pod forgot this laptop: silent past its grace
                    // (asleep, offline). Its flows are gone; the peer is
                    // back now, so handshake at once rather than at the
                    // next retry of the old session.
                    s.sessions.restart();
                    let closed = close_tunnel_connections(s.address).await;
                    let what = format!(
                        "the gateway had forgotten this laptop (silent longer than its {}s grace): registered again as {}; {closed}",
                        reg.expiry_secs, reg.address
                    );
                    tracing::warn!("{what}");
                    if let Ok(mut st) = s.status.lock() {
                        st.reconnects += 1;
                        st.last_reconnect_error = None;
                        st.event(what);
                    }
                }
                if changed {
                    if let Some(r) = &s.relay {
                        let _ = r.pod.send(target.clone());
                    }
                    s.sessions.restart();
                    let closed = if reg.known == Some(true) {
                        String::new()
                    } else {
                        format!(
                            " (the new pod did not know this laptop); {}",
                            close_tunnel_connections(s.address).await
                        )
                    };
                    if let Ok(mut st) = s.status.lock() {
                        st.reconnects += 1;
                        st.event(format!(
                            "gateway pod {} replaced by {}: registered again{closed}",
                            s.pod.name, target.name,
                        ));
                        st.gateway_pod = target.name.clone();
                        st.gateway_pod_ip = target.ip.clone();
                        if let Some(r) = &s.relay {
                            st.endpoint =
                                super::transport::port_forward_endpoint(&target.name, r.streams);
                        }
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

/// Close the laptop's TCP connections through the tunnel (those from its
/// tunnel address `address`) after the gateway lost their state (it forgot
/// the laptop, or a new pod took over): the gateway resets them, but
/// those resets went nowhere, so a connection that only waits for data
/// would wait for good. Uses the kernel's socket destroy (`ss -K`, from
/// iproute2, as the daemon runs as root); says what it did.
async fn close_tunnel_connections(address: IpAddr) -> String {
    let run = tokio::process::Command::new("ss")
        .args(["-K", "-t", "-n", "-H", "src"])
        .arg(address.to_string())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(out)) if out.status.success() => {
            let n = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count();
            tracing::info!(closed = n, "closed the connections the gateway had lost");
            format!("{n} connection(s) through the tunnel were closed (their state was lost)")
        }
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            tracing::warn!(%err, "ss -K failed");
            format!("its connections through the tunnel were lost (closing them failed: {err})")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot run ss -K");
            format!(
                "its connections through the tunnel were lost (cannot run ss to close them: {e})"
            )
        }
        Err(_) => "its connections through the tunnel were lost (ss -K did not finish)".to_owned(),
    }
}

/// A wake-up or network change: said in `status`; while the network is
/// gone the data path answers TCP "host unreachable"; once back, the
/// transport is brought back now — new port-forward
/// streams (the old ones may be dead without either end knowing), and a
/// WireGuard handshake at once (from a new address the gateway roams to
/// it; after a sleep the session may have expired) keeping the session and
/// what it queued meanwhile — and the caller re-registers at once.
fn on_change(s: &Supervisor, change: &underlay::Change) {
    tracing::info!("{change}");
    if let Ok(mut st) = s.status.lock() {
        st.event(change);
    }
    // Lost: TCP into the tunnel is answered "host unreachable" until the
    // network is back (see `Sessions::set_offline`).
    s.sessions.set_offline(!change.needs_recovery());
    if !change.needs_recovery() {
        return;
    }
    if let Some(r) = &s.relay {
        // The same pod again: the streams are reopened; the handshake goes
        // on the first one up.
        let _ = r.pod.send(s.pod.clone());
    }
    s.sessions.handshake_now();
}
