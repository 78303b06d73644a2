//! The stub: query handling split in a synchronous [`Stub::step`] (parse,
//! check, route, answer from the cache — everything a hostile datagram can
//! reach, and all of a cache hit) and an asynchronous [`Stub::resolve`] for
//! misses (single-flight per name and type), plus the UDP and TCP servers
//! that drive them.
//!
//! `step`: responses and runts are dropped (two DNS speakers cannot be made
//! to bounce packets); REFUSED for sources other than loopback and the
//! stub's own addresses, non-IN classes, ANY and zone transfers; FORMERR
//! for what does not parse or has other than one question; NOTIMP for other
//! opcodes. A UDP query byte-identical to an earlier hit but for its ID
//! gets that hit's encoded answer with the ID patched in (exact until the
//! TTLs would tick down a second): no parsing, no encoding. `resolve`
//! renames records from the name asked of cluster DNS to the client's
//! spelling; UDP answers truncate (TC) beyond 512 bytes or the client's
//! EDNS size (capped at [`crate::upstream::EDNS_PAYLOAD`]); TCP answers whole.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument as _;

use crate::cache::{Cache, Key, Resolved};
use crate::route::{ClusterView, Route};
use crate::upstream::{EDNS_PAYLOAD, Exchange};

/// Answers larger than this over UDP without EDNS are truncated.
const PLAIN_UDP: usize = 512;
/// Misses resolved at once; beyond, queries are dropped (clients retry).
const MAX_PENDING: usize = 1024;
/// TCP connections served at once.
const MAX_TCP: usize = 64;
/// An idle TCP connection is closed after this.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// UDP queries up to this size have their encoded answers remembered.
const WIRE_QUERY_MAX: usize = 512;
/// Encoded answers remembered at most.
const WIRE_CAPACITY: usize = 4096;

/// How a query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The stub's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub view: ClusterView,
    /// Cluster DNS (reached through the tunnel).
    pub cluster_dns: Vec<SocketAddr>,
    /// The laptop's own resolvers (from its resolv.conf before burrow).
    pub upstreams: Vec<SocketAddr>,
    /// Sources besides loopback that may ask (the stub's own address: a
    /// local program asking it has that source).
    pub allowed_sources: Vec<IpAddr>,
}

/// Counters shown by `burrow status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    pub failures: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub refused: u64,
    pub malformed: u64,
    pub failures: u64,
}

/// What to do with one datagram or TCP message.
#[derive(Debug)]
pub enum Step {
    /// Send this.
    Reply(Vec<u8>),
    /// Say nothing (not a query, or too short to answer).
    Drop,
    /// Not in the cache: [`Stub::resolve`] it.
    Resolve(Box<Pending>),
}

/// A query waiting for an answer from elsewhere.
#[derive(Debug)]
pub struct Pending {
    query: Message,
    key: Key,
    route: Route,
    max_size: usize,
}

/// An encoded answer and until when it is exact.
type WireAnswer = (Vec<u8>, Instant);

/// The stub.
pub struct Stub {
    view: RwLock<ClusterView>,
    cluster_dns: Vec<SocketAddr>,
    upstreams: Vec<SocketAddr>,
    allowed_sources: Vec<IpAddr>,
    cache: Mutex<Cache>,
    /// Encoded UDP answers by the query's bytes after its ID: a query
    /// byte-identical but for the ID gets the same answer but for the ID,
    /// valid until its TTLs would tick down (the hot path of a cache hit:
    /// no parsing, no encoding).
    wire: Mutex<HashMap<Vec<u8>, WireAnswer>>,
    inflight: Mutex<HashMap<Key, watch::Receiver<Option<Arc<Resolved>>>>>,
    exchange: Arc<dyn Exchange>,
    counters: Counters,
}

impl Stub {
    pub fn new(config: Config, exchange: Arc<dyn Exchange>) -> Self {
        Self {
            view: RwLock::new(config.view),
            cluster_dns: config.cluster_dns,
            upstreams: config.upstreams,
            allowed_sources: config.allowed_sources,
            cache: Mutex::default(),
            wire: Mutex::default(),
            inflight: Mutex::default(),
            exchange,
            counters: Counters::default(),
        }
    }

    /// Replaces the known namespaces (`None`: unknown).
    pub fn set_namespaces(&self, namespaces: Option<std::collections::HashSet<String>>) {
        if let Ok(mut v) = self.view.write() {
            v.namespaces = namespaces;
        }
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    fn allowed(&self, src: IpAddr) -> bool {
        src.is_loopback()
            || self.allowed_sources.contains(&src)
            || matches!(src, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
    }

    /// Everything up to a cache miss, synchronously.
    pub fn step(&self, bytes: &[u8], src: IpAddr, transport: Transport, now: Instant) -> Step {
        // A response (QR set) or fewer bytes than a header: never answer,
        // so two DNS speakers cannot be made to bounce packets.
        if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
            return Step::Drop;
        }
        if !self.allowed(src) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Step::Reply(header_only(bytes, ResponseCode::Refused));
        }
        let remember = transport == Transport::Udp && bytes.len() <= WIRE_QUERY_MAX;
        if remember && let Some(r) = self.wire_hit(bytes, now) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Step::Reply(r);
        }
        let query = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                return Step::Reply(header_only(bytes, ResponseCode::FormErr));
            }
        };
        if query.metadata.op_code != OpCode::Query {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Step::Reply(header_only(bytes, ResponseCode::NotImp));
        }
        if query.queries.len() != 1 || !query.answers.is_empty() {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            return Step::Reply(header_only(bytes, ResponseCode::FormErr));
        }
        let q = &query.queries[0];
        let qtype = q.query_type();
        if q.query_class() != DNSClass::IN
            || matches!(
                qtype,
                RecordType::AXFR | RecordType::IXFR | RecordType::ANY | RecordType::OPT
            )
        {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Step::Reply(header_only(bytes, ResponseCode::Refused));
        }
        let max_size = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => match &query.edns {
                Some(e) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
                None => PLAIN_UDP,
            },
        };
        let key: Key = (q.name().to_lowercase(), qtype);
        let cached = self.cache.lock().ok().and_then(|c| c.get_until(&key, now));
        if let Some((answer, age, until)) = cached {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            let r = respond(&query, &answer, age, max_size);
            if remember {
                self.wire_put(bytes, &r, until, now);
            }
            return Step::Reply(r);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let route = match self.view.read() {
            Ok(v) => v.route(q.name()),
            Err(_) => Route::Upstream,
        };
        Step::Resolve(Box::new(Pending {
            query,
            key,
            route,
            max_size,
        }))
    }

    fn wire_hit(&self, query: &[u8], now: Instant) -> Option<Vec<u8>> {
        let wire = self.wire.lock().ok()?;
        let (answer, until) = wire.get(&query[2..])?;
        if now >= *until {
            return None;
        }
        let mut r = answer.clone();
        r[..2].copy_from_slice(&query[..2]);
        Some(r)
    }

    fn wire_put(&self, query: &[u8], answer: &[u8], until: Instant, now: Instant) {
        if answer.len() < 12 {
            return;
        }
        let Ok(mut wire) = self.wire.lock() else {
            return;
        };
        if wire.len() >= WIRE_CAPACITY {
            wire.retain(|_, (_, u)| *u > now);
            if wire.len() >= WIRE_CAPACITY {
                wire.clear();
            }
        }
        wire.insert(query[2..].to_vec(), (answer.to_vec(), until));
    }

    /// Answers a miss: one lookup per name and type at a time, the others
    /// asking the same wait for it.
    pub async fn resolve(&self, p: Box<Pending>) -> Vec<u8> {
        let answer = self.single_flight(&p).await;
        respond(&p.query, &answer, 0, p.max_size)
    }

    /// [`Stub::step`] then, on a miss, [`Stub::resolve`].
    pub async fn handle(&self, bytes: &[u8], src: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        match self.step(bytes, src, transport, Instant::now()) {
            Step::Reply(r) => Some(r),
            Step::Drop => None,
            Step::Resolve(p) => Some(self.resolve(p).await),
        }
    }

    async fn single_flight(&self, p: &Pending) -> Arc<Resolved> {
        enum Role {
            Leader(watch::Sender<Option<Arc<Resolved>>>),
            Waiter(watch::Receiver<Option<Arc<Resolved>>>),
            Alone,
        }
        let role = match self.inflight.lock() {
            Ok(mut inflight) => match inflight.get(&p.key) {
                Some(rx) => Role::Waiter(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(p.key.clone(), rx);
                    Role::Leader(tx)
                }
            },
            Err(_) => Role::Alone,
        };
        match role {
            Role::Leader(tx) => {
                let guard = Leader {
                    stub: self,
                    key: &p.key,
                };
                let answer = Arc::new(self.lookup(&p.route, &p.key).await);
                tracing::debug!(
                    name = %p.key.0,
                    qtype = %p.key.1,
                    route = p.route.label(),
                    rcode = %answer.rcode,
                    answers = answer.answers.len(),
                    "DNS lookup"
                );
                if let Ok(mut c) = self.cache.lock() {
                    c.put(p.key.clone(), answer.clone(), Instant::now());
                }
                drop(guard);
                let _ = tx.send(Some(answer.clone()));
                answer
            }
            Role::Waiter(mut rx) => {
                let got = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match got {
                    Some(answer) => answer,
                    // The leader went away without an answer: ask ourselves.
                    None => Arc::new(self.lookup(&p.route, &p.key).await),
                }
            }
            Role::Alone => Arc::new(self.lookup(&p.route, &p.key).await),
        }
    }

    async fn ask(&self, servers: &[SocketAddr], name: &Name, qtype: RecordType) -> Resolved {
        match self.exchange.exchange(servers, name, qtype).await {
            Ok(m) => Resolved {
                rcode: m.metadata.response_code,
                answers: m.answers,
                authorities: m.authorities,
                ask: name.clone(),
            },
            Err(e) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("DNS {name} {qtype}: {e}");
                Resolved::failure(name.clone())
            }
        }
    }

    async fn lookup(&self, route: &Route, key: &Key) -> Resolved {
        let (qname, qtype) = (&key.0, key.1);
        match route {
            Route::Upstream => self.ask(&self.upstreams, qname, qtype).await,
            Route::Cluster(ask) => self.cluster(ask, qtype).await,
            Route::ClusterThenUpstream(ask) => {
                let r = self.cluster(ask, qtype).await;
                if matches!(r.rcode, ResponseCode::NXDomain | ResponseCode::ServFail)
                    && !self.upstreams.is_empty()
                {
                    self.ask(&self.upstreams, qname, qtype).await
                } else {
                    r
                }
            }
        }
    }

    /// Asks cluster DNS; an AAAA question for a name that only has an A
    /// record is answered NOERROR with no records (not NXDOMAIN), so
    /// clients asking both do not give up.
    async fn cluster(&self, ask: &Name, qtype: RecordType) -> Resolved {
        let r = self.ask(&self.cluster_dns, ask, qtype).await;
        if qtype == RecordType::AAAA && r.rcode == ResponseCode::NXDomain {
            let a = self.ask(&self.cluster_dns, ask, RecordType::A).await;
            if a.rcode == ResponseCode::NoError && !a.answers.is_empty() {
                return Resolved {
                    rcode: ResponseCode::NoError,
                    answers: Vec::new(),
                    authorities: Vec::new(),
                    ask: ask.clone(),
                };
            }
        }
        r
    }
}

/// Removes the single-flight entry however the leader ends (also when its
/// task is dropped), so later queries never wait on a dead lookup.
struct Leader<'a> {
    stub: &'a Stub,
    key: &'a Key,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.stub.inflight.lock() {
            m.remove(self.key);
        }
    }
}

/// An answer with only the query's header: its ID, opcode and RD, QR set,
/// no records (the question may be what was malformed).
fn header_only(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut r = vec![0u8; 12];
    r[0] = query[0];
    r[1] = query[1];
    // QR, the query's opcode, RD.
    r[2] = 0x80 | (query[2] & 0x79);
    // RA, the rcode (low four bits).
    r[3] = 0x80 | (rcode.low() & 0x0f);
    r
}

/// Fits `answer` to `query`: its ID, question (as the client spelt it),
/// records renamed from the name asked of cluster DNS to the client's,
/// TTLs less the answer's age, EDNS when the query had it; truncated
/// (TC, no records) when larger than `max_size`.
fn respond(query: &Message, answer: &Resolved, age: u32, max_size: usize) -> Vec<u8> {
    let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = query.metadata.checking_disabled;
    m.metadata.response_code = answer.rcode;
    m.queries = query.queries.clone();
    let qname = query
        .queries
        .first()
        .map(|q| q.name().clone())
        .unwrap_or_else(Name::root);
    let fit = |r: &Record| {
        let mut r = r.clone();
        if r.name.eq_ignore_root_case(&answer.ask) {
            r.name = qname.clone();
        }
        r.ttl = r.ttl.saturating_sub(age);
        r
    };
    m.answers = answer.answers.iter().map(fit).collect();
    m.authorities = answer.authorities.iter().map(fit).collect();
    if query.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
    }
    match m.to_vec() {
        Ok(b) if b.len() <= max_size => b,
        Ok(_) => m
            .truncate()
            .to_vec()
            .unwrap_or_else(|_| servfail(query.metadata.id)),
        Err(e) => {
            tracing::warn!("cannot encode the answer for {qname}: {e}");
            servfail(query.metadata.id)
        }
    }
}

fn servfail(id: u16) -> Vec<u8> {
    let mut r = vec![0u8; 12];
    r[..2].copy_from_slice(&id.to_be_bytes());
    r[2] = 0x81;
    r[3] = 0x80 | ResponseCode::ServFail.low();
    r
}

/// The stub's UDP and TCP servers; stop with [`Server::stop`] (or drop).
pub struct Server {
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds UDP and TCP at `addr` (both, before returning) and serves.
    pub async fn start(stub: Arc<Stub>, addr: SocketAddr) -> std::io::Result<Self> {
        let udp = Arc::new(UdpSocket::bind(addr).await?);
        let addr = udp.local_addr()?;
        let tcp = TcpListener::bind(addr).await?;
        let tasks = vec![
            // In the caller's span (the daemon's session).
            tokio::spawn(serve_udp(stub.clone(), udp).in_current_span()),
            tokio::spawn(serve_tcp(stub, tcp).in_current_span()),
        ];
        Ok(Self { addr, tasks })
    }

    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_udp(stub: Arc<Stub>, sock: Arc<UdpSocket>) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // E.g. ICMP errors surfacing from an earlier send.
                tracing::debug!("DNS stub UDP receive: {e}");
                continue;
            }
        };
        match stub.step(&buf[..n], src.ip(), Transport::Udp, Instant::now()) {
            Step::Reply(r) => {
                let _ = sock.send_to(&r, src).await;
            }
            Step::Drop => {}
            Step::Resolve(p) => {
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    continue;
                };
                let (stub, sock) = (stub.clone(), sock.clone());
                tokio::spawn(
                    async move {
                        let r = stub.resolve(p).await;
                        let _ = sock.send_to(&r, src).await;
                        drop(permit);
                    }
                    .in_current_span(),
                );
            }
        }
    }
}

async fn serve_tcp(stub: Arc<Stub>, listener: TcpListener) {
    let conns = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let Ok((stream, src)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let stub = stub.clone();
        tokio::spawn(
            async move {
                let _ = serve_tcp_conn(&stub, stream, src.ip()).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

async fn serve_tcp_conn(stub: &Stub, mut s: TcpStream, src: IpAddr) -> std::io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return Ok(());
        };
        let mut buf = vec![0u8; usize::from(len?)];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let Some(r) = stub.handle(&buf, src, Transport::Tcp).await else {
            return Ok(());
        };
        let Ok(n) = u16::try_from(r.len()) else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(r.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&r);
        s.write_all(&out).await?;
    }
}
