//! mc-echo: the miniature cluster's HTTP echo server (image `burrow/echo`).
//!
//! Listens on 0.0.0.0:$PORT (default 8080), speaks HTTP/1.1 (keep-alive) and
//! h2c with prior knowledge, and answers every request with 200 and a JSON
//! body: `{"pod", "method", "path", "version", "headers", "body_len"}`, where `pod` is
//! $POD_NAME, else $HOSTNAME, else the host name. `GET /healthz` answers `ok`.
//!
//! `mc-echo udp` (image `burrow/echo`, args `["udp"]`) is the cluster's UDP
//! echo instead: every datagram on 0.0.0.0:$PORT (up to 65,507 bytes) goes
//! back whole to its sender, from one socket. It replaced
//! `socat UDP-RECVFROM:PORT,fork PIPE`, whose forked child for one sender
//! could stay alive reading the shared socket and throwing away every
//! other sender's datagrams, until the pod was restarted (reproduced
//! with two clients sending the datagram test's sizes: the echo went
//! silent after a few hundred datagrams).
//!
//! Must never: listen anywhere but the configured port, or do anything with a
//! request or datagram but describe or return it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;

fn full(s: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(s.into())
}

fn pod_name() -> String {
    for var in ["POD_NAME", "HOSTNAME"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            return v;
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

async fn handle(
    pod: Arc<String>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if method == "GET" && req.uri().path() == "/healthz" {
        return Ok(Response::builder()
            .header("content-type", "text/plain")
            .body(full("ok\n"))
            .unwrap_or_default());
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    if let Some(auth) = req.uri().authority() {
        // HTTP/2 carries the host in :authority.
        headers
            .entry("host".into())
            .or_insert_with(|| auth.to_string());
    }
    let body_len = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let body = serde_json::json!({
        "pod": *pod,
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_len": body_len,
    });
    let mut text = body.to_string();
    text.push('\n');
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(full(text))
        .unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = match std::env::var("PORT") {
        Ok(p) if !p.is_empty() => p
            .parse()
            .map_err(|_| anyhow::anyhow!("PORT={p:?} is not a port number"))?,
        _ => 8080,
    };
    if std::env::args().nth(1).as_deref() == Some("udp") {
        return udp_echo(port).await;
    }
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let pod = Arc::new(pod_name());
    eprintln!("mc-echo: pod {pod} listening on 0.0.0.0:{port}");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mc-echo: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pod = pod.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(pod.clone(), req));
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Every datagram back to its sender, whole.
async fn udp_echo(port: u16) -> anyhow::Result<()> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port)).await?;
    eprintln!("mc-echo: echoing UDP on 0.0.0.0:{port}");
    // Room for the largest datagram IPv4 carries (65,507 bytes of payload).
    let mut buf = vec![0u8; 65_536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer).await {
                    eprintln!("mc-echo: sending {n} bytes to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("mc-echo: receiving: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
