//! Datagrams into the gateway's WireGuard input: `wg::Peers::decapsulate`
//! of a gateway-side table (`Peers::new`, three laptops), straight from UDP
//! or through the framed transport (`framed::decode_chunk`, arbitrarily
//! chunked).
//!
//! The first byte picks a mode:
//! - 0 raw: length-prefixed datagrams from a choice of underlay addresses
//!   (UDP, a tunnel address, framed connections), with `flush_queued`,
//!   `update_timers` and `encapsulate` in between;
//! - 1 framed: a byte stream cut into chunks of fuzzed sizes; every frame
//!   goes to `decapsulate`. Checked: chunking never changes the frames or
//!   the error, and re-encoding the frames decodes to the same frames;
//! - 2 session: a real boringtun client (laptop A) has a session with the
//!   gateway; fuzzed inner packets are encrypted by it (optionally fixed
//!   up into IPv4/IPv6 from A's address, optionally with a byte of the
//!   datagram flipped), so the checks after decryption (source, parse,
//!   peer-to-peer) see hostile packets;
//! - 3 handshake: fuzzed handshake initiations/responses with a valid MAC1
//!   (computed here), which reach the rate limiter's load path (cookie
//!   replies), the anonymous handshake parse and the sessions' handshake
//!   code.
//!
//! The gateway and the client session persist across inputs (a handshake
//! per input would cost more than the rest); nothing a fuzzed datagram can
//! do authenticates, so the state carried over is counters, endpoints and
//! the rate limiter's count.
#![no_main]

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::{FixedOutput, KeyInit, Update};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_fuzz::{Reader, fix_ip_header};
use burrow_gateway::framed;
use burrow_netstack::framing::{self, FrameDecoder, FrameError};
use burrow_netstack::wg::{Decapsulated, Encapsulated, PeerConfig, PeerId, Peers};
use libfuzzer_sys::fuzz_target;

const LAPTOP_A_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const LAPTOP_A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 2);
/// Re-handshake well before boringtun's REKEY_AFTER_TIME (120 s).
const SESSION_MAX_AGE: Duration = Duration::from_secs(90);
const BUF: usize = 4096;
/// Largest fuzzed datagram / inner packet.
const MAX_DATAGRAM: usize = 2048;

fn key(n: u8) -> StaticSecret {
    StaticSecret::from([n; 32])
}

/// Underlay sources: laptop A's usual one, others it may roam to, one of
/// its own tunnel addresses (never roamed to) and two framed connections.
fn underlay(choice: u8) -> SocketAddr {
    match choice % 6 {
        0 => SocketAddr::from(([192, 0, 2, 10], 5000)),
        1 => SocketAddr::from(([198, 51, 100, 7], 6000)),
        2 => SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 7000)),
        3 => SocketAddr::from((LAPTOP_A_V4, 7000)),
        4 => framed::conn_addr(1),
        _ => framed::conn_addr(u64::MAX),
    }
}

struct World {
    gw: Peers,
    a: PeerId,
    /// Laptop A's side of its session with the gateway.
    client: Tunn,
    session_at: Option<Instant>,
    mac1_key: [u8; 32],
    gbuf: Vec<u8>,
    cbuf: Vec<u8>,
}

impl World {
    fn new() -> Self {
        let mut gw = Peers::new(key(1));
        let a = gw
            .add(PeerConfig {
                allowed_ips: vec![
                    IpAddr::V4(LAPTOP_A_V4).into(),
                    IpAddr::V6(LAPTOP_A_V6).into(),
                ],
                ..PeerConfig::host(PublicKey::from(&key(2)), IpAddr::V4(LAPTOP_A_V4))
            })
            .expect("peer A");
        gw.add(PeerConfig::host(
            PublicKey::from(&key(3)),
            IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3)),
        ))
        .expect("peer B");
        gw.add(PeerConfig {
            preshared_key: Some([7; 32]),
            persistent_keepalive: Some(25),
            ..PeerConfig::host(
                PublicKey::from(&key(4)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 4)),
            )
        })
        .expect("peer C");
        let gw_pub = *gw.public_key();
        let mut h = blake2::Blake2s256::default();
        Update::update(&mut h, b"mac1----");
        Update::update(&mut h, gw_pub.as_bytes());
        let mac1_key: [u8; 32] = h.finalize_fixed().into();
        Self {
            gw,
            a,
            client: Tunn::new(key(2), gw_pub, None, None, 7, None),
            session_at: None,
            mac1_key,
            gbuf: vec![0; BUF],
            cbuf: vec![0; BUF],
        }
    }

    /// Feed one datagram to the gateway and do what the data path does
    /// with the result (flush queued packets after a send).
    fn feed(&mut self, from: SocketAddr, datagram: &[u8], dst_len: usize) {
        let dst = &mut self.gbuf[..dst_len.min(BUF)];
        match self.gw.decapsulate(from, datagram, dst, Instant::now()) {
            Decapsulated::Send { peer, to, datagram } => {
                assert_eq!(to, from, "replies go back where the datagram came from");
                assert!(!datagram.is_empty());
                if let Some(peer) = peer {
                    for _ in 0..8 {
                        if !matches!(
                            self.gw.flush_queued(peer, &mut self.gbuf),
                            Decapsulated::Send { .. }
                        ) {
                            break;
                        }
                    }
                }
            }
            Decapsulated::Packet { peer, packet } => {
                // Only source-checked IP packets come out.
                let h = burrow_netstack::wire::parse_ip(packet).expect("delivered packets parse");
                assert_eq!(h.total_len, packet.len());
                assert_eq!(self.gw.route(h.src), Some(peer), "source routes to sender");
                assert_eq!(self.gw.route(h.dst), None, "no peer-to-peer");
            }
            Decapsulated::Nothing | Decapsulated::Keepalive { .. } | Decapsulated::Dropped(_) => {}
        }
    }

    /// Laptop A handshakes with the gateway (answering a cookie reply
    /// when the gateway is under load). False when it did not complete.
    fn establish(&mut self) -> bool {
        let from = underlay(0);
        for _ in 0..4 {
            let init = match self
                .client
                .format_handshake_initiation(&mut self.cbuf, true)
            {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => return false,
            };
            let reply = match self
                .gw
                .decapsulate(from, &init, &mut self.gbuf, Instant::now())
            {
                Decapsulated::Send { datagram, .. } => datagram.to_vec(),
                _ => {
                    // The rate limiter's count resets at most once a second.
                    self.gw.update_timers(&mut self.gbuf, |_, _, _| {});
                    return false;
                }
            };
            let mut out = Vec::new();
            if let TunnResult::WriteToNetwork(d) =
                self.client
                    .decapsulate(Some(from.ip()), &reply, &mut self.cbuf)
            {
                out.push(d.to_vec());
                while let TunnResult::WriteToNetwork(d) =
                    self.client.decapsulate(None, &[], &mut self.cbuf)
                {
                    out.push(d.to_vec());
                }
            }
            for d in out {
                self.feed(from, &d, BUF);
            }
            if reply.first() == Some(&2) {
                self.session_at = Some(Instant::now());
                return true;
            }
            // A cookie reply: the client keeps the cookie for its MAC2.
        }
        false
    }

    fn session(&mut self) -> bool {
        match self.session_at {
            Some(t) if t.elapsed() < SESSION_MAX_AGE => true,
            _ => self.establish(),
        }
    }

    /// A fuzzed datagram of a handshake type with a valid MAC1.
    fn handshake_message(&mut self, r: &mut Reader) -> Vec<u8> {
        let flags = r.u8();
        let len = if flags & 1 == 0 { 148 } else { 92 };
        let mut m = vec![0u8; len];
        m[0] = if flags & 1 == 0 { 1 } else { 2 };
        let body = r.take(len - 4);
        m[4..4 + body.len()].copy_from_slice(body);
        if flags & 2 != 0 && len == 92 {
            // A receiver index naming peer A's session slots.
            m[8..12].copy_from_slice(&(self.a.index() << 8 | u32::from(r.u8())).to_le_bytes());
        }
        let mac1_at = len - 32;
        let mut mac =
            blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&self.mac1_key)
                .expect("32-byte key");
        Update::update(&mut mac, &m[..mac1_at]);
        let mac1: [u8; 16] = mac.finalize_fixed().into();
        m[mac1_at..mac1_at + 16].copy_from_slice(&mac1);
        m
    }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

/// Decode `chunks` in order; the frames and the error that stopped it.
fn decode(
    max: usize,
    chunks: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<Vec<u8>>, Option<FrameError>, bool) {
    let mut dec = FrameDecoder::with_max_frame(max);
    let mut frames = Vec::new();
    for chunk in chunks {
        if let Err(e) = framed::decode_chunk(&mut dec, chunk, |f| frames.push(f.to_vec())) {
            assert!(!dec.is_at_boundary());
            return (frames, Some(e), false);
        }
    }
    let boundary = dec.is_at_boundary();
    (frames, None, boundary)
}

fn framed_mode(w: &mut World, r: &mut Reader) {
    let max = usize::from(r.u16());
    let sizes: Vec<usize> = (0..(r.u8() % 16) + 1)
        .map(|_| usize::from(r.u8()) + 1)
        .collect();
    let from = underlay(4 + (r.u8() & 1));
    let stream = r.rest();
    let mut chunks = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at >= stream.len() {
            break;
        }
        let end = (at + size).min(stream.len());
        chunks.push(&stream[at..end]);
        at = end;
    }
    let (frames, err, boundary) = decode(max, &mut chunks.iter().copied());
    let (whole, whole_err, whole_boundary) = decode(max, &mut std::iter::once(stream));
    assert_eq!(frames, whole, "chunking changed the frames");
    assert_eq!(err, whole_err, "chunking changed the error");
    assert_eq!(boundary, whole_boundary);
    for f in &frames {
        assert!(!f.is_empty() && f.len() <= max.min(framing::MAX_FRAME));
    }
    // Encoding is the inverse of decoding.
    let mut encoded = vec![0u8; frames.iter().map(|f| f.len() + 2).sum()];
    let mut at = 0;
    for f in &frames {
        at += framing::encode_frame(f, &mut encoded[at..]).expect("room for the frame");
    }
    let (again, again_err, _) = decode(max, &mut std::iter::once(&encoded[..]));
    assert_eq!(again, frames);
    assert_eq!(again_err, None);
    for f in &frames {
        w.feed(from, f, BUF);
    }
}

fn session_mode(w: &mut World, r: &mut Reader) {
    if !w.session() {
        return;
    }
    while !r.is_empty() {
        let flags = r.u8();
        let from = underlay(r.u8());
        let mut inner = r.piece(MAX_DATAGRAM).to_vec();
        match flags & 3 {
            1 if inner.len() >= 20 => {
                inner[0] = 0x45 | (inner[0] & 0x0f);
                inner[12..16].copy_from_slice(&LAPTOP_A_V4.octets());
                fix_ip_header(&mut inner);
            }
            2 if inner.len() >= 40 => {
                inner[0] = 0x60 | (inner[0] & 0x0f);
                inner[8..24].copy_from_slice(&LAPTOP_A_V6.octets());
                fix_ip_header(&mut inner);
            }
            _ => {}
        }
        let mut datagram = match w.client.encapsulate(&inner, &mut w.cbuf) {
            TunnResult::WriteToNetwork(d) if d.first() == Some(&4) => d.to_vec(),
            _ => {
                // The session is gone (or a packet got queued): next input
                // handshakes again.
                w.session_at = None;
                return;
            }
        };
        if flags & 4 != 0 {
            let at = usize::from(r.u16()) % datagram.len();
            datagram[at] ^= r.u8() | 1;
        }
        if flags & 8 != 0 {
            // Replay: the second copy must be rejected.
            w.feed(from, &datagram, BUF);
        }
        w.feed(from, &datagram, BUF);
        if flags & 16 != 0 {
            // The gateway's direction: route the packet by its destination.
            let mut gbuf = std::mem::take(&mut w.gbuf);
            if let Encapsulated::Send { datagram, to, .. } = w.gw.encapsulate(&inner, &mut gbuf) {
                let d = datagram.to_vec();
                let _ = w.client.decapsulate(Some(to.ip()), &d, &mut w.cbuf);
            }
            w.gbuf = gbuf;
        }
    }
}

fn raw_mode(w: &mut World, r: &mut Reader) {
    while !r.is_empty() {
        let op = r.u8();
        let from = underlay(op >> 4);
        match op & 0x0f {
            0..=9 => {
                let d = r.piece(MAX_DATAGRAM).to_vec();
                // Mostly a buffer as large as required, sometimes one
                // too small.
                let dst_len = if op & 0x0f == 9 {
                    usize::from(r.u16())
                } else {
                    d.len().max(148)
                };
                w.feed(from, &d, dst_len);
            }
            10 => {
                let mut gbuf = std::mem::take(&mut w.gbuf);
                w.gw.update_timers(&mut gbuf, |_, _, d| assert!(!d.is_empty()));
                w.gbuf = gbuf;
            }
            11 => {
                let p = r.piece(MAX_DATAGRAM).to_vec();
                let mut gbuf = std::mem::take(&mut w.gbuf);
                let _ = w.gw.encapsulate(&p, &mut gbuf);
                w.gbuf = gbuf;
            }
            12 => {
                let id = w.a;
                let _ = w.gw.flush_queued(id, &mut w.gbuf);
            }
            _ => {
                let m = w.handshake_message(r);
                w.feed(from, &m, BUF);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let w = slot.get_or_insert_with(World::new);
        let mut r = Reader::new(data);
        match r.u8() % 4 {
            0 => raw_mode(w, &mut r),
            1 => framed_mode(w, &mut r),
            2 => session_mode(w, &mut r),
            _ => {
                while !r.is_empty() {
                    let from = underlay(r.u8());
                    let m = w.handshake_message(&mut r);
                    w.feed(from, &m, BUF);
                }
            }
        }
    });
});
