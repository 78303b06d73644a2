//! The data path task: the single owner of the sans-IO state (the peer
//! table and the flow engine). It reads WireGuard datagrams from the UDP
//! socket (batched) and from framed connections, feeds them through
//! [`Peers`] and [`FlowEngine`], starts a task per flow for the cluster side
//! ([`crate::dialer`]), and sends what the engine emits back to the laptops.
//!
//! One loop iteration: wait for input (UDP readable, framed bytes, flow
//! events, a timer), take everything queued without waiting again, then
//! service the flows that changed, run timers, collect egress and flush the
//! batched output once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use burrow_netstack::flow::{
    FlowConfig, FlowEngine, FlowError, FlowId, Ingress, IngressDrop, LaptopLimits, Limit, TcpRead,
    TcpState,
};
use burrow_netstack::udp_batch::{RecvBatch, SendBatch};
use burrow_netstack::wg::{
    self, DATA_OVERHEAD, Decapsulated, Encapsulated, MIN_BUFFER, PeerConfig, PeerError, Peers,
};
use burrow_netstack::wire::{self, PROTO_ICMP};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cluster::{ClusterPoll, ClusterSocket, Dialer, ReadOutcome, Readiness};
use crate::config::short_key;
use crate::dialer::{self, CHUNK, DialError, FlowEvent, IcmpKey, TcpShared, ToCluster};
use crate::framed::{self, ConnId, FramedConn, FramedEvent};
use crate::laptop::{ApiConn, LAPTOP_PATIENCE, LaptopDatagrams, LaptopStream};
use crate::metrics::Exposition;

/// boringtun's timers want a call about every 250 ms.
const WG_TIMER_TICK: Duration = Duration::from_millis(250);
/// Sweeps for closed TCP flows and idle UDP/ICMP flows.
const SWEEP_TICK: Duration = Duration::from_secs(1);
const ICMP_IDLE: Duration = Duration::from_secs(30);
/// A TCP flow whose cluster-side end is gone (a dropped `LaptopStream`, a
/// finished flow task) is reset if it has not closed after this long, as a
/// kernel bounds an orphaned socket's FIN-WAIT-2 (`tcp_fin_timeout`).
const ORPHAN_LINGER: Duration = Duration::from_secs(60);
/// A grant of send-buffer space smaller than this waits for more (fewer,
/// larger reads from the cluster socket).
const MIN_GRANT: usize = 16 * 1024;
/// Receive slot per datagram: above any sane tunnel MTU plus WireGuard
/// overhead; larger datagrams are dropped as truncated.
const RECV_SLOT: usize = 4096;
/// Items taken from a channel per wake-up before egress runs.
const DRAIN_LIMIT: usize = 256;

/// Tunables of the data path.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub mtu: usize,
    pub dial_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub tcp_buffer: usize,
    /// The gateway's own tunnel address: the source of connections it
    /// opens to laptops ([`Control::DialLaptop`]). `serve` fills it in
    /// from the control API's tunnel network.
    pub tunnel_address: Option<IpAddr>,
    /// Caps on the flows one laptop opens.
    pub per_laptop: LaptopLimits,
    /// Bounds on the framed-TCP port's connections (`serve` hands them to
    /// [`framed::accept_loop`]).
    pub framed: framed::Limits,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            mtu: 1420,
            dial_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(60),
            // Socket buffers cost only the pages bytes touch (see
            // burrow_netstack's slots), so idle flows stay cheap. 256 KiB
            // roughly doubled a single stream over 64 KiB once the UDP
            // path was segmented (BENCHMARKS.md); 1 MiB added ~10 % more.
            tcp_buffer: 256 * 1024,
            tunnel_address: None,
            per_laptop: LaptopLimits::default(),
            framed: framed::Limits::default(),
        }
    }
}

/// Requests to the data path from other tasks.
pub enum Control {
    /// Render the Prometheus exposition.
    Metrics(oneshot::Sender<String>),
    /// Add a peer (a laptop registering at runtime). A peer with the same
    /// key is replaced (its flows reset) when its address changed, and kept
    /// as is otherwise.
    AddPeer(PeerConfig, oneshot::Sender<Result<(), PeerError>>),
    /// Remove the peer with this public key; its TCP flows are reset.
    RemovePeer([u8; 32]),
    /// Time since each peer's last handshake, by public key.
    LastHandshakes(oneshot::Sender<HashMap<[u8; 32], Duration>>),
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

/// Datagrams for laptops on the UDP flows the gateway opened, queued in
/// the flow event channel and not yet sent, at most (beyond: dropped, as a
/// full socket buffer would).
const LAPTOP_UDP_QUEUED: usize = 4096;
/// Datagrams from a laptop waiting for the reader of a UDP flow the
/// gateway opened, at most per flow (beyond: dropped).
const LAPTOP_UDP_QUEUE: usize = 64;

/// The data path's end of a UDP flow the gateway opened to a laptop.
struct LaptopUdpEnd {
    /// The laptop's tunnel address and port.
    laptop: SocketAddr,
    /// Datagrams from the laptop, to the flow's [`LaptopDatagrams`].
    tx: mpsc::Sender<Vec<u8>>,
}

/// Counters the data path keeps beyond the peer table's own.
#[derive(Default)]
struct Stats {
    tcp_opened: u64,
    udp_opened: u64,
    icmp_opened: u64,
    tcp_bytes_to_cluster: u64,
    tcp_bytes_to_laptop: u64,
    udp_bytes_to_cluster: u64,
    udp_bytes_to_laptop: u64,
    dial_errors: [u64; 4],
    udp_rx: u64,
    udp_tx: u64,
    framed_rx: u64,
    framed_tx: u64,
    framed_opened: u64,
    drop_malformed: u64,
    drop_fragment: u64,
    drop_unsupported: u64,
    drop_pending_syns: u64,
    drop_icmp_not_permitted: u64,
    drop_udp_send_full: u64,
    drop_framed_backlog: u64,
    drop_too_large: u64,
    /// Connections to laptops: established, refused, timed out, no such
    /// laptop.
    laptop_dials: [u64; 4],
    /// New flows refused by a laptop's caps, by [`Limit::ALL`] order.
    refused: [u64; 3],
}

/// The engine-side half of a TCP flow.
struct TcpFlow {
    /// The laptop's address and port.
    src: SocketAddr,
    dst: SocketAddr,
    /// The other end: a socket into the cluster, or a laptop stream.
    end: End,
    accepted: bool,
    /// The laptop's FIN was passed on to the other end.
    laptop_eof: bool,
    /// The cluster side closed; our FIN to the laptop is queued.
    cluster_eof: bool,
    /// A connection the gateway is opening to the laptop, until the
    /// laptop answers.
    connecting: Option<Connecting>,
    /// When the sweep first found the cluster-side end gone.
    orphaned_at: Option<Instant>,
}

/// Where a TCP flow's bytes go beyond smoltcp.
enum End {
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

struct StreamEnd {
    to_cluster: mpsc::Sender<ToCluster>,
    shared: Arc<TcpShared>,
    /// Credit granted to the stream and not yet come back as data.
    granted: usize,
}

/// The waiting half of [`Control::DialLaptop`].
struct Connecting {
    reply: oneshot::Sender<io::Result<LaptopStream>>,
    /// The stream's end of the queue towards it.
    from_laptop: mpsc::Receiver<ToCluster>,
    /// When the SYN went out.
    started: Instant,
    deadline: Instant,
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        // A flow dropped before both sides finished cleanly resets the
        // other end (a stream's sender dropping ends its reads).
        if !(self.laptop_eof && self.cluster_eof) {
            match &self.end {
                End::Socket(Some(socket)) => socket.set_reset_on_close(),
                End::Socket(None) | End::Dialing(_) => {}
                End::Stream(stream) => stream.shared.abort(),
            }
        }
    }
}

/// A UDP or ICMP flow's socket and its receive task.
struct DatagramFlow {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
    last_active: Instant,
}

impl Drop for DatagramFlow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where encrypted datagrams go: the UDP socket (batched) or a framed
/// connection's output buffer.
struct Output {
    udp: UdpSocket,
    batch: SendBatch,
    conns: HashMap<ConnId, FramedConn>,
    /// Connections written to since the last flush.
    dirty: Vec<ConnId>,
}

impl Output {
    /// Send a datagram that already sits in some buffer.
    fn send(&mut self, to: SocketAddr, datagram: &[u8], stats: &mut Stats) {
        if let Some(conn) = framed::addr_conn(to) {
            Self::push_framed(&mut self.conns, &mut self.dirty, conn, datagram, stats);
            return;
        }
        if self.batch.is_full() {
            self.flush_udp(stats);
        }
        let slot = self.batch.slot();
        let Some(dst) = slot.get_mut(..datagram.len()) else {
            stats.drop_too_large += 1;
            return;
        };
        dst.copy_from_slice(datagram);
        self.batch.commit(datagram.len(), to);
        stats.udp_tx += 1;
    }

    /// Encrypt an IP packet for the laptop it is addressed to and send it;
    /// UDP datagrams are encrypted straight into the send batch.
    fn encapsulate(&mut self, peers: &mut Peers, packet: &[u8], stats: &mut Stats) {
        if self.batch.is_full() {
            self.flush_udp(stats);
        }
        let Output {
            batch,
            conns,
            dirty,
            ..
        } = self;
        let slot = batch.slot();
        let slot_start = slot.as_ptr();
        if let Encapsulated::Send { to, datagram, .. } = peers.encapsulate(packet, slot) {
            if let Some(conn) = framed::addr_conn(to) {
                Self::push_framed(conns, dirty, conn, datagram, stats);
            } else if datagram.as_ptr() == slot_start {
                let len = datagram.len();
                batch.commit(len, to);
                stats.udp_tx += 1;
            }
        }
        // Drops are counted by the peer table.
    }

    fn push_framed(
        conns: &mut HashMap<ConnId, FramedConn>,
        dirty: &mut Vec<ConnId>,
        conn: ConnId,
        datagram: &[u8],
        stats: &mut Stats,
    ) {
        let Some(c) = conns.get(&conn) else {
            stats.drop_framed_backlog += 1;
            return;
        };
        if c.out.push(datagram) {
            stats.framed_tx += 1;
            if !dirty.contains(&conn) {
                dirty.push(conn);
            }
        } else {
            stats.drop_framed_backlog += 1;
        }
    }

    fn flush_udp(&mut self, stats: &mut Stats) {
        if self.batch.is_empty() {
            return;
        }
        // Counted before: flush reports the ones the kernel refused.
        let dropped = self.batch.flush(&self.udp);
        stats.drop_udp_send_full += dropped as u64;
    }

    fn flush(&mut self, stats: &mut Stats) {
        self.flush_udp(stats);
        for conn in self.dirty.drain(..) {
            if let Some(c) = self.conns.get(&conn) {
                c.out.flush();
            }
        }
    }
}

/// The data path. Build with [`Datapath::new`], then [`Datapath::run`].
pub struct Datapath {
    cfg: DatapathConfig,
    peers: Peers,
    flows: FlowEngine,
    tcp: HashMap<FlowId, TcpFlow>,
    udp: HashMap<FlowId, DatagramFlow>,
    icmp: HashMap<IcmpKey, DatagramFlow>,
    /// `Some(false)` once the kernel refused a ping socket.
    icmp_permitted: Option<bool>,
    events_tx: mpsc::UnboundedSender<FlowEvent>,
    events_rx: Option<mpsc::UnboundedReceiver<FlowEvent>>,
    stats: Stats,
    decap: Vec<u8>,
    timer_buf: Vec<u8>,
    active: Vec<FlowId>,
    release_after_egress: Vec<FlowId>,
    /// Adds cluster sockets to the data path's epoll set (set by `run`).
    registry: Option<mio::Registry>,
    /// Opens and closes cluster sockets off the data path's thread (set
    /// by `run`; without it, the data path does that itself).
    dialer: Option<Dialer>,
    /// Flows dialing into the cluster, by deadline (one timeout for all,
    /// so in order); entries of flows settled since are dropped when they
    /// reach the front.
    dialing: VecDeque<(Instant, FlowId)>,
    /// Flows whose cluster socket had an event.
    cluster_ready: Vec<FlowId>,
    /// Where connections to the gateway's own tunnel address and
    /// [`burrow_api::CONTROL_PORT`] go (the laptops' API, served by
    /// [`crate::control`]); None refuses them.
    api: Option<mpsc::Sender<ApiConn>>,
    /// The framed port's refusals and timeouts (counted by its tasks).
    framed_counters: Arc<framed::Counters>,
    /// UDP flows the gateway opened to laptops (rerouted UDP ports).
    laptop_udp: HashMap<FlowId, LaptopUdpEnd>,
    /// Datagrams for them queued in the event channel.
    laptop_udp_queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections the gateway opened to laptops, and since when each has
    /// had bytes towards its laptop waiting for an ACK (see
    /// [`Datapath::check_laptops`]).
    laptop_streams: HashMap<FlowId, Option<Instant>>,
    /// Laptops found not answering, by tunnel address, and since when:
    /// dials to them fail at once until they are heard from again.
    down: HashMap<IpAddr, Instant>,
}

impl Datapath {
    pub fn new(
        private_key: StaticSecret,
        peers: Vec<PeerConfig>,
        cfg: DatapathConfig,
    ) -> Result<Self, PeerError> {
        let mut table = Peers::new(private_key);
        for p in peers {
            table.add(p)?;
        }
        let now = Instant::now();
        let flows = FlowEngine::new(
            FlowConfig {
                mtu: cfg.mtu,
                tcp_rx_buffer: cfg.tcp_buffer,
                tcp_tx_buffer: cfg.tcp_buffer,
                udp_idle_timeout: cfg.udp_idle_timeout,
                per_laptop: cfg.per_laptop,
                random_seed: rand::random(),
                ..FlowConfig::default()
            },
            now,
        );
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Self {
            peers: table,
            flows,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            icmp: HashMap::new(),
            icmp_permitted: None,
            events_tx,
            events_rx: Some(events_rx),
            stats: Stats::default(),
            // Frames can be up to 64 KiB; UDP datagrams up to RECV_SLOT.
            decap: vec![0; framing_max() + MIN_BUFFER],
            timer_buf: vec![0; MIN_BUFFER.max(cfg.mtu + DATA_OVERHEAD)],
            active: Vec::new(),
            release_after_egress: Vec::new(),
            registry: None,
            dialer: None,
            dialing: VecDeque::new(),
            cluster_ready: Vec::new(),
            api: None,
            framed_counters: Arc::default(),
            laptop_udp: HashMap::new(),
            laptop_udp_queued: Arc::default(),
            laptop_streams: HashMap::new(),
            down: HashMap::new(),
            cfg,
        })
    }

    /// Hand connections laptops open to the gateway's tunnel address and
    /// the control port to `tx`, each with the WireGuard peer it came from.
    pub fn serve_api(&mut self, tx: mpsc::Sender<ApiConn>) {
        self.api = Some(tx);
    }

    pub fn public_key(&self) -> &boringtun::x25519::PublicKey {
        self.peers.public_key()
    }

    /// Where the framed port's tasks count refusals and timeouts (rendered
    /// with the data path's metrics).
    pub fn framed_counters(&self) -> Arc<framed::Counters> {
        self.framed_counters.clone()
    }

    /// Run until `shutdown` resolves.
    pub async fn run(
        mut self,
        udp: UdpSocket,
        mut framed_rx: mpsc::Receiver<FramedEvent>,
        mut control_rx: mpsc::Receiver<Control>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let Some(mut events_rx) = self.events_rx.take() else {
            return;
        };
        let mut cluster = match ClusterPoll::new() {
            Ok((poll, registry)) => {
                self.dialer = dialer_thread(&registry, &self.events_tx);
                self.registry = Some(registry);
                Some(poll)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create the cluster sockets' epoll set; TCP flows will fail");
                None
            }
        };
        let slot = self.cfg.mtu + DATA_OVERHEAD + 64;
        let mut out = Output {
            udp,
            batch: SendBatch::new(slot.max(MIN_BUFFER)),
            conns: HashMap::new(),
            dirty: Vec::new(),
        };
        let mut recv = RecvBatch::for_socket(&out.udp, RECV_SLOT);
        let start = Instant::now();
        let mut next_timers = start + WG_TIMER_TICK;
        let mut next_sweep = start + SWEEP_TICK;
        let mut control_open = true;
        loop {
            let now = Instant::now();
            let mut deadline = next_timers.min(next_sweep);
            if let Some(d) = self.flows.poll_delay(now) {
                deadline = deadline.min(now + d);
            }
            if let Some(d) = self.next_dial_deadline() {
                deadline = deadline.min(d);
            }
            tokio::select! {
                _ = &mut shutdown => break,
                r = out.udp.readable() => {
                    if r.is_ok() {
                        self.drain_udp(&mut out, &mut recv);
                    }
                }
                r = async { cluster.as_ref()?.ready().await.ok() }, if cluster.is_some() => {
                    if let (Some(()), Some(poll)) = (r, cluster.as_mut()) {
                        self.on_cluster_events(poll);
                    }
                }
                Some(ev) = framed_rx.recv() => {
                    self.on_framed(&mut out, ev);
                    for _ in 0..DRAIN_LIMIT {
                        let Ok(ev) = framed_rx.try_recv() else { break };
                        self.on_framed(&mut out, ev);
                    }
                }
                Some(ev) = events_rx.recv() => {
                    self.on_flow_event(&mut out, ev);
                    for _ in 0..DRAIN_LIMIT {
                        let Ok(ev) = events_rx.try_recv() else { break };
                        self.on_flow_event(&mut out, ev);
                    }
                }
                c = control_rx.recv(), if control_open => match c {
                    Some(Control::Metrics(reply)) => {
                        let _ = reply.send(self.render_metrics(&out));
                    }
                    Some(Control::AddPeer(config, reply)) => {
                        let _ = reply.send(self.add_peer(config));
                    }
                    Some(Control::RemovePeer(key)) => self.remove_peer(&key),
                    Some(Control::LastHandshakes(reply)) => {
                        let _ = reply.send(self.last_handshakes(Instant::now()));
                    }
                    Some(Control::FlowsOf(laptop, reply)) => {
                        let _ = reply.send(self.flows.flows_of(laptop));
                    }
                    Some(Control::DialLaptop { to, reply }) => {
                        self.dial_laptop(to, reply, &out.conns, Instant::now());
                    }
                    Some(Control::OpenLaptopUdp { to, reply }) => {
                        let _ = reply.send(self.open_laptop_udp(to, Instant::now()));
                    }
                    None => control_open = false,
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            let now = Instant::now();
            self.service_active();
            self.expire_dials(now);
            if now >= next_timers {
                let Self {
                    peers,
                    timer_buf,
                    stats,
                    ..
                } = &mut self;
                peers.update_timers(timer_buf, |_, to, d| out.send(to, d, stats));
                next_timers = now + WG_TIMER_TICK;
                self.check_laptops(now);
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP_TICK;
            }
            self.egress(&mut out, now);
            out.flush(&mut self.stats);
        }
        tracing::info!(
            tcp = self.tcp.len(),
            udp = self.udp.len(),
            "data path stopping: resetting open flows"
        );
        for (_, c) in out.conns.drain() {
            c.out.close();
        }
        // Dropping the flows resets their cluster sockets.
        self.tcp.clear();
        self.udp.clear();
        self.icmp.clear();
    }

    /// Receive and process batches of UDP datagrams until none are queued
    /// (bounded, so other inputs get their turn).
    fn drain_udp(&mut self, out: &mut Output, recv: &mut RecvBatch) {
        let now = Instant::now();
        for _ in 0..4 {
            match recv.recv(&out.udp) {
                Ok(n) => {
                    for i in 0..n {
                        match recv.get(i) {
                            // Synthetic framed addresses are never real
                            // senders.
                            Some((from, _)) if framed::addr_conn(from).is_some() => {
                                self.stats.udp_rx += 1;
                                self.stats.drop_malformed += 1
                            }
                            Some((from, datagrams)) => {
                                for d in datagrams {
                                    self.stats.udp_rx += 1;
                                    self.on_datagram(out, from, d, now);
                                }
                            }
                            None => {
                                self.stats.udp_rx += 1;
                                self.stats.drop_malformed += 1
                            }
                        }
                    }
                    if n < recv.capacity() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "WireGuard UDP receive failed");
                    break;
                }
            }
        }
    }

    fn on_framed(&mut self, out: &mut Output, ev: FramedEvent) {
        match ev {
            FramedEvent::Opened {
                id,
                remote,
                out: conn_out,
            } => {
                self.stats.framed_opened += 1;
                out.conns
                    .insert(id, FramedConn::new(remote, conn_out, framing_max()));
            }
            FramedEvent::Closed { id } => {
                if let Some(c) = out.conns.remove(&id) {
                    c.out.close();
                }
                // A laptop whose transport this was cannot be reached until
                // it reconnects (its next datagram moves its endpoint).
                let gone = framed::conn_addr(id);
                let cut_off: Vec<IpAddr> = self
                    .peers
                    .ids()
                    .filter_map(|p| self.peers.get(p))
                    .filter(|p| p.endpoint() == Some(gone))
                    .filter_map(|p| p.allowed_ips().first().map(|n| n.addr()))
                    .collect();
                for addr in cut_off {
                    self.mark_down(addr, Instant::now(), "its tunnel connection closed");
                }
            }
            FramedEvent::Data { id, chunk } => {
                let Some(conn) = out.conns.get_mut(&id) else {
                    return;
                };
                let mut decoder = std::mem::take(&mut conn.decoder);
                let from = framed::conn_addr(id);
                let now = Instant::now();
                let mut authenticated = false;
                let result = framed::decode_chunk(&mut decoder, &chunk, |frame| {
                    self.stats.framed_rx += 1;
                    authenticated |= self.on_datagram(out, from, frame, now);
                });
                match (result, out.conns.get_mut(&id)) {
                    (Ok(()), Some(conn)) => {
                        conn.decoder = decoder;
                        if authenticated {
                            conn.out.mark_authenticated();
                        }
                    }
                    (Err(e), Some(conn)) => {
                        tracing::warn!(conn = id, remote = %conn.remote, error = %e,
                            "framed connection out of step; closing it");
                        self.stats.drop_malformed += 1;
                        conn.out.close();
                        out.conns.remove(&id);
                    }
                    (_, None) => {}
                }
            }
        }
    }

    /// One WireGuard datagram from an underlay address. True when some
    /// peer's session accepted it (a valid handshake message, or data or a
    /// keepalive of a live session), not for a cookie reply to an
    /// unverified sender or a drop.
    fn on_datagram(
        &mut self,
        out: &mut Output,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> bool {
        let mut buf = std::mem::take(&mut self.decap);
        let accepted = match self.peers.decapsulate(from, datagram, &mut buf, now) {
            Decapsulated::Send { peer, to, datagram } => {
                out.send(to, datagram, &mut self.stats);
                if let Some(peer) = peer {
                    while let Decapsulated::Send { to, datagram, .. } =
                        self.peers.flush_queued(peer, &mut buf)
                    {
                        out.send(to, datagram, &mut self.stats);
                    }
                }
                peer.is_some()
            }
            Decapsulated::Packet { packet, .. } => {
                self.on_packet(out, packet, now);
                true
            }
            Decapsulated::Nothing => true,
            Decapsulated::Dropped(reason) => {
                match reason {
                    wg::DropReason::ForgedSource { peer, src } => {
                        let key = self.peers.get(peer).map(|p| short_key(p.public_key()));
                        tracing::debug!(peer = ?key, %src, "dropped packet with forged source");
                    }
                    wg::DropReason::PeerToPeer { dst, .. } => {
                        tracing::debug!(%dst, "dropped packet addressed to another peer");
                    }
                    other => tracing::trace!(%from, reason = ?other, "dropped datagram"),
                }
                false
            }
        };
        self.decap = buf;
        accepted
    }

    /// One IP packet from a laptop, its source already checked.
    fn on_packet(&mut self, out: &mut Output, packet: &[u8], now: Instant) {
        match self.flows.ingress(packet, now) {
            Ingress::Handled => {}
            Ingress::NewTcp { id, src, dst } => self.open_tcp(id, src, dst),
            Ingress::UdpDatagram {
                id,
                new,
                dst,
                payload,
                ..
            } => {
                if let Some(end) = self.laptop_udp.get(&id) {
                    // A laptop's datagram on a flow the gateway opened.
                    if end.tx.try_send(payload.to_vec()).is_ok() {
                        self.stats.udp_bytes_to_cluster += payload.len() as u64;
                    } else {
                        self.stats.drop_udp_send_full += 1;
                    }
                } else if Some(dst.ip()) == self.cfg.tunnel_address {
                    // Nothing else listens for UDP on the gateway's tunnel
                    // address.
                    self.flows.release(id);
                    self.udp.remove(&id);
                    self.stats.drop_unsupported += 1;
                } else {
                    self.udp_to_cluster(id, new, dst, payload, now);
                }
            }
            Ingress::Refused {
                laptop,
                limit,
                first,
            } => self.refused(laptop, limit, first),
            Ingress::Dropped(IngressDrop::UnsupportedProtocol(PROTO_ICMP)) => {
                self.icmp_to_cluster(out, packet, now)
            }
            Ingress::Dropped(reason) => {
                let s = &mut self.stats;
                match reason {
                    IngressDrop::Malformed(_) | IngressDrop::BadTransport => s.drop_malformed += 1,
                    IngressDrop::Fragment => s.drop_fragment += 1,
                    IngressDrop::UnsupportedProtocol(_) => s.drop_unsupported += 1,
                    IngressDrop::TooManyPendingSyns => s.drop_pending_syns += 1,
                }
            }
        }
    }

    /// A laptop's new flow was refused by one of its caps: counted each
    /// time, logged once (until the laptop holds no flows again).
    fn refused(&mut self, laptop: IpAddr, limit: Limit, first: bool) {
        self.stats.refused[limit_index(limit)] += 1;
        if first {
            let caps = self.cfg.per_laptop;
            let (cap, what) = match limit {
                Limit::TcpFlows => (caps.tcp_flows, "TCP flows; new connections get RST"),
                Limit::PendingDials => (
                    caps.pending_dials,
                    "TCP dials pending; new SYNs are dropped (the laptop retries)",
                ),
                Limit::UdpFlows => (
                    caps.udp_flows,
                    "UDP flows; datagrams of new flows are dropped",
                ),
            };
            tracing::warn!(%laptop, limit = limit.label(), cap,
                "laptop at its cap of {cap} {what}; further refusals are counted in burrow_gateway_flows_refused_total");
        }
    }

    fn open_tcp(&mut self, id: FlowId, src: SocketAddr, dst: SocketAddr) {
        if Some(dst.ip()) == self.cfg.tunnel_address {
            self.open_local(id, src, dst);
            return;
        }
        tracing::debug!(?id, %src, %dst, "dialing");
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
                    tracing::debug!(?id, %dst, error = %e, "dial failed");
                    self.dial_failed(id, dst, DialError::classify(&e));
                    return;
                }
            }
        };
        self.tcp.insert(
            id,
            TcpFlow {
                src,
                dst,
                end,
                accepted: false,
                laptop_eof: false,
                cluster_eof: false,
                connecting: None,
                orphaned_at: None,
            },
        );
        self.dialing
            .push_back((Instant::now() + self.cfg.dial_timeout, id));
    }

    /// A connection to the gateway's own tunnel address: the laptops' API
    /// on the control port, taken by the data path's own stack, with the
    /// identity of the peer that owns the source address (every packet's
    /// source was checked against its peer on the way in). Anything else
    /// there is refused: the gateway has no other service in the tunnel.
    fn open_local(&mut self, id: FlowId, src: SocketAddr, dst: SocketAddr) {
        let key = self
            .peers
            .route(src.ip())
            .and_then(|p| self.peers.get(p))
            .map(|p| *p.public_key().as_bytes());
        let permit = match (&self.api, key) {
            (Some(api), Some(_)) if dst.port() == burrow_api::CONTROL_PORT => {
                api.try_reserve().ok()
            }
            _ => None,
        };
        let (Some(permit), Some(key)) = (permit, key) else {
            tracing::debug!(?id, %src, %dst, "refused: nothing listens on the gateway's tunnel address there");
            let _ = self.flows.refuse(id);
            return;
        };
        tracing::debug!(?id, %src, %dst, "a laptop's API connection");
        if let Err(e) = self.flows.accept(id, Instant::now()) {
            tracing::debug!(?id, error = %e, "accept failed");
            return;
        }
        let (tx, rx) = mpsc::channel(dialer::TO_CLUSTER_QUEUE);
        let shared = Arc::new(TcpShared::default());
        let stream = LaptopStream::new(id, dst, src, shared.clone(), rx, self.events_tx.clone());
        self.tcp.insert(
            id,
            TcpFlow {
                src,
                dst,
                end: End::Stream(StreamEnd {
                    to_cluster: tx,
                    shared,
                    granted: 0,
                }),
                accepted: true,
                laptop_eof: false,
                cluster_eof: false,
                connecting: None,
                orphaned_at: None,
            },
        );
        permit.send(ApiConn {
            stream,
            key,
            from: src,
        });
    }

    /// Take the events of the cluster sockets and service their flows.
    fn on_cluster_events(&mut self, poll: &mut ClusterPoll) {
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
    fn next_dial_deadline(&mut self) -> Option<Instant> {
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
    fn expire_dials(&mut self, now: Instant) {
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
            let dst = flow.dst;
            // Closed quietly: nothing was established.
            flow.end = End::Socket(None);
            self.tcp.remove(&id);
            self.dial_failed(id, dst, DialError::Timeout);
        }
    }

    fn udp_to_cluster(
        &mut self,
        id: FlowId,
        new: bool,
        dst: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) {
        if new || !self.udp.contains_key(&id) {
            match self.open_udp(id, dst) {
                Ok(flow) => {
                    self.stats.udp_opened += 1;
                    self.udp.insert(id, flow);
                }
                Err(e) => {
                    tracing::debug!(?id, %dst, error = %e, "UDP flow socket failed");
                    self.stats.dial_errors[dial_index(DialError::Other)] += 1;
                    self.flows.release(id);
                    return;
                }
            }
        }
        let Some(flow) = self.udp.get_mut(&id) else {
            return;
        };
        flow.last_active = now;
        match send_now(&flow.socket, payload) {
            Ok(n) => self.stats.udp_bytes_to_cluster += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stats.drop_udp_send_full += 1,
            Err(e) => tracing::debug!(?id, %dst, error = %e, "UDP send failed"),
        }
    }

    fn open_udp(&mut self, id: FlowId, dst: SocketAddr) -> io::Result<DatagramFlow> {
        let bind = match dst {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.connect(dst)?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let max_payload = self.cfg.mtu.saturating_sub(ip_udp_header(dst.ip()));
        let task = tokio::spawn(dialer::udp_flow(
            id,
            socket.clone(),
            max_payload,
            self.events_tx.clone(),
        ));
        Ok(DatagramFlow {
            socket,
            task,
            last_active: Instant::now(),
        })
    }

    /// ICMP echo requests go out on an unprivileged ping socket, if the
    /// pod's `net.ipv4.ping_group_range` allows one; anything else ICMP is
    /// dropped.
    fn icmp_to_cluster(&mut self, out: &mut Output, packet: &[u8], now: Instant) {
        let _ = out;
        let Some((key, message)) = parse_echo_request(packet) else {
            self.stats.drop_unsupported += 1;
            return;
        };
        if !self.icmp.contains_key(&key) {
            if self.icmp_permitted == Some(false) {
                self.stats.drop_icmp_not_permitted += 1;
                return;
            }
            match open_ping_socket(key.remote) {
                Ok(socket) => {
                    self.icmp_permitted = Some(true);
                    self.stats.icmp_opened += 1;
                    let task = tokio::spawn(dialer::icmp_flow(
                        key,
                        socket.clone(),
                        self.cfg.mtu,
                        self.events_tx.clone(),
                    ));
                    self.icmp.insert(
                        key,
                        DatagramFlow {
                            socket,
                            task,
                            last_active: now,
                        },
                    );
                }
                Err(e) => {
                    if self.icmp_permitted.is_none() {
                        tracing::warn!(error = %e,
                            "ICMP echo disabled: the pod may not open ping sockets \
                             (net.ipv4.ping_group_range); pings through the tunnel are dropped");
                    }
                    self.icmp_permitted = Some(false);
                    self.stats.drop_icmp_not_permitted += 1;
                    return;
                }
            }
        }
        if let Some(flow) = self.icmp.get_mut(&key) {
            flow.last_active = now;
            // The kernel sets the identifier and checksum itself.
            let _ = send_now(&flow.socket, message);
        }
    }

    fn on_flow_event(&mut self, out: &mut Output, ev: FlowEvent) {
        let now = Instant::now();
        match ev {
            FlowEvent::TcpData { id, data } => {
                let Some(TcpFlow {
                    end: End::Stream(stream),
                    ..
                }) = self.tcp.get_mut(&id)
                else {
                    return;
                };
                stream.granted = stream.granted.saturating_sub(data.len());
                match self.flows.tcp_send(id, &data) {
                    Ok(n) => {
                        self.stats.tcp_bytes_to_laptop += n as u64;
                        if n < data.len() {
                            tracing::warn!(?id, lost = data.len() - n, "send buffer overrun");
                        }
                    }
                    Err(e) => tracing::debug!(?id, error = %e, "data for a closing flow"),
                }
            }
            FlowEvent::TcpEof { id } => {
                if let Some(flow) = self.tcp.get_mut(&id) {
                    flow.cluster_eof = true;
                    let _ = self.flows.tcp_close(id);
                    self.service_tcp(id);
                }
            }
            FlowEvent::TcpReset { id } => self.abort_tcp(id),
            FlowEvent::Writable { id } => self.service_tcp(id),
            FlowEvent::Dialing { id, socket } => self.on_dialing(id, socket),
            FlowEvent::UdpReply { id, data } => match self.flows.udp_send(id, &data, now) {
                Ok(()) => {
                    self.stats.udp_bytes_to_laptop += data.len() as u64;
                    if let Some(flow) = self.udp.get_mut(&id) {
                        flow.last_active = now;
                    }
                }
                Err(_) => self.stats.drop_too_large += 1,
            },
            FlowEvent::LaptopUdp { id, data } => {
                self.laptop_udp_queued.fetch_sub(1, Ordering::AcqRel);
                match self.flows.udp_send(id, &data, now) {
                    Ok(()) => self.stats.udp_bytes_to_laptop += data.len() as u64,
                    Err(FlowError::TooLarge(_)) => self.stats.drop_too_large += 1,
                    // Released meanwhile.
                    Err(_) => {}
                }
            }
            FlowEvent::IcmpReply { key, data } => {
                if let Some(packet) = echo_reply_packet(key, &data) {
                    out.encapsulate(&mut self.peers, &packet, &mut self.stats);
                }
            }
        }
    }

    /// The dialer thread's socket for a flow (see [`Dialer`]).
    fn on_dialing(&mut self, id: FlowId, socket: io::Result<ClusterSocket>) {
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
    fn forget_failed_dial(&mut self, id: FlowId, e: &io::Error) {
        let Some(mut flow) = self.tcp.remove(&id) else {
            return;
        };
        tracing::debug!(?id, dst = %flow.dst, error = %e, "dial failed");
        flow.end = End::Socket(None);
        let dst = flow.dst;
        drop(flow);
        self.dial_failed(id, dst, DialError::classify(e));
    }

    /// A dial into the cluster failed (the flow is no longer in the
    /// table): the laptop gets RST when it was refused, and nothing (its
    /// connect times out) otherwise.
    fn dial_failed(&mut self, id: FlowId, dst: SocketAddr, e: DialError) {
        self.stats.dial_errors[dial_index(e)] += 1;
        tracing::debug!(?id, %dst, error = e.label(), "dial failed");
        let _ = match e {
            DialError::Refused => self.flows.refuse(id),
            _ => self.flows.discard(id),
        };
    }

    fn add_peer(&mut self, config: PeerConfig) -> Result<(), PeerError> {
        let key = *config.public_key.as_bytes();
        if let Some(id) = self.peers.find_by_key(&config.public_key) {
            let same = self
                .peers
                .get(id)
                .is_some_and(|p| p.allowed_ips() == config.allowed_ips.as_slice());
            if same {
                return Ok(());
            }
            self.remove_peer(&key);
        }
        self.peers.add(config).map(|_| ())
    }

    fn remove_peer(&mut self, key: &[u8; 32]) {
        let public = boringtun::x25519::PublicKey::from(*key);
        let Some(id) = self.peers.find_by_key(&public) else {
            return;
        };
        let Some(peer) = self.peers.remove(id) else {
            return;
        };
        for n in peer.allowed_ips() {
            self.down.remove(&n.addr());
        }
        let owned: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| peer.allowed_ips().iter().any(|n| n.contains(&f.src.ip())))
            .map(|(id, _)| *id)
            .collect();
        for flow in owned {
            self.abort_tcp(flow);
        }
        // Its UDP flows from reroutes end (their readers see the end).
        let flows = &mut self.flows;
        self.laptop_udp.retain(|id, end| {
            let theirs = peer
                .allowed_ips()
                .iter()
                .any(|n| n.contains(&end.laptop.ip()));
            if theirs {
                flows.release(*id);
            }
            !theirs
        });
    }

    fn last_handshakes(&self, now: Instant) -> HashMap<[u8; 32], Duration> {
        self.peers
            .ids()
            .filter_map(|id| self.peers.get(id))
            .filter_map(|p| {
                let at = p.last_handshake()?;
                Some((
                    *p.public_key().as_bytes(),
                    now.saturating_duration_since(at),
                ))
            })
            .collect()
    }

    fn abort_tcp(&mut self, id: FlowId) {
        if self.tcp.remove(&id).is_some() {
            let _ = self.flows.tcp_abort(id);
            // The RST leaves with the next egress; then the socket goes.
            self.release_after_egress.push(id);
        }
    }

    fn service_active(&mut self) {
        let mut active = std::mem::take(&mut self.active);
        self.flows.take_active(&mut active);
        for id in active.drain(..) {
            self.service_tcp(id);
        }
        self.active = active;
    }

    /// Move what can move for one TCP flow, and retire it once both sides
    /// are done (or it was reset).
    fn service_tcp(&mut self, id: FlowId) {
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
                        tracing::debug!(?id, dst = %flow.dst, "flow open");
                    }
                    Err(e) => {
                        tracing::debug!(?id, error = %e, "accept failed");
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
        match state {
            TcpState::Closed if flow.laptop_eof && flow.cluster_eof => {
                self.tcp.remove(&id);
                self.flows.release(id);
            }
            // The laptop's FIN has just arrived: its ACK leaves with the next
            // egress, so release after that. (Released at once, the ACK was
            // never sent: every laptop connection closed by the cluster side
            // sat in LAST-ACK until a loss probe ~200 ms later drew a RST.)
            TcpState::TimeWait if flow.laptop_eof && flow.cluster_eof => {
                self.tcp.remove(&id);
                self.release_after_egress.push(id);
            }
            // Reset by the laptop, or timed out. A RST answering our
            // SYN-ACK (the laptop gave up connecting) sends smoltcp back to
            // LISTEN rather than CLOSED; kept, such a flow held its cluster
            // connection open for good.
            TcpState::Closed | TcpState::Listen => {
                tracing::debug!(?id, dst = %flow.dst, "flow reset by the laptop side");
                self.tcp.remove(&id);
                self.flows.release(id);
            }
            _ => {}
        }
    }

    /// Move bytes between smoltcp and the flow's cluster socket. False when
    /// the flow was reset (and is gone).
    fn pump_socket(&mut self, id: FlowId, state: TcpState) -> bool {
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
                    Ok(Some(Ok(n))) => stats.tcp_bytes_to_cluster += n as u64,
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
                    Ok(ReadOutcome::Data(n)) => stats.tcp_bytes_to_laptop += n as u64,
                    Ok(ReadOutcome::DataThenEof(n)) => {
                        stats.tcp_bytes_to_laptop += n as u64;
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
            tracing::debug!(?id, dst = %flow.dst, error = %e, "cluster socket failed");
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
    fn pump_stream(&mut self, id: FlowId, state: TcpState) -> bool {
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

    /// A UDP flow to a laptop (a rerouted UDP port's caller): from the
    /// gateway's tunnel address and an ephemeral port to `to`, which some
    /// peer must own.
    fn open_laptop_udp(&mut self, to: SocketAddr, now: Instant) -> io::Result<LaptopDatagrams> {
        let local_ip = match self.cfg.tunnel_address {
            Some(ip) if ip.is_ipv4() == to.is_ipv4() => ip,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("the gateway has no tunnel address to send to {to} from"),
                ));
            }
        };
        if self.peers.route(to.ip()).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("no registered laptop has the tunnel address {}", to.ip()),
            ));
        }
        let (id, local) = self.flows.udp_open(local_ip, to, now).map_err(|e| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("cannot open a UDP flow to {to}: {e}"),
            )
        })?;
        let (tx, rx) = mpsc::channel(LAPTOP_UDP_QUEUE);
        self.laptop_udp.insert(id, LaptopUdpEnd { laptop: to, tx });
        tracing::debug!(?id, %local, %to, "UDP flow to a laptop");
        Ok(LaptopDatagrams::new(
            id,
            local,
            to,
            rx,
            self.events_tx.clone(),
            self.laptop_udp_queued.clone(),
            LAPTOP_UDP_QUEUED,
        ))
    }

    /// A connection to a laptop: the gateway's tunnel address must be of
    /// the right family and some peer must own the address.
    fn dial_laptop(
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
                tracing::info!(laptop = %to.ip(), "laptop answering again: rerouted connections go to it");
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
        tracing::debug!(?id, %local, %to, "connecting to a laptop");
        let (tx, rx) = mpsc::channel(dialer::TO_CLUSTER_QUEUE);
        self.tcp.insert(
            id,
            TcpFlow {
                src: to,
                dst: local,
                end: End::Stream(StreamEnd {
                    to_cluster: tx,
                    shared: Arc::new(TcpShared::default()),
                    granted: 0,
                }),
                accepted: false,
                laptop_eof: false,
                cluster_eof: false,
                connecting: Some(Connecting {
                    reply,
                    from_laptop: rx,
                    started: now,
                    deadline: now + self.cfg.dial_timeout,
                }),
                orphaned_at: None,
            },
        );
        self.laptop_streams.insert(id, None);
    }

    /// Finds laptops that leave a connection waiting (a SYN, or bytes not
    /// acknowledged) for [`LAPTOP_PATIENCE`] without the gateway hearing
    /// anything from them since, and marks them down.
    fn check_laptops(&mut self, now: Instant) {
        let Self {
            laptop_streams,
            tcp,
            flows,
            peers,
            ..
        } = self;
        let mut silent: Vec<IpAddr> = Vec::new();
        laptop_streams.retain(|id, waiting| {
            let Some(flow) = tcp.get(id) else {
                return false;
            };
            let since = match &flow.connecting {
                Some(c) => c.started,
                None => {
                    if flows.tcp_send_queue(*id).unwrap_or(0) == 0 {
                        *waiting = None;
                        return true;
                    }
                    *waiting.get_or_insert(now)
                }
            };
            if now.saturating_duration_since(since) < LAPTOP_PATIENCE {
                return true;
            }
            let laptop = flow.src.ip();
            let heard = peers
                .route(laptop)
                .and_then(|p| peers.get(p))
                .and_then(|p| p.last_received());
            if heard.is_none_or(|h| h < since) && !silent.contains(&laptop) {
                silent.push(laptop);
            }
            true
        });
        for laptop in silent {
            self.mark_down(laptop, now, "it did not answer for 1.5 s");
        }
    }

    /// The laptop at `laptop` is not reachable: its pending dials fail and
    /// its streams fail with `HostUnreachable` (the reroute listeners then
    /// send their callers to the cluster's pods), and so do further dials
    /// until it is heard from again.
    fn mark_down(&mut self, laptop: IpAddr, now: Instant, why: &str) {
        if self.down.insert(laptop, now).is_none() {
            tracing::info!(%laptop, "laptop not answering ({why}): rerouted connections go to the cluster's pods until it is heard from again");
        }
        let ids: Vec<FlowId> = self
            .laptop_streams
            .keys()
            .filter(|id| self.tcp.get(id).is_some_and(|f| f.src.ip() == laptop))
            .copied()
            .collect();
        for id in ids {
            self.laptop_streams.remove(&id);
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            if let Some(connecting) = flow.connecting.take() {
                self.stats.laptop_dials[2] += 1;
                let _ = connecting.reply.send(Err(unreachable(laptop)));
            } else if let End::Stream(end) = &flow.end {
                end.shared.unreachable.store(true, Ordering::Release);
            }
            self.abort_tcp(id);
        }
    }

    /// Settle a connection to a laptop once the laptop answered (or did
    /// not in time). True when it is established and serviced as usual.
    fn finish_connect(&mut self, id: FlowId) -> bool {
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
                tracing::debug!(?id, %to, "connected to a laptop");
                // If the caller gave up waiting, the stream's drop closes it.
                let _ = connecting.reply.send(Ok(stream));
                true
            }
            Err((index, kind, message)) => {
                self.stats.laptop_dials[index] += 1;
                tracing::debug!(?id, %to, %message, "connecting to a laptop failed");
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

    fn sweep(&mut self, now: Instant) {
        let ids: Vec<FlowId> = self.flows.tcp_flows().collect();
        for id in ids {
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            if flow.accepted
                && let End::Stream(stream) = &flow.end
                && stream.to_cluster.is_closed()
            {
                let since = *flow.orphaned_at.get_or_insert(now);
                if now.saturating_duration_since(since) >= ORPHAN_LINGER {
                    tracing::debug!(?id, laptop = %flow.src, "resetting a flow nobody reads");
                    self.abort_tcp(id);
                    continue;
                }
            }
            self.service_tcp(id);
        }
        self.flows.probe_stalled_flows();
        // UDP flows to laptops whose reader is gone.
        let flows = &mut self.flows;
        self.laptop_udp.retain(|id, end| {
            let closed = end.tx.is_closed();
            if closed {
                flows.release(*id);
            }
            !closed
        });
        let udp = &mut self.udp;
        self.flows.expire(now, |id| {
            udp.remove(&id);
        });
        self.icmp
            .retain(|_, f| now.saturating_duration_since(f.last_active) < ICMP_IDLE);
    }

    fn egress(&mut self, out: &mut Output, now: Instant) {
        let Self {
            flows,
            peers,
            stats,
            ..
        } = self;
        flows.egress(now, &mut |packet: &[u8]| {
            out.encapsulate(peers, packet, stats);
        });
        for id in self.release_after_egress.drain(..) {
            self.flows.release(id);
        }
    }

    fn render_metrics(&self, out: &Output) -> String {
        let s = &self.stats;
        let c = self.peers.counters();
        let accepted = self.tcp.values().filter(|f| f.accepted).count();
        let dialing = self.tcp.len() - accepted;
        let mut e = Exposition::default();
        e.family(
            "burrow_gateway_flows_open",
            "gauge",
            "Flows currently open.",
        );
        e.sample("proto=\"tcp\"", accepted as f64);
        e.sample("proto=\"udp\"", self.udp.len() as f64);
        e.sample("proto=\"icmp\"", self.icmp.len() as f64);
        e.family(
            "burrow_gateway_dials_pending",
            "gauge",
            "TCP dials in progress.",
        );
        e.sample("", dialing as f64);
        e.family(
            "burrow_gateway_flows_opened_total",
            "counter",
            "Flows opened.",
        );
        e.sample("proto=\"tcp\"", s.tcp_opened as f64);
        e.sample("proto=\"udp\"", s.udp_opened as f64);
        e.sample("proto=\"icmp\"", s.icmp_opened as f64);
        e.family(
            "burrow_gateway_flow_bytes_total",
            "counter",
            "Flow payload bytes, by direction.",
        );
        for (labels, v) in [
            (
                "proto=\"tcp\",direction=\"to_cluster\"",
                s.tcp_bytes_to_cluster,
            ),
            (
                "proto=\"tcp\",direction=\"to_laptop\"",
                s.tcp_bytes_to_laptop,
            ),
            (
                "proto=\"udp\",direction=\"to_cluster\"",
                s.udp_bytes_to_cluster,
            ),
            (
                "proto=\"udp\",direction=\"to_laptop\"",
                s.udp_bytes_to_laptop,
            ),
        ] {
            e.sample(labels, v as f64);
        }
        e.family(
            "burrow_gateway_dial_errors_total",
            "counter",
            "Failed dials into the cluster, by kind.",
        );
        for kind in [
            DialError::Refused,
            DialError::Timeout,
            DialError::Unreachable,
            DialError::Other,
        ] {
            e.sample(
                &format!("kind=\"{}\"", kind.label()),
                s.dial_errors[dial_index(kind)] as f64,
            );
        }
        e.family(
            "burrow_gateway_laptop_connections_total",
            "counter",
            "TCP connections the gateway opened to laptops, by outcome.",
        );
        for (i, outcome) in ["established", "refused", "timeout", "no_such_laptop"]
            .iter()
            .enumerate()
        {
            e.sample(&format!("outcome=\"{outcome}\""), s.laptop_dials[i] as f64);
        }
        e.family(
            "burrow_gateway_flows_refused_total",
            "counter",
            "New flows refused because their laptop was at a cap, by cap (each refused SYN or datagram).",
        );
        for limit in Limit::ALL {
            e.sample(
                &format!("limit=\"{}\"", limit.label()),
                s.refused[limit_index(limit)] as f64,
            );
        }
        e.family(
            "burrow_gateway_laptop_flow_limit",
            "gauge",
            "The caps on what one laptop may hold.",
        );
        let caps = self.cfg.per_laptop;
        for (limit, cap) in [
            (Limit::TcpFlows, caps.tcp_flows),
            (Limit::PendingDials, caps.pending_dials),
            (Limit::UdpFlows, caps.udp_flows),
        ] {
            e.sample(&format!("limit=\"{}\"", limit.label()), cap as f64);
        }
        e.family(
            "burrow_gateway_packets_dropped_total",
            "counter",
            "Packets and datagrams dropped, by reason.",
        );
        for (reason, v) in [
            ("forged_source", c.forged_source),
            ("peer_to_peer", c.peer_to_peer),
            ("unknown_peer", c.unknown_peer),
            ("malformed", c.malformed + s.drop_malformed),
            ("unknown_destination", c.unknown_destination),
            ("no_endpoint", c.no_endpoint),
            ("wireguard", c.wireguard_errors),
            ("buffer_too_small", c.buffer_too_small),
            ("fragment", s.drop_fragment),
            ("unsupported_protocol", s.drop_unsupported),
            ("too_many_pending_syns", s.drop_pending_syns),
            ("icmp_not_permitted", s.drop_icmp_not_permitted),
            ("udp_send_buffer_full", s.drop_udp_send_full),
            ("framed_backlog_full", s.drop_framed_backlog),
            ("too_large", s.drop_too_large),
        ] {
            e.sample(&format!("reason=\"{reason}\""), v as f64);
        }
        e.family(
            "burrow_gateway_wireguard_datagrams_total",
            "counter",
            "WireGuard datagrams, by transport and direction.",
        );
        e.sample("transport=\"udp\",direction=\"rx\"", s.udp_rx as f64);
        e.sample("transport=\"udp\",direction=\"tx\"", s.udp_tx as f64);
        e.sample("transport=\"framed\",direction=\"rx\"", s.framed_rx as f64);
        e.sample("transport=\"framed\",direction=\"tx\"", s.framed_tx as f64);
        e.family(
            "burrow_gateway_framed_connections_opened_total",
            "counter",
            "Framed-TCP transport connections accepted.",
        );
        e.sample("", s.framed_opened as f64);
        e.family(
            "burrow_gateway_framed_connections",
            "gauge",
            "Framed-TCP transport connections open.",
        );
        e.sample("", out.conns.len() as f64);
        let f = &self.framed_counters;
        e.family(
            "burrow_gateway_framed_connections_refused_total",
            "counter",
            "Framed-TCP connections reset at once because a cap was full, by cap.",
        );
        e.sample(
            "reason=\"total_limit\"",
            f.refused_total_limit.load(Ordering::Relaxed) as f64,
        );
        e.sample(
            "reason=\"source_limit\"",
            f.refused_source_limit.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "burrow_gateway_framed_connections_timed_out_total",
            "counter",
            "Framed-TCP connections closed by the gateway, by timeout.",
        );
        e.sample(
            "reason=\"handshake\"",
            f.closed_handshake_timeout.load(Ordering::Relaxed) as f64,
        );
        e.sample(
            "reason=\"idle\"",
            f.closed_idle_timeout.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "burrow_gateway_peers",
            "gauge",
            "Configured WireGuard peers.",
        );
        e.sample("", self.peers.len() as f64);
        // Counts only: nothing on the metrics port names a laptop or a key.
        e.family(
            "burrow_gateway_peers_handshaken",
            "gauge",
            "Peers whose last handshake completed within the window.",
        );
        let now_ages: Vec<Duration> = self
            .peers
            .ids()
            .filter_map(|id| self.peers.get(id)?.stats().since_handshake)
            .collect();
        for (window, secs) in [("180s", 180u64), ("600s", 600)] {
            let n = now_ages.iter().filter(|a| a.as_secs() < secs).count();
            e.sample(&format!("within=\"{window}\""), n as f64);
        }
        e.finish()
    }
}

/// The dialer thread, unless `BURROW_DIAL_THREAD=off` (or the thread or a
/// second handle to the epoll set cannot be had): then the data path dials
/// and closes on its own thread.
fn dialer_thread(
    registry: &mio::Registry,
    events: &mpsc::UnboundedSender<FlowEvent>,
) -> Option<Dialer> {
    if std::env::var("BURROW_DIAL_THREAD").is_ok_and(|v| v == "off") {
        return None;
    }
    let made = registry
        .try_clone()
        .and_then(|r| Dialer::spawn(r, events.clone()));
    match made {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "no dialer thread; dialing on the data path's thread");
            None
        }
    }
}

/// Send on a connected datagram socket without waiting. Not tokio's
/// `try_send`: that reports a fresh socket as not writable until the reactor
/// has polled it once, which would drop every flow's first datagram.
fn send_now(socket: &UdpSocket, payload: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send(payload)
}

/// A dial to, or a stream of, a laptop that is not answering.
fn unreachable(laptop: IpAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::HostUnreachable,
        format!("the laptop at {laptop} is not answering"),
    )
}

fn framing_max() -> usize {
    burrow_netstack::framing::MAX_FRAME
}

fn dial_index(e: DialError) -> usize {
    match e {
        DialError::Refused => 0,
        DialError::Timeout => 1,
        DialError::Unreachable => 2,
        DialError::Other => 3,
    }
}

fn limit_index(l: Limit) -> usize {
    match l {
        Limit::TcpFlows => 0,
        Limit::PendingDials => 1,
        Limit::UdpFlows => 2,
    }
}

fn ip_udp_header(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 20 + 8,
        IpAddr::V6(_) => 40 + 8,
    }
}

/// An IPv4 ICMP echo request: its flow key and the ICMP message.
fn parse_echo_request(packet: &[u8]) -> Option<(IcmpKey, &[u8])> {
    let ip = wire::parse_ip(packet).ok()?;
    if ip.protocol != PROTO_ICMP {
        return None;
    }
    let message = ip.payload(packet);
    let icmp = Icmpv4Packet::new_checked(message).ok()?;
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoRequest { ident, .. } => Some((
            IcmpKey {
                laptop: ip.src,
                remote: ip.dst,
                ident,
            },
            message,
        )),
        _ => None,
    }
}

/// The IPv4 packet carrying an echo reply to the laptop, with the laptop's
/// identifier restored (the kernel substitutes its own on ping sockets).
fn echo_reply_packet(key: IcmpKey, message: &[u8]) -> Option<Vec<u8>> {
    let (IpAddr::V4(remote), IpAddr::V4(laptop)) = (key.remote, key.laptop) else {
        return None;
    };
    let caps = ChecksumCapabilities::default();
    // The kernel verified the checksum; do not insist.
    let icmp = Icmpv4Packet::new_checked(message).ok()?;
    let Icmpv4Repr::EchoReply { seq_no, data, .. } =
        Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::ignored()).ok()?
    else {
        return None;
    };
    let reply = Icmpv4Repr::EchoReply {
        ident: key.ident,
        seq_no,
        data,
    };
    let ip = Ipv4Repr {
        src_addr: remote,
        dst_addr: laptop,
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ip.buffer_len() + reply.buffer_len()];
    let mut ip_packet = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut ip_packet, &caps);
    let mut icmp_out = Icmpv4Packet::new_unchecked(ip_packet.payload_mut());
    reply.emit(&mut icmp_out, &caps);
    Some(buf)
}

fn open_ping_socket(remote: IpAddr) -> io::Result<Arc<UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let IpAddr::V4(_) = remote else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "ICMPv6 echo is not forwarded yet",
        ));
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(remote, 0).into())?;
    let std_socket: std::net::UdpSocket = socket.into();
    Ok(Arc::new(UdpSocket::from_std(std_socket)?))
}
