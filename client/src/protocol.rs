//! What the CLI and the daemon say to each other: one JSON request line
//! on the daemon's Unix socket ([`socket_path`]), answered by
//! [`Reply::Progress`] lines and one [`Reply::Done`] or [`Reply::Error`].
//! Both sides depend on this module, never on each other's.

use std::path::{Path, PathBuf};

use burrow_api::{Fallback, Protocol, Reroute};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The daemon's socket in the run dir.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon.sock")
}

/// Which way WireGuard reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Auto,
    Udp,
    PortForward,
}

/// What `burrow connect` asks for, resolved by the CLI (the daemon's
/// environment differs from the user's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectRequest {
    pub kubeconfig: Option<PathBuf>,
    /// The CLI's KUBECONFIG list (merged like kubectl does), when no
    /// `--kubeconfig` was given.
    #[serde(default)]
    pub kubeconfig_list: Vec<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub gateway_namespace: String,
    pub transport: Transport,
    pub endpoint: Option<String>,
    /// Port-forward streams to open (None: the default).
    #[serde(default)]
    pub streams: Option<usize>,
    pub include: Vec<IpNet>,
    pub exclude: Vec<IpNet>,
    pub no_install: bool,
    pub no_upgrade: bool,
    #[serde(default)]
    pub dns: crate::dns::DnsSetting,
}

/// One request line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Connect(ConnectRequest),
    Status,
    Disconnect,
    // burrow reroute (client/src/reroute.rs)
    Reroute(Spec),
    RerouteStop(Stop),
    RerouteList,
}

/// One reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Progress {
        step: String,
    },
    Done {
        message: String,
        status: Option<Box<Status>>,
    },
    Error {
        message: String,
    },
}

/// How many [`Status::events`] are kept.
pub const MAX_EVENTS: usize = 10;

impl Status {
    /// Notes `what` happened now (UTC time of day in front).
    pub fn event(&mut self, what: impl std::fmt::Display) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            % 86_400;
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(format!(
            "{:02}:{:02}:{:02} {what}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        ));
    }
}

/// What `burrow status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Status {
    pub connected: bool,
    pub context: String,
    pub server: String,
    pub namespace: String,
    pub gateway_namespace: String,
    pub gateway_version: String,
    pub gateway_pod: String,
    pub gateway_pod_ip: String,
    pub transport: String,
    pub transport_reason: String,
    pub endpoint: String,
    pub device: String,
    pub tunnel_address: String,
    pub gateway_address: String,
    pub routes: Vec<String>,
    pub cluster_domain: String,
    pub dns_servers: Vec<String>,
    pub dns: String,
    pub handshake_age_secs: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Open flows as the gateway counts them (None: it did not answer).
    pub tcp_flows: Option<usize>,
    pub udp_flows: Option<usize>,
    pub reconnects: u64,
    pub last_reconnect_error: Option<String>,
    /// What happened to the connection since it was made, oldest first
    /// (the last [`MAX_EVENTS`]): sleeps, network changes, the gateway
    /// having forgotten the laptop, each with the UTC time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Connection attempts from the tunnel to ports burrow does not
    /// forward, dropped by the laptop's inbound filter.
    #[serde(default)]
    pub inbound_refused: u64,
    /// Packets the daemon's data path dropped: malformed or refused
    /// datagrams, WireGuard replays, packets not for the tunnel, a full
    /// link queue.
    #[serde(default)]
    pub packets_dropped: u64,
    /// Packets the kernel dropped before the daemon read them (the TUN
    /// device's queue was full; None: not known).
    #[serde(default)]
    pub tun_queue_dropped: Option<u64>,
    /// The kubeconfig file(s) `connect` was given (`--kubeconfig`, or
    /// KUBECONFIG's list); empty: the default. Later commands use them
    /// when they are given none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kubeconfig: Vec<PathBuf>,
    /// The DNS stub (None: not connected).
    #[serde(default)]
    pub dns_stub: Option<crate::dns::DnsStatus>,
}

pub(crate) type Progress = mpsc::UnboundedSender<Reply>;

pub(crate) fn step(tx: &Progress, s: impl Into<String>) {
    let s = s.into();
    tracing::info!("{s}");
    let _ = tx.send(Reply::Progress { step: s });
}

/// What the CLI asks the daemon to reroute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    pub namespace: Option<String>,
    pub service: String,
    /// A number or a name.
    pub port: String,
    pub local_port: u16,
    pub protocol: Protocol,
    pub header: Option<(String, String)>,
    pub force: bool,
    /// Nothing listening locally: callers are told, or go to the pods.
    #[serde(default)]
    pub fallback: Fallback,
}

/// What `--stop` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stop {
    pub namespace: Option<String>,
    /// None: every reroute.
    pub service: Option<String>,
}

/// A reroute as `--list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed {
    #[serde(flatten)]
    pub reroute: Reroute,
    /// This machine's.
    pub mine: bool,
    /// For this machine's: the local port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
}
