//! Header routing: an HTTP reverse proxy that picks an upstream request by
//! request (HTTP/1.1) or stream by stream (HTTP/2) from one header, for
//! personal reroutes ("requests carrying `x-burrow-route: alice` go to
//! Alice's laptop, the rest to the cluster's pods").
//!
//! Interface (the gateway's reroute listeners drive it):
//!
//! - [`serve`]`(conn, rules, dial)` serves one accepted downstream connection
//!   until it closes. The protocol is told by the first bytes (the HTTP/2
//!   preface means HTTP/2 with prior knowledge, anything else HTTP/1.x).
//!   [`Rules`] are read from the `watch` for every request, so a rule added
//!   or removed applies to the next request, also on a keep-alive
//!   connection.
//!   It returns an error only for the downstream connection itself (a
//!   malformed request, a reset): worth a `debug` line, no more.
//! - [`Dial`] opens a byte stream to an [`Upstream`]; the gateway implements
//!   it (laptops through the tunnel, cluster pods with TCP). Callers should
//!   set `TCP_NODELAY` on accepted and dialled sockets: small chunked
//!   bodies would otherwise wait for Nagle.
//! - [`splice_or_502`]`(conn, dial, to)` is the global (non-header) HTTP
//!   mode: raw bytes both ways with no parsing, except that a downstream
//!   whose upstream cannot be dialled, or closes before answering, gets a
//!   `502 Bad Gateway`.
//!
//! Behaviour:
//!
//! - Matching ([`Rules::route`]): the header name is case-insensitive, the
//!   value exact (any of several occurrences may match); the first matching
//!   rule wins; no match → the fallback. The routing header itself is
//!   forwarded (the laptop's app may propagate it).
//! - HTTP/1.x downstream → HTTP/1.1 upstream; HTTP/2 downstream → HTTP/2
//!   upstream (prior knowledge), so gRPC and trailers pass unchanged. Each
//!   downstream connection keeps at most one upstream connection per
//!   upstream and reuses it (HTTP/2: shared by its streams); one that went
//!   stale is replaced once per request, if the request was not sent yet.
//! - Bodies stream through hyper in both directions (no buffering, its
//!   backpressure); `Expect: 100-continue` is answered by the proxy's own
//!   `100 Continue` once the request is forwarded and its body first read
//!   (the header is forwarded too; the upstream's interim answer is
//!   dropped). If the upstream is down, the 502 comes without the body
//!   being read.
//! - An HTTP/1.1 `Upgrade` (WebSocket, h2c) or `CONNECT` is routed like any
//!   request, on a fresh upstream connection; after the upstream's
//!   `101`/`2xx` the two connections are spliced as raw bytes.
//! - Hop-by-hop headers (`Connection` and the names it lists, `Keep-Alive`,
//!   `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE` other than
//!   `trailers`) are dropped in both directions; every other header,
//!   `Host` included, is kept. `Proxy-Authorization` is kept: callers
//!   cannot see the gateway, so it is meant for the upstream. No
//!   `X-Forwarded-For` is added. Header names leave in lower case, as over
//!   HTTP/2 and from most proxies (keeping HTTP/1 case cost about 15% more
//!   CPU per request in `bench/httproute.sh`).
//! - The upstream cannot be dialled (or does not answer the dial within
//!   [`DIAL_TIMEOUT`]), or closes or resets before its response head → the
//!   downstream gets `502 Bad Gateway` at once, with a one-line text body
//!   naming the upstream (`burrow: nothing answered on laptop alice`), and a
//!   `warn` log line. Malformed requests get hyper's `400` and the connection
//!   closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use burrow_api::{Fallback, Protocol};

/// A byte stream to or from a peer.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// A laptop's local server, reached through its tunnel.
    Laptop { name: String, addr: SocketAddr },
    /// The cluster's own pods (the shadow Service).
    Cluster(SocketAddr),
}

impl Upstream {
    /// The body of the 502 a caller gets when nothing answered.
    pub fn nothing_answered(&self) -> String {
        match self {
            Upstream::Laptop { name, .. } => format!("burrow: nothing answered on laptop {name}\n"),
            Upstream::Cluster(addr) => format!("burrow: nothing answered on {addr}\n"),
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Laptop { name, addr } => write!(f, "laptop {name} ({addr})"),
            Upstream::Cluster(addr) => write!(f, "cluster {addr}"),
        }
    }
}

/// What [`Dial::dial`] returns.
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send + 'a>>;

/// Opens a byte stream to an upstream (the gateway implements it: laptops
/// through the tunnel, cluster via TCP).
pub trait Dial: Send + Sync + 'static {
    fn dial(&self, to: &Upstream) -> DialFuture<'_>;
}

/// Requests whose `header` has exactly `value` go to `to`. When `to` (a
/// laptop) cannot be reached, they go to the fallback ([`Rules`]) if they
/// were not sent yet or may be sent again (idempotent, no body); so they
/// do when nothing listens there, with `Fallback::Pods`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub header: HeaderName,
    pub value: HeaderValue,
    pub to: Upstream,
    pub fallback: Fallback,
}

/// The rules of one rerouted Service port, first match wins.
#[derive(Clone, Debug)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// Where requests matching no rule go (the original pods).
    pub fallback: Upstream,
}

impl Rules {
    /// Everything to `fallback`.
    pub fn new(fallback: Upstream) -> Self {
        Self {
            rules: Vec::new(),
            fallback,
        }
    }

    /// The upstream for a request with these headers.
    pub fn route(&self, headers: &HeaderMap) -> &Upstream {
        self.matching(headers).map_or(&self.fallback, |r| &r.to)
    }

    /// The first rule these headers match.
    pub fn matching(&self, headers: &HeaderMap) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| headers.get_all(&r.header).iter().any(|v| v == r.value))
    }
}

/// Why a downstream connection ended badly. Upstream failures are not
/// errors here: the downstream got a 502 for them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("downstream connection: {0}")]
    Downstream(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("splicing with {upstream}: {source}")]
    Splice {
        upstream: Upstream,
        #[source]
        source: io::Error,
    },
}

/// How long a dial may take before the caller gets a 502.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Downstream bytes kept in [`splice_or_502`] until the upstream first
/// answers, so a 502 can still be served for them.
const REPLAY_LIMIT: usize = 64 * 1024;

/// HTTP/2 flow-control windows, both sides: hyper's 64 KiB default stalls a
/// large gRPC message on every round trip.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

type Body = BoxBody<Bytes, hyper::Error>;

static SERVER: LazyLock<auto::Builder<TokioExecutor>> = LazyLock::new(|| {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // The upstream's Date header passes through; none is invented.
        .auto_date_header(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .auto_date_header(false);
    builder
});

/// Serves one accepted downstream connection until it closes, routing each
/// request (HTTP/1.1) or stream (HTTP/2) by `rules`, read afresh for each.
pub async fn serve(
    conn: BoxIo,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
) -> Result<(), Error> {
    let proxy = Arc::new(Proxy {
        rules,
        dial,
        pool: Mutex::new(HashMap::new()),
    });
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req).await) }
    });
    SERVER
        .serve_connection_with_upgrades(TokioIo::new(conn), service)
        .await
        .map_err(Error::Downstream)
}

/// Global HTTP mode: dials `to` and splices raw bytes. If the dial fails, or
/// the upstream closes before sending a byte, the downstream's request is
/// answered with a 502 (HTTP/1.x or HTTP/2, whichever it spoke).
pub async fn splice_or_502(conn: BoxIo, dial: &dyn Dial, to: &Upstream) -> Result<(), Error> {
    let mut up = match dial_upstream(dial, to).await {
        Ok(up) => up,
        Err(e) => {
            warn_nothing_answered(to, &e);
            return serve_bad_gateway(conn, to).await;
        }
    };
    let mut down = conn;
    let splice_err = |source| Error::Splice {
        upstream: to.clone(),
        source,
    };
    // Until the upstream answers, keep what the downstream sent, so that if
    // it closes without a word the request can still be answered.
    let mut sent = BytesMut::new();
    let mut replayable = true;
    let mut down_open = true;
    let mut buf = vec![0u8; 16 * 1024];
    let mut first = vec![0u8; 16 * 1024];
    let answered = loop {
        tokio::select! {
            r = down.read(&mut buf), if down_open => {
                let n = r.map_err(splice_err)?;
                if n == 0 {
                    down_open = false;
                    if up.shutdown().await.is_err() {
                        break None;
                    }
                    continue;
                }
                if replayable && sent.len() + n <= REPLAY_LIMIT {
                    sent.extend_from_slice(&buf[..n]);
                } else {
                    replayable = false;
                    sent = BytesMut::new();
                }
                if up.write_all(&buf[..n]).await.is_err() {
                    break None;
                }
            }
            r = up.read(&mut first) => match r {
                Ok(n) if n > 0 => break Some(n),
                _ => break None,
            },
        }
    };
    match answered {
        Some(n) => {
            down.write_all(&first[..n]).await.map_err(splice_err)?;
            drop((buf, first, sent));
            tokio::io::copy_bidirectional(&mut down, &mut up)
                .await
                .map_err(splice_err)?;
            Ok(())
        }
        None => {
            warn_nothing_answered(to, &"closed the connection before answering");
            if !replayable {
                // Too much of the request went by to answer it: close.
                return Ok(());
            }
            let replay = Replay {
                prefix: sent.freeze(),
                inner: down,
            };
            serve_bad_gateway(Box::new(replay), to).await
        }
    }
}

/// The HTTP/2 connection preface of a prior-knowledge client.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest HTTP/1 method token [`detect`] takes.
const MAX_METHOD: usize = 24;
/// How long a caller's first bytes are awaited, when a laptop did not
/// answer and only they can tell whether the caller gets a 502 or a reset.
pub const DETECT_WAIT: Duration = Duration::from_secs(1);

/// What a caller's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A method token, a space and the start of a request target.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else.
    Other,
    /// Too few bytes to tell yet.
    NeedMore,
}

impl Detected {
    pub fn is_http(self) -> bool {
        matches!(self, Detected::Http1 | Detected::Http2)
    }
}

/// Tells HTTP callers from others by their first bytes: the HTTP/2 preface
/// (`PRI * HTTP/2.0`…), or an HTTP/1 request line's start (a method token
/// of RFC 9110 token characters, a space, then a request target's first
/// character).
pub fn detect(bytes: &[u8]) -> Detected {
    let n = bytes.len().min(H2_PREFACE.len());
    if n > 0 && bytes[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    let method = bytes.iter().take_while(|b| is_tchar(**b)).count();
    if method > MAX_METHOD {
        return Detected::Other;
    }
    match (bytes.get(method), bytes.get(method + 1)) {
        (None, _) => Detected::NeedMore,
        (Some(b' '), None) if method > 0 => Detected::NeedMore,
        (Some(b' '), Some(t)) if method > 0 && t.is_ascii_graphic() => Detected::Http1,
        _ => Detected::Other,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `sent` — what a caller sent before the laptop answered — is
/// exactly one whole HTTP/1 request with an idempotent method (RFC 9110
/// §9.2.2: may be sent again when a connection fails before its answer).
pub fn safe_to_resend(sent: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = req.parse(sent) else {
        return false;
    };
    if !matches!(
        req.method,
        Some("GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
    ) {
        return false;
    }
    let mut body = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return false;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                Some(n) => body = n,
                None => return false,
            }
        }
    }
    sent.len().checked_sub(head) == Some(body)
}

/// Why a laptop did not answer a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// The laptop is not reachable: its tunnel is gone, it is unregistered,
    /// or it stopped answering (see `laptop::LAPTOP_PATIENCE`).
    Unreachable,
    /// Reachable, and nothing listens: the dial was refused, or the laptop
    /// reset the connection before a byte of answer (its forwarder resets
    /// when it cannot connect to the local port, before reading anything).
    Refused,
    /// Accepted, then closed (or failed otherwise) before answering.
    Closed,
}

impl NoAnswer {
    /// From a failed dial or a failed read or write before the answer.
    pub fn of(e: &io::Error) -> NoAnswer {
        match e.kind() {
            io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::TimedOut
            | io::ErrorKind::AddrNotAvailable => NoAnswer::Unreachable,
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => NoAnswer::Refused,
            _ => NoAnswer::Closed,
        }
    }

    /// Whether the caller goes to the pods instead, given the route's
    /// fallback (when what it sent may be sent there).
    pub fn to_pods(self, fallback: Fallback) -> bool {
        match self {
            NoAnswer::Unreachable => true,
            NoAnswer::Refused => fallback == Fallback::Pods,
            NoAnswer::Closed => false,
        }
    }
}

/// What the caller of a laptop that did not answer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The pods (the shadow Service), with what it sent replayed.
    Pods,
    /// `502 Bad Gateway` naming the laptop.
    BadGateway,
    /// A reset, as a refused connection.
    Reset,
}

/// The answer for a caller whose laptop did not answer: `why`, the
/// route's fallback, whether the caller speaks HTTP, and whether what it
/// sent may be sent to the pods (all of it is held, and it never reached a
/// program on the laptop, or is one idempotent HTTP request).
pub fn decide(why: NoAnswer, fallback: Fallback, http: bool, resendable: bool) -> Answer {
    if why.to_pods(fallback) && resendable {
        Answer::Pods
    } else if http {
        Answer::BadGateway
    } else {
        Answer::Reset
    }
}

/// A global route: every connection to the laptop; `pods` when it cannot
/// be reached (and when nothing listens there, with `Fallback::Pods`).
#[derive(Debug, Clone)]
pub struct Global {
    pub laptop: Upstream,
    pub pods: Upstream,
    pub protocol: Protocol,
    pub fallback: Fallback,
}

/// Serves one caller of a global route. The laptop is dialled at once
/// (server-first protocols are not delayed); what the caller sends is
/// held until the laptop's first byte, so that if the laptop does not
/// answer the caller can still go to the pods ([`decide`]) or get a 502.
/// Only then, and only in `auto` mode, are the caller's first bytes
/// awaited ([`DETECT_WAIT`]) to tell HTTP from other bytes.
pub async fn global(conn: TcpStream, dial: &dyn Dial, route: &Global) -> Result<(), Error> {
    let mut down = conn;
    let mut held = BytesMut::with_capacity(16 * 1024);
    let mut down_open = true;
    let splice_err = |to: &Upstream| {
        let to = to.clone();
        move |source| Error::Splice {
            upstream: to,
            source,
        }
    };
    let dialing = dial_upstream(dial, &route.laptop);
    tokio::pin!(dialing);
    let dialed = loop {
        tokio::select! {
            r = &mut dialing => break r,
            r = down.read_buf(&mut held), if down_open && held.len() < REPLAY_LIMIT => {
                if r.map_err(splice_err(&route.laptop))? == 0 {
                    down_open = false;
                }
            }
        }
    };
    let (why, reached) = match dialed {
        Ok(mut up) => match first_answer(&mut down, &mut up, &mut held, &mut down_open).await {
            Ok(first) => {
                down.write_all(&first)
                    .await
                    .map_err(splice_err(&route.laptop))?;
                drop(held);
                tokio::io::copy_bidirectional(&mut down, &mut up)
                    .await
                    .map_err(splice_err(&route.laptop))?;
                return Ok(());
            }
            Err(FirstAnswer::Downstream(e)) => return Err(splice_err(&route.laptop)(e)),
            Err(FirstAnswer::None(why)) => (why, true),
        },
        Err(e) => {
            let why = NoAnswer::of(&e);
            if why != NoAnswer::Unreachable {
                warn_nothing_answered(&route.laptop, &e);
            } else {
                tracing::debug!(upstream = %route.laptop, "laptop unreachable ({e}): to the pods");
            }
            (why, false)
        }
    };
    let replayable = held.len() <= REPLAY_LIMIT;
    // Resent without looking: nothing reached a program on the laptop.
    let blind = replayable && (!reached || why == NoAnswer::Refused);
    let answer = if why.to_pods(route.fallback) && blind {
        Answer::Pods
    } else {
        let http = match route.protocol {
            Protocol::Http => true,
            // UDP ports never reach a TCP listener; as bytes if one did.
            Protocol::Tcp | Protocol::Udp => false,
            Protocol::Auto => detect_caller(&mut down, &mut held, &mut down_open).await,
        };
        let resendable = blind || (replayable && http && safe_to_resend(&held));
        decide(why, route.fallback, http, resendable)
    };
    if reached && why != NoAnswer::Refused {
        warn_nothing_answered(
            &route.laptop,
            &format!("{why:?} before answering; caller: {answer:?}"),
        );
    }
    match answer {
        Answer::Pods => to_pods(down, held, dial, route).await,
        Answer::BadGateway if !replayable => {
            // Too much of the request went by to answer it: close.
            drop(down);
            Ok(())
        }
        Answer::BadGateway => {
            let replay = Replay {
                prefix: held.freeze(),
                inner: Box::new(down),
            };
            serve_bad_gateway(Box::new(replay), &route.laptop).await
        }
        Answer::Reset => {
            reset(down);
            Ok(())
        }
    }
}

/// Sends a caller of a laptop that did not answer to the pods, replaying
/// what it sent.
async fn to_pods(
    mut down: TcpStream,
    held: BytesMut,
    dial: &dyn Dial,
    route: &Global,
) -> Result<(), Error> {
    let splice_err = |source| Error::Splice {
        upstream: route.pods.clone(),
        source,
    };
    let mut up = match dial_upstream(dial, &route.pods).await {
        Ok(up) => up,
        Err(e) => {
            warn_nothing_answered(&route.pods, &e);
            if route.protocol != Protocol::Tcp && detect(&held).is_http() {
                let replay = Replay {
                    prefix: held.freeze(),
                    inner: Box::new(down),
                };
                return serve_bad_gateway(Box::new(replay), &route.pods).await;
            }
            reset(down);
            return Ok(());
        }
    };
    up.write_all(&held).await.map_err(splice_err)?;
    drop(held);
    tokio::io::copy_bidirectional(&mut down, &mut up)
        .await
        .map_err(splice_err)?;
    Ok(())
}

/// Why [`first_answer`] got none.
enum FirstAnswer {
    None(NoAnswer),
    Downstream(io::Error),
}

/// Hands `held` to `up`, then passes the caller's bytes on (still holding
/// them, up to [`REPLAY_LIMIT`]) until the laptop's first bytes, which it
/// returns.
async fn first_answer(
    down: &mut TcpStream,
    up: &mut BoxIo,
    held: &mut BytesMut,
    down_open: &mut bool,
) -> Result<Vec<u8>, FirstAnswer> {
    if let Err(e) = up.write_all(held).await {
        return Err(FirstAnswer::None(NoAnswer::of(&e)));
    }
    if !*down_open && up.shutdown().await.is_err() {
        return Err(FirstAnswer::None(NoAnswer::Closed));
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut first = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = down.read(&mut buf), if *down_open => {
                let n = r.map_err(FirstAnswer::Downstream)?;
                if n == 0 {
                    *down_open = false;
                    if let Err(e) = up.shutdown().await {
                        return Err(FirstAnswer::None(NoAnswer::of(&e)));
                    }
                    continue;
                }
                if held.len() <= REPLAY_LIMIT {
                    // Past the limit it stays too long to replay.
                    held.extend_from_slice(&buf[..n]);
                }
                if let Err(e) = up.write_all(&buf[..n]).await {
                    return Err(FirstAnswer::None(NoAnswer::of(&e)));
                }
            }
            r = up.read(&mut first) => return match r {
                Ok(n) if n > 0 => {
                    first.truncate(n);
                    Ok(first)
                }
                Ok(_) => Err(FirstAnswer::None(NoAnswer::Closed)),
                Err(e) => Err(FirstAnswer::None(NoAnswer::of(&e))),
            },
        }
    }
}

/// Whether the caller speaks HTTP, by its first bytes; waits for them at
/// most [`DETECT_WAIT`] (a caller that sends nothing is not HTTP).
async fn detect_caller(down: &mut TcpStream, held: &mut BytesMut, down_open: &mut bool) -> bool {
    let deadline = tokio::time::Instant::now() + DETECT_WAIT;
    loop {
        match detect(held) {
            Detected::NeedMore if *down_open && held.len() < REPLAY_LIMIT => {}
            d => return d.is_http(),
        }
        match tokio::time::timeout_at(deadline, down.read_buf(held)).await {
            Ok(Ok(0)) | Ok(Err(_)) => *down_open = false,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Closes with a RST (SO_LINGER 0), as a refused connection would.
pub fn reset(conn: TcpStream) {
    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// Answers every request on `conn` with 502 naming `to`, then closes.
pub(crate) async fn serve_bad_gateway(conn: BoxIo, to: &Upstream) -> Result<(), Error> {
    let service = service_fn(|req: Request<Incoming>| {
        let mut resp = bad_gateway_response(to);
        if req.version() != Version::HTTP_2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        async move { Ok::<_, Infallible>(resp) }
    });
    let serving = SERVER.serve_connection(TokioIo::new(conn), service);
    // An HTTP/2 caller might keep the connection open: do not linger.
    match tokio::time::timeout(Duration::from_secs(30), serving).await {
        Ok(r) => r.map_err(Error::Downstream),
        Err(_) => Ok(()),
    }
}

/// One downstream connection's routing state.
struct Proxy {
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
    /// One upstream connection per upstream, dialled on first use; the
    /// async lock makes concurrent HTTP/2 streams share one dial.
    pool: Mutex<HashMap<Upstream, Arc<tokio::sync::Mutex<Option<Sender>>>>>,
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// Why a request got a 502.
enum Failure {
    Dial(io::Error),
    Handshake(hyper::Error),
    Upstream(hyper::Error),
}

impl Failure {
    fn no_answer(&self) -> NoAnswer {
        let e: &(dyn std::error::Error + 'static) = match self {
            Failure::Dial(e) => return NoAnswer::of(e),
            Failure::Handshake(e) | Failure::Upstream(e) => e,
        };
        let mut source = Some(e);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return NoAnswer::of(io);
            }
            source = e.source();
        }
        NoAnswer::Closed
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Dial(e) => write!(f, "dial failed: {e}"),
            Failure::Handshake(e) => write!(f, "HTTP handshake failed: {e}"),
            Failure::Upstream(e) => write!(f, "no response: {e}"),
        }
    }
}

impl Proxy {
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let rules = self.rules.borrow().clone();
        let rule = rules.matching(req.headers());
        let to = rule.map_or(&rules.fallback, |r| &r.to);
        tracing::debug!(
            method = %req.method(),
            path = req.uri().path(),
            header = rule.map(|r| r.header.as_str()),
            upstream = %to,
            "{}",
            if rule.is_some() { "header matched: to the laptop" } else { "no header match: to the pods" }
        );
        if req.version() != Version::HTTP_2 && is_upgrade(&req) {
            return self.upgrade(req, to, &rules.fallback).await;
        }
        strip_hop_by_hop(req.headers_mut());
        let Some(rule) = rule else {
            return respond(self.forward(req.map(BodyExt::boxed), to).await, to);
        };
        // To a laptop: if it cannot take the request, the pods may.
        let again = resend_copy(&req);
        match self.forward(req.map(BodyExt::boxed), &rule.to).await {
            Ok(resp) => respond(Ok(resp), to),
            Err((failure, unsent)) => {
                let why = failure.no_answer();
                // Never written to the laptop (its connection failed
                // first): with `Fallback::Pods` the pods take it, however
                // the laptop ended the connection.
                let to_pods = why.to_pods(rule.fallback)
                    || (unsent.is_some() && rule.fallback == Fallback::Pods);
                let retry = unsent.or(again);
                match retry {
                    Some(req) if to_pods => {
                        tracing::debug!(upstream = %rule.to, ?why, "{failure}: to the pods");
                        respond(self.forward(req, &rules.fallback).await, &rules.fallback)
                    }
                    _ => respond(Err((failure, None)), to),
                }
            }
        }
    }

    /// Sends `req` on this connection's upstream connection to `to`, dialling
    /// it first if needed; a stale one is replaced once if `req` was not
    /// sent on it. A failure hands `req` back when it was not sent.
    async fn forward(
        &self,
        mut req: Request<Body>,
        to: &Upstream,
    ) -> Result<Response<Incoming>, (Failure, Option<Request<Body>>)> {
        let h2 = req.version() == Version::HTTP_2;
        let slot = self.slot(to);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut guard = slot.lock().await;
            let (sender, fresh) = match guard.take() {
                Some(s) if attempt == 1 && !s.is_closed() => (s, false),
                _ => match self.connect(to, h2).await {
                    Ok(s) => (s, true),
                    Err(f) => return Err((f, Some(req))),
                },
            };
            let result = match sender {
                Sender::H1(mut s) => {
                    // Waits for the previous response on it to finish.
                    if let Err(e) = s.ready().await {
                        if fresh {
                            return Err((Failure::Upstream(e), Some(req)));
                        }
                        continue;
                    }
                    let sending = s.try_send_request(req);
                    *guard = Some(Sender::H1(s));
                    drop(guard);
                    sending.await
                }
                Sender::H2(mut s) => {
                    *guard = Some(Sender::H2(s.clone()));
                    drop(guard);
                    match s.ready().await {
                        Ok(()) => s.try_send_request(req).await,
                        Err(e) if fresh => return Err((Failure::Upstream(e), Some(req))),
                        Err(_) => continue,
                    }
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    unsent => return Err((Failure::Upstream(e.into_error()), unsent)),
                },
            }
        }
    }

    fn slot(&self, to: &Upstream) -> Arc<tokio::sync::Mutex<Option<Sender>>> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = pool.get(to) {
            return slot.clone();
        }
        pool.entry(to.clone()).or_default().clone()
    }

    async fn connect(&self, to: &Upstream, h2: bool) -> Result<Sender, Failure> {
        let io = TokioIo::new(
            dial_upstream(&*self.dial, to)
                .await
                .map_err(Failure::Dial)?,
        );
        let to = to.clone();
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .handshake(io)
                .await
                .map_err(Failure::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(upstream = %to, "HTTP/2 upstream connection ended: {e}");
                }
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(Failure::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(upstream = %to, "HTTP/1 upstream connection ended: {e}");
                }
            });
            Ok(Sender::H1(sender))
        }
    }

    /// An HTTP/1 `Upgrade` or `CONNECT`: forwarded on a connection of its
    /// own; once the upstream agrees, both sides are spliced as raw bytes.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        to: &Upstream,
        pods: &Upstream,
    ) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let is_connect = req.method() == Method::CONNECT;
        let mut to = to;
        let sent = async {
            let io = match dial_upstream(&*self.dial, to).await {
                // A laptop that cannot be reached: the pods take it.
                Err(e) if NoAnswer::of(&e) == NoAnswer::Unreachable && to != pods => {
                    to = pods;
                    dial_upstream(&*self.dial, pods).await
                }
                r => r,
            }
            .map_err(Failure::Dial)?;
            let (mut sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(Failure::Handshake)?;
            tokio::spawn(conn.with_upgrades());
            sender.send_request(req).await.map_err(Failure::Upstream)
        };
        let mut resp = match sent.await {
            Ok(resp) => resp,
            Err(e) => {
                warn_nothing_answered(to, &e);
                return bad_gateway_response(to);
            }
        };
        let agreed = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (is_connect && resp.status().is_success());
        if agreed {
            let upstream = hyper::upgrade::on(&mut resp);
            let to = to.clone();
            tokio::spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((down, up)) => {
                        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                            tracing::debug!(upstream = %to, "upgraded connection ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!(upstream = %to, "upgrade not completed: {e}"),
                }
            });
        } else {
            strip_hop_by_hop(resp.headers_mut());
        }
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, body.boxed())
    }
}

/// The upstream's answer as the downstream gets it: a 502 naming `to` when
/// none came.
fn respond(
    result: Result<Response<Incoming>, (Failure, Option<Request<Body>>)>,
    to: &Upstream,
) -> Response<Body> {
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err((e, _)) => {
            warn_nothing_answered(to, &e);
            bad_gateway_response(to)
        }
    }
}

/// A copy of `req` to send again should its upstream fail before
/// answering: only for idempotent methods (RFC 9110 §9.2.2) without a
/// body.
fn resend_copy(req: &Request<Incoming>) -> Option<Request<Body>> {
    use hyper::body::Body as _;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

pub(crate) async fn dial_upstream(dial: &dyn Dial, to: &Upstream) -> io::Result<BoxIo> {
    match tokio::time::timeout(DIAL_TIMEOUT, dial.dial(to)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", DIAL_TIMEOUT.as_secs()),
        )),
    }
}

pub(crate) fn warn_nothing_answered(to: &Upstream, why: &dyn fmt::Display) {
    tracing::warn!(upstream = %to, "502 Bad Gateway: nothing answered on {to}: {why}");
}

fn bad_gateway_response(to: &Upstream) -> Response<Body> {
    let body = Full::new(Bytes::from(to.nothing_answered()))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An HTTP/1 request asking to leave HTTP: `Connection: upgrade` with an
/// `Upgrade` header, or `CONNECT`.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE)
            && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade")))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Drops the headers that belong to one connection, not to the message.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    // `TE: trailers` is how a gRPC client says it understands trailers; the
    // rest of TE is about this hop's transfer codings.
    if let Some(te) = headers.get(header::TE) {
        let trailers = te.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        });
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// The downstream connection with bytes already read from it put back in
/// front.
pub(crate) struct Replay {
    prefix: Bytes,
    inner: BoxIo,
}

impl Replay {
    pub(crate) fn new(prefix: Bytes, inner: BoxIo) -> Self {
        Self { prefix, inner }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laptop(name: &str) -> Upstream {
        Upstream::Laptop {
            name: name.into(),
            addr: SocketAddr::from(([198, 19, 0, 2], 3000)),
        }
    }

    fn rules() -> Rules {
        let rule = |v: &'static str, to| Rule {
            header: HeaderName::from_static("x-burrow-route"),
            value: HeaderValue::from_static(v),
            to,
            fallback: Fallback::Error,
        };
        Rules {
            rules: vec![
                rule("alice", laptop("alice")),
                rule("bob", laptop("bob")),
                rule("alice", laptop("alice-second")),
            ],
            fallback: Upstream::Cluster(SocketAddr::from(([10, 96, 0, 9], 8080))),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap_or(header::ACCEPT),
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("x")),
            );
        }
        h
    }

    #[test]
    fn first_matching_rule_wins_and_names_are_case_insensitive() {
        let rules = rules();
        assert_eq!(
            rules.route(&headers(&[("X-Burrow-Route", "alice")])),
            &laptop("alice")
        );
        assert_eq!(
            rules.route(&headers(&[("x-burrow-route", "bob")])),
            &laptop("bob")
        );
        // Several occurrences: any may match.
        assert_eq!(
            rules.route(&headers(&[
                ("x-burrow-route", "carol"),
                ("x-burrow-route", "bob")
            ])),
            &laptop("bob")
        );
    }

    #[test]
    fn values_match_exactly_else_fallback() {
        let rules = rules();
        for v in ["Alice", "alice ", "alic", "alice,bob"] {
            assert_eq!(
                rules.route(&headers(&[("x-burrow-route", v)])),
                &rules.fallback,
                "{v:?}"
            );
        }
        assert_eq!(rules.route(&HeaderMap::new()), &rules.fallback);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_the_rest_kept() {
        let mut h = headers(&[
            ("host", "echo:8080"),
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate;q=0.5"),
            ("proxy-authorization", "Basic x"),
            ("x-burrow-route", "alice"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(
            left,
            ["host", "proxy-authorization", "te", "x-burrow-route"]
        );
        assert_eq!(
            h.get(header::TE),
            Some(&HeaderValue::from_static("trailers"))
        );

        let mut h = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn upgrade_needs_both_headers_or_connect() {
        let req = |method: Method, pairs: &[(&str, &str)]| {
            let mut r = Request::new(());
            *r.method_mut() = method;
            *r.headers_mut() = headers(pairs);
            r
        };
        assert!(is_upgrade(&req(
            Method::GET,
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket")
            ]
        )));
        assert!(!is_upgrade(&req(Method::GET, &[("upgrade", "websocket")])));
        assert!(!is_upgrade(&req(Method::GET, &[("connection", "upgrade")])));
        assert!(is_upgrade(&req(Method::CONNECT, &[])));
    }

    #[test]
    fn http_callers_are_told_by_their_first_bytes() {
        for http1 in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x",
            b"OPTIONS * HTTP/1.1",
            b"CONNECT echo:443 HTTP/1.1",
            b"M-SEARCH * HTTP/1.1",
            b"GET http://echo/ HTTP/1.1",
        ] {
            assert_eq!(detect(http1), Detected::Http1, "{http1:?}");
        }
        assert_eq!(detect(H2_PREFACE), Detected::Http2);
        let mut with_frames = H2_PREFACE.to_vec();
        with_frames.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&with_frames), Detected::Http2);
        // Prefixes of either are not decided yet.
        for more in [&b""[..], b"G", b"GET", b"GET ", b"PRI * HTTP/2.0\r\n"] {
            assert_eq!(detect(more), Detected::NeedMore, "{more:?}");
        }
        // TLS, RESP, a MySQL-ish binary greeting, a line without a space,
        // two spaces, an overlong token: bytes.
        for other in [
            &[0x16u8, 0x03, 0x01, 0x02, 0x00][..],
            b"*1\r\n$4\r\nPING\r\n",
            b"\x4a\x00\x00\x00\x0a8.0",
            b"PING\r\n",
            b"GET  /",
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA / HTTP/1.1",
            b" GET /",
            b"PRI * HTTP/2.1\r\n",
        ] {
            let d = detect(other);
            assert!(
                d == Detected::Other || (other.starts_with(b"PRI") && d == Detected::Http1),
                "{other:?}: {d:?}"
            );
            assert!(!d.is_http() || other.starts_with(b"PRI"), "{other:?}");
        }
    }

    #[test]
    fn only_one_whole_idempotent_request_is_resent() {
        assert!(safe_to_resend(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n"));
        assert!(safe_to_resend(
            b"PUT /k HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi"
        ));
        for no in [
            &b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: echo\r\n",
            b"GET / HTTP/1.1\r\n\r\nGET /again HTTP/1.1\r\n\r\n",
            b"PUT /k HTTP/1.1\r\ncontent-length: 5\r\n\r\nhi",
            b"PUT /k HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"PUT /k HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            b"\x16\x03\x01",
        ] {
            assert!(!safe_to_resend(no), "{:?}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn a_laptop_that_cannot_be_reached_sends_callers_to_the_pods() {
        use io::ErrorKind::*;
        for kind in [HostUnreachable, TimedOut, NetworkUnreachable] {
            assert_eq!(NoAnswer::of(&io::Error::from(kind)), NoAnswer::Unreachable);
        }
        for kind in [ConnectionRefused, ConnectionReset] {
            assert_eq!(NoAnswer::of(&io::Error::from(kind)), NoAnswer::Refused);
        }
        assert_eq!(NoAnswer::of(&io::Error::from(BrokenPipe)), NoAnswer::Closed);

        use Answer::*;
        use Fallback::{Error as Tell, Pods as ToPods};
        // Unreachable: the pods, whatever the fallback, when what the
        // caller sent may go there; else as the protocol says.
        for fallback in [Tell, ToPods] {
            assert_eq!(decide(NoAnswer::Unreachable, fallback, true, true), Pods);
            assert_eq!(decide(NoAnswer::Unreachable, fallback, false, true), Pods);
            assert_eq!(
                decide(NoAnswer::Unreachable, fallback, true, false),
                BadGateway
            );
            assert_eq!(decide(NoAnswer::Unreachable, fallback, false, false), Reset);
        }
        // Nothing listening: told (502 or reset) unless --fallback pods.
        assert_eq!(decide(NoAnswer::Refused, Tell, true, true), BadGateway);
        assert_eq!(decide(NoAnswer::Refused, Tell, false, true), Reset);
        assert_eq!(decide(NoAnswer::Refused, ToPods, true, true), Pods);
        assert_eq!(decide(NoAnswer::Refused, ToPods, false, true), Pods);
        // Accepted and closed without a word: never resent.
        assert_eq!(decide(NoAnswer::Closed, ToPods, true, true), BadGateway);
        assert_eq!(decide(NoAnswer::Closed, ToPods, false, true), Reset);
    }
}
