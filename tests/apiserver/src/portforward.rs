//! `pods/portforward` in the three forms a real API server serves:
//!
//! - WebSocket `v4.channel.k8s.io` (kube-rs): binary frames whose first
//!   byte is the channel; for the port at index i, data on channel 2i and
//!   errors on channel 2i+1; each channel first carries the port number
//!   (2 bytes, little-endian). Ports come from the `ports` query.
//! - SPDY/3.1 (`Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version:
//!   portforward.k8s.io`; kubectl before 1.31, and its fallback): per
//!   forwarded connection the client opens an `error` and a `data` stream
//!   with the same `requestid` header and the remote `port`; the kubelet
//!   dials the pod once both are there, copies bytes in DATA frames, and on
//!   a failed dial writes the message to the error stream and closes both.
//! - SPDY tunneled over WebSocket (subprotocol `SPDY/3.1+portforward.k8s.io`,
//!   kubectl 1.31+ by default): the same SPDY byte stream carried in binary
//!   WebSocket messages.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::server::{Body, Dialer, PodTarget, empty_body};
use crate::spdy::{self, FLAG_FIN, Frame};

/// Subprotocols spoken, preferred first.
const PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "channel.k8s.io"];

/// The SPDY stream protocol of port-forward (`X-Stream-Protocol-Version`).
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// The prefix of a WebSocket subprotocol that tunnels SPDY.
pub const TUNNELING_PREFIX: &str = "SPDY/3.1+";
const HEADER_PROTOCOL_VERSION: &str = "x-stream-protocol-version";

/// How a port-forward request wants to talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// WebSocket, `v4.channel.k8s.io` (ports from the query).
    WebSocket,
    /// SPDY/3.1 tunneled in a WebSocket (`SPDY/3.1+portforward.k8s.io`).
    SpdyOverWebSocket,
    /// A plain SPDY/3.1 upgrade.
    Spdy,
}

/// Which form the request asks for; `None`: not an upgrade request.
pub fn mode<B>(req: &Request<B>) -> Option<Mode> {
    if is_websocket(req) {
        if offered_protocols(req)
            .iter()
            .any(|p| p.starts_with(TUNNELING_PREFIX))
        {
            return Some(Mode::SpdyOverWebSocket);
        }
        return Some(Mode::WebSocket);
    }
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let connection = req
        .headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    (connection.to_ascii_lowercase().contains("upgrade")
        && upgrade.to_ascii_lowercase().contains("spdy/3.1"))
    .then_some(Mode::Spdy)
}

fn offered_protocols<B>(req: &Request<B>) -> Vec<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect()
}

/// The message the kubelet writes to the error stream when it cannot reach
/// the pod's port (containerd's wording).
fn dial_error(port: u16, pod: &str, e: &std::io::Error) -> String {
    let cause = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_string(),
        std::io::ErrorKind::TimedOut => "i/o timeout".to_string(),
        _ => e.to_string(),
    };
    format!(
        "error forwarding port {port} to pod {pod}, uid : failed to execute portforward in network namespace of the pod: failed to connect to localhost:{port} inside namespace: IPv4: dial tcp4 127.0.0.1:{port}: {cause}"
    )
}

/// Whether the request asks for a WebSocket upgrade.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers the upgrade and forwards `ports` of the pod at `ip` in a
/// background task.
pub fn handle(
    req: Request<hyper::body::Incoming>,
    pod_name: &str,
    namespace: &str,
    uid: String,
    ip: IpAddr,
    ports: Vec<u16>,
    dialer: Dialer,
) -> Result<Response<Body>, ApiError> {
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let offered = offered_protocols(&req);
    let protocol = PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .copied();
    if protocol.is_none() && !offered.is_empty() {
        return Err(ApiError::bad_request(format!(
            "unable to upgrade connection: requested protocols {offered:?} are not supported (supported: {PROTOCOLS:?})"
        )));
    }
    let pod = format!("{pod_name}_{namespace}");
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                forward(ws, pod, uid, ip, ports, dialer).await;
            }
            Err(e) => tracing::debug!("portforward upgrade failed: {e}"),
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    resp.body(empty_body())
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::binary(v)
}

async fn forward<S>(
    ws: WebSocketStream<S>,
    pod: String,
    uid: String,
    ip: IpAddr,
    ports: Vec<u16>,
    dialer: Dialer,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);

    // The writer: every frame to the client goes through here.
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    });

    for (i, port) in ports.iter().enumerate() {
        let lp = port.to_le_bytes();
        let _ = out_tx.send(frame(2 * i as u8, &lp)).await;
        let _ = out_tx.send(frame(2 * i as u8 + 1, &lp)).await;
    }

    // Dial every port; a failure goes to that port's error channel.
    let mut writers: Vec<Option<tokio::net::tcp::OwnedWriteHalf>> = Vec::new();
    let mut readers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let target = PodTarget {
            uid: uid.clone(),
            ip,
            port: *port,
        };
        match (dialer)(target).await {
            Ok(conn) => {
                let (mut r, w) = conn.into_split();
                writers.push(Some(w));
                let tx = out_tx.clone();
                let ch = 2 * i as u8;
                readers.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send(frame(ch, &buf[..n])).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }));
            }
            Err(e) => {
                let msg = dial_error(*port, &pod, &e);
                tracing::debug!("{msg}");
                let _ = out_tx.send(frame(2 * i as u8 + 1, msg.as_bytes())).await;
                writers.push(None);
            }
        }
    }

    // When every connection to the pod has ended, close the WebSocket.
    let reader_aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let closer = {
        let tx = out_tx.clone();
        tokio::spawn(async move {
            for r in readers {
                let _ = r.await;
            }
            let _ = tx.send(Message::Close(None)).await;
        })
    };
    drop(out_tx);

    // Frames from the client: data for the pod.
    let writers = Arc::new(tokio::sync::Mutex::new(writers));
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) if b.len() > 1 => {
                let ch = b[0] as usize;
                if !ch.is_multiple_of(2) {
                    continue;
                }
                let data: Bytes = b.slice(1..);
                let mut ws = writers.lock().await;
                if let Some(Some(w)) = ws.get_mut(ch / 2)
                    && w.write_all(&data).await.is_err()
                {
                    ws[ch / 2] = None;
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The client is gone: half-close towards the pod, then stop.
    for w in writers.lock().await.iter_mut().flatten() {
        let _ = w.shutdown().await;
    }
    closer.abort();
    for a in reader_aborts {
        a.abort();
    }
    let _ = writer.await;
}

/// Answers a SPDY port-forward upgrade, plain or tunneled in a WebSocket
/// (`mode`), and serves the SPDY session in a background task. Ports come
/// from each stream's `port` header, not from the query.
pub fn handle_spdy(
    req: Request<hyper::body::Incoming>,
    mode: Mode,
    pod_name: &str,
    namespace: &str,
    uid: String,
    ip: IpAddr,
    dialer: Dialer,
) -> Result<Response<Body>, ApiError> {
    // The SPDY stream protocols the client speaks: the
    // X-Stream-Protocol-Version headers, or the tunneling subprotocols
    // without their prefix.
    let client: Vec<String> = match mode {
        Mode::Spdy => req
            .headers()
            .get_all(HEADER_PROTOCOL_VERSION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
            .filter(|p| !p.is_empty())
            .collect(),
        _ => offered_protocols(&req)
            .iter()
            .filter_map(|p| p.strip_prefix(TUNNELING_PREFIX).map(str::to_string))
            .collect(),
    };
    if client.is_empty() {
        return Err(ApiError::bad_request(
            "unable to upgrade: X-Stream-Protocol-Version is required",
        ));
    }
    if !client.iter().any(|p| p == SPDY_PROTOCOL) {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts [\"{SPDY_PROTOCOL}\"]"
            ),
        ));
    }
    let resp = match mode {
        Mode::Spdy => Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "SPDY/3.1")
            .header("X-Stream-Protocol-Version", SPDY_PROTOCOL),
        _ => {
            let key = req
                .headers()
                .get(header::SEC_WEBSOCKET_KEY)
                .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?;
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::UPGRADE, "websocket")
                .header(header::CONNECTION, "Upgrade")
                .header(header::SEC_WEBSOCKET_ACCEPT, accept)
                .header(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    format!("{TUNNELING_PREFIX}{SPDY_PROTOCOL}"),
                )
        }
    };
    let pod = Pod {
        full_name: format!("{pod_name}_{namespace}"),
        uid,
        ip,
        dialer,
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("portforward upgrade failed: {e}");
                return;
            }
        };
        match mode {
            Mode::Spdy => spdy_session(upgraded, pod).await,
            _ => {
                let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, None).await;
                spdy_session(ws_tunnel(ws), pod).await
            }
        }
    });
    resp.body(empty_body())
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))
}

/// The byte stream carried in a WebSocket's binary messages, as a local
/// duplex pipe (what the tunneling handler of the real API server does
/// with `SPDY/3.1+` subprotocols).
fn ws_tunnel<S>(ws: WebSocketStream<S>) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (near, far) = tokio::io::duplex(256 * 1024);
    let (mut far_r, mut far_w) = tokio::io::split(far);
    let (mut sink, mut stream) = ws.split();
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if far_w.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(Message::Text(_)) => {
                    tracing::debug!("portforward tunnel: text message, closing");
                    break;
                }
                Ok(_) => {}
            }
        }
        let _ = far_w.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match far_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.send(Message::Close(None)).await;
        let _ = sink.close().await;
    });
    near
}

/// The pod a SPDY session forwards to.
struct Pod {
    /// `name_namespace`, as the kubelet names pods in its messages.
    full_name: String,
    uid: String,
    ip: IpAddr,
    dialer: Dialer,
}

/// A stream the client opened.
struct StreamState {
    /// Client → pod bytes of a data stream (dropped at the client's FIN).
    to_pod: Option<mpsc::Sender<Bytes>>,
    /// Cancelled when the client resets the stream.
    reset: CancellationToken,
}

/// The error and data streams of one forwarded connection, as they arrive.
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<(u32, mpsc::Receiver<Bytes>, CancellationToken)>,
}

/// Frames the session sends, queued for its writer.
const OUT_QUEUE: usize = 64;
/// Client → pod chunks buffered per data stream.
const TO_POD_QUEUE: usize = 32;
/// After one direction of a forwarded connection ends, how long the other
/// may go on (containerd's port-forward gives it one second).
const LINGER: Duration = Duration::from_secs(1);

/// Serves one SPDY/3.1 port-forward connection as the kubelet does:
/// replies to every stream the client opens, pairs error and data streams
/// by `requestid`, dials the pod for each pair, echoes PINGs.
async fn spdy_session<S>(io: S, pod: Pod)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let pod = Arc::new(pod);
    let (r, w) = tokio::io::split(io);
    let mut frames = FramedRead::new(r, spdy::FrameDecoder::new());
    let mut sink = FramedWrite::new(w, spdy::FrameEncoder::new());
    let (out, mut out_rx) = mpsc::channel::<Frame>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if let Err(e) = sink.send(f).await {
                tracing::debug!("portforward spdy write: {e}");
                break;
            }
        }
        let _ = sink.close().await;
    });
    let done = CancellationToken::new();
    let streams: Arc<std::sync::Mutex<HashMap<u32, StreamState>>> = Arc::default();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut last_id = 0u32;

    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("portforward spdy read: {e}");
                let _ = out
                    .send(Frame::GoAway {
                        last_good: last_id,
                        status: 1,
                    })
                    .await;
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                // Client streams are odd and increasing (spdystream's check).
                if stream_id % 2 == 0 || stream_id <= last_id {
                    let _ = out
                        .send(Frame::RstStream {
                            stream_id,
                            status: spdy::RST_PROTOCOL_ERROR,
                        })
                        .await;
                    continue;
                }
                last_id = stream_id;
                let (port, kind) = match check_stream(&headers) {
                    Ok(v) => v,
                    Err(msg) => {
                        tracing::debug!("portforward stream {stream_id} rejected: {msg}");
                        let _ = out
                            .send(Frame::RstStream {
                                stream_id,
                                status: spdy::RST_CANCEL,
                            })
                            .await;
                        continue;
                    }
                };
                // The request id pairs the two streams; clients that send
                // none get the kubelet's guess from the stream ids.
                let request_id = spdy::header(&headers, "requestid")
                    .map(str::to_string)
                    .unwrap_or_else(|| match kind {
                        StreamKind::Error => stream_id.to_string(),
                        StreamKind::Data => stream_id.saturating_sub(2).to_string(),
                    });
                let reset = CancellationToken::new();
                let rx = if kind == StreamKind::Data && flags & FLAG_FIN == 0 {
                    let (tx, rx) = mpsc::channel(TO_POD_QUEUE);
                    lock(&streams).insert(
                        stream_id,
                        StreamState {
                            to_pod: Some(tx),
                            reset: reset.clone(),
                        },
                    );
                    Some(rx)
                } else {
                    lock(&streams).insert(
                        stream_id,
                        StreamState {
                            to_pod: None,
                            reset: reset.clone(),
                        },
                    );
                    None
                };
                let _ = out
                    .send(Frame::SynReply {
                        stream_id,
                        flags: 0,
                        headers: Vec::new(),
                    })
                    .await;
                let pair = pairs.entry(request_id.clone()).or_default();
                pair.port = port;
                match kind {
                    StreamKind::Error => pair.error = Some(stream_id),
                    StreamKind::Data => {
                        let rx = rx.unwrap_or_else(|| mpsc::channel(1).1);
                        pair.data = Some((stream_id, rx, reset));
                    }
                }
                if pair.error.is_some() && pair.data.is_some() {
                    let Some(pair) = pairs.remove(&request_id) else {
                        continue;
                    };
                    tokio::spawn(forward_pair(
                        pair,
                        pod.clone(),
                        out.clone(),
                        streams.clone(),
                        done.clone(),
                    ));
                }
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let tx = lock(&streams)
                    .get(&stream_id)
                    .and_then(|s| s.to_pod.clone());
                if let Some(tx) = tx
                    && !data.is_empty()
                {
                    // A pod side that is gone just drops the bytes.
                    let _ = tx.send(data).await;
                }
                if flags & FLAG_FIN != 0
                    && let Some(s) = lock(&streams).get_mut(&stream_id)
                {
                    s.to_pod = None;
                }
            }
            Frame::RstStream { stream_id, .. } => {
                if let Some(s) = lock(&streams).remove(&stream_id) {
                    s.reset.cancel();
                }
            }
            Frame::Ping { id } => {
                // The client's pings are odd; answer them. (This side sends
                // none, so an even one is not a reply to anything.)
                if id % 2 == 1 {
                    let _ = out.send(Frame::Ping { id }).await;
                }
            }
            Frame::GoAway { .. } => {
                // The client is going: no new streams will come; the
                // connection ends when it closes.
            }
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {
                // spdystream (the kubelet's SPDY) keeps no flow-control
                // windows and sends no SETTINGS; neither does this side.
            }
        }
    }
    // The client is gone: stop every forwarded connection.
    done.cancel();
    for (_, s) in lock(&streams).drain() {
        s.reset.cancel();
    }
    drop(out);
    let _ = writer.await;
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Error,
    Data,
}

/// The kubelet's checks of a new stream's headers, with its messages.
fn check_stream(h: &spdy::Headers) -> Result<(u16, StreamKind), String> {
    let port = spdy::header(h, "port").unwrap_or("");
    if port.is_empty() {
        return Err("\"port\" header is required".to_string());
    }
    let port: u16 = match port.parse::<u16>() {
        Ok(0) => return Err(format!("port {port:?} must be > 0")),
        Ok(p) => p,
        Err(e) => return Err(format!("unable to parse {port:?} as a port: {e}")),
    };
    match spdy::header(h, "streamtype").unwrap_or("") {
        "" => Err("\"streamType\" header is required".to_string()),
        "error" => Ok((port, StreamKind::Error)),
        "data" => Ok((port, StreamKind::Data)),
        other => Err(format!("invalid stream type {other:?}")),
    }
}

/// One forwarded connection: dial the pod's port; on failure write the
/// message to the error stream; else copy both ways. Then close the error
/// stream, then the data stream (the kubelet's order).
async fn forward_pair(
    pair: Pair,
    pod: Arc<Pod>,
    out: mpsc::Sender<Frame>,
    streams: Arc<std::sync::Mutex<HashMap<u32, StreamState>>>,
    done: CancellationToken,
) {
    let (Some(error_id), Some((data_id, mut to_pod, reset))) = (pair.error, pair.data) else {
        return;
    };
    let port = pair.port;
    let target = PodTarget {
        uid: pod.uid.clone(),
        ip: pod.ip,
        port,
    };
    let fin = |stream_id| Frame::Data {
        stream_id,
        flags: FLAG_FIN,
        data: Bytes::new(),
    };
    let dialed = tokio::select! {
        r = (pod.dialer)(target) => r,
        _ = done.cancelled() => return,
    };
    let mut data_fin_sent = false;
    match dialed {
        Err(e) => {
            let msg = dial_error(port, &pod.full_name, &e);
            tracing::debug!("{msg}");
            let _ = out
                .send(Frame::Data {
                    stream_id: error_id,
                    flags: 0,
                    data: Bytes::from(msg),
                })
                .await;
        }
        Ok(conn) => {
            let (mut pr, mut pw) = conn.into_split();
            // Pod → client.
            let up = {
                let out = out.clone();
                let reset = reset.clone();
                async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        let n = tokio::select! {
                            r = pr.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            },
                            _ = reset.cancelled() => return false,
                        };
                        let frame = Frame::Data {
                            stream_id: data_id,
                            flags: 0,
                            data: Bytes::copy_from_slice(&buf[..n]),
                        };
                        tokio::select! {
                            r = out.send(frame) => if r.is_err() { return false },
                            _ = reset.cancelled() => return false,
                        }
                    }
                    // The pod closed its side: FIN on the data stream.
                    out.send(fin(data_id)).await.is_ok()
                }
            };
            // Client → pod; the client's FIN half-closes towards the pod.
            let down = {
                let reset = reset.clone();
                async move {
                    loop {
                        tokio::select! {
                            chunk = to_pod.recv() => match chunk {
                                Some(b) => {
                                    if pw.write_all(&b).await.is_err() {
                                        break;
                                    }
                                }
                                None => break,
                            },
                            _ = reset.cancelled() => break,
                        }
                    }
                    let _ = pw.shutdown().await;
                }
            };
            tokio::pin!(up, down);
            // containerd: when one direction ends, the other gets a
            // second more, then the connection is closed.
            tokio::select! {
                sent = &mut up => {
                    data_fin_sent = sent;
                    let _ = tokio::time::timeout(LINGER, &mut down).await;
                }
                _ = &mut down => {
                    if let Ok(sent) = tokio::time::timeout(LINGER, &mut up).await {
                        data_fin_sent = sent;
                    }
                }
                _ = done.cancelled() => return,
            }
        }
    }
    let _ = out.send(fin(error_id)).await;
    if !data_fin_sent && !reset.is_cancelled() {
        let _ = out.send(fin(data_id)).await;
    }
    let mut s = lock(&streams);
    s.remove(&error_id);
    s.remove(&data_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spdy::{FrameDecoder, FrameEncoder, RST_CANCEL};
    use std::net::Ipv4Addr;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    /// A SPDY client on one end of a pipe whose other end is a session
    /// forwarding to this machine's loopback.
    struct Client {
        rx: FramedRead<ReadHalf<DuplexStream>, FrameDecoder>,
        tx: FramedWrite<WriteHalf<DuplexStream>, FrameEncoder>,
    }

    impl Client {
        fn start() -> Self {
            let (near, far) = tokio::io::duplex(64 * 1024);
            let dialer: Dialer =
                Arc::new(|t: PodTarget| Box::pin(tokio::net::TcpStream::connect((t.ip, t.port))));
            tokio::spawn(spdy_session(
                far,
                Pod {
                    full_name: "web-1_default".to_string(),
                    uid: "u".to_string(),
                    ip: Ipv4Addr::LOCALHOST.into(),
                    dialer,
                },
            ));
            let (r, w) = tokio::io::split(near);
            Client {
                rx: FramedRead::new(r, FrameDecoder::new()),
                tx: FramedWrite::new(w, FrameEncoder::new()),
            }
        }

        async fn send(&mut self, f: Frame) {
            self.tx.send(f).await.expect("send");
        }

        async fn open(&mut self, id: u32, kind: &str, port: u16, request: &str) {
            let headers = vec![
                ("streamtype".to_string(), kind.to_string()),
                ("port".to_string(), port.to_string()),
                ("requestid".to_string(), request.to_string()),
            ];
            self.send(Frame::SynStream {
                stream_id: id,
                associated: 0,
                priority: 0,
                flags: 0,
                headers,
            })
            .await;
        }

        async fn next(&mut self) -> Frame {
            tokio::time::timeout(Duration::from_secs(10), self.rx.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("a valid frame")
        }

        async fn expect_reply(&mut self, id: u32) {
            match self.next().await {
                Frame::SynReply { stream_id, .. } if stream_id == id => {}
                f => panic!("want SYN_REPLY {id}, got {f:?}"),
            }
        }
    }

    fn fin(stream_id: u32) -> Frame {
        Frame::Data {
            stream_id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        }
    }

    /// A port nothing listens on.
    async fn refused_port() -> u16 {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn refused_then_good_connection_on_one_session() {
        let mut c = Client::start();

        // Nothing listens: the message on the error stream, then FIN on
        // the error stream, then on the data stream.
        let bad = refused_port().await;
        c.open(1, "error", bad, "0").await;
        c.expect_reply(1).await;
        c.send(fin(1)).await;
        c.open(3, "data", bad, "0").await;
        c.expect_reply(3).await;
        match c.next().await {
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data,
            } => {
                let msg = String::from_utf8_lossy(&data).into_owned();
                assert!(
                    msg.starts_with(&format!(
                        "error forwarding port {bad} to pod web-1_default, uid : "
                    )) && msg.ends_with("connect: connection refused"),
                    "{msg}"
                );
            }
            f => panic!("want the error message, got {f:?}"),
        }
        assert_eq!(c.next().await, fin(1));
        assert_eq!(c.next().await, fin(3));

        // PINGs are answered.
        c.send(Frame::Ping { id: 1 }).await;
        assert_eq!(c.next().await, Frame::Ping { id: 1 });

        // A stream without a port is refused, as the kubelet does.
        c.send(Frame::SynStream {
            stream_id: 5,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamtype".to_string(), "data".to_string())],
        })
        .await;
        assert_eq!(
            c.next().await,
            Frame::RstStream {
                stream_id: 5,
                status: RST_CANCEL
            }
        );

        // The same session then forwards a good connection, byte-exact.
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let good = l.local_addr().expect("addr").port();
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let served = blob.clone();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.expect("read request");
            assert_eq!(req, b"hello pod");
            s.write_all(&served).await.expect("write");
        });
        c.open(7, "error", good, "1").await;
        c.expect_reply(7).await;
        c.send(fin(7)).await;
        c.open(9, "data", good, "1").await;
        c.expect_reply(9).await;
        c.send(Frame::Data {
            stream_id: 9,
            flags: 0,
            data: Bytes::from_static(b"hello "),
        })
        .await;
        c.send(Frame::Data {
            stream_id: 9,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"pod"),
        })
        .await;
        let mut got = Vec::new();
        let mut error_closed = false;
        loop {
            match c.next().await {
                Frame::Data {
                    stream_id: 9,
                    flags,
                    data,
                } => {
                    got.extend_from_slice(&data);
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                f if f == fin(7) => error_closed = true,
                f => panic!("unexpected {f:?}"),
            }
        }
        assert_eq!(got.len(), blob.len());
        assert!(got == blob, "bytes differ");
        if !error_closed {
            assert_eq!(c.next().await, fin(7), "error stream closed, empty");
        }
    }

    #[tokio::test]
    async fn a_reset_stops_the_copy() {
        let mut c = Client::start();
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            // Writes until the session drops the connection.
            let chunk = vec![0u8; 16 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
            let _ = closed_tx.send(());
        });
        c.open(1, "error", port, "0").await;
        c.expect_reply(1).await;
        c.open(3, "data", port, "0").await;
        c.expect_reply(3).await;
        // Some data flows, then the client resets the data stream.
        match c.next().await {
            Frame::Data { stream_id: 3, .. } => {}
            f => panic!("want data, got {f:?}"),
        }
        c.send(Frame::RstStream {
            stream_id: 3,
            status: RST_CANCEL,
        })
        .await;
        // Drain until the error stream's FIN: the pod connection is closed.
        loop {
            match c.next().await {
                Frame::Data { stream_id: 3, .. } => {}
                f if f == fin(1) => break,
                f => panic!("unexpected {f:?}"),
            }
        }
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("pod connection closed in time")
            .expect("closed");
    }
}
