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
//! - [`Dial`] opens a byte stream to an [`Upstream`]; the gateway implements
//!   it (laptops through the tunnel, cluster pods with TCP).
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
//!   backpressure); `Expect: 100-continue` is answered by hyper when the
//!   upstream starts reading the body, and forwarded.
//! - An HTTP/1.1 `Upgrade` (WebSocket, h2c) or `CONNECT` is routed like any
//!   request, on a fresh upstream connection; after the upstream's
//!   `101`/`2xx` the two connections are spliced as raw bytes.
//! - Hop-by-hop headers (`Connection` and the names it lists, `Keep-Alive`,
//!   `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE` other than
//!   `trailers`) are dropped in both directions; every other header,
//!   `Host` included, and header case (HTTP/1) are kept. `Proxy-Authorization`
//!   is kept: callers cannot see the gateway, so it is meant for the
//!   upstream. No `X-Forwarded-For` is added.
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
use tokio::sync::watch;

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

/// Requests whose `header` has exactly `value` go to `to`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub header: HeaderName,
    pub value: HeaderValue,
    pub to: Upstream,
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
        self.rules
            .iter()
            .find(|r| headers.get_all(&r.header).iter().any(|v| v == r.value))
            .map_or(&self.fallback, |r| &r.to)
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
        .preserve_header_case(true)
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

/// Answers every request on `conn` with 502 naming `to`, then closes.
async fn serve_bad_gateway(conn: BoxIo, to: &Upstream) -> Result<(), Error> {
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
    H1(http1::SendRequest<Incoming>),
    H2(http2::SendRequest<Incoming>),
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
        let to = rules.route(req.headers());
        tracing::trace!(method = %req.method(), uri = %req.uri(), upstream = %to, "routing");
        if req.version() != Version::HTTP_2 && is_upgrade(&req) {
            return self.upgrade(req, to).await;
        }
        strip_hop_by_hop(req.headers_mut());
        match self.forward(req, to).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.boxed())
            }
            Err(e) => {
                warn_nothing_answered(to, &e);
                bad_gateway_response(to)
            }
        }
    }

    /// Sends `req` on this connection's upstream connection to `to`, dialling
    /// it first if needed; a stale one is replaced once if `req` was not
    /// sent on it.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        to: &Upstream,
    ) -> Result<Response<Incoming>, Failure> {
        let h2 = req.version() == Version::HTTP_2;
        let slot = self.slot(to);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut guard = slot.lock().await;
            let (sender, fresh) = match guard.take() {
                Some(s) if attempt == 1 && !s.is_closed() => (s, false),
                _ => (self.connect(to, h2).await?, true),
            };
            let result = match sender {
                Sender::H1(mut s) => {
                    // Waits for the previous response on it to finish.
                    if let Err(e) = s.ready().await {
                        if fresh {
                            return Err(Failure::Upstream(e));
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
                        Err(e) if fresh => return Err(Failure::Upstream(e)),
                        Err(_) => continue,
                    }
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(Failure::Upstream(e.into_error())),
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
                .preserve_header_case(true)
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
    async fn upgrade(&self, mut req: Request<Incoming>, to: &Upstream) -> Response<Body> {
        let downstream = hyper::upgrade::on(&mut req);
        let is_connect = req.method() == Method::CONNECT;
        let sent = async {
            let io = dial_upstream(&*self.dial, to)
                .await
                .map_err(Failure::Dial)?;
            let (mut sender, conn) = http1::Builder::new()
                .preserve_header_case(true)
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

async fn dial_upstream(dial: &dyn Dial, to: &Upstream) -> io::Result<BoxIo> {
    match tokio::time::timeout(DIAL_TIMEOUT, dial.dial(to)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", DIAL_TIMEOUT.as_secs()),
        )),
    }
}

fn warn_nothing_answered(to: &Upstream, why: &dyn fmt::Display) {
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
struct Replay {
    prefix: Bytes,
    inner: BoxIo,
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
}
