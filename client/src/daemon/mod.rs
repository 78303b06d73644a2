//! The background daemon (`burrow daemon`): owns the TUN device, the routes
//! and the tunnel to the cluster's gateway; the CLI (`connect`, `status`,
//! `disconnect`) talks to it over a root-only unix socket in the run dir
//! with newline-delimited JSON: one [`Request`] line, then [`Reply`] lines
//! (progress steps, then one `done` or `error`).
//!
//! Connect: kubeconfig → API server → find / install / upgrade the gateway →
//! wait for its pod → learn the ranges → register the laptop's key over a
//! port-forward to the control port → TUN device and routes (refusing an
//! overlap with a route that is not ours) → data path over UDP to a NodePort
//! or over a port-forward (WireGuard datagrams length-framed) → probe
//! through the tunnel. A supervisor then watches the gateway pod and, when
//! it changes, re-registers (same key, previous address) and reopens the
//! transport.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use boringtun::x25519::StaticSecret;
use burrow_api::{CONTROL_PORT, WgKey};
use burrow_deploy::install::{self, InstallOptions};
use burrow_deploy::{Cluster, DeployError, Target, facts};
use burrow_netstack::wg::PeerConfig;
use hyper::StatusCode;
use ipnet::IpNet;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, mpsc};

use crate::protocol::{ConnectRequest, Progress, Reply, Request, Status, socket_path, step};
use crate::tunnel::datapath::{Datapath, InboundPorts, LinkStats, SharedStats, bind_udp};
use crate::tunnel::netlink::Netlink;
use crate::tunnel::plan::subtract;
use crate::tunnel::state::{self, Paths, Previous};
use crate::tunnel::tun::DEFAULT_IFNAME;
use crate::tunnel::{Device, Layout, Refusal, check_free};

mod gateway;
pub mod reroute;
mod supervisor;
mod transport;

use gateway::*;
use supervisor::*;
use transport::*;

/// The tunnel's MTU.
const MTU: u16 = 1420;
/// How long a direct UDP handshake may take before `auto` falls back.
const UDP_HANDSHAKE: Duration = Duration::from_millis(1500);
/// How long after the gateway pod turns ready its NodePort may still be
/// missing on the nodes (the endpoint-slice controller, then kube-proxy's
/// 1 s min-sync-period, each late under load): the UDP handshake window
/// stretches to this much past readiness.
const NODEPORT_SETTLE: Duration = Duration::from_secs(6);
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
    let work = tokio::spawn(async move {
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
    });
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

/// The laptop's WireGuard key: `<run dir>/key` (0600), made once.
fn load_key(run_dir: &Path) -> anyhow::Result<StaticSecret> {
    let path = run_dir.join("key");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(key) = text.parse::<WgKey>()
    {
        return Ok(key.secret());
    }
    let mut arr = [0u8; 32];
    getrandom(&mut arr)?;
    let text = WgKey::from(arr).to_string();
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(StaticSecret::from(arr))
}

fn getrandom(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .context("cannot read /dev/urandom")
}

/// The routes: Service and pod ranges plus `--include`, the DNS server if
/// not already covered, less anything `--exclude` overlaps.
pub fn plan_routes(
    service: &[IpNet],
    pods: &[IpNet],
    dns: &[IpAddr],
    include: &[IpNet],
    exclude: &[IpNet],
) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = Vec::new();
    for net in service.iter().chain(pods).chain(include) {
        let net = net.trunc();
        if !routes.contains(&net) {
            routes.push(net);
        }
    }
    for ip in dns {
        if !routes.iter().any(|r| r.contains(ip)) {
            routes.push(IpNet::from(*ip));
        }
    }
    for x in exclude {
        routes = routes.into_iter().flat_map(|r| subtract(r, *x)).collect();
    }
    routes
}

async fn connect(d: &Daemon, req: ConnectRequest, tx: &Progress) -> anyhow::Result<Status> {
    let mut session = d.session.lock().await;
    if let Some(s) = &*session {
        let st = snapshot(&s.status, &s.stats);
        step(
            tx,
            format!(
                "already connected to {} (context {}, {} transport, tunnel address {})",
                st.server, st.context, st.transport, st.tunnel_address
            ),
        );
        return Ok(st);
    }
    let started = Instant::now();
    let nl = Netlink::connect()?;
    if let Some(note) = cleanup_stale(&nl, &d.run_dir).await? {
        step(tx, note);
    }

    step(tx, "resolving the kubeconfig");
    let target = Target {
        kubeconfig: req.kubeconfig.clone(),
        kubeconfig_list: req.kubeconfig_list.clone(),
        context: req.context.clone(),
        namespace: req.namespace.clone(),
    };
    let cluster = target.resolve().await?;
    step(
        tx,
        format!(
            "reaching the API server {} (context {})",
            cluster.server, cluster.context
        ),
    );
    let version = cluster.check_reachable().await?;
    tracing::debug!(%version, "API server reachable");

    let gns = req.gateway_namespace.clone();
    step(tx, format!("finding the gateway in {gns}"));
    let progress = |s: &str| step(tx, s);
    match install::find(&cluster, &gns).await? {
        None if req.no_install => anyhow::bail!(
            "the gateway is not installed in {gns} and --no-install was given; \
             install it with `burrow install` (or drop --no-install)"
        ),
        None => {
            step(
                tx,
                format!("installing the gateway {} in {gns}", install::VERSION),
            );
            install::apply(&cluster, &install_options(&gns), &progress)
                .await
                .map_err(|e| install_refused(e, "install", &gns))?;
        }
        Some(found) if found.version != install::VERSION => {
            if req.no_upgrade {
                step(
                    tx,
                    format!(
                        "the gateway is version {}, this burrow is {}: keeping it (--no-upgrade)",
                        found.version,
                        install::VERSION
                    ),
                );
            } else {
                step(
                    tx,
                    format!(
                        "upgrading the gateway from version {} to {} (keep it with --no-upgrade)",
                        found.version,
                        install::VERSION
                    ),
                );
                install::apply(&cluster, &install_options(&gns), &progress)
                    .await
                    .map_err(|e| install_refused(e, "upgrade", &gns))?;
            }
        }
        Some(found) => step(tx, format!("found the gateway {} in {gns}", found.version)),
    }
    let want_version = match install::find(&cluster, &gns).await? {
        Some(f) => f.version,
        None => install::VERSION.to_owned(),
    };
    step(tx, "waiting for the gateway pod");
    let pod = install::wait_ready(&cluster, &gns, &want_version, READY_TIMEOUT, &progress).await?;
    step(
        tx,
        format!("gateway pod {} is ready ({})", pod.name, pod.ip),
    );

    step(tx, "learning the cluster's ranges");
    let ranges = facts::ranges(&cluster).await?;

    let key = load_key(&d.run_dir)?;
    let public_key = WgKey::public_of(&key);
    step(tx, "registering with the gateway");
    let reg = register(&cluster, &pod, &key, None).await?;
    let gateway_key = reg.info.public_key.public_key();

    let mut routes = plan_routes(
        &ranges.service,
        &ranges.pods,
        &reg.info.cluster.dns_servers,
        &req.include,
        &req.exclude,
    );
    // Rerouted connections come from the gateway's tunnel address: the
    // answers must go back into the tunnel.
    let gateway_host = IpNet::from(reg.gateway_address);
    if !routes.iter().any(|r| r.contains(&reg.gateway_address)) {
        routes.push(gateway_host);
    }
    let name = DEFAULT_IFNAME;
    match check_free(&nl, name, &routes).await? {
        None => {}
        Some(Refusal::NameInUse) => anyhow::bail!(
            "device {name} already exists (a `burrow up` running?); stop it with `sudo burrow down`"
        ),
        Some(Refusal::Overlap { ours, theirs }) => anyhow::bail!(
            "refusing to route {ours} into the cluster: it overlaps the existing route `{theirs}`; \
             leave it out with `--exclude {}` (or remove that route)",
            theirs.dst
        ),
    }

    step(tx, "opening the tunnel");
    let chosen = choose_transport(&req, &cluster, &gns, &pod, &key, gateway_key, tx).await?;
    step(
        tx,
        format!("transport: {} ({})", chosen.name, chosen.reason),
    );

    let paths = Paths::new(&d.run_dir, name);
    let stats: SharedStats = Arc::default();
    let reset: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let inbound = Arc::new(InboundPorts::new(reg.gateway_address));
    let layout = Layout {
        name,
        mtu: MTU,
        addresses: &[IpNet::from(reg.address)],
        routes: &routes,
        config: d.run_dir.join("key"),
    };
    let (mut device, tun) = Device::bring_up(&nl, &paths, layout).await?;
    let setup = async {
        let udp = bind_udp(0).context("cannot bind a UDP port")?;
        let peer = PeerConfig {
            public_key: gateway_key,
            allowed_ips: routes.clone(),
            endpoint: Some(chosen.endpoint),
            preshared_key: None,
            persistent_keepalive: Some(25),
        };
        let dp = Datapath::new(key.clone(), vec![peer], tun, udp, MTU)
            .context("invalid gateway peer")?
            .with_stats(stats.clone())
            .with_reset(reset.clone())
            .with_inbound_filter(inbound.clone());
        anyhow::Ok(dp)
    }
    .await;
    let dp = match setup {
        Ok(dp) => dp,
        Err(e) => {
            let _ = device.tear_down(&nl).await;
            return Err(e);
        }
    };
    let mut stop_dp = stop_rx.clone();
    let datapath = tokio::spawn(async move {
        let stop = async move {
            let _ = stop_dp.wait_for(|s| *s).await;
        };
        match dp.run(stop).await {
            Ok(c) => tracing::info!(counters = ?c, "data path stopped"),
            Err(e) => tracing::error!("data path failed: {e}"),
        }
    });
    let relay_stop = stop_rx.clone();
    // Filled in once connected; the relay counts reopened streams into it.
    let status: Arc<std::sync::Mutex<Status>> = Arc::default();
    let relay = chosen.relay.map(|sock| {
        Relay::start(
            sock,
            cluster.clone(),
            pod.clone(),
            status.clone(),
            reset.clone(),
            relay_stop,
        )
    });

    step(
        tx,
        format!(
            "probing the gateway at {}:{CONTROL_PORT} through the tunnel",
            reg.gateway_address
        ),
    );
    if let Err(e) = probe(reg.gateway_address).await {
        let _ = stop_tx.send(true);
        let _ = datapath.await;
        let _ = device.tear_down(&nl).await;
        return Err(e.context(format!(
            "the tunnel ({} transport) came up but nothing answered through it",
            chosen.name
        )));
    }
    let dns = match crate::dns::start(crate::dns::Setup {
        setting: req.dns,
        run_dir: &d.run_dir,
        ifname: name,
        address: reg.address,
        namespace: &cluster.namespace,
        domain: &reg.info.cluster.domain,
        cluster_dns: &reg.info.cluster.dns_servers,
        networks: &routes,
        cluster: &cluster,
    })
    .await
    {
        Ok(dns) => {
            step(tx, format!("DNS: {}", dns.summary()));
            dns
        }
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = datapath.await;
            let _ = device.tear_down(&nl).await;
            return Err(e.context("the tunnel is up but DNS is not (or connect with --dns=off)"));
        }
    };
    device.set_ready()?;

    let filled = Status {
        connected: true,
        kubeconfig: req
            .kubeconfig
            .clone()
            .map(|k| vec![k])
            .unwrap_or_else(|| req.kubeconfig_list.clone()),
        context: cluster.context.clone(),
        server: cluster.server.clone(),
        namespace: cluster.namespace.clone(),
        gateway_namespace: gns.clone(),
        gateway_version: pod.version.clone(),
        gateway_pod: pod.name.clone(),
        gateway_pod_ip: pod.ip.clone(),
        transport: chosen.name.to_owned(),
        transport_reason: chosen.reason.clone(),
        endpoint: chosen.endpoint.to_string(),
        device: name.to_owned(),
        tunnel_address: reg.address.to_string(),
        gateway_address: reg.gateway_address.to_string(),
        routes: routes.iter().map(ToString::to_string).collect(),
        cluster_domain: reg.info.cluster.domain.clone(),
        dns_servers: reg
            .info
            .cluster
            .dns_servers
            .iter()
            .map(ToString::to_string)
            .collect(),
        ..Default::default()
    };
    if let Ok(mut st) = status.lock() {
        let reconnects = st.reconnects;
        let error = st.last_reconnect_error.take();
        *st = filled;
        st.reconnects = reconnects;
        st.last_reconnect_error = error;
    }
    let supervisor = tokio::spawn(supervise(Supervisor {
        cluster: cluster.clone(),
        namespace: gns.clone(),
        version: want_version,
        key: key.clone(),
        address: reg.address,
        pod,
        relay,
        reset,
        status: status.clone(),
        stop: stop_rx,
    }));
    let done = with_dns(snapshot(&status, &stats), Some(&dns));
    *session = Some(Session {
        status,
        stats,
        cluster,
        public_key,
        stop: stop_tx,
        datapath,
        supervisor,
        device,
        dns: Some(dns),
        inbound,
    });
    step(
        tx,
        format!(
            "connected in {:.1}s: tunnel address {}, {} transport",
            started.elapsed().as_secs_f64(),
            done.tunnel_address,
            done.transport
        ),
    );
    Ok(done)
}

/// A 403 while installing or upgrading: say who can fix it and how to go
/// on without it.
fn install_refused(e: DeployError, what: &str, gns: &str) -> DeployError {
    if !e.is_forbidden() {
        return e;
    }
    let also = if what == "upgrade" {
        " or keep the installed gateway with `burrow connect --no-upgrade`"
    } else {
        ""
    };
    DeployError {
        hint: format!(
            "your user may not {what} the gateway: ask a cluster admin to run `burrow install` once \
             (it creates {gns} and the gateway), then connect again{also}"
        ),
        ..e
    }
}

fn install_options(namespace: &str) -> InstallOptions {
    InstallOptions {
        namespace: namespace.to_owned(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_include_dns_and_honour_exclude() {
        let svc: IpNet = "10.96.0.0/12".parse().expect("literal");
        let pods: IpNet = "10.244.0.0/16".parse().expect("literal");
        let dns: IpAddr = "10.96.0.10".parse().expect("literal");
        let other_dns: IpAddr = "172.20.0.10".parse().expect("literal");
        let r = plan_routes(&[svc], &[pods], &[dns, other_dns], &[], &[]);
        assert_eq!(
            r,
            vec![svc, pods, "172.20.0.10/32".parse().expect("literal")]
        );
        let r = plan_routes(
            &[svc],
            &[pods],
            &[dns],
            &["10.0.0.0/24".parse().expect("literal")],
            &[svc],
        );
        assert_eq!(r, vec![pods, "10.0.0.0/24".parse().expect("literal")]);
        // A hole in the Service range: the rest stays routed.
        let hole: IpNet = "10.100.0.0/16".parse().expect("literal");
        let r = plan_routes(&[svc], &[], &[dns], &[], &[hole]);
        assert!(!r.iter().any(|n| n.contains(&hole) || hole.contains(n)));
        assert!(r.iter().any(|n| n.contains(&dns)));
        assert!(
            r.iter()
                .any(|n| n.contains(&"10.111.0.1".parse::<IpAddr>().expect("literal")))
        );
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn protocol_lines_round_trip() {
        let line = serde_json::to_string(&Request::Status).expect("literal");
        assert_eq!(line, r#"{"op":"status"}"#);
        let r: Reply = serde_json::from_str(r#"{"kind":"progress","step":"x"}"#).expect("literal");
        assert!(matches!(r, Reply::Progress { step } if step == "x"));
    }
}
