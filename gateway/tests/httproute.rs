//! Header routing (`burrow_gateway::httproute`) with real sockets on
//! loopback: the proxy listens on 127.0.0.1, its `Dial` opens plain TCP
//! connections to upstream HTTP servers (hyper, HTTP/1.1 and HTTP/2) that
//! each say who they are; clients are hyper, curl and tokio-tungstenite.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use burrow_api::{Fallback, Protocol};
use burrow_gateway::httproute::{
    self, BoxIo, Dial, DialFuture, Global, Rule, Rules, Upstream, splice_or_502,
};
use burrow_gateway::passthrough;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;

const ROUTE: &str = "x-burrow-route";
/// Turns a hang into a failure; not a speed assertion.
const HANG: Duration = Duration::from_secs(60);

type TestBody = BoxBody<Bytes, Infallible>;

/// Dials every upstream with plain TCP on loopback.
struct TcpDial;

impl Dial for TcpDial {
    fn dial(&self, to: &Upstream) -> DialFuture<'_> {
        let addr = match to {
            Upstream::Laptop { addr, .. } | Upstream::Cluster(addr) => *addr,
        };
        Box::pin(async move {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as BoxIo)
        })
    }
}

// ---------------------------------------------------------------- upstreams

/// An upstream HTTP server (HTTP/1.1 and HTTP/2 prior knowledge) that
/// answers as `name`. Every response carries `x-upstream: name`, the
/// client address of the connection (`x-conn`), the HTTP version and Host
/// it saw. Paths: `/who`, `/sha` (SHA-256 of the request body), `/download?n=`
/// (n bytes of `pattern`, chunked), `/grpc` (echo with trailers), `/ws`
/// (WebSocket echo).
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(name, peer, req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

async fn answer(
    name: &'static str,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let mut resp = match req.uri().path() {
        "/who" => Response::new(full(name)),
        "/sha" => {
            let te = req
                .headers()
                .get("transfer-encoding")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut body = req.into_body();
            let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(Response::new(full("body error")));
                };
                if let Some(data) = frame.data_ref() {
                    sha.update(data);
                    n += data.len();
                }
            }
            let mut r = Response::new(full(format!("{} {n}", hex(sha.finish().as_ref()))));
            r.headers_mut().insert(
                "x-seen-transfer-encoding",
                HeaderValue::from_str(&te).unwrap_or(HeaderValue::from_static("?")),
            );
            r
        }
        "/download" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let frames = pattern(n).map(|b| Ok::<_, Infallible>(Frame::data(b)));
            Response::new(BodyExt::boxed(StreamBody::new(frames)))
        }
        "/grpc" => {
            let Ok(collected) = req.into_body().collect().await else {
                return Ok(Response::new(full("body error")));
            };
            let echoed = collected
                .trailers()
                .and_then(|t| t.get("x-request-trailer"))
                .cloned()
                .unwrap_or(HeaderValue::from_static("none"));
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("x-trailer-from", HeaderValue::from_static(name));
            trailers.insert("x-echoed-trailer", echoed);
            let frames = futures::stream::iter([
                Ok::<_, Infallible>(Frame::data(collected.to_bytes())),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            r
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                let mut r = Response::new(full("not a websocket request"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        let reply = Message::text(format!("{name}: {}", t.as_str()));
                        if ws.send(reply).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert("upgrade", HeaderValue::from_static("websocket"));
            h.insert("connection", HeaderValue::from_static("upgrade"));
            h.insert(
                "sec-websocket-accept",
                HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("?")),
            );
            r
        }
        _ => {
            let mut r = Response::new(full("no such path"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    let h = resp.headers_mut();
    h.insert("x-upstream", HeaderValue::from_static(name));
    h.insert(
        "x-conn",
        HeaderValue::from_str(&peer.to_string()).unwrap_or(HeaderValue::from_static("?")),
    );
    Ok(resp)
}

/// An "upstream" that accepts, reads the request and closes without a word
/// (the unread bytes make it a reset).
async fn rude_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    addr
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address")
}

/// `n` bytes in chunks of 64 KiB; the same for every caller.
fn pattern(n: usize) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    const CHUNK: usize = 64 * 1024;
    futures::stream::iter((0..n.div_ceil(CHUNK)).map(move |i| {
        let len = CHUNK.min(n - i * CHUNK);
        Bytes::from(
            (0..len)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect::<Vec<u8>>(),
        )
    }))
}

async fn pattern_sha(n: usize) -> String {
    let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunks = Box::pin(pattern(n));
    while let Some(c) = chunks.next().await {
        sha.update(&c);
    }
    hex(sha.finish().as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- the proxy

fn laptop(name: &str, addr: SocketAddr) -> Upstream {
    Upstream::Laptop {
        name: name.to_string(),
        addr,
    }
}

fn rule(value: &'static str, to: Upstream) -> Rule {
    Rule {
        header: HeaderName::from_static(ROUTE),
        value: HeaderValue::from_static(value),
        to,
        fallback: Fallback::Error,
    }
}

/// alice and bob laptops plus the cluster, each a live upstream.
struct World {
    alice: SocketAddr,
    bob: SocketAddr,
    cluster: SocketAddr,
}

impl World {
    async fn new() -> Self {
        Self {
            alice: upstream("alice").await,
            bob: upstream("bob").await,
            cluster: upstream("cluster").await,
        }
    }

    fn rules(&self) -> Rules {
        Rules {
            rules: vec![
                rule("alice", laptop("alice", self.alice)),
                rule("bob", laptop("bob", self.bob)),
            ],
            fallback: Upstream::Cluster(self.cluster),
        }
    }
}

/// The proxy in header mode on a loopback listener, as the gateway runs
/// it: the pass-through first, which hands the full proxy (`serve`) what it
/// does not carry itself.
async fn header_proxy(rules: Rules) -> (SocketAddr, watch::Sender<Arc<Rules>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let (tx, rx) = watch::channel(Arc::new(rules));
    let dial: Arc<dyn Dial> = Arc::new(TcpDial);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (rx, dial) = (rx.clone(), dial.clone());
            tokio::spawn(async move {
                let _ = passthrough::serve(s, rx, dial).await;
            });
        }
    });
    (addr, tx)
}

/// The proxy in global (splice) mode towards `to`.
async fn splice_proxy(to: Upstream) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let to = Arc::new(to);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let _ = splice_or_502(Box::new(s), &TcpDial, &to).await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- clients

async fn h1_client(addr: SocketAddr) -> http1::SendRequest<TestBody> {
    let s = TcpStream::connect(addr).await.expect("connect to proxy");
    let (sender, conn) = http1::handshake(TokioIo::new(s))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    sender
}

async fn h2_client(addr: SocketAddr) -> http2::SendRequest<TestBody> {
    let s = TcpStream::connect(addr).await.expect("connect to proxy");
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

fn get(path: &str, route: Option<&str>) -> Request<TestBody> {
    let mut b = Request::get(path).header("host", "echo.default:8080");
    if let Some(r) = route {
        b = b.header(ROUTE, r);
    }
    b.body(Empty::new().boxed()).expect("request")
}

fn get_h2(addr: SocketAddr, path: &str, route: Option<&str>) -> Request<TestBody> {
    let mut b = Request::get(format!("http://{addr}{path}")).version(Version::HTTP_2);
    if let Some(r) = route {
        b = b.header(ROUTE, r);
    }
    b.body(Empty::new().boxed()).expect("request")
}

/// Status, `x-upstream`, `x-conn` and body text of a response.
struct Seen {
    status: StatusCode,
    upstream: String,
    conn: String,
    headers: HeaderMap,
    body: String,
}

async fn seen(resp: Response<Incoming>) -> Seen {
    let (parts, body) = resp.into_parts();
    let text = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let body = body.collect().await.expect("response body").to_bytes();
    Seen {
        status: parts.status,
        upstream: text("x-upstream"),
        conn: text("x-conn"),
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: parts.headers,
    }
}

async fn h1_get(
    sender: &mut http1::SendRequest<TestBody>,
    path: &str,
    route: Option<&str>,
) -> Seen {
    sender.ready().await.expect("proxy connection open");
    let resp = sender
        .send_request(get(path, route))
        .await
        .expect("response from the proxy");
    seen(resp).await
}

/// An HTTP/1.1 or HTTP/2 client connection to the proxy.
enum Client {
    H1(http1::SendRequest<TestBody>),
    H2(http2::SendRequest<TestBody>),
}

type Responding =
    std::pin::Pin<Box<dyn Future<Output = hyper::Result<Response<Incoming>>> + Send + 'static>>;

impl Client {
    async fn ready(&mut self) {
        match self {
            Client::H1(c) => c.ready().await,
            Client::H2(c) => c.ready().await,
        }
        .expect("proxy connection open")
    }

    /// Sends `req`; the response arrives through the returned future,
    /// which borrows nothing.
    fn start(&mut self, req: Request<TestBody>) -> Responding {
        match self {
            Client::H1(c) => Box::pin(c.send_request(req)),
            Client::H2(c) => Box::pin(c.send_request(req)),
        }
    }
}

async fn curl(args: &[&str]) -> Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .await
        .expect("run curl (is it installed?)")
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.expect("the test hung")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_keep_alive_routes_each_request_and_reuses_upstream_connections() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        let mut client = h1_client(proxy).await;
        let mut conns: std::collections::HashMap<String, Vec<String>> = Default::default();
        for round in 0..3 {
            for (route, want) in [
                (Some("alice"), "alice"),
                (Some("bob"), "bob"),
                (None, "cluster"),
                (Some("carol"), "cluster"),
                (Some("alice"), "alice"),
            ] {
                let s = h1_get(&mut client, "/who", route).await;
                assert_eq!(s.status, StatusCode::OK, "round {round}, {route:?}");
                assert_eq!(s.body, want, "round {round}, route {route:?}");
                conns.entry(s.upstream).or_default().push(s.conn);
            }
        }
        // One upstream connection per upstream for this downstream connection.
        for (upstream, seen) in &conns {
            assert!(
                seen.iter().all(|c| c == &seen[0]),
                "{upstream} was reached over several connections: {seen:?}"
            );
        }
        assert_eq!(conns.len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_after_each_response_is_redialled() {
    within(async {
        let world = World::new().await;
        // Answers one request per connection, with `Connection: close`.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closer = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer("closer", peer, req));
                    let _ = http1_server()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        let mut rules = world.rules();
        rules
            .rules
            .insert(0, rule("closer", laptop("closer", closer)));
        let (proxy, _rules) = header_proxy(rules).await;
        let mut client = h1_client(proxy).await;
        let mut conns = Vec::new();
        for _ in 0..5 {
            let s = h1_get(&mut client, "/who", Some("closer")).await;
            assert_eq!((s.status, s.body.as_str()), (StatusCode::OK, "closer"));
            conns.push(s.conn);
            assert_eq!(h1_get(&mut client, "/who", None).await.body, "cluster");
        }
        conns.dedup();
        assert_eq!(
            conns.len(),
            5,
            "one upstream connection per request: {conns:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_other_headers_pass_hop_by_hop_do_not() {
    within(async {
        let world = World::new().await;
        // An upstream that answers with the request head it received.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let raw = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let service = service_fn(|req: Request<Incoming>| async move {
                let mut head = String::new();
                for (k, v) in req.headers() {
                    head.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                Ok::<_, Infallible>(Response::new(full(head)))
            });
            let _ = http1_server()
                .serve_connection(TokioIo::new(s), service)
                .await;
        });
        let mut rules = world.rules();
        rules.rules.insert(0, rule("raw", laptop("raw", raw)));
        let (proxy, _rules) = header_proxy(rules).await;
        let mut client = h1_client(proxy).await;
        let req = Request::get("/anything?q=1")
            .header("host", "echo.default.svc:8080")
            .header(ROUTE, "raw")
            .header("x-custom", "kept")
            .header("authorization", "Bearer t")
            .header("connection", "x-private")
            .header("x-private", "hop only")
            .header("keep-alive", "timeout=5")
            .body(Empty::new().boxed())
            .expect("request");
        let s = seen(client.send_request(req).await.expect("response")).await;
        assert_eq!(s.status, StatusCode::OK);
        for want in [
            "host: echo.default.svc:8080",
            "x-burrow-route: raw",
            "x-custom: kept",
            "authorization: Bearer t",
        ] {
            assert!(s.body.contains(want), "{want:?} missing in\n{}", s.body);
        }
        for gone in ["x-private", "keep-alive", "connection"] {
            assert!(!s.body.contains(gone), "{gone:?} forwarded:\n{}", s.body);
        }
    })
    .await;
}

fn http1_server() -> hyper::server::conn::http1::Builder {
    hyper::server::conn::http1::Builder::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_and_download_of_mebibytes_arrive_intact() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        let mut client = h1_client(proxy).await;
        const N: usize = 5 * 1024 * 1024 + 123;
        let want = pattern_sha(N).await;

        // Upload, chunked (no length known in advance).
        let frames = pattern(N).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        let req = Request::post("/sha")
            .header("host", "echo")
            .header(ROUTE, "alice")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("request");
        client.ready().await.expect("ready");
        let s = seen(client.send_request(req).await.expect("response")).await;
        assert_eq!(s.upstream, "alice");
        assert_eq!(s.body, format!("{want} {N}"));
        assert_eq!(s.headers["x-seen-transfer-encoding"], "chunked");

        // Download, chunked, on the same connection, from another upstream.
        client.ready().await.expect("ready");
        let resp = client
            .send_request(get(&format!("/download?n={N}"), Some("bob")))
            .await
            .expect("response");
        assert_eq!(resp.headers()["x-upstream"], "bob");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        let mut body = resp.into_body();
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("body frame").data_ref() {
                sha.update(d);
                n += d.len();
            }
        }
        assert_eq!(n, N);
        assert_eq!(hex(sha.finish().as_ref()), want);

        // And the connection is still good.
        assert_eq!(h1_get(&mut client, "/who", None).await.body, "cluster");
    })
    .await;
}

/// Bodies are streamed, not collected first: each side sees the first chunk
/// while the rest does not exist yet (a buffering proxy would hang here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_chunk_by_chunk_both_ways_on_h1_and_h2() {
    within(async {
        let world = World::new().await;
        // Upload: the server reports each chunk as it arrives. Download: the
        // server sends "first", then the rest only when the test says so.
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let (release_tx, release_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let streamer = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (got_tx, release_rx) = (got_tx.clone(), release_rx.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (got_tx, release_rx) = (got_tx.clone(), release_rx.clone());
                    async move {
                        if req.uri().path() == "/up" {
                            let mut body = req.into_body();
                            let mut total = 0;
                            while let Some(Ok(frame)) = body.frame().await {
                                if let Ok(data) = frame.into_data() {
                                    total += data.len();
                                    let _ = got_tx.send(data);
                                }
                            }
                            return Ok::<_, Infallible>(Response::new(full(total.to_string())));
                        }
                        let frames = futures::stream::unfold(0, move |step| {
                            let release_rx = release_rx.clone();
                            async move {
                                let chunk = match step {
                                    0 => Bytes::from_static(b"first"),
                                    1 => {
                                        release_rx.lock().await.recv().await?;
                                        Bytes::from_static(b"rest")
                                    }
                                    _ => return None,
                                };
                                Some((Ok::<_, Infallible>(Frame::data(chunk)), step + 1))
                            }
                        });
                        Ok(Response::new(BodyExt::boxed(StreamBody::new(frames))))
                    }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service)
                        .await;
                });
            }
        });
        let mut rules = world.rules();
        rules
            .rules
            .insert(0, rule("stream", laptop("streamer", streamer)));
        let (proxy, _rules) = header_proxy(rules).await;

        for h2 in [false, true] {
            let mut client = if h2 {
                Client::H2(h2_client(proxy).await)
            } else {
                Client::H1(h1_client(proxy).await)
            };
            let version = if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };

            // Download.
            let req = Request::get(format!("http://{proxy}/down"))
                .version(version)
                .header(ROUTE, "stream")
                .body(Empty::new().boxed())
                .expect("request");
            client.ready().await;
            let mut body = client.start(req).await.expect("response").into_body();
            let first = body.frame().await.expect("a frame").expect("data");
            assert_eq!(
                first.into_data().ok().as_deref(),
                Some(&b"first"[..]),
                "h2 {h2}"
            );
            release_tx.send(()).expect("server alive");
            let rest = body.collect().await.expect("the rest").to_bytes();
            assert_eq!(&rest[..], b"rest", "h2 {h2}");

            // Upload.
            let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
            let frames = futures::stream::poll_fn(move |cx| {
                chunks_rx
                    .poll_recv(cx)
                    .map(|c| c.map(|c| Ok::<_, Infallible>(Frame::data(c))))
            });
            let req = Request::post(format!("http://{proxy}/up"))
                .version(version)
                .header(ROUTE, "stream")
                .body(BodyExt::boxed(StreamBody::new(frames)))
                .expect("request");
            client.ready().await;
            let response = client.start(req);
            let response =
                tokio::spawn(async move { seen(response.await.expect("response")).await.body });
            chunks_tx.send(Bytes::from_static(b"first")).expect("send");
            assert_eq!(
                got_rx.recv().await.as_deref(),
                Some(&b"first"[..]),
                "h2 {h2}"
            );
            chunks_tx.send(Bytes::from_static(b"rest")).expect("send");
            assert_eq!(
                got_rx.recv().await.as_deref(),
                Some(&b"rest"[..]),
                "h2 {h2}"
            );
            drop(chunks_tx);
            assert_eq!(response.await.expect("upload task"), "9", "h2 {h2}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_expect_100_continue_gets_continue_and_its_body_through() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        let dir = std::env::temp_dir().join(format!("httproute-100-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("body");
        const N: usize = 300 * 1024;
        let mut data = Vec::with_capacity(N);
        let mut chunks = Box::pin(pattern(N));
        while let Some(c) = chunks.next().await {
            data.extend_from_slice(&c);
        }
        std::fs::write(&file, &data).expect("write body file");
        let out = curl(&[
            "-v",
            "-H",
            "Expect: 100-continue",
            "-H",
            "x-burrow-route: bob",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{proxy}/sha"),
        ])
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "curl failed: {stderr}");
        assert!(
            stderr.contains("HTTP/1.1 100 Continue"),
            "no 100 Continue seen:\n{stderr}"
        );
        assert!(stderr.contains("x-upstream: bob"), "{stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{} {N}", pattern_sha(N).await)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_routed_then_passes_through() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        for (route, want) in [(Some("alice"), "alice"), (None, "cluster")] {
            let mut req = format!("ws://{proxy}/ws")
                .into_client_request()
                .expect("ws request");
            if let Some(r) = route {
                req.headers_mut()
                    .insert(ROUTE, HeaderValue::from_str(r).expect("header"));
            }
            let tcp = TcpStream::connect(proxy).await.expect("connect");
            let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
                .await
                .expect("websocket handshake through the proxy");
            assert_eq!(resp.headers()["x-upstream"], want);
            for i in 0..3 {
                ws.send(Message::text(format!("hello {i}")))
                    .await
                    .expect("send");
                let reply = ws.next().await.expect("a reply").expect("a message");
                assert_eq!(reply.to_text().expect("text"), format!("{want}: hello {i}"));
            }
            // A large message crosses the splice intact.
            let big = "x".repeat(1024 * 1024);
            ws.send(Message::text(big.clone())).await.expect("send big");
            let reply = ws.next().await.expect("a reply").expect("a message");
            assert_eq!(reply.to_text().expect("text"), format!("{want}: {big}"));
            ws.close(None).await.expect("close");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_of_one_connection_go_to_different_upstreams() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        let client = h2_client(proxy).await;
        let routes = [
            Some("alice"),
            Some("bob"),
            None,
            Some("alice"),
            Some("bob"),
            None,
        ];
        let mut streams = Vec::new();
        for round in 0..5 {
            for route in routes {
                let mut c = client.clone();
                // Slow downloads so streams overlap.
                let req = get_h2(proxy, &format!("/download?n={}", 256 * 1024 + round), route);
                streams.push(tokio::spawn(async move {
                    c.ready().await.expect("ready");
                    let resp = c.send_request(req).await.expect("response");
                    (route, resp.version(), seen(resp).await)
                }));
            }
        }
        let mut conns: std::collections::HashMap<String, Vec<String>> = Default::default();
        for s in streams {
            let (route, version, s) = s.await.expect("stream task");
            assert_eq!(version, Version::HTTP_2);
            assert_eq!(s.status, StatusCode::OK);
            assert_eq!(s.upstream, route.unwrap_or("cluster"));
            conns.entry(s.upstream).or_default().push(s.conn);
        }
        for (upstream, seen) in &conns {
            assert!(
                seen.iter().all(|c| c == &seen[0]),
                "{upstream} was reached over several HTTP/2 connections: {seen:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_prior_knowledge_is_routed_per_request() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        for (route, want) in [("alice", "alice"), ("bob", "bob"), ("nobody", "cluster")] {
            let out = curl(&[
                "--http2-prior-knowledge",
                "-i",
                "-H",
                &format!("{ROUTE}: {route}"),
                &format!("http://{proxy}/who"),
            ])
            .await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.starts_with("HTTP/2 200"), "{stdout}");
            assert!(stdout.ends_with(&format!("\r\n\r\n{want}")), "{stdout}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_trailers_pass_both_ways_like_grpc() {
    within(async {
        let world = World::new().await;
        let (proxy, _rules) = header_proxy(world.rules()).await;
        let mut client = h2_client(proxy).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-request-trailer", HeaderValue::from_static("from-client"));
        let frames = futures::stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let req = Request::post(format!("http://{proxy}/grpc"))
            .version(Version::HTTP_2)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(ROUTE, "bob")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("request");
        client.ready().await.expect("ready");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-upstream"], "bob");
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("response trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-trailer-from"], "bob");
        assert_eq!(trailers["x-echoed-trailer"], "from-client");
        assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x05hello");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_laptop_gets_502_naming_it_on_h1_and_h2() {
    within(async {
        let world = World::new().await;
        let mut rules = world.rules();
        rules
            .rules
            .insert(0, rule("gone", laptop("carol", dead_addr().await)));
        rules
            .rules
            .insert(0, rule("rude", laptop("dave", rude_upstream().await)));
        let (proxy, _rules) = header_proxy(rules).await;

        // HTTP/1.1: the 502, then the same connection keeps working.
        let mut client = h1_client(proxy).await;
        let s = h1_get(&mut client, "/who", Some("gone")).await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY);
        assert_eq!(s.body, "burrow: nothing answered on laptop carol\n");
        let s = h1_get(&mut client, "/who", Some("rude")).await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY);
        assert_eq!(s.body, "burrow: nothing answered on laptop dave\n");
        assert_eq!(
            h1_get(&mut client, "/who", Some("alice")).await.body,
            "alice"
        );

        // HTTP/2: that stream gets the 502, others are unaffected.
        let client = h2_client(proxy).await;
        let ask = |route| {
            let mut c = client.clone();
            async move {
                c.ready().await.expect("ready");
                seen(
                    c.send_request(get_h2(proxy, "/who", Some(route)))
                        .await
                        .expect("response"),
                )
                .await
            }
        };
        let (gone, rude, bob) = tokio::join!(ask("gone"), ask("rude"), ask("bob"));
        assert_eq!(gone.status, StatusCode::BAD_GATEWAY);
        assert_eq!(gone.body, "burrow: nothing answered on laptop carol\n");
        assert_eq!(rude.status, StatusCode::BAD_GATEWAY);
        assert_eq!(rude.body, "burrow: nothing answered on laptop dave\n");
        assert_eq!(bob.body, "bob");

        // curl sees the same.
        let out = curl(&["-H", "x-burrow-route: gone", &format!("http://{proxy}/who")]).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "burrow: nothing answered on laptop carol\n"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_400_and_close_without_panic() {
    within(async {
        let world = World::new().await;
        let garbage: [&[u8]; 4] = [
            b"GARBAGE\x00\x01\x02 nonsense\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
            b"\xff\xfe\xfd\xfc\r\n\r\n",
        ];
        for bytes in garbage {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(bytes).await.expect("write garbage");
                let mut answer = Vec::new();
                // Ends only when the proxy closes the connection.
                let _ = s.read_to_end(&mut answer).await;
                answer
            });
            let (s, _) = listener.accept().await.expect("accept");
            let (_tx, rx) = watch::channel(Arc::new(world.rules()));
            let served = passthrough::serve(s, rx, Arc::new(TcpDial)).await;
            assert!(served.is_err(), "garbage was served as a request");
            let answer = client.await.expect("client task");
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "for {bytes:?}: {answer:?}"
            );
        }

        // A valid HTTP/2 preface followed by garbage: the connection closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            bytes.extend_from_slice(&[0xff; 64]);
            s.write_all(&bytes).await.expect("write");
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer).await;
        });
        let (s, _) = listener.accept().await.expect("accept");
        let (_tx, rx) = watch::channel(Arc::new(world.rules()));
        let _ = passthrough::serve(s, rx, Arc::new(TcpDial)).await;
        client.await.expect("client saw the connection close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_changes_apply_to_the_next_request_on_a_kept_alive_connection() {
    within(async {
        let world = World::new().await;
        let (proxy, rules) = header_proxy(Rules::new(Upstream::Cluster(world.cluster))).await;
        let mut client = h1_client(proxy).await;
        let mut h2 = h2_client(proxy).await;
        let h2_who = |c: &mut http2::SendRequest<TestBody>| {
            let req = get_h2(proxy, "/who", Some("alice"));
            let fut = c.send_request(req);
            async move { seen(fut.await.expect("response")).await.body }
        };

        assert_eq!(
            h1_get(&mut client, "/who", Some("alice")).await.body,
            "cluster"
        );
        assert_eq!(h2_who(&mut h2).await, "cluster");

        rules.send_replace(Arc::new(world.rules()));
        assert_eq!(
            h1_get(&mut client, "/who", Some("alice")).await.body,
            "alice"
        );
        assert_eq!(h2_who(&mut h2).await, "alice");

        let mut only_bob = world.rules();
        only_bob.rules.retain(|r| r.value != "alice");
        rules.send_replace(Arc::new(only_bob));
        assert_eq!(
            h1_get(&mut client, "/who", Some("alice")).await.body,
            "cluster"
        );
        assert_eq!(h1_get(&mut client, "/who", Some("bob")).await.body, "bob");
        assert_eq!(h2_who(&mut h2).await, "cluster");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_mode_passes_bytes_and_answers_502_when_nothing_answers() {
    within(async {
        let world = World::new().await;

        // Live laptop: raw bytes both ways, keep-alive included.
        let proxy = splice_proxy(laptop("alice", world.alice)).await;
        let mut client = h1_client(proxy).await;
        for _ in 0..3 {
            let s = h1_get(&mut client, "/who", Some("bob")).await;
            assert_eq!(s.body, "alice", "splice mode ignores headers");
        }
        // Megabytes both ways, the upload sent before any answer exists.
        const N: usize = 3 * 1024 * 1024 + 7;
        let want = pattern_sha(N).await;
        let frames = pattern(N).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        let req = Request::post("/sha")
            .header("host", "echo")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("request");
        client.ready().await.expect("ready");
        let s = seen(client.send_request(req).await.expect("response")).await;
        assert_eq!(s.body, format!("{want} {N}"));
        client.ready().await.expect("ready");
        let resp = client
            .send_request(get(&format!("/download?n={N}"), None))
            .await
            .expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), N);
        assert_eq!(
            hex(ring::digest::digest(&ring::digest::SHA256, &body).as_ref()),
            want
        );
        let out = curl(&["--http2-prior-knowledge", &format!("http://{proxy}/who")]).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alice");

        // Nothing listening on the laptop: 502 for HTTP/1.1 and HTTP/2.
        let proxy = splice_proxy(laptop("carol", dead_addr().await)).await;
        let s = h1_get(&mut h1_client(proxy).await, "/who", None).await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY);
        assert_eq!(s.body, "burrow: nothing answered on laptop carol\n");
        let out = curl(&[
            "--http2-prior-knowledge",
            "-i",
            &format!("http://{proxy}/who"),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("HTTP/2 502"), "{stdout}");
        assert!(
            stdout.ends_with("burrow: nothing answered on laptop carol\n"),
            "{stdout}"
        );

        // The laptop end accepts, then closes without answering: still 502.
        let proxy = splice_proxy(laptop("dave", rude_upstream().await)).await;
        let out = curl(&["-i", &format!("http://{proxy}/who")]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("HTTP/1.1 502"), "{stdout}");
        assert!(
            stdout.ends_with("burrow: nothing answered on laptop dave\n"),
            "{stdout}"
        );
    })
    .await;
}

#[test]
fn nothing_answered_names_the_upstream() {
    let addr: SocketAddr = ([10, 96, 0, 7], 8080).into();
    assert_eq!(
        httproute::Upstream::Cluster(addr).nothing_answered(),
        "burrow: nothing answered on 10.96.0.7:8080\n"
    );
}

// ------------------------------------------------------------ fail-open

/// Like [`TcpDial`], except that `unplugged` answers as the gateway's data
/// path does for a laptop it found not answering (`HostUnreachable`), and
/// `dying` accepts the connection, then fails reads that way after 300 ms
/// without an answer (the laptop died with the request in flight).
struct Unplugged {
    unplugged: SocketAddr,
    dying: SocketAddr,
}

impl Dial for Unplugged {
    fn dial(&self, to: &Upstream) -> DialFuture<'_> {
        let addr = match to {
            Upstream::Laptop { addr, .. } | Upstream::Cluster(addr) => *addr,
        };
        let (unplugged, dying) = (addr == self.unplugged, addr == self.dying);
        Box::pin(async move {
            if unplugged {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::HostUnreachable,
                    "the laptop is not answering",
                ));
            }
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            if dying {
                return Ok(Box::new(Dying {
                    inner: s,
                    death: Box::pin(tokio::time::sleep(Duration::from_millis(300))),
                }) as BoxIo);
            }
            Ok(Box::new(s) as BoxIo)
        })
    }
}

struct Dying {
    inner: TcpStream,
    death: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for Dying {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => match self.death.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::HostUnreachable,
                    "the laptop stopped answering",
                ))),
                Poll::Pending => Poll::Pending,
            },
            r => r,
        }
    }
}

impl tokio::io::AsyncWrite for Dying {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts and reads, never answers (a laptop server stuck forever).
async fn silent_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Sends a greeting first, then echoes (a server-first protocol).
async fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 hello\r\n").await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// The proxy in global mode (`httproute::global`) for `route`.
async fn global_proxy(route: Global, dial: Arc<dyn Dial>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let route = Arc::new(route);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (route, dial) = (route.clone(), dial.clone());
            tokio::spawn(async move {
                let _ = httproute::global(s, &*dial, &route).await;
            });
        }
    });
    addr
}

/// Sends `bytes` raw and reads until the proxy closes: what came back, and
/// whether the end was a reset.
async fn raw(proxy: SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let is_reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    // The proxy may reset before the connect or the write returns.
    let mut s = match TcpStream::connect(proxy).await {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return (Vec::new(), true),
        Err(e) => panic!("connect: {e}"),
    };
    match s.write_all(bytes).await {
        Ok(()) => {}
        Err(e) if is_reset(&e) => return (Vec::new(), true),
        Err(e) => panic!("write: {e}"),
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if is_reset(&e) => return (got, true),
            Err(e) => panic!("reading from the proxy: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_auto_tells_http_from_bytes_when_nothing_listens_and_falls_back_when_asked() {
    within(async {
        let world = World::new().await;
        let nobody = dead_addr().await;
        let dial: Arc<dyn Dial> = Arc::new(TcpDial);
        let route = |fallback| Global {
            laptop: laptop("carol", nobody),
            pods: Upstream::Cluster(world.cluster),
            protocol: Protocol::Auto,
            fallback,
        };
        let proxy = global_proxy(route(Fallback::Error), dial.clone()).await;
        // HTTP/1 and HTTP/2 callers: 502 naming the laptop.
        let s = h1_get(&mut h1_client(proxy).await, "/who", None).await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY);
        assert_eq!(s.body, "burrow: nothing answered on laptop carol\n");
        let out = curl(&[
            "--http2-prior-knowledge",
            "-i",
            &format!("http://{proxy}/who"),
        ])
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("HTTP/2 502"), "{stdout}");
        // Other bytes: a reset, no answer.
        let (got, was_reset) = raw(proxy, b"\x16\x03\x01hello").await;
        assert!(got.is_empty() && was_reset, "{got:?} {was_reset}");
        // --protocol tcp forces the reset on an HTTP caller too.
        let tcp = global_proxy(
            Global {
                protocol: Protocol::Tcp,
                ..route(Fallback::Error)
            },
            dial.clone(),
        )
        .await;
        let (got, was_reset) = raw(tcp, b"GET /who HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(got.is_empty() && was_reset, "{got:?}");

        // --fallback pods: the pods answer, HTTP or not.
        let proxy = global_proxy(route(Fallback::Pods), dial.clone()).await;
        let s = h1_get(&mut h1_client(proxy).await, "/who", None).await;
        assert_eq!(s.body, "cluster");
        let (got, _) = raw(proxy, b"GET /who HTTP/1.0\r\nhost: x\r\n\r\n").await;
        assert!(
            String::from_utf8_lossy(&got).ends_with("cluster"),
            "{got:?}"
        );

        // A server-first laptop is not kept waiting for the caller.
        let proxy = global_proxy(
            Global {
                laptop: laptop("erin", greeter().await),
                ..route(Fallback::Error)
            },
            dial.clone(),
        )
        .await;
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).await.expect("greeting");
        assert_eq!(&buf, b"220 hello\r\n");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_laptop_sends_callers_to_the_pods() {
    within(async {
        let world = World::new().await;
        let unplugged = dead_addr().await;
        let dying = silent_upstream().await;
        let dial: Arc<dyn Dial> = Arc::new(Unplugged { unplugged, dying });

        // Global, the laptop unreachable at the dial: the pods, for HTTP
        // and for bytes (the pods' HTTP server answers a raw request).
        for protocol in [Protocol::Auto, Protocol::Tcp, Protocol::Http] {
            let proxy = global_proxy(
                Global {
                    laptop: laptop("carol", unplugged),
                    pods: Upstream::Cluster(world.cluster),
                    protocol,
                    fallback: Fallback::Error,
                },
                dial.clone(),
            )
            .await;
            let s = h1_get(&mut h1_client(proxy).await, "/who", None).await;
            assert_eq!(s.body, "cluster", "{protocol:?}");
        }
        // Global, the laptop dies with a GET in flight: resent to the pods;
        // a POST is not resent (502).
        let proxy = global_proxy(
            Global {
                laptop: laptop("dave", dying),
                pods: Upstream::Cluster(world.cluster),
                protocol: Protocol::Auto,
                fallback: Fallback::Error,
            },
            dial.clone(),
        )
        .await;
        let (got, _) = raw(
            proxy,
            b"GET /who HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("cluster"),
            "{text}"
        );
        let (got, _) = raw(
            proxy,
            b"POST /who HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi",
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 502") && text.contains("laptop dave"),
            "{text}"
        );

        // Header routes: the matching requests go to the pods.
        let mut rules = world.rules();
        rules
            .rules
            .insert(0, rule("gone", laptop("carol", unplugged)));
        rules.rules.insert(0, rule("dying", laptop("dave", dying)));
        let (proxy, _tx) = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let (tx, rx) = watch::channel(Arc::new(rules));
            let dial = dial.clone();
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (rx, dial) = (rx.clone(), dial.clone());
                    tokio::spawn(async move {
                        let _ = passthrough::serve(s, rx, dial).await;
                    });
                }
            });
            (addr, tx)
        };
        let mut client = h1_client(proxy).await;
        assert_eq!(
            h1_get(&mut client, "/who", Some("gone")).await.body,
            "cluster"
        );
        assert_eq!(
            h1_get(&mut client, "/who", Some("dying")).await.body,
            "cluster"
        );
        assert_eq!(
            h1_get(&mut client, "/who", Some("alice")).await.body,
            "alice"
        );
        let out = curl(&[
            "--http2-prior-knowledge",
            "-H",
            "x-burrow-route: gone",
            &format!("http://{proxy}/who"),
        ])
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "cluster");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_route_with_fallback_pods_sends_refused_requests_to_the_pods() {
    within(async {
        let world = World::new().await;
        let mut rules = world.rules();
        rules.rules.insert(
            0,
            Rule {
                fallback: Fallback::Pods,
                ..rule("gone", laptop("carol", dead_addr().await))
            },
        );
        rules
            .rules
            .insert(0, rule("told", laptop("dave", dead_addr().await)));
        let (proxy, _rules) = header_proxy(rules).await;
        let mut client = h1_client(proxy).await;
        assert_eq!(
            h1_get(&mut client, "/who", Some("gone")).await.body,
            "cluster"
        );
        let s = h1_get(&mut client, "/who", Some("told")).await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY);
        assert_eq!(s.body, "burrow: nothing answered on laptop dave\n");
    })
    .await;
}

// ------------------------------------------------- the pass-through itself

/// A scripted HTTP/1.1 upstream that answers each request with canned
/// bytes chosen by its path (`{conn}` is the upstream connection's
/// number, from 1): the pass-through must hand them on byte for byte.
async fn scripted_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut conns = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            conns += 1;
            let conn = conns;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let (len, method, path, body) = loop {
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
                            let body: usize = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                                .unwrap_or(0);
                            if buf.len() >= len + body {
                                let method = req.method.unwrap_or("").to_string();
                                let path = req.path.unwrap_or("").to_string();
                                break (len, method, path, body);
                            }
                        }
                        let mut more = [0u8; 4096];
                        match s.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&more[..n]),
                        }
                    };
                    let body_bytes = buf[len..len + body].to_vec();
                    buf.drain(..len + body);
                    let answer = scripted_answer(&path, conn, &body_bytes);
                    let answer = if method == "HEAD" {
                        let end = answer.find("\r\n\r\n").map_or(answer.len(), |i| i + 4);
                        answer[..end].to_string()
                    } else {
                        answer
                    };
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn scripted_answer(path: &str, conn: usize, body: &[u8]) -> String {
    match path {
        "/len" => format!("HTTP/1.1 200 OK\r\nX-Conn: {conn}\r\nContent-Length: 5\r\n\r\nhello"),
        "/chunked" => format!(
            "HTTP/1.1 200 OK\r\nX-Conn: {conn}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n"
        ),
        "/204" => format!("HTTP/1.1 204 No Content\r\nX-Conn: {conn}\r\n\r\n"),
        "/continue" => format!(
            "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
             HTTP/1.1 200 OK\r\nX-Conn: {conn}\r\nContent-Length: 2\r\n\r\nok"
        ),
        "/echo" => format!(
            "HTTP/1.1 200 OK\r\nX-Conn: {conn}\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            String::from_utf8_lossy(body)
        ),
        "/close" => format!("HTTP/1.1 200 OK\r\nX-Conn: {conn}\r\n\r\nuntil the end"),
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
    }
}

/// Reads exactly `want.len()` bytes and compares them.
async fn expect_bytes(s: &mut TcpStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).await.expect("the whole answer");
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_the_pods_pass_byte_for_byte_on_one_upstream_connection() {
    within(async {
        let world = World::new().await;
        let mut rules = world.rules();
        rules.fallback = Upstream::Cluster(scripted_upstream().await);
        let (proxy, _rules) = header_proxy(rules).await;
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        let req = |method: &str, path: &str| {
            format!("{method} {path} HTTP/1.1\r\nHost: echo\r\nX-Mixed-Case: Kept\r\n\r\n")
        };
        // Every framing, each answer exactly as the pods sent it, on the
        // pods' connection 1 throughout.
        for path in ["/len", "/chunked", "/204", "/continue"] {
            s.write_all(req("GET", path).as_bytes())
                .await
                .expect("send");
            expect_bytes(&mut s, &scripted_answer(path, 1, b"")).await;
        }
        s.write_all(req("HEAD", "/len").as_bytes())
            .await
            .expect("send");
        expect_bytes(
            &mut s,
            "HTTP/1.1 200 OK\r\nX-Conn: 1\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        // Pipelined: in order.
        let two = format!("{}{}", req("GET", "/chunked"), req("GET", "/len"));
        s.write_all(two.as_bytes()).await.expect("send");
        let want = format!(
            "{}{}",
            scripted_answer("/chunked", 1, b""),
            scripted_answer("/len", 1, b"")
        );
        expect_bytes(&mut s, &want).await;
        // A body that arrives in pieces.
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello")
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b" world").await.expect("send");
        expect_bytes(&mut s, &scripted_answer("/echo", 1, b"hello world")).await;
        // A routed request hands the connection to the full proxy, which
        // goes on routing each request.
        s.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\nx-burrow-route: alice\r\n\r\n")
            .await
            .expect("send");
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer).await.expect("answer");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.ends_with("alice"), "{answer}");
        s.write_all(req("GET", "/len").as_bytes())
            .await
            .expect("send");
        let n = s.read(&mut vec![0u8; 4096]).await.expect("answer");
        assert!(n > 0);

        // A response that ends when the pods close: so does the caller's
        // connection. (The pods' connection 2 was the full proxy's.)
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        s.write_all(req("GET", "/close").as_bytes())
            .await
            .expect("send");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("read to the end");
        assert_eq!(
            String::from_utf8_lossy(&all),
            scripted_answer("/close", 3, b"")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_cannot_be_dialled_get_the_callers_a_502_naming_them() {
    within(async {
        let world = World::new().await;
        let mut rules = world.rules();
        let dead = dead_addr().await;
        rules.fallback = Upstream::Cluster(dead);
        let (proxy, _rules) = header_proxy(rules).await;
        let mut s = TcpStream::connect(proxy).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("read to the end");
        let all = String::from_utf8_lossy(&all);
        assert!(all.starts_with("HTTP/1.1 502"), "{all}");
        assert!(
            all.ends_with(&format!("burrow: nothing answered on {dead}\n")),
            "{all}"
        );
    })
    .await;
}
