//! The gateway's control API, shared with the client: JSON over HTTP/1.1 on
//! the control port, reached through a port-forward (so being allowed to
//! port-forward to the gateway pod is the authorisation, as with kubectl).
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/info` | | [`Info`] |
//! | `POST /v1/peers` | [`RegisterRequest`] | [`Registration`] (idempotent; also the heartbeat) |
//! | `DELETE /v1/peers/{public key, base64url}` | | 204 |
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
