//! The cluster side of each flow: one tokio task per flow owns the real
//! socket and talks to the data path task over channels.
//!
//! TCP backpressure, both ways:
//! - cluster → laptop: the task reads from its socket only as much as the
//!   data path granted ([`TcpShared::credit`]); grants follow free space in
//!   the flow's smoltcp send buffer, so nothing queues without bound.
//! - laptop → cluster: the data path pulls bytes out of smoltcp only while
//!   the task's bounded queue has room; a full queue leaves them in smoltcp,
//!   whose window closes. When the task frees a slot after the data path
//!   found the queue full, it says so ([`FlowEvent::Writable`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use burrow_netstack::flow::FlowId;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc};

/// Largest chunk moved between a socket and the data path in one message.
pub const CHUNK: usize = 64 * 1024;
/// Chunks queued towards one cluster socket before the data path stops
/// reading from smoltcp.
pub const TO_CLUSTER_QUEUE: usize = 4;

/// Why a dial failed, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialError {
    /// The destination answered RST: the laptop gets RST.
    Refused,
    /// No answer within the dial timeout: the laptop's connect times out.
    Timeout,
    /// No route / host unreachable: the laptop's connect times out.
    Unreachable,
    Other,
}

impl DialError {
    pub fn label(self) -> &'static str {
        match self {
            DialError::Refused => "refused",
            DialError::Timeout => "timeout",
            DialError::Unreachable => "unreachable",
            DialError::Other => "other",
        }
    }

    fn classify(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => DialError::Refused,
            io::ErrorKind::TimedOut => DialError::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                DialError::Unreachable
            }
            _ => DialError::Other,
        }
    }
}

/// What flow tasks tell the data path.
#[derive(Debug)]
pub enum FlowEvent {
    Dialed {
        id: FlowId,
        result: Result<(), DialError>,
    },
    /// Bytes from the cluster socket, within the granted credit.
    TcpData { id: FlowId, data: Vec<u8> },
    /// The cluster side closed its sending half.
    TcpEof { id: FlowId },
    /// The cluster side reset, or its socket failed.
    TcpReset { id: FlowId },
    /// The task drained its queue after the data path found it full.
    Writable { id: FlowId },
    /// A datagram from a UDP flow's destination.
    UdpReply { id: FlowId, data: Vec<u8> },
    /// An echo reply from an ICMP flow (ICMP header and data, as the kernel
    /// delivers them on a ping socket).
    IcmpReply { key: IcmpKey, data: Vec<u8> },
}

/// An ICMP echo "flow": laptop, destination, the laptop's identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpKey {
    pub laptop: std::net::IpAddr,
    pub remote: std::net::IpAddr,
    pub ident: u16,
}

/// Bytes (or the end of them) from the laptop, for the cluster socket.
#[derive(Debug)]
pub enum ToCluster {
    Data(Vec<u8>),
    /// The laptop closed its sending half: shut down ours.
    Eof,
}

/// State shared between the data path and one TCP flow task.
#[derive(Default)]
pub struct TcpShared {
    /// Bytes the task may still read from its socket.
    pub credit: AtomicUsize,
    /// Signalled when credit is granted or the flow is reset.
    pub wake: Notify,
    /// The data path found the queue to the task full.
    pub engine_blocked: AtomicBool,
    /// Reset the cluster socket and stop.
    pub reset: AtomicBool,
}

impl TcpShared {
    // Waiters create their `notified()` future before checking the state it
    // guards; `notify_waiters` reaches such futures even before they are
    // polled, so no wake-up is lost and both halves of a flow can wait on
    // the one `Notify`.
    pub fn grant(&self, n: usize) {
        self.credit.fetch_add(n, Ordering::AcqRel);
        self.wake.notify_waiters();
    }

    pub fn abort(&self) {
        self.reset.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    fn is_reset(&self) -> bool {
        self.reset.load(Ordering::Acquire)
    }
}

/// Resolves once `reset` is set.
async fn reset_signalled(shared: &TcpShared) {
    loop {
        let notified = shared.wake.notified();
        if shared.is_reset() {
            return;
        }
        notified.await;
    }
}

/// Dial `dst`, report, then pump bytes both ways until both halves are
/// closed or the flow is reset.
pub async fn tcp_flow(
    id: FlowId,
    dst: SocketAddr,
    dial_timeout: Duration,
    shared: Arc<TcpShared>,
    mut to_cluster: mpsc::Receiver<ToCluster>,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    let stream = match tokio::time::timeout(dial_timeout, TcpStream::connect(dst)).await {
        Err(_) => Err(DialError::Timeout),
        Ok(Err(e)) => {
            tracing::debug!(?id, %dst, error = %e, "dial failed");
            Err(DialError::classify(&e))
        }
        Ok(Ok(s)) => Ok(s),
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            let _ = events.send(FlowEvent::Dialed { id, result: Err(e) });
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if events
        .send(FlowEvent::Dialed { id, result: Ok(()) })
        .is_err()
    {
        return;
    }
    let (rd, mut wr) = stream.split();
    let reader = async {
        loop {
            let credit = loop {
                let notified = shared.wake.notified();
                if shared.is_reset() {
                    return false;
                }
                let c = shared.credit.load(Ordering::Acquire);
                if c > 0 {
                    break c;
                }
                notified.await;
            };
            // Wait for data before allocating, so an idle flow holds no
            // read buffer.
            let ready = tokio::select! {
                r = rd.readable() => r,
                _ = reset_signalled(&shared) => return false,
            };
            let mut buf = Vec::new();
            let read = ready.and_then(|()| {
                buf.reserve_exact(credit.min(CHUNK));
                rd.try_read_buf(&mut buf)
            });
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(0) => {
                    let _ = events.send(FlowEvent::TcpEof { id });
                    return true;
                }
                Ok(n) => {
                    shared.credit.fetch_sub(n, Ordering::AcqRel);
                    if events.send(FlowEvent::TcpData { id, data: buf }).is_err() {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::debug!(?id, %dst, error = %e, "cluster socket read failed");
                    let _ = events.send(FlowEvent::TcpReset { id });
                    shared.abort();
                    return false;
                }
            }
        }
    };
    let writer = async {
        loop {
            let msg = tokio::select! {
                m = to_cluster.recv() => m,
                _ = reset_signalled(&shared) => return false,
            };
            if shared.engine_blocked.swap(false, Ordering::AcqRel) {
                let _ = events.send(FlowEvent::Writable { id });
            }
            let result = match msg {
                Some(ToCluster::Data(data)) => tokio::select! {
                    r = wr.write_all(&data) => r,
                    _ = reset_signalled(&shared) => return false,
                },
                Some(ToCluster::Eof) => {
                    let _ = wr.shutdown().await;
                    return true;
                }
                // The data path forgot the flow without a FIN: reset.
                None => {
                    shared.abort();
                    return false;
                }
            };
            if let Err(e) = result {
                tracing::debug!(?id, %dst, error = %e, "cluster socket write failed");
                let _ = events.send(FlowEvent::TcpReset { id });
                shared.abort();
                return false;
            }
        }
    };
    let (read_ok, write_ok) = tokio::join!(reader, writer);
    if !(read_ok && write_ok) {
        // RST rather than FIN: the laptop's side was reset (or failed).
        let _ = stream.set_zero_linger();
    }
}

/// Receive a UDP flow's replies and hand them to the data path.
pub async fn udp_flow(
    id: FlowId,
    socket: Arc<UdpSocket>,
    max_payload: usize,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    // One more byte than fits, to recognise (and drop) datagrams too large
    // for the tunnel instead of truncating them.
    let mut buf = vec![0u8; max_payload + 1];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) if n <= max_payload => {
                let data = buf[..n].to_vec();
                if events.send(FlowEvent::UdpReply { id, data }).is_err() {
                    return;
                }
            }
            Ok(_) => tracing::debug!(?id, "UDP reply larger than the tunnel MTU dropped"),
            // A connected UDP socket reports ICMP port unreachable as
            // ECONNREFUSED on the next call; the flow stays usable.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(?id, error = %e, "UDP flow socket failed");
                return;
            }
        }
    }
}

/// Receive echo replies on a ping socket.
pub async fn icmp_flow(
    key: IcmpKey,
    socket: Arc<UdpSocket>,
    max_len: usize,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    let mut buf = vec![0u8; max_len + 1];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) if n <= max_len => {
                let data = buf[..n].to_vec();
                if events.send(FlowEvent::IcmpReply { key, data }).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(?key, error = %e, "ICMP socket failed");
                return;
            }
        }
    }
}
