//! How the data path reaches the gateway: UDP to its NodePort when a
//! WireGuard handshake answers there (`auto`, `udp`), else WireGuard
//! datagrams length-framed over several port-forward streams the data path
//! writes to itself ([`PortForward`], the data path's [`Links`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_api::FRAMED_PORT;
use burrow_deploy::Cluster;
use burrow_deploy::install::{self, GatewayPod};
use burrow_deploy::portforward::{DATA_CHANNEL, Received};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::tunnel::links::{LinkEvent, Links, link_addr};

use super::*;
use crate::protocol::{ConnectRequest, Progress, Status, Transport, step};

/// How the data path reaches the gateway.
pub(super) struct Chosen {
    pub(super) name: &'static str,
    pub(super) reason: String,
    /// Where the data path sends WireGuard datagrams (for port-forward,
    /// the synthetic address of its first link).
    pub(super) endpoint: SocketAddr,
    /// For port-forward: the data path's links, one per stream.
    pub(super) links: Option<Arc<Links>>,
}

pub(super) async fn choose_transport(
    req: &ConnectRequest,
    cluster: &Cluster,
    namespace: &str,
    pod: &GatewayPod,
    key: &StaticSecret,
    gateway_key: PublicKey,
    tx: &Progress,
) -> anyhow::Result<Chosen> {
    let mut why_not_udp = String::new();
    if req.transport != Transport::PortForward {
        match udp_endpoint(req, cluster, namespace).await {
            Ok(endpoint) => {
                // Asked for by name, UDP is worth waiting for; `auto` has
                // port-forward to go on with.
                let settle = if req.transport == Transport::Udp {
                    NODEPORT_SETTLE_ASKED
                } else {
                    NODEPORT_SETTLE
                };
                let window = udp_window(pod.ready_at, std::time::SystemTime::now(), settle);
                if window > UDP_HANDSHAKE {
                    step(
                        tx,
                        format!(
                            "trying UDP to {endpoint} (the gateway just started: its NodePort \
                             may take kube-proxy a few seconds; waiting up to {} s)",
                            window.as_secs()
                        ),
                    );
                } else {
                    step(tx, format!("trying UDP to {endpoint}"));
                }
                match udp_handshake(endpoint, key, gateway_key, window).await {
                    Ok(()) => {
                        return Ok(Chosen {
                            name: "udp",
                            reason: format!("the gateway answered a handshake at {endpoint}"),
                            endpoint,
                            links: None,
                        });
                    }
                    Err(e) => why_not_udp = format!("UDP to {endpoint}: {e:#}"),
                }
            }
            Err(e) => why_not_udp = format!("no UDP endpoint: {e:#}"),
        }
        if req.transport == Transport::Udp {
            anyhow::bail!("--transport udp: {why_not_udp}; try --transport port-forward");
        }
        step(tx, format!("{why_not_udp}; falling back to port-forward"));
    }
    let streams = req.streams.unwrap_or(DEFAULT_STREAMS);
    let reason = if why_not_udp.is_empty() {
        "asked for with --transport port-forward".to_owned()
    } else {
        why_not_udp
    };
    Ok(Chosen {
        name: "port-forward",
        reason,
        endpoint: link_addr(0),
        links: Some(Arc::new(Links::new(streams, &[DATA_CHANNEL]))),
    })
}

/// Port-forward streams a connection opens unless `--port-forward-streams`
/// says otherwise.
pub const DEFAULT_STREAMS: usize = 4;

pub(super) async fn udp_endpoint(
    req: &ConnectRequest,
    cluster: &Cluster,
    namespace: &str,
) -> anyhow::Result<SocketAddr> {
    if let Some(e) = &req.endpoint {
        return tokio::net::lookup_host(e.as_str())
            .await
            .with_context(|| format!("cannot resolve --endpoint {e}"))?
            .next()
            .with_context(|| format!("--endpoint {e} has no address"));
    }
    let (wg, _) = install::node_ports(cluster, namespace).await?;
    let port = wg.context("the gateway Service has no WireGuard NodePort")?;
    let nodes = install::node_addresses(cluster).await?;
    let ip = nodes
        .first()
        .copied()
        .context("no node reports an address")?;
    Ok(SocketAddr::new(ip, port))
}

/// How long the UDP handshake may take: [`UDP_HANDSHAKE`], or up to
/// `settle` past the moment a just-started gateway turned ready (a clock
/// ahead of the API server's counts as "just now").
pub(super) fn udp_window(
    ready_at: Option<std::time::SystemTime>,
    now: std::time::SystemTime,
    settle: Duration,
) -> Duration {
    let Some(ready_at) = ready_at else {
        return UDP_HANDSHAKE;
    };
    let age = now.duration_since(ready_at).unwrap_or(Duration::ZERO);
    settle
        .saturating_sub(age)
        .clamp(UDP_HANDSHAKE, settle.max(UDP_HANDSHAKE))
}

/// One WireGuard handshake with a throwaway session: does the gateway
/// answer at `endpoint` within `window`?
pub(super) async fn udp_handshake(
    endpoint: SocketAddr,
    key: &StaticSecret,
    gateway_key: PublicKey,
    window: Duration,
) -> anyhow::Result<()> {
    use boringtun::noise::{Tunn, TunnResult};
    let sock = UdpSocket::bind(if endpoint.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    sock.connect(endpoint).await?;
    let mut tunn = Tunn::new(key.clone(), gateway_key, None, None, 1, None);
    let mut out = vec![0u8; 2048];
    let mut inb = vec![0u8; 2048];
    let deadline = Instant::now() + window;
    // A NodePort just created may refuse (ICMP unreachable) or drop the
    // first tries while kube-proxy catches up: resend every 250 ms within
    // the window.
    let mut last_error = String::from("no handshake answer");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("{last_error} within {window:?}");
        }
        if let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(&mut out, true)
            && let Err(e) = sock.send(d).await
        {
            last_error = e.to_string();
        }
        let wait = left.min(Duration::from_millis(250));
        match tokio::time::timeout(wait, sock.recv(&mut inb)).await {
            Err(_) => {}
            Ok(Err(e)) => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(100).min(left)).await;
            }
            Ok(Ok(n)) => match tunn.decapsulate(Some(endpoint.ip()), &inb[..n], &mut out) {
                TunnResult::WriteToNetwork(_) | TunnResult::Done
                    if tunn.time_since_last_handshake().is_some() =>
                {
                    return Ok(());
                }
                TunnResult::Err(e) => last_error = format!("handshake failed: {e:?}"),
                _ => {}
            },
        }
    }
}

/// The port-forward transport: `n` port-forward streams to the gateway
/// pod's framed port, spoken directly by the data path through its
/// [`Links`] (one task per stream moves whole batches between the link and
/// the WebSocket). Each stream is reopened on its own when it breaks, and
/// all of them when the pod changes.
pub(super) struct PortForward {
    pub(super) pod: tokio::sync::watch::Sender<GatewayPod>,
    /// How many streams carry the tunnel.
    pub(super) streams: usize,
}

/// What `status` says the port-forward transport goes to.
pub(super) fn port_forward_endpoint(pod: &str, streams: usize) -> String {
    format!(
        "pod/{pod}:{} through the API server ({streams} streams)",
        burrow_api::FRAMED_PORT
    )
}

impl PortForward {
    pub(super) fn start(
        links: Arc<Links>,
        events: mpsc::Sender<LinkEvent>,
        cluster: Cluster,
        pod: GatewayPod,
        status: Arc<std::sync::Mutex<Status>>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let (pod_tx, pod_rx) = tokio::sync::watch::channel(pod);
        let counted: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        for i in 0..links.count() {
            // Inside the session's span: every line names the stream.
            let span = tracing::info_span!("stream", stream = i);
            tokio::spawn(
                stream_loop(Stream {
                    i,
                    links: links.clone(),
                    events: events.clone(),
                    cluster: cluster.clone(),
                    pod: pod_rx.clone(),
                    status: status.clone(),
                    counted: counted.clone(),
                    stop: stop.clone(),
                })
                .instrument(span),
            );
        }
        Self {
            pod: pod_tx,
            streams: links.count(),
        }
    }
}

struct Stream {
    i: usize,
    links: Arc<Links>,
    events: mpsc::Sender<LinkEvent>,
    cluster: Cluster,
    pod: tokio::sync::watch::Receiver<GatewayPod>,
    status: Arc<std::sync::Mutex<Status>>,
    /// When a reopen was last counted as a reconnect: the streams that
    /// break together (the API server restarted) count once.
    counted: Arc<std::sync::Mutex<Option<Instant>>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Reopens within this long of the last one counted are the same event.
const SAME_RECONNECT: Duration = Duration::from_secs(5);

async fn stream_loop(mut s: Stream) {
    // A stream that broke (not one closed for a pod change) is reopened
    // and counted as a reconnect.
    let mut broken: Option<String> = None;
    let i = s.i;
    loop {
        let current = s.pod.borrow_and_update().clone();
        let opened = tokio::select! {
            f = burrow_deploy::portforward::open_channel(&s.cluster, &current.namespace, &current.name, FRAMED_PORT) => f,
            _ = s.stop.wait_for(|s| *s) => return,
        };
        let (mut tx, mut rx) = match opened {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("port-forward to {}: {e}", current.name);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = s.stop.wait_for(|s| *s) => return,
                }
            }
        };
        tracing::info!(pod = %current.name, "port-forward stream open");
        s.links.set_live(i, true);
        if s.events.send(LinkEvent::Opened(i)).await.is_err() {
            return;
        }
        if let Some(reason) = broken.take() {
            count_reconnect(&s, &reason);
        }
        let up = async {
            while let Some(batch) = s.links.take(i).await {
                tx.send(batch).await?;
            }
            Err(std::io::Error::other(
                "it went out of step (a frame burrow cannot read)",
            ))
        };
        let down = async {
            loop {
                match rx.recv().await {
                    Received::Data(bytes) => {
                        if s.events.send(LinkEvent::Data(i, bytes)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Received::End(None) => return Ok(()),
                    Received::End(Some(e)) => return Err(std::io::Error::other(e)),
                }
            }
        };
        let mut pod_changed = s.pod.clone();
        let mut stop = s.stop.clone();
        let stopped = tokio::select! {
            r = up => {
                tracing::warn!("port-forward stream (send) ended: {r:?}");
                broken = Some(stream_end(r));
                false
            }
            r = down => {
                tracing::warn!("port-forward stream (receive) ended: {r:?}");
                broken = Some(stream_end(r));
                false
            }
            _ = pod_changed.changed() => {
                tracing::info!("gateway pod changed: reopening the port-forward");
                false
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        s.links.set_live(i, false);
        if stopped {
            tx.close().await;
            return;
        }
        let _ = s.events.send(LinkEvent::Closed(i)).await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = s.stop.wait_for(|s| *s) => return,
        }
    }
}

fn count_reconnect(s: &Stream, reason: &str) {
    let now = Instant::now();
    let fresh = s.counted.lock().is_ok_and(|mut last| {
        let fresh = last.is_none_or(|t| now.saturating_duration_since(t) > SAME_RECONNECT);
        if fresh {
            *last = Some(now);
        }
        fresh
    });
    if let Ok(mut st) = s.status.lock() {
        if fresh {
            st.reconnects += 1;
        }
        st.last_reconnect_error = Some(format!("port-forward stream reopened after: {reason}"));
    }
}

pub(super) fn stream_end(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "the stream was closed by the other end".into(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_window_stretches_for_a_gateway_just_ready() {
        let now = std::time::SystemTime::now();
        let s = NODEPORT_SETTLE;
        assert_eq!(udp_window(None, now, s), UDP_HANDSHAKE);
        assert_eq!(udp_window(Some(now), now, s), NODEPORT_SETTLE);
        let two = now - Duration::from_secs(2);
        assert_eq!(udp_window(Some(two), now, s), Duration::from_secs(4));
        let old = now - Duration::from_secs(3600);
        assert_eq!(udp_window(Some(old), now, s), UDP_HANDSHAKE);
        // The API server's clock ahead of ours: "just now", never longer.
        let ahead = now + Duration::from_secs(3600);
        assert_eq!(udp_window(Some(ahead), now, s), NODEPORT_SETTLE);
        // `--transport udp` waits longer for a NodePort just made.
        let asked = NODEPORT_SETTLE_ASKED;
        assert_eq!(
            udp_window(Some(two), now, asked),
            asked - Duration::from_secs(2)
        );
        assert_eq!(udp_window(Some(old), now, asked), UDP_HANDSHAKE);
    }
}
