//! Tasks for the cluster side of UDP and ICMP flows, and what the data
//! path and a [`crate::laptop::LaptopStream`] (a connection the gateway
//! opened to a laptop) exchange. TCP flows the laptops open are serviced by
//! the data path itself ([`crate::cluster`]).
//!
//! [`crate::laptop::LaptopStream`] backpressure, both ways:
//! - towards the laptop: the stream sends only as much as the data path
//!   granted ([`TcpShared::credit`]); grants follow free space in the
//!   flow's smoltcp send buffer, so nothing queues without bound.
//! - from the laptop: the data path pulls bytes out of smoltcp only while
//!   the stream's bounded queue has room; a full queue leaves them in
//!   smoltcp, whose window closes. When the stream frees a slot after the
//!   data path found the queue full, it says so ([`FlowEvent::Writable`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burrow_netstack::flow::FlowId;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};

/// Largest chunk moved between a laptop stream and the data path in one
/// message.
pub const CHUNK: usize = 64 * 1024;
/// Chunks queued towards one laptop stream before the data path stops
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

    pub fn classify(e: &io::Error) -> Self {
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

/// What flow tasks and laptop streams tell the data path.
#[derive(Debug)]
pub enum FlowEvent {
    /// Bytes for the laptop, within the granted credit.
    TcpData { id: FlowId, data: Vec<u8> },
    /// The stream's side closed its sending half.
    TcpEof { id: FlowId },
    /// The stream's side was reset, or failed.
    TcpReset { id: FlowId },
    /// The stream drained its queue after the data path found it full.
    Writable { id: FlowId },
    /// The dialer thread started connecting a flow's cluster socket (or
    /// failed to).
    Dialing {
        id: FlowId,
        socket: io::Result<crate::cluster::ClusterSocket>,
    },
    /// A datagram from a UDP flow's destination.
    UdpReply { id: FlowId, data: Vec<u8> },
    /// A datagram for a laptop, on a UDP flow the gateway opened to it
    /// ([`crate::laptop::LaptopDatagrams`]).
    LaptopUdp { id: FlowId, data: Vec<u8> },
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

/// Bytes (or the end of them) from the laptop, for a laptop stream.
#[derive(Debug)]
pub enum ToCluster {
    Data(Vec<u8>),
    /// The laptop closed its sending half: shut down ours.
    Eof,
}

/// State shared between the data path and one [`crate::laptop::LaptopStream`].
#[derive(Default)]
pub struct TcpShared {
    /// Bytes the stream may still send towards the laptop.
    pub credit: AtomicUsize,
    /// Signalled when credit is granted or the flow is reset.
    pub wake: Notify,
    /// The data path found the queue to the task full.
    pub engine_blocked: AtomicBool,
    /// The flow was reset: the stream fails.
    pub reset: AtomicBool,
    /// Set before a reset: the laptop stopped answering (the stream fails
    /// with `HostUnreachable`, not `ConnectionReset`).
    pub unreachable: AtomicBool,
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
