//! Helpers shared by the fuzz targets: a reader that splits one fuzz input
//! into choices and length-prefixed pieces, and IP/TCP/UDP checksum fix-ups
//! so that mutated packets get past the checksum checks and reach the state
//! machines behind them.

/// Splits a fuzz input. Every read succeeds: past the end it yields zeros
/// and empty slices, so a target never has to bail out half-way.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A piece prefixed by a 2-byte big-endian length, capped at `max`.
    pub fn piece(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()) % (max + 1);
        self.take(n)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// One's-complement sum of `data` (16-bit big-endian words) added to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
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

/// Where the transport header of a plain IP packet starts, its protocol and
/// the pseudo-header sum; IPv6 extension headers are not followed.
fn transport(packet: &[u8]) -> Option<(usize, u8, u32)> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let len = packet.len() - ihl;
            let mut sum = sum16(0, &packet[12..20]);
            sum += u32::from(packet[9]) + len as u32;
            Some((ihl, packet[9], sum))
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let len = packet.len() - 40;
            let mut sum = sum16(0, &packet[8..40]);
            sum += u32::from(packet[6]) + len as u32;
            Some((40, packet[6], sum))
        }
        _ => None,
    }
}

/// Make `packet` look like a well-formed IPv4 or IPv6 packet of exactly its
/// own length: version kept (4 unless it says 6), IPv4 header length at
/// least 5 words and within the packet, total/payload length set, IPv4
/// header checksum computed.
pub fn fix_ip_header(packet: &mut [u8]) {
    let Some(&first) = packet.first() else { return };
    if first >> 4 == 6 {
        if packet.len() >= 40 {
            let payload = (packet.len() - 40).min(0xffff) as u16;
            packet[4..6].copy_from_slice(&payload.to_be_bytes());
        }
        return;
    }
    if packet.len() < 20 {
        packet[0] = 0x45;
        return;
    }
    let mut ihl = first & 0x0f;
    if ihl < 5 || usize::from(ihl) * 4 > packet.len() {
        ihl = 5;
    }
    packet[0] = 0x40 | ihl;
    let total = packet.len().min(0xffff) as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[10..12].fill(0);
    let sum = fold(sum16(0, &packet[..usize::from(ihl) * 4]));
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Recompute the TCP or UDP checksum of a plain IP packet (no-op for other
/// protocols or headers too short to hold one).
pub fn fix_transport_checksum(packet: &mut [u8]) {
    let Some((at, proto, pseudo)) = transport(packet) else {
        return;
    };
    let field = match proto {
        6 => at + 16,
        17 => at + 6,
        _ => return,
    };
    if packet.len() < field + 2 {
        return;
    }
    if proto == 17 {
        // The UDP length field must match for the datagram to parse.
        let len = (packet.len() - at).min(0xffff) as u16;
        packet[at + 4..at + 6].copy_from_slice(&len.to_be_bytes());
    }
    packet[field..field + 2].fill(0);
    let mut sum = fold(sum16(pseudo, &packet[at..]));
    if proto == 17 && sum == 0 {
        sum = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Whether the TCP checksum of a plain IP packet (no IPv6 extension
/// headers, no bytes past the IP length) verifies; `None` if not TCP.
pub fn tcp_checksum_ok(packet: &[u8]) -> Option<bool> {
    let (at, proto, pseudo) = transport(packet)?;
    if proto != 6 || packet.len() < at + 20 {
        return None;
    }
    Some(fold(sum16(pseudo, &packet[at..])) == 0)
}

/// The TCP header of a plain IP packet: (source, destination, offset of the
/// TCP header). Addresses as 16-byte arrays (IPv4 in the first 4) so tuples
/// of both families compare without allocating.
pub fn tcp_tuple(packet: &[u8]) -> Option<([u8; 18], [u8; 18], usize)> {
    let (at, proto, _) = transport(packet)?;
    if proto != 6 || packet.len() < at + 20 {
        return None;
    }
    let mut src = [0u8; 18];
    let mut dst = [0u8; 18];
    if packet[0] >> 4 == 4 {
        src[..4].copy_from_slice(&packet[12..16]);
        dst[..4].copy_from_slice(&packet[16..20]);
    } else {
        src[..16].copy_from_slice(&packet[8..24]);
        dst[..16].copy_from_slice(&packet[24..40]);
    }
    src[16..].copy_from_slice(&packet[at..at + 2]);
    dst[16..].copy_from_slice(&packet[at + 2..at + 4]);
    Some((src, dst, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_packets_parse_and_verify() {
        // IPv4/UDP with garbage in every length and checksum field.
        let mut p = vec![0x4f_u8; 40];
        p[9] = 17;
        fix_ip_header(&mut p);
        fix_transport_checksum(&mut p);
        let h = burrow_netstack::wire::parse_ip(&p).expect("parses");
        assert_eq!(h.total_len, 40);
        assert_eq!(fold(sum16(0, &p[..20])), 0);
        let (at, _, pseudo) = transport(&p).expect("udp");
        assert_eq!(fold(sum16(pseudo, &p[at..])), 0);
    }
}
