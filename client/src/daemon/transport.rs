//! How the data path reaches the gateway: UDP to its NodePort when a
//! WireGuard handshake answers there (`auto`, `udp`), else WireGuard
//! datagrams length-framed over a port-forward stream, relayed by a
//! loopback socket (`Relay`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_api::FRAMED_PORT;
use burrow_deploy::Cluster;
use burrow_deploy::install::{self, GatewayPod};
use burrow_netstack::framing::{FrameDecoder, encode_frame};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::*;
use crate::protocol::{ConnectRequest, Progress, Status, Transport, step};

/// How the data path reaches the gateway.
pub(super) struct Chosen {
    pub(super) name: &'static str,
    pub(super) reason: String,
    /// Where the data path sends WireGuard datagrams.
    pub(super) endpoint: SocketAddr,
    /// For port-forward: the local relay's socket (the data path sends to
    /// it).
    pub(super) relay: Option<UdpSocket>,
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
                let window = udp_window(pod.ready_at, std::time::SystemTime::now());
                step(tx, format!("trying UDP to {endpoint}"));
                match udp_handshake(endpoint, key, gateway_key, window).await {
                    Ok(()) => {
                        return Ok(Chosen {
                            name: "udp",
                            reason: format!("the gateway answered a handshake at {endpoint}"),
                            endpoint,
                            relay: None,
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
    let relay = relay_socket()?;
    let endpoint = relay.local_addr()?;
    let reason = if why_not_udp.is_empty() {
        "asked for with --transport port-forward".to_owned()
    } else {
        why_not_udp
    };
    Ok(Chosen {
        name: "port-forward",
        reason,
        endpoint,
        relay: Some(relay),
    })
}

/// The port-forward relay's loopback socket. The data path sends it runs
/// of datagrams as one segmented message; this socket has no UDP_GRO, so
/// the kernel splits them and charges each datagram the run's memory: a
/// large receive buffer keeps a bulk upload from overflowing it.
pub(super) fn relay_socket() -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    UdpSocket::from_std(socket.into())
}

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
/// [`NODEPORT_SETTLE`] past the moment a just-started gateway turned
/// ready (a clock ahead of the API server's counts as "just now").
pub(super) fn udp_window(
    ready_at: Option<std::time::SystemTime>,
    now: std::time::SystemTime,
) -> Duration {
    let Some(ready_at) = ready_at else {
        return UDP_HANDSHAKE;
    };
    let age = now.duration_since(ready_at).unwrap_or(Duration::ZERO);
    NODEPORT_SETTLE
        .saturating_sub(age)
        .clamp(UDP_HANDSHAKE, NODEPORT_SETTLE)
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

/// The port-forward transport: a loopback UDP socket the data path sends
/// WireGuard datagrams to, relayed length-framed over a port-forward
/// stream to the gateway pod's framed port, and back. Reopens the stream
/// when it breaks or the pod changes.
pub(super) struct Relay {
    pub(super) pod: tokio::sync::watch::Sender<GatewayPod>,
}

impl Relay {
    pub(super) fn start(
        sock: UdpSocket,
        cluster: Cluster,
        pod: GatewayPod,
        status: Arc<std::sync::Mutex<Status>>,
        reset: Arc<std::sync::atomic::AtomicBool>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let (pod_tx, pod_rx) = tokio::sync::watch::channel(pod);
        tokio::spawn(relay_loop(
            Arc::new(sock),
            cluster,
            pod_rx,
            status,
            reset,
            stop,
        ));
        Self { pod: pod_tx }
    }
}

pub(super) async fn relay_loop(
    sock: Arc<UdpSocket>,
    cluster: Cluster,
    mut pod: tokio::sync::watch::Receiver<GatewayPod>,
    status: Arc<std::sync::Mutex<Status>>,
    reset: Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let peer: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
    // A stream that broke (not one closed for a pod change) is reopened
    // and counted as a reconnect.
    let mut broken: Option<String> = None;
    loop {
        let current = pod.borrow_and_update().clone();
        let fwd = tokio::select! {
            f = burrow_deploy::portforward::open(&cluster, &current.namespace, &current.name, FRAMED_PORT) => f,
            _ = stop.wait_for(|s| *s) => return,
        };
        let fwd = match fwd {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("port-forward to {}: {e}", current.name);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        tracing::info!(pod = %current.name, "port-forward transport open");
        if let Some(reason) = broken.take() {
            // A handshake right away on the new stream: an idle laptop
            // would otherwise send nothing until its next keepalive, and
            // the gateway closes a stream that carries no handshake soon.
            reset.store(true, std::sync::atomic::Ordering::Release);
            if let Ok(mut st) = status.lock() {
                st.reconnects += 1;
                st.last_reconnect_error =
                    Some(format!("port-forward stream reopened after: {reason}"));
            }
        }
        let (mut rd, mut wr) = tokio::io::split(fwd.stream);
        let up = {
            let sock = sock.clone();
            let peer = peer.clone();
            async move {
                let mut buf = vec![0u8; 65536];
                let mut framed = vec![0u8; 65536 + 2];
                loop {
                    let (n, from) = sock.recv_from(&mut buf).await?;
                    if let Ok(mut p) = peer.lock() {
                        *p = Some(from);
                    }
                    let Ok(len) = encode_frame(&buf[..n], &mut framed) else {
                        continue;
                    };
                    wr.write_all(&framed[..len]).await?;
                }
                #[allow(unreachable_code)]
                std::io::Result::Ok(())
            }
        };
        let down = {
            let sock = sock.clone();
            let peer = peer.clone();
            async move {
                let mut buf = vec![0u8; 65536];
                let mut decoder = FrameDecoder::new();
                loop {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        return std::io::Result::Ok(());
                    }
                    let mut input = &buf[..n];
                    let to = peer.lock().ok().and_then(|p| *p);
                    while let Some(frame) = decoder
                        .decode(&mut input)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                    {
                        if let Some(to) = to {
                            let _ = sock.send_to(frame, to).await;
                        }
                    }
                }
            }
        };
        tokio::select! {
            r = up => {
                tracing::warn!("port-forward transport (send) ended: {r:?}");
                broken = Some(stream_end(r));
            }
            r = down => {
                tracing::warn!("port-forward transport (receive) ended: {r:?}");
                broken = Some(stream_end(r));
            }
            _ = pod.changed() => tracing::info!("gateway pod changed: reopening the port-forward"),
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
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
        assert_eq!(udp_window(None, now), UDP_HANDSHAKE);
        assert_eq!(udp_window(Some(now), now), NODEPORT_SETTLE);
        let two = now - Duration::from_secs(2);
        assert_eq!(udp_window(Some(two), now), Duration::from_secs(4));
        let old = now - Duration::from_secs(3600);
        assert_eq!(udp_window(Some(old), now), UDP_HANDSHAKE);
        // The API server's clock ahead of ours: "just now", never longer.
        let ahead = now + Duration::from_secs(3600);
        assert_eq!(udp_window(Some(ahead), now), NODEPORT_SETTLE);
    }
}
