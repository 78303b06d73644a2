//! `burrow-gateway`: the in-cluster end of burrow's tunnel (the library,
//! `burrow_gateway`, is all of it; this is flags, logging and start-up).
//!
//! Threads: the data path's runtime (current-thread by default, shared
//! with flow tasks, streams, the control API and metrics; see
//! `--worker-threads`) and the dialer thread of [`burrow_gateway::cluster`].
//! Start-up order: raise the soft open-files limit to the hard one (every
//! flow holds a socket) and warn if one laptop's caps do not fit; in a
//! pod, restore what a previous gateway left rerouted
//! (`reroute::restore_orphans`) before any port is bound, so before
//! readiness; then serve. On SIGTERM the Services this gateway holds are
//! restored before it exits.

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use burrow_gateway::{ControlConfig, DatapathConfig, GatewayConfig, Listeners, config, framed};
use burrow_netstack::flow::LaptopLimits;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The in-cluster end of burrow's tunnel: a WireGuard endpoint whose
/// userspace TCP/IP stack opens ordinary sockets into the cluster for every
/// flow a laptop starts. Needs no privileges.
#[derive(Debug, Parser)]
#[command(name = "burrow-gateway", version)]
struct Cli {
    /// WireGuard configuration: [Interface] PrivateKey (and optionally
    /// ListenPort), and one [Peer] per laptop with PublicKey and AllowedIPs
    /// (the laptop's tunnel address, /32 or /128).
    #[arg(long, value_name = "FILE", env = "BURROW_GATEWAY_CONFIG")]
    config: PathBuf,
    /// WireGuard UDP port [default: the config's ListenPort, else 51820].
    #[arg(long, value_name = "PORT")]
    wg_port: Option<u16>,
    /// TCP port for WireGuard datagrams length-framed over TCP (the
    /// port-forward transport).
    #[arg(long, value_name = "PORT", default_value_t = 51821)]
    framed_port: u16,
    /// TCP port of the control API: registration on the pod's loopback
    /// address (reached only by port-forward), and the laptops' own calls
    /// on the gateway's tunnel address inside the tunnel; 0 turns both off.
    #[arg(long, value_name = "PORT", default_value_t = burrow_api::CONTROL_PORT)]
    control_port: u16,
    /// Tunnel addresses for laptops registering at runtime are handed out
    /// from this IPv4 network; the first host is the gateway's own.
    #[arg(long, value_name = "CIDR", default_value = "198.19.0.0/16")]
    tunnel_network: ipnet::Ipv4Net,
    /// Grace of a silent laptop: one that neither re-registers nor sends
    /// a datagram of its tunnel (suspended, offline, roaming; a connected
    /// laptop sends one at least every 25 s) keeps its tunnel address
    /// and its open TCP flows this long, so its connections resume when it
    /// is back; then it is forgotten and its flows reset (it registers
    /// again by itself). Reroute leases do not wait for it: they lapse
    /// after 12 s and callers go to the pods (fail-open).
    #[arg(long, alias = "peer-expiry", value_name = "DURATION", default_value = "600s",
          value_parser = humantime_duration)]
    peer_grace: Duration,
    /// The resolv.conf the cluster facts (DNS server, cluster domain,
    /// search list) are read from, as any pod reads them.
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// TCP port serving Prometheus metrics at /metrics.
    #[arg(long, value_name = "PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Address to listen on; `::` takes IPv4 too.
    #[arg(long, value_name = "IP", default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    listen: IpAddr,
    /// Tunnel MTU of the UDP transport: UDP replies and echo replies larger
    /// than this reach any laptop as IP fragments of this size. TCP
    /// segments follow each laptop's MSS: up to 16 KiB for laptops on the
    /// port-forward (framed) transport, whose tunnel MTU is 16,384.
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u16).range(576..=9000))]
    mtu: u16,
    /// Give up dialing a destination after this long (the laptop's connect
    /// then times out too).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime_duration)]
    dial_timeout: Duration,
    /// Per-flow TCP receive buffer, bytes: the most a laptop keeps in
    /// flight towards the cluster on one connection (its window). Memory
    /// follows the bytes actually buffered, so idle flows cost little
    /// whatever the size; a flow that moved bulk data keeps this resident
    /// until it closes.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(4096..=16 * 1024 * 1024))]
    tcp_buffer: u32,
    /// Per-flow TCP send buffer, bytes: the most the gateway keeps in
    /// flight towards a laptop on one connection. Over a long path a
    /// download needs its bandwidth-delay product (4 MiB: 80 MB/s at
    /// 50 ms). Its memory is capped per laptop and for all laptops (the
    /// next two flags); empty buffers give their pages back within a
    /// second.
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(4096..=64 * 1024 * 1024))]
    tcp_send_buffer: u32,
    /// Send-buffer memory one laptop's TCP flows may hold, bytes; a flow
    /// beyond it waits for memory (its download slows) rather than the
    /// gateway growing.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(65536..))]
    tcp_send_memory_per_laptop: u64,
    /// Send-buffer memory all laptops' TCP flows may hold, bytes (keep it
    /// well under the pod's memory limit).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(65536..))]
    tcp_send_memory: u64,
    /// Runtime threads for the UDP/ICMP flow tasks, reroute streams,
    /// control API and metrics; 0 (the default) runs them on the data
    /// path's own thread, which measured faster on 2 cores (no cross-thread
    /// wake-ups; BENCHMARKS.md). TCP flows' sockets are always the data
    /// path's, with a dialer thread for connect and close.
    #[arg(long, value_name = "N", default_value_t = 0)]
    worker_threads: usize,
    /// Most TCP flows one laptop may hold (pending or open); a connection
    /// beyond it is refused (RST). Each holds a socket into the cluster.
    #[arg(long, value_name = "N", default_value_t = LaptopLimits::default().tcp_flows,
          value_parser = at_least_one)]
    max_tcp_flows_per_laptop: usize,
    /// Most TCP dials one laptop may have in progress; a SYN beyond it is
    /// dropped and retransmitted by the laptop.
    #[arg(long, value_name = "N", default_value_t = LaptopLimits::default().pending_dials,
          value_parser = at_least_one)]
    max_pending_dials_per_laptop: usize,
    /// Most UDP flows (5-tuples, each a socket until idle for 60 s) one
    /// laptop may hold; datagrams of a flow beyond it are dropped.
    #[arg(long, value_name = "N", default_value_t = LaptopLimits::default().udp_flows,
          value_parser = at_least_one)]
    max_udp_flows_per_laptop: usize,
    /// Most framed-TCP connections open at once from loopback (where
    /// port-forwards arrive), and again from everywhere else (the
    /// NodePort); more are reset at once.
    #[arg(long, value_name = "N", default_value_t = framed::Limits::default().max_connections,
          value_parser = at_least_one)]
    framed_max_connections: usize,
    /// Most framed-TCP connections open at once from one source address
    /// (loopback, where port-forwards come from, excepted).
    #[arg(long, value_name = "N", default_value_t = framed::Limits::default().max_per_source,
          value_parser = at_least_one)]
    framed_max_connections_per_source: usize,
    /// A framed-TCP connection that has not delivered a valid WireGuard
    /// message within this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime_duration)]
    framed_handshake_timeout: Duration,
    /// A framed-TCP connection silent for this long is closed (burrow
    /// sends a keepalive every 25 s).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime_duration)]
    framed_idle_timeout: Duration,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: expected e.g. 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("`{s}`: expected e.g. 10s or 500ms")),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}`: expected a whole number of at least 1")),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The pod's own Kubernetes API access (service account), when running in
/// a pod.
fn in_cluster_client() -> Option<kube::Client> {
    std::env::var_os("KUBERNETES_SERVICE_HOST")?;
    let made = kube::Config::incluster()
        .map_err(|e| e.to_string())
        .and_then(|c| kube::Client::try_from(c).map_err(|e| e.to_string()));
    match made {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(
                "no Kubernetes API access ({e}): rerouted Services are restored only by the laptops"
            );
            None
        }
    }
}

/// Without jemalloc (the `jemalloc` feature off): glibc gives the top of
/// its heap back to the kernel as soon as 128 KiB there are free, and takes
/// it again on the next burst: with a flow's task and buffers allocated per
/// connection that meant a `brk` every other connection, plus page faults.
/// Keep a few MiB instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TOP_PAD, 1 << 20);
    }
}

/// Every flow holds a socket: raise the soft open-files limit to the hard
/// one (container runtimes may start processes with a soft limit of 1024,
/// below the per-laptop caps). Returns the limit in force.
fn raise_open_files_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Some(raised.rlim_cur as u64);
            }
        }
        Some(lim.rlim_cur as u64)
    }
}

/// jemalloc, not glibc's malloc: the data path allocates and frees
/// buffers of tens of KiB to MiBs (framed reads and backlogs, flows'
/// buffers), which glibc hands back to the kernel (munmap, heap trim) and
/// takes again, paying for fresh, zeroed, faulted-in pages each time.
/// jemalloc keeps freed pages for reuse and returns them only after
/// seconds unused. As in the daemon (`client/src/main.rs`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let open_files = raise_open_files_limit();
    let per_laptop = LaptopLimits {
        tcp_flows: cli.max_tcp_flows_per_laptop,
        pending_dials: cli.max_pending_dials_per_laptop,
        udp_flows: cli.max_udp_flows_per_laptop,
    };
    let one_laptop = (per_laptop.tcp_flows + per_laptop.udp_flows) as u64;
    match open_files {
        Some(n) if n < one_laptop + 1024 => tracing::warn!(
            open_files = n,
            "the open-files limit is below one laptop's caps ({one_laptop} flows, a socket each); \
             flows beyond it fail to dial"
        ),
        Some(n) => tracing::info!(open_files = n, ?per_laptop, "limits"),
        None => {}
    }
    let wg = config::load(&cli.config)?;
    let wg_port = cli.wg_port.or(wg.listen_port).unwrap_or(51820);
    // The data path is one task; worker threads serve the UDP/ICMP flow
    // tasks, streams and metrics. With 0 those share the data path's
    // thread (no cross-thread wake-ups).
    let runtime = match cli.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // In a pod: restore what a previous gateway left rerouted before
        // the listeners (and so readiness) come up.
        let kube = in_cluster_client();
        if let Some(c) = &kube
            && tokio::time::timeout(
                Duration::from_secs(15),
                burrow_gateway::reroute::restore_orphans(c),
            )
            .await
            .is_err()
        {
            tracing::warn!("looking for Services left rerouted took over 15s; going on");
        }
        let mut listeners =
            Listeners::bind(cli.listen, wg_port, cli.framed_port, Some(cli.metrics_port)).await?;
        if cli.control_port != 0 {
            // Loopback only: the kubelet's port-forward connects to
            // localhost inside the pod; nothing else can reach it.
            listeners
                .bind_control(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), cli.control_port)
                .await?;
            if let Err(e) = listeners
                .bind_control(IpAddr::V6(Ipv6Addr::LOCALHOST), cli.control_port)
                .await
            {
                tracing::debug!("no IPv6 loopback for the control port: {e:#}");
            }
        }
        let resolv = std::fs::read_to_string(&cli.resolv_conf).unwrap_or_else(|e| {
            tracing::warn!(
                "cannot read {}: {e}; cluster facts will be empty",
                cli.resolv_conf.display()
            );
            String::new()
        });
        let pod_ip = std::env::var("POD_IP").ok().and_then(|s| s.parse().ok());
        let config = GatewayConfig {
            wg,
            datapath: DatapathConfig {
                mtu: usize::from(cli.mtu),
                dial_timeout: cli.dial_timeout,
                tcp_buffer: cli.tcp_buffer as usize,
                tcp_send_buffer: cli.tcp_send_buffer as usize,
                tcp_send_memory_per_laptop: usize::try_from(cli.tcp_send_memory_per_laptop)
                    .unwrap_or(usize::MAX),
                tcp_send_memory: usize::try_from(cli.tcp_send_memory).unwrap_or(usize::MAX),
                per_laptop,
                framed: framed::Limits {
                    max_connections: cli.framed_max_connections,
                    max_per_source: cli.framed_max_connections_per_source,
                    handshake_timeout: cli.framed_handshake_timeout,
                    idle_timeout: cli.framed_idle_timeout,
                },
                ..DatapathConfig::default()
            },
            control: ControlConfig {
                tunnel_network: cli.tunnel_network,
                expiry: cli.peer_grace,
                cluster: burrow_api::ClusterFacts::from_resolv_conf(&resolv, pod_ip),
                kube,
            },
        };
        burrow_gateway::serve(config, listeners, shutdown_signal()).await
    })
}
