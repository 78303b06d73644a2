//! The framed transport's links as the data path sees them: several byte
//! streams to the gateway (port-forwards), each carrying WireGuard
//! datagrams length-framed ([`burrow_netstack::framing`]).
//!
//! The data path appends frames to a link's output queue and wakes its
//! writer once per batch; whoever owns the stream (the daemon's transport
//! task) takes whole batches off the queue ([`Links::take`]) and hands them
//! to the stream as one write, and passes what it reads back to the data
//! path as [`LinkEvent`]s, where frames are decoded without copying. No
//! socket sits in between (the port-forward transport used to relay every
//! datagram through a loopback UDP socket).
//!
//! Each flow's packets go on one link, chosen by [`flow_hash`] among the
//! links that are up, so a flow keeps its order and one flow's backlog
//! does not stall the others. Datagrams of no flow (handshakes,
//! keepalives) go on the link the gateway last spoke on.
//!
//! [`flow_hash`]: burrow_netstack::wire::flow_hash

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use burrow_netstack::framing;
use bytes::Bytes;
use tokio::sync::Notify;

/// Unsent bytes a link may hold before further frames are dropped (as a
/// full socket buffer would drop them; the flows' TCP sends again).
pub const MAX_BACKLOG: usize = 2 << 20;
/// A batch handed to the stream at once is at most about this long (one
/// WebSocket message; larger batches start a new one).
pub const BATCH_BYTES: usize = 256 << 10;
/// Most links a data path takes.
pub const MAX_LINKS: usize = 16;

/// What the stream side tells the data path.
#[derive(Debug)]
pub enum LinkEvent {
    /// Link `0` (re)opened: its decoder starts afresh and the data path
    /// sends a datagram on it at once (the gateway closes a stream that
    /// carries no authenticated datagram for a while).
    Opened(usize),
    /// Bytes read from link `0`'s stream.
    Data(usize, Bytes),
    /// Link `0`'s stream ended; nothing is sent on it until it reopens.
    Closed(usize),
}

struct LinkOut {
    /// Batches, each starting with the stream's prefix.
    queue: Mutex<Queue>,
    wake: Notify,
    live: AtomicBool,
    /// The data path found the stream out of step (a frame it cannot
    /// read): the stream side closes it and opens a new one.
    broken: AtomicBool,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// The output side of every link, shared by the data path (which appends)
/// and the stream tasks (which take).
pub struct Links {
    outs: Box<[LinkOut]>,
    /// Signalled when a link comes up.
    up: Notify,
    /// Bytes every batch starts with (the port-forward's channel byte).
    prefix: Vec<u8>,
}

impl Links {
    /// `n` links (1..=[`MAX_LINKS`]), all down; each batch taken starts with
    /// `prefix`.
    pub fn new(n: usize, prefix: &[u8]) -> Self {
        let n = n.clamp(1, MAX_LINKS);
        Self {
            outs: (0..n)
                .map(|_| LinkOut {
                    queue: Mutex::default(),
                    wake: Notify::new(),
                    live: AtomicBool::new(false),
                    broken: AtomicBool::new(false),
                })
                .collect(),
            prefix: prefix.to_vec(),
            up: Notify::new(),
        }
    }

    /// Wait until some link is up.
    pub async fn wait_live(&self) {
        loop {
            let notified = self.up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if (0..self.outs.len()).any(|i| self.is_live(i)) {
                return;
            }
            notified.await;
        }
    }

    /// How many links there are.
    pub fn count(&self) -> usize {
        self.outs.len()
    }

    /// Whether link `i` is up.
    pub fn is_live(&self, i: usize) -> bool {
        self.outs
            .get(i)
            .is_some_and(|o| o.live.load(Ordering::Acquire))
    }

    /// The stream side: link `i` is up (or down: its queue is dropped).
    pub fn set_live(&self, i: usize, live: bool) {
        let Some(o) = self.outs.get(i) else { return };
        o.live.store(live, Ordering::Release);
        o.broken.store(false, Ordering::Release);
        if live {
            self.up.notify_waiters();
        } else if let Ok(mut q) = o.queue.lock() {
            *q = Queue::default();
        }
    }

    /// The link flow `hash` goes on: its own when up, else the next one up.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        let n = self.outs.len();
        let start = (hash % n as u64) as usize;
        (0..n).map(|k| (start + k) % n).find(|&i| self.is_live(i))
    }

    /// Append `datagram` to link `i` as one frame; false when dropped (link
    /// down, backlog full, not frameable).
    pub fn push(&self, i: usize, datagram: &[u8]) -> bool {
        let Some(o) = self.outs.get(i) else {
            return false;
        };
        if !o.live.load(Ordering::Acquire) {
            return false;
        }
        let Ok(header) = framing::frame_header(datagram.len()) else {
            return false;
        };
        let Ok(mut q) = o.queue.lock() else {
            return false;
        };
        let len = header.len() + datagram.len();
        if q.bytes + len > MAX_BACKLOG {
            return false;
        }
        let start_new = q.batches.back().is_none_or(|b| b.len() + len > BATCH_BYTES);
        if start_new {
            let mut b = Vec::with_capacity(BATCH_BYTES.min(64 << 10));
            b.extend_from_slice(&self.prefix);
            q.batches.push_back(b);
        }
        let Some(b) = q.batches.back_mut() else {
            return false;
        };
        b.extend_from_slice(&header);
        b.extend_from_slice(datagram);
        q.bytes += len;
        true
    }

    /// Wake link `i`'s writer (once per batch of pushes).
    pub fn flush(&self, i: usize) {
        if let Some(o) = self.outs.get(i) {
            o.wake.notify_one();
        }
    }

    /// The data path side: what link `i` carries can no longer be read
    /// (a frame longer than any the gateway sends): nothing more is taken
    /// from it, and its stream side is told to replace the stream
    /// ([`Links::take`] returns `None`).
    pub fn break_link(&self, i: usize) {
        if let Some(o) = self.outs.get(i) {
            o.live.store(false, Ordering::Release);
            o.broken.store(true, Ordering::Release);
            if let Ok(mut q) = o.queue.lock() {
                *q = Queue::default();
            }
            o.wake.notify_one();
        }
    }

    /// The stream side: the next batch for link `i` (prefix first), waiting
    /// until there is one; `None` once the data path broke the link
    /// ([`Links::break_link`]): close the stream and open another.
    pub async fn take(&self, i: usize) -> Option<Bytes> {
        let Some(o) = self.outs.get(i) else {
            return std::future::pending().await;
        };
        loop {
            if o.broken.load(Ordering::Acquire) {
                return None;
            }
            if let Ok(mut q) = o.queue.lock()
                && let Some(b) = q.batches.pop_front()
            {
                q.bytes -= b.len() - self.prefix.len();
                return Some(Bytes::from(b));
            }
            o.wake.notified().await;
        }
    }
}

/// The synthetic underlay address that stands for link `i` in the peer
/// table (`100::/64`, discard-only: no datagram can come from it).
pub fn link_addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x0100, 0, 0, 0, 0, 0, 0, i as u16)),
        0,
    )
}

/// The link a synthetic address stands for.
pub fn addr_link(addr: SocketAddr) -> Option<usize> {
    let IpAddr::V6(ip) = addr.ip() else {
        return None;
    };
    let s = ip.segments();
    (s[..7] == [0x0100, 0, 0, 0, 0, 0, 0]).then_some(usize::from(s[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_go_out_in_batches_behind_the_prefix() {
        let links = Links::new(2, &[0]);
        assert!(!links.push(0, b"down"), "a link that is down takes nothing");
        links.set_live(0, true);
        assert!(links.push(0, b"abc"));
        assert!(links.push(0, b"de"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let b = rt.block_on(links.take(0)).expect("a batch");
        assert_eq!(&b[..], &[0, 0, 3, b'a', b'b', b'c', 0, 2, b'd', b'e']);
        // A batch is capped; the backlog too.
        let big = vec![7u8; 60_000];
        let mut pushed = 0;
        while links.push(0, &big) {
            pushed += 1;
        }
        assert_eq!(pushed, MAX_BACKLOG / (big.len() + 2));
        let first = rt.block_on(links.take(0)).expect("a batch");
        assert!(first.len() <= BATCH_BYTES + 1, "{}", first.len());
        assert!(links.push(0, &big), "taking a batch makes room");
        // Down drops the queue.
        links.set_live(0, false);
        links.set_live(0, true);
        assert!(links.push(0, b"x"));
        assert_eq!(
            rt.block_on(links.take(0)).as_deref(),
            Some(&[0, 0, 1, b'x'][..])
        );
    }

    #[test]
    fn a_broken_link_is_given_up_until_it_reopens() {
        let links = Links::new(2, &[0]);
        links.set_live(1, true);
        assert!(links.push(1, b"queued"));
        links.break_link(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(
            rt.block_on(links.take(1)),
            None,
            "the stream side is told to go"
        );
        assert!(!links.is_live(1));
        assert!(!links.push(1, b"more"), "nothing goes on a broken link");
        assert_eq!(links.pick(1), None);
        // The stream side opened a new stream.
        links.set_live(1, true);
        assert!(links.push(1, b"y"));
        assert_eq!(
            rt.block_on(links.take(1)).as_deref(),
            Some(&[0, 0, 1, b'y'][..])
        );
    }

    #[test]
    fn flows_keep_their_link_and_move_only_when_it_is_down() {
        let links = Links::new(4, &[]);
        assert_eq!(links.pick(6), None, "nothing is up");
        for i in 0..4 {
            links.set_live(i, true);
        }
        assert_eq!(links.pick(6), Some(2));
        assert_eq!(links.pick(6), Some(2));
        links.set_live(2, false);
        assert_eq!(links.pick(6), Some(3));
        assert_eq!(links.pick(7), Some(3));
        links.set_live(3, false);
        assert_eq!(links.pick(7), Some(0));
    }

    #[test]
    fn synthetic_addresses_name_links() {
        for i in [0, 1, 15] {
            assert_eq!(addr_link(link_addr(i)), Some(i));
        }
        assert_eq!(addr_link("192.0.2.1:51820".parse().expect("addr")), None);
        assert_eq!(addr_link("[100::1:0]:0".parse().expect("addr")), None);
    }
}
