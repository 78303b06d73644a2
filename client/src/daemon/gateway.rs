//! The daemon's calls to the gateway: registration through a
//! port-forward to its loopback-only port (with the proof of the key), and
//! the laptop's own API through the tunnel; one HTTP/1.1 exchange each.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::x25519::StaticSecret;
use burrow_api::{CONTROL_PORT, PeerInfo, RegisterRequest, Registration, WgKey};
use burrow_deploy::Cluster;
use burrow_deploy::install::GatewayPod;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt};

use super::*;

/// A call to the laptop's own API at the gateway's tunnel address, through
/// the tunnel: the gateway knows the caller by its WireGuard peer.
pub(crate) async fn tunnel_call(
    gateway: IpAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut conn = tokio::net::TcpStream::connect((gateway, CONTROL_PORT)).await?;
    http(&mut conn, method, path, body).await
}

/// `GET /v1/peer` through the tunnel.
pub(super) async fn peer_info(gateway: IpAddr) -> anyhow::Result<PeerInfo> {
    let (code, body) = tunnel_call(gateway, "GET", "/v1/peer", None).await?;
    if code != 200 {
        anyhow::bail!("HTTP {code}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// One HTTP/1.1 exchange over a byte stream; the answer has a
/// Content-Length (or ends with the stream).
pub(crate) async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    exchange(stream, method, path, body, true).await
}

/// One HTTP/1.1 exchange; with `close` false the stream stays usable for
/// the next (the gateway always answers with a Content-Length).
pub(super) async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    close: bool,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let body = body.unwrap_or_default();
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: burrow-gateway\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("the gateway closed the connection without answering");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("the gateway's answer is not HTTP")?;
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let mut body = buf[header_end..].to_vec();
    loop {
        if length.is_some_and(|l| body.len() >= l) {
            break;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if let Some(l) = length {
        body.truncate(l);
    }
    Ok((code, body))
}

/// Registers (or refreshes) this laptop through a fresh port-forward to
/// the gateway pod's loopback-only registration port: a nonce, then the
/// registration with the proof that this laptop holds its private key,
/// both over the one port-forward.
pub(super) async fn register(
    cluster: &Cluster,
    pod: &GatewayPod,
    key: &StaticSecret,
    previous: Option<IpAddr>,
) -> anyhow::Result<Registration> {
    let work = async {
        let mut fwd =
            burrow_deploy::portforward::open(cluster, &pod.namespace, &pod.name, CONTROL_PORT)
                .await?;
        let (code, answer) = exchange(&mut fwd.stream, "GET", "/v1/info", None, false).await?;
        if code >= 300 {
            anyhow::bail!(
                "the gateway refused to say who it is ({code}): {}",
                String::from_utf8_lossy(&answer)
            );
        }
        let info: burrow_api::Info = serde_json::from_slice(&answer)
            .context("the gateway's info answer is not understood")?;
        let req = RegisterRequest {
            public_key: WgKey::public_of(key),
            name: laptop_name(),
            previous_address: previous,
            proof: burrow_api::proof::sign(
                key,
                &info.public_key.public_key(),
                &info.registration_nonce,
            ),
            nonce: info.registration_nonce,
        };
        let body = serde_json::to_vec(&req)?;
        exchange(&mut fwd.stream, "POST", "/v1/peers", Some(&body), true).await
    };
    let (code, answer) = tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .context("registering with the gateway took more than 15s")??;
    if code >= 300 {
        anyhow::bail!(
            "the gateway refused the registration ({code}): {}",
            String::from_utf8_lossy(&answer)
        );
    }
    serde_json::from_slice(&answer).context("the gateway's registration answer is not understood")
}

pub(super) fn laptop_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "laptop".into());
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into());
    format!("{user}@{host}")
}

/// The laptop's own API through the tunnel (`GET /v1/peer`): proves the
/// tunnel carries packets both ways and the gateway knows this laptop.
pub(super) async fn probe(gateway: IpAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            tunnel_call(gateway, "GET", "/v1/peer", None),
        )
        .await;
        match attempt {
            Ok(Ok((200, _))) => return Ok(()),
            Ok(Ok((code, body))) if Instant::now() > deadline => {
                anyhow::bail!(
                    "probe: the gateway answered {code}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(Err(e)) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("probe: {e}"));
            }
            Err(_) if Instant::now() > deadline => {
                anyhow::bail!("probe: no answer in {}s", PROBE_TIMEOUT.as_secs())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
