//! What the data path exchanges with the rest of the gateway: requests
//! from other tasks ([`Command`], sent through a [`DatapathHandle`]), events
//! from flow tasks, the dialer thread and laptop streams ([`FlowEvent`]),
//! and what a laptop stream shares with it ([`ToCluster`], [`TcpShared`]).
//!
//! [`crate::laptop::LaptopStream`] backpressure, both ways:
//! - towards the laptop: the stream sends only as much as the data path
//!   granted ([`TcpShared::credit`]); grants follow free space in the
//!   flow's smoltcp send buffer, so nothing queues without bound.
//! - from the laptop: the data path pulls bytes out of smoltcp only while
//!   the stream's bounded queue has room; a full queue leaves them in
//!   smoltcp, whose window closes. When the stream frees a slot after the
//!   data path found the queue full, it says so ([`FlowEvent::Writable`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use burrow_api::WgKey;
use burrow_netstack::flow::FlowId;
pub use burrow_netstack::flow::IcmpKey;
use burrow_netstack::wg::{PeerConfig, PeerError};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::laptop::{LaptopDatagrams, LaptopStream};

/// Largest chunk moved between a laptop stream and the data path in one
/// message.
pub const CHUNK: usize = 64 * 1024;
/// Chunks queued towards one laptop stream before the data path stops
/// reading from smoltcp.
pub const TO_CLUSTER_QUEUE: usize = 4;

/// Requests to the data path from other tasks.
pub enum Command {
    /// Render the Prometheus exposition.
    Metrics(oneshot::Sender<String>),
    /// Add a peer (a laptop registering at runtime). A peer with the same
    /// key is replaced (its flows reset) when its address changed, and kept
    /// as is otherwise.
    AddPeer(PeerConfig, oneshot::Sender<Result<(), PeerError>>),
    /// Remove the peer with this public key; its TCP flows are reset.
    RemovePeer(WgKey),
    /// Time since each peer was last heard from (its latest authenticated
    /// datagram), by public key.
    LastHeard(oneshot::Sender<HashMap<WgKey, Duration>>),
    /// Open flows (TCP, UDP) of the laptop with this tunnel address.
    FlowsOf(IpAddr, oneshot::Sender<(usize, usize)>),
    /// Open a TCP connection to a laptop's tunnel address and port (see
    /// [`crate::laptop::LaptopDialer`]).
    DialLaptop {
        to: SocketAddr,
        reply: oneshot::Sender<io::Result<LaptopStream>>,
    },
    /// Open a UDP flow to a laptop's tunnel address and port (see
    /// [`crate::laptop::LaptopDialer::open_udp`]).
    OpenLaptopUdp {
        to: SocketAddr,
        reply: oneshot::Sender<io::Result<LaptopDatagrams>>,
    },
}

/// The control server's way into the data path task.
#[derive(Clone)]
pub struct DatapathHandle {
    pub tx: mpsc::Sender<Command>,
}

impl DatapathHandle {
    /// Opens TCP connections to registered laptops through the tunnel.
    pub fn dialer(&self) -> crate::laptop::LaptopDialer {
        crate::laptop::LaptopDialer::new(self.tx.clone())
    }

    /// Adds (or keeps) a peer with its one tunnel address.
    pub(crate) async fn add(&self, key: WgKey, address: IpAddr) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let config = PeerConfig::host(key.public_key(), address);
        self.tx
            .send(Command::AddPeer(config, reply))
            .await
            .map_err(|_| "the data path has stopped".to_string())?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the data path has stopped".to_string()),
        }
    }

    /// The Prometheus exposition; None once the data path has stopped.
    pub async fn metrics(&self) -> Option<String> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::Metrics(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Removes a peer; its flows are reset.
    pub(crate) async fn remove(&self, key: WgKey) {
        let _ = self.tx.send(Command::RemovePeer(key)).await;
    }

    /// Open (TCP, UDP) flows of the laptop at `address`.
    pub(crate) async fn flows_of(&self, address: IpAddr) -> Option<(usize, usize)> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Command::FlowsOf(address, reply)).await.ok()?;
        answer.await.ok()
    }

    /// Time since each peer was last heard from (an authenticated
    /// datagram: handshake, data or keepalive), by key.
    pub(crate) async fn last_heard(&self) -> HashMap<WgKey, Duration> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::LastHeard(reply)).await.is_err() {
            return HashMap::new();
        }
        answer.await.unwrap_or_default()
    }
}

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
