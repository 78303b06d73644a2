//! The sink encrypted datagrams leave by: the WireGuard UDP socket,
//! batched for `sendmmsg`, or a framed connection's output buffer; flushed
//! once per loop iteration.
//!
//! A laptop on the port-forward transport opens several framed connections
//! (its streams). Each flow's packets go on one of them, chosen by
//! [`flow_hash`] among the connections that peer's datagrams were accepted
//! on, so that one flow's backlog never stalls another's; datagrams that
//! belong to no flow (handshakes, keepalives) go to the peer's endpoint, or
//! to one of its streams when that endpoint has closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use burrow_netstack::udp_batch::SendBatch;
use burrow_netstack::wg::{Encapsulated, PeerId, Peers};
use burrow_netstack::wire::flow_hash;
use tokio::net::UdpSocket;

use super::metrics::Stats;
use crate::framed::{self, ConnId, FramedConn};

/// A laptop's stream not heard from for this long carries none of its
/// flows (the laptop sends on each of its streams at least every 5 s).
pub(super) const STREAM_SILENCE: Duration = Duration::from_secs(12);
/// When a laptop opens a new stream, its streams silent for this long are
/// taken off its list (see [`Sink::bind`]). Short: a stream left behind by
/// an address change carried its last datagram before the laptop noticed
/// the change and opened new ones (a second was not enough: a connection
/// sending every second kept a dead stream listed, and flows hashed onto
/// it went nowhere until [`STREAM_SILENCE`]); a live stream taken off by
/// mistake is listed again at its next datagram.
const LEFT_BEHIND: Duration = Duration::from_millis(200);

/// Where encrypted datagrams go: the UDP socket (batched) or a framed
/// connection's output buffer.
pub(super) struct Sink {
    pub(super) udp: UdpSocket,
    pub(super) batch: SendBatch,
    pub(super) conns: HashMap<ConnId, FramedConn>,
    /// Connections written to since the last flush.
    pub(super) dirty: Vec<ConnId>,
    /// Each peer's streams: the framed connections its datagrams were
    /// accepted on, in that order (entries are checked against the
    /// connection's own binding before use: a peer slot can be reused).
    pub(super) streams: HashMap<PeerId, Vec<ConnId>>,
}

impl Sink {
    /// Send a datagram that already sits in some buffer, for `peer` when it
    /// is known: a framed endpoint that has closed is replaced by one of
    /// the peer's other streams.
    pub(super) fn send(
        &mut self,
        peer: Option<PeerId>,
        to: SocketAddr,
        datagram: &[u8],
        stats: &mut Stats,
    ) {
        if let Some(mut conn) = framed::addr_conn(to) {
            if !self.conns.contains_key(&conn)
                && let Some(other) = peer
                    .and_then(|p| self.streams.get(&p))
                    .and_then(|s| s.first())
            {
                conn = *other;
            }
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
    pub(super) fn encapsulate(
        &mut self,
        peers: &mut Peers,
        packet: &[u8],
        now: Instant,
        stats: &mut Stats,
    ) {
        if self.batch.is_full() {
            self.flush_udp(stats);
        }
        let Sink {
            batch,
            conns,
            dirty,
            streams,
            ..
        } = self;
        let slot = batch.slot();
        let slot_start = slot.as_ptr();
        if let Encapsulated::Send { to, datagram, peer } = peers.encapsulate(packet, slot) {
            if let Some(endpoint) = framed::addr_conn(to) {
                let conn = Self::stream_for(conns, streams, peers, peer, endpoint, packet, now);
                Self::push_framed(conns, dirty, conn, datagram, stats);
            } else if datagram.as_ptr() == slot_start {
                let len = datagram.len();
                batch.commit(len, to);
                stats.udp_tx += 1;
            }
        }
        // Drops are counted by the peer table.
    }

    /// The stream `packet` (to `peer`, whose endpoint is `endpoint`) goes
    /// on: by its flow's hash among the peer's streams when it has several
    /// — unless that stream has been silent for [`STREAM_SILENCE`] (a
    /// stream the laptop no longer uses, e.g. after its address changed,
    /// that the far end has not closed yet): then the endpoint, the stream
    /// the peer was last heard on.
    #[allow(clippy::too_many_arguments)]
    fn stream_for(
        conns: &HashMap<ConnId, FramedConn>,
        streams: &HashMap<PeerId, Vec<ConnId>>,
        peers: &Peers,
        peer: PeerId,
        endpoint: ConnId,
        packet: &[u8],
        now: Instant,
    ) -> ConnId {
        let Some(list) = streams.get(&peer).filter(|l| l.len() > 1) else {
            return if conns.contains_key(&endpoint) {
                endpoint
            } else {
                streams
                    .get(&peer)
                    .and_then(|l| l.first())
                    .copied()
                    .unwrap_or(endpoint)
            };
        };
        let chosen = list[(flow_hash(packet) % list.len() as u64) as usize];
        let key = peers.get(peer).map(|p| *p.public_key());
        match conns.get(&chosen) {
            Some(c)
                if key.is_some()
                    && c.peer.map(|(_, k)| k) == key
                    && c.heard
                        .is_some_and(|t| now.saturating_duration_since(t) < STREAM_SILENCE) =>
            {
                chosen
            }
            _ => endpoint,
        }
    }

    /// Count `conn` among `peer`'s streams (a datagram of its was accepted
    /// there, `now`); a connection belongs to one peer at a time. True
    /// when `conn` was not among them.
    pub(super) fn bind(&mut self, conn: ConnId, peer: PeerId, peers: &Peers, now: Instant) -> bool {
        let Some(key) = peers.get(peer).map(|p| *p.public_key()) else {
            return false;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.heard = Some(now);
        if c.peer == Some((peer, key)) && self.streams.get(&peer).is_some_and(|l| l.contains(&conn))
        {
            return false;
        }
        let before = c.peer.replace((peer, key));
        if let Some((old, _)) = before
            && old != peer
        {
            self.unlist(old, conn);
        }
        let conns = &self.conns;
        let list = self.streams.entry(peer).or_default();
        if before != Some((peer, key)) {
            // A new stream of this peer: its streams silent for a moment
            // are ones it left behind (its address changed, it woke up and
            // opened new ones) that the far end has not closed yet; flows
            // hashed onto them would go nowhere. A live but idle one is
            // listed again (without this) at its next keepalive (5 s).
            list.retain(|c| {
                conns
                    .get(c)
                    .and_then(|c| c.heard)
                    .is_some_and(|t| now.saturating_duration_since(t) < LEFT_BEHIND)
            });
        }
        if list.contains(&conn) {
            return false;
        }
        list.push(conn);
        true
    }

    /// A connection closed: it is no longer one of its peer's streams.
    /// Returns how many streams that peer has left (None: it was no
    /// peer's).
    pub(super) fn unbind(&mut self, conn: &FramedConn, id: ConnId) -> Option<usize> {
        let (peer, _) = conn.peer?;
        self.unlist(peer, id);
        Some(self.streams.get(&peer).map_or(0, Vec::len))
    }

    fn unlist(&mut self, peer: PeerId, conn: ConnId) {
        if let Some(list) = self.streams.get_mut(&peer) {
            list.retain(|c| *c != conn);
            if list.is_empty() {
                self.streams.remove(&peer);
            }
        }
    }

    pub(super) fn push_framed(
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

    pub(super) fn flush_udp(&mut self, stats: &mut Stats) {
        if self.batch.is_empty() {
            return;
        }
        // Counted before: flush reports the ones the kernel refused.
        let dropped = self.batch.flush(&self.udp);
        stats.drop_udp_send_full += dropped as u64;
    }

    pub(super) fn flush(&mut self, stats: &mut Stats) {
        self.flush_udp(stats);
        for conn in self.dirty.drain(..) {
            if let Some(c) = self.conns.get(&conn) {
                c.out.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use boringtun::x25519::{PublicKey, StaticSecret};
    use burrow_netstack::wg::PeerConfig;

    use super::*;
    use crate::framed::FramedOut;

    const LAPTOP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 7);

    /// A TCP packet from the laptop's `port` to 10.96.0.1:80 (or back).
    fn tcp(port: u16, reply: bool) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = burrow_netstack::wire::PROTO_TCP;
        let (a, b) = (LAPTOP.octets(), [10, 96, 0, 1]);
        let (src, dst, sport, dport) = if reply {
            (b, a, 80, port)
        } else {
            (a, b, port, 80)
        };
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p
    }

    fn conn() -> FramedConn {
        FramedConn::new(
            "127.0.0.1:1".parse().expect("addr"),
            Arc::new(FramedOut::default()),
            65535,
        )
    }

    #[tokio::test]
    async fn each_flow_keeps_one_of_the_laptops_streams() {
        let mut peers = Peers::new(StaticSecret::from([1; 32]));
        let key = PublicKey::from(&StaticSecret::from([2; 32]));
        peers
            .add(PeerConfig::host(key, IpAddr::V4(LAPTOP)))
            .expect("peer");
        let id = peers.find_by_key(&key).expect("added");
        let mut out = Sink {
            udp: UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
            batch: SendBatch::new(2048),
            conns: HashMap::new(),
            dirty: Vec::new(),
            streams: HashMap::new(),
        };
        let now = Instant::now();
        for c in 1..=3 {
            out.conns.insert(c, conn());
            out.bind(c, id, &peers, now);
        }
        let pick = |out: &Sink, port: u16, reply: bool, at: Instant| {
            Sink::stream_for(
                &out.conns,
                &out.streams,
                &peers,
                id,
                3,
                &tcp(port, reply),
                at,
            )
        };
        let mut used = std::collections::HashSet::new();
        for port in 40000..40064 {
            let c = pick(&out, port, true, now);
            assert_eq!(c, pick(&out, port, true, now), "a flow stays put");
            used.insert(c);
        }
        assert_eq!(used.len(), 3, "flows spread over every stream: {used:?}");
        // A stream that closed carries none of them; the flows of the
        // others stay where they were.
        let before: Vec<ConnId> = (40000..40064).map(|p| pick(&out, p, true, now)).collect();
        let gone = out.conns.remove(&2).expect("conn 2");
        assert_eq!(out.unbind(&gone, 2), Some(2));
        for (port, was) in (40000..40064).zip(&before) {
            let c = pick(&out, port, true, now);
            assert_ne!(c, 2);
            if *was != 2 {
                // Two streams now: flows re-hash, but only onto live ones.
                assert!(c == 1 || c == 3);
            }
        }
        // A new stream (the laptop moved) takes its silent streams off the
        // list at once; one of them heard again comes back, and only it.
        let moved = now + Duration::from_secs(2);
        out.conns.insert(4, conn());
        out.bind(1, id, &peers, moved);
        out.bind(4, id, &peers, moved);
        assert_eq!(out.streams.get(&id), Some(&vec![1, 4]), "3 was left behind");
        out.bind(3, id, &peers, moved + Duration::from_secs(3));
        assert_eq!(out.streams.get(&id), Some(&vec![1, 4, 3]), "3 spoke again");
        out.streams.insert(id, vec![1, 3]);
        out.conns.remove(&4);
        // Streams silent for too long carry nothing: the endpoint (3) does.
        let later = moved + Duration::from_secs(3) + STREAM_SILENCE + Duration::from_secs(1);
        assert!((40000..40064).all(|p| pick(&out, p, true, later) == 3));
        // A stream bound to a peer slot since reused by another key is not
        // this peer's.
        out.conns.get_mut(&1).expect("conn 1").peer =
            Some((id, PublicKey::from(&StaticSecret::from([9; 32]))));
        assert!((40000..40064).all(|p| {
            let c = pick(&out, p, true, now);
            c == 3
        }));
    }
}
