//! The cluster side of TCP flows the laptops open: non-blocking sockets the
//! data path owns and services itself, with no task or channel per flow;
//! only `connect` and `close` run on a thread beside it ([`Dialer`]).
//!
//! The sockets sit in an epoll set of their own ([`ClusterPoll`], a
//! `mio::Poll`, edge-triggered) whose descriptor the data path waits on
//! beside its UDP socket. Bytes move between a socket and the flow's
//! smoltcp buffers directly: `write` from the receive buffer, `read` into
//! the send buffer. Whatever a socket does not take stays in smoltcp (the
//! laptop's window closes); nothing is read while the send buffer towards
//! the laptop is full. That is the backpressure, both ways.
//!
//! Per connection this costs `socket`, `connect`, one `epoll_ctl`,
//! `setsockopt(TCP_NODELAY)`, the reads and writes, and `shutdown` or
//! `close`: a short read after the peer's FIN was seen (`EPOLLRDHUP`) is
//! taken as the end without another `read`, and a socket whose both halves
//! are done is closed without `shutdown` first.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use burrow_netstack::flow::FlowId;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::datapath::FlowEvent;

/// Events taken from the epoll set per call.
const EVENTS: usize = 256;

/// The epoll set of the cluster sockets, as the data path waits on it.
pub struct ClusterPoll {
    fd: AsyncFd<Poll>,
    events: Events,
}

/// What one event said about a socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Readiness {
    readable: bool,
    writable: bool,
    read_closed: bool,
    error: bool,
}

impl Readiness {
    /// Add what a later event said.
    pub fn merge(&mut self, other: Readiness) {
        self.readable |= other.readable;
        self.writable |= other.writable;
        self.read_closed |= other.read_closed;
        self.error |= other.error;
    }
}

/// A thread that opens and closes cluster sockets for the data path.
///
/// `connect` on a local network does the whole handshake before it
/// returns (the SYN, the server's SYN-ACK and our ACK are processed inline,
/// on the caller's CPU), and `close` sends the FIN the same way: measured,
/// about 45 % of the data path's time per short connection. Here that work
/// runs beside the data path, which only moves bytes. The new socket is
/// registered in the data path's epoll set before it is handed back
/// ([`FlowEvent::Dialing`]), so its events may arrive first: the data path
/// keeps them until the socket does.
pub struct Dialer {
    jobs: std_mpsc::Sender<Job>,
}

enum Job {
    Dial { id: FlowId, dst: SocketAddr },
    Close(ClusterSocket),
}

impl Dialer {
    /// Start the thread. It ends when the `Dialer` is dropped.
    pub fn spawn(registry: Registry, events: mpsc::UnboundedSender<FlowEvent>) -> io::Result<Self> {
        let (jobs, queue) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("dialer".into())
            .spawn(move || {
                for job in queue {
                    match job {
                        Job::Dial { id, dst } => {
                            let socket = ClusterSocket::connect(&registry, id, dst);
                            if events.send(FlowEvent::Dialing { id, socket }).is_err() {
                                return;
                            }
                        }
                        Job::Close(socket) => drop(socket),
                    }
                }
            })?;
        Ok(Self { jobs })
    }

    /// Dial `dst` for flow `id`; false when the thread is gone.
    pub fn dial(&self, id: FlowId, dst: SocketAddr) -> bool {
        self.jobs.send(Job::Dial { id, dst }).is_ok()
    }

    /// Close a socket whose both halves are done (FIN, or RST if so set).
    pub fn close(&self, socket: ClusterSocket) {
        // A gone thread hands the socket back: close it here.
        if let Err(std_mpsc::SendError(Job::Close(socket))) = self.jobs.send(Job::Close(socket)) {
            drop(socket);
        }
    }
}

impl ClusterPoll {
    /// A new set, and the registry to add sockets to it with. Must be
    /// called inside the tokio runtime that will wait on it.
    pub fn new() -> io::Result<(Self, Registry)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the `Poll` owns its epoll descriptor, and nothing closes
        // or replaces it while the `AsyncFd` holds the `Poll`.
        let fd = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok((
            Self {
                fd,
                events: Events::with_capacity(EVENTS),
            },
            registry,
        ))
    }

    /// Wait until some socket in the set has an event.
    pub async fn ready(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Cleared before the events are taken: an event arriving while
        // they are being handled makes the set readable again.
        guard.clear_ready();
        Ok(())
    }

    /// Hand every pending event to `f`, by the flow its socket belongs to.
    pub fn drain(&mut self, mut f: impl FnMut(FlowId, Readiness)) -> io::Result<()> {
        loop {
            self.fd
                .get_mut()
                .poll(&mut self.events, Some(Duration::ZERO))?;
            let mut n = 0;
            for ev in &self.events {
                n += 1;
                let ready = Readiness {
                    readable: ev.is_readable(),
                    writable: ev.is_writable(),
                    read_closed: ev.is_read_closed(),
                    error: ev.is_error() || ev.is_write_closed(),
                };
                f(FlowId::from_u64(ev.token().0 as u64), ready);
            }
            if n < EVENTS {
                return Ok(());
            }
        }
    }
}

/// How a read into the flow's send buffer went.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Bytes read; there may be more.
    Data(usize),
    /// Bytes read, and they were the last: the peer's FIN follows them.
    DataThenEof(usize),
    /// The peer closed its sending half; nothing more will come.
    Eof,
    /// Nothing to read until the next event.
    Blocked,
    /// No room offered: the send buffer towards the laptop is full.
    NoRoom,
    Failed(io::Error),
}

/// One connection into the cluster, and what its events said so far
/// (edge-triggered: readable/writable hold until an operation would block).
#[derive(Debug)]
pub struct ClusterSocket {
    stream: TcpStream,
    connected: bool,
    readable: bool,
    writable: bool,
    /// The peer's FIN has arrived (it may still have bytes queued before it).
    read_closed: bool,
    error: bool,
    write_shut: bool,
}

impl ClusterSocket {
    /// Start connecting to `dst` (non-blocking) and add the socket to the
    /// set under `id`. An error here is the dial's outcome (e.g. no route).
    pub fn connect(registry: &Registry, id: FlowId, dst: SocketAddr) -> io::Result<Self> {
        let token = usize::try_from(id.as_u64())
            .map(Token)
            .map_err(|_| io::Error::other("flow id out of range for a poll token"))?;
        let mut stream = TcpStream::connect(dst)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Self {
            stream,
            connected: false,
            readable: false,
            writable: false,
            read_closed: false,
            error: false,
            write_shut: false,
        })
    }

    pub fn on_event(&mut self, ready: Readiness) {
        // (Also given the events that came before the socket did.)
        self.readable |= ready.readable || ready.read_closed;
        self.writable |= ready.writable;
        self.read_closed |= ready.read_closed;
        self.error |= ready.error;
    }

    /// The connect's outcome once an event told it: `Ok(true)` connected,
    /// `Ok(false)` not yet known, `Err` refused/unreachable/...
    pub fn connect_result(&mut self) -> io::Result<bool> {
        if self.connected {
            return Ok(true);
        }
        // A failed connect reports EPOLLERR/EPOLLHUP; the reason is in
        // SO_ERROR. (A server that answers and closes at once also shows
        // the FIN here, with no error.)
        if self.error || self.read_closed {
            match self.stream.take_error() {
                Ok(Some(e)) | Err(e) => return Err(e),
                Ok(None) => {}
            }
        }
        if !self.writable {
            // Unknown yet; the dial deadline bounds the wait.
            return Ok(false);
        }
        // Writable with no error: established. A proxy forwards whatever
        // it has at once; coalescing is the endpoints' business.
        self.connected = true;
        let _ = self.stream.set_nodelay(true);
        Ok(true)
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn is_readable(&self) -> bool {
        self.readable
    }

    /// Write what `data` holds; returns how many bytes the socket took
    /// (0: nothing offered, or the socket is full until its next event).
    pub fn write_from(&mut self, data: &[u8]) -> (usize, io::Result<usize>) {
        if data.is_empty() {
            return (0, Ok(0));
        }
        match (&self.stream).write(data) {
            Ok(n) => {
                if n < data.len() {
                    self.writable = false;
                }
                (n, Ok(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                (0, Ok(0))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Ok(0)),
            Err(e) => (0, Err(e)),
        }
    }

    /// Read into `buf` (free space of the flow's send buffer).
    pub fn read_into(&mut self, buf: &mut [u8]) -> (usize, ReadOutcome) {
        if buf.is_empty() {
            return (0, ReadOutcome::NoRoom);
        }
        match (&self.stream).read(buf) {
            Ok(0) => (0, ReadOutcome::Eof),
            // A short read after the FIN was seen drained everything
            // before it: the end, without another read to be told so.
            Ok(n) if n < buf.len() && self.read_closed => (n, ReadOutcome::DataThenEof(n)),
            Ok(n) => {
                if n < buf.len() {
                    self.readable = false;
                }
                (n, ReadOutcome::Data(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                (0, ReadOutcome::Blocked)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, ReadOutcome::Data(0)),
            Err(e) => (0, ReadOutcome::Failed(e)),
        }
    }

    /// Send FIN after what was written (the laptop closed its half); once.
    pub fn shutdown_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// Make the coming close a RST (the laptop's side was reset or failed).
    pub fn set_reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }
}
