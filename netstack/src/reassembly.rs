//! IP fragment reassembly for packets from laptops, and fragmentation of
//! packets to them: a laptop's kernel fragments a UDP datagram (or an echo
//! request) larger than the tunnel MTU, and expects the same of replies.
//!
//! Sans-IO and bounded: each source (a laptop's tunnel address, already
//! authenticated by its WireGuard peer) may hold at most
//! [`Limits::per_source`] bytes of incomplete datagrams, all sources
//! together [`Limits::total`]; an incomplete datagram is dropped after
//! [`Limits::timeout`]. Overlapping fragments that disagree drop their
//! datagram (RFC 5722's rule for IPv6, applied to both: no reading of a
//! datagram depends on which copy came first). A reassembled packet is a
//! fresh IPv4 header without options, or an IPv6 header whose next header
//! is the fragmentable part's, followed by the data.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::wire::{IpHeader, IpVersion};

/// Caps on what incomplete datagrams may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_source: usize,
    pub total: usize,
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Four of the largest datagrams at once per laptop.
            per_source: 4 * 65_536,
            total: 16 << 20,
            timeout: Duration::from_secs(5),
        }
    }
}

/// What became of a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Reassembled {
    /// Not a fragment: use the packet as it is.
    Whole,
    /// A fragment, kept until its datagram is complete.
    Held,
    /// The last missing fragment: the whole datagram as one packet.
    Complete(Vec<u8>),
    /// Dropped (the datagram it belongs to, too, when it was incoherent).
    Dropped(FragmentDrop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentDrop {
    /// The source holds too much already, or everyone does.
    OverLimit,
    /// Past 65,535 bytes, a non-final fragment not a multiple of 8, or an
    /// overlap that disagrees, or two ends.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    /// IPv4's protocol; IPv6 keys on the addresses and identification only.
    protocol: u8,
}

struct Partial {
    started: Instant,
    /// The fragmentable part, as far as known.
    data: Vec<u8>,
    /// Received byte ranges, sorted, not overlapping.
    have: Vec<(usize, usize)>,
    /// Length of the whole fragmentable part, once the last fragment came.
    end: Option<usize>,
    /// The first fragment's header, to rebuild the packet.
    header: Option<Vec<u8>>,
    /// What this datagram counts against its source.
    charged: usize,
}

/// Incomplete datagrams, per source.
#[derive(Default)]
pub struct Reassembler {
    limits: Limits,
    pending: HashMap<Key, Partial>,
    per_source: HashMap<IpAddr, usize>,
    total: usize,
    /// Datagrams dropped unfinished (timeout or incoherent).
    pub abandoned: u64,
}

const MAX_DATAGRAM: usize = 65_535;

impl Reassembler {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Bytes held for `src`.
    pub fn held_by(&self, src: IpAddr) -> usize {
        self.per_source.get(&src).copied().unwrap_or(0)
    }

    fn forget(&mut self, key: &Key) {
        if let Some(p) = self.pending.remove(key) {
            self.total -= p.charged;
            if let Some(n) = self.per_source.get_mut(&key.src) {
                *n -= p.charged;
                if *n == 0 {
                    self.per_source.remove(&key.src);
                }
            }
        }
    }

    /// Drops datagrams older than the timeout.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.limits.timeout;
        let old: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) >= timeout)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.forget(&k);
            self.abandoned += 1;
        }
    }

    /// Takes one packet (`ip` parsed from it).
    pub fn push(&mut self, ip: &IpHeader, packet: &[u8], now: Instant) -> Reassembled {
        if !ip.fragment {
            return Reassembled::Whole;
        }
        let key = Key {
            src: ip.src,
            dst: ip.dst,
            id: ip.frag_id,
            protocol: if ip.version == IpVersion::V4 {
                ip.protocol
            } else {
                0
            },
        };
        let data = packet
            .get(ip.frag_data_offset..ip.total_len)
            .unwrap_or_default();
        let (start, end) = (ip.frag_offset, ip.frag_offset + data.len());
        let malformed = end > MAX_DATAGRAM
            || (ip.more_fragments && data.len() % 8 != 0)
            || (ip.more_fragments && data.is_empty());
        if malformed {
            self.forget(&key);
            self.abandoned += 1;
            return Reassembled::Dropped(FragmentDrop::Malformed);
        }
        // Room: what this fragment may add to the buffer.
        let grows = {
            let have = self.pending.get(&key).map_or(0, |p| p.data.len());
            end.saturating_sub(have)
        };
        if self.held_by(ip.src) + grows > self.limits.per_source
            || self.total + grows > self.limits.total
        {
            return Reassembled::Dropped(FragmentDrop::OverLimit);
        }
        let partial = self.pending.entry(key).or_insert_with(|| Partial {
            started: now,
            data: Vec::new(),
            have: Vec::new(),
            end: None,
            header: None,
            charged: 0,
        });
        // A second end, or data past the end.
        let bad_end = match (partial.end, ip.more_fragments) {
            (Some(e), false) => e != end,
            (Some(e), true) => end > e,
            (None, false) => partial.have.iter().any(|&(_, b)| b > end),
            (None, true) => false,
        };
        // Overlap that disagrees.
        let disagrees = partial.have.iter().any(|&(a, b)| {
            let (lo, hi) = (a.max(start), b.min(end));
            lo < hi && partial.data[lo..hi] != data[lo - start..hi - start]
        });
        if bad_end || disagrees {
            self.forget(&key);
            self.abandoned += 1;
            return Reassembled::Dropped(FragmentDrop::Malformed);
        }
        if partial.data.len() < end {
            partial.data.resize(end, 0);
        }
        partial.data[start..end].copy_from_slice(data);
        partial.have.push((start, end));
        partial.have.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(partial.have.len());
        for &(a, b) in &partial.have {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        partial.have = merged;
        if !ip.more_fragments {
            partial.end = Some(end);
        }
        if start == 0 {
            partial.header = Some(packet[..ip.frag_data_offset].to_vec());
        }
        let charge = partial.data.len() - partial.charged;
        partial.charged += charge;
        self.total += charge;
        *self.per_source.entry(ip.src).or_insert(0) += charge;
        let done =
            partial.end.is_some_and(|e| partial.have == [(0, e)]) && partial.header.is_some();
        if !done {
            return Reassembled::Held;
        }
        let Some(p) = self.pending.get(&key) else {
            return Reassembled::Held;
        };
        let whole = rebuild(ip.version, p.header.as_deref().unwrap_or_default(), &p.data);
        self.forget(&key);
        match whole {
            Some(w) => Reassembled::Complete(w),
            None => Reassembled::Dropped(FragmentDrop::Malformed),
        }
    }
}

/// The whole packet from the first fragment's header and the data.
fn rebuild(version: IpVersion, header: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    match version {
        IpVersion::V4 => {
            let total = 20 + data.len();
            let total16 = u16::try_from(total).ok()?;
            let mut out = Vec::with_capacity(total);
            out.extend_from_slice(header.get(..20)?);
            out[0] = 0x45;
            out[2..4].copy_from_slice(&total16.to_be_bytes());
            out[6..8].copy_from_slice(&[0, 0]);
            out[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&out);
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(data);
            Some(out)
        }
        IpVersion::V6 => {
            // The fragment header's next header names the data's first.
            let next = *header.get(header.len().checked_sub(8)?)?;
            let len = u16::try_from(data.len()).ok()?;
            let mut out = Vec::with_capacity(40 + data.len());
            out.extend_from_slice(header.get(..40)?);
            out[4..6].copy_from_slice(&len.to_be_bytes());
            out[6] = next;
            out.extend_from_slice(data);
            Some(out)
        }
    }
}

/// The Internet checksum of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in b.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Splits `packet` (one IP packet, no IPv4 options, IPv6 without extension
/// headers) into fragments of at most `mtu` bytes, handing each to `out`;
/// a packet that fits is handed as it is. `id` identifies the datagram.
pub fn fragment(packet: &[u8], mtu: usize, id: u32, out: &mut impl FnMut(&[u8])) -> bool {
    if packet.len() <= mtu {
        out(packet);
        return true;
    }
    let Some(&first) = packet.first() else {
        return false;
    };
    let mut frag = Vec::with_capacity(mtu);
    match first >> 4 {
        4 if packet.len() >= 20 && packet[0] & 0x0f == 5 => {
            let data = &packet[20..];
            let chunk = (mtu.saturating_sub(20)) & !7;
            if chunk == 0 {
                return false;
            }
            for (i, piece) in data.chunks(chunk).enumerate() {
                let offset = i * chunk;
                let more = offset + piece.len() < data.len();
                frag.clear();
                frag.extend_from_slice(&packet[..20]);
                let total = (20 + piece.len()) as u16;
                frag[2..4].copy_from_slice(&total.to_be_bytes());
                frag[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                let field = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
                frag[6..8].copy_from_slice(&field.to_be_bytes());
                frag[10..12].copy_from_slice(&[0, 0]);
                let sum = checksum(&frag[..20]);
                frag[10..12].copy_from_slice(&sum.to_be_bytes());
                frag.extend_from_slice(piece);
                out(&frag);
            }
            true
        }
        6 if packet.len() >= 40 => {
            let data = &packet[40..];
            let next = packet[6];
            let chunk = (mtu.saturating_sub(48)) & !7;
            if chunk == 0 {
                return false;
            }
            for (i, piece) in data.chunks(chunk).enumerate() {
                let offset = i * chunk;
                let more = offset + piece.len() < data.len();
                frag.clear();
                frag.extend_from_slice(&packet[..40]);
                let len = (8 + piece.len()) as u16;
                frag[4..6].copy_from_slice(&len.to_be_bytes());
                frag[6] = 44;
                let field = ((offset / 8) as u16) << 3 | u16::from(more);
                frag.extend_from_slice(&[next, 0]);
                frag.extend_from_slice(&field.to_be_bytes());
                frag.extend_from_slice(&id.to_be_bytes());
                frag.extend_from_slice(piece);
                out(&frag);
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_ip;

    fn udp_v4(len: usize) -> Vec<u8> {
        let total = 20 + 8 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 96, 0, 9]);
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&9000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for (i, b) in p[28..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        p
    }

    fn udp_v6(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 8 + len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 64;
        p[8] = 0xfd;
        p[23] = 2;
        p[24] = 0xfd;
        p[39] = 9;
        p[40..42].copy_from_slice(&4000u16.to_be_bytes());
        p[42..44].copy_from_slice(&9000u16.to_be_bytes());
        p[44..46].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for (i, b) in p[48..].iter_mut().enumerate() {
            *b = (i % 241) as u8;
        }
        p
    }

    fn pieces(p: &[u8], mtu: usize, id: u32) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        assert!(fragment(p, mtu, id, &mut |f| v.push(f.to_vec())));
        v
    }

    fn feed(r: &mut Reassembler, frags: &[Vec<u8>], now: Instant) -> Vec<Reassembled> {
        frags
            .iter()
            .map(|f| r.push(&parse_ip(f).expect("parses"), f, now))
            .collect()
    }

    #[test]
    fn fragments_round_trip_in_any_order() {
        let now = Instant::now();
        for (packet, mtu) in [
            (udp_v4(65_507), 1420),
            (udp_v4(1_393), 1420),
            (udp_v4(8_000), 1280),
            (udp_v6(65_000), 1420),
            (udp_v6(2_000), 1280),
        ] {
            let mut frags = pieces(&packet, mtu, 77);
            assert!(frags.len() > 1);
            assert!(frags.iter().all(|f| f.len() <= mtu));
            // Last first, then the rest reversed: order does not matter.
            frags.reverse();
            let mut r = Reassembler::new(Limits::default());
            let out = feed(&mut r, &frags, now);
            let (last, held) = out.split_last().expect("some");
            assert!(held.iter().all(|o| *o == Reassembled::Held), "{held:?}");
            let Reassembled::Complete(whole) = last else {
                panic!("{last:?}")
            };
            // The same packet; IPv4's identification (and so its header
            // checksum) is the fragments'.
            let same = |a: &[u8], b: &[u8]| {
                a.len() == b.len()
                    && a.iter().zip(b).enumerate().all(|(i, (x, y))| {
                        x == y || (a[0] >> 4 == 4 && ((4..6).contains(&i) || (10..12).contains(&i)))
                    })
            };
            assert!(
                same(whole, &packet),
                "{} vs {} bytes",
                whole.len(),
                packet.len()
            );
            assert_eq!(
                checksum(&whole[..20.min(whole.len())]) == 0,
                whole[0] >> 4 == 4
            );
            assert_eq!(r.held_by(parse_ip(&packet).expect("ip").src), 0);
        }
    }

    #[test]
    fn hostile_fragments_are_bounded_and_dropped() {
        let now = Instant::now();
        let big = udp_v4(65_507);
        let frags = pieces(&big, 1420, 1);
        let limits = Limits {
            per_source: 100_000,
            total: 150_000,
            timeout: Duration::from_secs(5),
        };
        let mut r = Reassembler::new(limits);
        // Only the last fragments of many datagrams: each reserves its
        // whole length, so the cap is reached at once.
        let mut over = 0;
        for id in 0..10u32 {
            let mut last = pieces(&big, 1420, id).pop().expect("last");
            last[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            if let Reassembled::Dropped(FragmentDrop::OverLimit) =
                r.push(&parse_ip(&last).expect("ip"), &last, now)
            {
                over += 1;
            }
        }
        assert!(over >= 9, "{over}");
        assert!(r.held_by(parse_ip(&big).expect("ip").src) <= 100_000);
        // They go after the timeout, and room comes back.
        r.expire(now + Duration::from_secs(6));
        assert_eq!(r.held_by(parse_ip(&big).expect("ip").src), 0);
        let out = feed(&mut r, &frags, now + Duration::from_secs(6));
        assert!(matches!(out.last(), Some(Reassembled::Complete(_))));

        // An overlap that disagrees drops the datagram.
        let small = udp_v4(3_000);
        let mut frags = pieces(&small, 1420, 9);
        let mut evil = frags[1].clone();
        let n = evil.len();
        evil[n - 1] ^= 0xff;
        frags.insert(2, evil);
        let mut r = Reassembler::new(Limits::default());
        let out = feed(&mut r, &frags, now);
        assert!(
            out.contains(&Reassembled::Dropped(FragmentDrop::Malformed)),
            "{out:?}"
        );
        assert!(!out.iter().any(|o| matches!(o, Reassembled::Complete(_))));
        // A datagram past 65,535 bytes.
        let mut last = pieces(&udp_v4(65_507), 1420, 3).pop().expect("last");
        last[6..8].copy_from_slice(&(0x1fffu16).to_be_bytes());
        assert_eq!(
            r.push(&parse_ip(&last).expect("ip"), &last, now),
            Reassembled::Dropped(FragmentDrop::Malformed)
        );
        // Not a fragment: untouched.
        assert_eq!(
            r.push(&parse_ip(&small).expect("ip"), &small, now),
            Reassembled::Whole
        );
    }
}
