//! The background daemon (`burrow daemon`): owns the TUN device, the routes
//! and the tunnel to the cluster's gateway; the CLI (`connect`, `status`,
//! `disconnect`) talks to it over a root-only unix socket in the run dir
//! with newline-delimited JSON: one [`Request`] line, then [`Reply`] lines
//! (progress steps, then one `done` or `error`).
//!
//! Connect (`connect.rs`, one function per step): kubeconfig → API server →
//! find / install / upgrade the gateway → wait for its pod → learn the
//! ranges → register the laptop's key over a port-forward to the control
//! port → TUN device and routes (refusing an overlap with a route that is
//! not ours) → data path over UDP to a NodePort or over a port-forward
//! (WireGuard datagrams length-framed) → probe through the tunnel. A
//! supervisor then watches the gateway pod and, when it changes,
//! re-registers (same key, previous address) and reopens the transport.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use burrow_api::WgKey;
use burrow_deploy::Cluster;
use hyper::StatusCode;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, mpsc};
use tracing::Instrument as _;

use crate::protocol::{Progress, Reply, Request, Status, socket_path, step};
use crate::tunnel::Device;
use crate::tunnel::datapath::{InboundPorts, LinkStats, SharedStats};
use crate::tunnel::netlink::Netlink;
use crate::tunnel::state::{self, Paths, Previous};
use crate::tunnel::tun::DEFAULT_IFNAME;

mod connect;
mod gateway;
pub mod reroute;
mod supervisor;
mod transport;
mod underlay;

use connect::connect;
use gateway::*;
use supervisor::*;
use transport::*;

/// The tunnel's MTU over the UDP transport (a 1,500-byte underlay less
/// WireGuard's overhead); the framed transport uses
/// [`burrow_netstack::framing::FRAMED_MTU`].
const MTU: u16 = 1420;
/// How long a direct UDP handshake may take before `auto` falls back.
const UDP_HANDSHAKE: Duration = Duration::from_millis(1500);
/// How long after the gateway pod turns ready its NodePort may still be
/// missing on the nodes (the endpoint-slice controller, then kube-proxy's
/// 1 s min-sync-period, each late under load): the UDP handshake window
/// stretches to this much past readiness.
const NODEPORT_SETTLE: Duration = Duration::from_secs(6);
/// The same with `--transport udp`, where there is nothing to fall back
/// to: a loaded cluster's controller and kube-proxy can lag further.
const NODEPORT_SETTLE_ASKED: Duration = Duration::from_secs(20);
/// How long the probe through the tunnel may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the gateway pod.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Re-registration (the gateway's heartbeat).
const HEARTBEAT: Duration = Duration::from_secs(30);

/// A running connection.
struct Session {
    status: Arc<std::sync::Mutex<Status>>,
    stats: SharedStats,
    cluster: Cluster,
    public_key: WgKey,
    /// Stops the data path and the supervisor.
    stop: tokio::sync::watch::Sender<bool>,
    datapath: tokio::task::JoinHandle<()>,
    supervisor: tokio::task::JoinHandle<()>,
    device: Device,
    dns: Option<crate::dns::Running>,
    /// Which tunnel ports the cluster may connect to (the forwarders').
    inbound: Arc<InboundPorts>,
    /// The session's span (context, gateway namespace, tunnel address,
    /// transport): its tasks run in it, and so do the CLI's requests
    /// about it.
    span: tracing::Span,
}

struct Daemon {
    run_dir: PathBuf,
    session: Mutex<Option<Session>>,
    quit: tokio::sync::Notify,
    reroutes: Arc<crate::daemon::reroute::Reroutes>,
}

impl Daemon {
    /// What `burrow reroute` needs of the connection, when connected.
    async fn reroute_link(&self) -> Option<crate::daemon::reroute::Link> {
        self.session
            .lock()
            .await
            .as_ref()
            .map(|s| crate::daemon::reroute::Link {
                span: s.span.clone(),
                cluster: s.cluster.clone(),
                public_key: s.public_key,
                status: s.status.clone(),
                open: s.inbound.clone(),
            })
    }
}

/// `burrow daemon`: serve the socket until a `disconnect` or a signal.
pub async fn serve(run_dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let sock = socket_path(&run_dir);
    if UnixStream::connect(&sock).await.is_ok() {
        anyhow::bail!("a burrow daemon already listens on {}", sock.display());
    }
    let _ = std::fs::remove_file(&sock);
    // Root-only from the start: created under a 0077 umask.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let listener = UnixListener::bind(&sock);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("cannot listen on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %sock.display(), "burrow daemon listening");

    // Leftovers of a killed predecessor.
    let nl = Netlink::connect()?;
    cleanup_stale(&nl, &run_dir).await?;

    let daemon = Arc::new(Daemon {
        run_dir: run_dir.clone(),
        session: Mutex::new(None),
        quit: tokio::sync::Notify::new(),
        reroutes: Arc::default(),
    });
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (conn, _) = accepted.context("accept on the daemon socket")?;
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(d, conn).await {
                        tracing::warn!("client connection: {e:#}");
                    }
                });
            }
            _ = term.recv() => { tracing::info!("SIGTERM: disconnecting"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: disconnecting"); break; }
            () = daemon.quit.notified() => break,
        }
    }
    let (tx, _rx) = mpsc::unbounded_channel();
    let result = disconnect(&daemon, &tx).await;
    let _ = std::fs::remove_file(&sock);
    result.map(drop)
}

/// Remove what a SIGKILLed daemon (or `burrow up`) left behind.
pub async fn cleanup_stale(nl: &Netlink, run_dir: &Path) -> anyhow::Result<Option<String>> {
    let paths = Paths::new(run_dir, DEFAULT_IFNAME);
    // resolv.conf first: it points at a stub that is gone.
    let dns = crate::dns::cleanup_stale(run_dir)?;
    let tunnel = match state::inspect(&paths)? {
        Previous::Stale(st) => Some(state::clean_stale(nl, &st, &paths).await?),
        Previous::Unreadable(why) => Some(state::clean_unreadable(&paths, &why)?),
        Previous::None | Previous::Running(_) => None,
    };
    Ok(match (dns, tunnel) {
        (Some(d), Some(t)) => Some(format!("{d}; {t}")),
        (d, t) => d.or(t),
    })
}

async fn handle(daemon: Arc<Daemon>, conn: UnixStream) -> anyhow::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let Some(line) = lines.next_line().await? else {
        return Ok(());
    };
    let request: Request = serde_json::from_str(&line).context("bad request")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let d = daemon.clone();
    let quit_after = matches!(request, Request::Disconnect);
    // Requests about a running session are logged inside its span.
    let span = match &request {
        Request::Connect(_) | Request::Status => tracing::Span::none(),
        _ => daemon
            .session
            .lock()
            .await
            .as_ref()
            .map_or_else(tracing::Span::none, |s| s.span.clone()),
    };
    let work = tokio::spawn(
        async move {
            let result = match request {
                Request::Connect(req) => connect(&d, req, &tx)
                    .await
                    .map(|s| (String::new(), Some(s))),
                Request::Status => Ok((String::new(), Some(status(&d).await))),
                Request::Disconnect => disconnect(&d, &tx).await.map(|s| (String::new(), Some(s))),
                Request::Reroute(spec) => match d.reroute_link().await {
                    Some(link) => d.reroutes.add(&link, spec, &tx).await.map(|m| (m, None)),
                    None => Err(anyhow::anyhow!("not connected: run `burrow connect` first")),
                },
                Request::RerouteStop(stop) => {
                    let link = d.reroute_link().await;
                    d.reroutes
                        .stop(link.as_ref(), &stop, &tx)
                        .await
                        .map(|m| (m, None))
                }
                Request::RerouteList => {
                    let link = d.reroute_link().await;
                    d.reroutes.list(link.as_ref()).await.map(|m| (m, None))
                }
            };
            let reply = match result {
                Ok((message, status)) => Reply::Done {
                    message,
                    status: status.map(Box::new),
                },
                Err(e) => Reply::Error {
                    message: format!("{e:#}"),
                },
            };
            let _ = tx.send(reply);
        }
        .instrument(span),
    );
    while let Some(reply) = rx.recv().await {
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        // The CLI may be gone (Ctrl-C): the work goes on regardless.
        let _ = wr.write_all(text.as_bytes()).await;
    }
    let _ = work.await;
    if quit_after {
        daemon.quit.notify_one();
    }
    Ok(())
}

async fn status(d: &Daemon) -> Status {
    let mut st = {
        let session = d.session.lock().await;
        match &*session {
            None => return Status::default(),
            Some(s) => {
                let mut st = with_dns(snapshot(&s.status, &s.stats), s.dns.as_ref());
                st.inbound_refused = s.inbound.refused();
                st
            }
        }
    };
    if let Ok(gateway) = st.gateway_address.parse::<IpAddr>() {
        match tokio::time::timeout(Duration::from_secs(1), TunnelApi { gateway }.peer()).await {
            Ok(Ok(info)) => {
                // Less the flow this very query is open on.
                st.tcp_flows = Some(info.tcp_flows.saturating_sub(1));
                st.udp_flows = Some(info.udp_flows);
            }
            Ok(Err(e)) => tracing::debug!("flow counts from the gateway: {e:#}"),
            Err(_) => tracing::debug!("flow counts from the gateway: no answer within 1s"),
        }
    }
    st
}

fn with_dns(mut st: Status, dns: Option<&crate::dns::Running>) -> Status {
    if let Some(d) = dns {
        st.dns = d.summary();
        st.dns_stub = Some(d.status());
    }
    st
}

fn snapshot(status: &std::sync::Mutex<Status>, stats: &SharedStats) -> Status {
    let mut st = status.lock().map(|s| s.clone()).unwrap_or_default();
    let link: LinkStats = stats.lock().map(|s| *s).unwrap_or_default();
    st.handshake_age_secs = link.last_handshake.map(|t| t.elapsed().as_secs_f64());
    st.tx_bytes = link.tx_bytes;
    st.rx_bytes = link.rx_bytes;
    st.packets_dropped = link.counters.dropped;
    st.tun_queue_dropped = crate::tunnel::netlink::tun_queue_dropped(&st.device);
    st
}

async fn disconnect(d: &Daemon, tx: &Progress) -> anyhow::Result<Status> {
    // Reroutes first: restored while the tunnel and credentials are here.
    let link = d.reroute_link().await;
    if link.is_some() {
        let all = crate::protocol::Stop {
            namespace: None,
            service: None,
        };
        if let Err(e) = d.reroutes.stop(link.as_ref(), &all, tx).await {
            step(
                tx,
                format!(
                    "stopping reroutes: {e:#} (the gateway restores them when their lease runs out)"
                ),
            );
        }
    }
    let mut session = d.session.lock().await;
    let Some(s) = session.take() else {
        return Ok(Status::default());
    };
    step(tx, "unregistering from the gateway");
    let gateway = s
        .status
        .lock()
        .ok()
        .and_then(|st| st.gateway_address.parse::<IpAddr>().ok());
    let unregistered = match gateway {
        Some(gateway) => {
            tokio::time::timeout(Duration::from_secs(5), TunnelApi { gateway }.unregister())
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in 5s").into()))
        }
        None => Err(anyhow::anyhow!("no gateway tunnel address").into()),
    };
    match unregistered {
        // Not known (any more): nothing to forget.
        Ok(())
        | Err(GatewayError::Refused {
            status: StatusCode::NOT_FOUND,
            ..
        }) => {}
        Err(GatewayError::Refused { status, message }) => step(
            tx,
            format!(
                "the gateway answered {} to unregistering: {message}",
                status.as_u16()
            ),
        ),
        Err(GatewayError::Failed(e)) => step(
            tx,
            format!(
                "could not unregister (the gateway forgets the laptop after its expiry): {e:#}"
            ),
        ),
    }
    if let Some(dns) = s.dns {
        step(
            tx,
            "stopping the DNS stub, restoring the resolver configuration",
        );
        match dns.stop() {
            Ok(Some(note)) => step(tx, note),
            Ok(None) => {}
            Err(e) => step(tx, format!("restoring the resolver configuration: {e:#}")),
        }
    }
    step(tx, "removing the device and its routes");
    let _ = s.stop.send(true);
    s.supervisor.abort();
    let _ = s.datapath.await;
    let nl = Netlink::connect()?;
    s.device.tear_down(&nl).await?;
    Ok(Status::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_round_trip() {
        let line = serde_json::to_string(&Request::Status).expect("literal");
        assert_eq!(line, r#"{"op":"status"}"#);
        let r: Reply = serde_json::from_str(r#"{"kind":"progress","step":"x"}"#).expect("literal");
        assert!(matches!(r, Reply::Progress { step } if step == "x"));
    }
}
