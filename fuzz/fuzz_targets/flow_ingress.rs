//! IP packets into the gateway's flow engine (`flow::FlowEngine::ingress`),
//! several per input so that flows build up state, interleaved with what
//! the gateway's data path does: accept/refuse/discard of new TCP flows,
//! reads, writes, closes, aborts, releases, UDP replies, connections to a
//! laptop, expiry, the stall probe, time passing, and `egress` into a sink
//! that checks every packet the engine emits.
//!
//! To get past checksums and sequence numbers, a packet's flags byte can
//! ask for fix-ups: IP header lengths and checksum, the TCP/UDP checksum,
//! the ACK number set to what the engine sent last on the reverse tuple
//! (so handshakes complete), the sequence number set to what the engine
//! acknowledged last (so data is in window), the addresses and ports of
//! the last TCP segment the engine emitted reversed (so the gateway's own
//! connections to a laptop get answers), and MSS clamping
//! (`wire::clamp_tcp_mss`, which the client applies to every packet).
//!
//! The engine's per-laptop caps are the defaults or a few flows each; after
//! every operation its accounting (`laptop_flows`) must match the flows it
//! holds (`flows_of`) and stay within the caps.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use burrow_fuzz::{Reader, fix_ip_header, fix_transport_checksum, tcp_checksum_ok, tcp_tuple};
use burrow_netstack::flow::{FlowConfig, FlowEngine, FlowId, Ingress, LaptopLimits, TcpRead};
use burrow_netstack::reassembly::{self, Reassembled, Reassembler};
use burrow_netstack::wire;
use libfuzzer_sys::fuzz_target;

type End = [u8; 18];
/// Operations per input: a TCP handshake, an exchange and a close take
/// about 15.
const MAX_OPS: usize = 64;

struct Harness {
    eng: FlowEngine,
    mtu: usize,
    now: Instant,
    /// Per TCP tuple the engine sent on: (its next sequence number, the
    /// last ACK number it sent).
    sent: HashMap<(End, End), (u32, u32)>,
    /// The last TCP segment the engine emitted, reversed: (src, dst) to
    /// copy into a packet from the laptop.
    last_tcp: Option<Vec<u8>>,
    /// Every flow id the engine handed out.
    flows: Vec<FlowId>,
    limits: LaptopLimits,
    /// Laptop addresses that opened flows (the first few).
    laptops: Vec<IpAddr>,
    reasm: Reassembler,
}

/// Small caps, so that inputs reach them.
const REASSEMBLY: reassembly::Limits = reassembly::Limits {
    per_source: 8192,
    total: 16384,
    timeout: Duration::from_secs(5),
};

fn be32(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

impl Harness {
    fn egress(&mut self) {
        let mut packets: Vec<Vec<u8>> = Vec::new();
        self.eng
            .egress(self.now, &mut |p: &[u8]| packets.push(p.to_vec()));
        for p in packets {
            let h = wire::parse_ip(&p).expect("the engine emits valid IP");
            assert_eq!(h.total_len, p.len(), "no trailing bytes");
            assert!(
                p.len() <= self.mtu,
                "{} bytes over an MTU of {}",
                p.len(),
                self.mtu
            );
            if let Some((src, dst, at)) = tcp_tuple(&p) {
                let off = usize::from(p[at + 12] >> 4) * 4;
                assert!(off >= 20 && at + off <= p.len(), "TCP header fits");
                let flags = p[at + 13];
                let len = (p.len() - at - off) as u32
                    + u32::from(flags & 0x02 != 0)
                    + u32::from(flags & 0x01 != 0);
                let seq = be32(&p, at + 4);
                let ack = be32(&p, at + 8);
                self.sent.insert((src, dst), (seq.wrapping_add(len), ack));
                self.last_tcp = Some(p);
            }
        }
    }

    fn packet(&mut self, r: &mut Reader) {
        let flags = r.u8();
        let mut p = r.piece(1600).to_vec();
        if flags & 0x20 != 0
            && let Some(last) = &self.last_tcp
            && let Some((_, _, at)) = tcp_tuple(last)
            && p.len() >= at + 20
            && p.first().map(|b| b >> 4) == last.first().map(|b| b >> 4)
        {
            // Answer the engine's last segment: swap its addresses and ports.
            let (src, dst, ports) = if last[0] >> 4 == 4 {
                (12..16, 16..20, at)
            } else {
                (8..24, 24..40, at)
            };
            p[src.clone()].copy_from_slice(&last[dst.clone()]);
            p[dst].copy_from_slice(&last[src]);
            p[ports..ports + 2].copy_from_slice(&last[ports + 2..ports + 4]);
            p[ports + 2..ports + 4].copy_from_slice(&last[ports..ports + 2]);
        }
        if flags & 0x01 != 0 {
            fix_ip_header(&mut p);
        }
        if let Some((src, dst, at)) = tcp_tuple(&p)
            && let Some(&(next, ack)) = self.sent.get(&(dst, src))
        {
            if flags & 0x04 != 0 {
                p[at + 8..at + 12].copy_from_slice(&next.to_be_bytes());
                p[at + 13] |= 0x10;
            }
            if flags & 0x08 != 0 {
                p[at + 4..at + 8].copy_from_slice(&ack.to_be_bytes());
            }
        }
        if flags & 0x10 != 0 {
            let mss = r.u16();
            let before = p.clone();
            if let Ok(changed) = wire::clamp_tcp_mss(&mut p, mss) {
                assert_eq!(changed, p != before);
                let exact = wire::parse_ip(&p).is_ok_and(|h| h.total_len == p.len());
                if changed && exact && tcp_checksum_ok(&before) == Some(true) {
                    assert_eq!(
                        tcp_checksum_ok(&p),
                        Some(true),
                        "clamping kept the checksum"
                    );
                }
            } else {
                assert_eq!(p, before, "a failed clamp leaves the packet alone");
            }
        }
        if flags & 0x02 != 0 {
            fix_transport_checksum(&mut p);
        }
        // Fragments go through reassembly first, as in the gateway.
        if let Ok(h) = wire::parse_ip(&p)
            && h.fragment
        {
            let whole = self.reasm.push(&h, &p, self.now);
            assert!(self.reasm.held_by(h.src) <= REASSEMBLY.per_source);
            match whole {
                Reassembled::Complete(w) => {
                    let back = wire::parse_ip(&w).expect("a reassembled packet parses");
                    assert!(!back.fragment && back.total_len == w.len());
                    p = w;
                }
                Reassembled::Whole => unreachable!("a fragment is never whole"),
                Reassembled::Held | Reassembled::Dropped(_) => return,
            }
        }
        let parsed = wire::parse_ip(&p);
        match self.eng.ingress(&p, self.now) {
            Ingress::NewTcp { id, src, dst } => {
                let h = parsed.expect("a new flow came from a valid packet");
                assert_eq!((src.ip(), dst.ip()), (h.src, h.dst));
                self.flows.push(id);
                let r = match r.u8() % 4 {
                    0 | 1 => self.eng.accept(id, self.now),
                    2 => self.eng.refuse(id),
                    _ => self.eng.discard(id),
                };
                let _ = r;
            }
            Ingress::UdpDatagram {
                id,
                new,
                src,
                dst,
                payload,
            } => {
                let h = parsed.expect("a datagram came from a valid packet");
                assert_eq!((src.ip(), dst.ip()), (h.src, h.dst));
                assert!(payload.len() <= h.total_len);
                if new {
                    self.flows.push(id);
                }
                let reply = payload.to_vec();
                if r.u8() & 1 != 0 {
                    let _ = self.eng.udp_send(id, &reply, self.now);
                }
            }
            Ingress::EchoRequest { key, message } => {
                let h = parsed.expect("an echo request came from a valid packet");
                assert_eq!((key.laptop, key.remote), (h.src, h.dst));
                assert!(message.len() <= h.total_len);
                // The message as a "reply": not one, so nothing is built.
                let reply = message.to_vec();
                assert!(!self.eng.echo_reply(key, &reply));
            }
            Ingress::Refused { laptop, .. } => {
                let h = parsed.expect("a refused flow came from a valid packet");
                assert_eq!(laptop, h.src);
            }
            Ingress::Handled | Ingress::Dropped(_) => {}
        }
        if let Ok(h) = wire::parse_ip(&p)
            && self.laptops.len() < 8
            && !self.laptops.contains(&h.src)
        {
            self.laptops.push(h.src);
        }
    }

    /// The per-laptop accounting agrees with the flows the engine holds
    /// and never exceeds the caps.
    fn check_accounting(&self) {
        for &laptop in &self.laptops {
            let f = self.eng.laptop_flows(laptop);
            let (tcp, udp) = self.eng.flows_of(laptop);
            assert!(
                f.tcp <= self.limits.tcp_flows,
                "{f:?} over {:?}",
                self.limits
            );
            assert!(
                f.pending <= self.limits.pending_dials,
                "{f:?} over {:?}",
                self.limits
            );
            assert!(
                f.udp <= self.limits.udp_flows,
                "{f:?} over {:?}",
                self.limits
            );
            assert!(f.pending <= f.tcp, "{f:?}");
            // flows_of also counts connections the gateway opened to it.
            assert!(f.tcp <= tcp, "{f:?} but {tcp} TCP flows");
            assert_eq!(f.udp, udp, "{f:?} but {udp} UDP flows");
        }
    }

    fn flow_op(&mut self, r: &mut Reader) {
        if self.flows.is_empty() {
            return;
        }
        let id = self.flows[usize::from(r.u8()) % self.flows.len()];
        let e = &mut self.eng;
        match r.u8() % 10 {
            0 => {
                let data = r.piece(70_000);
                if let Ok(n) = e.tcp_send(id, data) {
                    assert!(n <= data.len());
                }
            }
            1 => {
                let max = usize::from(r.u16());
                let mut out = Vec::new();
                if let Ok(TcpRead::Data(n)) = e.tcp_recv_append(id, &mut out, max) {
                    assert!(n > 0 && n <= max && n == out.len());
                }
            }
            2 => {
                let mut buf = vec![0u8; usize::from(r.u8()) * 16];
                if let Ok(TcpRead::Data(n)) = e.tcp_recv(id, &mut buf) {
                    assert!(n > 0 && n <= buf.len());
                }
            }
            3 => {
                let take = usize::from(r.u16());
                let _ = e.tcp_recv_with(id, |d| (take.min(d.len()), ()));
            }
            4 => {
                let fill = r.u8();
                let give = usize::from(r.u16());
                let _ = e.tcp_send_with(id, |buf| {
                    let n = give.min(buf.len());
                    buf[..n].fill(fill);
                    (n, ())
                });
            }
            5 => {
                let _ = e.tcp_close(id);
            }
            6 => {
                let _ = e.tcp_abort(id);
            }
            7 => e.release(id),
            8 => {
                let payload = r.piece(2000);
                let _ = e.udp_send(id, payload, self.now);
            }
            _ => {
                let _ = e.tcp_state(id);
                if let (Ok(room), Ok(_)) = (e.tcp_send_room(id), e.tcp_recv_queue(id)) {
                    assert!(room <= 70_000);
                }
            }
        }
    }

    fn connect(&mut self, r: &mut Reader) {
        let c = r.u8();
        let local = match c % 4 {
            0 => IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)),
            1 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 1)),
            2 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::new(r.u8(), r.u8(), r.u8(), r.u8())),
        };
        let remote_ip = match (c >> 2) % 3 {
            0 => IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            1 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 2)),
            _ => IpAddr::V4(Ipv4Addr::new(r.u8(), r.u8(), r.u8(), r.u8())),
        };
        let remote = SocketAddr::new(remote_ip, r.u16());
        if let Ok((id, local_end)) = self.eng.connect(local, remote) {
            assert_eq!(local_end.ip(), local);
            self.flows.push(id);
        }
    }

    fn housekeeping(&mut self, r: &mut Reader) {
        let e = &mut self.eng;
        match r.u8() % 5 {
            0 => {
                self.reasm.expire(self.now);
                let mut expired = Vec::new();
                e.expire(self.now, |id| expired.push(id));
            }
            1 => e.probe_stalled_flows(),
            2 => {
                let mut active = Vec::new();
                e.take_active(&mut active);
                let tcp: Vec<FlowId> = e.tcp_flows().collect();
                assert!(active.iter().all(|id| tcp.contains(id)));
            }
            3 => {
                let _ = e.flows_of(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)));
            }
            _ => {
                let _ = e.poll_delay(self.now);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let c = r.u8();
    let mtu = [1420, 576, 1280, 1500][usize::from(c & 3)];
    let buffer = [1024, 4096, 16 * 1024, 64 * 1024][usize::from((c >> 2) & 3)];
    // Per-laptop caps: the defaults, or a few flows each.
    let l = r.u8();
    let limits = if l & 0x80 == 0 {
        LaptopLimits::default()
    } else {
        LaptopLimits {
            tcp_flows: usize::from(l & 7) + 1,
            pending_dials: usize::from((l >> 3) & 3) + 1,
            udp_flows: usize::from((l >> 5) & 3) + 1,
        }
    };
    let config = FlowConfig {
        mtu,
        datagram_mtu: mtu,
        tcp_rx_buffer: buffer,
        tcp_tx_buffer: buffer,
        udp_idle_timeout: Duration::from_secs(60),
        max_pending_syns: usize::from(c >> 4) + 1,
        random_seed: 0,
        orphan_linger: Duration::from_secs(60),
        per_laptop: limits,
        // Small enough that the send-buffer memory caps bite.
        tcp_tx_memory_per_laptop: buffer * 2,
        tcp_tx_memory_all: buffer * 3,
    };
    let start = Instant::now();
    let mut h = Harness {
        eng: FlowEngine::new(config, start),
        mtu,
        now: start,
        sent: HashMap::new(),
        last_tcp: None,
        flows: Vec::new(),
        limits,
        laptops: Vec::new(),
        reasm: Reassembler::new(REASSEMBLY),
    };
    let mut ops = 0;
    while !r.is_empty() && ops < MAX_OPS {
        ops += 1;
        match r.u8() % 16 {
            0..=6 => h.packet(&mut r),
            7 | 8 => h.egress(),
            9 => h.now += Duration::from_millis(u64::from(r.u16()) * 4),
            10..=12 => h.flow_op(&mut r),
            13 => h.connect(&mut r),
            _ => h.housekeeping(&mut r),
        }
        h.check_accounting();
    }
    h.egress();
    h.check_accounting();
});
