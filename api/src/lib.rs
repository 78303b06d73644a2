//! burrow-api: what the laptop and the gateway share, as data and pure
//! functions: the control API's wire types (this module), [`WgKey`] (a
//! WireGuard key, base64 only in JSON, files and logs), [`names`]
//! (Kubernetes name checks before anything reaches a URL, burrow's derived
//! names), [`proof`] (the registration proof), [`record`] (what a reroute
//! writes on a user's Service, and the patches that undo it) and
//! [`resolv`] (resolv.conf, for the gateway's cluster facts and the
//! laptop's DNS upstreams).
//!
//! Must never: do I/O, or depend on a Kubernetes client, an async runtime
//! or an HTTP stack (`scripts/check-deps.sh` checks it).
//!
//! The gateway's control API, shared with the client: JSON over HTTP/1.1
//! on [`CONTROL_PORT`], served in two places that differ in who can reach
//! them, and so in what they trust:
//!
//! **Registration**, on the pod's loopback address only: reached through
//! `kubectl port-forward` (the kubelet connects to `localhost` inside the
//! pod), so being allowed `pods/portforward` on the gateway pod is the
//! authorisation, as with kubectl; no other pod and no laptop's tunnel
//! reaches it. The laptop proves it holds the private key of the public key
//! it registers ([`proof`]), over a nonce from `GET /v1/info`.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/info` | | [`Info`] (with a fresh registration nonce) |
//! | `POST /v1/peers` | [`RegisterRequest`] | [`Registration`] (idempotent; also the heartbeat) |
//!
//! **The laptop's own calls**, on the gateway's tunnel address (the first
//! host of the tunnel network), inside the tunnel: the gateway's userspace
//! stack terminates these connections itself, and the caller *is* the
//! WireGuard peer that owns the connection's source address (the tunnel
//! authenticates every packet and drops forged sources). No call names a
//! laptop or a key: each acts on the caller's own peer.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/peer` | | [`PeerInfo`] |
//! | `DELETE /v1/peer` | | 204 (also stops its reroutes) |
//! | `GET /v1/reroutes` | | `[`[`Reroute`]`]`: the caller's own |
//! | `POST /v1/reroutes` | [`RerouteRequest`] | [`RerouteGrant`]; 403 without the Service's reroute record naming the caller; 409 when another laptop holds the port |
//! | `POST /v1/reroutes/stop` | [`StopRequest`] | [`Stopped`] |
//! | `POST /v1/leases` | | 204; 404 when the laptop has no reroute |
//!
//! Errors are [`ApiError`] bodies with a 4xx/5xx status.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

mod key;
pub mod names;
pub mod proof;
pub mod record;
pub mod resolv;

pub use key::{KeyError, WgKey};

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
    /// The gateway's WireGuard public key.
    pub public_key: WgKey,
    pub wireguard_port: u16,
    pub framed_port: u16,
    pub mtu: u16,
    /// The network tunnel addresses are handed out from.
    pub tunnel_network: String,
    pub cluster: ClusterFacts,
    /// A nonce to prove key possession with in the next
    /// [`RegisterRequest`] (only `GET /v1/info` fills it in; valid for
    /// [`proof::NONCE_LIFETIME_SECS`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub registration_nonce: String,
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
    /// The laptop's WireGuard public key.
    pub public_key: WgKey,
    /// A human name for the laptop (hostname and user), shown to others.
    pub name: String,
    /// The tunnel address the laptop had before, to keep it across
    /// reconnects when it is still free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_address: Option<IpAddr>,
    /// The nonce from `GET /v1/info`.
    pub nonce: String,
    /// [`proof::sign`] of the nonce: shows the laptop holds the private key.
    pub proof: String,
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
    /// forgets the laptop (its grace: `burrow-gateway --peer-grace`).
    pub expiry_secs: u64,
    /// Whether the gateway knew the key before this call (a refresh):
    /// false on a first registration, and on one after the gateway forgot
    /// the laptop (silent past its grace, or a new gateway process). None
    /// from gateways that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<bool>,
}

/// `GET /v1/peer`: the calling laptop as the gateway sees it.
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

/// How a rerouted port's connections are handled when nothing listens on
/// the laptop (a laptop that is not reachable at all sends its callers to
/// the cluster's pods whatever the protocol).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Told by the caller's first bytes: an HTTP/1 request line or the
    /// HTTP/2 preface is answered like `http`, anything else like `tcp`.
    /// The default since issue 14 (before: `tcp`).
    #[default]
    Auto,
    /// Bytes: every connection goes to the laptop; nothing listening there
    /// resets the caller.
    Tcp,
    /// HTTP: like `tcp`, but a laptop that does not answer gives the caller
    /// a 502; header routes are HTTP.
    Http,
    /// Datagrams, for a UDP port (global routes only): every datagram a
    /// caller sends goes to the laptop, and the laptop's replies go back to
    /// that caller. Older gateways refuse it (unknown variant) rather than
    /// treat a UDP port as TCP.
    Udp,
}

impl Protocol {
    /// The transport of the Service port a route with this protocol takes.
    pub fn transport(self) -> PortProtocol {
        match self {
            Protocol::Auto | Protocol::Tcp | Protocol::Http => PortProtocol::Tcp,
            Protocol::Udp => PortProtocol::Udp,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Udp => "udp",
        }
    }
}

/// Where a rerouted connection goes when the laptop is reachable but
/// nothing listens on its local port.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// The caller is told: 502 naming the laptop (HTTP) or a reset (TCP).
    #[default]
    Error,
    /// The cluster's pods (the shadow Service) answer instead.
    Pods,
}

impl Fallback {
    pub fn is_error(&self) -> bool {
        *self == Fallback::Error
    }
}

/// A Service port's transport, spelled as Kubernetes spells it.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

impl PortProtocol {
    /// `TCP` or `UDP`, as in a Service or an EndpointSlice.
    pub fn as_k8s(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
        }
    }

    /// `tcp` or `udp`.
    pub fn lower(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// One port of the rerouted Service (every port gets a gateway listener,
/// a TCP listener or a UDP socket; the ports not rerouted pass through to
/// the shadow Service).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name in the Service ("" when unnamed).
    pub name: String,
    pub port: u16,
    /// TCP when absent (peers from before UDP ports were rerouted).
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// `POST /v1/reroutes`: send a Service port's traffic to the calling
/// laptop. The Service must carry the laptop's reroute record (written with
/// the user's own credentials); the fallback for traffic not rerouted is the
/// shadow Service as the gateway itself finds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RerouteRequest {
    pub namespace: String,
    pub service: String,
    /// Every port of the Service (TCP and UDP).
    pub ports: Vec<ServicePort>,
    /// The Service port rerouted: this number, with the transport
    /// `protocol` implies (`udp`: the UDP port, else the TCP port).
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
    /// Nothing listening on the laptop: tell the caller, or send it to the
    /// pods (`--fallback pods`).
    #[serde(default, skip_serializing_if = "Fallback::is_error")]
    pub fallback: Fallback,
}

/// Most ports a rerouted Service may have (each gets a listener).
pub const MAX_SERVICE_PORTS: usize = 100;

impl RerouteRequest {
    /// Checks every field that will reach a URL, a listener or a header
    /// match: names are Kubernetes names, ports are ports.
    pub fn validate(&self) -> Result<(), String> {
        names::check_namespace(&self.namespace)?;
        names::check_rerouted_service(&self.service)?;
        if self.ports.is_empty() || self.ports.len() > MAX_SERVICE_PORTS {
            return Err(format!(
                "a rerouted Service has 1 to {MAX_SERVICE_PORTS} ports, not {}",
                self.ports.len()
            ));
        }
        for p in &self.ports {
            if p.port == 0 {
                return Err("port 0 is not a Service port".into());
            }
            if !p.name.is_empty() {
                names::check_port_name(&p.name)?;
            }
        }
        let transport = self.protocol.transport();
        let has = |t: PortProtocol| {
            self.ports
                .iter()
                .any(|p| p.port == self.port && p.protocol == t)
        };
        if self.header.is_some()
            && (transport == PortProtocol::Udp
                || (!has(PortProtocol::Tcp) && has(PortProtocol::Udp)))
        {
            return Err(header_udp_refusal(
                &self.namespace,
                &self.service,
                self.port,
            ));
        }
        if !has(transport) {
            return Err(format!(
                "port {}/{transport} is not among the Service's ports",
                self.port
            ));
        }
        if self.laptop_port == 0 {
            return Err("the laptop's forwarder port must not be 0".into());
        }
        if let Some((name, value)) = &self.header {
            names::check_header(name, value)?;
        }
        Ok(())
    }
}

/// Why a header reroute of a UDP port is refused (the gateway and the
/// client say the same).
pub fn header_udp_refusal(namespace: &str, service: &str, port: u16) -> String {
    format!(
        "port {port} of Service {namespace}/{service} is UDP: header reroutes are HTTP-only \
         (each HTTP request is routed by its headers); a global reroute (without --header) \
         works for UDP ports"
    )
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

/// One of the caller's reroutes as `GET /v1/reroutes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reroute {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub laptop_port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<(String, String)>,
    /// Unix seconds.
    pub since: u64,
    /// What someone else changed on the Service while it is rerouted (its
    /// selector put back, its ports), as the gateway's watch saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<String>,
    #[serde(default, skip_serializing_if = "Fallback::is_error")]
    pub fallback: Fallback,
}

/// A global route taken over from the caller by another laptop's
/// `--force`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TakenOver {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// The laptop that took it.
    pub by: String,
}

/// `POST /v1/leases` answer: the caller's reroutes (renewed) and those
/// taken over from it lately (to drop, not to take back).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Leases {
    pub reroutes: Vec<Reroute>,
    #[serde(default)]
    pub taken_over: Vec<TakenOver>,
}

/// `POST /v1/reroutes/stop`: stop the caller's reroutes of a Service port
/// (`port` None: all its ports of that Service; `service` None: all).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StopRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl StopRequest {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(ns) = &self.namespace {
            names::check_namespace(ns)?;
        }
        if let Some(svc) = &self.service {
            names::check_service(svc)?;
        }
        Ok(())
    }
}

/// What a stop left: the caller's routes that went, and the Services no
/// laptop reroutes any more (restored by the gateway; the client restores
/// those of them it rerouted itself too — restore is idempotent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Stopped {
    pub stopped: Vec<Reroute>,
    /// (namespace, service) pairs with no reroute left.
    pub released: Vec<(String, String)>,
    /// What the restores left alone and why (a selector someone else put
    /// back stays), for the user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}
