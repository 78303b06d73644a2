//! `pods/portforward` over WebSocket, as the kubelet's streaming server
//! speaks it behind the real API server (`v4.channel.k8s.io`): binary
//! frames whose first byte is the channel; for the port at index i, data on
//! channel 2i and errors on channel 2i+1; each channel first carries the
//! port number (2 bytes, little-endian).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::error::ApiError;
use crate::server::{Body, Dialer, PodTarget, empty_body};

/// Subprotocols spoken, preferred first.
const PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "channel.k8s.io"];

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
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
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
                let msg = format!(
                    "error forwarding port {port} to pod {pod}, uid : failed to execute portforward in network namespace of the pod: failed to connect to localhost:{port} inside namespace: IPv4: dial tcp4 127.0.0.1:{port}: {e}"
                );
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
