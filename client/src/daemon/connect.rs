//! `connect`, the daemon's side, one named step after another:
//! [`reach_cluster`] → [`ensure_gateway`] (find / install / upgrade) →
//! [`ready_pod`] → ranges and [`register`] → [`routes_for`] →
//! [`refuse_conflicts`] → [`choose_transport`] → [`Tunnel::start`] (device,
//! routes, data path) → relay → [`probe`] → DNS → [`connected_status`],
//! then the supervisor. A failure after the device exists takes the tunnel
//! down again ([`Tunnel::abandon`]).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use boringtun::x25519::StaticSecret;
use burrow_api::{CONTROL_PORT, Registration, WgKey};
use burrow_deploy::install::{self, GatewayPod, InstallOptions};
use burrow_deploy::{Cluster, DeployError, Target, facts};
use burrow_netstack::wg::PeerConfig;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::*;
use crate::protocol::{ConnectRequest, Progress, Status, step};
use crate::tunnel::datapath::{Datapath, InboundPorts, Sessions, SharedStats, bind_udp};
use crate::tunnel::links::{LinkEvent, Links};
use crate::tunnel::netlink::Netlink;
use crate::tunnel::plan::subtract;
use crate::tunnel::state::Paths;
use crate::tunnel::tun::DEFAULT_IFNAME;
use crate::tunnel::{Device, Layout, Refusal, check_free};

/// Connects inside the session's span (filled in as the steps learn the
/// context, the gateway namespace, the laptop's tunnel address and the
/// transport), which the session's tasks and reroutes keep.
pub(super) async fn connect(
    d: &Daemon,
    req: ConnectRequest,
    tx: &Progress,
) -> anyhow::Result<Status> {
    use tracing::field::Empty;
    // Already connected: the running session's span.
    let running = d.session.lock().await.as_ref().map(|s| s.span.clone());
    let span = running.unwrap_or_else(|| {
        tracing::info_span!(
            "session",
            context = Empty,
            gateway = Empty,
            laptop = Empty,
            transport = Empty
        )
    });
    connect_in(d, req, tx, span.clone()).instrument(span).await
}

async fn connect_in(
    d: &Daemon,
    req: ConnectRequest,
    tx: &Progress,
    span: tracing::Span,
) -> anyhow::Result<Status> {
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

    let cluster = reach_cluster(&req, tx).await?;
    span.record("context", cluster.context.as_str());
    let gns = req.gateway_namespace.clone();
    // The namespace, not the pod: the session outlives pods (the
    // supervisor logs each change).
    span.record("gateway", gns.as_str());
    let version = ensure_gateway(&cluster, &req, tx).await?;
    let pod = ready_pod(&cluster, &gns, &version, tx).await?;

    step(tx, "learning the cluster's ranges");
    let ranges = facts::ranges(&cluster).await?;
    let key = load_key(&d.run_dir)?;
    step(tx, "registering with the gateway");
    let reg = register(&cluster, &pod, &key, None).await?;
    span.record("laptop", tracing::field::display(reg.address));
    let gateway_key = reg.info.public_key.public_key();
    let routes = routes_for(&ranges, &reg, &req);
    refuse_conflicts(&nl, &routes).await?;

    step(tx, "opening the tunnel");
    let chosen = choose_transport(&req, &cluster, &gns, &pod, &key, gateway_key, tx).await?;
    span.record("transport", chosen.name);
    step(
        tx,
        format!("transport: {} ({})", chosen.name, chosen.reason),
    );
    // The port-forward streams report to the data path on this channel.
    let (link_events, link_rx) = tokio::sync::mpsc::channel(LINK_EVENTS);
    let links = chosen.links.clone().map(|l| (l, link_rx));
    let mut tunnel =
        Tunnel::start(&nl, &d.run_dir, &reg, &routes, &key, chosen.endpoint, links).await?;
    // Filled in once connected; the streams count reopens into it.
    let status: Arc<std::sync::Mutex<Status>> = Arc::default();
    let relay = chosen.links.clone().map(|links| {
        PortForward::start(
            links,
            link_events,
            cluster.clone(),
            pod.clone(),
            status.clone(),
            tunnel.stop.subscribe(),
        )
    });
    if let Some(links) = &chosen.links {
        // Probing before a stream is open would lose the first packets
        // (and wait for their retransmission).
        let open = tokio::time::timeout(PORT_FORWARD_OPEN, links.wait_live()).await;
        if open.is_err() {
            tunnel.abandon(&nl).await;
            anyhow::bail!(
                "no port-forward stream to the gateway pod {} opened within {PORT_FORWARD_OPEN:?} (see the daemon log)",
                pod.name
            );
        }
    }

    step(
        tx,
        format!(
            "probing the gateway at {}:{CONTROL_PORT} through the tunnel",
            reg.gateway_address
        ),
    );
    if let Err(e) = probe(reg.gateway_address).await {
        tunnel.abandon(&nl).await;
        return Err(e.context(format!(
            "the tunnel ({} transport) came up but nothing answered through it",
            chosen.name
        )));
    }
    let dns = match crate::dns::start(crate::dns::Setup {
        setting: req.dns,
        run_dir: &d.run_dir,
        ifname: DEFAULT_IFNAME,
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
            tunnel.abandon(&nl).await;
            return Err(e.context("the tunnel is up but DNS is not (or connect with --dns=off)"));
        }
    };
    tunnel.device.set_ready()?;

    let filled = connected_status(&req, &cluster, &pod, &chosen, &reg, &routes);
    if let Ok(mut st) = status.lock() {
        let reconnects = st.reconnects;
        let error = st.last_reconnect_error.take();
        *st = filled;
        st.reconnects = reconnects;
        st.last_reconnect_error = error;
    }
    let underlay_to = match &relay {
        None => Some(chosen.endpoint),
        Some(_) => underlay::api_server_address(&cluster.server).await,
    };
    let supervisor = tokio::spawn(
        supervise(Supervisor {
            cluster: cluster.clone(),
            namespace: gns,
            version,
            key: key.clone(),
            address: reg.address,
            pod,
            relay,
            sessions: tunnel.sessions.clone(),
            status: status.clone(),
            stop: tunnel.stop.subscribe(),
            underlay_to,
        })
        .in_current_span(),
    );
    let done = with_dns(snapshot(&status, &tunnel.stats), Some(&dns));
    *session = Some(Session {
        status,
        stats: tunnel.stats,
        cluster,
        public_key: WgKey::public_of(&key),
        stop: tunnel.stop,
        datapath: tunnel.datapath,
        supervisor,
        device: tunnel.device,
        dns: Some(dns),
        inbound: tunnel.inbound,
        span,
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

/// The kubeconfig resolved, and its API server reachable.
async fn reach_cluster(req: &ConnectRequest, tx: &Progress) -> anyhow::Result<Cluster> {
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
    Ok(cluster)
}

/// Finds the gateway, installs or upgrades it as `req` allows; the version
/// that runs (or will).
async fn ensure_gateway(
    cluster: &Cluster,
    req: &ConnectRequest,
    tx: &Progress,
) -> anyhow::Result<String> {
    let gns = &req.gateway_namespace;
    step(tx, format!("finding the gateway in {gns}"));
    let progress = |s: &str| step(tx, s);
    match install::find(cluster, gns).await? {
        None if req.no_install => anyhow::bail!(
            "the gateway is not installed in {gns} and --no-install was given; \
             install it with `burrow install` (or drop --no-install)"
        ),
        None => {
            step(
                tx,
                format!("installing the gateway {} in {gns}", install::VERSION),
            );
            install::apply(cluster, &install_options(gns), &progress)
                .await
                .map_err(|e| install_refused(e, "install", gns))?;
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
                install::apply(cluster, &install_options(gns), &progress)
                    .await
                    .map_err(|e| install_refused(e, "upgrade", gns))?;
            }
        }
        Some(found) => step(tx, format!("found the gateway {} in {gns}", found.version)),
    }
    Ok(match install::find(cluster, gns).await? {
        Some(f) => f.version,
        None => install::VERSION.to_owned(),
    })
}

/// The gateway's pod of `version`, once Ready.
async fn ready_pod(
    cluster: &Cluster,
    gns: &str,
    version: &str,
    tx: &Progress,
) -> anyhow::Result<GatewayPod> {
    step(tx, "waiting for the gateway pod");
    let progress = |s: &str| step(tx, s);
    let pod = install::wait_ready(cluster, gns, version, READY_TIMEOUT, &progress).await?;
    step(
        tx,
        format!("gateway pod {} is ready ({})", pod.name, pod.ip),
    );
    Ok(pod)
}

/// The routes into the tunnel ([`plan_routes`]), and the gateway's tunnel
/// address: rerouted connections come from it, so the answers must go back
/// into the tunnel.
fn routes_for(ranges: &facts::Ranges, reg: &Registration, req: &ConnectRequest) -> Vec<IpNet> {
    let mut routes = plan_routes(
        &ranges.service,
        &ranges.pods,
        &reg.info.cluster.dns_servers,
        &req.include,
        &req.exclude,
    );
    if !routes.iter().any(|r| r.contains(&reg.gateway_address)) {
        routes.push(IpNet::from(reg.gateway_address));
    }
    routes
}

/// Refuses, before any change, a device that exists or a route that
/// overlaps one that is not ours.
async fn refuse_conflicts(nl: &Netlink, routes: &[IpNet]) -> anyhow::Result<()> {
    let name = DEFAULT_IFNAME;
    match check_free(nl, name, routes).await? {
        None => Ok(()),
        Some(Refusal::NameInUse) => anyhow::bail!(
            "device {name} already exists (a `burrow up` running?); stop it with `sudo burrow down`"
        ),
        Some(Refusal::Overlap { ours, theirs }) => anyhow::bail!(
            "refusing to route {ours} into the cluster: it overlaps the existing route `{theirs}`; \
             leave it out with `--exclude {}` (or remove that route)",
            theirs.dst
        ),
    }
}

/// How long connect waits for the first port-forward stream.
const PORT_FORWARD_OPEN: std::time::Duration = std::time::Duration::from_secs(15);

/// Events from the port-forward streams waiting for the data path (each
/// at most one WebSocket message); a full channel holds the streams back.
const LINK_EVENTS: usize = 256;

/// The device and the data path, running.
struct Tunnel {
    device: Device,
    datapath: JoinHandle<()>,
    /// Stops the data path (and, subscribed, the relay and supervisor).
    stop: watch::Sender<bool>,
    stats: SharedStats,
    sessions: Arc<Sessions>,
    inbound: Arc<InboundPorts>,
}

impl Tunnel {
    /// Brings the device up with the laptop's tunnel address and `routes`,
    /// and starts the data path towards the gateway at `endpoint`.
    async fn start(
        nl: &Netlink,
        run_dir: &Path,
        reg: &Registration,
        routes: &[IpNet],
        key: &StaticSecret,
        endpoint: SocketAddr,
        links: Option<(Arc<Links>, tokio::sync::mpsc::Receiver<LinkEvent>)>,
    ) -> anyhow::Result<Self> {
        // A byte stream has no path MTU to fit (see FRAMED_MTU).
        let mtu = if links.is_some() {
            burrow_netstack::framing::FRAMED_MTU
        } else {
            MTU
        };
        let layout = Layout {
            name: DEFAULT_IFNAME,
            mtu,
            addresses: &[IpNet::from(reg.address)],
            routes,
            config: run_dir.join("key"),
        };
        let paths = Paths::new(run_dir, DEFAULT_IFNAME);
        let (device, tun) = Device::bring_up(nl, &paths, layout).await?;
        let stats: SharedStats = Arc::default();
        let sessions: Arc<Sessions> = Arc::default();
        let inbound = Arc::new(InboundPorts::new(reg.gateway_address));
        let setup = async {
            let udp = bind_udp(0).context("cannot bind a UDP port")?;
            let peer = PeerConfig {
                public_key: reg.info.public_key.public_key(),
                allowed_ips: routes.to_vec(),
                endpoint: Some(endpoint),
                preshared_key: None,
                persistent_keepalive: Some(25),
            };
            let mut dp = Datapath::new(key.clone(), vec![peer], tun, udp, mtu)
                .context("invalid gateway peer")?
                .with_stats(stats.clone())
                .with_sessions(sessions.clone())
                .with_inbound_filter(inbound.clone());
            if let Some((links, events)) = links {
                dp = dp.with_links(links, events);
            }
            anyhow::Ok(dp)
        }
        .await;
        let dp = match setup {
            Ok(dp) => dp,
            Err(e) => {
                let _ = device.tear_down(nl).await;
                return Err(e);
            }
        };
        let (stop, mut stop_dp) = watch::channel(false);
        let datapath = tokio::spawn(
            async move {
                let stop = async move {
                    let _ = stop_dp.wait_for(|s| *s).await;
                };
                match dp.run(stop).await {
                    Ok(c) => tracing::info!(counters = ?c, "data path stopped"),
                    Err(e) => tracing::error!("data path failed: {e}"),
                }
            }
            .in_current_span(),
        );
        Ok(Self {
            device,
            datapath,
            stop,
            stats,
            sessions,
            inbound,
        })
    }

    /// Stops the data path and takes the device down (a connect that
    /// failed half-way).
    async fn abandon(self, nl: &Netlink) {
        let _ = self.stop.send(true);
        let _ = self.datapath.await;
        let _ = self.device.tear_down(nl).await;
    }
}

/// What `status` shows of the connection just made.
fn connected_status(
    req: &ConnectRequest,
    cluster: &Cluster,
    pod: &GatewayPod,
    chosen: &Chosen,
    reg: &Registration,
    routes: &[IpNet],
) -> Status {
    Status {
        connected: true,
        kubeconfig: req
            .kubeconfig
            .clone()
            .map(|k| vec![k])
            .unwrap_or_else(|| req.kubeconfig_list.clone()),
        context: cluster.context.clone(),
        server: cluster.server.clone(),
        namespace: cluster.namespace.clone(),
        gateway_namespace: req.gateway_namespace.clone(),
        gateway_version: pod.version.clone(),
        gateway_pod: pod.name.clone(),
        gateway_pod_ip: pod.ip.clone(),
        transport: chosen.name.to_owned(),
        transport_reason: chosen.reason.clone(),
        endpoint: match &chosen.links {
            Some(links) => super::transport::port_forward_endpoint(&pod.name, links.count()),
            None => chosen.endpoint.to_string(),
        },
        device: DEFAULT_IFNAME.to_owned(),
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
    }
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
}
