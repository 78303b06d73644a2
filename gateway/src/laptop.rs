//! TCP connections the gateway opens *to* a laptop, through the tunnel:
//! the way a rerouted Service's traffic reaches the process on the laptop.
//!
//! [`LaptopDialer::connect`] asks the data path task to open a flow from the
//! gateway's own tunnel address to the laptop's (`FlowEngine::connect`); the
//! laptop's kernel answers on its TUN device like for any other peer. The
//! resulting [`LaptopStream`] is the flow's cluster-side end, in place of the
//! cluster socket the data path owns for flows laptops open
//! ([`crate::cluster`]), and it uses the same backpressure:
//! - gateway → laptop: `poll_write` takes only as many bytes as the data path
//!   granted ([`TcpShared::credit`], free space in the flow's smoltcp send
//!   buffer);
//! - laptop → gateway: the data path pulls from smoltcp only while the
//!   stream's bounded queue has room; a reader that stops reading closes
//!   the laptop's TCP window.
//!
//! Dropping a stream closes it like a kernel socket (FIN, or RST with
//! unread data); a flow whose stream is gone is reset after the engine's
//! `orphan_linger` at the latest. UDP flows to a laptop (rerouted UDP
//! ports) are [`LaptopDatagrams`] ([`LaptopDialer::open_udp`]). The laptop
//! must route the gateway's tunnel address into its TUN device (the
//! daemon does).
//!
//! Get a dialer from [`crate::datapath::DatapathHandle::dialer`] (the
//! control server's handle) or [`LaptopDialer::new`] with the data path's
//! control channel.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use burrow_api::WgKey;
use burrow_netstack::flow::FlowId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::datapath::Command;
use crate::datapath::inbox::CHUNK;
use crate::datapath::{FlowEvent, TcpShared, ToCluster};

/// Opens TCP connections to laptops through the tunnel. Cloneable; every
/// clone talks to the same data path.
#[derive(Clone)]
pub struct LaptopDialer {
    tx: mpsc::Sender<Command>,
}

impl LaptopDialer {
    /// A dialer for the data path that reads `tx`'s receiver (the
    /// `control_rx` of `Datapath::run`).
    pub fn new(tx: mpsc::Sender<Command>) -> Self {
        Self { tx }
    }

    /// Opens a TCP stream to `to` (a laptop's tunnel address and port)
    /// through the tunnel, from the gateway's tunnel address.
    ///
    /// Errors: the laptop answered RST → `ConnectionRefused`; no
    /// registered laptop has that address, or the laptop is not answering
    /// (see [`LAPTOP_PATIENCE`]) → `HostUnreachable`; no answer within the
    /// data path's dial timeout although the laptop is heard from →
    /// `TimedOut`; the gateway has no tunnel address of `to`'s family →
    /// `AddrNotAvailable`.
    ///
    /// A stream whose laptop stops answering fails its reads with
    /// `HostUnreachable`; one the laptop reset, with `ConnectionReset`.
    pub async fn connect(&self, to: SocketAddr) -> io::Result<LaptopStream> {
        let stopped = || io::Error::other("the gateway's data path has stopped");
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::DialLaptop { to, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl LaptopDialer {
    /// Opens a UDP flow to `to` (a laptop's tunnel address and port)
    /// through the tunnel, from the gateway's tunnel address and an
    /// ephemeral port. Errors as for [`LaptopDialer::connect`] (no laptop
    /// has the address → `HostUnreachable`); nothing is sent yet.
    pub async fn open_udp(&self, to: SocketAddr) -> io::Result<LaptopDatagrams> {
        let stopped = || io::Error::other("the gateway's data path has stopped");
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::OpenLaptopUdp { to, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// A UDP flow to a laptop, opened by [`LaptopDialer::open_udp`]: datagrams
/// go to the laptop with [`LaptopUdpSender::send`] (from
/// [`LaptopDatagrams::sender`]), the laptop's datagrams back come from
/// [`LaptopDatagrams::recv`]. Dropping it ends the flow (the data path
/// releases it within its 1 s sweep); so does the laptop unregistering
/// (`recv` then answers `None`).
pub struct LaptopDatagrams {
    local: SocketAddr,
    peer: SocketAddr,
    rx: mpsc::Receiver<Vec<u8>>,
    sender: LaptopUdpSender,
}

/// Sends datagrams on a [`LaptopDatagrams`] flow. Cloneable.
#[derive(Clone)]
pub struct LaptopUdpSender {
    id: FlowId,
    events: mpsc::UnboundedSender<FlowEvent>,
    /// Datagrams for laptops queued in `events`, across every flow.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    max_queued: usize,
}

impl LaptopDatagrams {
    pub(crate) fn new(
        id: FlowId,
        local: SocketAddr,
        peer: SocketAddr,
        rx: mpsc::Receiver<Vec<u8>>,
        events: mpsc::UnboundedSender<FlowEvent>,
        queued: Arc<std::sync::atomic::AtomicUsize>,
        max_queued: usize,
    ) -> Self {
        Self {
            local,
            peer,
            rx,
            sender: LaptopUdpSender {
                id,
                events,
                queued,
                max_queued,
            },
        }
    }

    /// The gateway's end: its tunnel address and the ephemeral port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The laptop's end.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn sender(&self) -> LaptopUdpSender {
        self.sender.clone()
    }

    /// The next datagram from the laptop; `None` once the flow is gone.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

impl LaptopUdpSender {
    /// Queues one datagram for the laptop; false when it was dropped (the
    /// data path has too many queued, or stopped). Datagrams larger than
    /// the tunnel MTU leave in IP fragments (`FlowEngine::udp_send`); only
    /// one larger than an IP packet carries is dropped.
    pub fn send(&self, datagram: &[u8]) -> bool {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let sent = self
            .events
            .send(FlowEvent::LaptopUdp {
                id: self.id,
                data: datagram.to_vec(),
            })
            .is_ok();
        if !sent {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }
}

impl std::fmt::Debug for LaptopDatagrams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaptopDatagrams")
            .field("id", &self.sender.id)
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// How long a laptop may leave the gateway waiting without a sign of life
/// (no datagram at all from its WireGuard peer: no ACK, SYN-ACK, handshake
/// or keepalive) while a connection to it waits — for its SYN-ACK, or for
/// the ACK of bytes sent — before the data path marks it down: its
/// pending dials fail and its streams fail with `HostUnreachable`, and
/// further dials fail at once until it is heard from again. A live laptop's
/// kernel ACKs within a round trip whatever its applications do (a server
/// stopped in a debugger included), so only a dead or cut-off laptop stays
/// silent; 1.5 s leaves room for a WireGuard handshake over a slow
/// port-forward and keeps fail-open under 2 s.
pub const LAPTOP_PATIENCE: std::time::Duration = std::time::Duration::from_millis(1500);

/// A connection a laptop opened to the gateway's own API in the tunnel
/// (see `Datapath::serve_api`): the stream, and who opened it.
pub struct ApiConn {
    pub stream: LaptopStream,
    /// The public key of the WireGuard peer that owns the source address:
    /// the caller's identity, authenticated by the tunnel.
    pub key: WgKey,
    pub from: SocketAddr,
}

/// A TCP connection to a laptop, opened by [`LaptopDialer::connect`].
///
/// `shutdown()` sends FIN after the data written so far; reading goes on
/// until the laptop closes its half. Dropping the stream closes it like a
/// kernel socket: RST when data from the laptop was left unread, else FIN
/// after everything written; more data from the laptop after that is
/// answered with RST, and a laptop that keeps its half open is reset after
/// a minute, so no flow outlives its stream for long.
pub struct LaptopStream {
    id: FlowId,
    local: SocketAddr,
    peer: SocketAddr,
    shared: Arc<TcpShared>,
    from_laptop: mpsc::Receiver<ToCluster>,
    events: mpsc::UnboundedSender<FlowEvent>,
    /// The chunk being read and how far.
    chunk: Vec<u8>,
    chunk_pos: usize,
    read_eof: bool,
    write_shut: bool,
    /// Parked until the data path grants credit (or resets the flow).
    credit_wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl LaptopStream {
    pub(crate) fn new(
        id: FlowId,
        local: SocketAddr,
        peer: SocketAddr,
        shared: Arc<TcpShared>,
        from_laptop: mpsc::Receiver<ToCluster>,
        events: mpsc::UnboundedSender<FlowEvent>,
    ) -> Self {
        Self {
            id,
            local,
            peer,
            shared,
            from_laptop,
            events,
            chunk: Vec::new(),
            chunk_pos: 0,
            read_eof: false,
            write_shut: false,
            credit_wait: None,
        }
    }

    /// The gateway's end: its tunnel address and the ephemeral port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The laptop's end, as dialled.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn reset_error(&self) -> io::Error {
        if self.shared.unreachable.load(Ordering::Acquire) {
            return io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("the laptop at {} stopped answering", self.peer.ip()),
            );
        }
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("the connection to {} was reset", self.peer),
        )
    }

    /// After taking a message off the queue: if the data path found it full
    /// and stopped pulling from smoltcp, tell it there is room again.
    fn took_from_queue(&self) {
        if self.shared.engine_blocked.swap(false, Ordering::AcqRel) {
            let _ = self.events.send(FlowEvent::Writable { id: self.id });
        }
    }
}

impl AsyncRead for LaptopStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.chunk_pos < this.chunk.len() {
                let n = buf.remaining().min(this.chunk.len() - this.chunk_pos);
                buf.put_slice(&this.chunk[this.chunk_pos..this.chunk_pos + n]);
                this.chunk_pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.from_laptop.poll_recv(cx)) {
                Some(ToCluster::Data(data)) => {
                    this.chunk = data;
                    this.chunk_pos = 0;
                    this.took_from_queue();
                }
                Some(ToCluster::Eof) => {
                    this.read_eof = true;
                    this.took_from_queue();
                }
                // The data path forgot the flow without an EOF: reset.
                None => return Poll::Ready(Err(this.reset_error())),
            }
        }
    }
}

impl AsyncWrite for LaptopStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let credit = loop {
            if this.shared.reset.load(Ordering::Acquire) {
                this.credit_wait = None;
                return Poll::Ready(Err(this.reset_error()));
            }
            let credit = this.shared.credit.load(Ordering::Acquire);
            if credit > 0 {
                this.credit_wait = None;
                break credit;
            }
            // The waiter registers on its first poll; the check above is
            // repeated after that, so a grant in between is not missed.
            let wait = this.credit_wait.get_or_insert_with(|| {
                let shared = this.shared.clone();
                Box::pin(async move { shared.wake.notified().await })
            });
            if wait.as_mut().poll(cx).is_ready() {
                this.credit_wait = None;
                continue;
            }
            let (credit, reset) = (
                this.shared.credit.load(Ordering::Acquire),
                this.shared.reset.load(Ordering::Acquire),
            );
            if credit == 0 && !reset {
                return Poll::Pending;
            }
        };
        let n = credit.min(buf.len()).min(CHUNK);
        this.shared.credit.fetch_sub(n, Ordering::AcqRel);
        let data = buf[..n].to_vec();
        if this
            .events
            .send(FlowEvent::TcpData { id: this.id, data })
            .is_err()
        {
            return Poll::Ready(Err(io::Error::other("the gateway's data path has stopped")));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are with the data path already.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_shut {
            this.write_shut = true;
            let _ = this.events.send(FlowEvent::TcpEof { id: this.id });
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LaptopStream {
    /// Like closing a kernel socket: unread data from the laptop → RST;
    /// otherwise FIN after what was written (if `shutdown` did not send it
    /// already), and RST if the laptop sends more later (the data path
    /// sees nobody reading), or if it keeps its half open too long.
    fn drop(&mut self) {
        // Only bytes count as unread: a FIN still queued (the reader was
        // done before it arrived, e.g. an HTTP server after a
        // `Connection: close` request) is a clean close.
        let mut unread = self.chunk_pos < self.chunk.len();
        while let Ok(item) = self.from_laptop.try_recv() {
            match item {
                ToCluster::Data(d) => unread |= !d.is_empty(),
                ToCluster::Eof => self.read_eof = true,
            }
        }
        if unread {
            let _ = self.events.send(FlowEvent::TcpReset { id: self.id });
        } else if !self.write_shut {
            let _ = self.events.send(FlowEvent::TcpEof { id: self.id });
        }
    }
}

impl std::fmt::Debug for LaptopStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaptopStream")
            .field("id", &self.id)
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}
