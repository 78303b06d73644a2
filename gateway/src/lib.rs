//! burrow-gateway: the in-cluster side.
//!
//! Owns the WireGuard endpoint with many peers, the TCP/UDP/ICMP flows into
//! the cluster (real sockets), the control API servers (registration,
//! the laptops' own calls; the wire types are `burrow_api`'s), the
//! reroute listeners with header routing, the leases that give rerouted
//! Services back when a laptop disappears, and metrics. Kubernetes calls
//! (restores) are `burrow_deploy::service`'s.
//!
//! Must never: need privileges (no root, no capabilities, read-only root
//! filesystem), forward packets between peers, accept a packet whose
//! source is not the sending peer's tunnel address, let anything but the
//! data path task touch the peer table or the flow engine, or create a
//! reroute (it only restores).
//!
//! [`serve`] runs it all on [`Listeners`]:
//!
//! - [`datapath`]: the one task that owns the sans-IO state
//!   (`burrow_netstack::wg::Peers` and `flow::FlowEngine`) and drives it,
//!   one folder: its inbox (every message in or out), output sink, TCP and
//!   UDP/ICMP flows, liveness of laptops, and metrics (Prometheus text at
//!   `GET /metrics`);
//! - [`cluster`]: the TCP flows' sockets into the cluster, and the dialer
//!   thread that opens and closes them;
//! - [`framed`]: WireGuard over length-framed TCP connections (the
//!   port-forward transport), with its connection limits;
//! - [`control`]: the control API servers and the tunnel address
//!   allocator;
//! - [`laptop`]: TCP connections and UDP flows the gateway opens to
//!   laptops through the tunnel ([`laptop::LaptopDialer`]);
//! - [`reroute`]: the reroute table (leases, holders), the listeners that
//!   take a rerouted Service's connections, the guard and the restores;
//!   [`udproute`] for UDP ports; [`passthrough`] (header routes, requests
//!   for no laptop, byte for byte) and [`httproute`] (the full HTTP proxy
//!   that routes by header, and the global mode with its fail-open);
//! - [`config`]: the WireGuard configuration file (the shared
//!   `burrow_netstack::wgconf` syntax, one host address per laptop).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

pub mod cluster;
pub mod config;
pub mod control;
pub mod datapath;
pub mod framed;
pub mod httproute;
pub mod laptop;
pub mod passthrough;
pub mod reroute;
pub mod udproute;

pub use datapath::DatapathConfig;

/// Socket buffer size asked for on the WireGuard UDP socket, so a burst
/// larger than one batch is not dropped while the data path is busy. The
/// kernel caps it at `net.core.{r,w}mem_max` without privileges.
const UDP_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// The sockets the gateway serves on.
pub struct Listeners {
    pub wireguard: UdpSocket,
    pub framed: TcpListener,
    pub metrics: Option<TcpListener>,
    /// Registration of laptops (see [`burrow_api`]): loopback only, so that only
    /// a port-forward reaches it.
    pub control: Vec<TcpListener>,
}

impl Listeners {
    /// Bind all three on `ip` (port 0 picks a free one). On `::` the
    /// sockets take IPv4 too.
    pub async fn bind(
        ip: IpAddr,
        wg_port: u16,
        framed_port: u16,
        metrics_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        let wg_addr = SocketAddr::new(ip, wg_port);
        let wireguard = bind_udp(wg_addr)
            .with_context(|| format!("cannot bind the WireGuard UDP port {wg_addr}"))?;
        let framed_addr = SocketAddr::new(ip, framed_port);
        let framed = TcpListener::bind(framed_addr)
            .await
            .with_context(|| format!("cannot bind the framed-TCP port {framed_addr}"))?;
        let metrics = match metrics_port {
            Some(port) => {
                let addr = SocketAddr::new(ip, port);
                Some(
                    TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot bind the metrics port {addr}"))?,
                )
            }
            None => None,
        };
        Ok(Self {
            wireguard,
            framed,
            metrics,
            control: Vec::new(),
        })
    }

    /// Also serve registration on `ip:port` (0 picks a free port). Only a
    /// loopback address keeps it to port-forwards: anything else is
    /// refused.
    pub async fn bind_control(&mut self, ip: IpAddr, port: u16) -> anyhow::Result<()> {
        anyhow::ensure!(
            ip.is_loopback(),
            "the control port serves registration and must listen on a loopback address \
             (reached by port-forward), not {ip}"
        );
        let addr = SocketAddr::new(ip, port);
        self.control.push(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind the control port {addr}"))?,
        );
        Ok(())
    }
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer still works, only drops sooner.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// What the gateway serves: its key, its peers, its tunables.
pub struct GatewayConfig {
    pub wg: config::WgConfig,
    pub datapath: DatapathConfig,
    pub control: ControlConfig,
}

/// How long a silent laptop (no registration, no datagram) keeps its
/// peer, address and flows: longer than a lid closed over lunch.
pub const DEFAULT_PEER_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// How the control API hands out addresses and what it tells laptops.
#[derive(Clone)]
pub struct ControlConfig {
    /// Tunnel addresses come from here; the first host is the gateway's.
    pub tunnel_network: ipnet::Ipv4Net,
    /// The grace of a silent laptop: one neither re-registering nor
    /// handshaking for this long (asleep, offline) is forgotten, its flows
    /// reset. Reroute leases are separate and short (fail-open).
    pub expiry: std::time::Duration,
    /// What the gateway knows of the cluster (from its resolv.conf).
    pub cluster: burrow_api::ClusterFacts,
    /// The gateway's own access to the Kubernetes API (in-cluster
    /// credentials), to restore rerouted Services; None outside a cluster.
    pub kube: Option<kube::Client>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            tunnel_network: ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(198, 19, 0, 0), 16)
                .unwrap_or_default(),
            expiry: DEFAULT_PEER_GRACE,
            cluster: burrow_api::ClusterFacts::default(),
            kube: None,
        }
    }
}

/// Connections to laptops' tunnel addresses, through the data path.
fn laptop_connect(dialer: laptop::LaptopDialer) -> reroute::LaptopConnect {
    std::sync::Arc::new(move |addr| {
        let dialer = dialer.clone();
        Box::pin(async move {
            let stream = dialer.connect(addr).await?;
            Ok(Box::new(stream) as reroute::BoxIo)
        })
    })
}

/// Run the gateway on `listeners` until `shutdown` resolves; open flows are
/// reset then.
pub async fn serve(
    config: GatewayConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let peer_count = config.wg.peers.len();
    let mtu = config.datapath.mtu;
    let port = |a: std::io::Result<SocketAddr>| a.map(|a| a.port()).unwrap_or(0);
    let (wireguard_port, framed_port) = (
        port(listeners.wireguard.local_addr()),
        port(listeners.framed.local_addr()),
    );
    let mut datapath_config = config.datapath;
    if datapath_config.tunnel_address.is_none() {
        // The first host of the tunnel network, as the control API tells
        // laptops (`Allocator::gateway_address`).
        datapath_config.tunnel_address = Some(IpAddr::V4(
            control::Allocator::new(config.control.tunnel_network).gateway_address(),
        ));
    }
    let private_key = config.wg.private_key.clone();
    let framed_limits = datapath_config.framed;
    let mut datapath =
        datapath::Datapath::new(config.wg.private_key, config.wg.peers, datapath_config)
            .context("invalid peer list")?;
    tracing::info!(
        public_key = %datapath.public_key(),
        peers = peer_count,
        wireguard = %listeners.wireguard.local_addr()?,
        framed = %listeners.framed.local_addr()?,
        metrics = ?listeners.metrics.as_ref().and_then(|l| l.local_addr().ok()),
        "burrow-gateway serving"
    );
    let (framed_tx, framed_rx) = mpsc::channel(1024);
    let (control_tx, control_rx) = mpsc::channel(16);
    let acceptor = tokio::spawn(framed::accept_loop(
        listeners.framed,
        framed_tx,
        framed_limits,
        datapath.framed_counters(),
    ));
    let metrics = listeners.metrics.map(|l| {
        tokio::spawn(datapath::metrics::serve(
            l,
            datapath::DatapathHandle {
                tx: control_tx.clone(),
            },
        ))
    });
    let mut reroutes = None;
    let mut control_tasks = Vec::new();
    if !listeners.control.is_empty() {
        let info = burrow_api::Info {
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_key: datapath.public_key(),
            wireguard_port,
            framed_port,
            mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
            tunnel_network: config.control.tunnel_network.to_string(),
            cluster: config.control.cluster.clone(),
            registration_nonce: String::new(),
        };
        let shared = std::sync::Arc::new(control::Control::new(
            datapath::DatapathHandle {
                tx: control_tx.clone(),
            },
            config.control.tunnel_network,
            info,
            config.control.expiry,
            reroute::Reroutes::new(
                laptop_connect(laptop::LaptopDialer::new(control_tx.clone())),
                udproute::opener(laptop::LaptopDialer::new(control_tx.clone())),
                config.control.kube.clone(),
            ),
            private_key,
        ));
        reroutes = Some(shared.reroutes.clone());
        let (api_tx, api_rx) = mpsc::channel(64);
        datapath.serve_api(api_tx);
        for l in listeners.control {
            tracing::info!(registration = %l.local_addr()?, "control API serving (registration)");
            let shared = shared.clone();
            control_tasks.push(tokio::spawn(async move {
                if let Err(e) = control::serve_registration(l, shared).await {
                    tracing::error!("control API stopped: {e}");
                }
            }));
        }
        control_tasks.push(tokio::spawn(control::serve_tunnel(api_rx, shared.clone())));
        control_tasks.push(tokio::spawn(shared.reroutes.clone().reap()));
        control_tasks.push(tokio::spawn(control::reap(shared)));
    }
    drop(control_tx);
    datapath
        .run(listeners.wireguard, framed_rx, control_rx, shutdown)
        .await;
    acceptor.abort();
    for t in control_tasks {
        t.abort();
    }
    // Give the Services back before going: the laptops establish their
    // reroutes again on the next gateway pod.
    if let Some(r) = reroutes
        && tokio::time::timeout(std::time::Duration::from_secs(10), r.release_all())
            .await
            .is_err()
    {
        tracing::warn!(
            "restoring rerouted Services took over 10s; the next gateway restores the rest"
        );
    }
    if let Some(m) = metrics {
        m.abort();
    }
    tracing::info!("burrow-gateway stopped");
    Ok(())
}
