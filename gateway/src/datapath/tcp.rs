//! TCP flows both ways: those laptops open (a socket into the cluster,
//! dialled before the laptop's handshake completes), connections the
//! gateway opens to laptops and the laptops' own API connections (a
//! [`LaptopStream`] held by another task); moving their bytes, and
//! releasing them once both sides are done or one reset.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burrow_netstack::flow::{FlowId, Settled, TcpRead, TcpState};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::Datapath;
use super::inbox::{self, CHUNK, DialError, TcpShared, ToCluster};
use super::liveness::unreachable;
use super::metrics::dial_index;
use crate::cluster::{ClusterPoll, ClusterSocket, ReadOutcome, Readiness};
use crate::framed::{self, ConnId, FramedConn};
use crate::laptop::{ApiConn, LaptopStream};

/// A grant of send-buffer space smaller than this waits for more (fewer,
/// larger reads from the cluster socket).
pub(super) const MIN_GRANT: usize = 16 * 1024;

/// The engine-side half of a TCP flow.
pub(super) struct TcpFlow {
    /// The laptop's address and port.
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
    /// The other end: a socket into the cluster, or a laptop stream.
    pub(super) end: End,
    pub(super) accepted: bool,
    /// The laptop's FIN was passed on to the other end.
    pub(super) laptop_eof: bool,
    /// The cluster side closed; our FIN to the laptop is queued.
    pub(super) cluster_eof: bool,
    /// A connection the gateway is opening to the laptop, until the
    /// laptop answers.
    pub(super) connecting: Option<Connecting>,
    /// The flow's span, inside its laptop's ([`Datapath::flow_span`]).
    pub(super) span: Span,
    /// Bytes moved from the laptop to the other end, and back.
    pub(super) to_cluster: u64,
    pub(super) to_laptop: u64,
}

impl TcpFlow {
    fn new(src: SocketAddr, dst: SocketAddr, end: End, span: Span) -> Self {
        Self {
            src,
            dst,
            end,
            accepted: false,
            laptop_eof: false,
            cluster_eof: false,
            connecting: None,
            span,
            to_cluster: 0,
            to_laptop: 0,
        }
    }
}

/// Where a TCP flow's bytes go beyond smoltcp.
pub(super) enum End {
    /// A flow a laptop opened, while the dialer thread creates its socket:
    /// the socket's events that came first.
    Dialing(Readiness),
    /// A flow a laptop opened: the data path's own socket into the cluster
    /// (`None` once closed).
    Socket(Option<ClusterSocket>),
    /// A connection the gateway opened to a laptop: a [`LaptopStream`]
    /// held by another task, over channels.
    Stream(StreamEnd),
}

pub(super) struct StreamEnd {
    pub(super) to_cluster: mpsc::Sender<ToCluster>,
    pub(super) shared: Arc<TcpShared>,
    /// Credit granted to the stream and not yet come back as data.
    pub(super) granted: usize,
}

/// The waiting half of [`Command::DialLaptop`].
pub(super) struct Connecting {
    pub(super) reply: oneshot::Sender<io::Result<LaptopStream>>,
    /// The stream's end of the queue towards it.
    pub(super) from_laptop: mpsc::Receiver<ToCluster>,
    /// When the SYN went out.
    pub(super) started: Instant,
    pub(super) deadline: Instant,
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        let clean = self.laptop_eof && self.cluster_eof;
        if self.accepted {
            tracing::debug!(parent: &self.span, to_cluster = self.to_cluster, to_laptop = self.to_laptop,
                "flow closed{}", if clean { "" } else { " (reset)" });
        }
        // A flow dropped before both sides finished cleanly resets the
        // other end (a stream's sender dropping ends its reads).
        if !clean {
            match &self.end {
                End::Socket(Some(socket)) => socket.set_reset_on_close(),
                End::Socket(None) | End::Dialing(_) => {}
                End::Stream(stream) => stream.shared.abort(),
            }
        }
    }
}

impl Datapath {
    pub(super) fn open_tcp(&mut self, id: FlowId, src: SocketAddr, dst: SocketAddr) {
        if Some(dst.ip()) == self.cfg.tunnel_address {
            self.open_local(id, src, dst);
            return;
        }
        let span = self.flow_span(src.ip(), dst, src.port());
        tracing::debug!(parent: &span, "dialing");
        let end = if self.dialer.as_ref().is_some_and(|d| d.dial(id, dst)) {
            End::Dialing(Readiness::default())
        } else {
            let socket = match &self.registry {
                Some(registry) => ClusterSocket::connect(registry, id, dst),
                None => Err(io::Error::other("no epoll set for cluster sockets")),
            };
            match socket {
                Ok(socket) => End::Socket(Some(socket)),
                // Failed at once (e.g. no route): the same as failing later.
                Err(e) => {
                    self.dial_failed(id, &span, DialError::classify(&e), &e);
                    return;
                }
            }
        };
        self.tcp.insert(id, TcpFlow::new(src, dst, end, span));
        self.dialing
            .push_back((Instant::now() + self.cfg.dial_timeout, id));
    }

    /// A connection to the gateway's own tunnel address: the laptops' API
    /// on the control port, taken by the data path's own stack, with the
    /// identity of the peer that owns the source address (every packet's
    /// source was checked against its peer on the way in). Anything else
    /// there is refused: the gateway has no other service in the tunnel.
    pub(super) fn open_local(&mut self, id: FlowId, src: SocketAddr, dst: SocketAddr) {
        let key = self
            .peers
            .route(src.ip())
            .and_then(|p| self.peers.get(p))
            .map(|p| burrow_api::WgKey::from(p.public_key()));
        let permit = match (&self.api, key) {
            (Some(api), Some(_)) if dst.port() == burrow_api::CONTROL_PORT => {
                api.try_reserve().ok()
            }
            _ => None,
        };
        let span = self.flow_span(src.ip(), dst, src.port());
        let (Some(permit), Some(key)) = (permit, key) else {
            tracing::debug!(parent: &span, "refused: nothing listens on the gateway's tunnel address there");
            let _ = self.flows.refuse(id);
            return;
        };
        tracing::debug!(parent: &span, "the laptop's connection to the gateway's API");
        if let Err(e) = self.flows.accept(id, Instant::now()) {
            tracing::debug!(parent: &span, error = %e, "accept failed");
            return;
        }
        let (tx, rx) = mpsc::channel(inbox::TO_CLUSTER_QUEUE);
        let shared = Arc::new(TcpShared::default());
        let stream = LaptopStream::new(id, dst, src, shared.clone(), rx, self.events_tx.clone());
        let end = End::Stream(StreamEnd {
            to_cluster: tx,
            shared,
            granted: 0,
        });
        let mut flow = TcpFlow::new(src, dst, end, span);
        flow.accepted = true;
        self.tcp.insert(id, flow);
        permit.send(ApiConn {
            stream,
            key,
            from: src,
        });
    }

    /// Take the events of the cluster sockets and service their flows.
    pub(super) fn on_cluster_events(&mut self, poll: &mut ClusterPoll) {
        let mut ready = std::mem::take(&mut self.cluster_ready);
        let tcp = &mut self.tcp;
        let drained = poll.drain(|id, readiness| match tcp.get_mut(&id) {
            Some(TcpFlow {
                end: End::Socket(Some(socket)),
                ..
            }) => {
                socket.on_event(readiness);
                ready.push(id);
            }
            Some(TcpFlow {
                end: End::Dialing(early),
                ..
            }) => early.merge(readiness),
            _ => {}
        });
        if let Err(e) = drained {
            tracing::warn!(error = %e, "waiting on cluster sockets failed");
        }
        for id in ready.drain(..) {
            self.service_tcp(id);
        }
        self.cluster_ready = ready;
    }

    /// The deadline of the oldest dial still in progress. Settled dials
    /// are dropped from the front here (most settle within milliseconds):
    /// left queued, each would wake the loop at its old deadline.
    pub(super) fn next_dial_deadline(&mut self) -> Option<Instant> {
        while let Some(&(deadline, id)) = self.dialing.front() {
            let pending = self.tcp.get(&id).is_some_and(|f| {
                !f.accepted && matches!(f.end, End::Socket(Some(_)) | End::Dialing(_))
            });
            if pending {
                return Some(deadline);
            }
            self.dialing.pop_front();
        }
        None
    }

    /// Give up dials that outlived the dial timeout.
    pub(super) fn expire_dials(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.dialing.front() {
            if deadline > now {
                break;
            }
            self.dialing.pop_front();
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            if flow.accepted || !matches!(flow.end, End::Socket(Some(_)) | End::Dialing(_)) {
                continue;
            }
            // Closed quietly: nothing was established.
            flow.end = End::Socket(None);
            let span = flow.span.clone();
            self.tcp.remove(&id);
            self.dial_failed(id, &span, DialError::Timeout, &"no answer in time");
        }
    }

    /// The dialer thread's socket for a flow (see [`Dialer`]).
    pub(super) fn on_dialing(&mut self, id: FlowId, socket: io::Result<ClusterSocket>) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            // The flow went meanwhile (reset by the laptop, timed out).
            if let Ok(socket) = socket {
                socket.set_reset_on_close();
            }
            return;
        };
        let End::Dialing(early) = flow.end else {
            return;
        };
        match socket {
            Ok(mut socket) => {
                socket.on_event(early);
                flow.end = End::Socket(Some(socket));
                self.service_tcp(id);
            }
            Err(e) => self.forget_failed_dial(id, &e),
        }
    }

    /// Drop a flow whose dial failed (nothing was established: no RST to
    /// the cluster) and answer the laptop.
    pub(super) fn forget_failed_dial(&mut self, id: FlowId, e: &io::Error) {
        let Some(mut flow) = self.tcp.remove(&id) else {
            return;
        };
        flow.end = End::Socket(None);
        let span = flow.span.clone();
        drop(flow);
        self.dial_failed(id, &span, DialError::classify(e), e);
    }

    /// A dial into the cluster failed (the flow is no longer in the
    /// table): the laptop gets RST when it was refused, and nothing (its
    /// connect times out) otherwise.
    pub(super) fn dial_failed(
        &mut self,
        id: FlowId,
        span: &Span,
        e: DialError,
        why: &dyn std::fmt::Display,
    ) {
        self.stats.dial_errors[dial_index(e)] += 1;
        let answer = match e {
            DialError::Refused => "RST to the laptop",
            _ => "nothing to the laptop",
        };
        tracing::debug!(parent: span, error = e.label(), "dial failed ({why}): {answer}");
        let _ = match e {
            DialError::Refused => self.flows.refuse(id),
            _ => self.flows.discard(id),
        };
    }

    pub(super) fn abort_tcp(&mut self, id: FlowId) {
        if self.tcp.remove(&id).is_some() {
            // The RST leaves with the next egress; then the socket goes.
            self.flows.tcp_reset(id);
        }
    }

    pub(super) fn service_active(&mut self) {
        let mut active = std::mem::take(&mut self.active);
        self.flows.take_active(&mut active);
        for id in active.drain(..) {
            self.service_tcp(id);
        }
        self.active = active;
    }

    /// Move what can move for one TCP flow, and retire it once both sides
    /// are done (or it was reset).
    pub(super) fn service_tcp(&mut self, id: FlowId) {
        if self.tcp.get(&id).is_some_and(|f| f.connecting.is_some()) && !self.finish_connect(id) {
            return;
        }
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        if !flow.accepted {
            // A dial into the cluster: accept the laptop's SYN once it is
            // connected.
            let End::Socket(Some(socket)) = &mut flow.end else {
                return;
            };
            match socket.connect_result() {
                Ok(false) => return,
                Ok(true) => match self.flows.accept(id, Instant::now()) {
                    Ok(()) => {
                        flow.accepted = true;
                        self.stats.tcp_opened += 1;
                        tracing::debug!(parent: &flow.span, "connected: the laptop's SYN accepted");
                    }
                    Err(e) => {
                        tracing::debug!(parent: &flow.span, error = %e, "accept failed");
                        self.tcp.remove(&id);
                        return;
                    }
                },
                Err(e) => {
                    self.forget_failed_dial(id, &e);
                    return;
                }
            }
        }
        let Some(state) = self.flows.tcp_state(id) else {
            self.tcp.remove(&id);
            return;
        };
        let moved = match self
            .tcp
            .get(&id)
            .map(|f| matches!(f.end, End::Socket(_) | End::Dialing(_)))
        {
            Some(true) => self.pump_socket(id, state),
            Some(false) => self.pump_stream(id, state),
            None => false,
        };
        if !moved {
            return;
        }
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        // The release rules are the engine's (`FlowEngine::tcp_settle`).
        let done = flow.laptop_eof && flow.cluster_eof;
        match self.flows.tcp_settle(id, done) {
            Settled::Open => {}
            Settled::Closed => {
                self.tcp.remove(&id);
            }
            Settled::Reset => {
                tracing::debug!(parent: &flow.span, "flow reset by the laptop side");
                self.tcp.remove(&id);
            }
        }
    }

    /// Move bytes between smoltcp and the flow's cluster socket. False when
    /// the flow was reset (and is gone).
    pub(super) fn pump_socket(&mut self, id: FlowId, state: TcpState) -> bool {
        let Self {
            tcp,
            flows,
            stats,
            cfg,
            dialer,
            ..
        } = self;
        let Some(flow) = tcp.get_mut(&id) else {
            return false;
        };
        let End::Socket(slot) = &mut flow.end else {
            return true;
        };
        let mut failed = None;
        if let Some(socket) = slot.as_mut() {
            // Laptop → cluster: write what smoltcp holds while the socket
            // takes it (twice per pass at most: the ring may wrap).
            while !flow.laptop_eof {
                if !socket.is_writable() {
                    // Only notice the laptop's FIN (its bytes all written).
                    if flows.tcp_recv_with(id, |_| (0, ())) == Ok(None) {
                        flow.laptop_eof = true;
                    }
                    break;
                }
                match flows.tcp_recv_with(id, |data| socket.write_from(data)) {
                    Ok(Some(Ok(0))) | Err(_) => break,
                    Ok(Some(Ok(n))) => {
                        stats.tcp_bytes_to_cluster += n as u64;
                        flow.to_cluster += n as u64;
                    }
                    Ok(Some(Err(e))) => {
                        failed = Some(e);
                        break;
                    }
                    Ok(None) => flow.laptop_eof = true,
                }
            }
            // Cluster → laptop: read into smoltcp's send buffer while it
            // has room (not in dribbles: wait for a useful amount).
            let sending = matches!(state, TcpState::Established | TcpState::CloseWait);
            while failed.is_none() && sending && !flow.cluster_eof && socket.is_readable() {
                let room = flows.tcp_send_room(id).unwrap_or(0);
                if room < MIN_GRANT.min(cfg.tcp_buffer) {
                    break;
                }
                match flows.tcp_send_with(id, |buf| socket.read_into(buf)) {
                    Ok(ReadOutcome::Data(n)) => {
                        stats.tcp_bytes_to_laptop += n as u64;
                        flow.to_laptop += n as u64;
                    }
                    Ok(ReadOutcome::DataThenEof(n)) => {
                        stats.tcp_bytes_to_laptop += n as u64;
                        flow.to_laptop += n as u64;
                        flow.cluster_eof = true;
                    }
                    Ok(ReadOutcome::Eof) => flow.cluster_eof = true,
                    Ok(ReadOutcome::Blocked | ReadOutcome::NoRoom) | Err(_) => break,
                    Ok(ReadOutcome::Failed(e)) => failed = Some(e),
                }
                if flow.cluster_eof {
                    let _ = flows.tcp_close(id);
                }
            }
        }
        if let Some(e) = failed {
            tracing::debug!(parent: &flow.span, error = %e, "cluster socket failed");
            self.abort_tcp(id);
            return false;
        }
        // Pass the laptop's FIN on: close at once when the cluster side is
        // done too (FIN without a `shutdown` first), else half-close.
        if flow.laptop_eof
            && let Some(socket) = slot.as_mut()
        {
            if flow.cluster_eof {
                // By the dialer thread; without one, dropped (closed) here.
                if let (Some(socket), Some(dialer)) = (slot.take(), dialer.as_ref()) {
                    dialer.close(socket);
                }
            } else {
                socket.shutdown_write();
            }
        }
        true
    }

    /// Move bytes between smoltcp and a laptop stream's channels. False
    /// when the flow was reset (and is gone).
    pub(super) fn pump_stream(&mut self, id: FlowId, state: TcpState) -> bool {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return false;
        };
        let End::Stream(stream) = &mut flow.end else {
            return true;
        };
        // A laptop's connection to the gateway's own API is handed over at
        // its SYN; until the handshake completes there is nothing to move
        // (and smoltcp's "may not receive" there is not the laptop's FIN).
        if matches!(state, TcpState::SynReceived | TcpState::SynSent) {
            return true;
        }
        // Laptop → stream, while its queue has room.
        let mut orphaned_data = false;
        while !flow.laptop_eof {
            let queued = self.flows.tcp_recv_queue(id).unwrap_or(0);
            if queued == 0 && self.flows.tcp_recv(id, &mut []) != Ok(TcpRead::Eof) {
                break;
            }
            let permit = match stream.to_cluster.try_reserve() {
                Ok(p) => p,
                Err(TrySendError::Full(())) => {
                    stream.shared.engine_blocked.store(true, Ordering::Release);
                    // The stream may have drained in between: look again.
                    match stream.to_cluster.try_reserve() {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                }
                // Nobody reads any more (a dropped `LaptopStream`): data
                // is answered with RST, as a closed socket would.
                Err(TrySendError::Closed(())) => {
                    if queued > 0 {
                        orphaned_data = true;
                    } else {
                        flow.laptop_eof = true;
                    }
                    break;
                }
            };
            if queued == 0 {
                // CLOSED without the laptop's FIN seen: it reset the
                // connection. No EOF: the flow's removal fails the
                // stream's reads with `ConnectionReset`, which callers
                // tell from a clean close (nothing listening on the
                // laptop resets, see `httproute::NoAnswer`).
                if state == TcpState::Closed {
                    break;
                }
                permit.send(ToCluster::Eof);
                flow.laptop_eof = true;
                break;
            }
            let mut data = Vec::with_capacity(queued.min(CHUNK));
            match self.flows.tcp_recv_append(id, &mut data, CHUNK) {
                Ok(TcpRead::Data(n)) => {
                    self.stats.tcp_bytes_to_cluster += n as u64;
                    flow.to_cluster += n as u64;
                    permit.send(ToCluster::Data(data));
                }
                _ => break,
            }
        }
        if orphaned_data {
            self.abort_tcp(id);
            return false;
        }
        // Stream → laptop: grant the send buffer's free space.
        if !flow.cluster_eof && matches!(state, TcpState::Established | TcpState::CloseWait) {
            let room = self.flows.tcp_send_room(id).unwrap_or(0);
            let free = room.saturating_sub(stream.granted);
            if free >= MIN_GRANT.min(self.cfg.tcp_buffer) || (stream.granted == 0 && free > 0) {
                stream.granted += free;
                stream.shared.grant(free);
            }
        }
        true
    }

    /// A connection to a laptop: the gateway's tunnel address must be of
    /// the right family and some peer must own the address.
    pub(super) fn dial_laptop(
        &mut self,
        to: SocketAddr,
        reply: oneshot::Sender<io::Result<LaptopStream>>,
        conns: &HashMap<ConnId, FramedConn>,
        now: Instant,
    ) {
        let local_ip = match self.cfg.tunnel_address {
            Some(ip) if ip.is_ipv4() == to.is_ipv4() => ip,
            _ => {
                let _ = reply.send(Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("the gateway has no tunnel address to connect to {to} from"),
                )));
                return;
            }
        };
        let Some(peer) = self.peers.route(to.ip()).and_then(|p| self.peers.get(p)) else {
            self.stats.laptop_dials[3] += 1;
            let _ = reply.send(Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("no registered laptop has the tunnel address {}", to.ip()),
            )));
            return;
        };
        let heard = peer.last_received();
        let cut_off = peer
            .endpoint()
            .and_then(framed::addr_conn)
            .is_some_and(|c| !conns.contains_key(&c));
        if let Some(&since) = self.down.get(&to.ip()) {
            if heard.is_some_and(|h| h > since) {
                tracing::info!(parent: &self.laptop_span(to.ip()), laptop = %to.ip(), "laptop answering again: rerouted connections go to it");
                self.down.remove(&to.ip());
            } else {
                self.stats.laptop_dials[2] += 1;
                let _ = reply.send(Err(unreachable(to.ip())));
                return;
            }
        }
        if cut_off {
            self.mark_down(to.ip(), now, "its tunnel connection closed");
            self.stats.laptop_dials[2] += 1;
            let _ = reply.send(Err(unreachable(to.ip())));
            return;
        }
        let (id, local) = match self.flows.connect(local_ip, to) {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.send(Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("cannot connect to {to}: {e}"),
                )));
                return;
            }
        };
        // The laptop's port is the destination here, the gateway's the
        // source.
        let span = self.flow_span(to.ip(), to, local.port());
        tracing::debug!(parent: &span, "connecting to the laptop");
        let (tx, rx) = mpsc::channel(inbox::TO_CLUSTER_QUEUE);
        let end = End::Stream(StreamEnd {
            to_cluster: tx,
            shared: Arc::new(TcpShared::default()),
            granted: 0,
        });
        let mut flow = TcpFlow::new(to, local, end, span);
        flow.connecting = Some(Connecting {
            reply,
            from_laptop: rx,
            started: now,
            deadline: now + self.cfg.dial_timeout,
        });
        self.tcp.insert(id, flow);
        self.laptop_streams.insert(id, None);
    }

    /// Settle a connection to a laptop once the laptop answered (or did
    /// not in time). True when it is established and serviced as usual.
    pub(super) fn finish_connect(&mut self, id: FlowId) -> bool {
        let state = self.flows.tcp_state(id);
        let Some(flow) = self.tcp.get_mut(&id) else {
            return false;
        };
        let to = flow.src;
        let outcome = match state {
            Some(TcpState::SynSent | TcpState::SynReceived) => {
                if Instant::now()
                    < flow
                        .connecting
                        .as_ref()
                        .map_or(Instant::now(), |c| c.deadline)
                {
                    return false;
                }
                Err((2, io::ErrorKind::TimedOut, format!("{to} did not answer")))
            }
            Some(TcpState::Closed) | None => Err((
                1,
                io::ErrorKind::ConnectionRefused,
                format!("{to} refused the connection"),
            )),
            Some(_) => Ok(()),
        };
        let Some(connecting) = flow.connecting.take() else {
            return true;
        };
        match outcome {
            Ok(()) => {
                let End::Stream(end) = &flow.end else {
                    return false;
                };
                let stream = LaptopStream::new(
                    id,
                    flow.dst,
                    to,
                    end.shared.clone(),
                    connecting.from_laptop,
                    self.events_tx.clone(),
                );
                flow.accepted = true;
                self.stats.laptop_dials[0] += 1;
                tracing::debug!(parent: &flow.span, "connected to the laptop");
                // If the caller gave up waiting, the stream's drop closes it.
                let _ = connecting.reply.send(Ok(stream));
                true
            }
            Err((index, kind, message)) => {
                self.stats.laptop_dials[index] += 1;
                tracing::debug!(parent: &flow.span, %message, "connecting to the laptop failed");
                let _ = connecting.reply.send(Err(io::Error::new(kind, message)));
                if state == Some(TcpState::Closed) || state.is_none() {
                    self.tcp.remove(&id);
                    self.flows.release(id);
                } else {
                    self.abort_tcp(id);
                }
                false
            }
        }
    }
}
