//! The data path task: the single owner of the sans-IO state (the peer
//! table and the flow engine). It reads WireGuard datagrams from the UDP
//! socket (batched) and from framed connections, feeds them through
//! [`Peers`] and [`FlowEngine`], moves TCP flows' bytes to and from their
//! sockets into the cluster itself ([`crate::cluster`]) and UDP/ICMP replies
//! through small receive tasks, and sends what the engine emits back to the
//! laptops.
//!
//! One loop iteration: wait for input (UDP readable, framed bytes, flow
//! events, a timer), take everything queued without waiting again, then
//! service the flows that changed, run timers, collect egress and flush the
//! batched output once.
//!
//! The folder, by concern:
//! - [`inbox`]: every message the data path takes or hands out
//!   ([`Command`], [`FlowEvent`], [`ToCluster`], [`TcpShared`],
//!   [`DatapathHandle`]);
//! - this module: the loop, WireGuard datagrams in, peers, the sweep;
//! - `output`: the sink encrypted datagrams leave by (batched UDP,
//!   framed connections);
//! - `tcp`: TCP flows both ways (dials into the cluster, connections to
//!   laptops) and their lifecycle; `liveness`: laptops found not answering;
//! - `datagram`: UDP flows and ICMP echo;
//! - [`metrics`]: the counters, their rendering and the `/metrics` server.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use burrow_api::WgKey;
use burrow_netstack::flow::{
    FlowConfig, FlowEngine, FlowError, FlowId, Ingress, IngressDrop, LaptopLimits, Limit,
};
use burrow_netstack::framing::FRAMED_MTU;
use burrow_netstack::reassembly::{self, Reassembled, Reassembler};
use burrow_netstack::udp_batch::{RecvBatch, SendBatch};
use burrow_netstack::wg::{
    self, DATA_OVERHEAD, Decapsulated, MIN_BUFFER, PeerConfig, PeerError, PeerId, Peers,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::Span;

use crate::cluster::{ClusterPoll, Dialer};
use crate::config::short_key;
use crate::framed::{self, FramedConn, FramedEvent};
use crate::laptop::ApiConn;
use datagram::{DatagramFlow, ICMP_IDLE, LaptopUdpEnd};
use metrics::{Stats, limit_index};
use output::Sink;
use tcp::{End, TcpFlow};

mod datagram;
pub mod inbox;
mod liveness;
pub mod metrics;
mod output;
mod tcp;

pub use inbox::{Command, DatapathHandle, DialError, FlowEvent, IcmpKey, TcpShared, ToCluster};

/// boringtun's timers want a call about every 250 ms.
const WG_TIMER_TICK: Duration = Duration::from_millis(250);
/// Sweeps for closed TCP flows and idle UDP/ICMP flows.
const SWEEP_TICK: Duration = Duration::from_secs(1);
/// Receive slot per datagram: above any sane tunnel MTU plus WireGuard
/// overhead; larger datagrams are dropped as truncated.
const RECV_SLOT: usize = 4096;
/// Items taken from a channel per wake-up before egress runs.
const DRAIN_LIMIT: usize = 256;

/// The largest IP packet sent to a laptop: a TCP segment to one on the
/// framed transport.
fn max_packet(cfg: &DatapathConfig) -> usize {
    cfg.mtu.max(usize::from(FRAMED_MTU))
}

/// Tunables of the data path.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub mtu: usize,
    pub dial_timeout: Duration,
    pub udp_idle_timeout: Duration,
    /// Each TCP flow's smoltcp receive buffer (the window the laptop may
    /// fill). Not bounded across flows, only by the per-laptop caps: a
    /// laptop at its TCP cap with every flow's upload stalled holds this
    /// per flow.
    pub tcp_buffer: usize,
    /// Each TCP flow's smoltcp send buffer: the most it keeps in flight
    /// towards its laptop, so the window over a long path (1 MiB moves
    /// 20 MB/s at 50 ms). Its memory is bounded per laptop and for all
    /// (the next two; see `burrow_netstack::flow::FlowConfig`).
    pub tcp_send_buffer: usize,
    pub tcp_send_memory_per_laptop: usize,
    pub tcp_send_memory: usize,
    /// The gateway's own tunnel address: the source of connections it
    /// opens to laptops ([`Command::DialLaptop`]). `serve` fills it in
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
            // Sending towards laptops needs the window of a long path: at
            // 50 ms 256 KiB capped a download at 5 MB/s (BENCHMARKS.md,
            // "Delay and loss").
            tcp_buffer: 256 * 1024,
            tcp_send_buffer: 4 << 20,
            tcp_send_memory_per_laptop: 64 << 20,
            tcp_send_memory: 256 << 20,
            tunnel_address: None,
            per_laptop: LaptopLimits::default(),
            framed: framed::Limits::default(),
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
    /// Fragments of laptops' datagrams larger than the tunnel MTU, until
    /// whole (bounded per laptop).
    reassembly: Reassembler,
    /// Each laptop's span (its tunnel address and key), by tunnel address:
    /// the parent of its flows' spans, entered for its events.
    laptops: HashMap<IpAddr, Span>,
}

impl Datapath {
    pub fn new(
        private_key: StaticSecret,
        peers: Vec<PeerConfig>,
        cfg: DatapathConfig,
    ) -> Result<Self, PeerError> {
        let mut table = Peers::new(private_key);
        let mut laptops = HashMap::new();
        for p in peers {
            for (addr, span) in laptop_spans(&p) {
                laptops.insert(addr, span);
            }
            table.add(p)?;
        }
        let now = Instant::now();
        let flows = FlowEngine::new(
            FlowConfig {
                // TCP segments as large as a framed laptop's tunnel MTU
                // (each flow's bounded by its laptop's MSS); UDP replies
                // fragmented to the UDP transport's.
                mtu: max_packet(&cfg),
                datagram_mtu: cfg.mtu,
                tcp_rx_buffer: cfg.tcp_buffer,
                tcp_tx_buffer: cfg.tcp_send_buffer,
                tcp_tx_memory_per_laptop: cfg.tcp_send_memory_per_laptop,
                tcp_tx_memory_all: cfg.tcp_send_memory,
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
            timer_buf: vec![0; MIN_BUFFER.max(max_packet(&cfg) + DATA_OVERHEAD)],
            active: Vec::new(),
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
            reassembly: Reassembler::new(reassembly::Limits::default()),
            laptops,
            cfg,
        })
    }

    /// Hand connections laptops open to the gateway's tunnel address and
    /// the control port to `tx`, each with the WireGuard peer it came from.
    pub fn serve_api(&mut self, tx: mpsc::Sender<ApiConn>) {
        self.api = Some(tx);
    }

    pub fn public_key(&self) -> WgKey {
        WgKey::from(self.peers.public_key())
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
        mut control_rx: mpsc::Receiver<Command>,
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
        let slot = max_packet(&self.cfg) + DATA_OVERHEAD + 64;
        let mut out = Sink {
            udp,
            batch: SendBatch::new(slot.max(MIN_BUFFER)),
            conns: HashMap::new(),
            dirty: Vec::new(),
            streams: HashMap::new(),
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
                    self.on_flow_event(ev);
                    for _ in 0..DRAIN_LIMIT {
                        let Ok(ev) = events_rx.try_recv() else { break };
                        self.on_flow_event(ev);
                    }
                }
                c = control_rx.recv(), if control_open => match c {
                    Some(Command::Metrics(reply)) => {
                        let _ = reply.send(self.render_metrics(&out));
                    }
                    Some(Command::AddPeer(config, reply)) => {
                        let _ = reply.send(self.add_peer(config));
                    }
                    Some(Command::RemovePeer(key)) => self.remove_peer(&key),
                    Some(Command::LastHeard(reply)) => {
                        let _ = reply.send(last_heard(&self.peers, Instant::now()));
                    }
                    Some(Command::FlowsOf(laptop, reply)) => {
                        let _ = reply.send(self.flows.flows_of(laptop));
                    }
                    Some(Command::DialLaptop { to, reply }) => {
                        self.dial_laptop(to, reply, &out.conns, Instant::now());
                    }
                    Some(Command::OpenLaptopUdp { to, reply }) => {
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
                peers.update_timers(timer_buf, |peer, to, d| out.send(Some(peer), to, d, stats));
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
    fn drain_udp(&mut self, out: &mut Sink, recv: &mut RecvBatch) {
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

    fn on_framed(&mut self, out: &mut Sink, ev: FramedEvent) {
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
                let mut left = None;
                if let Some(c) = out.conns.remove(&id) {
                    c.out.close();
                    left = out.unbind(&c, id);
                    if let (Some((peer, _)), Some(left)) = (c.peer, left) {
                        tracing::debug!(parent: &self.peer_span(peer), conn = id, left,
                            "framed connection of this laptop closed");
                    }
                }
                if left.is_some_and(|n| n > 0) {
                    // The laptop's other streams carry its flows on.
                    return;
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
                let mut owner = None;
                let result = framed::decode_chunk(&mut decoder, &chunk, |frame| {
                    self.stats.framed_rx += 1;
                    let (accepted, peer) = self.accept(out, from, frame, now);
                    authenticated |= accepted;
                    owner = peer.or(owner);
                });
                if let Some(peer) = owner
                    && out.bind(id, peer, &self.peers, now)
                {
                    let remote = out.conns.get(&id).map(|c| c.remote);
                    tracing::debug!(parent: &self.peer_span(peer), conn = id, ?remote,
                        "framed connection carries this laptop's datagrams");
                }
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
        out: &mut Sink,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> bool {
        self.accept(out, from, datagram, now).0
    }

    /// [`Self::on_datagram`], also naming the peer that accepted it when
    /// the datagram says (data, a keepalive, a handshake).
    fn accept(
        &mut self,
        out: &mut Sink,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> (bool, Option<PeerId>) {
        let mut buf = std::mem::take(&mut self.decap);
        let accepted = match self.peers.decapsulate(from, datagram, &mut buf, now) {
            Decapsulated::Send { peer, to, datagram } => {
                out.send(peer, to, datagram, &mut self.stats);
                if let Some(peer) = peer {
                    // A handshake answered (a few a minute per laptop).
                    log_handshake(&self.peer_span(peer), from);
                    while let Decapsulated::Send { to, datagram, .. } =
                        self.peers.flush_queued(peer, &mut buf)
                    {
                        out.send(Some(peer), to, datagram, &mut self.stats);
                    }
                }
                (peer.is_some(), peer)
            }
            Decapsulated::Packet { packet, peer } => {
                self.on_packet(packet, now);
                (true, Some(peer))
            }
            Decapsulated::Keepalive { peer } => (true, Some(peer)),
            Decapsulated::Nothing => (true, None),
            Decapsulated::Dropped(reason) => {
                match reason {
                    wg::DropReason::ForgedSource { peer, src } => {
                        let key = self.peers.get(peer).map(|p| short_key(p.public_key()));
                        tracing::debug!(parent: &self.peer_span(peer), peer = ?key, %src, "dropped packet with forged source");
                    }
                    wg::DropReason::PeerToPeer { dst, .. } => {
                        tracing::debug!(%dst, "dropped packet addressed to another peer");
                    }
                    other => tracing::trace!(%from, reason = ?other, "dropped datagram"),
                }
                (false, None)
            }
        };
        self.decap = buf;
        accepted
    }

    /// A fragment (the engine takes whole packets only): held until its
    /// datagram is complete, which then goes in as one packet.
    fn on_fragment(&mut self, packet: &[u8], now: Instant) {
        let Ok(ip) = burrow_netstack::wire::parse_ip(packet) else {
            self.stats.drop_malformed += 1;
            return;
        };
        match self.reassembly.push(&ip, packet, now) {
            Reassembled::Held => {}
            Reassembled::Complete(whole) => self.on_packet(&whole, now),
            Reassembled::Whole | Reassembled::Dropped(_) => self.stats.drop_fragment += 1,
        }
    }

    /// One IP packet from a laptop, its source already checked.
    fn on_packet(&mut self, packet: &[u8], now: Instant) {
        match self.flows.ingress(packet, now) {
            Ingress::Handled => {}
            Ingress::NewTcp { id, src, dst } => self.open_tcp(id, src, dst),
            Ingress::UdpDatagram {
                id,
                new,
                src,
                dst,
                payload,
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
                    self.udp_to_cluster(id, new, src, dst, payload, now);
                }
            }
            Ingress::EchoRequest { key, message } => self.icmp_to_cluster(key, message, now),
            Ingress::Refused {
                laptop,
                limit,
                first,
            } => self.refused(laptop, limit, first),
            Ingress::Dropped(reason) => {
                let s = &mut self.stats;
                match reason {
                    IngressDrop::Malformed(_) | IngressDrop::BadTransport => s.drop_malformed += 1,
                    IngressDrop::Fragment => self.on_fragment(packet, now),
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
            tracing::warn!(parent: &self.laptop_span(laptop), %laptop, limit = limit.label(), cap,
                "laptop at its cap of {cap} {what}; further refusals are counted in burrow_gateway_flows_refused_total");
        }
    }

    fn on_flow_event(&mut self, ev: FlowEvent) {
        let now = Instant::now();
        match ev {
            FlowEvent::TcpData { id, data } => {
                let Some(flow) = self.tcp.get_mut(&id) else {
                    return;
                };
                let End::Stream(stream) = &mut flow.end else {
                    return;
                };
                stream.granted = stream.granted.saturating_sub(data.len());
                match self.flows.tcp_send(id, &data) {
                    Ok(n) => {
                        self.stats.tcp_bytes_to_laptop += n as u64;
                        flow.to_laptop += n as u64;
                        if n < data.len() {
                            tracing::warn!(parent: &flow.span, lost = data.len() - n, "send buffer overrun");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(parent: &flow.span, error = %e, "data for a closing flow")
                    }
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
            // Leaves with the next egress.
            FlowEvent::IcmpReply { key, data } => {
                self.flows.echo_reply(key, &data);
            }
        }
    }

    fn add_peer(&mut self, config: PeerConfig) -> Result<(), PeerError> {
        let key = WgKey::from(config.public_key);
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
        let spans = laptop_spans(&config);
        self.peers.add(config)?;
        for (addr, span) in spans {
            tracing::debug!(parent: &span, "peer added");
            self.laptops.insert(addr, span);
        }
        Ok(())
    }

    fn remove_peer(&mut self, key: &WgKey) {
        let Some(id) = self.peers.find_by_key(&key.public_key()) else {
            return;
        };
        let Some(peer) = self.peers.remove(id) else {
            return;
        };
        let mut span = Span::none();
        for n in peer.allowed_ips() {
            self.down.remove(&n.addr());
            if let Some(s) = self.laptops.remove(&n.addr()) {
                span = s;
            }
        }
        let owned: Vec<FlowId> = self
            .tcp
            .iter()
            .filter(|(_, f)| peer.allowed_ips().iter().any(|n| n.contains(&f.src.ip())))
            .map(|(id, _)| *id)
            .collect();
        tracing::debug!(parent: &span, tcp_flows = owned.len(), "peer removed: its flows reset");
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

    fn sweep(&mut self, now: Instant) {
        // First: keep-alives for stalled flows, and the memory of empty
        // send buffers back, so that flows held back by the memory caps
        // are served below with it.
        self.flows.probe_stalled_flows();
        let ids: Vec<FlowId> = self.flows.tcp_flows().collect();
        for id in ids {
            let Some(flow) = self.tcp.get(&id) else {
                continue;
            };
            // Nobody reads it any more (a dropped `LaptopStream`): reset
            // once that has lasted the engine's orphan linger.
            if flow.accepted
                && let End::Stream(stream) = &flow.end
                && stream.to_cluster.is_closed()
                && self.flows.tcp_orphaned(id, now)
            {
                tracing::debug!(parent: &flow.span, "resetting a flow nobody reads");
                self.abort_tcp(id);
                continue;
            }
            self.service_tcp(id);
        }
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
        self.reassembly.expire(now);
    }

    fn egress(&mut self, out: &mut Sink, now: Instant) {
        let Self {
            flows,
            peers,
            stats,
            ..
        } = self;
        flows.egress(now, &mut |packet: &[u8]| {
            out.encapsulate(peers, packet, now, stats);
        });
    }
}

/// How long ago each peer was last heard from: its latest authenticated
/// datagram (a handshake, data, or a keepalive: a connected laptop sends
/// one at least every 25 s, every 5 s on each port-forward stream). The
/// reaper forgets a laptop only when this and its registration are both
/// older than the grace (`control::reap`): a laptop that is moving data is
/// not silent, however long ago its last handshake was (sessions rekey
/// only every 2 minutes, heartbeats re-register every 30 s).
fn last_heard(peers: &Peers, now: Instant) -> HashMap<WgKey, Duration> {
    peers
        .ids()
        .filter_map(|id| peers.get(id))
        .filter_map(|p| {
            let at = match (p.last_received(), p.last_handshake()) {
                (Some(r), Some(h)) => r.max(h),
                (r, h) => r.or(h)?,
            };
            Some((
                WgKey::from(p.public_key()),
                now.saturating_duration_since(at),
            ))
        })
        .collect()
}

/// A handshake answered for the laptop of `span`, arrived from `from` (a
/// framed connection's synthetic address, or a UDP endpoint).
fn log_handshake(span: &Span, from: SocketAddr) {
    match framed::addr_conn(from) {
        Some(conn) => tracing::debug!(parent: span, conn, "WireGuard handshake answered"),
        None => tracing::debug!(parent: span, endpoint = %from, "WireGuard handshake answered"),
    }
}

/// A span per tunnel address of a laptop's peer (one, in practice): who
/// the laptop is, in every line of its flows.
fn laptop_spans(config: &PeerConfig) -> Vec<(IpAddr, Span)> {
    let key = WgKey::from(config.public_key).short();
    config
        .allowed_ips
        .iter()
        .map(|n| {
            let addr = n.addr();
            (
                addr,
                tracing::info_span!("laptop", laptop = %addr, key = %key),
            )
        })
        .collect()
}

impl Datapath {
    /// The span of the laptop at `addr` (none for an unknown address).
    fn laptop_span(&self, addr: IpAddr) -> Span {
        self.laptops.get(&addr).cloned().unwrap_or_else(Span::none)
    }

    /// The span of the laptop whose peer is `peer`.
    fn peer_span(&self, peer: PeerId) -> Span {
        self.peers
            .get(peer)
            .and_then(|p| p.allowed_ips().first())
            .map_or_else(Span::none, |n| self.laptop_span(n.addr()))
    }

    /// A span for one flow of the laptop at `laptop`, inside the laptop's;
    /// the laptop's own when debug spans are off, so that what is logged
    /// of the flow at higher levels still names the laptop. Made once per
    /// flow, never per packet.
    fn flow_span(&self, laptop: IpAddr, dst: SocketAddr, sport: u16) -> Span {
        let parent = self.laptop_span(laptop);
        let span = tracing::debug_span!(parent: &parent, "flow", %dst, sport);
        if span.is_disabled() { parent } else { span }
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

fn framing_max() -> usize {
    burrow_netstack::framing::MAX_FRAME
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use boringtun::x25519::PublicKey;
    use burrow_netstack::wg::Encapsulated;

    use super::*;

    /// A laptop that handshook once and then only sent keepalives (or
    /// data) is heard from at its last datagram, not at its handshake:
    /// the reaper judged a downloading laptop by its handshake alone and
    /// forgot it mid-transfer once its grace was shorter than the time
    /// since its last handshake and heartbeat.
    #[test]
    fn a_laptop_is_heard_at_its_last_datagram_not_its_last_handshake() {
        let gw_key = StaticSecret::from([1; 32]);
        let laptop_key = StaticSecret::from([2; 32]);
        let laptop_addr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 7));
        let gw_addr: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
        let laptop_underlay: SocketAddr = "192.0.2.2:40000".parse().expect("addr");
        let mut gateway = Peers::new(gw_key.clone());
        gateway
            .add(PeerConfig::host(PublicKey::from(&laptop_key), laptop_addr))
            .expect("laptop peer");
        let mut laptop = Peers::new_laptop(laptop_key);
        let gw = laptop
            .add(PeerConfig {
                public_key: PublicKey::from(&gw_key),
                allowed_ips: vec!["198.19.0.0/16".parse().expect("net")],
                endpoint: Some(gw_addr),
                preshared_key: None,
                persistent_keepalive: None,
            })
            .expect("gateway peer");
        let (mut a, mut b, mut c) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
        let t0 = Instant::now();
        // The handshake, at t0.
        let Encapsulated::Send { datagram, .. } = laptop.handshake_now(gw, &mut a) else {
            panic!("no initiation");
        };
        let Decapsulated::Send { datagram, .. } =
            gateway.decapsulate(laptop_underlay, datagram, &mut b, t0)
        else {
            panic!("no response");
        };
        let len = datagram.len();
        let _ = laptop.decapsulate(gw_addr, &b[..len], &mut c, t0);
        let heard = |g: &Peers, now| last_heard(g, now).into_values().next().expect("the laptop");
        assert_eq!(
            heard(&gateway, t0 + Duration::from_secs(25)),
            Duration::from_secs(25)
        );
        // A keepalive 25 s later: heard 5 s ago at t0 + 30 s.
        let Encapsulated::Send { datagram, .. } = laptop.encapsulate_to(gw, &[], &mut a) else {
            panic!("no keepalive");
        };
        let at = t0 + Duration::from_secs(25);
        assert!(matches!(
            gateway.decapsulate(laptop_underlay, datagram, &mut b, at),
            Decapsulated::Keepalive { .. }
        ));
        assert_eq!(
            heard(&gateway, t0 + Duration::from_secs(30)),
            Duration::from_secs(5)
        );
    }
}
