//! TUN offloads, sans-IO: what a TUN read with a `virtio_net_hdr` in front
//! (`IFF_VNET_HDR`) turns into on the way to WireGuard.
//!
//! With `TUNSETOFFLOAD` (checksum + TSO) the kernel hands over TCP segments
//! of up to 64 KiB with a partial checksum; [`segment`] splits one into
//! MTU-sized IP packets as the kernel's own GSO would (IP length, ID and
//! header checksum; TCP sequence number, FIN/PSH only on the last segment,
//! CWR only on the first, full TCP checksum) and completes the checksum of
//! packets that were not segmented. Malformed input is an error, never a
//! panic.
//!
//! The other way, [`Coalescer`] joins runs of TCP segments of one flow
//! that come out of the tunnel into one GSO write (as the kernel's GRO
//! would), so a bulk download costs one TUN write per up to 64 KiB instead
//! of one per packet.

/// `struct virtio_net_hdr` (no mergeable buffers), host byte order.
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

use burrow_netstack::wire::PROTO_TCP;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Why a TUN read could not be turned into packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("read shorter than the vnet header")]
    Short,
    #[error("unsupported GSO type {0}")]
    GsoType(u8),
    #[error("GSO packet headers do not parse")]
    BadHeaders,
    #[error("checksum offsets outside the packet")]
    BadCsum,
    #[error("segment does not fit the scratch buffer")]
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

fn parse_hdr(b: &[u8]) -> Result<VnetHdr, OffloadError> {
    if b.len() < VNET_HDR_LEN {
        return Err(OffloadError::Short);
    }
    let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    Ok(VnetHdr {
        flags: b[0],
        gso_type: b[1],
        gso_size: u16_at(4),
        csum_start: u16_at(6),
        csum_offset: u16_at(8),
    })
}

/// Split one TUN read (`vnet header ++ packet`) into IP packets, each handed
/// to `emit`; `scratch` must hold one segment (headers + `gso_size`).
/// Returns how many packets were emitted.
pub fn segment(
    read: &mut [u8],
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let hdr = parse_hdr(read)?;
    let packet = &mut read[VNET_HDR_LEN..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_csum(packet, hdr.csum_start.into(), hdr.csum_offset.into())?;
            }
            emit(packet);
            Ok(1)
        }
        t @ (GSO_TCPV4 | GSO_TCPV6) => tso(packet, t == GSO_TCPV4, hdr, scratch, emit),
        t => Err(OffloadError::GsoType(t)),
    }
}

/// The partial checksum at `start + offset` already holds the pseudo-header
/// sum: fold in everything from `start` and store the complement.
fn complete_csum(p: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start.checked_add(offset).ok_or(OffloadError::BadCsum)?;
    if at + 2 > p.len() || start > p.len() {
        return Err(OffloadError::BadCsum);
    }
    let c = !fold(sum(0, &p[start..]));
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn tso(
    p: &[u8],
    v4: bool,
    hdr: VnetHdr,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let bad = OffloadError::BadHeaders;
    let first = *p.first().ok_or(bad)?;
    let l4 = if v4 {
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < 20 || p.len() < ihl || p[9] != 6 {
            return Err(bad);
        }
        ihl
    } else {
        if first >> 4 != 6 || p.len() < 40 || p[6] != 6 {
            return Err(bad);
        }
        40
    };
    if usize::from(hdr.csum_start) != l4 || p.len() < l4 + 20 {
        return Err(bad);
    }
    let thl = usize::from(p[l4 + 12] >> 4) * 4;
    let hlen = l4 + thl;
    if thl < 20 || p.len() < hlen {
        return Err(bad);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(bad);
    }
    let payload = &p[hlen..];
    let n = payload.len().div_ceil(mss).max(1);
    if hlen + mss.min(payload.len()) > scratch.len() {
        return Err(OffloadError::TooLarge);
    }
    let seq0 = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
    let id0 = u16::from_be_bytes([p[4], p[5]]);
    for i in 0..n {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let len = hlen + chunk.len();
        let s = &mut scratch[..len];
        s[..hlen].copy_from_slice(&p[..hlen]);
        s[hlen..].copy_from_slice(chunk);
        let seq = seq0.wrapping_add((i * mss) as u32);
        s[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = s[l4 + 13];
        if i + 1 < n {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        s[l4 + 13] = flags;
        if v4 {
            s[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        }
        let pseudo = set_ip_length(s, l4);
        s[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let c = !fold(sum(pseudo, &s[l4..]));
        s[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(s);
    }
    Ok(n)
}

/// Set the IP header's length fields for the whole of `p` (TCP at `l4`;
/// for IPv4 also its header checksum) and return the TCP pseudo-header sum.
fn set_ip_length(p: &mut [u8], l4: usize) -> u32 {
    let len = p.len();
    let tcp_len = (len - l4) as u16;
    if l4 == 20 {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(0, &p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        sum(u32::from(tcp_len) + 6, &p[12..20])
    } else {
        p[4..6].copy_from_slice(&tcp_len.to_be_bytes());
        sum(u32::from(tcp_len) + 6, &p[8..40])
    }
}

/// One's-complement sum of big-endian 16-bit words (odd tail padded),
/// folded to 32 bits. Adds 64-bit big-endian words with end-around carry:
/// 2^64 = 1 modulo 2^16 - 1, so this is the 16-bit sum, four words at a time.
fn sum(acc: u32, b: &[u8]) -> u32 {
    let mut s = u64::from(acc);
    let mut add = |v: u64| {
        let (r, carry) = s.overflowing_add(v);
        s = r + u64::from(carry);
    };
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        add(u64::from_be_bytes(a));
    }
    let mut tail = [0u8; 8];
    let rest = words.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    add(u64::from_be_bytes(tail));
    let s = (s & 0xffff_ffff) + (s >> 32);
    ((s & 0xffff_ffff) + (s >> 32)) as u32
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Most bytes of one coalesced packet (the IPv4 total length field).
const COALESCED_MAX: usize = 65_535;

/// Most segments joined into one write.
const COALESCED_SEGMENTS: usize = 64;

/// A TCP segment's facts, for [`Coalescer`].
struct Seg {
    l4: usize,
    hlen: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// A TCP data segment that may be joined to others: IPv4 without options
/// and not a fragment, or IPv6 with TCP as the next header; flags ACK or
/// ACK+PSH only; some payload.
fn joinable(p: &[u8]) -> Option<Seg> {
    let first = *p.first()?;
    let l4 = match first >> 4 {
        4 if first & 0x0f == 5
            && p.len() >= 40
            && p[9] == 6
            && p[6] & 0x3f == 0
            && p[7] == 0
            && usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len() =>
        {
            20
        }
        6 if p.len() >= 60
            && p[6] == 6
            && usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len() =>
        {
            40
        }
        _ => return None,
    };
    let hlen = l4 + usize::from(p[l4 + 12] >> 4) * 4;
    let flags = p[l4 + 13];
    if hlen < l4 + 20 || hlen >= p.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
    Some(Seg {
        l4,
        hlen,
        seq,
        flags,
        payload: p.len() - hlen,
    })
}

/// Flows whose runs are held at once: segments of parallel downloads
/// arrive interleaved, and a run per flow keeps each joining (as the
/// kernel's GRO keeps a list per flow). With one run only, four downloads
/// at once were written one segment per write.
const RUNS: usize = 8;

/// Joins consecutive segments of each TCP flow, read out of the tunnel,
/// into one packet written with a GSO vnet header; the kernel takes it as
/// the segments it stands for. Up to [`RUNS`] flows are held at once.
/// Everything else passes through unchanged. Each flow's packets keep
/// their order (a packet that cannot join its flow's held run is written
/// after it); packets of different flows may be reordered. Call
/// [`Coalescer::flush`] after each batch.
pub struct Coalescer {
    runs: Vec<Run>,
    /// Which run to give up next when all are held and a new flow comes.
    next_evict: usize,
}

/// One flow's held run of segments.
struct Run {
    buf: Vec<u8>,
    /// Bytes held in `buf` (0: nothing).
    held: usize,
    segs: usize,
    l4: usize,
    hlen: usize,
    /// Payload bytes of the first segment: every one but the last has it.
    mss: usize,
    next_seq: u32,
    psh: bool,
    /// Whether another segment may still join (the last one was full-size
    /// and had no PSH).
    open: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self {
            runs: (0..RUNS).map(|_| Run::new()).collect(),
            next_evict: 0,
        }
    }

    /// Take one IP packet. `write(vnet header, packet, segments)` is called
    /// for whatever must leave now: a held run this packet cannot join (of
    /// its own flow, or the one given up for it), and the packet itself
    /// when it cannot be held.
    pub fn push(&mut self, p: &[u8], write: &mut impl FnMut(&[u8], &[u8], usize)) {
        let seg = joinable(p);
        let mine = self.runs.iter().position(|r| r.same_flow(p));
        if let (Some(seg), Some(i)) = (&seg, mine)
            && self.runs[i].joins(p, seg)
        {
            self.runs[i].append(p, seg);
            return;
        }
        // This flow's run (if any) leaves before the packet.
        if let Some(i) = mine {
            self.runs[i].flush(write);
        }
        match seg {
            Some(seg) if p.len() <= COALESCED_MAX => {
                let i = mine
                    .or_else(|| self.runs.iter().position(|r| r.held == 0))
                    .unwrap_or_else(|| {
                        let i = self.next_evict % self.runs.len();
                        self.next_evict = i + 1;
                        self.runs[i].flush(write);
                        i
                    });
                self.runs[i].start(p, &seg);
            }
            _ => write(&[0; VNET_HDR_LEN], p, 1),
        }
    }

    /// Write every held run.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8], &[u8], usize)) {
        for r in &mut self.runs {
            r.flush(write);
        }
    }
}

impl Run {
    fn new() -> Self {
        Self {
            buf: vec![0; COALESCED_MAX],
            held: 0,
            segs: 0,
            l4: 0,
            hlen: 0,
            mss: 0,
            next_seq: 0,
            psh: false,
            open: false,
        }
    }

    /// Whether `p` is a TCP packet of the held run's flow (same version,
    /// addresses and ports; `p` laid out as the run's first segment).
    fn same_flow(&self, p: &[u8]) -> bool {
        if self.held == 0 || p.len() < self.l4 + 4 {
            return false;
        }
        let held = &self.buf[..self.hlen];
        let (l4, addrs) = (self.l4, if self.l4 == 20 { 12..20 } else { 8..40 });
        let tcp = if l4 == 20 {
            p[0] == held[0] && p[9] == PROTO_TCP
        } else {
            p[0] >> 4 == 6 && p[6] == PROTO_TCP
        };
        tcp && held[addrs.clone()] == p[addrs] && held[l4..l4 + 4] == p[l4..l4 + 4]
    }

    fn start(&mut self, p: &[u8], seg: &Seg) {
        self.buf[..p.len()].copy_from_slice(p);
        self.held = p.len();
        self.segs = 1;
        self.l4 = seg.l4;
        self.hlen = seg.hlen;
        self.mss = seg.payload;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.psh = seg.flags & TCP_PSH != 0;
        self.open = !self.psh && self.held + self.mss <= COALESCED_MAX;
    }

    fn append(&mut self, p: &[u8], seg: &Seg) {
        self.buf[self.held..self.held + seg.payload].copy_from_slice(&p[seg.hlen..]);
        self.held += seg.payload;
        self.segs += 1;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.psh |= seg.flags & TCP_PSH != 0;
        self.open = seg.payload == self.mss
            && !self.psh
            && self.segs < COALESCED_SEGMENTS
            && self.held + self.mss <= COALESCED_MAX;
    }

    /// Whether `p` continues the held run: same addresses and ports, the
    /// next sequence number, the same ACK, window and options, no larger
    /// than the first segment.
    fn joins(&self, p: &[u8], seg: &Seg) -> bool {
        if !self.open || seg.l4 != self.l4 || seg.hlen != self.hlen {
            return false;
        }
        let held = &self.buf[..self.hlen];
        let l4 = self.l4;
        let ip_same = if l4 == 20 {
            // version..TOS, flags/fragment, TTL, protocol, addresses.
            held[..2] == p[..2] && held[6..10] == p[6..10] && held[12..20] == p[12..20]
        } else {
            held[..4] == p[..4] && held[6..40] == p[6..40]
        };
        ip_same
            && seg.seq == self.next_seq
            && seg.payload <= self.mss
            && self.held + seg.payload <= COALESCED_MAX
            // Ports; ACK number, data offset (flags may add PSH), window,
            // urgent pointer; options.
            && held[l4..l4 + 4] == p[l4..l4 + 4]
            && held[l4 + 8..l4 + 13] == p[l4 + 8..l4 + 13]
            && held[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16]
            && held[l4 + 18..self.hlen] == p[l4 + 18..self.hlen]
    }

    /// Write the held run, if any: one packet as it came, several as one
    /// GSO packet (lengths, IPv4 header checksum, PSH if any had it, and the
    /// pseudo-header sum in the TCP checksum for the kernel to complete).
    fn flush(&mut self, write: &mut impl FnMut(&[u8], &[u8], usize)) {
        if self.held == 0 {
            return;
        }
        let (held, segs) = (self.held, self.segs);
        self.held = 0;
        self.segs = 0;
        self.open = false;
        let p = &mut self.buf[..held];
        if segs == 1 {
            write(&[0; VNET_HDR_LEN], p, 1);
            return;
        }
        let (l4, hlen) = (self.l4, self.hlen);
        let pseudo = set_ip_length(p, l4);
        if self.psh {
            p[l4 + 13] |= TCP_PSH;
        }
        p[l4 + 16..l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = F_NEEDS_CSUM;
        h[1] = if l4 == 20 { GSO_TCPV4 } else { GSO_TCPV6 };
        h[2..4].copy_from_slice(&(hlen as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(self.mss as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(l4 as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&16u16.to_ne_bytes());
        write(&h, p, segs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    const MSS: u16 = 1000;

    /// The 16-bit reference: one word at a time.
    fn sum16(b: &[u8]) -> u16 {
        let mut acc = 0u32;
        for w in b.chunks(2) {
            acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        fold(acc)
    }

    #[test]
    fn sum_matches_the_word_by_word_sum() {
        let mut data = vec![0u8; 3000];
        let mut x = 0x9e37_79b9_u32;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        data[100..200].fill(0xff);
        for start in 0..9 {
            for len in (0..2900).step_by(37).chain([0, 1, 7, 8, 9, 15, 16, 17]) {
                let b = &data[start..start + len];
                assert_eq!(fold(sum(0, b)), sum16(b), "start {start} len {len}");
                assert_eq!(
                    fold(sum(0xffff_ffff, b)),
                    fold(0xffff + u32::from(sum16(b))),
                    "start {start} len {len}"
                );
            }
        }
    }

    fn hdr(gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; 10] {
        let mut h = [0u8; 10];
        h[0] = F_NEEDS_CSUM;
        h[1] = gso_type;
        h[4..6].copy_from_slice(&gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
        h
    }

    /// A TCP packet with headers built by smoltcp and `payload_len` bytes of
    /// a pattern, as the kernel would hand it over (checksums not final).
    fn tcp_packet(v6: bool, payload_len: usize, flags: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: smoltcp::wire::TcpControl::None,
            seq_number: TcpSeqNumber(0xffff_f000u32 as i32),
            ack_number: Some(TcpSeqNumber(77)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &payload,
        };
        let tcp_len = repr.buffer_len();
        let l4 = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; l4 + tcp_len];
        let (src, dst) = if v6 {
            let mut ip = Ipv6Packet::new_unchecked(&mut p[..]);
            ip.set_version(6);
            ip.set_payload_len(tcp_len as u16);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_hop_limit(64);
            ip.set_src_addr("fd00::1".parse().expect("test data"));
            ip.set_dst_addr("fd00::2".parse().expect("test data"));
            (
                IpAddress::Ipv6("fd00::1".parse().expect("test data")),
                IpAddress::Ipv6("fd00::2".parse().expect("test data")),
            )
        } else {
            let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len((20 + tcp_len) as u16);
            ip.set_ident(0xfffe);
            ip.set_hop_limit(64);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr("10.0.0.1".parse().expect("test data"));
            ip.set_dst_addr("10.0.0.2".parse().expect("test data"));
            ip.fill_checksum();
            (
                IpAddress::Ipv4("10.0.0.1".parse().expect("test data")),
                IpAddress::Ipv4("10.0.0.2".parse().expect("test data")),
            )
        };
        let mut tcp = TcpPacket::new_unchecked(&mut p[l4..]);
        repr.emit(&mut tcp, &src, &dst, &ChecksumCapabilities::ignored());
        tcp.set_checksum(0xdead);
        p[l4 + 13] |= flags;
        p
    }

    fn run(h: [u8; 10], p: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut read = h.to_vec();
        read.extend_from_slice(p);
        let mut scratch = vec![0u8; 65536];
        let mut out = Vec::new();
        segment(&mut read, &mut scratch, |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    /// Checks every segment with smoltcp; returns (seq, flags, payload).
    fn check(segs: &[Vec<u8>], v6: bool) -> Vec<(u32, u8, Vec<u8>)> {
        segs.iter()
            .map(|s| {
                let (l4, src, dst) = if v6 {
                    let ip = Ipv6Packet::new_checked(&s[..]).expect("test data");
                    assert_eq!(usize::from(ip.payload_len()) + 40, s.len());
                    (
                        40,
                        IpAddress::Ipv6(ip.src_addr()),
                        IpAddress::Ipv6(ip.dst_addr()),
                    )
                } else {
                    let ip = Ipv4Packet::new_checked(&s[..]).expect("test data");
                    assert!(ip.verify_checksum(), "IPv4 header checksum");
                    assert_eq!(usize::from(ip.total_len()), s.len());
                    (
                        20,
                        IpAddress::Ipv4(ip.src_addr()),
                        IpAddress::Ipv4(ip.dst_addr()),
                    )
                };
                let tcp = TcpPacket::new_checked(&s[l4..]).expect("test data");
                assert!(tcp.verify_checksum(&src, &dst), "TCP checksum");
                (
                    tcp.seq_number().0 as u32,
                    s[l4 + 13],
                    tcp.payload().to_vec(),
                )
            })
            .collect()
    }

    fn tso_case(v6: bool) {
        let len = 3 * usize::from(MSS) + 123;
        let p = tcp_packet(v6, len, TCP_FIN | TCP_PSH | TCP_CWR);
        let (t, l4) = if v6 { (GSO_TCPV6, 40) } else { (GSO_TCPV4, 20) };
        let segs = run(hdr(t, MSS, l4, 16), &p).expect("test data");
        assert_eq!(segs.len(), 4);
        let parsed = check(&segs, v6);
        let mut joined = Vec::new();
        for (i, (seq, flags, payload)) in parsed.iter().enumerate() {
            assert_eq!(*seq, 0xffff_f000u32.wrapping_add(i as u32 * u32::from(MSS)));
            let last = i == 3;
            assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, last, "FIN/PSH on {i}");
            assert_eq!(flags & TCP_FIN != 0, last);
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on {i}");
            assert_eq!(flags & 0x10, 0x10, "ACK kept");
            assert_eq!(payload.len(), if last { 123 } else { usize::from(MSS) });
            joined.extend_from_slice(payload);
        }
        assert_eq!(joined, p[l4 as usize + 20..]);
        if !v6 {
            let ids: Vec<u16> = segs
                .iter()
                .map(|s| u16::from_be_bytes([s[4], s[5]]))
                .collect();
            assert_eq!(ids, [0xfffe, 0xffff, 0, 1]);
        }
    }

    /// Recompute a packet's IPv4 header and TCP checksums after an edit.
    fn fix(p: &mut [u8]) {
        let l4 = if p[0] >> 4 == 4 { 20 } else { 40 };
        let pseudo = set_ip_length(p, l4);
        p[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let c = !fold(sum(pseudo, &p[l4..]));
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }

    /// `n` valid segments of one flow (PSH on the last), sequence numbers
    /// from `seq`, source port `port`; the last one `last` bytes long.
    fn flow_segments(v6: bool, n: usize, last: usize, seq: u32, port: u16) -> Vec<Vec<u8>> {
        let mut p = tcp_packet(v6, (n - 1) * usize::from(MSS) + last, TCP_PSH);
        let l4 = if v6 { 40 } else { 20 };
        p[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
        p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let (t, l) = if v6 { (GSO_TCPV6, 40) } else { (GSO_TCPV4, 20) };
        run(hdr(t, MSS, l, 16), &p).expect("test data")
    }

    /// Push `input` through a coalescer; re-segment every write as the
    /// kernel would and return (the packets that come out, the writes).
    fn coalesce(input: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<usize>) {
        let mut c = Coalescer::new();
        let mut writes: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut w = |h: &[u8], p: &[u8], n: usize| {
            let mut v = h.to_vec();
            v.extend_from_slice(p);
            writes.push((v, n));
        };
        for p in input {
            c.push(p, &mut w);
        }
        c.flush(&mut w);
        let mut out = Vec::new();
        let mut counts = Vec::new();
        for (mut v, n) in writes {
            let mut scratch = vec![0u8; 65536];
            let before = out.len();
            segment(&mut v, &mut scratch, |s| out.push(s.to_vec())).expect("valid write");
            assert_eq!(out.len() - before, n, "segments reported for a write");
            counts.push(n);
        }
        (out, counts)
    }

    #[test]
    fn coalesced_runs_resegment_to_the_same_packets() {
        for v6 in [false, true] {
            let input = flow_segments(v6, 11, 123, 1000, 40000);
            let (out, writes) = coalesce(&input);
            assert_eq!(out, input, "v6 {v6}");
            assert_eq!(writes, vec![11], "one write for the whole run (v6 {v6})");
            check(&out, v6);
        }
    }

    /// The packets of `all` whose TCP source port is `port` (IPv4), in
    /// their order.
    fn of_flow(all: &[Vec<u8>], port: u16) -> Vec<Vec<u8>> {
        all.iter()
            .filter(|p| p.len() >= 22 && p[20..22] == port.to_be_bytes())
            .cloned()
            .collect()
    }

    #[test]
    fn runs_break_where_they_must_and_each_flow_keeps_its_order() {
        let v6 = false;
        let mss = u32::from(MSS);
        let mut input = Vec::new();
        // A full-size run (closed by the PSH on its last segment)...
        let a = flow_segments(v6, 4, usize::from(MSS), 5000, 40000);
        input.extend(a.iter().cloned());
        // ...another flow interleaved...
        input.extend(flow_segments(v6, 3, 10, 9000, 40001));
        // ...a gap in the first flow's sequence numbers...
        input.extend(flow_segments(v6, 2, 50, 5000 + 10 * mss, 40000));
        // ...a FIN and a pure ACK of the first flow pass through alone,
        // after what it held...
        let mut fin = tcp_packet(v6, 0, TCP_FIN);
        fix(&mut fin);
        input.push(fin);
        let mut ack = tcp_packet(v6, 0, 0);
        fix(&mut ack);
        input.push(ack);
        // ...a different ACK number does not join.
        let mut b = flow_segments(v6, 3, usize::from(MSS), 20_000, 40002);
        b[2][28..32].copy_from_slice(&99u32.to_be_bytes());
        fix(&mut b[2]);
        input.extend(b);
        let (out, writes) = coalesce(&input);
        for port in [40000, 40001, 40002] {
            assert_eq!(of_flow(&out, port), of_flow(&input, port), "flow {port}");
        }
        assert_eq!(out.len(), input.len());
        // The first flow: 4, then its gap run (2) before its FIN, the FIN,
        // the ACK; the third flow's 2 before the one with another ACK
        // number; at the end the held runs: the third flow's last one (in
        // the run the first flow left free) and the second flow's 3.
        assert_eq!(writes, vec![4, 2, 1, 1, 2, 1, 3]);
        // A truncated packet and garbage pass through as they are.
        let mut c = Coalescer::new();
        let mut passed = Vec::new();
        c.push(&[0x45, 0, 0], &mut |h: &[u8], p: &[u8], n| {
            assert_eq!(h, [0; VNET_HDR_LEN]);
            passed.push((p.to_vec(), n));
        });
        assert_eq!(passed, vec![(vec![0x45, 0, 0], 1)]);
    }

    /// `n` flows of `segs` segments each (source ports from `port`), their
    /// segments round-robin, as parallel downloads arrive.
    fn interleaved(n: u16, segs: usize, port: u16) -> (Vec<Vec<Vec<u8>>>, Vec<Vec<u8>>) {
        let flows: Vec<Vec<Vec<u8>>> = (0..n)
            .map(|i| flow_segments(false, segs, 200, 1000 * u32::from(i), port + i))
            .collect();
        let input = (0..segs)
            .flat_map(|k| flows.iter().map(move |f| f[k].clone()))
            .collect();
        (flows, input)
    }

    #[test]
    fn interleaved_flows_each_join() {
        let (flows, input) = interleaved(4, 8, 41000);
        let (out, writes) = coalesce(&input);
        assert_eq!(writes, vec![8, 8, 8, 8]);
        for (i, f) in flows.iter().enumerate() {
            assert_eq!(&of_flow(&out, 41000 + i as u16), f);
        }
        // More flows than runs: every packet still comes out, each flow in
        // order.
        let (flows, input) = interleaved(RUNS as u16 + 3, 3, 42000);
        let (out, writes) = coalesce(&input);
        assert_eq!(out.len(), input.len());
        assert_eq!(writes.iter().sum::<usize>(), input.len());
        for (i, f) in flows.iter().enumerate() {
            assert_eq!(&of_flow(&out, 42000 + i as u16), f);
        }
    }

    #[test]
    fn tso_ipv4() {
        tso_case(false);
    }

    #[test]
    fn tso_ipv6() {
        tso_case(true);
    }

    #[test]
    fn header_only_gso_packet_is_one_valid_packet() {
        let p = tcp_packet(false, 0, TCP_FIN);
        let segs = run(hdr(GSO_TCPV4, MSS, 20, 16), &p).expect("test data");
        let parsed = check(&segs, false);
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].2.is_empty());
        assert_eq!(parsed[0].1 & TCP_FIN, TCP_FIN);
    }

    #[test]
    fn exact_multiple_of_mss() {
        let p = tcp_packet(true, 2 * usize::from(MSS), TCP_PSH);
        let segs = run(hdr(GSO_TCPV6 | GSO_ECN, MSS, 40, 16), &p).expect("test data");
        let parsed = check(&segs, true);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].1 & TCP_PSH, 0);
        assert_eq!(parsed[1].1 & TCP_PSH, TCP_PSH);
    }

    #[test]
    fn partial_checksum_is_completed() {
        // The kernel leaves the pseudo-header sum in the checksum field.
        let mut p = tcp_packet(false, 57, 0);
        let tcp_len = (p.len() - 20) as u32;
        let pseudo = !fold(sum(tcp_len + 6, &p[12..20]));
        p[36..38].copy_from_slice(&(!pseudo).to_be_bytes());
        let segs = run(hdr(GSO_NONE, 0, 20, 16), &p).expect("test data");
        check(&segs, false);
        // Without NEEDS_CSUM the packet passes untouched.
        let mut h = hdr(GSO_NONE, 0, 0, 0);
        h[0] = 0;
        assert_eq!(run(h, &p).expect("test data"), vec![p.clone()]);
    }

    #[test]
    fn malformed_input_is_rejected() {
        let p = tcp_packet(false, 3000, 0);
        assert_eq!(run_short(), Err(OffloadError::Short));
        assert_eq!(run(hdr(3, MSS, 20, 6), &p), Err(OffloadError::GsoType(3)));
        assert_eq!(
            run(hdr(GSO_TCPV4, 0, 20, 16), &p),
            Err(OffloadError::BadHeaders)
        );
        assert_eq!(
            run(hdr(GSO_TCPV4, MSS, 24, 16), &p),
            Err(OffloadError::BadHeaders)
        );
        assert_eq!(
            run(hdr(GSO_TCPV6, MSS, 40, 16), &p),
            Err(OffloadError::BadHeaders)
        );
        assert_eq!(
            run(hdr(GSO_TCPV4, MSS, 20, 16), &p[..30]),
            Err(OffloadError::BadHeaders)
        );
        assert_eq!(
            run(hdr(GSO_TCPV4, MSS, 20, 16), &[]),
            Err(OffloadError::BadHeaders)
        );
        assert_eq!(
            run(hdr(GSO_NONE, 0, 20, 60000), &p),
            Err(OffloadError::BadCsum)
        );
        assert_eq!(
            run(hdr(GSO_NONE, 0, 65535, 65535), &p),
            Err(OffloadError::BadCsum)
        );
        let mut bad_thl = p.clone();
        bad_thl[32] = 0x10; // data offset 4 bytes
        assert_eq!(
            run(hdr(GSO_TCPV4, MSS, 20, 16), &bad_thl),
            Err(OffloadError::BadHeaders)
        );
        let mut tiny = vec![0u8; 100];
        assert_eq!(
            segment(
                &mut [hdr(GSO_TCPV4, MSS, 20, 16).as_slice(), &p].concat(),
                &mut tiny,
                |_| {}
            ),
            Err(OffloadError::TooLarge)
        );
        tiny.truncate(0);
    }

    fn run_short() -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut read = [0u8; 5];
        segment(&mut read, &mut [0u8; 10], |_| {}).map(|_| Vec::new())
    }
}
