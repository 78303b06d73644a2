//! The gateway's control API, shared with the client: JSON over HTTP/1.1 on
//! the control port, reached through a port-forward (so being allowed to
//! port-forward to the gateway pod is the authorisation, as with kubectl).
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/info` | | [`Info`] |
//! | `POST /v1/peers` | [`RegisterRequest`] | [`Registration`] (idempotent; also the heartbeat) |
//! | `DELETE /v1/peers/{public key, base64url}` | | 204 (also stops its reroutes) |
//! | `GET /v1/reroutes` | | `[`[`Reroute`]`]` |
//! | `POST /v1/reroutes` | [`RerouteRequest`] | [`RerouteGrant`]; 409 when another laptop holds the port |
//! | `POST /v1/reroutes/stop` | [`StopRequest`] | [`Stopped`] |
//! | `POST /v1/leases` | [`LeaseRenewal`] | 204; 404 when the laptop has no reroute |
//!
//! Errors are [`ApiError`] bodies with a 4xx/5xx status.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// TCP port of the control API in the gateway pod.
pub const CONTROL_PORT: u16 = 51822;
/// WireGuard over UDP.
pub const WIREGUARD_PORT: u16 = 51820;
/// WireGuard datagrams length-framed over TCP (the port-forward transport).
pub const FRAMED_PORT: u16 = 51821;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 9090;

/// What the gateway is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    pub version: String,
    /// The gateway's WireGuard public key, base64.
    pub public_key: String,
    pub wireguard_port: u16,
    pub framed_port: u16,
    pub mtu: u16,
    /// The network tunnel addresses are handed out from.
    pub tunnel_network: String,
    pub cluster: ClusterFacts,
    pub peers: usize,
}

/// What the gateway knows of the cluster from inside it, read exactly as
/// any pod would: its own `/etc/resolv.conf` and its own address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ClusterFacts {
    /// E.g. `cluster.local`: the last search domain of the form
    /// `svc.<domain>` minus `svc.`.
    pub domain: String,
    /// The pod's nameservers (kube-dns).
    pub dns_servers: Vec<IpAddr>,
    /// The pod's search list.
    pub search: Vec<String>,
    /// The pod's `options` line, e.g. `ndots:5`.
    pub options: Vec<String>,
    /// The gateway pod's own IP.
    pub pod_ip: Option<IpAddr>,
}

/// Register (or refresh) a laptop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisterRequest {
    /// The laptop's WireGuard public key, base64.
    pub public_key: String,
    /// A human name for the laptop (hostname and user), shown to others.
    pub name: String,
    /// The tunnel address the laptop had before, to keep it across
    /// reconnects when it is still free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_address: Option<IpAddr>,
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registration {
    /// The laptop's tunnel address (a host address inside `tunnel_network`).
    pub address: IpAddr,
    /// The gateway's own tunnel address (also inside `tunnel_network`).
    pub gateway_address: IpAddr,
    pub info: Info,
    /// Seconds without a handshake or registration after which the gateway
    /// forgets the laptop.
    pub expiry_secs: u64,
}

/// `GET /v1/peers/{key}`: one laptop as the gateway sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    pub address: IpAddr,
    pub name: String,
    /// Open TCP flows (including ones the gateway is still dialling).
    pub tcp_flows: usize,
    /// Open UDP flows (until their idle expiry).
    pub udp_flows: usize,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    pub error: String,
}

/// How a rerouted port's connections are handled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes: every connection goes to the laptop; nothing listening there
    /// resets the caller.
    #[default]
    Tcp,
    /// HTTP: like `tcp`, but a laptop that does not answer gives the caller
    /// a 502; header routes are HTTP.
    Http,
}

/// One port of the rerouted Service (every TCP port gets a gateway
/// listener; the ports not rerouted pass through to the shadow Service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name in the Service ("" when unnamed).
    pub name: String,
    pub port: u16,
}

/// `POST /v1/reroutes`: send a Service port's traffic to a laptop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RerouteRequest {
    /// The laptop's WireGuard public key, base64 (it must be registered).
    pub public_key: String,
    pub namespace: String,
    pub service: String,
    /// Every TCP port of the Service.
    pub ports: Vec<ServicePort>,
    /// The Service port rerouted.
    pub port: u16,
    /// Where the laptop listens on its tunnel address (the daemon hands the
    /// connections on to 127.0.0.1 of the same port).
    pub laptop_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Only requests carrying this header (name, value) go to the laptop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<(String, String)>,
    /// Take a global reroute over from whoever holds it.
    #[serde(default)]
    pub force: bool,
    /// The shadow Service's ClusterIP: where traffic not rerouted goes.
    pub shadow_ip: IpAddr,
}

/// The answer to a [`RerouteRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RerouteGrant {
    /// The gateway pod's listener port for each Service port (by port
    /// number), for the EndpointSlice.
    pub listeners: Vec<(ServicePort, u16)>,
    /// Renew within this many seconds (`POST /v1/leases`) or the reroute
    /// is dropped and the Service restored.
    pub lease_secs: u64,
    /// The previous global holder, when `force` took it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_over_from: Option<String>,
}

/// A reroute as `GET /v1/reroutes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reroute {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub laptop_port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<(String, String)>,
    /// The laptop's name (hostname and user) and tunnel address.
    pub laptop: String,
    pub laptop_address: IpAddr,
    /// Unix seconds.
    pub since: u64,
    /// The laptop's public key, base64.
    pub public_key: String,
}

/// `DELETE /v1/reroutes`: stop one laptop's reroute of a Service port
/// (`port` None: all its ports of that Service; `service` None: all).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StopRequest {
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a stop left: the Services no laptop reroutes any more (restored by
/// the gateway, and restorable by the client too — restore is idempotent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Stopped {
    pub stopped: Vec<Reroute>,
    /// (namespace, service) pairs with no reroute left.
    pub released: Vec<(String, String)>,
}

/// `POST /v1/leases`: the laptop is alive; its reroutes are renewed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRenewal {
    pub public_key: String,
}
