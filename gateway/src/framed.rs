//! The framed-TCP WireGuard transport: each TCP connection carries
//! length-framed WireGuard datagrams ([`burrow_netstack::framing`]), the
//! form WireGuard takes through a Kubernetes port-forward.
//!
//! A laptop opens several connections (its streams, 4 by default); each is
//! its own underlay "endpoint" to the peer table. A connection becomes one
//! of the peer's streams once its session accepted a datagram there; the
//! data path sends each flow's packets on one of them by the flow's hash
//! (`datapath::output`), and what belongs to no flow (handshake answers,
//! keepalives) follows WireGuard's roaming rule: the connection the peer
//! was last heard on. Connections are named by synthetic addresses in
//! `100::/64` (RFC 6666, discard-only), which no UDP datagram can
//! legitimately come from.
//!
//! Per connection a reader task passes raw stream chunks to the data path
//! (decoding happens there, without copying whole frames), and a writer task
//! drains an output buffer the data path appends frames to.
//!
//! The port is reachable by anyone who reaches a node (NodePort), so
//! connections are bounded ([`Limits`]): in number and per source address,
//! each must make some peer's session accept a datagram within the
//! handshake timeout, and a connection silent for the idle timeout is
//! closed. Connections from loopback are port-forwards (the container
//! runtime dials the pod's localhost), already authorised by the API
//! server: they have a pool of `max_connections` of their own and no
//! per-source cap, so a flood through the NodePort never locks out the
//! laptops that come through port-forwards. A connection beyond a cap is accepted and reset
//! at once, so the kernel's accept queue never fills (a full queue would
//! fail the pod's TCP readiness probe). Refusals and closes by timeout are
//! counted in [`Counters`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_netstack::framing::{self, FrameError};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

/// Bytes read from a connection per chunk.
const READ_CHUNK: usize = 64 * 1024;
/// Unsent bytes a connection may hold before further frames are dropped
/// (as a full UDP socket buffer would drop them). Inside a TCP stream a
/// drop is only a loss for the inner flow to repair (slowly: smoltcp has
/// no SACK), so this is above what the flows sharing a stream keep in
/// flight (each up to its 4 MiB send buffer, `--tcp-send-buffer`; the
/// stream's kernel buffer holds a few MiB more); it bounds a laptop that
/// stops reading.
pub const MAX_BACKLOG: usize = 16 << 20;
/// An idle connection's output buffers keep at most this much capacity.
const IDLE_KEEP: usize = 256 << 10;
/// How long a connection has nothing to write before its output buffers
/// shrink to [`IDLE_KEEP`].
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// A busy connection's output buffers keep room for twice the largest
/// batch of the last one to two of these windows: a burst's capacity (up
/// to [`MAX_BACKLOG`]) goes back once the bursts are smaller, even when
/// the connection never pauses for [`IDLE_RELEASE`].
const RETAIN_WINDOW: Duration = Duration::from_secs(2);
/// Unsent bytes all connections together may hold ([`MAX_BACKLOG`] is per
/// connection): a few laptops that stop reading cannot take the pod's
/// memory.
pub const MAX_BACKLOG_ALL: usize = 128 << 20;

/// Identity of one framed connection.
pub type ConnId = u64;

/// Bounds on framed connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once from loopback (port-forwards), and again
    /// from everywhere else. A laptop uses one per stream (4 by default,
    /// at most 16), a few more briefly while it reopens them.
    pub max_connections: usize,
    /// Connections open at once from one source address other than
    /// loopback.
    pub max_per_source: usize,
    /// A connection that has not made some peer's session accept a
    /// datagram (a valid handshake initiation, or data of a live session)
    /// within this long is closed.
    pub handshake_timeout: Duration,
    /// A connection that delivered no byte for this long is closed. A
    /// burrow laptop sends on each of its streams at least every 5 s, so
    /// only a dead stream or a client without keepalives meets it.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What the framed port refused or closed, by reason. Written by the accept
/// loop and the connection tasks (once per connection, never per
/// datagram), read when the data path renders metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Refused: `max_connections` were open.
    pub refused_total_limit: AtomicU64,
    /// Refused: `max_per_source` were open from the same address.
    pub refused_source_limit: AtomicU64,
    /// Closed: no datagram accepted within `handshake_timeout`.
    pub closed_handshake_timeout: AtomicU64,
    /// Closed: silent for `idle_timeout`.
    pub closed_idle_timeout: AtomicU64,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TotalLimit,
    SourceLimit,
}

/// The connections open now, by source (sans-IO: the accept loop admits,
/// each connection's [`Admitted`] gives its place back).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    /// Open from loopback (port-forwards).
    local: usize,
    /// Open from everywhere else, in all and by source.
    remote: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            local: 0,
            remote: 0,
            by_source: HashMap::new(),
        }
    }

    /// Take a place for a connection from `source`, or say which cap is
    /// full.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), Refusal> {
        let source = source.to_canonical();
        if source.is_loopback() {
            if self.local >= self.limits.max_connections {
                return Err(Refusal::TotalLimit);
            }
            self.local += 1;
            return Ok(());
        }
        if self.remote >= self.limits.max_connections {
            return Err(Refusal::TotalLimit);
        }
        let n = self.by_source.entry(source).or_default();
        if *n >= self.limits.max_per_source {
            return Err(Refusal::SourceLimit);
        }
        *n += 1;
        self.remote += 1;
        Ok(())
    }

    /// Give back the place of a connection from `source`.
    pub fn release(&mut self, source: IpAddr) {
        let source = source.to_canonical();
        if source.is_loopback() {
            self.local = self.local.saturating_sub(1);
            return;
        }
        self.remote = self.remote.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.local + self.remote
    }
}

/// A connection's place in the [`Admission`], given back on drop (when
/// both of its tasks are done).
struct Admitted {
    admission: Arc<Mutex<Admission>>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut a) = self.admission.lock() {
            a.release(self.source);
        }
    }
}

/// The synthetic underlay address standing for connection `id`.
pub fn conn_addr(id: ConnId) -> SocketAddr {
    let o = id.to_be_bytes();
    let seg = |i: usize| u16::from_be_bytes([o[i], o[i + 1]]);
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(
            0x0100,
            0,
            0,
            0,
            seg(0),
            seg(2),
            seg(4),
            seg(6),
        )),
        0,
    )
}

/// The connection a synthetic address stands for, if it is one.
pub fn addr_conn(addr: SocketAddr) -> Option<ConnId> {
    let IpAddr::V6(ip) = addr.ip() else {
        return None;
    };
    let s = ip.segments();
    if s[..4] != [0x0100, 0, 0, 0] {
        return None;
    }
    let o = ip.octets();
    let mut id = [0u8; 8];
    id.copy_from_slice(&o[8..]);
    Some(u64::from_be_bytes(id))
}

/// How much capacity a busy writer's buffers keep: twice the largest
/// batch written in the current and the previous [`RETAIN_WINDOW`], and
/// at least [`IDLE_KEEP`]. Without it each buffer kept the largest burst
/// it had ever seen: under a soak the port-forward gateway's RSS rose in
/// steps for half an hour.
#[derive(Debug)]
struct Retention {
    window_start: Instant,
    window_max: usize,
    previous_max: usize,
}

impl Retention {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            window_max: 0,
            previous_max: 0,
        }
    }

    /// A batch of `len` bytes was written at `now`.
    fn note(&mut self, len: usize, now: Instant) {
        let since = now.saturating_duration_since(self.window_start);
        if since >= RETAIN_WINDOW {
            // A whole window without a batch forgets both.
            self.previous_max = if since >= 2 * RETAIN_WINDOW {
                0
            } else {
                self.window_max
            };
            self.window_max = 0;
            self.window_start = now;
        }
        self.window_max = self.window_max.max(len);
    }

    /// The capacity to keep.
    fn keep(&self) -> usize {
        (2 * self.window_max.max(self.previous_max)).max(IDLE_KEEP)
    }

    /// Give back `buf`'s capacity beyond twice what is to be kept (an
    /// empty buffer: nothing to copy). The factor of two leaves a buffer
    /// alone while the batches stay about the same size.
    fn trim(&self, buf: &mut Vec<u8>) {
        let keep = self.keep();
        if buf.is_empty() && buf.capacity() > 2 * keep {
            *buf = Vec::with_capacity(keep);
        }
    }
}

/// Output side of a connection, shared with its writer task.
#[derive(Default)]
pub struct FramedOut {
    buf: Mutex<Vec<u8>>,
    /// Bytes pushed and not yet written: in `buf` and in the writer's
    /// batch.
    queued: AtomicUsize,
    /// The same, summed over every connection (see [`MAX_BACKLOG_ALL`]).
    all: Arc<AtomicUsize>,
    wake: Notify,
    closed: AtomicBool,
    /// Some peer's session accepted a datagram from this connection.
    authenticated: AtomicBool,
}

impl FramedOut {
    /// Append one datagram as a frame; false when it was dropped (backlog
    /// full, connection closed, or not frameable).
    pub fn push(&self, datagram: &[u8]) -> bool {
        let Ok(header) = framing::frame_header(datagram.len()) else {
            return false;
        };
        let Ok(mut buf) = self.buf.lock() else {
            return false;
        };
        // Under the lock: `release_all` sets `closed` under it too, so
        // nothing is counted after the count was given back.
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let n = header.len() + datagram.len();
        if self.queued.load(Ordering::Relaxed) + n > MAX_BACKLOG
            || self.all.load(Ordering::Relaxed) + n > MAX_BACKLOG_ALL
        {
            return false;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.all.fetch_add(n, Ordering::Relaxed);
        buf.extend_from_slice(&header);
        buf.extend_from_slice(datagram);
        true
    }

    /// A connection whose unsent bytes count towards `all` (shared by
    /// every connection of one listener).
    fn counted_in(all: Arc<AtomicUsize>) -> Self {
        Self {
            all,
            ..Self::default()
        }
    }

    /// `n` pushed bytes were written out.
    fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.all.fetch_sub(n, Ordering::Relaxed);
    }

    /// The writer is gone: closed, and every byte still counted given
    /// back.
    fn release_all(&self) {
        if let Ok(mut buf) = self.buf.lock() {
            self.closed.store(true, Ordering::Release);
            *buf = Vec::new();
            let left = self.queued.swap(0, Ordering::Relaxed);
            self.all.fetch_sub(left, Ordering::Relaxed);
        }
    }

    /// Tell the writer there is output (once per batch, not per frame).
    pub fn flush(&self) {
        self.wake.notify_one();
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Some peer's session accepted a datagram from this connection: the
    /// handshake timeout no longer applies.
    pub fn mark_authenticated(&self) {
        if !self.authenticated.load(Ordering::Relaxed) {
            self.authenticated.store(true, Ordering::Release);
        }
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }
}

/// What connections tell the data path.
pub enum FramedEvent {
    Opened {
        id: ConnId,
        remote: SocketAddr,
        out: Arc<FramedOut>,
    },
    /// Raw stream bytes, to be decoded in order.
    Data {
        id: ConnId,
        chunk: Vec<u8>,
    },
    Closed {
        id: ConnId,
    },
}

/// A connection as the data path holds it.
pub struct FramedConn {
    pub remote: SocketAddr,
    pub out: Arc<FramedOut>,
    pub decoder: framing::FrameDecoder,
    /// The peer whose datagrams were last accepted here (its slot and its
    /// key: a slot can be reused by another peer).
    pub peer: Option<(burrow_netstack::wg::PeerId, boringtun::x25519::PublicKey)>,
    /// When a datagram was last accepted here.
    pub heard: Option<Instant>,
}

impl FramedConn {
    pub fn new(remote: SocketAddr, out: Arc<FramedOut>, max_frame: usize) -> Self {
        Self {
            remote,
            out,
            decoder: framing::FrameDecoder::with_max_frame(max_frame),
            peer: None,
            heard: None,
        }
    }
}

/// Accept connections until the data path goes away, within `limits`.
pub async fn accept_loop(
    listener: TcpListener,
    events: mpsc::Sender<FramedEvent>,
    limits: Limits,
    counters: Arc<Counters>,
) {
    let admission = Arc::new(Mutex::new(Admission::new(limits)));
    let backlog_all = Arc::new(AtomicUsize::new(0));
    let mut next_id: ConnId = 0;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "framed listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = admission
            .lock()
            .map_err(|_| Refusal::TotalLimit)
            .and_then(|mut a| a.admit(remote.ip()));
        if let Err(refusal) = admitted {
            let counter = match refusal {
                Refusal::TotalLimit => &counters.refused_total_limit,
                Refusal::SourceLimit => &counters.refused_source_limit,
            };
            // Logged on the first refusal and every 1000th after.
            if counter.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                tracing::warn!(%remote, ?refusal, ?limits,
                    "framed connection refused: at its cap (counted in burrow_gateway_framed_connections_refused_total)");
            }
            reset(&stream);
            continue;
        }
        let slot = Arc::new(Admitted {
            admission: admission.clone(),
            source: remote.ip(),
        });
        next_id += 1;
        let id = next_id;
        let _ = stream.set_nodelay(true);
        let out = Arc::new(FramedOut::counted_in(backlog_all.clone()));
        if events
            .send(FramedEvent::Opened {
                id,
                remote,
                out: out.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(conn = id, %remote, "framed connection opened");
        let (rd, mut wr) = stream.into_split();
        let reader_events = events.clone();
        let reader_out = out.clone();
        let reader_slot = slot.clone();
        let reader_counters = counters.clone();
        tokio::spawn(async move {
            let _slot = reader_slot;
            let end = read_chunks(&rd, id, &reader_events, &reader_out, limits).await;
            match end {
                ReadEnd::HandshakeTimeout => {
                    reader_counters
                        .closed_handshake_timeout
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = id, %remote, "framed connection closed: no handshake in time");
                }
                ReadEnd::IdleTimeout => {
                    reader_counters
                        .closed_idle_timeout
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn = id, %remote, "framed connection closed: idle");
                }
                ReadEnd::Closed => {}
            }
            if end != ReadEnd::Closed {
                reset(rd.as_ref());
            }
            reader_out.close();
            let _ = reader_events.send(FramedEvent::Closed { id }).await;
            tracing::info!(conn = id, %remote, "framed connection closed");
        });
        tokio::spawn(async move {
            let _slot = slot;
            // Double buffering: swap the shared buffer for this one, write
            // it out, keep its capacity.
            let mut pending = Vec::new();
            let mut retention = Retention::new(Instant::now());
            loop {
                let notified = out.wake.notified();
                {
                    let Ok(mut buf) = out.buf.lock() else { break };
                    std::mem::swap(&mut *buf, &mut pending);
                }
                if pending.is_empty() {
                    if out.closed.load(Ordering::Acquire) {
                        let _ = wr.shutdown().await;
                        break;
                    }
                    // Caught up. Under load that happens between every two
                    // batches, so the buffers are kept until the
                    // connection has been quiet for IDLE_RELEASE: giving
                    // them back at once cost the gateway a fresh, zeroed,
                    // faulted-in allocation per batch (about a sixth of
                    // its CPU during downloads). Then a burst's buffers (up
                    // to MAX_BACKLOG each) go back.
                    if tokio::time::timeout(IDLE_RELEASE, notified).await.is_ok() {
                        continue;
                    }
                    let notified = out.wake.notified();
                    if pending.capacity() > IDLE_KEEP {
                        pending = Vec::new();
                    }
                    if let Ok(mut buf) = out.buf.lock()
                        && buf.is_empty()
                        && buf.capacity() > IDLE_KEEP
                    {
                        *buf = Vec::new();
                    }
                    notified.await;
                    continue;
                }
                let written = wr.write_all(&pending).await;
                out.written(pending.len());
                retention.note(pending.len(), Instant::now());
                pending.clear();
                // The two buffers take turns here.
                retention.trim(&mut pending);
                if let Err(e) = written {
                    tracing::debug!(conn = id, error = %e, "framed connection write failed");
                    break;
                }
            }
            out.release_all();
        });
    }
}

/// How a connection's reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// End of stream, an error, or the data path went away.
    Closed,
    HandshakeTimeout,
    IdleTimeout,
}

/// Pass a connection's bytes to the data path until it ends or times out.
/// A buffer is taken only once bytes are there: idle connections hold
/// none.
async fn read_chunks(
    rd: &OwnedReadHalf,
    id: ConnId,
    events: &mpsc::Sender<FramedEvent>,
    out: &FramedOut,
    limits: Limits,
) -> ReadEnd {
    let opened = Instant::now();
    let handshake_by = opened + limits.handshake_timeout;
    let mut last_read = opened;
    loop {
        let idle_by = last_read + limits.idle_timeout;
        let wake = if out.is_authenticated() {
            idle_by
        } else {
            idle_by.min(handshake_by)
        };
        match tokio::time::timeout_at(wake.into(), rd.readable()).await {
            Err(_) => {
                let now = Instant::now();
                if !out.is_authenticated() && now >= handshake_by {
                    return ReadEnd::HandshakeTimeout;
                }
                if now >= idle_by {
                    return ReadEnd::IdleTimeout;
                }
                // Authenticated meanwhile: wait for the idle timeout.
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(conn = id, error = %e, "framed connection read failed");
                return ReadEnd::Closed;
            }
            Ok(Ok(())) => {}
        }
        let mut chunk = Vec::with_capacity(READ_CHUNK);
        match rd.try_read_buf(&mut chunk) {
            Ok(0) => return ReadEnd::Closed,
            Ok(_) => {
                last_read = Instant::now();
                // A bounded channel: a laptop sending faster than the data
                // path processes is slowed by TCP.
                if events.send(FramedEvent::Data { id, chunk }).await.is_err() {
                    return ReadEnd::Closed;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(conn = id, error = %e, "framed connection read failed");
                return ReadEnd::Closed;
            }
        }
    }
}

/// Close with RST when the last handle goes: a refused or timed-out
/// connection leaves no FIN-WAIT or TIME-WAIT state behind.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Decode every frame in `chunk`, handing each to `datagram`. An error means
/// the stream is out of step and the connection must be dropped.
pub fn decode_chunk(
    decoder: &mut framing::FrameDecoder,
    chunk: &[u8],
    mut datagram: impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    let mut input = chunk;
    while let Some(frame) = decoder.decode(&mut input)? {
        datagram(frame);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_round_trip_and_never_clash_with_udp() {
        for id in [1u64, 2, 0xdead_beef, u64::MAX] {
            assert_eq!(addr_conn(conn_addr(id)), Some(id));
        }
        assert_eq!(addr_conn("127.0.0.1:5".parse().expect("addr")), None);
        assert_eq!(addr_conn("[::1]:5".parse().expect("addr")), None);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn admission_caps_in_number_and_per_source_and_keeps_loopback_apart() {
        let mut a = Admission::new(Limits {
            max_connections: 3,
            max_per_source: 2,
            ..Limits::default()
        });
        assert_eq!(a.admit(ip("192.168.240.2")), Ok(()));
        // The same source as an IPv4-mapped address (a `::` listener).
        assert_eq!(a.admit(ip("::ffff:192.168.240.2")), Ok(()));
        assert_eq!(a.admit(ip("192.168.240.2")), Err(Refusal::SourceLimit));
        assert_eq!(a.admit(ip("10.0.0.9")), Ok(()));
        assert_eq!(a.admit(ip("10.0.0.10")), Err(Refusal::TotalLimit));
        // Port-forwards arrive from loopback: a pool of their own, no
        // per-source cap.
        for lo in ["127.0.0.1", "::1", "127.0.0.1"] {
            assert_eq!(a.admit(ip(lo)), Ok(()), "{lo}");
        }
        assert_eq!(a.admit(ip("::ffff:127.0.0.1")), Err(Refusal::TotalLimit));
        assert_eq!(a.open(), 6);
        a.release(ip("192.168.240.2"));
        assert_eq!(a.admit(ip("10.0.0.10")), Ok(()));
        assert_eq!(a.admit(ip("192.168.240.2")), Err(Refusal::TotalLimit));
        a.release(ip("::1"));
        assert_eq!(a.admit(ip("127.0.0.1")), Ok(()));
        for s in [
            "::ffff:192.168.240.2",
            "10.0.0.9",
            "10.0.0.10",
            "127.0.0.1",
            "127.0.0.1",
            "127.0.0.1",
        ] {
            a.release(ip(s));
        }
        assert_eq!(a.open(), 0);
        assert!(a.by_source.is_empty());
    }

    /// Unsent bytes are bounded per connection and over all of them; what
    /// the writer wrote or a closed connection held is given back.
    #[test]
    fn backlog_is_capped_per_connection_and_for_all_and_given_back() {
        let all = Arc::new(AtomicUsize::new(0));
        let a = FramedOut::counted_in(all.clone());
        let frame = vec![7u8; 60_000];
        let per = frame.len() + framing::HEADER_LEN;
        let mut n = 0;
        while a.push(&frame) {
            n += 1;
        }
        assert_eq!(n, MAX_BACKLOG / per);
        assert_eq!(all.load(Ordering::Relaxed), n * per);
        a.written(per);
        assert!(a.push(&frame), "room again after a write");
        assert!(!a.push(&frame));
        // Connections together stop at MAX_BACKLOG_ALL.
        let others: Vec<FramedOut> = (0..MAX_BACKLOG_ALL / MAX_BACKLOG + 1)
            .map(|_| FramedOut::counted_in(all.clone()))
            .collect();
        for o in &others {
            while o.push(&frame) {}
        }
        assert!(all.load(Ordering::Relaxed) <= MAX_BACKLOG_ALL);
        assert!(all.load(Ordering::Relaxed) > MAX_BACKLOG_ALL - MAX_BACKLOG);
        let last = others.last().expect("others");
        assert_eq!(
            last.queued.load(Ordering::Relaxed),
            0,
            "nothing left for the last one"
        );
        // A connection that goes gives back all it held, and takes no more.
        a.release_all();
        assert!(!a.push(&frame));
        assert!(last.push(&frame), "the room a closed connection held");
        for o in &others {
            o.release_all();
        }
        assert_eq!(all.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_busy_writer_gives_back_a_burst_once_batches_are_small_again() {
        let t0 = Instant::now();
        let mut r = Retention::new(t0);
        // A 16 MiB burst, then steady 100 KiB batches every 10 ms.
        let mut buf: Vec<u8> = Vec::with_capacity(16 << 20);
        r.note(16 << 20, t0);
        r.trim(&mut buf);
        assert!(buf.capacity() >= 16 << 20, "kept while the burst is recent");
        let mut t = t0;
        let mut given_back_at = None;
        for _ in 0..600 {
            t += Duration::from_millis(10);
            r.note(100 << 10, t);
            r.trim(&mut buf);
            if given_back_at.is_none() && buf.capacity() < 16 << 20 {
                given_back_at = Some(t - t0);
            }
        }
        let at = given_back_at.expect("the burst's capacity was never given back");
        assert!(at <= 2 * RETAIN_WINDOW, "given back after {at:?}");
        assert_eq!(
            buf.capacity(),
            IDLE_KEEP,
            "what steady 100 KiB batches keep"
        );

        // Steady batches about the size of the capacity are never trimmed
        // (no allocation per batch).
        let mut buf: Vec<u8> = Vec::with_capacity(4 << 20);
        let ptr = buf.as_ptr();
        for i in 0..600u32 {
            t += Duration::from_millis(10);
            r.note((3 << 20) + (i as usize % 7) * 100_000, t);
            r.trim(&mut buf);
        }
        assert_eq!(
            buf.as_ptr(),
            ptr,
            "a steady writer's buffer was reallocated"
        );

        // A buffer that still holds bytes is never touched.
        let mut full = vec![1u8; 64 << 20];
        r.note(1, t + 3 * RETAIN_WINDOW);
        r.trim(&mut full);
        assert_eq!(full.len(), 64 << 20);
    }
}
