//! IP packet views and in-place rewrites.
//!
//! Every packet that reaches this crate came from a peer we do not trust (a
//! laptop's TUN device, a WireGuard datagram), so parsing here is total: any
//! byte slice yields either a validated [`IpHeader`] or a typed
//! [`PacketError`], never a panic. The view is deliberately small (version,
//! addresses, transport protocol, lengths): it is what the WireGuard peer table
//! needs for its source check and what the flow engine needs to classify a
//! packet before handing it to smoltcp, which parses the rest.
//!
//! [`clamp_tcp_mss`] rewrites the MSS option of a SYN in place so that the
//! laptop never sends a segment that would not fit in the tunnel MTU; without
//! it, large segments would fragment (or black-hole) inside WireGuard.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv4.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_OPT_END: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;

/// Why a byte slice is not an IP packet we can handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    UnknownVersion(u8),
    #[error("truncated packet: {needed} bytes needed, {got} present")]
    Truncated { needed: usize, got: usize },
    #[error("IPv4 header length field {0} is below the minimum of 5 words")]
    BadHeaderLength(u8),
    #[error("IP total length {total} is shorter than its header ({header} bytes)")]
    BadTotalLength { total: usize, header: usize },
    #[error("malformed IPv6 extension header chain")]
    BadExtensionHeader,
    #[error("malformed TCP header")]
    BadTcpHeader,
}

/// IP version of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// A validated view of an IP header. Lengths are guaranteed to lie within the
/// slice it was parsed from, so `&packet[..total_len]` and
/// `&packet[payload_offset..total_len]` never panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub version: IpVersion,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Transport protocol: IPv4's protocol field, or for IPv6 the next header
    /// after the hop-by-hop, routing, destination-options and fragment
    /// extension headers.
    pub protocol: u8,
    /// Offset of the transport header (after IPv4 options / IPv6 extension
    /// headers).
    pub payload_offset: usize,
    /// Length of the IP packet as its header states (trailing link padding in
    /// the slice is not part of it).
    pub total_len: usize,
    /// True for every fragment except an unfragmented packet. Only the first
    /// fragment (`first_fragment`) carries the transport header.
    pub fragment: bool,
    pub first_fragment: bool,
    /// For a fragment: its datagram's identification (IPv4's 16 bits, IPv6's
    /// 32), its offset in the datagram's fragmentable part (bytes), whether
    /// more follow, and where its data starts in the packet (after the IPv4
    /// header, or after the IPv6 fragment header).
    pub frag_id: u32,
    pub frag_offset: usize,
    pub more_fragments: bool,
    pub frag_data_offset: usize,
}

impl IpHeader {
    /// The transport-layer bytes of `packet` (which must be the slice this
    /// header was parsed from).
    pub fn payload<'p>(&self, packet: &'p [u8]) -> &'p [u8] {
        packet
            .get(self.payload_offset..self.total_len)
            .unwrap_or_default()
    }
}

fn need(packet: &[u8], needed: usize) -> Result<(), PacketError> {
    if packet.len() < needed {
        Err(PacketError::Truncated {
            needed,
            got: packet.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse and validate the IP header at the start of `packet`.
pub fn parse_ip(packet: &[u8]) -> Result<IpHeader, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => parse_ipv4(packet),
        6 => parse_ipv6(packet),
        v => Err(PacketError::UnknownVersion(v)),
    }
}

fn parse_ipv4(p: &[u8]) -> Result<IpHeader, PacketError> {
    need(p, IPV4_MIN_HEADER)?;
    let ihl = p[0] & 0x0f;
    if ihl < 5 {
        return Err(PacketError::BadHeaderLength(ihl));
    }
    let header = usize::from(ihl) * 4;
    need(p, header)?;
    let total = usize::from(be16(p, 2));
    if total < header {
        return Err(PacketError::BadTotalLength { total, header });
    }
    need(p, total)?;
    let frag = be16(p, 6);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Ok(IpHeader {
        version: IpVersion::V4,
        src: src.into(),
        dst: dst.into(),
        protocol: p[9],
        payload_offset: header,
        total_len: total,
        fragment: more_fragments || offset != 0,
        first_fragment: offset == 0,
        frag_id: u32::from(be16(p, 4)),
        frag_offset: usize::from(offset) * 8,
        more_fragments,
        frag_data_offset: header,
    })
}

fn parse_ipv6(p: &[u8]) -> Result<IpHeader, PacketError> {
    need(p, IPV6_HEADER)?;
    let total = IPV6_HEADER + usize::from(be16(p, 4));
    need(p, total)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    dst.copy_from_slice(&p[24..40]);

    // Walk the extension headers we know so that `protocol` names the
    // transport; anything else (ESP, AH, unknown) is reported as-is.
    let mut next = p[6];
    let mut at = IPV6_HEADER;
    let mut fragment = false;
    let mut first_fragment = true;
    let (mut frag_id, mut frag_offset, mut more_fragments, mut frag_data_offset) = (0, 0, false, 0);
    loop {
        match next {
            0 | 43 | 60 => {
                if at + 2 > total {
                    return Err(PacketError::BadExtensionHeader);
                }
                let len = (usize::from(p[at + 1]) + 1) * 8;
                next = p[at];
                at += len;
            }
            44 => {
                if at + 8 > total {
                    return Err(PacketError::BadExtensionHeader);
                }
                let frag = be16(p, at + 2);
                fragment = true;
                first_fragment = frag >> 3 == 0;
                frag_offset = usize::from(frag >> 3) * 8;
                more_fragments = frag & 1 != 0;
                frag_id = u32::from_be_bytes([p[at + 4], p[at + 5], p[at + 6], p[at + 7]]);
                next = p[at];
                at += 8;
                frag_data_offset = at;
                // The rest (the fragmentable part) is only whole once
                // reassembled; its first header is `next`.
                if !first_fragment {
                    break;
                }
            }
            _ => break,
        }
        if at > total {
            return Err(PacketError::BadExtensionHeader);
        }
    }
    Ok(IpHeader {
        version: IpVersion::V6,
        src: Ipv6Addr::from(src).into(),
        dst: Ipv6Addr::from(dst).into(),
        protocol: next,
        payload_offset: at,
        total_len: total,
        fragment,
        first_fragment,
        frag_id,
        frag_offset,
        more_fragments,
        frag_data_offset,
    })
}

/// A hash of the flow `packet` belongs to, the same for both directions
/// (source and destination swapped give the same value): addresses,
/// protocol and, for TCP and UDP that is not a fragment, ports. Used to keep
/// each flow on one of several transport streams, in order. Not keyed: it
/// spreads load, it defends nothing. Unparsable packets hash to 0.
pub fn flow_hash(packet: &[u8]) -> u64 {
    let Ok(h) = parse_ip(packet) else {
        return 0;
    };
    let ports = if (h.protocol == PROTO_TCP || h.protocol == PROTO_UDP) && !h.fragment {
        let p = h.payload(packet);
        match (p.get(0..2), p.get(2..4)) {
            (Some(s), Some(d)) => {
                let (s, d) = (
                    u16::from_be_bytes([s[0], s[1]]),
                    u16::from_be_bytes([d[0], d[1]]),
                );
                (u64::from(s.min(d)) << 16) | u64::from(s.max(d))
            }
            _ => 0,
        }
    } else {
        0
    };
    let fold = |ip: IpAddr| -> u64 {
        match ip {
            IpAddr::V4(a) => u64::from(u32::from(a)),
            IpAddr::V6(a) => {
                let v = u128::from(a);
                (v as u64) ^ ((v >> 64) as u64)
            }
        }
    };
    let (a, b) = (fold(h.src), fold(h.dst));
    // FNV-1a over the ordered pair, the ports and the protocol.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for word in [a.min(b), a.max(b), ports, u64::from(h.protocol)] {
        for byte in word.to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The largest TCP MSS that fits in one packet of `mtu` bytes, assuming no IP
/// or TCP options beyond the fixed headers (what Linux and smoltcp assume too).
pub fn mss_for_mtu(mtu: u16, version: IpVersion) -> u16 {
    let headers = match version {
        IpVersion::V4 => IPV4_MIN_HEADER + TCP_MIN_HEADER,
        IpVersion::V6 => IPV6_HEADER + TCP_MIN_HEADER,
    };
    mtu.saturating_sub(headers as u16)
}

/// Lower the MSS option of a TCP SYN or SYN-ACK in `packet` to at most
/// `max_mss`, fixing up the TCP checksum incrementally.
///
/// Returns `Ok(true)` if the packet was rewritten and `Ok(false)` if it did
/// not need to be (not TCP, not a SYN, no MSS option, MSS already small
/// enough, or a non-first fragment). A SYN without an MSS option is left
/// alone: the peer then assumes 536 (IPv4) / 1220 (IPv6), which always fits.
pub fn clamp_tcp_mss(packet: &mut [u8], max_mss: u16) -> Result<bool, PacketError> {
    let ip = parse_ip(packet)?;
    if ip.protocol != PROTO_TCP || !ip.first_fragment {
        return Ok(false);
    }
    let tcp_start = ip.payload_offset;
    let tcp = &packet[tcp_start..ip.total_len];
    if tcp.len() < TCP_MIN_HEADER {
        return Err(PacketError::BadTcpHeader);
    }
    if tcp[13] & TCP_FLAG_SYN == 0 {
        return Ok(false);
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < TCP_MIN_HEADER || data_offset > tcp.len() {
        return Err(PacketError::BadTcpHeader);
    }

    let mut at = TCP_MIN_HEADER;
    while at < data_offset {
        match tcp[at] {
            TCP_OPT_END => break,
            TCP_OPT_NOP => at += 1,
            kind => {
                let len = usize::from(*tcp.get(at + 1).ok_or(PacketError::BadTcpHeader)?);
                if len < 2 || at + len > data_offset {
                    return Err(PacketError::BadTcpHeader);
                }
                if kind == TCP_OPT_MSS && len == 4 {
                    let old = be16(tcp, at + 2);
                    if old <= max_mss {
                        return Ok(false);
                    }
                    let value_at = at + 2;
                    let checksum = be16(tcp, 16);
                    // A 16-bit field at an odd offset straddles two checksum
                    // words; the ones'-complement sum is byte-order
                    // independent, so its contribution is the byte-swapped
                    // value.
                    let (o, n) = if value_at & 1 == 0 {
                        (old, max_mss)
                    } else {
                        (old.swap_bytes(), max_mss.swap_bytes())
                    };
                    let checksum = checksum_adjust(checksum, o, n);
                    let tcp = &mut packet[tcp_start..ip.total_len];
                    tcp[value_at..value_at + 2].copy_from_slice(&max_mss.to_be_bytes());
                    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
                    return Ok(true);
                }
                at += len;
            }
        }
    }
    Ok(false)
}

/// The most of the offending packet an ICMP error quotes: IPv4 quotes its
/// header and 8 bytes (ports and TCP sequence number, what the receiving
/// stack matches on); IPv6 as much as keeps the error within the minimum
/// MTU of 1280.
const ICMPV6_QUOTE_MAX: usize = 1280 - IPV6_HEADER - 8;

/// A "destination host unreachable" ICMP error answering `packet` (ICMPv4
/// type 3 code 1, ICMPv6 type 1 code 3), written into `out`, from the
/// packet's destination back to its source. Only TCP is answered (and only
/// a first fragment or whole packet): the laptop's TCP then gives up a SYN at
/// once, and for an established connection reverts its retransmission
/// backoff (RFC 6069, as Linux does), so it resumes within a second of the
/// path returning instead of after minutes of doubled timeouts. Returns the
/// reply's length, or None (not TCP, malformed, `out` too small).
pub fn host_unreachable(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let ip = parse_ip(packet).ok()?;
    if ip.protocol != PROTO_TCP || !ip.first_fragment {
        return None;
    }
    match (ip.version, ip.src, ip.dst) {
        (IpVersion::V4, IpAddr::V4(src), IpAddr::V4(dst)) => {
            let quote = packet.get(..(ip.payload_offset + 8).min(ip.total_len))?;
            let len = IPV4_MIN_HEADER + 8 + quote.len();
            let out = out.get_mut(..len)?;
            out.fill(0);
            out[0] = 0x45;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            out[8] = 64;
            out[9] = PROTO_ICMP;
            out[12..16].copy_from_slice(&dst.octets());
            out[16..20].copy_from_slice(&src.octets());
            let header_sum = !fold(sum(&out[..IPV4_MIN_HEADER]));
            out[10..12].copy_from_slice(&header_sum.to_be_bytes());
            let icmp = &mut out[IPV4_MIN_HEADER..];
            icmp[0] = 3; // destination unreachable
            icmp[1] = 1; // host unreachable
            icmp[8..].copy_from_slice(quote);
            let icmp_sum = !fold(sum(icmp));
            icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
            Some(len)
        }
        (IpVersion::V6, IpAddr::V6(src), IpAddr::V6(dst)) => {
            let quote = packet.get(..ip.total_len.min(ICMPV6_QUOTE_MAX))?;
            let icmp_len = 8 + quote.len();
            let len = IPV6_HEADER + icmp_len;
            let out = out.get_mut(..len)?;
            out.fill(0);
            out[0] = 0x60;
            out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
            out[6] = PROTO_ICMPV6;
            out[7] = 64;
            out[8..24].copy_from_slice(&dst.octets());
            out[24..40].copy_from_slice(&src.octets());
            let icmp = &mut out[IPV6_HEADER..];
            icmp[0] = 1; // destination unreachable
            icmp[1] = 3; // address unreachable
            icmp[8..].copy_from_slice(quote);
            // Pseudo-header: source, destination, length, next header.
            let pseudo =
                sum(&dst.octets()) + sum(&src.octets()) + icmp_len as u32 + u32::from(PROTO_ICMPV6);
            let icmp_sum = !fold(pseudo + sum(icmp));
            icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
            Some(len)
        }
        _ => None,
    }
}

/// Ones'-complement sum of `bytes` as 16-bit big-endian words (an odd last
/// byte padded with zero), not yet folded.
fn sum(bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    let mut total: u32 = chunks
        .by_ref()
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .fold(0u32, |a, w| a.wrapping_add(w));
    if let [last] = chunks.remainder() {
        total = total.wrapping_add(u32::from(*last) << 8);
    }
    total
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Incremental Internet checksum update when one 16-bit word changes from
/// `old` to `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
fn checksum_adjust(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Full Internet checksum over `data` with an initial partial sum.
    fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
        sum
    }

    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// TCP checksum of an IPv4 packet's segment, computed from scratch
    /// (ignoring the checksum field's current value).
    pub(crate) fn tcp4_checksum(packet: &[u8]) -> u16 {
        let ip = parse_ip(packet).expect("valid test packet");
        let mut seg = ip.payload(packet).to_vec();
        seg[16..18].fill(0);
        let seg = &seg[..];
        let mut sum = ones_sum(0, &packet[12..20]);
        sum += u32::from(PROTO_TCP) + seg.len() as u32;
        fold(ones_sum(sum, seg))
    }

    /// A well-formed IPv4 TCP packet with the given TCP options (padded).
    pub(crate) fn tcp4_packet(flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let opt_len = options.len().div_ceil(4) * 4;
        let tcp_len = 20 + opt_len + payload.len();
        let total = 20 + tcp_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[10, 96, 0, 1]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[12] = (((20 + opt_len) / 4) << 4) as u8;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t[20..20 + options.len()].copy_from_slice(options);
        t[20 + opt_len..].copy_from_slice(payload);
        let c = tcp4_checksum(&p);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn parses_ipv4() {
        let p = tcp4_packet(TCP_FLAG_SYN, &[], b"hi");
        let h = parse_ip(&p).expect("valid");
        assert_eq!(h.version, IpVersion::V4);
        assert_eq!(h.src, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(h.dst, IpAddr::from([10, 96, 0, 1]));
        assert_eq!(h.protocol, PROTO_TCP);
        assert_eq!(h.total_len, p.len());
        assert_eq!(h.payload(&p).len(), 22);
        assert!(!h.fragment);
    }

    #[test]
    fn parses_ipv6_with_extension_headers() {
        // IPv6 + hop-by-hop (8 bytes) + 8 bytes of UDP.
        let mut p = vec![0u8; 40 + 8 + 8];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&16u16.to_be_bytes());
        p[6] = 0; // hop-by-hop
        p[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        p[40] = PROTO_UDP;
        p[41] = 0;
        let h = parse_ip(&p).expect("valid");
        assert_eq!(h.protocol, PROTO_UDP);
        assert_eq!(h.payload_offset, 48);
        assert_eq!(h.src, IpAddr::V6(Ipv6Addr::LOCALHOST));
        // Extension header claiming more than the payload.
        p[41] = 5;
        assert_eq!(parse_ip(&p), Err(PacketError::BadExtensionHeader));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_ip(&[]), Err(PacketError::Empty));
        assert_eq!(parse_ip(&[0x50]), Err(PacketError::UnknownVersion(5)));
        let mut p = tcp4_packet(TCP_FLAG_SYN, &[], &[]);
        assert!(matches!(
            parse_ip(&p[..p.len() - 1]),
            Err(PacketError::Truncated { .. })
        ));
        p[0] = 0x44;
        assert_eq!(parse_ip(&p), Err(PacketError::BadHeaderLength(4)));
        p[0] = 0x45;
        p[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert!(matches!(
            parse_ip(&p),
            Err(PacketError::BadTotalLength { .. })
        ));
    }

    /// Deterministic xorshift so the fuzz loop needs no extra crate.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_random_or_truncated_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            tcp4_packet(TCP_FLAG_SYN, &[2, 4, 0x05, 0xb4, 1, 3, 3, 7], b"x"),
            parse_ipv6_seed(),
        ];
        for round in 0..20_000 {
            let mut p = if round % 2 == 0 {
                let n = rng.below(120);
                (0..n).map(|_| rng.next() as u8).collect::<Vec<_>>()
            } else {
                // Mutate a valid packet so the fuzzing reaches deep paths.
                let mut p = seeds[round % seeds.len()].clone();
                for _ in 0..rng.below(4) + 1 {
                    let i = rng.below(p.len());
                    p[i] = rng.next() as u8;
                }
                p.truncate(rng.below(p.len() + 1));
                p
            };
            let _ = parse_ip(&p);
            let _ = clamp_tcp_mss(&mut p, 1200);
            if let Ok(h) = parse_ip(&p) {
                let _ = h.payload(&p);
                assert!(h.total_len <= p.len() && h.payload_offset <= h.total_len);
            }
        }
        // Every truncation of the valid seeds.
        for seed in &seeds {
            for n in 0..seed.len() {
                let mut p = seed[..n].to_vec();
                assert!(parse_ip(&p).is_err());
                assert!(clamp_tcp_mss(&mut p, 1200).is_err());
            }
        }
    }

    fn parse_ipv6_seed() -> Vec<u8> {
        let mut p = vec![0u8; 40 + 8 + 8];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&16u16.to_be_bytes());
        p[6] = 44; // fragment header
        p[40] = PROTO_UDP;
        p
    }

    #[test]
    fn clamps_mss_and_fixes_checksum() {
        // MSS at an even offset.
        let mut p = tcp4_packet(TCP_FLAG_SYN, &[2, 4, 0x05, 0xb4], &[]);
        assert_eq!(clamp_tcp_mss(&mut p, 1200), Ok(true));
        assert_eq!(be16(&p, 42), 1200);
        assert_eq!(be16(&p, 36), tcp4_checksum(&p));
        // Idempotent.
        assert_eq!(clamp_tcp_mss(&mut p, 1200), Ok(false));

        // MSS after a NOP: the value sits at an odd offset.
        let mut p = tcp4_packet(TCP_FLAG_SYN | 0x10, &[1, 2, 4, 0x23, 0x28], &[]);
        assert_eq!(clamp_tcp_mss(&mut p, 1360), Ok(true));
        assert_eq!(be16(&p, 43), 1360);
        assert_eq!(be16(&p, 36), tcp4_checksum(&p));
    }

    #[test]
    fn leaves_non_syn_and_small_mss_alone() {
        let mut p = tcp4_packet(0x10, &[2, 4, 0x05, 0xb4], b"data");
        let before = p.clone();
        assert_eq!(clamp_tcp_mss(&mut p, 1000), Ok(false));
        let mut q = tcp4_packet(TCP_FLAG_SYN, &[2, 4, 0x02, 0x00], &[]);
        assert_eq!(clamp_tcp_mss(&mut q, 1000), Ok(false));
        assert_eq!(p, before);
        // Option length running past the header is an error, not a panic.
        let mut r = tcp4_packet(TCP_FLAG_SYN, &[3, 9, 0, 0], &[]);
        assert_eq!(clamp_tcp_mss(&mut r, 1000), Err(PacketError::BadTcpHeader));
    }

    #[test]
    fn flow_hash_is_the_same_both_ways_and_differs_by_port() {
        let there = tcp4_packet(0x10, &[], b"x");
        // The reply: addresses and ports swapped.
        let mut back = there.clone();
        back[12..16].copy_from_slice(&there[16..20]);
        back[16..20].copy_from_slice(&there[12..16]);
        back[20..22].copy_from_slice(&there[22..24]);
        back[22..24].copy_from_slice(&there[20..22]);
        assert_eq!(flow_hash(&there), flow_hash(&back));
        let mut other = there.clone();
        other[20..22].copy_from_slice(&40001u16.to_be_bytes());
        assert_ne!(flow_hash(&there), flow_hash(&other));
        // A fragment hashes by addresses only: all fragments of a datagram
        // (only the first has ports) go the same way.
        let mut first = there.clone();
        first[6] = 0x20;
        let mut later = there.clone();
        later[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        later[20..24].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(flow_hash(&first), flow_hash(&later));
        assert_eq!(flow_hash(&[0x45, 0]), 0);
    }

    #[test]
    fn host_unreachable_answers_tcp_with_valid_checksums() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            Icmpv4Message, Icmpv4Packet, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr,
            Ipv4Packet, Ipv6Packet,
        };
        let segment = tcp4_packet(0x18, &[], b"a request that waits");
        let mut out = [0u8; 1500];
        let n = host_unreachable(&segment, &mut out).expect("an answer");
        let ip = Ipv4Packet::new_checked(&out[..n]).expect("IPv4");
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr().octets(), [10, 96, 0, 1]);
        assert_eq!(ip.dst_addr().octets(), [10, 0, 0, 2]);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("ICMP");
        assert!(icmp.verify_checksum());
        assert_eq!(
            (icmp.msg_type(), icmp.msg_code()),
            (Icmpv4Message::DstUnreachable, 1)
        );
        // The header and the ports and sequence number the stack matches
        // on, as RFC 792 asks.
        assert_eq!(icmp.data(), &segment[..28]);

        // IPv6: the quote is the whole (small) packet.
        let mut v6 = vec![0u8; 40 + 20];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&20u16.to_be_bytes());
        v6[6] = PROTO_TCP;
        v6[7] = 64;
        v6[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("v6").octets());
        v6[24..40].copy_from_slice(&"fd00:96::1".parse::<Ipv6Addr>().expect("v6").octets());
        v6[40 + 12] = 5 << 4;
        let n = host_unreachable(&v6, &mut out).expect("an answer");
        let ip = Ipv6Packet::new_checked(&out[..n]).expect("IPv6");
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        assert_eq!(src, "fd00:96::1".parse::<Ipv6Addr>().expect("v6"));
        let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("ICMPv6");
        assert!(icmp.verify_checksum(&src, &dst));
        match Icmpv6Repr::parse(&src, &dst, &icmp, &ChecksumCapabilities::default()) {
            Ok(Icmpv6Repr::DstUnreachable { reason, .. }) => {
                assert_eq!(reason, Icmpv6DstUnreachable::AddrUnreachable);
            }
            other => panic!("{other:?}"),
        }

        // Not TCP, not whole, not room enough: no answer.
        let mut udp = segment.clone();
        udp[9] = PROTO_UDP;
        assert_eq!(host_unreachable(&udp, &mut out), None);
        assert_eq!(host_unreachable(&segment, &mut out[..40]), None);
        assert_eq!(host_unreachable(&segment[..10], &mut out), None);
    }

    #[test]
    fn mss_for_common_mtus() {
        assert_eq!(mss_for_mtu(1420, IpVersion::V4), 1380);
        assert_eq!(mss_for_mtu(1420, IpVersion::V6), 1360);
        assert_eq!(mss_for_mtu(10, IpVersion::V4), 0);
    }
}
