//! The daemon's client of the gateway's control API ([`burrow_api`]), over
//! hyper: registration through a port-forward to the pod's loopback-only
//! port ([`register`], with the proof of the key), and the laptop's own API
//! through the tunnel ([`TunnelApi`]). Answers are typed; a refusal is a
//! [`GatewayError::Refused`] with its status code, which callers match on.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::x25519::StaticSecret;
use burrow_api::{
    ApiError, CONTROL_PORT, Info, Leases, PeerInfo, RegisterRequest, Registration, Reroute,
    RerouteGrant, RerouteRequest, StopRequest, Stopped, WgKey,
};
use burrow_deploy::Cluster;
use burrow_deploy::install::GatewayPod;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use super::PROBE_TIMEOUT;

/// What a call to the gateway came to, when not what was asked.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway answered with an error status; `message` is its
    /// [`ApiError`] (or the body, when it is not one).
    #[error("the gateway answered {}: {message}", status.as_u16())]
    Refused { status: StatusCode, message: String },
    /// No answer, or one that is not understood.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl GatewayError {
    /// The status of a refusal.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            GatewayError::Refused { status, .. } => Some(*status),
            GatewayError::Failed(_) => None,
        }
    }
}

/// One HTTP/1.1 connection to the control API.
struct Conn {
    send: SendRequest<Full<Bytes>>,
}

impl Conn {
    /// A client connection over `stream`, driven by a task of its own
    /// until both ends are done with it.
    async fn over<S>(stream: S) -> anyhow::Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with the gateway")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection to the gateway's control API: {e}");
            }
        });
        Ok(Self { send })
    }

    /// One request; the answer's body parsed as `T` (`()` takes any body).
    async fn call<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, GatewayError> {
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).context("encoding the request")?),
            None => Bytes::new(),
        };
        let request = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "burrow-gateway")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .context("building the request")?;
        self.send
            .ready()
            .await
            .context("the gateway closed the connection")?;
        let answer = self
            .send
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path}: no answer from the gateway"))?;
        let status = answer.status();
        let bytes = answer
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {path}: reading the gateway's answer"))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(GatewayError::Refused { status, message });
        }
        if bytes.is_empty() {
            // 204: `()` (or any type that accepts JSON null).
            return serde_json::from_slice(b"null")
                .with_context(|| format!("{method} {path}: the gateway's answer is empty"))
                .map_err(GatewayError::from);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: the gateway's answer is not understood"))
            .map_err(GatewayError::from)
    }
}

const NO_BODY: Option<&()> = None;

/// The laptop's own API at the gateway's tunnel address, through the
/// tunnel: the gateway knows the caller by its WireGuard peer. One
/// connection per call.
#[derive(Debug, Clone, Copy)]
pub struct TunnelApi {
    pub gateway: IpAddr,
}

impl TunnelApi {
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, GatewayError> {
        let stream = tokio::net::TcpStream::connect((self.gateway, CONTROL_PORT))
            .await
            .with_context(|| format!("connecting to the gateway at {}", self.gateway))?;
        Conn::over(stream).await?.call(method, path, body).await
    }

    /// `GET /v1/peer`: this laptop as the gateway sees it.
    pub async fn peer(&self) -> Result<PeerInfo, GatewayError> {
        self.call(Method::GET, "/v1/peer", NO_BODY).await
    }

    /// `DELETE /v1/peer`: forget this laptop (and stop its reroutes).
    pub async fn unregister(&self) -> Result<(), GatewayError> {
        self.call(Method::DELETE, "/v1/peer", NO_BODY).await
    }

    /// `GET /v1/reroutes`: this laptop's reroutes.
    pub async fn reroutes(&self) -> Result<Vec<Reroute>, GatewayError> {
        self.call(Method::GET, "/v1/reroutes", NO_BODY).await
    }

    /// `POST /v1/reroutes`: 403 without the Service's record naming this
    /// laptop, 409 when another laptop holds the port or the header.
    pub async fn reroute(&self, req: &RerouteRequest) -> Result<RerouteGrant, GatewayError> {
        self.call(Method::POST, "/v1/reroutes", Some(req)).await
    }

    /// `POST /v1/reroutes/stop`.
    pub async fn stop(&self, req: &StopRequest) -> Result<Stopped, GatewayError> {
        self.call(Method::POST, "/v1/reroutes/stop", Some(req))
            .await
    }

    /// `POST /v1/leases`: 404 when the gateway knows no reroute of this
    /// laptop.
    pub async fn renew(&self) -> Result<Leases, GatewayError> {
        self.call(Method::POST, "/v1/leases", NO_BODY).await
    }
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
        let fwd =
            burrow_deploy::portforward::open(cluster, &pod.namespace, &pod.name, CONTROL_PORT)
                .await?;
        let mut conn = Conn::over(fwd.stream).await?;
        let info: Info =
            conn.call(Method::GET, "/v1/info", NO_BODY)
                .await
                .map_err(|e| match e {
                    GatewayError::Refused { status, message } => anyhow::anyhow!(
                        "the gateway refused to say who it is ({}): {message}",
                        status.as_u16()
                    ),
                    GatewayError::Failed(e) => e,
                })?;
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
        conn.call::<Registration>(Method::POST, "/v1/peers", Some(&req))
            .await
            .map_err(|e| match e {
                GatewayError::Refused { status, message } => anyhow::anyhow!(
                    "the gateway refused the registration ({}): {message}",
                    status.as_u16()
                ),
                GatewayError::Failed(e) => e,
            })
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .context("registering with the gateway took more than 15s")?
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
    let api = TunnelApi { gateway };
    let deadline = Instant::now() + PROBE_TIMEOUT;
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), api.peer()).await;
        match attempt {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(GatewayError::Refused { status, message })) if Instant::now() > deadline => {
                anyhow::bail!("probe: the gateway answered {}: {message}", status.as_u16());
            }
            Ok(Err(GatewayError::Failed(e))) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("probe: {e}"));
            }
            Err(_) if Instant::now() > deadline => {
                anyhow::bail!("probe: no answer in {}s", PROBE_TIMEOUT.as_secs())
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Response;

    /// A stand-in gateway on one end of an in-memory stream: answers by
    /// path, on one keep-alive connection.
    async fn gateway() -> Conn {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let (status, body) = match req.uri().path() {
                        "/v1/peer" if req.method() == Method::DELETE => (204, String::new()),
                        "/v1/peer" => (
                            200,
                            r#"{"address":"198.19.0.2","name":"a@b","tcp_flows":3,"udp_flows":1}"#
                                .into(),
                        ),
                        "/v1/reroutes" => (409, r#"{"error":"held by laptop x"}"#.into()),
                        _ => (502, "bad gateway".into()),
                    };
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(body)))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        Conn::over(client).await.expect("handshake")
    }

    #[tokio::test]
    async fn answers_are_typed_and_refusals_keep_their_status() {
        let mut c = gateway().await;
        let peer: PeerInfo = c
            .call(Method::GET, "/v1/peer", NO_BODY)
            .await
            .expect("peer");
        assert_eq!((peer.tcp_flows, peer.udp_flows), (3, 1));
        // The same connection again: 204 is `()`.
        let () = c
            .call(Method::DELETE, "/v1/peer", NO_BODY)
            .await
            .expect("204");
        let req = StopRequest::default();
        match c
            .call::<Vec<Reroute>>(Method::POST, "/v1/reroutes", Some(&req))
            .await
        {
            Err(GatewayError::Refused { status, message }) => {
                assert_eq!(status, StatusCode::CONFLICT);
                assert_eq!(message, "held by laptop x");
            }
            other => panic!("{other:?}"),
        }
        let e = c
            .call::<()>(Method::GET, "/elsewhere", NO_BODY)
            .await
            .expect_err("502");
        assert_eq!(e.status(), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(e.to_string(), "the gateway answered 502: bad gateway");
    }
}
