//! mc-echo: the miniature cluster's HTTP echo server (image `burrow/echo`).
//!
//! Listens on 0.0.0.0:$PORT (default 8080), speaks HTTP/1.1 (keep-alive) and
//! h2c with prior knowledge, and answers every request with 200 and a JSON
//! body: `{"pod", "method", "path", "version", "headers", "body_len"}`, where `pod` is
//! $POD_NAME, else $HOSTNAME, else the host name. `GET /healthz` answers `ok`.
//!
//! Must never: listen anywhere but the configured port, or do anything with a
//! request but describe it.

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
