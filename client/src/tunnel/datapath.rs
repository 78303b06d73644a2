//! The laptop's data path: TUN ⇄ WireGuard ([`Peers`]) ⇄ UDP or the
//! framed transport's [`Links`], one task that owns the peer table and
//! every buffer.
//!
//! Per wake-up it takes everything ready on the input that woke it (up to a
//! batch of TUN packets, or of datagrams via `recvmmsg`), encrypts TUN
//! packets straight into the slots of the `sendmmsg` batch, writes decrypted
//! packets to the TUN device, runs boringtun's timers every
//! [`TIMER_TICK`], and flushes the batch once. Buffers are allocated once in
//! [`Datapath::new`]; nothing on the per-packet path allocates.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use burrow_netstack::udp_batch::{BATCH, RecvBatch, SendBatch};
use burrow_netstack::wg::{
    DATA_OVERHEAD, Decapsulated, DropReason, Encapsulated, MIN_BUFFER, PeerConfig, PeerError,
    PeerId, Peers,
};
use burrow_netstack::wgconf::short_key;
use tokio::net::UdpSocket;

use crate::tunnel::links::{LinkEvent, Links, addr_link, link_addr};
use crate::tunnel::offload::{self, Coalescer};
use crate::tunnel::tun::Tun;

/// How often boringtun's timers run (handshake retries, keepalives, rekey).
pub const TIMER_TICK: Duration = Duration::from_millis(100);
/// A framed link that carried nothing for this long gets a keepalive of
/// its own: boringtun's keepalive goes on one link only, and the gateway
/// sends a laptop's flows only on streams it heard from in the last 12 s
/// (and closes a stream silent for two minutes).
const LINK_KEEPALIVE: Duration = Duration::from_secs(5);
/// Receive slot per datagram: above any sane tunnel MTU plus WireGuard
/// overhead; larger datagrams are dropped as truncated.
const RECV_SLOT: usize = 4096;
/// A TUN read takes whatever the kernel hands over: a vnet header and a
/// packet or a TSO segment of up to 64 KiB.
const TUN_READ: usize = offload::VNET_HDR_LEN + 65536;

/// After [`Sessions::restart`] or [`Sessions::handshake_now`]: a handshake
/// initiation goes out at once and again every `URGENT_EVERY`, up to
/// `URGENT_TRIES` of them (then boringtun's own 5 s retries), until one is
/// answered. A path that comes back (a new gateway pod behind a NodePort
/// that kube-proxy has not switched yet, a stream still opening) is used
/// within a second. Each forced initiation supersedes the last, so the wait
/// stays above any sane round trip to the gateway.
const URGENT_EVERY: Duration = Duration::from_secs(1);
const URGENT_TRIES: usize = 10;

/// Socket buffer size of the UDP socket, each way (see [`force_buffer`]).
const UDP_SOCKET_BUFFER: usize = 16 << 20;

/// Packet counters, logged when the tunnel stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub tun_rx: u64,
    pub tun_tx: u64,
    pub udp_rx: u64,
    pub udp_tx: u64,
    pub dropped: u64,
}

/// What the data path shares with whoever watches it (`burrow status`):
/// refreshed after every batch the data path moves.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStats {
    /// When the first peer last completed a handshake.
    pub last_handshake: Option<Instant>,
    /// Bytes of WireGuard payload sent to / received from the first peer.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub counters: Counters,
}

/// [`LinkStats`], shared.
pub type SharedStats = std::sync::Arc<std::sync::Mutex<LinkStats>>;

/// What the daemon asks of the data path's sessions (read every
/// [`TIMER_TICK`]), and whether the laptop is offline.
#[derive(Debug, Default)]
pub struct Sessions {
    /// `ASK_*` bits, taken by the data path.
    asks: std::sync::atomic::AtomicU8,
    offline: std::sync::atomic::AtomicBool,
}

const ASK_HANDSHAKE: u8 = 1;
const ASK_RESTART: u8 = 2;

impl Sessions {
    /// The path changed (a new address, new port-forward streams, a
    /// wake-up): handshake now, keeping the session and what it queued.
    pub fn handshake_now(&self) {
        self.asks
            .fetch_or(ASK_HANDSHAKE, std::sync::atomic::Ordering::AcqRel);
    }

    /// The other end lost the session (a new gateway pod, a gateway that
    /// forgot this laptop): start afresh — what the old session queued
    /// was for keys nobody holds — and handshake now.
    pub fn restart(&self) {
        self.asks.fetch_or(
            ASK_HANDSHAKE | ASK_RESTART,
            std::sync::atomic::Ordering::AcqRel,
        );
    }

    fn take(&self) -> u8 {
        self.asks.swap(0, std::sync::atomic::Ordering::AcqRel)
    }

    /// The laptop has no route to the gateway (link down) or has one
    /// again. While offline, TCP segments into the tunnel are answered with
    /// "host unreachable" instead of being sent nowhere: the laptop's TCP
    /// keeps retransmitting every second or so (RFC 6069 undoes its
    /// backoff) rather than backing off for minutes, so connections resume
    /// as soon as the network is back, and new ones fail at once.
    pub fn set_offline(&self, offline: bool) {
        self.offline
            .store(offline, std::sync::atomic::Ordering::Release);
    }

    fn offline(&self) -> bool {
        self.offline.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// At most this many "host unreachable" answers per [`TIMER_TICK`] while
/// offline (the rest of the segments are dropped, as they would be).
const UNREACHABLE_PER_TICK: u32 = 64;

/// Handshakes forced since `since`, until one completes.
#[derive(Debug, Clone, Copy)]
struct Urgent {
    since: Instant,
    /// When the last forced initiation went out (None: not yet, e.g. no
    /// framed link was up).
    sent: Option<Instant>,
    tries: usize,
}

/// Where encrypted datagrams go: the UDP socket (its output batch), or the
/// framed links.
struct Wire {
    udp: UdpSocket,
    /// The socket is IPv6 (dual-stack): IPv4 destinations are sent as
    /// v4-mapped addresses.
    v6: bool,
    batch: SendBatch,
    /// The framed transport: datagrams go on these links instead of the
    /// UDP socket (the batch's slots are then only scratch space).
    links: Option<std::sync::Arc<Links>>,
    /// Links written to since the last flush (bit per link).
    dirty: u32,
    /// When a datagram last went on each link (keepalives per link).
    link_tx: Vec<Instant>,
}

impl Wire {
    fn wire_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(a) if self.v6 => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => other,
        }
    }

    /// Queue a datagram that sits in some other buffer.
    fn send(&mut self, to: SocketAddr, datagram: &[u8], counters: &mut Counters) {
        if let Some(links) = &self.links {
            // Not a flow's packet: the link the gateway last spoke on, or
            // any that is up.
            let link = addr_link(to)
                .filter(|&i| links.is_live(i))
                .or_else(|| links.pick(0));
            self.push_link(link, datagram, counters);
            return;
        }
        if self.batch.is_full() {
            self.flush(counters);
        }
        let to = self.wire_addr(to);
        let Some(slot) = self.batch.slot().get_mut(..datagram.len()) else {
            counters.dropped += 1;
            return;
        };
        slot.copy_from_slice(datagram);
        self.batch.commit(datagram.len(), to);
        counters.udp_tx += 1;
    }

    /// Append a datagram to link `link` (None: no link is up).
    fn push_link(&mut self, link: Option<usize>, datagram: &[u8], counters: &mut Counters) {
        let Self {
            links,
            dirty,
            link_tx,
            ..
        } = self;
        push_to(links.as_deref(), dirty, link_tx, link, datagram, counters);
    }

    /// Append the datagram encrypted into the batch's next slot (`len`
    /// bytes) to link `link`.
    fn push_slot(&mut self, link: Option<usize>, len: usize, counters: &mut Counters) {
        let Self {
            links,
            dirty,
            link_tx,
            batch,
            ..
        } = self;
        let datagram = batch.slot().get(..len).unwrap_or_default();
        push_to(links.as_deref(), dirty, link_tx, link, datagram, counters);
    }

    fn flush(&mut self, counters: &mut Counters) {
        if !self.batch.is_empty() {
            counters.dropped += self.batch.flush(&self.udp) as u64;
        }
        if let Some(links) = &self.links {
            while self.dirty != 0 {
                let i = self.dirty.trailing_zeros() as usize;
                self.dirty &= !(1 << i);
                links.flush(i);
            }
        }
    }
}

fn push_to(
    links: Option<&Links>,
    dirty: &mut u32,
    link_tx: &mut [Instant],
    link: Option<usize>,
    datagram: &[u8],
    counters: &mut Counters,
) {
    let (Some(links), Some(i)) = (links, link) else {
        counters.dropped += 1;
        return;
    };
    if links.push(i, datagram) {
        counters.udp_tx += 1;
        *dirty |= 1 << i;
        if let Some(t) = link_tx.get_mut(i) {
            *t = Instant::now();
        }
    } else {
        counters.dropped += 1;
    }
}

/// The framed transport's inbound side: events from the links' streams
/// and a frame decoder per link.
struct FramedIn {
    events: tokio::sync::mpsc::Receiver<LinkEvent>,
    decoders: Vec<burrow_netstack::framing::FrameDecoder>,
    /// Links found out of step: what they still deliver is dropped until
    /// their stream is replaced (`Opened`).
    broken: Vec<bool>,
}

/// The laptop's inbound filter for `burrow connect`: the cluster may open
/// TCP connections to the laptop only on the ports of burrow's own reroute
/// forwarders, and only from the gateway's tunnel address. Every other
/// connection attempt out of the tunnel (a SYN to a server listening on
/// 0.0.0.0, whoever sends it) is dropped before it reaches the kernel; so
/// are TCP fragments (a SYN's flags split off its ports). UDP from the
/// gateway's tunnel address reaches only burrow's UDP reroute forwarders
/// (the gateway sends nothing else from it), UDP to those forwarders comes
/// only from it; a UDP datagram in fragments (the gateway fragments what
/// exceeds the tunnel MTU) is judged by its first fragment, which carries
/// the ports (the kernel cannot reassemble the rest without it). Everything
/// else passes: answers to the laptop's own
/// connections, UDP replies to the laptop's own flows (the gateway relays
/// a cluster datagram only to the laptop's flow that it answers) and ICMP.
/// Lock-free: bitmaps of ports, read per SYN or datagram.
pub struct InboundPorts {
    gateway: IpAddr,
    bits: Box<[std::sync::atomic::AtomicU64]>,
    udp_bits: Box<[std::sync::atomic::AtomicU64]>,
    refused: std::sync::atomic::AtomicU64,
}

impl InboundPorts {
    pub fn new(gateway: IpAddr) -> Self {
        Self {
            gateway,
            bits: (0..1024)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            udp_bits: (0..1024)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn bit(port: u16) -> (usize, u64) {
        (usize::from(port / 64), 1u64 << (port % 64))
    }

    /// Admit connections from the gateway to TCP `port`.
    pub fn open(&self, port: u16) {
        Self::set(&self.bits, port, true);
    }

    pub fn close(&self, port: u16) {
        Self::set(&self.bits, port, false);
    }

    /// Admit datagrams from the gateway to UDP `port`.
    pub fn open_udp(&self, port: u16) {
        Self::set(&self.udp_bits, port, true);
    }

    pub fn close_udp(&self, port: u16) {
        Self::set(&self.udp_bits, port, false);
    }

    fn set(bits: &[std::sync::atomic::AtomicU64], port: u16, open: bool) {
        let (i, b) = Self::bit(port);
        if let Some(w) = bits.get(i) {
            if open {
                w.fetch_or(b, std::sync::atomic::Ordering::Release);
            } else {
                w.fetch_and(!b, std::sync::atomic::Ordering::Release);
            }
        }
    }

    fn is_set(bits: &[std::sync::atomic::AtomicU64], port: u16) -> bool {
        let (i, b) = Self::bit(port);
        bits.get(i)
            .is_some_and(|w| w.load(std::sync::atomic::Ordering::Acquire) & b != 0)
    }

    fn is_open(&self, port: u16) -> bool {
        Self::is_set(&self.bits, port)
    }

    /// Whether a UDP datagram from `src` to `port` may pass.
    fn admits_udp(&self, src: IpAddr, port: u16) -> bool {
        (src == self.gateway) == Self::is_set(&self.udp_bits, port)
    }

    /// Connection attempts refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the packet out of the tunnel may reach the kernel.
    pub fn admits(&self, packet: &[u8]) -> bool {
        let Ok(ip) = burrow_netstack::wire::parse_ip(packet) else {
            return true; // the kernel drops what does not parse
        };
        if ip.protocol == burrow_netstack::wire::PROTO_UDP {
            // A later fragment: its first one was judged.
            if !ip.first_fragment {
                return true;
            }
            let port = ip
                .payload(packet)
                .get(2..4)
                .map(|p| u16::from_be_bytes([p[0], p[1]]));
            let admitted = match port {
                // A datagram too short for its ports: the kernel drops it.
                None => true,
                Some(port) => self.admits_udp(ip.src, port),
            };
            if !admitted {
                self.refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return admitted;
        }
        if ip.protocol != burrow_netstack::wire::PROTO_TCP {
            return true;
        }
        let admitted = if ip.fragment {
            false
        } else {
            let tcp = ip.payload(packet);
            match (tcp.get(2..4), tcp.get(13)) {
                (Some(port), Some(&flags)) => {
                    let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
                    !syn || ack
                        || (ip.src == self.gateway
                            && self.is_open(u16::from_be_bytes([port[0], port[1]])))
                }
                _ => false,
            }
        };
        if !admitted {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admitted
    }
}

/// The data path. Build with [`Datapath::new`], then [`Datapath::run`].
pub struct Datapath {
    peers: Peers,
    tun: Tun,
    out: Wire,
    recv: RecvBatch,
    tun_buf: Vec<u8>,
    /// One segment split off a TSO read.
    seg_buf: Vec<u8>,
    decap_buf: Vec<u8>,
    /// Largest WireGuard message taken from a framed link: the tunnel MTU
    /// plus WireGuard's overhead (at least [`RECV_SLOT`]).
    frame_max: usize,
    /// Joins runs of TCP segments out of the tunnel into GSO writes (when
    /// the TUN took offloads).
    gro: Option<Coalescer>,
    timer_buf: Vec<u8>,
    counters: Counters,
    /// Last handshake seen per peer, to log new ones.
    handshakes: Vec<(PeerId, Option<Instant>)>,
    stats: Option<SharedStats>,
    /// What the owner asks of the sessions (see [`Sessions`]).
    asks: Option<std::sync::Arc<Sessions>>,
    /// Handshakes being forced after such an ask.
    urgent: Option<Urgent>,
    /// "Host unreachable" answers left in this tick while offline.
    unreachable_budget: u32,
    configs: Vec<PeerConfig>,
    /// `burrow connect`'s inbound filter (None: everything passes, as in
    /// `burrow up`).
    inbound: Option<std::sync::Arc<InboundPorts>>,
    /// The framed transport, when the gateway is reached through it.
    framed: Option<FramedIn>,
}

impl Datapath {
    pub fn new(
        private_key: StaticSecret,
        peers: Vec<PeerConfig>,
        tun: Tun,
        udp: UdpSocket,
        mtu: u16,
    ) -> Result<Self, PeerError> {
        let mut table = Peers::new_laptop(private_key);
        let mut handshakes = Vec::with_capacity(peers.len());
        let configs = peers.clone();
        for p in peers {
            handshakes.push((table.add(p)?, None));
        }
        let v6 = udp.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let slot = (usize::from(mtu) + DATA_OVERHEAD + 64).max(MIN_BUFFER);
        let frame_max = RECV_SLOT.max(slot);
        let recv = RecvBatch::for_socket(&udp, RECV_SLOT);
        // BURROW_TUN_GRO=off writes one packet per TUN write (comparisons).
        let gro_wanted = !matches!(
            std::env::var("BURROW_TUN_GRO").as_deref(),
            Ok("off" | "0" | "false")
        );
        let gro = (tun.offload() && gro_wanted).then(Coalescer::new);
        Ok(Self {
            peers: table,
            tun,
            out: Wire {
                udp,
                v6,
                batch: SendBatch::new(slot),
                links: None,
                dirty: 0,
                link_tx: Vec::new(),
            },
            recv,
            tun_buf: vec![0; TUN_READ],
            seg_buf: vec![0; TUN_READ],
            decap_buf: vec![0; frame_max.max(MIN_BUFFER)],
            frame_max,
            gro,
            timer_buf: vec![0; slot],
            counters: Counters::default(),
            handshakes,
            stats: None,
            asks: None,
            urgent: None,
            unreachable_budget: UNREACHABLE_PER_TICK,
            configs,
            inbound: None,
            framed: None,
        })
    }

    /// Reach the gateway over `links` (the framed transport) instead of
    /// the UDP socket; their streams report on `events`. The peer's
    /// endpoint should be [`link_addr`]`(0)`.
    pub fn with_links(
        mut self,
        links: std::sync::Arc<Links>,
        events: tokio::sync::mpsc::Receiver<LinkEvent>,
    ) -> Self {
        let n = links.count();
        self.out.link_tx = vec![Instant::now(); n];
        self.out.links = Some(links);
        self.framed = Some(FramedIn {
            events,
            decoders: (0..n)
                .map(|_| burrow_netstack::framing::FrameDecoder::with_max_frame(self.frame_max))
                .collect(),
            broken: vec![false; n],
        });
        self
    }

    /// Admit connections from the tunnel only as `ports` says.
    pub fn with_inbound_filter(mut self, ports: std::sync::Arc<InboundPorts>) -> Self {
        self.inbound = Some(ports);
        self
    }

    /// Follow what `asks` asks of the sessions.
    pub fn with_sessions(mut self, asks: std::sync::Arc<Sessions>) -> Self {
        self.asks = Some(asks);
        self
    }

    fn reset_sessions(&mut self) {
        for (id, _) in self.handshakes.drain(..) {
            self.peers.remove(id);
        }
        for config in &self.configs {
            match self.peers.add(config.clone()) {
                Ok(id) => self.handshakes.push((id, None)),
                Err(e) => tracing::warn!("cannot re-add a peer: {e}"),
            }
        }
        tracing::info!("sessions restarted");
    }

    /// Publish [`LinkStats`] into `stats` after every batch.
    pub fn with_stats(mut self, stats: SharedStats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Move packets until `shutdown` resolves; fails only if the TUN device
    /// fails (e.g. it was deleted under us).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<Counters> {
        tokio::pin!(shutdown);
        let mut next_timers = Instant::now() + TIMER_TICK;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = self.tun.readable() => {
                    r?;
                    self.drain_tun()?;
                }
                r = self.out.udp.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "UDP socket failed");
                    } else {
                        self.drain_udp();
                    }
                }
                Some(ev) = async {
                    match &mut self.framed {
                        Some(f) => f.events.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // One chunk per turn, not a batch: the laptop's TCP
                    // answers what this chunk delivers with ACKs (read from
                    // the TUN device on the next turn) that should leave
                    // before the next chunks are opened. Taking 64 chunks
                    // at once held those ACKs behind up to 2 MiB, and
                    // the gateway's sender waited on them (one download
                    // over port-forward: ~330 -> ~360 MB/s here, medians of
                    // three rounds of five).
                    self.on_link_event(ev);
                    self.flush_gro();
                }
                _ = tokio::time::sleep_until(next_timers.into()) => {}
            }
            let now = Instant::now();
            if now >= next_timers {
                self.timers();
                next_timers = now + TIMER_TICK;
            }
            self.out.flush(&mut self.counters);
            self.publish_stats();
        }
        self.out.flush(&mut self.counters);
        self.publish_stats();
        Ok(self.counters)
    }

    /// Encrypt up to a batch of packets the kernel routed into the tunnel.
    fn drain_tun(&mut self) -> io::Result<()> {
        for _ in 0..BATCH {
            let n = match self.tun.try_recv(&mut self.tun_buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.counters.tun_rx += 1;
            if self.asks.as_ref().is_some_and(|a| a.offline()) {
                self.answer_offline(n);
                continue;
            }
            let (peers, out, counters) = (&mut self.peers, &mut self.out, &mut self.counters);
            let r = offload::segment(&mut self.tun_buf[..n], &mut self.seg_buf, |packet| {
                encrypt(peers, out, counters, packet)
            });
            if let Err(e) = r {
                self.counters.dropped += 1;
                tracing::debug!(error = %e, "TUN read dropped");
            }
        }
        Ok(())
    }

    /// Offline: the TUN read of `n` bytes goes nowhere; a TCP segment gets
    /// "host unreachable" back (see [`Sessions::set_offline`]).
    fn answer_offline(&mut self, n: usize) {
        self.counters.dropped += 1;
        if self.unreachable_budget == 0 {
            return;
        }
        // The first segment of a TSO read carries what the answer quotes.
        let Some(packet) = self.tun_buf.get(offload::VNET_HDR_LEN..n) else {
            return;
        };
        let Some(len) = burrow_netstack::wire::host_unreachable(packet, &mut self.seg_buf) else {
            return;
        };
        self.unreachable_budget -= 1;
        let reply = self.seg_buf.get(..len).unwrap_or_default();
        write_tun(
            &self.tun,
            &mut self.counters,
            &[0; offload::VNET_HDR_LEN],
            reply,
            1,
        );
    }

    /// Decrypt up to a few batches of datagrams.
    fn drain_udp(&mut self) {
        let now = Instant::now();
        for _ in 0..4 {
            let n = match self.recv.recv(&self.out.udp) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    break;
                }
            };
            for i in 0..n {
                let Some((from, datagrams)) = self.recv.get(i) else {
                    self.counters.udp_rx += 1;
                    self.counters.dropped += 1;
                    continue;
                };
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                for datagram in datagrams {
                    self.counters.udp_rx += 1;
                    on_datagram(
                        &mut self.peers,
                        &self.tun,
                        self.inbound.as_deref(),
                        &mut self.gro,
                        &mut self.out,
                        &mut self.decap_buf,
                        &mut self.counters,
                        from,
                        datagram,
                        now,
                    );
                }
            }
            if n < self.recv.capacity() {
                break;
            }
        }
        self.flush_gro();
    }

    fn flush_gro(&mut self) {
        if let Some(gro) = &mut self.gro {
            let (tun, counters) = (&self.tun, &mut self.counters);
            gro.flush(&mut |h: &[u8], p: &[u8], n: usize| write_tun(tun, counters, h, p, n));
        }
    }

    /// What a framed link's stream did.
    fn on_link_event(&mut self, ev: LinkEvent) {
        let frame_max = self.frame_max;
        let Some(framed) = &mut self.framed else {
            return;
        };
        match ev {
            LinkEvent::Opened(i) => {
                if let Some(d) = framed.decoders.get_mut(i) {
                    *d = burrow_netstack::framing::FrameDecoder::with_max_frame(frame_max);
                }
                if let Some(b) = framed.broken.get_mut(i) {
                    *b = false;
                }
                if self.urgent.is_some() {
                    // A path just came back and a handshake is wanted: on
                    // this link, now, rather than at the next retry.
                    self.force_handshake(Some(i), Instant::now());
                } else {
                    self.keepalive_on(i);
                }
            }
            LinkEvent::Closed(i) => {
                // What it held of a frame is lost with the stream.
                if let Some(d) = framed.decoders.get_mut(i) {
                    *d = burrow_netstack::framing::FrameDecoder::with_max_frame(frame_max);
                }
            }
            LinkEvent::Data(i, chunk) => {
                if framed.broken.get(i).copied().unwrap_or(true) {
                    return;
                }
                let Some(decoder) = framed.decoders.get_mut(i) else {
                    return;
                };
                let now = Instant::now();
                let from = link_addr(i);
                let mut input = &chunk[..];
                loop {
                    match decoder.decode(&mut input) {
                        Ok(Some(datagram)) => {
                            self.counters.udp_rx += 1;
                            on_datagram(
                                &mut self.peers,
                                &self.tun,
                                self.inbound.as_deref(),
                                &mut self.gro,
                                &mut self.out,
                                &mut self.decap_buf,
                                &mut self.counters,
                                from,
                                datagram,
                                now,
                            );
                        }
                        Ok(None) => break,
                        Err(e) => {
                            // Out of step: nothing more on this stream can
                            // be read. Its stream side replaces it (the
                            // gateway closes its end too); what else comes
                            // on it until then is dropped.
                            tracing::warn!(link = i, error = %e, "framed link out of step: reopening it");
                            self.counters.dropped += 1;
                            *decoder =
                                burrow_netstack::framing::FrameDecoder::with_max_frame(frame_max);
                            framed.broken[i] = true;
                            if let Some(links) = &self.out.links {
                                links.break_link(i);
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Send the first peer a datagram on link `i` (a keepalive of the live
    /// session, else a handshake initiation): it makes the gateway count
    /// the link as this laptop's, and keeps it from closing it as idle.
    fn keepalive_on(&mut self, i: usize) {
        let Some(&(id, _)) = self.handshakes.first() else {
            return;
        };
        let Self {
            peers,
            out,
            timer_buf,
            counters,
            ..
        } = self;
        if let Encapsulated::Send { datagram, .. } = peers.encapsulate_to(id, &[], timer_buf) {
            let len = datagram.len();
            let datagram = &timer_buf[..len];
            out.push_link(Some(i), datagram, counters);
        }
    }

    /// A handshake initiation to the first peer now, on link `link` (None:
    /// where its endpoint says).
    fn force_handshake(&mut self, link: Option<usize>, now: Instant) {
        let Some(&(id, _)) = self.handshakes.first() else {
            return;
        };
        if link.is_none()
            && let Some(links) = &self.out.links
            && links.pick(0).is_none()
        {
            return; // no stream up yet: the next one to open gets it
        }
        let Self {
            peers,
            out,
            timer_buf,
            counters,
            urgent,
            ..
        } = self;
        if let Encapsulated::Send { to, datagram, .. } = peers.handshake_now(id, timer_buf) {
            let len = datagram.len();
            let datagram = &timer_buf[..len];
            let before = counters.udp_tx;
            match link {
                Some(i) => out.push_link(Some(i), datagram, counters),
                None => out.send(to, datagram, counters),
            }
            // Counted as sent only if it went somewhere (a framed link
            // may be down): otherwise the next tick tries again.
            if counters.udp_tx > before
                && let Some(u) = urgent
            {
                u.sent = Some(now);
                u.tries += 1;
            }
        }
    }

    /// Asks from the owner, and the forced handshakes that follow them.
    fn urgent_handshakes(&mut self, now: Instant) {
        let asked = self.asks.as_ref().map_or(0, |a| a.take());
        if asked & ASK_RESTART != 0 {
            self.reset_sessions();
        }
        if asked != 0 {
            self.urgent = Some(Urgent {
                since: now,
                sent: None,
                tries: 0,
            });
        }
        let Some(u) = self.urgent else {
            return;
        };
        let answered = self
            .handshakes
            .first()
            .and_then(|&(id, _)| self.peers.get(id))
            .and_then(|p| p.last_handshake())
            .is_some_and(|t| t >= u.since);
        let due = u
            .sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= URGENT_EVERY);
        if answered || (due && u.tries >= URGENT_TRIES) {
            // Answered, or boringtun's own retries take over.
            self.urgent = None;
        } else if due {
            self.force_handshake(None, now);
        }
    }

    fn timers(&mut self) {
        self.unreachable_budget = UNREACHABLE_PER_TICK;
        self.urgent_handshakes(Instant::now());
        let Self {
            peers,
            out,
            timer_buf,
            counters,
            ..
        } = self;
        peers.update_timers(timer_buf, |_, to, d| out.send(to, d, counters));
        // Every link carries something at least every LINK_KEEPALIVE.
        if let Some(links) = self.out.links.clone() {
            let now = Instant::now();
            for i in 0..links.count() {
                let quiet = self
                    .out
                    .link_tx
                    .get(i)
                    .is_some_and(|t| now.saturating_duration_since(*t) >= LINK_KEEPALIVE);
                if quiet && links.is_live(i) {
                    self.keepalive_on(i);
                }
            }
        }
        let mut handshake = false;
        for (id, seen) in &mut self.handshakes {
            let Some(peer) = self.peers.get(*id) else {
                continue;
            };
            if peer.last_handshake() != *seen {
                handshake = true;
                let first = seen.is_none();
                *seen = peer.last_handshake();
                let key = short_key(peer.public_key());
                let endpoint = peer.endpoint();
                // Rekeys follow every two minutes: only the first is news.
                if first {
                    tracing::info!(peer = %key, ?endpoint, "handshake completed");
                } else {
                    tracing::debug!(peer = %key, ?endpoint, "handshake completed");
                }
            }
        }
        // A new session: each link carries one of its datagrams at once,
        // so the gateway counts every link among this laptop's streams
        // (links that opened while the handshake was under way sent
        // nothing of their own).
        if handshake && let Some(links) = self.out.links.clone() {
            for i in (0..links.count()).filter(|&i| links.is_live(i)) {
                self.keepalive_on(i);
            }
        }
    }

    /// Publish [`LinkStats`] (one uncontended lock per loop iteration, so
    /// `status` right after a request already counts it).
    fn publish_stats(&self) {
        if let Some(stats) = &self.stats
            && let Some(peer) = self
                .handshakes
                .first()
                .and_then(|(id, _)| self.peers.get(*id))
            && let Ok(mut s) = stats.lock()
        {
            let ps = peer.stats();
            s.last_handshake = peer.last_handshake();
            s.tx_bytes = ps.tx_bytes as u64;
            s.rx_bytes = ps.rx_bytes as u64;
            s.counters = self.counters;
        }
    }
}

/// Encrypt one IP packet into the next slot of the send batch.
fn encrypt(peers: &mut Peers, out: &mut Wire, counters: &mut Counters, packet: &[u8]) {
    if out.batch.is_full() {
        out.flush(counters);
    }
    let slot = out.batch.slot();
    let start = slot.as_ptr();
    let queued = match peers.encapsulate(packet, slot) {
        // boringtun writes at the start of the buffer it is given.
        Encapsulated::Send { to, datagram, .. } if datagram.as_ptr() == start => {
            Some((to, datagram.len()))
        }
        Encapsulated::Send { .. } | Encapsulated::Dropped(_) => {
            counters.dropped += 1;
            None
        }
        // Queued inside the session until the handshake completes.
        Encapsulated::Nothing => None,
    };
    let Some((to, len)) = queued else { return };
    if out.links.is_some() {
        // The slot was scratch: the datagram goes on its flow's link.
        let link = out
            .links
            .as_ref()
            .and_then(|l| l.pick(burrow_netstack::wire::flow_hash(packet)));
        out.push_slot(link, len, counters);
        return;
    }
    let to = out.wire_addr(to);
    out.batch.commit(len, to);
    counters.udp_tx += 1;
}

/// One datagram from the underlay. A free function over the fields it
/// needs, so the receive batch it borrows from stays borrowed.
#[allow(clippy::too_many_arguments)]
fn on_datagram(
    peers: &mut Peers,
    tun: &Tun,
    inbound: Option<&InboundPorts>,
    gro: &mut Option<Coalescer>,
    out: &mut Wire,
    buf: &mut [u8],
    counters: &mut Counters,
    from: SocketAddr,
    datagram: &[u8],
    now: Instant,
) {
    match peers.decapsulate(from, datagram, buf, now) {
        Decapsulated::Send { peer, to, datagram } => {
            out.send(to, datagram, counters);
            if let Some(peer) = peer {
                while let Decapsulated::Send { to, datagram, .. } = peers.flush_queued(peer, buf) {
                    out.send(to, datagram, counters);
                }
            }
        }
        Decapsulated::Packet { packet, .. } => {
            if inbound.is_some_and(|f| !f.admits(packet)) {
                counters.dropped += 1;
                tracing::debug!(%from, "dropped a connection attempt from the tunnel to a port burrow does not forward");
                return;
            }
            let mut write = |h: &[u8], p: &[u8], n: usize| write_tun(tun, counters, h, p, n);
            match gro {
                Some(gro) => gro.push(packet, &mut write),
                None => write(&[0; offload::VNET_HDR_LEN], packet, 1),
            }
        }
        Decapsulated::Nothing | Decapsulated::Keepalive { .. } => {}
        Decapsulated::Dropped(reason) => {
            counters.dropped += 1;
            match reason {
                DropReason::ForgedSource { src, .. } => {
                    tracing::debug!(%from, %src, "dropped packet whose source is not in the peer's AllowedIPs");
                }
                other => tracing::trace!(%from, reason = ?other, "dropped datagram"),
            }
        }
    }
}

/// One TUN write of `n` packets (a GSO packet when `n` > 1).
fn write_tun(tun: &Tun, counters: &mut Counters, hdr: &[u8], packet: &[u8], n: usize) {
    match tun.send_parts(hdr, packet) {
        Ok(()) => counters.tun_tx += n as u64,
        Err(e) => {
            counters.dropped += n as u64;
            tracing::trace!(error = %e, "TUN write failed");
        }
    }
}

/// Bind the tunnel's UDP socket on `port` (0: any): dual-stack `[::]` where
/// the host has IPv6, else `0.0.0.0`.
pub fn bind_udp(port: u16) -> io::Result<UdpSocket> {
    let v6 = bind_one(SocketAddr::new(IpAddr::from([0u16; 8]), port));
    match v6 {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            bind_one(SocketAddr::new(IpAddr::from([0u8; 4]), port))
        }
        Err(e) => Err(e),
    }
}

/// Set a socket buffer to [`UDP_SOCKET_BUFFER`] beyond the kernel's
/// `net.core.{r,w}mem_max` (`SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`: the daemon
/// runs with `CAP_NET_ADMIN`, as wireguard-go does for its socket). The
/// default cap, 208 KiB, holds a few hundred datagrams: a burst from the
/// gateway's stack to many flows at once (it has no congestion control)
/// overflowed it, and the lost segments cost their flows smoltcp's
/// retransmission timeout. False when the kernel refused.
fn force_buffer(fd: std::os::fd::RawFd, option: libc::c_int) -> bool {
    let size = libc::c_int::try_from(UDP_SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt with a valid descriptor and a c_int option value
    // of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

fn bind_one(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        // Whatever net.ipv6.bindv6only says: IPv4 peers too.
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer still works, only drops sooner under a
    // burst.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    if !force_buffer(fd, libc::SO_RCVBUFFORCE) {
        let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    }
    if !force_buffer(fd, libc::SO_SNDBUFFORCE) {
        let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet (no options) from `src:sport` to port `dport`
    /// with `flags`; `frag` sets the IPv4 fragment field.
    fn tcp(src: [u8; 4], sport: u16, dport: u16, flags: u8, frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = burrow_netstack::wire::PROTO_TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[198, 19, 0, 7]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const GW: [u8; 4] = [198, 19, 0, 1];

    #[test]
    fn only_the_gateway_may_open_connections_and_only_to_forwarders() {
        let f = InboundPorts::new(IpAddr::from(GW));
        assert!(
            !f.admits(&tcp(GW, 40000, 7200, SYN, 0)),
            "nothing is open yet"
        );
        f.open(41234);
        assert!(f.admits(&tcp(GW, 40000, 41234, SYN, 0)));
        assert!(
            !f.admits(&tcp(GW, 40000, 7200, SYN, 0)),
            "a server on 0.0.0.0"
        );
        assert!(
            !f.admits(&tcp([10, 244, 0, 9], 40000, 41234, SYN, 0)),
            "a forwarder port, but not from the gateway"
        );
        // Answers to the laptop's own connections and segments of
        // established ones pass; the kernel resets strays.
        assert!(f.admits(&tcp([10, 96, 0, 10], 80, 50000, SYN | ACK, 0)));
        assert!(f.admits(&tcp([10, 96, 0, 10], 80, 50000, ACK, 0)));
        // A fragment could split a SYN's flags from its ports: dropped.
        assert!(!f.admits(&tcp(GW, 40000, 41234, SYN, 0x2000)));
        assert!(!f.admits(&tcp(GW, 40000, 41234, 0, 0x0001)));
        f.close(41234);
        assert!(!f.admits(&tcp(GW, 40000, 41234, SYN, 0)));
        assert_eq!(f.refused(), 6);
        // Not TCP or UDP, or not a packet: the filter does not judge.
        let mut icmp = tcp(GW, 1, 2, 0, 0);
        icmp[9] = 1;
        assert!(f.admits(&icmp));
        assert!(f.admits(&[0x45, 0]));
    }

    /// An IPv4 UDP datagram from `src:sport` to port `dport`.
    fn udp(src: [u8; 4], sport: u16, dport: u16, frag: u16) -> Vec<u8> {
        let mut p = tcp(src, sport, dport, 0, frag);
        p[9] = burrow_netstack::wire::PROTO_UDP;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p.truncate(28);
        p[24..26].copy_from_slice(&8u16.to_be_bytes());
        p
    }

    #[test]
    fn udp_from_the_gateway_reaches_only_udp_forwarders() {
        let f = InboundPorts::new(IpAddr::from(GW));
        assert!(!f.admits(&udp(GW, 50000, 41234, 0)), "nothing is open yet");
        f.open_udp(41234);
        assert!(f.admits(&udp(GW, 50000, 41234, 0)));
        assert!(
            !f.admits(&udp(GW, 50000, 5353, 0)),
            "a UDP server on 0.0.0.0 is not reachable from the gateway"
        );
        assert!(
            !f.admits(&udp([10, 244, 0, 9], 53, 41234, 0)),
            "a forwarder port, but not from the gateway"
        );
        // A TCP forwarder's port is not a UDP one, nor the reverse.
        f.open(7000);
        assert!(!f.admits(&udp(GW, 50000, 7000, 0)));
        assert!(!f.admits(&tcp(GW, 40000, 41234, SYN, 0)));
        // Replies to the laptop's own UDP flows (DNS, …) pass.
        assert!(f.admits(&udp([10, 96, 0, 10], 53, 50123, 0)));
        // A datagram in fragments is judged by its first (the ports):
        // from the gateway to a forwarder passes, to anything else not;
        // later fragments pass (the kernel cannot use them alone).
        assert!(f.admits(&udp(GW, 50000, 41234, 0x2000)));
        assert!(!f.admits(&udp(GW, 50000, 5353, 0x2000)));
        assert!(f.admits(&udp(GW, 50000, 5353, 0x0010)));
        assert!(f.admits(&udp([10, 96, 0, 10], 53, 50123, 0x2000)));
        f.close_udp(41234);
        assert!(!f.admits(&udp(GW, 50000, 41234, 0)));
        assert_eq!(f.refused(), 7);
    }
}
