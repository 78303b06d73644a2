//! A WireGuard peer table over boringtun's [`Tunn`], for both ends of the
//! tunnel.
//!
//! Each [`Peer`] has a public key and its AllowedIPs: WireGuard's cryptokey
//! routing, where a packet goes to the peer whose AllowedIPs prefix matches
//! its destination most specifically, and a packet from a peer is accepted
//! only if that same lookup on its source names the sender. On the gateway
//! every laptop has exactly one host prefix (its tunnel address); on a laptop
//! the gateway's AllowedIPs are the cluster's ranges.
//!
//! [`Peers`] finds which peer an incoming datagram belongs to (handshake
//! initiations by decrypting the initiator's static key with
//! [`parse_handshake_anon`]; every later message by the receiver index, whose
//! upper 24 bits boringtun derives from the index we gave the peer's `Tunn`),
//! lets that peer's `Tunn` process it, and then enforces the rules the data
//! path relies on:
//!
//! - a decrypted packet is delivered only if its source routes back to the
//!   sending peer (otherwise it is dropped and counted as `forged_source`), so
//!   no laptop can speak for another;
//! - on the gateway ([`Peers::new`]), a packet addressed into any peer's
//!   AllowedIPs is dropped (`peer_to_peer`): the gateway never forwards
//!   between peers. A laptop's table ([`Peers::new_laptop`]) hands every
//!   authenticated packet to the local stack, whose own address commonly lies
//!   inside the gateway's AllowedIPs.
//!
//! Endpoint roaming follows the WireGuard rule: a peer's endpoint is the
//! source of its most recent *authenticated* datagram (a handshake we could
//! answer, or a data packet that decrypted), so a laptop that changes network
//! keeps its session and spoofed datagrams cannot redirect its traffic. A
//! peer configured with an endpoint (the laptop's view of the gateway) can be
//! sent to, and so handshaken with, before it was ever heard from.
//!
//! Like boringtun this is sans-IO: the caller owns every buffer and the
//! methods return what to do next. Time: boringtun 0.7 reads its own
//! monotonic clock inside `Tunn` (handshake, rekey and keepalive timers);
//! only this crate's `mock-instant` feature (boringtun's, for
//! `tests/pair.rs`) puts those timers on a fake clock. The `now` passed
//! here stamps our own bookkeeping (last handshake, last packet) used for
//! metrics and tests.
//!
//! Roaming never moves a peer's endpoint to an address the tunnel itself
//! routes (e.g. a NodePort reply that escaped its NAT with a cluster
//! source): datagrams to it would go into the tunnel, a loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use crate::wire;

/// Smallest buffer boringtun can write a handshake message into.
pub const MIN_BUFFER: usize = 148;
/// Bytes WireGuard adds to each data packet (header + AEAD tag).
pub const DATA_OVERHEAD: usize = 32;
/// Handshake messages per second above which the gateway answers with
/// cookies (DoS protection). Each message is checked twice (once to pick the
/// peer, once inside `Tunn`), hence the factor of two.
const HANDSHAKE_RATE_LIMIT: u64 = 2 * 100;
/// boringtun puts the peer's index in the upper 24 bits of its session
/// indices.
const MAX_PEERS: usize = 1 << 24;

const MSG_HANDSHAKE_RESPONSE: u8 = 2;
const COOKIE_REPLY_LEN: usize = 64;
const MSG_DATA: u8 = 4;

/// Index of a peer in the table; stable for the peer's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u32);

impl PeerId {
    pub fn index(self) -> u32 {
        self.0
    }
}

/// What is known about a peer before it ever connects.
#[derive(Clone)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Cryptokey routing: the inner addresses this peer may send from, and
    /// the destinations sent to it. The gateway gives each laptop one host
    /// prefix, its tunnel address.
    pub allowed_ips: Vec<IpNet>,
    /// Where to send before the peer has been heard from. `None`: wait for
    /// the peer to reach us (the gateway never initiates towards a laptop).
    pub endpoint: Option<SocketAddr>,
    pub preshared_key: Option<[u8; 32]>,
    pub persistent_keepalive: Option<u16>,
}

impl PeerConfig {
    /// A peer whose only AllowedIPs is its own tunnel address, and which must
    /// reach us first: a laptop as the gateway sees it.
    pub fn host(public_key: PublicKey, tunnel_addr: IpAddr) -> Self {
        Self {
            public_key,
            allowed_ips: vec![IpNet::from(tunnel_addr)],
            endpoint: None,
            preshared_key: None,
            persistent_keepalive: None,
        }
    }
}

/// One peer: its WireGuard session and where it was last seen.
pub struct Peer {
    public_key: PublicKey,
    allowed_ips: Vec<IpNet>,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    last_handshake: Option<Instant>,
    last_received: Option<Instant>,
    /// Longest inner packet handed to `Tunn::encapsulate`; bounds what its
    /// internal queue can hold, hence the buffer `flush_queued` needs.
    largest_packet: usize,
}

impl Peer {
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }
    /// The peer's AllowedIPs, host bits cleared.
    pub fn allowed_ips(&self) -> &[IpNet] {
        &self.allowed_ips
    }
    /// Source of the most recent authenticated datagram from this peer, or
    /// its configured endpoint before that.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }
    /// When we last completed a handshake with this peer (per the `now`
    /// values passed in).
    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }
    pub fn last_received(&self) -> Option<Instant> {
        self.last_received
    }
    /// boringtun's view of the session, for metrics.
    pub fn stats(&self) -> PeerStats {
        let (since_handshake, tx_bytes, rx_bytes, loss, rtt_ms) = self.tunn.stats();
        PeerStats {
            since_handshake,
            tx_bytes,
            rx_bytes,
            loss,
            rtt_ms,
        }
    }
}

/// Session statistics from boringtun (its own clock, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerStats {
    pub since_handshake: Option<std::time::Duration>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub loss: f32,
    pub rtt_ms: Option<u32>,
}

/// Why a datagram or packet was not passed on.
#[derive(Debug)]
pub enum DropReason {
    /// Not a WireGuard message, or an inner packet that is not valid IP.
    Malformed,
    /// A handshake from a key we do not know, or an index we never issued.
    UnknownPeer,
    /// The inner packet's source is not in the sending peer's AllowedIPs.
    ForgedSource { peer: PeerId, src: IpAddr },
    /// The inner packet is addressed into a peer's AllowedIPs (gateway only).
    PeerToPeer { peer: PeerId, dst: IpAddr },
    /// The destination is in no peer's AllowedIPs.
    UnknownDestination(IpAddr),
    /// The peer has never reached us, so we have nowhere to send to.
    NoEndpoint(PeerId),
    /// The caller's buffer is too small for this datagram.
    BufferTooSmall { needed: usize },
    /// boringtun rejected it (bad MAC, replay, no session, ...).
    WireGuard(WireGuardError),
}

/// Result of [`Peers::decapsulate`] and [`Peers::flush_queued`].
#[derive(Debug)]
pub enum Decapsulated<'b> {
    /// Nothing to do.
    Nothing,
    /// A keepalive of `peer`'s live session: authenticated, nothing to do.
    Keepalive {
        peer: PeerId,
    },
    /// Send `datagram` to `to`. `peer` is `None` for a cookie reply to an
    /// unauthenticated sender. After a send caused by a peer's datagram, call
    /// [`Peers::flush_queued`] until it returns `Nothing`: packets queued
    /// while the handshake was pending go out then.
    Send {
        peer: Option<PeerId>,
        to: SocketAddr,
        datagram: &'b [u8],
    },
    /// An IP packet from `peer`, its source checked; hand it to the flow
    /// engine.
    Packet {
        peer: PeerId,
        packet: &'b [u8],
    },
    Dropped(DropReason),
}

/// Result of [`Peers::encapsulate`] and timer updates.
#[derive(Debug)]
pub enum Encapsulated<'b> {
    /// The packet was queued inside the session (handshake in progress).
    Nothing,
    Send {
        peer: PeerId,
        to: SocketAddr,
        datagram: &'b [u8],
    },
    Dropped(DropReason),
}

/// Why [`Peers::identify`] did not name a peer.
enum Rejected {
    Malformed,
    UnknownPeer,
    WireGuard(WireGuardError),
    Cookie([u8; COOKIE_REPLY_LEN], usize),
}

/// Why a peer could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("a peer with this public key is already registered")]
    DuplicateKey,
    #[error("AllowedIPs {0} is already assigned to another peer")]
    DuplicateAllowedIp(IpNet),
    #[error("peer table is full ({MAX_PEERS} peers)")]
    Full,
}

/// Drop counters, exported as metrics by the gateway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub malformed: u64,
    pub unknown_peer: u64,
    pub forged_source: u64,
    pub peer_to_peer: u64,
    pub unknown_destination: u64,
    pub no_endpoint: u64,
    pub wireguard_errors: u64,
    pub buffer_too_small: u64,
}

/// Cryptokey routing: AllowedIPs prefix → peer, longest prefix first.
/// Host prefixes (all the gateway has, one per laptop) are a hash lookup;
/// shorter prefixes (a laptop's few cluster ranges) a scan.
#[derive(Default)]
struct Routes {
    hosts: HashMap<IpAddr, PeerId>,
    /// Sorted by prefix length, longest first.
    prefixes: Vec<(IpNet, PeerId)>,
}

impl Routes {
    fn get(&self, net: &IpNet) -> Option<PeerId> {
        if net.prefix_len() == net.max_prefix_len() {
            self.hosts.get(&net.addr()).copied()
        } else {
            self.prefixes
                .iter()
                .find(|(n, _)| n == net)
                .map(|(_, id)| *id)
        }
    }

    fn insert(&mut self, net: IpNet, id: PeerId) {
        if net.prefix_len() == net.max_prefix_len() {
            self.hosts.insert(net.addr(), id);
        } else {
            let at = self
                .prefixes
                .partition_point(|(n, _)| n.prefix_len() >= net.prefix_len());
            self.prefixes.insert(at, (net, id));
        }
    }

    fn remove(&mut self, net: &IpNet) {
        if net.prefix_len() == net.max_prefix_len() {
            self.hosts.remove(&net.addr());
        } else {
            self.prefixes.retain(|(n, _)| n != net);
        }
    }

    fn lookup(&self, addr: IpAddr) -> Option<PeerId> {
        if let Some(id) = self.hosts.get(&addr) {
            return Some(*id);
        }
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|(_, id)| *id)
    }
}

/// A table of peers: many laptops on the gateway, the gateway(s) on a
/// laptop.
pub struct Peers {
    private_key: StaticSecret,
    public_key: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    slots: Vec<Option<Peer>>,
    free: Vec<u32>,
    by_key: HashMap<[u8; 32], PeerId>,
    routes: Routes,
    /// Drop decrypted packets addressed into any peer's AllowedIPs.
    forbid_peer_to_peer: bool,
    counters: Counters,
}

impl Peers {
    /// The gateway's table: it never forwards between peers.
    pub fn new(private_key: StaticSecret) -> Self {
        let public_key = PublicKey::from(&private_key);
        Self {
            rate_limiter: Arc::new(RateLimiter::new(&public_key, HANDSHAKE_RATE_LIMIT)),
            private_key,
            public_key,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            routes: Routes::default(),
            forbid_peer_to_peer: true,
            counters: Counters::default(),
        }
    }

    /// A laptop's table: every authenticated packet goes to the local stack,
    /// whatever its destination (the laptop's own address is usually inside
    /// the gateway's AllowedIPs).
    pub fn new_laptop(private_key: StaticSecret) -> Self {
        Self {
            forbid_peer_to_peer: false,
            ..Self::new(private_key)
        }
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn add(&mut self, config: PeerConfig) -> Result<PeerId, PeerError> {
        if self.by_key.contains_key(config.public_key.as_bytes()) {
            return Err(PeerError::DuplicateKey);
        }
        let mut allowed_ips: Vec<IpNet> = config.allowed_ips.iter().map(IpNet::trunc).collect();
        allowed_ips.sort();
        allowed_ips.dedup();
        if let Some(taken) = allowed_ips.iter().find(|n| self.routes.get(n).is_some()) {
            return Err(PeerError::DuplicateAllowedIp(*taken));
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() < MAX_PEERS => self.slots.len() as u32,
            None => return Err(PeerError::Full),
        };
        let tunn = Tunn::new(
            self.private_key.clone(),
            config.public_key,
            config.preshared_key,
            config.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
        );
        let id = PeerId(index);
        for net in &allowed_ips {
            self.routes.insert(*net, id);
        }
        let peer = Peer {
            public_key: config.public_key,
            allowed_ips,
            tunn,
            endpoint: config.endpoint,
            last_handshake: None,
            last_received: None,
            largest_packet: 0,
        };
        let slot = index as usize;
        if slot == self.slots.len() {
            self.slots.push(Some(peer));
        } else {
            self.slots[slot] = Some(peer);
        }
        self.by_key.insert(*config.public_key.as_bytes(), id);
        Ok(id)
    }

    pub fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let peer = self.slots.get_mut(id.0 as usize)?.take()?;
        self.by_key.remove(peer.public_key.as_bytes());
        for net in &peer.allowed_ips {
            self.routes.remove(net);
        }
        self.free.push(id.0);
        Some(peer)
    }

    pub fn get(&self, id: PeerId) -> Option<&Peer> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    pub fn find_by_key(&self, key: &PublicKey) -> Option<PeerId> {
        self.by_key.get(key.as_bytes()).copied()
    }

    /// The peer whose AllowedIPs hold `addr` most specifically.
    pub fn route(&self, addr: IpAddr) -> Option<PeerId> {
        self.routes.lookup(addr)
    }

    pub fn ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| PeerId(i as u32))
    }

    fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.slots.get_mut(id.0 as usize)?.as_mut()
    }

    fn drop_decap<'b>(&mut self, reason: DropReason) -> Decapsulated<'b> {
        self.count(&reason);
        Decapsulated::Dropped(reason)
    }

    fn drop_encap<'b>(&mut self, reason: DropReason) -> Encapsulated<'b> {
        self.count(&reason);
        Encapsulated::Dropped(reason)
    }

    fn count(&mut self, reason: &DropReason) {
        let c = &mut self.counters;
        match reason {
            DropReason::Malformed => c.malformed += 1,
            DropReason::UnknownPeer => c.unknown_peer += 1,
            DropReason::ForgedSource { .. } => c.forged_source += 1,
            DropReason::PeerToPeer { .. } => c.peer_to_peer += 1,
            DropReason::UnknownDestination(_) => c.unknown_destination += 1,
            DropReason::NoEndpoint(_) => c.no_endpoint += 1,
            DropReason::BufferTooSmall { .. } => c.buffer_too_small += 1,
            DropReason::WireGuard(_) => c.wireguard_errors += 1,
        }
    }

    /// Which peer a datagram is for, without changing any session state.
    /// Handshake initiations are MAC-checked before the (costly) key
    /// agreement that reveals the sender, and answered with a cookie when the
    /// gateway is under load.
    fn identify(&mut self, from: SocketAddr, datagram: &[u8]) -> Result<PeerId, Rejected> {
        let packet = Tunn::parse_incoming_packet(datagram).map_err(|_| Rejected::Malformed)?;
        let id = match packet {
            Packet::HandshakeInit(ref init) => {
                // The cookie is built on the stack and copied out by the
                // caller: returning a borrow of the caller's buffer from only
                // some paths would keep it borrowed on all of them.
                let mut cookie = [0u8; COOKIE_REPLY_LEN];
                match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), datagram, &mut cookie)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        let len = reply.len();
                        return Err(Rejected::Cookie(cookie, len));
                    }
                    Err(TunnResult::Err(e)) => return Err(Rejected::WireGuard(e)),
                    Err(_) => return Err(Rejected::Malformed),
                }
                let half = parse_handshake_anon(&self.private_key, &self.public_key, init)
                    .map_err(Rejected::WireGuard)?;
                self.by_key.get(&half.peer_static_public).copied()
            }
            Packet::HandshakeResponse(ref p) => Some(PeerId(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(ref p) => Some(PeerId(p.receiver_idx >> 8)),
            Packet::PacketData(ref p) => Some(PeerId(p.receiver_idx >> 8)),
        };
        match id {
            Some(id) if self.get(id).is_some() => Ok(id),
            _ => Err(Rejected::UnknownPeer),
        }
    }

    /// Process one datagram received from the underlay address `from`.
    /// `dst` must hold at least `max(datagram.len(), MIN_BUFFER)` bytes.
    pub fn decapsulate<'b>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        dst: &'b mut [u8],
        now: Instant,
    ) -> Decapsulated<'b> {
        let needed = datagram.len().max(MIN_BUFFER);
        if dst.len() < needed || datagram.is_empty() {
            let reason = if datagram.is_empty() {
                DropReason::Malformed
            } else {
                DropReason::BufferTooSmall { needed }
            };
            return self.drop_decap(reason);
        }
        let id = match self.identify(from, datagram) {
            Ok(id) => id,
            Err(Rejected::Cookie(cookie, len)) => {
                let reply = &mut dst[..len];
                reply.copy_from_slice(&cookie[..len]);
                return Decapsulated::Send {
                    peer: None,
                    to: from,
                    datagram: reply,
                };
            }
            Err(Rejected::Malformed) => return self.drop_decap(DropReason::Malformed),
            Err(Rejected::UnknownPeer) => return self.drop_decap(DropReason::UnknownPeer),
            Err(Rejected::WireGuard(e)) => return self.drop_decap(DropReason::WireGuard(e)),
        };
        // Never roam to an address the tunnel itself routes (a cluster IP on
        // the laptop, seen when a NodePort reply escapes its NAT): the next
        // datagram to it would be sent into the tunnel, a loop.
        let may_roam = self.routes.lookup(from.ip()).is_none();
        let Some(peer) = self.slots.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return self.drop_decap(DropReason::UnknownPeer);
        };
        let is_data = datagram[0] == MSG_DATA;
        let result = peer.tunn.decapsulate(Some(from.ip()), datagram, dst);
        let (src, packet) = match result {
            TunnResult::Done => {
                if is_data {
                    // A keepalive that decrypted: authenticated.
                    if may_roam {
                        peer.endpoint = Some(from);
                    }
                    peer.last_received = Some(now);
                    return Decapsulated::Keepalive { peer: id };
                }
                return Decapsulated::Nothing;
            }
            TunnResult::WriteToNetwork(out) => {
                // Our answer tells us what was authenticated: a handshake
                // response means the initiation was valid; a keepalive means
                // we completed our own handshake. A cookie reply is sent to
                // an unverified address and must not move the endpoint.
                let authenticated = matches!(out.first(), Some(&MSG_HANDSHAKE_RESPONSE))
                    || out.first() == Some(&MSG_DATA);
                if authenticated {
                    if may_roam {
                        peer.endpoint = Some(from);
                    }
                    peer.last_received = Some(now);
                    peer.last_handshake = Some(now);
                }
                return Decapsulated::Send {
                    peer: Some(id),
                    to: from,
                    datagram: out,
                };
            }
            TunnResult::WriteToTunnelV4(p, a) => (IpAddr::V4(a), p),
            TunnResult::WriteToTunnelV6(p, a) => (IpAddr::V6(a), p),
            TunnResult::Err(e) => return self.drop_decap(DropReason::WireGuard(e)),
        };
        if may_roam {
            peer.endpoint = Some(from);
        }
        peer.last_received = Some(now);
        if self.routes.lookup(src) != Some(id) {
            return self.drop_decap(DropReason::ForgedSource { peer: id, src });
        }
        let header = match wire::parse_ip(packet) {
            Ok(h) => h,
            Err(_) => return self.drop_decap(DropReason::Malformed),
        };
        if self.forbid_peer_to_peer && self.routes.lookup(header.dst).is_some() {
            return self.drop_decap(DropReason::PeerToPeer {
                peer: id,
                dst: header.dst,
            });
        }
        Decapsulated::Packet {
            peer: id,
            packet: &packet[..header.total_len],
        }
    }

    /// Send what `peer`'s session queued while its handshake was pending.
    /// Call after a `Send` from [`Peers::decapsulate`] until it returns
    /// `Nothing`.
    pub fn flush_queued<'b>(&mut self, id: PeerId, dst: &'b mut [u8]) -> Decapsulated<'b> {
        let Some(peer) = self.get_mut(id) else {
            return Decapsulated::Nothing;
        };
        let needed = (peer.largest_packet + DATA_OVERHEAD).max(MIN_BUFFER);
        let Some(to) = peer.endpoint else {
            return Decapsulated::Nothing;
        };
        if dst.len() < needed {
            return self.drop_decap(DropReason::BufferTooSmall { needed });
        }
        match peer.tunn.decapsulate(None, &[], dst) {
            TunnResult::WriteToNetwork(datagram) => Decapsulated::Send {
                peer: Some(id),
                to,
                datagram,
            },
            TunnResult::Err(e) => self.drop_decap(DropReason::WireGuard(e)),
            _ => Decapsulated::Nothing,
        }
    }

    /// Encrypt an IP packet for the peer whose AllowedIPs hold its
    /// destination. `dst` must hold `packet.len() + DATA_OVERHEAD` bytes and
    /// at least `MIN_BUFFER`.
    pub fn encapsulate<'b>(&mut self, packet: &[u8], dst: &'b mut [u8]) -> Encapsulated<'b> {
        let header = match wire::parse_ip(packet) {
            Ok(h) => h,
            Err(_) => return self.drop_encap(DropReason::Malformed),
        };
        let Some(id) = self.routes.lookup(header.dst) else {
            return self.drop_encap(DropReason::UnknownDestination(header.dst));
        };
        self.encapsulate_to(id, &packet[..header.total_len], dst)
    }

    /// Encrypt an IP packet for `id`, whatever its destination.
    pub fn encapsulate_to<'b>(
        &mut self,
        id: PeerId,
        packet: &[u8],
        dst: &'b mut [u8],
    ) -> Encapsulated<'b> {
        let needed = (packet.len() + DATA_OVERHEAD).max(MIN_BUFFER);
        if dst.len() < needed {
            return self.drop_encap(DropReason::BufferTooSmall { needed });
        }
        let Some(peer) = self.get_mut(id) else {
            return self.drop_encap(DropReason::UnknownPeer);
        };
        // Without a configured endpoint (the gateway's laptops) we never
        // initiate towards a peer we have not heard from.
        let Some(to) = peer.endpoint else {
            return self.drop_encap(DropReason::NoEndpoint(id));
        };
        peer.largest_packet = peer.largest_packet.max(packet.len());
        let r = peer.tunn.encapsulate(packet, dst);
        self.encapsulated(id, to, r)
    }

    /// What boringtun made of an outgoing packet, for `id` at `to`.
    fn encapsulated<'b>(
        &mut self,
        id: PeerId,
        to: SocketAddr,
        r: TunnResult<'b>,
    ) -> Encapsulated<'b> {
        match r {
            TunnResult::WriteToNetwork(datagram) => Encapsulated::Send {
                peer: id,
                to,
                datagram,
            },
            TunnResult::Err(e) => self.drop_encap(DropReason::WireGuard(e)),
            _ => Encapsulated::Nothing,
        }
    }

    /// A handshake initiation to `id` now, even if one is under way (that
    /// one's answer is then refused: only the newest initiation counts).
    /// The session, and what it queued, stay: the new keys take over when
    /// the answer arrives. For a path that just came back (a new address,
    /// a new stream, a new gateway pod): boringtun itself resends only
    /// after 5 s.
    pub fn handshake_now<'b>(&mut self, id: PeerId, dst: &'b mut [u8]) -> Encapsulated<'b> {
        if dst.len() < MIN_BUFFER {
            return self.drop_encap(DropReason::BufferTooSmall { needed: MIN_BUFFER });
        }
        let Some(peer) = self.get_mut(id) else {
            return self.drop_encap(DropReason::UnknownPeer);
        };
        let Some(to) = peer.endpoint else {
            return self.drop_encap(DropReason::NoEndpoint(id));
        };
        let r = peer.tunn.format_handshake_initiation(dst, true);
        self.encapsulated(id, to, r)
    }

    /// Run boringtun's timers for every peer (call about every 250 ms) and
    /// hand each datagram they produce (handshake retries, rekeys,
    /// keepalives) to `send`. `dst` must hold at least `MIN_BUFFER` bytes.
    /// boringtun reads its own clock here (see the crate doc on time).
    pub fn update_timers(
        &mut self,
        dst: &mut [u8],
        mut send: impl FnMut(PeerId, SocketAddr, &[u8]),
    ) {
        // With a shared rate limiter boringtun leaves the reset to us; it is
        // itself throttled to once a second.
        self.rate_limiter.reset_count();
        if dst.len() < MIN_BUFFER {
            return;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(peer) = slot else { continue };
            if let (TunnResult::WriteToNetwork(datagram), Some(to)) =
                (peer.tunn.update_timers(dst), peer.endpoint)
            {
                send(PeerId(i as u32), to, datagram);
            }
            // ConnectionExpired and friends: the session is gone; the laptop
            // re-handshakes when it next sends, nothing for us to do.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::net::Ipv4Addr;

    const LAPTOP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    const LAPTOP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3));
    const CLUSTER_IP: [u8; 4] = [10, 96, 0, 1];

    fn key(n: u8) -> StaticSecret {
        StaticSecret::from([n; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// A minimal IPv4/UDP packet.
    fn ipv4(src: IpAddr, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let IpAddr::V4(src) = src else {
            unreachable!("test uses IPv4")
        };
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = wire::PROTO_UDP;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst);
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    struct Laptop {
        tunn: Tunn,
        at: SocketAddr,
    }

    impl Laptop {
        fn new(secret: u8, gateway: &PublicKey, at: &str) -> Self {
            let tunn = Tunn::new(key(secret), *gateway, None, None, 7, None);
            Self { tunn, at: addr(at) }
        }
    }

    struct World {
        gw: Peers,
        t0: Instant,
        a: PeerId,
    }

    fn world() -> World {
        let mut gw = Peers::new(key(1));
        let a = gw
            .add(PeerConfig::host(PublicKey::from(&key(2)), LAPTOP_A))
            .expect("add A");
        gw.add(PeerConfig::host(PublicKey::from(&key(3)), LAPTOP_B))
            .expect("add B");
        World {
            gw,
            t0: Instant::now(),
            a,
        }
    }

    /// Laptop sends `packet`; runs the handshake if needed and returns what
    /// the gateway delivered for it.
    fn send_from(w: &mut World, l: &mut Laptop, packet: &[u8]) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; 2048];
        let mut gbuf = vec![0u8; 2048];
        let mut wire_out: VecDeque<Vec<u8>> = VecDeque::new();
        match l.tunn.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(d) => wire_out.push_back(d.to_vec()),
            other => return Err(format!("laptop encapsulate: {other:?}")),
        }
        let mut delivered = None;
        // Ping-pong until both sides are quiet.
        while let Some(datagram) = wire_out.pop_front() {
            match w.gw.decapsulate(l.at, &datagram, &mut gbuf, w.t0) {
                Decapsulated::Send { to, datagram, .. } => {
                    assert_eq!(to, l.at);
                    let reply = datagram.to_vec();
                    let mut lbuf = vec![0u8; 2048];
                    if let TunnResult::WriteToNetwork(d) =
                        l.tunn.decapsulate(None, &reply, &mut lbuf)
                    {
                        wire_out.push_back(d.to_vec());
                        // boringtun: repeat with an empty datagram to drain.
                        while let TunnResult::WriteToNetwork(d) =
                            l.tunn.decapsulate(None, &[], &mut lbuf)
                        {
                            wire_out.push_back(d.to_vec());
                        }
                    }
                }
                Decapsulated::Packet { packet, peer } => {
                    assert_eq!(peer, w.a);
                    delivered = Some(packet.to_vec());
                }
                Decapsulated::Nothing | Decapsulated::Keepalive { .. } => {}
                Decapsulated::Dropped(r) => return Err(format!("{r:?}")),
            }
        }
        delivered.ok_or_else(|| "nothing delivered".into())
    }

    #[test]
    fn handshake_and_exchange_both_ways() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        let out = ipv4(LAPTOP_A, CLUSTER_IP, b"hello cluster");
        assert_eq!(send_from(&mut w, &mut a, &out), Ok(out.clone()));
        let peer = w.gw.get(w.a).expect("peer A");
        assert_eq!(peer.endpoint(), Some(a.at));
        assert_eq!(peer.last_handshake(), Some(w.t0));

        // Second packet rides the established session.
        let out2 = ipv4(LAPTOP_A, CLUSTER_IP, b"again");
        assert_eq!(send_from(&mut w, &mut a, &out2), Ok(out2.clone()));

        // Gateway → laptop, routed by destination tunnel address.
        let back = ipv4(IpAddr::from(CLUSTER_IP), [100, 64, 0, 2], b"hello laptop");
        let mut gbuf = vec![0u8; 2048];
        let Encapsulated::Send { to, datagram, peer } = w.gw.encapsulate(&back, &mut gbuf) else {
            panic!("expected a datagram");
        };
        assert_eq!((to, peer), (a.at, w.a));
        let datagram = datagram.to_vec();
        let mut lbuf = vec![0u8; 2048];
        match a.tunn.decapsulate(None, &datagram, &mut lbuf) {
            TunnResult::WriteToTunnelV4(p, src) => {
                assert_eq!(p, &back[..]);
                assert_eq!(src, Ipv4Addr::from(CLUSTER_IP));
            }
            other => panic!("laptop got {other:?}"),
        }
        assert_eq!(w.gw.counters(), Counters::default());
    }

    /// The port-forward transport carries one session over several TCP
    /// streams: messages of a stream that fell behind arrive thousands of
    /// counters late and must still be taken (once), not refused as replays
    /// (boringtun's published window is 1,024; vendor/boringtun/BURROW.md).
    #[test]
    fn messages_of_a_stream_that_fell_behind_are_taken_once() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        send_from(&mut w, &mut a, &ipv4(LAPTOP_A, CLUSTER_IP, b"hello")).expect("handshake");
        // Two "streams": every fourth message on the slow one.
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        for n in 0..20_000u32 {
            let packet = ipv4(LAPTOP_A, CLUSTER_IP, &n.to_be_bytes());
            let mut buf = vec![0u8; 2048];
            let TunnResult::WriteToNetwork(d) = a.tunn.encapsulate(&packet, &mut buf) else {
                panic!("encapsulate {n}");
            };
            if n % 4 == 0 { &mut slow } else { &mut fast }.push((n, d.to_vec()));
        }
        let mut gbuf = vec![0u8; 2048];
        let mut take =
            |w: &mut World, n: u32, d: &[u8]| match w.gw.decapsulate(a.at, d, &mut gbuf, w.t0) {
                Decapsulated::Packet { packet, .. } => {
                    assert_eq!(packet.get(28..), Some(&n.to_be_bytes()[..]), "message {n}");
                    Ok(())
                }
                Decapsulated::Dropped(r) => Err(format!("{r:?}")),
                _ => Err("nothing".to_string()),
            };
        // The fast stream delivers everything, then the slow one, 15,000
        // counters behind.
        for (n, d) in fast.iter().chain(&slow) {
            assert_eq!(take(&mut w, *n, d), Ok(()), "message {n}");
        }
        // Each still only once.
        let (n, d) = &slow[slow.len() / 2];
        let again = take(&mut w, *n, d).expect_err("a replay");
        assert!(again.contains("Counter"), "{again}");
        assert_eq!(w.gw.counters().forged_source, 0);
    }

    #[test]
    fn forged_source_is_dropped_and_counted() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        let ok = ipv4(LAPTOP_A, CLUSTER_IP, b"x");
        send_from(&mut w, &mut a, &ok).expect("handshake");
        // A speaks with B's address.
        let forged = ipv4(LAPTOP_B, CLUSTER_IP, b"x");
        let err = send_from(&mut w, &mut a, &forged).expect_err("must drop");
        assert!(err.contains("ForgedSource"), "{err}");
        assert_eq!(w.gw.counters().forged_source, 1);
    }

    #[test]
    fn never_forwards_between_peers() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        let IpAddr::V4(b) = LAPTOP_B else {
            unreachable!()
        };
        let to_b = ipv4(LAPTOP_A, b.octets(), b"hi B");
        let err = send_from(&mut w, &mut a, &to_b).expect_err("must drop");
        assert!(err.contains("PeerToPeer"), "{err}");
        assert_eq!(w.gw.counters().peer_to_peer, 1);
    }

    #[test]
    fn unknown_peer_is_dropped() {
        let mut w = world();
        let mut stranger = Laptop::new(9, w.gw.public_key(), "192.0.2.99:5000");
        let p = ipv4(LAPTOP_A, CLUSTER_IP, b"x");
        let err = send_from(&mut w, &mut stranger, &p).expect_err("must drop");
        assert!(err.contains("UnknownPeer"), "{err}");
        assert_eq!(w.gw.counters().unknown_peer, 1);
        // Garbage and data for an index we never issued.
        let mut buf = vec![0u8; 256];
        let garbage = [
            4u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8,
            9, 10, 11, 12, 13, 14, 15, 16,
        ];
        assert!(matches!(
            w.gw.decapsulate(stranger.at, &garbage, &mut buf, w.t0),
            Decapsulated::Dropped(DropReason::UnknownPeer)
        ));
        assert!(matches!(
            w.gw.decapsulate(stranger.at, &[1, 2, 3], &mut buf, w.t0),
            Decapsulated::Dropped(DropReason::Malformed)
        ));
    }

    #[test]
    fn never_panics_on_random_datagrams() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        let p = ipv4(LAPTOP_A, CLUSTER_IP, b"x");
        send_from(&mut w, &mut a, &p).expect("handshake");
        let mut rng = wire::tests::Rng(0x1234_5678_9abc_def1);
        let mut buf = vec![0u8; 2048];
        for _ in 0..5_000 {
            let len = rng.below(200);
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(first) = d.first_mut() {
                // Mostly valid message types, often with an index of peer A
                // (slot 0).
                *first = (rng.below(5)) as u8;
            }
            if d.len() >= 8 && rng.below(2) == 0 {
                d[1..4].fill(0);
                d[4..8].copy_from_slice(&(rng.below(256) as u32).to_le_bytes());
            }
            let _ = w.gw.decapsulate(a.at, &d, &mut buf, w.t0);
        }
        // The session survives the noise.
        send_from(&mut w, &mut a, &p).expect("still works");
    }

    #[test]
    fn roaming_moves_the_endpoint() {
        let mut w = world();
        let mut a = Laptop::new(2, w.gw.public_key(), "192.0.2.10:5000");
        let p = ipv4(LAPTOP_A, CLUSTER_IP, b"x");
        send_from(&mut w, &mut a, &p).expect("handshake");
        a.at = addr("198.51.100.7:6000");
        send_from(&mut w, &mut a, &p).expect("same session from a new address");
        assert_eq!(w.gw.get(w.a).and_then(Peer::endpoint), Some(a.at));
        let back = ipv4(IpAddr::from(CLUSTER_IP), [100, 64, 0, 2], b"y");
        let mut gbuf = vec![0u8; 256];
        match w.gw.encapsulate(&back, &mut gbuf) {
            Encapsulated::Send { to, .. } => assert_eq!(to, a.at),
            other => panic!("{other:?}"),
        }
        // A replayed datagram from a spoofed address does not move it back.
        let mut lbuf = vec![0u8; 256];
        let TunnResult::WriteToNetwork(d) = a.tunn.encapsulate(&p, &mut lbuf) else {
            panic!("session established")
        };
        let d = d.to_vec();
        let mut gbuf = vec![0u8; 256];
        assert!(matches!(
            w.gw.decapsulate(a.at, &d, &mut gbuf, w.t0),
            Decapsulated::Packet { .. }
        ));
        let spoofed = addr("203.0.113.1:1");
        assert!(matches!(
            w.gw.decapsulate(spoofed, &d, &mut gbuf, w.t0),
            Decapsulated::Dropped(DropReason::WireGuard(_))
        ));
        assert_eq!(w.gw.get(w.a).and_then(Peer::endpoint), Some(a.at));
        // An authenticated datagram from an address the tunnel routes (here
        // the laptop's own tunnel address) is delivered, but the endpoint
        // stays: sending there would loop through the tunnel.
        let before = a.at;
        a.at = SocketAddr::new(LAPTOP_A, 7000);
        send_from(&mut w, &mut a, &p).expect("delivered");
        assert_eq!(w.gw.get(w.a).and_then(Peer::endpoint), Some(before));
    }

    #[test]
    fn no_endpoint_before_the_peer_connects() {
        let mut w = world();
        let back = ipv4(IpAddr::from(CLUSTER_IP), [100, 64, 0, 2], b"y");
        let mut gbuf = vec![0u8; 256];
        assert!(matches!(
            w.gw.encapsulate(&back, &mut gbuf),
            Encapsulated::Dropped(DropReason::NoEndpoint(_))
        ));
        assert!(matches!(
            w.gw.encapsulate(&back, &mut [0u8; 10]),
            Encapsulated::Dropped(DropReason::BufferTooSmall { .. })
        ));
    }

    #[test]
    fn table_rejects_duplicates_and_reuses_slots() {
        let mut w = world();
        let dup_key = PeerConfig::host(PublicKey::from(&key(2)), IpAddr::from([100, 64, 0, 9]));
        assert_eq!(w.gw.add(dup_key).err(), Some(PeerError::DuplicateKey));
        let dup_addr = PeerConfig::host(PublicKey::from(&key(4)), LAPTOP_A);
        assert_eq!(
            w.gw.add(dup_addr.clone()).err(),
            Some(PeerError::DuplicateAllowedIp(IpNet::from(LAPTOP_A)))
        );
        assert!(w.gw.remove(w.a).is_some());
        assert_eq!(w.gw.add(dup_addr), Ok(w.a));
        assert_eq!(w.gw.len(), 2);
        assert_eq!(w.gw.ids().count(), 2);
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    /// Two tables on a lossless wire: `first` is a datagram already sent by
    /// `a` to `b`. Returns the packets delivered to `a` and to `b`.
    fn pump(
        a: (&mut Peers, SocketAddr),
        b: (&mut Peers, SocketAddr),
        first: Vec<u8>,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (a, a_at) = a;
        let (b, b_at) = b;
        let now = Instant::now();
        let mut wire_out = VecDeque::from([(true, first)]);
        let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
        let mut buf = vec![0u8; 2048];
        while let Some((for_b, datagram)) = wire_out.pop_front() {
            let (me, from, delivered) = if for_b {
                (&mut *b, a_at, &mut to_b)
            } else {
                (&mut *a, b_at, &mut to_a)
            };
            match me.decapsulate(from, &datagram, &mut buf, now) {
                Decapsulated::Send { peer, to, datagram } => {
                    assert_eq!(to, from);
                    wire_out.push_back((!for_b, datagram.to_vec()));
                    if let Some(peer) = peer {
                        while let Decapsulated::Send { datagram, .. } =
                            me.flush_queued(peer, &mut buf)
                        {
                            wire_out.push_back((!for_b, datagram.to_vec()));
                        }
                    }
                }
                Decapsulated::Packet { packet, .. } => delivered.push(packet.to_vec()),
                Decapsulated::Nothing | Decapsulated::Keepalive { .. } => {}
                Decapsulated::Dropped(r) => panic!("dropped: {r:?}"),
            }
        }
        (to_a, to_b)
    }

    /// A laptop with two gateways: the second one's range lies inside the
    /// first's.
    struct LaptopWorld {
        laptop: Peers,
        wide: (Peers, SocketAddr, PeerId),
        narrow: (Peers, SocketAddr, PeerId),
    }

    const LAPTOP_AT: &str = "192.0.2.10:40000";

    fn laptop_world() -> LaptopWorld {
        let mut laptop = Peers::new_laptop(key(2));
        let mut gateway = |secret: u8, at: &str, ranges: &[&str]| {
            let at = addr(at);
            let id = laptop
                .add(PeerConfig {
                    public_key: PublicKey::from(&key(secret)),
                    allowed_ips: ranges.iter().map(|r| net(r)).collect(),
                    endpoint: Some(at),
                    preshared_key: None,
                    persistent_keepalive: None,
                })
                .expect("add gateway");
            let mut gw = Peers::new(key(secret));
            gw.add(PeerConfig::host(PublicKey::from(&key(2)), LAPTOP_A))
                .expect("add laptop");
            (gw, at, id)
        };
        let wide = gateway(1, "198.51.100.1:51820", &["10.0.0.0/8", "fd00::/64"]);
        // Host bits are cleared: 10.96.7.7/12 is 10.96.0.0/12.
        let narrow = gateway(5, "198.51.100.2:51820", &["10.96.7.7/12"]);
        LaptopWorld {
            laptop,
            wide,
            narrow,
        }
    }

    #[test]
    fn laptop_initiates_and_routes_by_longest_prefix() {
        let mut w = laptop_world();
        assert_eq!(
            w.laptop.route("10.96.3.4".parse().expect("ip")),
            Some(w.narrow.2)
        );
        assert_eq!(
            w.laptop.route("10.200.0.1".parse().expect("ip")),
            Some(w.wide.2)
        );
        assert_eq!(
            w.laptop.route("fd00::9".parse().expect("ip")),
            Some(w.wide.2)
        );
        assert_eq!(w.laptop.route("192.168.0.1".parse().expect("ip")), None);
        assert_eq!(
            w.laptop.get(w.narrow.2).map(Peer::allowed_ips),
            Some(&[net("10.96.0.0/12")][..])
        );

        for (dst, gw) in [
            ([10, 96, 0, 1], &mut w.narrow),
            ([10, 1, 2, 3], &mut w.wide),
        ] {
            let packet = ipv4(LAPTOP_A, dst, b"to the cluster");
            let mut buf = vec![0u8; 2048];
            // A configured endpoint: the laptop handshakes unprompted.
            let Encapsulated::Send { to, datagram, peer } = w.laptop.encapsulate(&packet, &mut buf)
            else {
                panic!("expected a handshake initiation");
            };
            assert_eq!((to, peer), (gw.1, gw.2));
            let first = datagram.to_vec();
            let (_, at_gateway) = pump((&mut w.laptop, addr(LAPTOP_AT)), (&mut gw.0, gw.1), first);
            assert_eq!(at_gateway, vec![packet]);
        }

        let stray = ipv4(LAPTOP_A, [192, 168, 0, 1], b"x");
        assert!(matches!(
            w.laptop.encapsulate(&stray, &mut [0u8; 256]),
            Encapsulated::Dropped(DropReason::UnknownDestination(_))
        ));
    }

    #[test]
    fn handshake_now_after_a_lost_initiation_keeps_what_was_queued() {
        let mut w = laptop_world();
        let gw = &mut w.wide;
        let packet = ipv4(LAPTOP_A, [10, 1, 2, 3], b"queued while the path was gone");
        let mut buf = vec![0u8; 2048];
        // The first initiation is lost on the way (a dead stream, a pod
        // that is gone); the packet waits in the session's queue.
        assert!(matches!(
            w.laptop.encapsulate(&packet, &mut buf),
            Encapsulated::Send { .. }
        ));
        // Without a forced initiation nothing goes out before boringtun's
        // retry: the handshake is under way.
        assert!(matches!(
            w.laptop.encapsulate(&packet, &mut buf),
            Encapsulated::Nothing
        ));
        let Encapsulated::Send { to, datagram, peer } = w.laptop.handshake_now(gw.2, &mut buf)
        else {
            panic!("expected a forced initiation");
        };
        assert_eq!((to, peer), (gw.1, gw.2));
        let first = datagram.to_vec();
        let (_, at_gateway) = pump((&mut w.laptop, addr(LAPTOP_AT)), (&mut gw.0, gw.1), first);
        // Both packets queued meanwhile arrive once the answer is in.
        assert_eq!(at_gateway, vec![packet.clone(), packet.clone()]);

        // With a live session, a forced handshake replaces its keys and
        // traffic goes on.
        let Encapsulated::Send { datagram, .. } = w.laptop.handshake_now(gw.2, &mut buf) else {
            panic!("expected an initiation");
        };
        let first = datagram.to_vec();
        let _ = pump((&mut w.laptop, addr(LAPTOP_AT)), (&mut gw.0, gw.1), first);
        let Encapsulated::Send { datagram, .. } = w.laptop.encapsulate(&packet, &mut buf) else {
            panic!("expected data");
        };
        let first = datagram.to_vec();
        let (_, at_gateway) = pump((&mut w.laptop, addr(LAPTOP_AT)), (&mut gw.0, gw.1), first);
        assert_eq!(at_gateway, vec![packet]);
        assert!(matches!(
            w.laptop.handshake_now(PeerId(99), &mut buf),
            Encapsulated::Dropped(DropReason::UnknownPeer)
        ));
    }

    #[test]
    fn laptop_accepts_packets_to_itself_inside_the_gateways_range() {
        let mut laptop = Peers::new_laptop(key(2));
        let gw_at = addr("198.51.100.1:51820");
        let gw_id = laptop
            .add(PeerConfig {
                public_key: PublicKey::from(&key(1)),
                // The laptop's own 100.64.0.2 is inside.
                allowed_ips: vec![net("100.64.0.0/24"), net("10.96.0.0/12")],
                endpoint: Some(gw_at),
                preshared_key: None,
                persistent_keepalive: Some(25),
            })
            .expect("add");
        let mut gw = Peers::new(key(1));
        gw.add(PeerConfig::host(PublicKey::from(&key(2)), LAPTOP_A))
            .expect("add laptop");
        let hello = ipv4(LAPTOP_A, [10, 96, 0, 1], b"hi");
        let mut buf = vec![0u8; 2048];
        let Encapsulated::Send { datagram, .. } = laptop.encapsulate(&hello, &mut buf) else {
            panic!("handshake");
        };
        let first = datagram.to_vec();
        let (_, got) = pump((&mut laptop, addr(LAPTOP_AT)), (&mut gw, gw_at), first);
        assert_eq!(got, vec![hello]);

        // Gateway → laptop: a reply from the cluster, and one from the
        // gateway's own tunnel address; both are the laptop's to take.
        for src in [[10, 96, 0, 1], [100, 64, 0, 1]] {
            let reply = ipv4(IpAddr::from(src), [100, 64, 0, 2], b"back");
            let Encapsulated::Send { datagram, to, .. } = gw.encapsulate(&reply, &mut buf) else {
                panic!("session is up");
            };
            assert_eq!(to, addr(LAPTOP_AT));
            let d = datagram.to_vec();
            let mut lbuf = vec![0u8; 2048];
            match laptop.decapsulate(gw_at, &d, &mut lbuf, Instant::now()) {
                Decapsulated::Packet { packet, peer } => {
                    assert_eq!((packet, peer), (&reply[..], gw_id));
                }
                other => panic!("{other:?}"),
            }
        }

        // A source outside the gateway's AllowedIPs is forged.
        let forged = ipv4(IpAddr::from([192, 168, 9, 9]), [100, 64, 0, 2], b"x");
        let Encapsulated::Send { datagram, .. } = gw.encapsulate(&forged, &mut buf) else {
            panic!("session is up");
        };
        let d = datagram.to_vec();
        let mut lbuf = vec![0u8; 2048];
        assert!(matches!(
            laptop.decapsulate(gw_at, &d, &mut lbuf, Instant::now()),
            Decapsulated::Dropped(DropReason::ForgedSource { .. })
        ));
        assert_eq!(laptop.counters().forged_source, 1);
        assert_eq!(laptop.counters().peer_to_peer, 0);
    }

    #[test]
    fn overlapping_prefixes_and_removal() {
        let mut t = Peers::new_laptop(key(2));
        let cfg = |secret: u8, ranges: &[&str]| PeerConfig {
            public_key: PublicKey::from(&key(secret)),
            allowed_ips: ranges.iter().map(|r| net(r)).collect(),
            endpoint: None,
            preshared_key: None,
            persistent_keepalive: None,
        };
        let a = t.add(cfg(1, &["10.0.0.0/8", "10.1.0.0/16"])).expect("a");
        let b = t.add(cfg(3, &["10.1.2.0/24", "10.1.2.3/32"])).expect("b");
        assert_eq!(
            t.add(cfg(4, &["10.1.0.5/16"])).err(),
            Some(PeerError::DuplicateAllowedIp(net("10.1.0.0/16")))
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(t.route(ip("10.1.2.3")), Some(b));
        assert_eq!(t.route(ip("10.1.2.4")), Some(b));
        assert_eq!(t.route(ip("10.1.3.4")), Some(a));
        assert_eq!(t.route(ip("10.2.0.0")), Some(a));
        t.remove(b);
        assert_eq!(t.route(ip("10.1.2.3")), Some(a));
        t.remove(a);
        assert_eq!(t.route(ip("10.1.2.3")), None);
        // Freed prefixes can be taken again.
        assert!(t.add(cfg(4, &["10.1.0.0/16"])).is_ok());
    }
}
