//! The flow engine: a smoltcp interface that terminates every flow a laptop
//! opens, for any destination, with no per-flow configuration.
//!
//! The interface uses `Medium::Ip` (WireGuard carries bare IP packets) and
//! any-IP, so it accepts packets for every destination address; default
//! routes through its own placeholder addresses let it answer from whatever
//! address the laptop dialled.
//!
//! TCP: the laptop's handshake must complete only after the gateway's own
//! dial succeeds, so that a refused connection in the cluster reaches the
//! laptop as a refused connection. A first SYN for an unknown 4-tuple is
//! therefore *not* given to smoltcp: the engine keeps a copy and reports
//! [`Ingress::NewTcp`]. The driver dials, then calls [`FlowEngine::accept`]
//! (a socket listening on exactly that destination is created and the saved
//! SYN re-injected, so smoltcp answers SYN-ACK), [`FlowEngine::refuse`] (an
//! RST answers the SYN) or [`FlowEngine::discard`] (nothing is answered; the
//! laptop times out as it would for an unreachable host). SYN retransmits
//! while the dial is pending are absorbed. Every other TCP segment goes to
//! smoltcp, which answers segments for unknown connections with RST.
//!
//! The gateway can also open TCP connections to a laptop
//! ([`FlowEngine::connect`]): the engine picks an ephemeral port on the
//! gateway's own tunnel address and smoltcp sends the SYN with the next
//! egress. Such a flow is keyed like the others, (laptop, gateway end), and
//! is driven with the same calls once `tcp_state` says `Established`; a
//! flow that goes from `SynSent` straight to `Closed` was refused (the
//! laptop answered RST). The driver bounds the wait for an answer.
//!
//! UDP does not go through smoltcp: a smoltcp UDP socket is keyed by local
//! endpoint only, while flows here are keyed by the full 5-tuple. The engine
//! parses datagrams itself, hands the payload to the driver without copying
//! ([`Ingress::UdpDatagram`]) and builds replies with smoltcp's wire types.
//! Idle flows expire ([`FlowEngine::expire`]). The gateway can open UDP
//! flows to a laptop too ([`FlowEngine::udp_open`]: its tunnel address and
//! an ephemeral port to the laptop's; the laptop's datagrams back arrive as
//! that flow's), for rerouted UDP ports; their owner releases them.
//!
//! ICMP: an IPv4 echo request is reported as [`Ingress::EchoRequest`] (the
//! driver forwards it, e.g. on an unprivileged ping socket) and the answer
//! goes back with [`FlowEngine::echo_reply`]; any other ICMP is dropped.
//!
//! Each laptop (tunnel address: the peer table has already checked that a
//! packet's source is its peer's) has caps on the flows it opens
//! ([`LaptopLimits`]), kept with counters per address so a refusal costs a
//! hash lookup, never a scan: TCP flows (pending or accepted; a SYN beyond
//! the cap is answered with RST), TCP dials pending (a SYN beyond is
//! dropped: the laptop retransmits) and UDP flows (a datagram that would
//! open one more is dropped). Refusals are reported as
//! [`Ingress::Refused`]. Connections the gateway opens to a laptop
//! ([`FlowEngine::connect`]) are not counted.
//!
//! Sans-IO: the engine is fed packets and `now`; it never reads a clock or
//! touches a socket. Packets it produces while processing input are queued
//! (in recycled buffers) and handed out by [`FlowEngine::egress`] together
//! with what smoltcp's sockets emit.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpListenEndpoint, IpProtocol,
    IpRepr, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use crate::slots::{Slot, Slots};
use crate::wire::{self, PROTO_ICMP, PROTO_TCP, PROTO_UDP};

pub use smoltcp::socket::tcp::State as TcpState;

/// Placeholder addresses of the interface itself. Replies carry the address
/// the laptop dialled (any-IP), never these; they only anchor the default
/// routes smoltcp needs to transmit at all.
const STACK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 8);
const STACK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb0, 0, 0, 0, 0, 0, 1);
const HOP_LIMIT: u8 = 64;
/// How soon a flow holding bytes for a silent laptop asks for its window
/// again (see [`FlowEngine::probe_stalled_flows`]).
pub const STALL_PROBE: Duration = Duration::from_secs(1);
/// Local ports of connections the gateway opens to laptops (IANA's dynamic
/// range, as most kernels use).
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// Largest IP packet the engine emits: TCP segments up to this, each
    /// flow's also bounded by the MSS its laptop announced (its own tunnel
    /// MTU), so one engine serves laptops of different tunnel MTUs.
    pub mtu: usize,
    /// UDP datagrams and echo replies larger than this are sent as IP
    /// fragments of at most this size: the smallest tunnel MTU a laptop may
    /// have (the UDP transport's), since one reply cannot ask which.
    pub datagram_mtu: usize,
    /// Per-flow TCP receive and send buffer sizes. They bound how much the
    /// gateway buffers per flow (backpressure: a full buffer closes the TCP
    /// window) and, times the number of flows, its memory.
    pub tcp_rx_buffer: usize,
    pub tcp_tx_buffer: usize,
    /// UDP flows with no datagram either way for this long are expired.
    pub udp_idle_timeout: Duration,
    /// SYNs waiting for the driver's dial beyond this many are dropped (the
    /// laptop retransmits), bounding memory under a SYN flood.
    pub max_pending_syns: usize,
    /// Caps on what one laptop may open.
    pub per_laptop: LaptopLimits,
    /// Seed for smoltcp's initial sequence numbers; vary it per process.
    pub random_seed: u64,
    /// A TCP flow whose driver-side end is gone (nobody reads it any more)
    /// is reset after this long (see [`FlowEngine::tcp_orphaned`]), as a
    /// kernel bounds an orphaned socket's FIN-WAIT-2 (`tcp_fin_timeout`).
    pub orphan_linger: Duration,
    /// Send-buffer memory one laptop's TCP flows may hold, and all
    /// laptops' together (see [`FlowEngine::tcp_send_room`]): a send
    /// buffer as large as a long path's bandwidth-delay product must not
    /// let one laptop's stalled flows take the gateway's memory.
    pub tcp_tx_memory_per_laptop: usize,
    pub tcp_tx_memory_all: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            mtu: 1420,
            datagram_mtu: 1420,
            tcp_rx_buffer: 64 * 1024,
            tcp_tx_buffer: 64 * 1024,
            udp_idle_timeout: Duration::from_secs(60),
            max_pending_syns: 4096,
            per_laptop: LaptopLimits::default(),
            random_seed: 0,
            orphan_linger: Duration::from_secs(60),
            tcp_tx_memory_per_laptop: 64 << 20,
            tcp_tx_memory_all: 256 << 20,
        }
    }
}

/// Caps on the flows one laptop (one tunnel address) holds at the gateway.
/// The defaults are far above what a developer's programs open (a browser
/// holds a few hundred connections, a parallel test suite a few thousand
/// at most) and bound what one laptop can take from the others: sockets,
/// memory, dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaptopLimits {
    /// TCP flows the laptop opened, pending or accepted, until released.
    /// Each holds a socket into the cluster and up to two socket buffers.
    pub tcp_flows: usize,
    /// TCP flows still waiting for their dial (a first SYN kept, a socket
    /// connecting). Dials within a cluster settle in about a millisecond;
    /// many pending means unreachable destinations (each held for the dial
    /// timeout) or a burst, such as a load tool opening 1,000 connections
    /// at once, which should pass. A SYN dropped here is retransmitted by
    /// the laptop a second later.
    pub pending_dials: usize,
    /// UDP flows (5-tuples). Each holds a socket until idle for the UDP
    /// timeout; a laptop's DNS stub opens one per cluster query.
    pub udp_flows: usize,
}

impl Default for LaptopLimits {
    fn default() -> Self {
        Self {
            tcp_flows: 4096,
            pending_dials: 1024,
            udp_flows: 2048,
        }
    }
}

/// Which of a laptop's caps refused a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`LaptopLimits::tcp_flows`]: the SYN was answered with RST.
    TcpFlows,
    /// [`LaptopLimits::pending_dials`]: the SYN was dropped.
    PendingDials,
    /// [`LaptopLimits::udp_flows`]: the datagram was dropped.
    UdpFlows,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::TcpFlows, Limit::PendingDials, Limit::UdpFlows];

    /// A short name, e.g. for a metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::TcpFlows => "tcp_flows",
            Limit::PendingDials => "pending_dials",
            Limit::UdpFlows => "udp_flows",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Limit::TcpFlows => 1,
            Limit::PendingDials => 2,
            Limit::UdpFlows => 4,
        }
    }
}

/// What one laptop holds now (see [`LaptopLimits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaptopFlows {
    pub tcp: usize,
    pub pending: usize,
    pub udp: usize,
    /// Caps that refused since the laptop last held nothing (bits of
    /// [`Limit::bit`]): a refusal is worth a log line only once.
    refused: u8,
    /// Send-buffer memory its TCP flows hold (see [`TxMemory`]).
    pub tx_memory: usize,
    /// A flow of its was refused send room for want of memory since the
    /// last sweep: the sweep then gives back every empty buffer it can.
    tx_starved: bool,
}

impl LaptopFlows {
    fn is_empty(&self) -> bool {
        self.tcp == 0 && self.pending == 0 && self.udp == 0 && self.tx_memory == 0
    }
}

/// What a TCP flow's send buffer holds of memory: the slot's pages the
/// bytes written since the buffer was last emptied could have touched
/// (smoltcp's ring restarts at its first byte when it is empty, and wraps
/// around otherwise), so `min(capacity, bytes written)`. Charged to the
/// flow's laptop and to the engine; given back when the buffer is found
/// empty by a sweep ([`FlowEngine::probe_stalled_flows`]), which returns
/// its pages to the kernel, and when the flow is released.
#[derive(Debug, Default, Clone, Copy)]
struct TxMemory {
    /// Bytes written since the pages were last given back.
    written: usize,
    /// What is charged now: `min(written, capacity)`.
    charged: usize,
}

/// A sweep gives back an empty send buffer's pages once this much was
/// written into it (smaller ones are cheap to keep, and page faults cost
/// more than they save), or whatever it holds when its laptop ran short.
const TX_GIVE_BACK: usize = 64 * 1024;

/// Identity of one flow, unique for the engine's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(u64);

impl FlowId {
    /// The id as a number (unique for the engine's lifetime; never reused),
    /// e.g. as a poll token for the flow's cluster socket.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The id `as_u64` gave. An id the engine never issued names no flow.
    pub fn from_u64(raw: u64) -> Self {
        Self(raw)
    }
}

/// What an inbound packet turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Ingress<'p> {
    /// Consumed by the engine (a segment of a known TCP flow, a SYN
    /// retransmit while a dial is pending, ...). Call `egress` for replies.
    Handled,
    /// The first SYN of a TCP flow from `src` (the laptop) to `dst`. Dial
    /// `dst`, then call `accept`, `refuse` or `discard`.
    NewTcp {
        id: FlowId,
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// A UDP datagram; `new` on the first of its flow.
    UdpDatagram {
        id: FlowId,
        new: bool,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'p [u8],
    },
    /// An ICMP echo request from `key.laptop` to `key.remote`: `message`
    /// is the ICMP header and data. Answer with [`FlowEngine::echo_reply`].
    EchoRequest { key: IcmpKey, message: &'p [u8] },
    /// A new flow beyond one of its laptop's caps: a TCP SYN answered with
    /// RST (call `egress`) or dropped, a UDP datagram dropped. `first`:
    /// the first refusal by this cap since the laptop last held no flows
    /// (log it; count every one).
    Refused {
        laptop: IpAddr,
        limit: Limit,
        first: bool,
    },
    /// Not handled: see the reason.
    Dropped(IngressDrop),
}

/// Why an inbound packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressDrop {
    Malformed(wire::PacketError),
    /// A TCP or UDP header that does not parse or whose checksum is wrong.
    BadTransport,
    /// Fragments are not reassembled: MSS clamping and the tunnel MTU keep
    /// TCP from fragmenting, and UDP fragments are rare enough to drop.
    Fragment,
    /// Protocols other than TCP and UDP, and ICMP other than echo requests.
    UnsupportedProtocol(u8),
    /// Too many dials pending.
    TooManyPendingSyns,
}

/// An ICMP echo "flow": laptop, destination, the laptop's identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpKey {
    pub laptop: IpAddr,
    pub remote: IpAddr,
    pub ident: u16,
}

/// Errors of the flow API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("no such flow {0:?}")]
    UnknownFlow(FlowId),
    #[error("flow {0:?} is not in a state that allows this")]
    InvalidState(FlowId),
    #[error("payload of {0} bytes does not fit in one packet")]
    TooLarge(usize),
    /// A connection cannot go from this local address to this remote one
    /// (address families differ, port 0, unspecified address).
    #[error("cannot connect from {0} to {1}")]
    Unaddressable(IpAddr, SocketAddr),
    /// Every ephemeral port towards this remote endpoint is in use.
    #[error("no free local port towards {0}")]
    NoFreePort(SocketAddr),
}

/// What [`FlowEngine::tcp_settle`] made of a TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Still open: keep servicing it.
    Open,
    /// Both sides finished cleanly: released (in TIME-WAIT, after the next
    /// egress). Forget it.
    Closed,
    /// Reset by the laptop, or timed out: released. Reset the other end.
    Reset,
}

/// Result of reading from a TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpRead {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing buffered yet.
    WouldBlock,
    /// The laptop closed its sending half and everything was read.
    Eof,
}

struct PendingSyn {
    src: SocketAddr,
    dst: SocketAddr,
    /// The SYN as received; re-injected on accept, answered on refuse.
    packet: Vec<u8>,
}

struct TcpFlow {
    handle: SocketHandle,
    /// The socket's receive and send buffers (`None`: on the heap, when
    /// the kernel refused a mapping).
    memory: Option<(Slot, Slot)>,
    tuple: Tuple,
    /// Already listed in `FlowEngine::active`.
    active: bool,
    /// Opened by the laptop (`tuple.0`), so counted in its `LaptopFlows`;
    /// not for connections the gateway opened.
    counted: bool,
    /// When the driver first reported its end gone ([`FlowEngine::tcp_orphaned`]).
    orphaned_at: Option<Instant>,
    /// What its send buffer holds of memory.
    tx_memory: TxMemory,
}

struct UdpFlow {
    id: FlowId,
    last_active: Instant,
    /// Opened by the laptop (`tuple.0`): counted in its `LaptopFlows`
    /// and expired when idle. A flow the gateway opened
    /// ([`FlowEngine::udp_open`]) is neither: its owner releases it.
    counted: bool,
}

type Tuple = (SocketAddr, SocketAddr);

/// Packets produced outside smoltcp's egress (replies during ingress, RSTs,
/// UDP replies), in buffers recycled so steady state does not allocate.
#[derive(Default)]
struct TxQueue {
    queued: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

impl TxQueue {
    fn push_with<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = fill(&mut buf);
        self.queued.push_back(buf);
        r
    }

    /// The packet pushed last, in fragments of at most `mtu` bytes when it
    /// is larger (datagrams to laptops beyond the tunnel MTU: the laptop's
    /// kernel reassembles them).
    fn fragment_last(&mut self, mtu: usize, id: u32) {
        if self.queued.back().is_none_or(|b| b.len() <= mtu) {
            return;
        }
        let Some(whole) = self.queued.pop_back() else {
            return;
        };
        let mut pieces = Vec::new();
        crate::reassembly::fragment(&whole, mtu, id, &mut |f| pieces.push(f.to_vec()));
        self.queued.extend(pieces);
        self.free.push(whole);
    }

    fn drain(&mut self, out: &mut dyn FnMut(&[u8])) {
        while let Some(buf) = self.queued.pop_front() {
            out(&buf);
            self.free.push(buf);
        }
    }
}

/// The key of an ICMP echo request (checksum checked), if `message` is one.
fn echo_request(src: IpAddr, dst: IpAddr, message: &[u8]) -> Option<IcmpKey> {
    let icmp = Icmpv4Packet::new_checked(message).ok()?;
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoRequest { ident, .. } => Some(IcmpKey {
            laptop: src,
            remote: dst,
            ident,
        }),
        _ => None,
    }
}

/// Take back `bytes` of send-buffer memory charged to `laptop`.
fn discharge_tx(
    laptops: &mut HashMap<IpAddr, LaptopFlows>,
    all: &mut usize,
    laptop: IpAddr,
    bytes: usize,
) {
    if bytes == 0 {
        return;
    }
    *all = all.saturating_sub(bytes);
    if let Some(f) = laptops.get_mut(&laptop) {
        f.tx_memory = f.tx_memory.saturating_sub(bytes);
        if f.is_empty() {
            laptops.remove(&laptop);
        }
    }
}

/// Take back what `laptop` held of one flow; forget the laptop once it
/// holds nothing.
fn uncount(
    laptops: &mut HashMap<IpAddr, LaptopFlows>,
    laptop: IpAddr,
    tcp: usize,
    pending: usize,
    udp: usize,
) {
    if let Some(f) = laptops.get_mut(&laptop) {
        f.tcp = f.tcp.saturating_sub(tcp);
        f.pending = f.pending.saturating_sub(pending);
        f.udp = f.udp.saturating_sub(udp);
        if f.is_empty() {
            laptops.remove(&laptop);
        }
    }
}

fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps
}

/// smoltcp device for one inbound packet; what smoltcp sends in reply is
/// queued.
struct IngressDevice<'a> {
    rx: Option<&'a [u8]>,
    tx: &'a mut TxQueue,
    mtu: usize,
}

struct RxSlice<'a>(&'a [u8]);
struct TxToQueue<'a>(&'a mut TxQueue);

impl phy::RxToken for RxSlice<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToQueue<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.0.push_with(len, f)
    }
}

impl phy::Device for IngressDevice<'_> {
    type RxToken<'b>
        = RxSlice<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToQueue<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxSlice<'_>, TxToQueue<'_>)> {
        let rx = self.rx.take()?;
        Some((RxSlice(rx), TxToQueue(&mut *self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToQueue<'_>> {
        Some(TxToQueue(&mut *self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

/// smoltcp device for egress: each packet is built in one scratch buffer and
/// handed straight to the caller.
struct EgressDevice<'a> {
    scratch: &'a mut Vec<u8>,
    out: &'a mut dyn FnMut(&[u8]),
    mtu: usize,
}

struct TxToCaller<'a> {
    scratch: &'a mut Vec<u8>,
    out: &'a mut dyn FnMut(&[u8]),
}

impl phy::TxToken for TxToCaller<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.scratch.clear();
        self.scratch.resize(len, 0);
        let r = f(&mut self.scratch[..]);
        (self.out)(&self.scratch[..]);
        r
    }
}

impl phy::Device for EgressDevice<'_> {
    type RxToken<'b>
        = RxSlice<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToCaller<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxSlice<'_>, TxToCaller<'_>)> {
        None
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToCaller<'_>> {
        Some(TxToCaller {
            scratch: &mut *self.scratch,
            out: &mut *self.out,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

/// The flow engine. See the module documentation.
pub struct FlowEngine {
    config: FlowConfig,
    epoch: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    tx: TxQueue,
    scratch: Vec<u8>,
    next_id: u64,
    pending: HashMap<FlowId, PendingSyn>,
    tcp: HashMap<FlowId, TcpFlow>,
    /// Pending and accepted TCP flows by (laptop, destination).
    tcp_by_tuple: HashMap<Tuple, FlowId>,
    udp: HashMap<Tuple, UdpFlow>,
    udp_by_id: HashMap<FlowId, Tuple>,
    /// What each laptop holds, by tunnel address (entries go when empty).
    laptops: HashMap<IpAddr, LaptopFlows>,
    /// Accepted TCP flows that received segments since `take_active`.
    active: Vec<FlowId>,
    /// Flows released at the end of the next `egress` (after their RST or
    /// last ACK has gone out).
    releasing: Vec<FlowId>,
    /// Where the search for a free ephemeral port starts next.
    next_port: u16,
    /// Identification of the next datagram sent in fragments.
    next_frag_id: u32,
    /// Socket buffer memory (see `slots`); outlives every socket in
    /// `sockets` (see `Drop`).
    rx_slots: Slots,
    tx_slots: Slots,
    /// Send-buffer memory all flows hold (see [`TxMemory`]).
    tx_memory_all: usize,
}

impl Drop for FlowEngine {
    fn drop(&mut self) {
        // Sockets borrow slot memory: drop them before the slot pools.
        self.sockets = SocketSet::new(Vec::new());
    }
}

impl FlowEngine {
    pub fn new(config: FlowConfig, now: Instant) -> Self {
        let mut tx = TxQueue::default();
        let mut device = IngressDevice {
            rx: None,
            tx: &mut tx,
            mtu: config.mtu,
        };
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = config.random_seed;
        let mut iface = Interface::new(iface_config, &mut device, SmolInstant::from_micros(0));
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            // Capacity is smoltcp's iface-max-addr-count (2): exactly these.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(STACK_V4), 32));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(STACK_V6), 128));
        });
        // Route capacity is 2 as well; these cannot fail on a fresh table.
        let _ = iface.routes_mut().add_default_ipv4_route(STACK_V4);
        let _ = iface.routes_mut().add_default_ipv6_route(STACK_V6);
        Self {
            epoch: now,
            iface,
            sockets: SocketSet::new(Vec::new()),
            tx,
            scratch: Vec::new(),
            next_id: 0,
            pending: HashMap::new(),
            tcp: HashMap::new(),
            tcp_by_tuple: HashMap::new(),
            udp: HashMap::new(),
            udp_by_id: HashMap::new(),
            laptops: HashMap::new(),
            active: Vec::new(),
            releasing: Vec::new(),
            next_port: *EPHEMERAL_PORTS.start(),
            next_frag_id: 1,
            rx_slots: Slots::new(config.tcp_rx_buffer),
            tx_slots: Slots::new(config.tcp_tx_buffer),
            tx_memory_all: 0,
            config,
        }
    }

    fn timestamp(&self, now: Instant) -> SmolInstant {
        let since = now.saturating_duration_since(self.epoch);
        SmolInstant::from_micros(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
    }

    fn new_id(&mut self) -> FlowId {
        self.next_id += 1;
        FlowId(self.next_id)
    }

    /// Feed one IP packet from a laptop.
    pub fn ingress<'p>(&mut self, packet: &'p [u8], now: Instant) -> Ingress<'p> {
        let ip = match wire::parse_ip(packet) {
            Ok(h) => h,
            Err(e) => return Ingress::Dropped(IngressDrop::Malformed(e)),
        };
        if ip.fragment {
            return Ingress::Dropped(IngressDrop::Fragment);
        }
        let packet = &packet[..ip.total_len];
        let payload = ip.payload(packet);
        let (src_ip, dst_ip) = (IpAddress::from(ip.src), IpAddress::from(ip.dst));
        let checksums = ChecksumCapabilities::default();
        match ip.protocol {
            PROTO_TCP => {
                let Ok(segment) = TcpPacket::new_checked(payload) else {
                    return Ingress::Dropped(IngressDrop::BadTransport);
                };
                let Ok(repr) = TcpRepr::parse(&segment, &src_ip, &dst_ip, &checksums) else {
                    return Ingress::Dropped(IngressDrop::BadTransport);
                };
                let src = SocketAddr::new(ip.src, repr.src_port);
                let dst = SocketAddr::new(ip.dst, repr.dst_port);
                if repr.control == TcpControl::Syn
                    && repr.ack_number.is_none()
                    && let Some(event) = self.first_syn(src, dst, packet)
                {
                    return event;
                }
                self.inject(packet, now);
                self.mark_active(src, dst);
                Ingress::Handled
            }
            PROTO_UDP => {
                let Ok(datagram) = UdpPacket::new_checked(payload) else {
                    return Ingress::Dropped(IngressDrop::BadTransport);
                };
                let Ok(repr) = UdpRepr::parse(&datagram, &src_ip, &dst_ip, &checksums) else {
                    return Ingress::Dropped(IngressDrop::BadTransport);
                };
                let src = SocketAddr::new(ip.src, repr.src_port);
                let dst = SocketAddr::new(ip.dst, repr.dst_port);
                let (id, new) = match self.udp.get_mut(&(src, dst)) {
                    Some(flow) => {
                        flow.last_active = now;
                        (flow.id, false)
                    }
                    None => {
                        if let Some(refused) = self.refuse_over(src.ip(), Limit::UdpFlows) {
                            return refused;
                        }
                        self.laptop_mut(src.ip()).udp += 1;
                        let id = self.new_id();
                        self.udp.insert(
                            (src, dst),
                            UdpFlow {
                                id,
                                last_active: now,
                                counted: true,
                            },
                        );
                        self.udp_by_id.insert(id, (src, dst));
                        (id, true)
                    }
                };
                Ingress::UdpDatagram {
                    id,
                    new,
                    src,
                    dst,
                    payload: datagram.payload(),
                }
            }
            // ICMPv4 only inside IPv4: an IPv6 packet whose next header
            // says 1 is not an echo request (ICMPv6 is 58).
            PROTO_ICMP if !ip.src.is_ipv4() => {
                Ingress::Dropped(IngressDrop::UnsupportedProtocol(PROTO_ICMP))
            }
            PROTO_ICMP => match echo_request(ip.src, ip.dst, payload) {
                Some(key) => Ingress::EchoRequest {
                    key,
                    message: payload,
                },
                None => Ingress::Dropped(IngressDrop::UnsupportedProtocol(PROTO_ICMP)),
            },
            other => Ingress::Dropped(IngressDrop::UnsupportedProtocol(other)),
        }
    }

    /// Send an echo reply to the laptop of `key`, from `key.remote`, with
    /// the laptop's identifier restored (a ping socket's kernel substitutes
    /// its own): `message` is the ICMP reply as received, whose checksum is
    /// not checked again. False when it is not an IPv4 echo reply.
    pub fn echo_reply(&mut self, key: IcmpKey, message: &[u8]) -> bool {
        let (IpAddr::V4(remote), IpAddr::V4(laptop)) = (key.remote, key.laptop) else {
            return false;
        };
        let Ok(icmp) = Icmpv4Packet::new_checked(message) else {
            return false;
        };
        let Ok(Icmpv4Repr::EchoReply { seq_no, data, .. }) =
            Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::ignored())
        else {
            return false;
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
            hop_limit: HOP_LIMIT,
        };
        let caps = ChecksumCapabilities::default();
        self.tx
            .push_with(ip.buffer_len() + reply.buffer_len(), |buf| {
                let mut packet = Ipv4Packet::new_unchecked(&mut *buf);
                ip.emit(&mut packet, &caps);
                reply.emit(
                    &mut Icmpv4Packet::new_unchecked(packet.payload_mut()),
                    &caps,
                );
            });
        self.fragment_queued();
        true
    }

    /// A SYN without ACK: a new flow unless its tuple is known. Returns
    /// `None` when the SYN belongs to an accepted flow and smoltcp should see
    /// it.
    fn first_syn(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        packet: &[u8],
    ) -> Option<Ingress<'static>> {
        if let Some(&id) = self.tcp_by_tuple.get(&(src, dst)) {
            if self.pending.contains_key(&id) {
                // Retransmit while the dial is in progress.
                return Some(Ingress::Handled);
            }
            // A SYN reusing the tuple of a finished connection starts a new
            // one; otherwise it is smoltcp's (a retransmit in SYN-RECEIVED).
            match self.tcp_state(id) {
                Some(TcpState::Closed | TcpState::TimeWait) | None => self.release(id),
                Some(_) => return None,
            }
        }
        // The flow cap first: its RST is final, while a SYN dropped for
        // pending dials comes again.
        for limit in [Limit::TcpFlows, Limit::PendingDials] {
            if let Some(refused) = self.refuse_over(src.ip(), limit) {
                if limit == Limit::TcpFlows {
                    self.queue_rst_for_syn(packet);
                }
                return Some(refused);
            }
        }
        if self.pending.len() >= self.config.max_pending_syns {
            return Some(Ingress::Dropped(IngressDrop::TooManyPendingSyns));
        }
        let laptop = self.laptop_mut(src.ip());
        laptop.tcp += 1;
        laptop.pending += 1;
        let id = self.new_id();
        self.pending.insert(
            id,
            PendingSyn {
                src,
                dst,
                packet: packet.to_vec(),
            },
        );
        self.tcp_by_tuple.insert((src, dst), id);
        Some(Ingress::NewTcp { id, src, dst })
    }

    /// `Some(Refused)` when `laptop` holds as many flows as `limit` allows.
    fn refuse_over(&mut self, laptop: IpAddr, limit: Limit) -> Option<Ingress<'static>> {
        let caps = self.config.per_laptop;
        let held = self.laptops.get(&laptop).copied().unwrap_or_default();
        let (held, cap) = match limit {
            Limit::TcpFlows => (held.tcp, caps.tcp_flows),
            Limit::PendingDials => (held.pending, caps.pending_dials),
            Limit::UdpFlows => (held.udp, caps.udp_flows),
        };
        if held < cap {
            return None;
        }
        let flows = self.laptop_mut(laptop);
        let first = flows.refused & limit.bit() == 0;
        flows.refused |= limit.bit();
        Some(Ingress::Refused {
            laptop,
            limit,
            first,
        })
    }

    fn laptop_mut(&mut self, laptop: IpAddr) -> &mut LaptopFlows {
        self.laptops.entry(laptop).or_default()
    }

    fn uncount(&mut self, laptop: IpAddr, tcp: usize, pending: usize, udp: usize) {
        uncount(&mut self.laptops, laptop, tcp, pending, udp);
    }

    /// What `laptop` holds now (by its tunnel address). Constant time.
    pub fn laptop_flows(&self, laptop: IpAddr) -> LaptopFlows {
        self.laptops.get(&laptop).copied().unwrap_or_default()
    }

    fn mark_active(&mut self, src: SocketAddr, dst: SocketAddr) {
        let Some(&id) = self.tcp_by_tuple.get(&(src, dst)) else {
            return;
        };
        if let Some(flow) = self.tcp.get_mut(&id)
            && !flow.active
        {
            flow.active = true;
            self.active.push(id);
        }
    }

    /// Move the accepted TCP flows that received segments since the last
    /// call into `out` (each once): their state, readable bytes or send
    /// room may have changed. A driver checks these after feeding a batch
    /// of packets instead of walking every flow.
    pub fn take_active(&mut self, out: &mut Vec<FlowId>) {
        for id in self.active.drain(..) {
            if let Some(flow) = self.tcp.get_mut(&id) {
                flow.active = false;
                out.push(id);
            }
        }
    }

    /// Open flows of one laptop: (TCP, UDP). TCP counts flows waiting for
    /// their dial too. A scan: for status queries, not the hot path.
    pub fn flows_of(&self, laptop: IpAddr) -> (usize, usize) {
        let tcp = self
            .tcp_by_tuple
            .keys()
            .filter(|(l, _)| l.ip() == laptop)
            .count();
        let udp = self.udp.keys().filter(|(l, _)| l.ip() == laptop).count();
        (tcp, udp)
    }

    /// Arm a keep-alive on every TCP flow that holds bytes for its laptop
    /// (unsent or unacknowledged), and disarm it on the others. Call from
    /// a periodic sweep (about once a second).
    ///
    /// Why: smoltcp 0.14 can fall silent for good with data queued. When
    /// its retransmission timer fires while the laptop's window is closed,
    /// nothing can be resent and the timer goes idle; if the laptop's next
    /// window update is lost (or the window closed without an ACK that
    /// starts smoltcp's window probes), neither side sends again until the
    /// laptop's application gives up. A keep-alive makes the laptop answer
    /// with its current window within [`STALL_PROBE`]. Flows with empty
    /// send buffers (idle ones) send nothing.
    ///
    /// The same sweep gives back the memory of send buffers it finds
    /// empty (see [`TxMemory`]): their pages go back to the kernel.
    pub fn probe_stalled_flows(&mut self) {
        for flow in self.tcp.values_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(flow.handle);
            let queued = socket.send_queue();
            let want = (queued > 0).then_some(STALL_PROBE.into());
            if socket.keep_alive() != want {
                socket.set_keep_alive(want);
            }
            let m = flow.tx_memory;
            let laptop = flow.tuple.0.ip();
            if queued > 0
                || m.charged == 0
                || (m.written < TX_GIVE_BACK
                    && !self.laptops.get(&laptop).is_some_and(|l| l.tx_starved))
            {
                continue;
            }
            if let Some((_, tx)) = &flow.memory {
                // SAFETY: the buffer is empty: smoltcp reads none of its
                // bytes before writing them again (its ring restarts at
                // the first byte), and nothing else reads them.
                unsafe { tx.give_back_pages() };
            }
            flow.tx_memory = TxMemory::default();
            discharge_tx(
                &mut self.laptops,
                &mut self.tx_memory_all,
                laptop,
                m.charged,
            );
        }
        for l in self.laptops.values_mut() {
            l.tx_starved = false;
        }
    }

    /// Every accepted TCP flow, for periodic sweeps (timeouts close flows
    /// during `egress` without any segment arriving).
    pub fn tcp_flows(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.tcp.keys().copied()
    }

    fn inject(&mut self, packet: &[u8], now: Instant) {
        let timestamp = self.timestamp(now);
        let mut device = IngressDevice {
            rx: Some(packet),
            tx: &mut self.tx,
            mtu: self.config.mtu,
        };
        self.iface
            .poll_ingress_single(timestamp, &mut device, &mut self.sockets);
    }

    /// The driver's dial to the flow's destination succeeded: let smoltcp
    /// answer the laptop's SYN.
    pub fn accept(&mut self, id: FlowId, now: Instant) -> Result<(), FlowError> {
        let syn = self.pending.remove(&id).ok_or(FlowError::UnknownFlow(id))?;
        // No longer pending; still one of the laptop's TCP flows.
        self.uncount(syn.src.ip(), 0, 1, 0);
        let (mut socket, memory) = self.new_tcp_socket();
        if socket.listen(IpListenEndpoint::from(syn.dst)).is_err() {
            drop(socket);
            self.give_back(memory, 0);
            self.tcp_by_tuple.remove(&(syn.src, syn.dst));
            self.uncount(syn.src.ip(), 1, 0, 0);
            return Err(FlowError::InvalidState(id));
        }
        let handle = self.sockets.add(socket);
        self.tcp.insert(
            id,
            TcpFlow {
                handle,
                memory,
                tuple: (syn.src, syn.dst),
                active: false,
                counted: true,
                orphaned_at: None,
                tx_memory: TxMemory::default(),
            },
        );
        self.inject(&syn.packet, now);
        // The listener must have taken exactly this SYN; a listener left in
        // LISTEN could capture another laptop connection's SYN later.
        let socket = self.sockets.get::<tcp::Socket>(handle);
        let took_it = socket.state() == TcpState::SynReceived
            && socket.remote_endpoint().map(SocketAddr::from) == Some(syn.src);
        if !took_it {
            self.release(id);
            return Err(FlowError::InvalidState(id));
        }
        Ok(())
    }

    /// A socket with buffers in slot memory (on the heap if the kernel
    /// refuses a mapping). The memory must go back with `give_back` after
    /// the socket is dropped.
    fn new_tcp_socket(&mut self) -> (tcp::Socket<'static>, Option<(Slot, Slot)>) {
        let memory = match (self.rx_slots.take(), self.tx_slots.take()) {
            (Some(rx), Some(tx)) => Some((rx, tx)),
            (rx, tx) => {
                // SAFETY: neither slot was leased.
                unsafe {
                    if let Some(s) = rx {
                        self.rx_slots.put(s);
                    }
                    if let Some(s) = tx {
                        self.tx_slots.put(s);
                    }
                }
                None
            }
        };
        let (rx, tx) = match &memory {
            // SAFETY: one lease per slot; the socket holding the slices is
            // dropped before the slots go back (`give_back` callers) or
            // before the pools (`Drop for FlowEngine`). Slots may be larger
            // than asked (whole pages); the configured sizes are used.
            Some((rx, tx)) => unsafe {
                (
                    tcp::SocketBuffer::new(&mut rx.as_static_slice()[..self.config.tcp_rx_buffer]),
                    tcp::SocketBuffer::new(&mut tx.as_static_slice()[..self.config.tcp_tx_buffer]),
                )
            },
            None => (
                tcp::SocketBuffer::new(vec![0; self.config.tcp_rx_buffer]),
                tcp::SocketBuffer::new(vec![0; self.config.tcp_tx_buffer]),
            ),
        };
        let mut socket = tcp::Socket::new(rx, tx);
        // A proxy forwards whatever it has at once; coalescing is the
        // endpoints' business.
        socket.set_nagle_enabled(false);
        (socket, memory)
    }

    /// Return a dropped socket's buffer memory; the send buffer's bytes
    /// may have touched its first `tx_touched` bytes (its [`TxMemory`]
    /// charge), so only those pages need giving back.
    fn give_back(&mut self, memory: Option<(Slot, Slot)>, tx_touched: usize) {
        if let Some((rx, tx)) = memory {
            // SAFETY: the socket that borrowed them is gone (callers drop
            // or remove it first).
            unsafe {
                self.rx_slots.put(rx);
                self.tx_slots.put_touched(tx, tx_touched);
            }
        }
    }

    /// Open a TCP connection from `local_ip` (the gateway's own tunnel
    /// address) to `remote` (a laptop's) on a free ephemeral port, which
    /// is returned. The SYN leaves with the next `egress` and is
    /// retransmitted by smoltcp's timers. `tcp_state` then tells the
    /// outcome: `Established` (use the flow like an accepted one), or
    /// `Closed` without having been established (refused: the laptop
    /// answered RST). Segments of the flow mark it active like any other.
    pub fn connect(
        &mut self,
        local_ip: IpAddr,
        remote: SocketAddr,
    ) -> Result<(FlowId, SocketAddr), FlowError> {
        let unaddressable = FlowError::Unaddressable(local_ip, remote);
        if local_ip.is_ipv4() != remote.is_ipv4()
            || local_ip.is_unspecified()
            || remote.ip().is_unspecified()
            || remote.port() == 0
        {
            return Err(unaddressable);
        }
        let local = self.free_port(local_ip, remote)?;
        let (mut socket, memory) = self.new_tcp_socket();
        if socket.connect(self.iface.context(), remote, local).is_err() {
            drop(socket);
            self.give_back(memory, 0);
            return Err(unaddressable);
        }
        let handle = self.sockets.add(socket);
        let id = self.new_id();
        self.tcp.insert(
            id,
            TcpFlow {
                handle,
                memory,
                tuple: (remote, local),
                active: false,
                counted: false,
                orphaned_at: None,
                tx_memory: TxMemory::default(),
            },
        );
        self.tcp_by_tuple.insert((remote, local), id);
        Ok((id, local))
    }

    /// A local endpoint on `ip` that no flow to `remote` uses.
    fn free_port(&mut self, ip: IpAddr, remote: SocketAddr) -> Result<SocketAddr, FlowError> {
        let (first, last) = (*EPHEMERAL_PORTS.start(), *EPHEMERAL_PORTS.end());
        for _ in EPHEMERAL_PORTS {
            let port = self.next_port;
            self.next_port = if port >= last { first } else { port + 1 };
            let local = SocketAddr::new(ip, port);
            if !self.tcp_by_tuple.contains_key(&(remote, local)) {
                return Ok(local);
            }
        }
        Err(FlowError::NoFreePort(remote))
    }

    /// The driver's dial was refused: answer the laptop's SYN with RST.
    pub fn refuse(&mut self, id: FlowId) -> Result<(), FlowError> {
        let syn = self.pending.remove(&id).ok_or(FlowError::UnknownFlow(id))?;
        self.tcp_by_tuple.remove(&(syn.src, syn.dst));
        self.uncount(syn.src.ip(), 1, 1, 0);
        if self.queue_rst_for_syn(&syn.packet) {
            Ok(())
        } else {
            Err(FlowError::InvalidState(id))
        }
    }

    /// Queue the RST answering `packet`, a SYN without ACK that parsed
    /// before. False if it does not parse (nothing queued).
    fn queue_rst_for_syn(&mut self, packet: &[u8]) -> bool {
        let Ok(ip) = wire::parse_ip(packet) else {
            return false;
        };
        let (src_ip, dst_ip) = (IpAddress::from(ip.src), IpAddress::from(ip.dst));
        let checksums = ChecksumCapabilities::default();
        let Ok(segment) = TcpPacket::new_checked(ip.payload(packet)) else {
            return false;
        };
        let Ok(repr) = TcpRepr::parse(&segment, &src_ip, &dst_ip, &checksums) else {
            return false;
        };
        // RFC 9293 3.10.7.1: a SYN without ACK is answered with
        // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
        let rst = TcpRepr {
            src_port: repr.dst_port,
            dst_port: repr.src_port,
            control: TcpControl::Rst,
            seq_number: TcpSeqNumber(0),
            ack_number: Some(repr.seq_number + repr.segment_len()),
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip_repr = IpRepr::new(dst_ip, src_ip, IpProtocol::Tcp, rst.buffer_len(), HOP_LIMIT);
        self.tx.push_with(ip_repr.buffer_len(), |buf| {
            ip_repr.emit(&mut *buf, &checksums);
            let mut tcp = TcpPacket::new_unchecked(&mut buf[ip_repr.header_len()..]);
            rst.emit(&mut tcp, &dst_ip, &src_ip, &checksums);
        });
        true
    }

    /// The destination is unreachable: forget the SYN without answering, so
    /// the laptop's connect times out as it would without the tunnel.
    pub fn discard(&mut self, id: FlowId) -> Result<(), FlowError> {
        let syn = self.pending.remove(&id).ok_or(FlowError::UnknownFlow(id))?;
        self.tcp_by_tuple.remove(&(syn.src, syn.dst));
        self.uncount(syn.src.ip(), 1, 1, 0);
        Ok(())
    }

    fn socket(&mut self, id: FlowId) -> Result<&mut tcp::Socket<'static>, FlowError> {
        let flow = self.tcp.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        Ok(self.sockets.get_mut::<tcp::Socket>(flow.handle))
    }

    /// State of an accepted TCP flow.
    pub fn tcp_state(&self, id: FlowId) -> Option<TcpState> {
        let flow = self.tcp.get(&id)?;
        Some(self.sockets.get::<tcp::Socket>(flow.handle).state())
    }

    /// Queue bytes towards the laptop; returns how many fit (0 when the send
    /// buffer is full: stop reading from the cluster side until it drains).
    pub fn tcp_send(&mut self, id: FlowId, data: &[u8]) -> Result<usize, FlowError> {
        let n = self
            .socket(id)?
            .send_slice(data)
            .map_err(|_| FlowError::InvalidState(id))?;
        self.charge_tx(id, n);
        Ok(n)
    }

    /// How much the flow may queue towards the laptop now: the free space
    /// of its send buffer, less what the memory caps
    /// ([`FlowConfig::tcp_tx_memory_per_laptop`], `tcp_tx_memory_all`)
    /// leave when writing would touch pages not yet charged to it. A
    /// driver reads at most this much from the cluster side
    /// (backpressure). A flow held back by the caps is served again once
    /// a sweep gave memory back.
    pub fn tcp_send_room(&mut self, id: FlowId) -> Result<usize, FlowError> {
        let flow = self.tcp.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        let socket = self.sockets.get::<tcp::Socket>(flow.handle);
        let capacity = socket.send_capacity();
        let free = capacity - socket.send_queue();
        // Writing `n` more bytes charges `min(n, capacity - written)`.
        let uncharged = capacity.saturating_sub(flow.tx_memory.written);
        if uncharged == 0 {
            return Ok(free);
        }
        let laptop = flow.tuple.0.ip();
        let held = self.laptops.get(&laptop).map_or(0, |l| l.tx_memory);
        let left = self
            .config
            .tcp_tx_memory_per_laptop
            .saturating_sub(held)
            .min(
                self.config
                    .tcp_tx_memory_all
                    .saturating_sub(self.tx_memory_all),
            );
        if left >= uncharged.min(free) {
            return Ok(free);
        }
        self.laptop_mut(laptop).tx_starved = true;
        Ok(left)
    }

    /// `n` bytes were written into the flow's send buffer: charge the
    /// pages they may have touched (see [`TxMemory`]).
    fn charge_tx(&mut self, id: FlowId, n: usize) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let capacity = self.sockets.get::<tcp::Socket>(flow.handle).send_capacity();
        let m = &mut flow.tx_memory;
        m.written = m.written.saturating_add(n);
        let charged = m.written.min(capacity);
        let added = charged.saturating_sub(m.charged);
        m.charged = charged;
        if added > 0 {
            self.tx_memory_all += added;
            self.laptops.entry(flow.tuple.0.ip()).or_default().tx_memory += added;
        }
    }

    /// What `laptop` holds of send-buffer memory, and all laptops.
    pub fn tx_memory(&self, laptop: IpAddr) -> (usize, usize) {
        (
            self.laptops.get(&laptop).map_or(0, |l| l.tx_memory),
            self.tx_memory_all,
        )
    }

    /// Bytes queued towards the laptop and not yet acknowledged by it
    /// (sent or not): what a silent laptop leaves waiting.
    pub fn tcp_send_queue(&self, id: FlowId) -> Result<usize, FlowError> {
        let flow = self.tcp.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        Ok(self.sockets.get::<tcp::Socket>(flow.handle).send_queue())
    }

    /// Bytes the laptop sent that wait in the flow's receive buffer.
    pub fn tcp_recv_queue(&self, id: FlowId) -> Result<usize, FlowError> {
        let flow = self.tcp.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        Ok(self.sockets.get::<tcp::Socket>(flow.handle).recv_queue())
    }

    /// Read bytes the laptop sent. Reading opens the TCP window again, so a
    /// driver that stops reading applies backpressure to the laptop.
    pub fn tcp_recv(&mut self, id: FlowId, buf: &mut [u8]) -> Result<TcpRead, FlowError> {
        match self.socket(id)?.recv_slice(buf) {
            Ok(0) => Ok(TcpRead::WouldBlock),
            Ok(n) => Ok(TcpRead::Data(n)),
            Err(tcp::RecvError::Finished) => Ok(TcpRead::Eof),
            Err(tcp::RecvError::InvalidState) => Err(FlowError::InvalidState(id)),
        }
    }

    /// Like [`FlowEngine::tcp_recv`], appending at most `max` bytes to
    /// `out` straight from smoltcp's buffer (no zero-filled scratch buffer
    /// and second copy in between).
    pub fn tcp_recv_append(
        &mut self,
        id: FlowId,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<TcpRead, FlowError> {
        let socket = self.socket(id)?;
        let mut total = 0;
        // Twice at most: the ring buffer's bytes may wrap around.
        while total < max {
            let room = max - total;
            let taken = socket.recv(|data| {
                let n = data.len().min(room);
                out.extend_from_slice(&data[..n]);
                (n, n)
            });
            match taken {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(tcp::RecvError::Finished) if total == 0 => return Ok(TcpRead::Eof),
                Err(tcp::RecvError::Finished) => break,
                Err(tcp::RecvError::InvalidState) => return Err(FlowError::InvalidState(id)),
            }
        }
        Ok(if total == 0 {
            TcpRead::WouldBlock
        } else {
            TcpRead::Data(total)
        })
    }

    /// Offer the bytes the laptop sent to `f`, straight from smoltcp's
    /// buffer (the contiguous part; call again for bytes past the ring's
    /// end): `f` returns how many it took, e.g. what a non-blocking `write`
    /// to the cluster socket wrote, and a result. `f` gets an empty slice
    /// when nothing is queued. `Ok(None)`: the laptop closed its sending
    /// half and every byte was taken. What `f` leaves stays queued, and the
    /// window stays closed by that much (backpressure).
    pub fn tcp_recv_with<R>(
        &mut self,
        id: FlowId,
        f: impl FnOnce(&[u8]) -> (usize, R),
    ) -> Result<Option<R>, FlowError> {
        match self.socket(id)?.recv(|data| f(data)) {
            Ok(r) => Ok(Some(r)),
            Err(tcp::RecvError::Finished) => Ok(None),
            Err(tcp::RecvError::InvalidState) => Err(FlowError::InvalidState(id)),
        }
    }

    /// Let `f` fill free space of the send buffer towards the laptop
    /// (contiguous; empty when the buffer is full), e.g. by a non-blocking
    /// `read` from the cluster socket; `f` returns how many bytes it wrote
    /// and a result. Errs unless the flow may send (established, or the
    /// laptop half-closed).
    pub fn tcp_send_with<R>(
        &mut self,
        id: FlowId,
        f: impl FnOnce(&mut [u8]) -> (usize, R),
    ) -> Result<R, FlowError> {
        let (n, r) = self
            .socket(id)?
            .send(|buf| {
                let (n, r) = f(buf);
                (n, (n, r))
            })
            .map_err(|_| FlowError::InvalidState(id))?;
        self.charge_tx(id, n);
        Ok(r)
    }

    /// Close the sending half towards the laptop (FIN after buffered data).
    pub fn tcp_close(&mut self, id: FlowId) -> Result<(), FlowError> {
        self.socket(id)?.close();
        Ok(())
    }

    /// Reset the flow (RST on the next egress).
    pub fn tcp_abort(&mut self, id: FlowId) -> Result<(), FlowError> {
        self.socket(id)?.abort();
        Ok(())
    }

    /// Apply the release rules to a TCP flow after the driver moved what it
    /// could; `done`: both sides finished cleanly (the laptop's FIN was
    /// passed on, and the other end's FIN is queued towards the laptop).
    ///
    /// - CLOSED, done: released now.
    /// - TIME-WAIT, done: the laptop's FIN has just arrived and its ACK
    ///   leaves with the next egress; released after it. No TIME-WAIT is
    ///   kept (a retransmitted FIN then draws a RST). Released at once, the
    ///   ACK was never sent and the laptop sat in LAST-ACK until a loss
    ///   probe drew a RST.
    /// - CLOSED (or LISTEN) otherwise: reset by the laptop, or timed out;
    ///   released now. A RST answering the SYN-ACK (the laptop gave up
    ///   connecting) sends smoltcp back to LISTEN rather than CLOSED; kept,
    ///   such a flow would hold its other end open for good.
    /// - anything else: open.
    pub fn tcp_settle(&mut self, id: FlowId, done: bool) -> Settled {
        match self.tcp_state(id) {
            Some(TcpState::Closed) if done => {
                self.release(id);
                Settled::Closed
            }
            Some(TcpState::TimeWait) if done => {
                self.releasing.push(id);
                Settled::Closed
            }
            Some(TcpState::Closed | TcpState::Listen) => {
                self.release(id);
                Settled::Reset
            }
            _ => Settled::Open,
        }
    }

    /// Reset a flow: RST with the next egress (if it has a socket; a
    /// pending SYN has nothing to answer), then released.
    pub fn tcp_reset(&mut self, id: FlowId) {
        let _ = self.tcp_abort(id);
        self.releasing.push(id);
    }

    /// The driver's end of an accepted flow is gone (nobody reads it any
    /// more) as of `now` or earlier: true once that has lasted
    /// [`FlowConfig::orphan_linger`]; then reset it ([`FlowEngine::tcp_reset`]).
    pub fn tcp_orphaned(&mut self, id: FlowId, now: Instant) -> bool {
        let linger = self.config.orphan_linger;
        self.tcp.get_mut(&id).is_some_and(|flow| {
            let since = *flow.orphaned_at.get_or_insert(now);
            now.saturating_duration_since(since) >= linger
        })
    }

    /// Forget a flow and free its socket. Call once `tcp_state` is `Closed`
    /// (or use `tcp_reset`/`tcp_settle`, which release after the egress
    /// that carries the RST or last ACK).
    pub fn release(&mut self, id: FlowId) {
        if let Some(flow) = self.tcp.remove(&id) {
            drop(self.sockets.remove(flow.handle));
            self.give_back(flow.memory, flow.tx_memory.charged);
            discharge_tx(
                &mut self.laptops,
                &mut self.tx_memory_all,
                flow.tuple.0.ip(),
                flow.tx_memory.charged,
            );
            self.tcp_by_tuple.remove(&flow.tuple);
            if flow.counted {
                self.uncount(flow.tuple.0.ip(), 1, 0, 0);
            }
        }
        if let Some(syn) = self.pending.remove(&id) {
            self.tcp_by_tuple.remove(&(syn.src, syn.dst));
            self.uncount(syn.src.ip(), 1, 1, 0);
        }
        if let Some(tuple) = self.udp_by_id.remove(&id)
            && let Some(flow) = self.udp.remove(&tuple)
            && flow.counted
        {
            self.uncount(tuple.0.ip(), 0, 0, 1);
        }
    }

    /// Open a UDP flow from `local_ip` (the gateway's own tunnel address)
    /// to `remote` (a laptop's) on a free ephemeral port, which is
    /// returned: [`FlowEngine::udp_send`] sends datagrams to the laptop
    /// from that port, and the laptop's datagrams back to it arrive as
    /// [`Ingress::UdpDatagram`] of this flow. Not counted in the laptop's
    /// caps and never expired here: the caller releases it.
    pub fn udp_open(
        &mut self,
        local_ip: IpAddr,
        remote: SocketAddr,
        now: Instant,
    ) -> Result<(FlowId, SocketAddr), FlowError> {
        if local_ip.is_ipv4() != remote.is_ipv4()
            || local_ip.is_unspecified()
            || remote.ip().is_unspecified()
            || remote.port() == 0
        {
            return Err(FlowError::Unaddressable(local_ip, remote));
        }
        let (first, last) = (*EPHEMERAL_PORTS.start(), *EPHEMERAL_PORTS.end());
        let mut local = None;
        for _ in EPHEMERAL_PORTS {
            let port = self.next_port;
            self.next_port = if port >= last { first } else { port + 1 };
            let candidate = SocketAddr::new(local_ip, port);
            if !self.udp.contains_key(&(remote, candidate)) {
                local = Some(candidate);
                break;
            }
        }
        let local = local.ok_or(FlowError::NoFreePort(remote))?;
        let id = self.new_id();
        self.udp.insert(
            (remote, local),
            UdpFlow {
                id,
                last_active: now,
                counted: false,
            },
        );
        self.udp_by_id.insert(id, (remote, local));
        Ok((id, local))
    }

    /// Send a UDP datagram from the flow's destination back to the laptop
    /// (for a flow from [`FlowEngine::udp_open`]: from the gateway's end to
    /// the laptop).
    pub fn udp_send(&mut self, id: FlowId, payload: &[u8], now: Instant) -> Result<(), FlowError> {
        let &(laptop, remote) = self.udp_by_id.get(&id).ok_or(FlowError::UnknownFlow(id))?;
        if let Some(flow) = self.udp.get_mut(&(laptop, remote)) {
            flow.last_active = now;
        }
        let repr = UdpRepr {
            src_port: remote.port(),
            dst_port: laptop.port(),
        };
        let udp_len = smoltcp::wire::UDP_HEADER_LEN + payload.len();
        let (src_ip, dst_ip) = (IpAddress::from(remote.ip()), IpAddress::from(laptop.ip()));
        let ip_repr = IpRepr::new(src_ip, dst_ip, IpProtocol::Udp, udp_len, HOP_LIMIT);
        let limit = match ip_repr {
            // IPv4's total length; IPv6's payload length.
            IpRepr::Ipv4(_) => ip_repr.buffer_len(),
            IpRepr::Ipv6(_) => udp_len,
        };
        if limit > usize::from(u16::MAX) {
            return Err(FlowError::TooLarge(payload.len()));
        }
        let checksums = ChecksumCapabilities::default();
        self.tx.push_with(ip_repr.buffer_len(), |buf| {
            ip_repr.emit(&mut *buf, &checksums);
            let mut udp = UdpPacket::new_unchecked(&mut buf[ip_repr.header_len()..]);
            repr.emit(
                &mut udp,
                &src_ip,
                &dst_ip,
                payload.len(),
                |p| p.copy_from_slice(payload),
                &checksums,
            );
        });
        self.fragment_queued();
        Ok(())
    }

    /// Fragments the packet just queued when it exceeds the MTU.
    fn fragment_queued(&mut self) {
        let id = self.next_frag_id;
        self.next_frag_id = self.next_frag_id.wrapping_add(1).max(1);
        self.tx
            .fragment_last(self.config.datagram_mtu.min(self.config.mtu), id);
    }

    /// Expire UDP flows idle for `udp_idle_timeout`, reporting each. Call
    /// about once a second; it walks every UDP flow.
    pub fn expire(&mut self, now: Instant, mut expired: impl FnMut(FlowId)) {
        let timeout = self.config.udp_idle_timeout;
        let by_id = &mut self.udp_by_id;
        let laptops = &mut self.laptops;
        self.udp.retain(|(laptop, _), flow| {
            let keep = !flow.counted || now.saturating_duration_since(flow.last_active) < timeout;
            if !keep {
                by_id.remove(&flow.id);
                uncount(laptops, laptop.ip(), 0, 0, 1);
                expired(flow.id);
            }
            keep
        });
    }

    /// Hand every packet ready for the laptops to `out`: replies queued while
    /// processing input, then whatever smoltcp's sockets transmit.
    pub fn egress(&mut self, now: Instant, out: &mut impl FnMut(&[u8])) {
        self.tx.drain(out);
        let timestamp = self.timestamp(now);
        self.iface.poll_maintenance(timestamp);
        let mut device = EgressDevice {
            scratch: &mut self.scratch,
            out,
            mtu: self.config.mtu,
        };
        // Each call is bounded work; repeat while sockets still change.
        for _ in 0..64 {
            if self
                .iface
                .poll_egress(timestamp, &mut device, &mut self.sockets)
                == smoltcp::iface::PollResult::None
            {
                break;
            }
        }
        let mut releasing = std::mem::take(&mut self.releasing);
        for id in releasing.drain(..) {
            self.release(id);
        }
        self.releasing = releasing;
    }

    /// How long until `egress` has timer work (retransmits, delayed ACKs,
    /// keepalives). `None`: nothing until new input.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        if !self.tx.queued.is_empty() {
            return Some(Duration::ZERO);
        }
        let timestamp = self.timestamp(now);
        self.iface
            .poll_delay(timestamp, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::TcpSeqNumber as Seq;
    use std::net::IpAddr;

    const LAPTOP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)), 40000);
    const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 80);

    fn syn_repr(seq: i32) -> TcpRepr<'static> {
        TcpRepr {
            src_port: LAPTOP.port(),
            dst_port: SERVICE.port(),
            control: TcpControl::Syn,
            seq_number: Seq(seq),
            ack_number: None,
            window_len: 64240,
            window_scale: Some(7),
            max_seg_size: Some(8960),
            sack_permitted: true,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        }
    }

    /// An IP packet carrying `tcp` from `src` to `dst`.
    fn tcp_packet(src: SocketAddr, dst: SocketAddr, tcp: &TcpRepr) -> Vec<u8> {
        let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
        let ip = IpRepr::new(s, d, IpProtocol::Tcp, tcp.buffer_len(), 64);
        let mut buf = vec![0; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut buf[ip.header_len()..]),
            &s,
            &d,
            &caps,
        );
        buf
    }

    fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
        let len = 8 + payload.len();
        let ip = IpRepr::new(s, d, IpProtocol::Udp, len, 64);
        let mut buf = vec![0; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        }
        .emit(
            &mut UdpPacket::new_unchecked(&mut buf[ip.header_len()..]),
            &s,
            &d,
            payload.len(),
            |p| p.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    /// A parsed TCP segment the engine emitted.
    #[derive(Debug)]
    struct Seg {
        src: SocketAddr,
        dst: SocketAddr,
        control: TcpControl,
        seq: Seq,
        ack: Option<Seq>,
        mss: Option<u16>,
        payload: Vec<u8>,
    }

    fn parse_tcp(packet: &[u8]) -> Seg {
        let ip = wire::parse_ip(packet).expect("engine emits valid IP");
        assert_eq!(ip.protocol, PROTO_TCP);
        let (s, d) = (IpAddress::from(ip.src), IpAddress::from(ip.dst));
        let seg = TcpPacket::new_checked(ip.payload(packet)).expect("valid TCP");
        let r = TcpRepr::parse(&seg, &s, &d, &ChecksumCapabilities::default())
            .expect("valid TCP checksum");
        Seg {
            src: SocketAddr::new(ip.src, r.src_port),
            dst: SocketAddr::new(ip.dst, r.dst_port),
            control: r.control,
            seq: r.seq_number,
            ack: r.ack_number,
            mss: r.max_seg_size,
            payload: r.payload.to_vec(),
        }
    }

    fn drain(engine: &mut FlowEngine, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        engine.egress(now, &mut |p: &[u8]| out.push(p.to_vec()));
        out
    }

    fn new_flow(engine: &mut FlowEngine, now: Instant) -> FlowId {
        match engine.ingress(&tcp_packet(LAPTOP, SERVICE, &syn_repr(1000)), now) {
            Ingress::NewTcp { id, src, dst } => {
                assert_eq!((src, dst), (LAPTOP, SERVICE));
                id
            }
            other => panic!("expected NewTcp, got {other:?}"),
        }
    }

    #[test]
    fn syn_waits_for_the_driver_then_refuse_answers_rst() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let id = new_flow(&mut e, t0);
        assert!(drain(&mut e, t0).is_empty(), "no SYN-ACK before the dial");
        // A retransmitted SYN is absorbed, not reported again.
        assert_eq!(
            e.ingress(&tcp_packet(LAPTOP, SERVICE, &syn_repr(1000)), t0),
            Ingress::Handled
        );
        e.refuse(id).expect("pending");
        let out = drain(&mut e, t0);
        assert_eq!(out.len(), 1);
        let rst = parse_tcp(&out[0]);
        assert_eq!(rst.control, TcpControl::Rst);
        assert_eq!((rst.src, rst.dst), (SERVICE, LAPTOP));
        assert_eq!(rst.ack, Some(Seq(1001)));
        assert_eq!(e.refuse(id), Err(FlowError::UnknownFlow(id)));
        // The tuple is free again: a new SYN is a new flow.
        assert_ne!(new_flow(&mut e, t0), id);
    }

    #[test]
    fn accept_handshake_and_bytes_both_ways() {
        let t0 = Instant::now();
        let config = FlowConfig::default();
        let mtu = config.mtu;
        let mut e = FlowEngine::new(config, t0);
        let id = new_flow(&mut e, t0);
        e.accept(id, t0).expect("pending");

        let out = drain(&mut e, t0);
        assert_eq!(out.len(), 1, "one SYN-ACK");
        let synack = parse_tcp(&out[0]);
        assert_eq!(synack.control, TcpControl::Syn);
        assert_eq!(synack.ack, Some(Seq(1001)));
        assert_eq!((synack.src, synack.dst), (SERVICE, LAPTOP));
        let mss = synack.mss.expect("SYN-ACK carries MSS");
        assert!(usize::from(mss) <= mtu - 40, "mss {mss} for mtu {mtu}");

        // Laptop completes the handshake with data in the ACK.
        let t1 = t0 + Duration::from_millis(1);
        let mut ack = syn_repr(1001);
        ack.control = TcpControl::Psh;
        ack.ack_number = Some(synack.seq + 1);
        ack.window_scale = None;
        ack.max_seg_size = None;
        ack.sack_permitted = false;
        ack.payload = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(
            e.ingress(&tcp_packet(LAPTOP, SERVICE, &ack), t1),
            Ingress::Handled
        );
        assert_eq!(e.tcp_state(id), Some(TcpState::Established));
        let mut active = Vec::new();
        e.take_active(&mut active);
        assert_eq!(active, vec![id], "the segment marks its flow active");
        active.clear();
        e.take_active(&mut active);
        assert!(active.is_empty(), "each mark is taken once");
        assert_eq!(e.tcp_recv_queue(id), Ok(18));
        let room = e.tcp_send_room(id).expect("accepted");
        assert_eq!(room, 64 * 1024);
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        assert_eq!(e.tcp_recv_append(id, &mut got, 4), Ok(TcpRead::Data(4)));
        assert_eq!(e.tcp_recv_append(id, &mut got, 64), Ok(TcpRead::Data(14)));
        assert_eq!(got, b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(e.tcp_recv_append(id, &mut got, 64), Ok(TcpRead::WouldBlock));
        assert_eq!(e.tcp_recv(id, &mut buf), Ok(TcpRead::WouldBlock));

        // Gateway → laptop, then FIN.
        assert_eq!(e.tcp_send(id, b"HTTP/1.0 200 OK\r\n"), Ok(17));
        e.tcp_close(id).expect("open");
        let t2 = t1 + Duration::from_millis(1);
        let segs: Vec<Seg> = drain(&mut e, t2).iter().map(|p| parse_tcp(p)).collect();
        let data: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(data, b"HTTP/1.0 200 OK\r\n");
        assert!(segs.iter().all(|s| s.ack == Some(Seq(1001 + 18))));
        assert!(
            segs.iter().any(|s| s.control == TcpControl::Fin),
            "FIN after the data: {segs:?}"
        );

        // Laptop half-closes too: the driver sees EOF.
        let mut fin = syn_repr(1001 + 18);
        fin.control = TcpControl::Fin;
        fin.ack_number = Some(synack.seq + 1 + 17 + 1);
        fin.window_scale = None;
        fin.max_seg_size = None;
        fin.sack_permitted = false;
        e.ingress(&tcp_packet(LAPTOP, SERVICE, &fin), t2);
        assert_eq!(e.tcp_recv(id, &mut buf), Ok(TcpRead::Eof));
        assert_eq!(e.tcp_state(id), Some(TcpState::TimeWait));
        e.release(id);
        assert_eq!(e.tcp_state(id), None);
    }

    /// An IPv4 packet carrying the ICMP message `icmp`.
    fn icmp_packet(src: Ipv4Addr, dst: Ipv4Addr, icmp: &Icmpv4Repr) -> Vec<u8> {
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.buffer_len(),
            hop_limit: 64,
        };
        let caps = ChecksumCapabilities::default();
        let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut packet, &caps);
        icmp.emit(
            &mut Icmpv4Packet::new_unchecked(packet.payload_mut()),
            &caps,
        );
        buf
    }

    #[test]
    fn icmp_echo_requests_are_reported_and_replies_built() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (laptop, pod) = (Ipv4Addr::new(100, 64, 0, 2), Ipv4Addr::new(10, 244, 0, 7));
        let request = Icmpv4Repr::EchoRequest {
            ident: 77,
            seq_no: 3,
            data: b"ping",
        };
        let packet = icmp_packet(laptop, pod, &request);
        let key = IcmpKey {
            laptop: IpAddr::V4(laptop),
            remote: IpAddr::V4(pod),
            ident: 77,
        };
        match e.ingress(&packet, t0) {
            Ingress::EchoRequest { key: k, message } => {
                assert_eq!(k, key);
                assert_eq!(message, &packet[20..], "the ICMP message as sent");
            }
            other => panic!("expected EchoRequest, got {other:?}"),
        }
        // The same message inside IPv6 with next header 1 is no echo
        // request (it once switched ping off for the whole gateway).
        let mut v6 = vec![0x60, 0, 0, 0];
        v6.extend_from_slice(
            &u16::try_from(packet.len() - 20)
                .expect("small")
                .to_be_bytes(),
        );
        v6.extend_from_slice(&[1, 64]);
        v6.extend_from_slice(
            &"fd00::2"
                .parse::<std::net::Ipv6Addr>()
                .expect("literal")
                .octets(),
        );
        v6.extend_from_slice(
            &"fd00::7"
                .parse::<std::net::Ipv6Addr>()
                .expect("literal")
                .octets(),
        );
        v6.extend_from_slice(&packet[20..]);
        assert!(
            !matches!(e.ingress(&v6, t0), Ingress::EchoRequest { .. }),
            "an IPv6 packet with next header 1 taken for an ICMPv4 echo"
        );
        // Anything else ICMP, or a bad checksum, is dropped.
        let reply = Icmpv4Repr::EchoReply {
            ident: 77,
            seq_no: 3,
            data: b"ping",
        };
        let unsolicited = icmp_packet(laptop, pod, &reply);
        assert_eq!(
            e.ingress(&unsolicited, t0),
            Ingress::Dropped(IngressDrop::UnsupportedProtocol(PROTO_ICMP))
        );
        let mut corrupt = packet.clone();
        corrupt[20 + 8] ^= 1;
        assert_eq!(
            e.ingress(&corrupt, t0),
            Ingress::Dropped(IngressDrop::UnsupportedProtocol(PROTO_ICMP))
        );

        // The ping socket's reply carries the kernel's identifier; the
        // laptop gets its own back, from the pod.
        let mut from_kernel = vec![0u8; reply.buffer_len()];
        Icmpv4Repr::EchoReply {
            ident: 4242,
            seq_no: 3,
            data: b"ping",
        }
        .emit(
            &mut Icmpv4Packet::new_unchecked(&mut from_kernel[..]),
            &ChecksumCapabilities::default(),
        );
        assert!(e.echo_reply(key, &from_kernel));
        let out = drain(&mut e, t0);
        assert_eq!(out, vec![icmp_packet(pod, laptop, &reply)]);
        assert!(!e.echo_reply(key, b"short"), "not an echo reply");
    }

    /// A segment from the laptop on the flow of `new_flow`.
    fn laptop_seg(control: TcpControl, seq: i32, ack: Option<Seq>) -> Vec<u8> {
        laptop_seg_from(LAPTOP, control, seq, ack)
    }

    /// A segment from `src` to SERVICE, without options.
    fn laptop_seg_from(
        src: SocketAddr,
        control: TcpControl,
        seq: i32,
        ack: Option<Seq>,
    ) -> Vec<u8> {
        let mut r = syn_repr(seq);
        r.src_port = src.port();
        r.control = control;
        r.ack_number = ack;
        r.window_scale = None;
        r.max_seg_size = None;
        r.sack_permitted = false;
        tcp_packet(src, SERVICE, &r)
    }

    /// An accepted flow with the laptop's handshake complete; the
    /// gateway's next sequence number.
    fn established(e: &mut FlowEngine, now: Instant) -> (FlowId, Seq) {
        established_from(e, LAPTOP, now)
    }

    /// The same from `src` (another port, another laptop), while other
    /// flows may have segments queued.
    fn established_from(e: &mut FlowEngine, src: SocketAddr, now: Instant) -> (FlowId, Seq) {
        let id = new_id(syn_from(e, src, now));
        e.accept(id, now).expect("pending");
        let synack = drain(e, now)
            .iter()
            .map(|p| parse_tcp(p))
            .find(|s| s.dst == src && s.control == TcpControl::Syn)
            .expect("SYN-ACK");
        let ours = synack.seq + 1;
        e.ingress(
            &laptop_seg_from(src, TcpControl::None, 1001, Some(ours)),
            now,
        );
        assert_eq!(e.tcp_state(id), Some(TcpState::Established));
        (id, ours)
    }

    /// The laptop's data segment from `seq` with `payload` (and `control`).
    fn laptop_data(seq: i32, ack: Seq, control: TcpControl, payload: &[u8]) -> Vec<u8> {
        let mut r = syn_repr(seq);
        r.control = control;
        r.ack_number = Some(ack);
        r.window_scale = None;
        r.max_seg_size = None;
        r.sack_permitted = false;
        r.payload = payload;
        tcp_packet(LAPTOP, SERVICE, &r)
    }

    /// Everything the flow's receive buffer holds, and whether the laptop's
    /// FIN came after it.
    fn take_received(e: &mut FlowEngine, id: FlowId) -> (Vec<u8>, bool) {
        let mut all = Vec::new();
        loop {
            match e
                .tcp_recv_with(id, |d| (d.len(), d.to_vec()))
                .expect("flow")
            {
                Some(d) if d.is_empty() => return (all, false),
                Some(d) => all.extend_from_slice(&d),
                None => return (all, true),
            }
        }
    }

    /// A last segment with a FIN that runs past the window's right edge (a
    /// peer may send up to the edge it was told before; smoltcp's window
    /// rounding can move the edge back) has its tail cut off: its FIN must
    /// wait for those octets. smoltcp 0.14 took the FIN and ended the stream
    /// without them (a 5-minute soak lost 4 bytes of a 4 MiB upload so;
    /// vendor/smoltcp/BURROW.md).
    #[test]
    fn a_fin_past_the_window_waits_for_the_octets_cut_off() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(
            FlowConfig {
                tcp_rx_buffer: 4096,
                ..FlowConfig::default()
            },
            t0,
        );
        let (id, ours) = established(&mut e, t0);
        let data: Vec<u8> = (0..4100u32).map(|i| (i * 7) as u8).collect();
        // The window is 4,096 octets from 1001: the last segment ends 4
        // octets past it, with the FIN.
        for (at, end, control) in [
            (0, 1300, TcpControl::None),
            (1300, 2600, TcpControl::None),
            (2600, 3900, TcpControl::None),
            (3900, 4100, TcpControl::Fin),
        ] {
            let seq = 1001 + at as i32;
            e.ingress(&laptop_data(seq, ours, control, &data[at..end]), t0);
        }
        let (got, fin) = take_received(&mut e, id);
        assert_eq!(got.len(), 4096);
        assert_eq!(&got[..], &data[..4096]);
        assert!(!fin, "the FIN was taken before the 4 octets it follows");
        // The laptop sends them again with its FIN: now the stream ends.
        let _ = drain(&mut e, t0);
        e.ingress(
            &laptop_data(1001 + 4096, ours, TcpControl::Fin, &data[4096..]),
            t0,
        );
        let (rest, fin) = take_received(&mut e, id);
        assert_eq!(&rest[..], &data[4096..]);
        assert!(fin);
    }

    /// Fill the flow's send buffer as far as its room allows; bytes queued.
    fn fill(e: &mut FlowEngine, id: FlowId) -> usize {
        let room = e.tcp_send_room(id).expect("flow");
        e.tcp_send(id, &vec![7u8; room]).expect("send")
    }

    #[test]
    fn send_buffer_memory_is_capped_per_laptop_and_given_back_when_empty() {
        let t0 = Instant::now();
        let kib = 1024;
        let mut e = FlowEngine::new(
            FlowConfig {
                tcp_tx_buffer: 64 * kib,
                tcp_tx_memory_per_laptop: 160 * kib,
                tcp_tx_memory_all: 200 * kib,
                ..FlowConfig::default()
            },
            t0,
        );
        let a = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)), port);
        let b = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3)), port);
        // Laptop A: two flows fill their 64 KiB buffers (its window stays
        // shut: nothing is acknowledged); the third gets what is left of
        // A's 160 KiB, the fourth nothing.
        let a1 = established_from(&mut e, a(40001), t0).0;
        let a2 = established_from(&mut e, a(40002), t0).0;
        let a3 = established_from(&mut e, a(40003), t0).0;
        let a4 = established_from(&mut e, a(40004), t0).0;
        assert_eq!(fill(&mut e, a1), 64 * kib);
        assert_eq!(fill(&mut e, a2), 64 * kib);
        assert_eq!(fill(&mut e, a3), 32 * kib);
        assert_eq!(e.tcp_send_room(a4).expect("flow"), 0);
        assert_eq!(e.tx_memory(a(0).ip()), (160 * kib, 160 * kib));
        // A flow whose pages are all charged may go on using them.
        let (b1, b_seq) = established_from(&mut e, b(40001), t0);
        // Laptop B is held only by what is left for all: 40 KiB.
        assert_eq!(fill(&mut e, b1), 40 * kib);
        assert_eq!(e.tx_memory(b(0).ip()), (40 * kib, 200 * kib));
        // B acknowledges everything: its buffer is empty, and the sweep
        // gives its memory back; A's stalled buffers keep theirs.
        let _ = drain(&mut e, t0);
        let ack = Some(b_seq + 40 * kib);
        e.ingress(&laptop_seg_from(b(40001), TcpControl::None, 1001, ack), t0);
        assert_eq!(e.tcp_send_queue(b1).expect("flow"), 0);
        assert_eq!(e.tx_memory(b(0).ip()).0, 40 * kib, "charged until a sweep");
        e.probe_stalled_flows();
        assert_eq!(e.tx_memory(b(0).ip()), (0, 160 * kib));
        // Its buffer works on, from zeroed pages.
        assert_eq!(e.tcp_send(b1, b"after").expect("send"), 5);
        let sent = drain(&mut e, t0);
        assert!(
            sent.iter()
                .map(|p| parse_tcp(p))
                .any(|s| s.dst == b(40001) && s.payload == b"after"),
            "the bytes written after the give-back go out as written"
        );
        assert_eq!(
            e.tcp_send_room(a4).expect("flow"),
            0,
            "A is still at its cap"
        );
        // Releasing one of A's flows gives A room again.
        e.tcp_abort(a1).expect("flow");
        let _ = drain(&mut e, t0);
        e.release(a1);
        assert_eq!(e.tx_memory(a(0).ip()), (96 * kib, 96 * kib + 5));
        assert_eq!(fill(&mut e, a4), 64 * kib);
    }

    #[test]
    fn time_wait_is_released_after_the_egress_that_acks_the_laptops_fin() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, ours) = established(&mut e, t0);
        assert_eq!(e.tcp_settle(id, false), Settled::Open);
        // The cluster side closes first, then the laptop.
        e.tcp_close(id).expect("open");
        assert!(
            drain(&mut e, t0)
                .iter()
                .any(|p| parse_tcp(p).control == TcpControl::Fin)
        );
        e.ingress(&laptop_seg(TcpControl::Fin, 1001, Some(ours + 1)), t0);
        assert_eq!(e.tcp_state(id), Some(TcpState::TimeWait));
        assert_eq!(
            e.tcp_settle(id, false),
            Settled::Open,
            "only when both sides are done"
        );
        assert_eq!(e.tcp_settle(id, true), Settled::Closed);
        assert!(e.tcp_state(id).is_some(), "kept until its ACK is out");
        let out: Vec<Seg> = drain(&mut e, t0).iter().map(|p| parse_tcp(p)).collect();
        assert!(
            out.iter().any(|s| s.ack == Some(Seq(1002))),
            "the laptop's FIN is acknowledged: {out:?}"
        );
        assert_eq!(e.tcp_state(id), None);
        assert_eq!(e.flows_of(LAPTOP.ip()), (0, 0));
    }

    #[test]
    fn a_flow_closed_both_ways_is_released_at_once() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, ours) = established(&mut e, t0);
        // The laptop closes first; then the cluster side, whose FIN the
        // laptop acknowledges.
        e.ingress(&laptop_seg(TcpControl::Fin, 1001, Some(ours)), t0);
        assert_eq!(e.tcp_recv(id, &mut []), Ok(TcpRead::Eof));
        e.tcp_close(id).expect("open");
        drain(&mut e, t0);
        e.ingress(&laptop_seg(TcpControl::None, 1002, Some(ours + 1)), t0);
        assert_eq!(e.tcp_state(id), Some(TcpState::Closed));
        assert_eq!(e.tcp_settle(id, true), Settled::Closed);
        assert_eq!(e.tcp_state(id), None);
        assert_eq!(e.flows_of(LAPTOP.ip()), (0, 0));
    }

    #[test]
    fn a_reset_from_the_laptop_releases_the_flow() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, ours) = established(&mut e, t0);
        e.ingress(&laptop_seg(TcpControl::Rst, 1001, Some(ours)), t0);
        assert_eq!(e.tcp_settle(id, false), Settled::Reset);
        assert_eq!(e.tcp_state(id), None);
        assert_eq!(e.flows_of(LAPTOP.ip()), (0, 0));
    }

    #[test]
    fn a_laptop_giving_up_mid_handshake_is_a_reset() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let id = new_flow(&mut e, t0);
        e.accept(id, t0).expect("pending");
        let synack = parse_tcp(&drain(&mut e, t0)[0]);
        // RST answering the SYN-ACK: smoltcp goes back to LISTEN.
        e.ingress(&laptop_seg(TcpControl::Rst, 1001, Some(synack.seq + 1)), t0);
        assert_eq!(e.tcp_state(id), Some(TcpState::Listen));
        assert_eq!(e.tcp_settle(id, false), Settled::Reset);
        assert_eq!(e.tcp_state(id), None);
    }

    #[test]
    fn tcp_reset_sends_rst_then_releases_accepted_and_pending_flows() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, _) = established(&mut e, t0);
        e.tcp_reset(id);
        let out: Vec<Seg> = drain(&mut e, t0).iter().map(|p| parse_tcp(p)).collect();
        assert!(out.iter().any(|s| s.control == TcpControl::Rst), "{out:?}");
        assert_eq!(e.tcp_state(id), None);
        // A dial still pending: nothing to answer, counts given back.
        let id = new_flow(&mut e, t0);
        assert_eq!(e.flows_of(LAPTOP.ip()), (1, 0));
        e.tcp_reset(id);
        assert!(drain(&mut e, t0).is_empty());
        assert_eq!(e.flows_of(LAPTOP.ip()), (0, 0));
    }

    #[test]
    fn an_orphaned_flow_is_reset_after_the_linger() {
        let t0 = Instant::now();
        let linger = Duration::from_secs(60);
        let config = FlowConfig {
            orphan_linger: linger,
            ..FlowConfig::default()
        };
        let mut e = FlowEngine::new(config, t0);
        let (id, _) = established(&mut e, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert!(!e.tcp_orphaned(id, t1), "found orphaned now");
        assert!(!e.tcp_orphaned(id, t1 + linger - Duration::from_millis(1)));
        assert!(
            e.tcp_orphaned(id, t1 + linger),
            "from when it was first reported"
        );
        assert!(
            !e.tcp_orphaned(FlowId(999), t1 + linger),
            "unknown flows never"
        );
    }

    /// Every segment the engine emits until `until`, stepping the fake
    /// clock by `step`.
    fn run_clock(e: &mut FlowEngine, from: Instant, until: Instant, step: Duration) -> Vec<Seg> {
        let mut segs = Vec::new();
        let mut now = from;
        while now < until {
            e.probe_stalled_flows();
            segs.extend(drain(e, now).iter().map(|p| parse_tcp(p)));
            now += step;
        }
        segs
    }

    #[test]
    fn a_flow_with_unacknowledged_data_keeps_asking_a_silent_laptop() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let id = new_flow(&mut e, t0);
        e.accept(id, t0).expect("pending");
        let synack = parse_tcp(&drain(&mut e, t0)[0]);
        let mut ack = syn_repr(1001);
        ack.control = TcpControl::None;
        ack.ack_number = Some(synack.seq + 1);
        ack.window_scale = None;
        ack.max_seg_size = None;
        ack.sack_permitted = false;
        // 31 × 128 (the SYN's window scale 7) = 3968 bytes.
        ack.window_len = 31;
        e.ingress(&tcp_packet(LAPTOP, SERVICE, &ack), t0);
        assert_eq!(e.tcp_state(id), Some(TcpState::Established));

        // Gateway → laptop: more than the laptop's window.
        assert_eq!(e.tcp_send(id, &[7; 20_000]), Ok(20_000));
        let sent = run_clock(
            &mut e,
            t0,
            t0 + Duration::from_millis(1),
            Duration::from_millis(1),
        );
        let in_flight: usize = sent.iter().map(|s| s.payload.len()).sum();
        assert!(in_flight > 0 && in_flight <= 4000, "{in_flight}");
        // A window update closes the window without acknowledging anything
        // (the laptop's application stopped reading), then the laptop goes
        // quiet; its later window update is lost.
        ack.window_len = 0;
        e.ingress(&tcp_packet(LAPTOP, SERVICE, &ack), t0);
        let t1 = t0 + Duration::from_secs(1);
        let later = run_clock(
            &mut e,
            t1,
            t1 + Duration::from_secs(120),
            Duration::from_millis(250),
        );
        // The engine must keep soliciting the laptop's window (retransmit,
        // window probe or keep-alive), not fall silent for good. (Without
        // `probe_stalled_flows`, smoltcp 0.14 sends nothing at all here.)
        assert!(!later.is_empty(), "nothing sent in 120 s");
        let tail = run_clock(
            &mut e,
            t1 + Duration::from_secs(120),
            t1 + Duration::from_secs(240),
            Duration::from_millis(250),
        );
        assert!(
            !tail.is_empty(),
            "silent for good after {} segments: {later:?}",
            later.len()
        );
        // The laptop answers a probe with its reopened window: data flows.
        ack.window_len = 31;
        let t2 = t1 + Duration::from_secs(240);
        e.ingress(&tcp_packet(LAPTOP, SERVICE, &ack), t2);
        let resumed: usize = drain(&mut e, t2)
            .iter()
            .map(|p| parse_tcp(p).payload.len())
            .sum();
        assert!(resumed > 0, "no data after the window reopened");
    }

    #[test]
    fn segment_for_unknown_flow_gets_rst_from_smoltcp() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let mut stray = syn_repr(5000);
        stray.control = TcpControl::None;
        stray.ack_number = Some(Seq(77));
        stray.window_scale = None;
        stray.max_seg_size = None;
        stray.sack_permitted = false;
        stray.payload = b"x";
        assert_eq!(
            e.ingress(&tcp_packet(LAPTOP, SERVICE, &stray), t0),
            Ingress::Handled
        );
        let out = drain(&mut e, t0);
        assert_eq!(out.len(), 1);
        let rst = parse_tcp(&out[0]);
        assert_eq!(rst.control, TcpControl::Rst);
        assert_eq!(rst.seq, Seq(77));
    }

    #[test]
    fn two_laptop_ports_to_one_destination_are_two_flows() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let a = new_flow(&mut e, t0);
        let other = SocketAddr::new(LAPTOP.ip(), 40001);
        let mut syn = syn_repr(9000);
        syn.src_port = other.port();
        let b = match e.ingress(&tcp_packet(other, SERVICE, &syn), t0) {
            Ingress::NewTcp { id, .. } => id,
            x => panic!("{x:?}"),
        };
        e.accept(a, t0).expect("a");
        e.accept(b, t0).expect("b");
        let dsts: Vec<SocketAddr> = drain(&mut e, t0).iter().map(|p| parse_tcp(p).dst).collect();
        assert_eq!(dsts.len(), 2);
        assert!(dsts.contains(&LAPTOP) && dsts.contains(&other));
    }

    #[test]
    fn udp_flows_the_gateway_opens_to_a_laptop() {
        let t0 = Instant::now();
        let gw = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
        let forwarder = SocketAddr::new(LAPTOP.ip(), 41000);
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, local) = e.udp_open(gw, forwarder, t0).expect("open");
        assert_eq!(local.ip(), gw);
        let (id2, local2) = e.udp_open(gw, forwarder, t0).expect("second");
        assert_ne!((id, local), (id2, local2), "each its own port");
        // To the laptop, from the gateway's end.
        e.udp_send(id, b"datagram", t0).expect("send");
        let out = drain(&mut e, t0);
        let ip = wire::parse_ip(&out[0]).expect("valid");
        assert_eq!((ip.src, ip.dst), (gw, forwarder.ip()));
        let udp = UdpPacket::new_checked(ip.payload(&out[0])).expect("udp");
        assert_eq!((udp.src_port(), udp.dst_port()), (local.port(), 41000));
        // The laptop's reply is this flow's, not a new one.
        let reply = udp_packet(forwarder, local, b"reply");
        let Ingress::UdpDatagram {
            id: got,
            new: false,
            payload,
            ..
        } = e.ingress(&reply, t0)
        else {
            panic!("a reply to the gateway's flow")
        };
        assert_eq!((got, payload), (id, &b"reply"[..]));
        // Not the laptop's: not counted, not expired; released by its owner.
        assert_eq!(e.laptop_flows(LAPTOP.ip()).udp, 0);
        let mut gone = Vec::new();
        e.expire(t0 + Duration::from_secs(3600), |id| gone.push(id));
        assert!(gone.is_empty());
        e.release(id);
        assert_eq!(e.udp_send(id, b"late", t0), Err(FlowError::UnknownFlow(id)));
        assert_eq!(e.laptop_flows(LAPTOP.ip()).udp, 0);
        assert!(e.udp_open(gw, SocketAddr::new(LAPTOP.ip(), 0), t0).is_err());
    }

    #[test]
    fn udp_flows_by_five_tuple_with_idle_expiry() {
        let t0 = Instant::now();
        let dns = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53);
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let q = udp_packet(LAPTOP, dns, b"query");
        let Ingress::UdpDatagram {
            id,
            new: true,
            payload,
            ..
        } = e.ingress(&q, t0)
        else {
            panic!("first datagram opens a flow")
        };
        assert_eq!(payload, b"query");
        let Ingress::UdpDatagram {
            id: again,
            new: false,
            ..
        } = e.ingress(&q, t0)
        else {
            panic!("same flow")
        };
        assert_eq!(id, again);

        e.udp_send(id, b"answer", t0).expect("flow exists");
        let out = drain(&mut e, t0);
        assert_eq!(out.len(), 1);
        let ip = wire::parse_ip(&out[0]).expect("valid");
        assert_eq!((ip.src, ip.dst), (dns.ip(), LAPTOP.ip()));
        let udp = UdpPacket::new_checked(ip.payload(&out[0])).expect("udp");
        assert!(udp.verify_checksum(&IpAddress::from(ip.src), &IpAddress::from(ip.dst)));
        assert_eq!((udp.src_port(), udp.dst_port()), (53, LAPTOP.port()));
        assert_eq!(udp.payload(), b"answer");

        let mut gone = Vec::new();
        e.expire(t0 + Duration::from_secs(59), |id| gone.push(id));
        assert!(gone.is_empty());
        e.expire(t0 + Duration::from_secs(61), |id| gone.push(id));
        assert_eq!(gone, vec![id]);
        assert_eq!(e.udp_send(id, b"late", t0), Err(FlowError::UnknownFlow(id)));
        let Ingress::UdpDatagram {
            id: fresh,
            new: true,
            ..
        } = e.ingress(&q, t0)
        else {
            panic!("new flow after expiry")
        };
        assert_ne!(fresh, id);
        // Larger than the MTU: sent in fragments; larger than IP allows:
        // refused.
        let mut sent = Vec::new();
        e.egress(t0, &mut |p| sent.push(p.to_vec()));
        assert_eq!(e.udp_send(fresh, &[7; 3000], t0), Ok(()));
        sent.clear();
        e.egress(t0, &mut |p| sent.push(p.to_vec()));
        assert_eq!(
            sent.len(),
            3,
            "{:?}",
            sent.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(sent.iter().all(|p| p.len() <= FlowConfig::default().mtu));
        let mut r = crate::reassembly::Reassembler::default();
        let whole: Vec<_> = sent
            .iter()
            .filter_map(|p| match r.push(&wire::parse_ip(p).expect("ip"), p, t0) {
                crate::reassembly::Reassembled::Complete(w) => Some(w),
                _ => None,
            })
            .collect();
        assert_eq!(whole.len(), 1);
        let ip = wire::parse_ip(&whole[0]).expect("ip");
        assert_eq!(ip.payload(&whole[0]).len(), 8 + 3000);
        assert_eq!(
            e.udp_send(fresh, &[0; 65_600], t0),
            Err(FlowError::TooLarge(65_600))
        );
    }

    /// The gateway's own tunnel address and a laptop's listening socket,
    /// for connections the gateway opens.
    const GATEWAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const LAPTOP_SERVER: SocketAddr =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)), 8080);

    /// A segment from the laptop's server to `gateway`.
    fn from_laptop(
        gateway: SocketAddr,
        control: TcpControl,
        seq: Seq,
        ack: Seq,
    ) -> TcpRepr<'static> {
        TcpRepr {
            src_port: LAPTOP_SERVER.port(),
            dst_port: gateway.port(),
            control,
            seq_number: seq,
            ack_number: Some(ack),
            window_len: 64240,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        }
    }

    /// `connect`, then the SYN the next egress emits.
    fn connect_and_syn(e: &mut FlowEngine, now: Instant) -> (FlowId, SocketAddr, Seg) {
        let (id, local) = e.connect(GATEWAY_IP, LAPTOP_SERVER).expect("connect");
        assert_eq!(local.ip(), GATEWAY_IP);
        assert!(EPHEMERAL_PORTS.contains(&local.port()));
        assert_eq!(e.tcp_state(id), Some(TcpState::SynSent));
        let out = drain(e, now);
        assert_eq!(out.len(), 1, "one SYN");
        let syn = parse_tcp(&out[0]);
        assert_eq!(syn.control, TcpControl::Syn);
        assert_eq!(syn.ack, None);
        assert_eq!((syn.src, syn.dst), (local, LAPTOP_SERVER));
        (id, local, syn)
    }

    #[test]
    fn connect_to_a_laptop_handshake_bytes_and_half_close_both_ways() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, local, syn) = connect_and_syn(&mut e, t0);
        assert!(syn.mss.is_some(), "the SYN carries an MSS");

        // The laptop's kernel answers SYN-ACK.
        let t1 = t0 + Duration::from_millis(1);
        let mut synack = from_laptop(local, TcpControl::Syn, Seq(5000), syn.seq + 1);
        synack.max_seg_size = Some(1380);
        assert_eq!(
            e.ingress(&tcp_packet(LAPTOP_SERVER, local, &synack), t1),
            Ingress::Handled
        );
        assert_eq!(e.tcp_state(id), Some(TcpState::Established));
        let mut active = Vec::new();
        e.take_active(&mut active);
        assert_eq!(active, vec![id], "the SYN-ACK marks the flow active");
        let acks: Vec<Seg> = drain(&mut e, t1).iter().map(|p| parse_tcp(p)).collect();
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].ack, Some(Seq(5001)), "the handshake's ACK");

        // Gateway → laptop, then our FIN (half-close).
        assert_eq!(e.tcp_send(id, b"hello laptop"), Ok(12));
        e.tcp_close(id).expect("open");
        let segs: Vec<Seg> = drain(&mut e, t1).iter().map(|p| parse_tcp(p)).collect();
        let data: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
        assert_eq!(data, b"hello laptop");
        assert!(
            segs.iter().any(|s| s.control == TcpControl::Fin),
            "{segs:?}"
        );
        assert_eq!(e.tcp_state(id), Some(TcpState::FinWait1));

        // The laptop acknowledges everything and keeps sending, then closes.
        let our_end = syn.seq + 1 + 12 + 1;
        let mut reply = from_laptop(local, TcpControl::Psh, Seq(5001), our_end);
        reply.payload = b"hello gateway";
        e.ingress(&tcp_packet(LAPTOP_SERVER, local, &reply), t1);
        assert_eq!(e.tcp_state(id), Some(TcpState::FinWait2));
        let mut buf = [0u8; 64];
        assert_eq!(e.tcp_recv(id, &mut buf), Ok(TcpRead::Data(13)));
        assert_eq!(&buf[..13], b"hello gateway");
        let fin = from_laptop(local, TcpControl::Fin, Seq(5001 + 13), our_end);
        e.ingress(&tcp_packet(LAPTOP_SERVER, local, &fin), t1);
        assert_eq!(e.tcp_recv(id, &mut buf), Ok(TcpRead::Eof));
        assert_eq!(e.tcp_state(id), Some(TcpState::TimeWait));
        e.release(id);
        assert_eq!(e.tcp_state(id), None);
    }

    #[test]
    fn connect_refused_by_rst_and_syn_retransmitted_on_the_clock() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (id, local, syn) = connect_and_syn(&mut e, t0);
        // No answer: the SYN goes again once smoltcp's timer fires.
        let delay = e.poll_delay(t0).expect("a retransmit timer");
        assert!(drain(&mut e, t0).is_empty(), "nothing before the timer");
        let later = t0 + delay + Duration::from_millis(1);
        let again: Vec<Seg> = drain(&mut e, later).iter().map(|p| parse_tcp(p)).collect();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].control, again[0].seq), (TcpControl::Syn, syn.seq));

        // The laptop has no listener: its kernel answers RST, ACK.
        let rst = from_laptop(local, TcpControl::Rst, Seq(0), syn.seq + 1);
        e.ingress(&tcp_packet(LAPTOP_SERVER, local, &rst), later);
        assert_eq!(e.tcp_state(id), Some(TcpState::Closed), "refused");
        let mut active = Vec::new();
        e.take_active(&mut active);
        assert_eq!(active, vec![id], "the driver hears of the refusal");
        e.release(id);
        assert!(drain(&mut e, later).is_empty());
    }

    #[test]
    fn connections_to_one_laptop_get_distinct_ports_and_bad_ends_are_refused() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let (a, la) = e.connect(GATEWAY_IP, LAPTOP_SERVER).expect("a");
        let (b, lb) = e.connect(GATEWAY_IP, LAPTOP_SERVER).expect("b");
        assert_ne!(a, b);
        assert_ne!(la.port(), lb.port());
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            e.connect(v6, LAPTOP_SERVER),
            Err(FlowError::Unaddressable(v6, LAPTOP_SERVER))
        );
        let port0 = SocketAddr::new(LAPTOP_SERVER.ip(), 0);
        assert!(matches!(
            e.connect(GATEWAY_IP, port0),
            Err(FlowError::Unaddressable(..))
        ));
        // A segment for the connection's tuple reaches it, not a new flow:
        // a stray SYN from the laptop to our port is smoltcp's business.
        let stray = TcpRepr {
            ack_number: None,
            ..from_laptop(la, TcpControl::Syn, Seq(1), Seq(0))
        };
        assert_eq!(
            e.ingress(&tcp_packet(LAPTOP_SERVER, la, &stray), t0),
            Ingress::Handled
        );
    }

    /// An engine with small per-laptop caps.
    fn capped(tcp_flows: usize, pending_dials: usize, udp_flows: usize, t0: Instant) -> FlowEngine {
        FlowEngine::new(
            FlowConfig {
                per_laptop: LaptopLimits {
                    tcp_flows,
                    pending_dials,
                    udp_flows,
                },
                ..FlowConfig::default()
            },
            t0,
        )
    }

    /// Laptop `LAPTOP`'s address with another port.
    fn port(p: u16) -> SocketAddr {
        SocketAddr::new(LAPTOP.ip(), p)
    }

    const OTHER_LAPTOP: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3));

    fn syn_from(e: &mut FlowEngine, from: SocketAddr, now: Instant) -> Ingress<'static> {
        let mut syn = syn_repr(1000);
        syn.src_port = from.port();
        match e.ingress(&tcp_packet(from, SERVICE, &syn), now) {
            Ingress::NewTcp { id, src, dst } => Ingress::NewTcp { id, src, dst },
            Ingress::Refused {
                laptop,
                limit,
                first,
            } => Ingress::Refused {
                laptop,
                limit,
                first,
            },
            Ingress::Handled => Ingress::Handled,
            Ingress::Dropped(d) => Ingress::Dropped(d),
            Ingress::UdpDatagram { .. } | Ingress::EchoRequest { .. } => {
                panic!("a SYN is neither UDP nor ICMP")
            }
        }
    }

    fn new_id(i: Ingress) -> FlowId {
        match i {
            Ingress::NewTcp { id, .. } => id,
            other => panic!("expected NewTcp, got {other:?}"),
        }
    }

    #[test]
    fn a_laptop_at_its_tcp_cap_gets_rst_and_others_are_not_held_back() {
        let t0 = Instant::now();
        let mut e = capped(2, 10, 10, t0);
        let a = new_id(syn_from(&mut e, port(1), t0));
        let b = new_id(syn_from(&mut e, port(2), t0));
        e.accept(a, t0).expect("pending");
        let _ = drain(&mut e, t0);
        assert_eq!(
            syn_from(&mut e, port(3), t0),
            Ingress::Refused {
                laptop: LAPTOP.ip(),
                limit: Limit::TcpFlows,
                first: true
            }
        );
        let out = drain(&mut e, t0);
        assert_eq!(out.len(), 1, "the refused SYN is answered");
        let rst = parse_tcp(&out[0]);
        assert_eq!(rst.control, TcpControl::Rst);
        assert_eq!((rst.src, rst.dst), (SERVICE, port(3)));
        assert_eq!(rst.ack, Some(Seq(1001)));
        // Counted each time, worth a log line once.
        assert_eq!(
            syn_from(&mut e, port(4), t0),
            Ingress::Refused {
                laptop: LAPTOP.ip(),
                limit: Limit::TcpFlows,
                first: false
            }
        );
        // Another laptop is not held back.
        let other = SocketAddr::new(OTHER_LAPTOP, 40000);
        new_id(syn_from(&mut e, other, t0));
        assert_eq!(
            e.laptop_flows(LAPTOP.ip()),
            LaptopFlows {
                tcp: 2,
                pending: 1,
                udp: 0,
                refused: Limit::TcpFlows.bit(),
                ..LaptopFlows::default()
            }
        );
        // A released flow makes room.
        e.discard(b).expect("pending");
        new_id(syn_from(&mut e, port(5), t0));
    }

    #[test]
    fn a_syn_beyond_the_pending_cap_is_dropped_and_retried_later() {
        let t0 = Instant::now();
        let mut e = capped(10, 1, 10, t0);
        let a = new_id(syn_from(&mut e, port(1), t0));
        assert_eq!(
            syn_from(&mut e, port(2), t0),
            Ingress::Refused {
                laptop: LAPTOP.ip(),
                limit: Limit::PendingDials,
                first: true
            }
        );
        assert!(drain(&mut e, t0).is_empty(), "dropped, not answered");
        // Once the first dial settles, the retransmitted SYN is a new flow.
        e.accept(a, t0).expect("pending");
        let _ = drain(&mut e, t0);
        new_id(syn_from(&mut e, port(2), t0));
        let held = e.laptop_flows(LAPTOP.ip());
        assert_eq!((held.tcp, held.pending), (2, 1));
    }

    #[test]
    fn udp_flows_beyond_the_cap_are_dropped_until_one_expires() {
        let t0 = Instant::now();
        let mut e = capped(10, 10, 2, t0);
        let dns = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53);
        let open = |e: &mut FlowEngine, from: SocketAddr, now: Instant| -> Option<bool> {
            match e.ingress(&udp_packet(from, dns, b"q"), now) {
                Ingress::UdpDatagram { new, .. } => Some(new),
                Ingress::Refused {
                    limit: Limit::UdpFlows,
                    laptop,
                    ..
                } => {
                    assert_eq!(laptop, from.ip());
                    None
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(open(&mut e, port(1), t0), Some(true));
        assert_eq!(open(&mut e, port(2), t0), Some(true));
        assert_eq!(open(&mut e, port(3), t0), None);
        assert_eq!(open(&mut e, port(3), t0), None, "every datagram again");
        // Existing flows and other laptops go on.
        assert_eq!(open(&mut e, port(1), t0), Some(false));
        let other = SocketAddr::new(OTHER_LAPTOP, 5353);
        assert_eq!(open(&mut e, other, t0), Some(true));
        // Flow 2 expires (flow 1 was active later).
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(
            open(&mut e, port(1), t1 - Duration::from_secs(30)),
            Some(false)
        );
        e.expire(t1, |_| {});
        assert_eq!(e.laptop_flows(LAPTOP.ip()).udp, 1);
        assert_eq!(open(&mut e, port(3), t1), Some(true));
        assert_eq!(
            e.ingress(&udp_packet(port(4), dns, b"q"), t1),
            Ingress::Refused {
                laptop: LAPTOP.ip(),
                limit: Limit::UdpFlows,
                first: false
            },
            "logged once until the laptop held nothing"
        );
    }

    #[test]
    fn counts_go_back_to_nothing_on_every_way_out() {
        let t0 = Instant::now();
        let mut e = capped(100, 100, 100, t0);
        let refused = new_id(syn_from(&mut e, port(1), t0));
        let discarded = new_id(syn_from(&mut e, port(2), t0));
        let released_pending = new_id(syn_from(&mut e, port(3), t0));
        let accepted = new_id(syn_from(&mut e, port(4), t0));
        e.refuse(refused).expect("pending");
        e.discard(discarded).expect("pending");
        e.release(released_pending);
        e.accept(accepted, t0).expect("pending");
        let dns = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 53);
        let Ingress::UdpDatagram { id: udp, .. } = e.ingress(&udp_packet(port(5), dns, b"q"), t0)
        else {
            panic!("a UDP flow")
        };
        // The gateway's own connections to the laptop are not its flows.
        let (to_laptop, _) = e
            .connect(GATEWAY_IP, SocketAddr::new(LAPTOP.ip(), 8080))
            .expect("connect");
        let held = e.laptop_flows(LAPTOP.ip());
        assert_eq!((held.tcp, held.pending, held.udp), (1, 0, 1));
        e.release(accepted);
        e.release(udp);
        e.release(to_laptop);
        assert_eq!(e.laptop_flows(LAPTOP.ip()), LaptopFlows::default());
        assert!(
            e.laptops.is_empty(),
            "no entry kept for a laptop with nothing"
        );
        // A finished connection's tuple reused: the old flow is released.
        let again = new_id(syn_from(&mut e, port(6), t0));
        e.accept(again, t0).expect("pending");
        e.tcp_abort(again).expect("open");
        let _ = drain(&mut e, t0);
        new_id(syn_from(&mut e, port(6), t0));
        let held = e.laptop_flows(LAPTOP.ip());
        assert_eq!((held.tcp, held.pending), (1, 1));
    }

    #[test]
    fn ingress_never_panics_on_garbage() {
        let t0 = Instant::now();
        let mut e = FlowEngine::new(FlowConfig::default(), t0);
        let mut rng = wire::tests::Rng(0xdead_beef_cafe_f00d);
        let seeds = [
            tcp_packet(LAPTOP, SERVICE, &syn_repr(1)),
            udp_packet(LAPTOP, SERVICE, b"hello"),
        ];
        for round in 0..5_000 {
            let mut p = seeds[round % 2].clone();
            for _ in 0..rng.below(3) + 1 {
                let i = rng.below(p.len());
                p[i] = rng.next() as u8;
            }
            p.truncate(rng.below(p.len() + 1));
            let _ = e.ingress(&p, t0);
        }
        let _ = drain(&mut e, t0);
    }
}
