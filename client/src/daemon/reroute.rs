//! `burrow reroute`, the daemon's side.
//!
//! The daemon, for one reroute: find the Service and port (user's
//! credentials) → check the user may patch it (dry run) → shadow Service →
//! this laptop's reroute record on the Service → a forwarder on the tunnel address (kernel socket, ephemeral port) that
//! hands each connection to 127.0.0.1:LOCALPORT (for a UDP port: each
//! source's datagrams to 127.0.0.1:LOCALPORT from a socket of its own, the
//! replies back) → ask the gateway for the
//! route (`POST /v1/reroutes`, through the tunnel) → point the Service at
//! the gateway's listeners. A renewer posts the lease every
//! [`RENEW_EVERY`]; when the gateway no longer knows the laptop's reroutes
//! (a new gateway pod, or an expired lease) it establishes them again.
//! `--stop` and `disconnect` stop them at the gateway and restore the
//! Services with the user's credentials (the gateway restores too; restore
//! is idempotent).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use burrow_api::{
    Leases, PortProtocol, Reroute, RerouteGrant, RerouteRequest, StopRequest, Stopped, WgKey,
};
use burrow_deploy::Cluster;
use burrow_deploy::install::GatewayPod;
use hyper::StatusCode;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Mutex;
use tracing::Instrument as _;

use crate::protocol::{Listed, Progress, Spec, Status, Stop, step};
use crate::tunnel::datapath::InboundPorts;

use super::gateway::{GatewayError, TunnelApi};

/// How often the daemon renews its leases (the gateway's expiry is 15 s).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a call to the gateway may take (but a stop).
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// What the daemon needs of its connection.
#[derive(Clone)]
pub struct Link {
    /// The session's span: the renewer runs in it.
    pub span: tracing::Span,
    pub cluster: Cluster,
    pub public_key: WgKey,
    pub status: Arc<std::sync::Mutex<Status>>,
    /// The laptop's inbound filter: forwarder ports are opened here.
    pub open: Arc<InboundPorts>,
}

impl Link {
    fn gateway(&self) -> anyhow::Result<(GatewayPod, IpAddr)> {
        let st = self
            .status
            .lock()
            .map_err(|_| anyhow::anyhow!("status lock poisoned"))?
            .clone();
        let tunnel: IpAddr = st.tunnel_address.parse().context("no tunnel address yet")?;
        Ok((
            GatewayPod {
                namespace: st.gateway_namespace,
                name: st.gateway_pod,
                ip: st.gateway_pod_ip,
                version: st.gateway_version,
                started: None,
                ready_at: None,
            },
            tunnel,
        ))
    }

    /// The gateway's tunnel address (where the laptop's own API is, and
    /// where rerouted connections come from).
    fn gateway_address(&self) -> anyhow::Result<IpAddr> {
        self.status
            .lock()
            .map_err(|_| anyhow::anyhow!("status lock poisoned"))?
            .gateway_address
            .parse()
            .context("no gateway tunnel address yet")
    }

    /// The laptop's own API at the gateway, through the tunnel.
    fn api(&self) -> Result<TunnelApi, GatewayError> {
        Ok(TunnelApi {
            gateway: self.gateway_address()?,
        })
    }

    /// `work` (`what`, a call to the gateway), given `limit` to answer.
    async fn within<T>(
        &self,
        what: &str,
        limit: Duration,
        work: impl Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        let (pod, _) = self.gateway()?;
        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the gateway {} did not answer {what} in {}s",
                pod.name,
                limit.as_secs()
            )
            .into())
        })
    }

    /// This laptop's reroutes, as the gateway knows them.
    async fn reroutes(&self) -> Result<Vec<Reroute>, GatewayError> {
        let api = self.api()?;
        self.within("GET /v1/reroutes", CALL_LIMIT, api.reroutes())
            .await
    }

    /// Asks the gateway for a route.
    async fn request(&self, req: &RerouteRequest) -> Result<RerouteGrant, GatewayError> {
        let api = self.api()?;
        self.within("POST /v1/reroutes", CALL_LIMIT, api.reroute(req))
            .await
    }

    /// Stops routes at the gateway. This waits for the gateway's
    /// make-before-break restore: the pods listed again (at most
    /// `CONTROLLER_WAIT`), then kube-proxy's lag.
    async fn stop_at_gateway(&self, req: &StopRequest) -> Result<Stopped, GatewayError> {
        let limit = burrow_deploy::service::CONTROLLER_WAIT
            + burrow_deploy::service::KUBE_PROXY_LAG
            + Duration::from_secs(10);
        let api = self.api()?;
        self.within("POST /v1/reroutes/stop", limit, api.stop(req))
            .await
    }

    /// Renews this laptop's leases.
    async fn renew(&self) -> Result<Leases, GatewayError> {
        let api = self.api()?;
        self.within("POST /v1/leases", CALL_LIMIT, api.renew())
            .await
    }
}

/// One established reroute.
struct Active {
    spec: Spec,
    namespace: String,
    service: String,
    port: u16,
    transport: PortProtocol,
    /// The forwarder's port on the tunnel address.
    tunnel_port: u16,
    forwarder: Forwarder,
    /// The reroute's span ([`reroute_span`]): its forwarder runs in it.
    span: tracing::Span,
}

/// A running forwarder: its task, and its port open in the laptop's
/// inbound filter while it runs.
pub struct Forwarder {
    task: tokio::task::JoinHandle<()>,
    port: u16,
    transport: PortProtocol,
    open: Arc<InboundPorts>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        match self.transport {
            PortProtocol::Tcp => self.open.close(self.port),
            PortProtocol::Udp => self.open.close_udp(self.port),
        }
    }
}

/// The daemon's reroutes.
#[derive(Default)]
pub struct Reroutes {
    active: Mutex<Vec<Active>>,
    renewer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What the daemon last logged about changes someone else made to a
    /// rerouted Service, per (namespace, Service).
    told: Mutex<std::collections::BTreeMap<(String, String), String>>,
}

impl Reroutes {
    pub async fn list(&self, link: Option<&Link>) -> anyhow::Result<String> {
        let Some(link) = link else {
            return Ok("[]".into());
        };
        // The gateway lists this laptop's own reroutes only.
        let all = link.reroutes().await?;
        let active = self.active.lock().await;
        let listed: Vec<Listed> = all
            .into_iter()
            .map(|r| {
                let local_port = active
                    .iter()
                    .find(|a| {
                        a.namespace == r.namespace
                            && a.service == r.service
                            && a.port == r.port
                            && a.transport == r.protocol.transport()
                    })
                    .map(|a| a.spec.local_port);
                Listed {
                    reroute: r,
                    mine: true,
                    local_port,
                }
            })
            .collect();
        Ok(serde_json::to_string(&listed)?)
    }

    /// Establishes a reroute; the message says what happened.
    pub async fn add(
        self: &Arc<Self>,
        link: &Link,
        spec: Spec,
        tx: &Progress,
    ) -> anyhow::Result<String> {
        let mut active = self.active.lock().await;
        let namespace = spec
            .namespace
            .clone()
            .unwrap_or_else(|| link.cluster.namespace.clone());
        let found =
            burrow_deploy::reroute::find(&link.cluster, &namespace, &spec.service, &spec.port)
                .await?;
        let existing = active.iter().position(|a| {
            a.namespace == namespace
                && a.service == spec.service
                && a.port == found.port.port
                && a.transport == found.port.protocol
        });
        let tunnel_port = match existing {
            Some(i) => active[i].tunnel_port,
            None => 0,
        };
        let span = reroute_span(&namespace, &spec);
        let (grant, tunnel_port, forwarder) = establish(link, &spec, &namespace, tunnel_port, tx)
            .instrument(span.clone())
            .await?;
        let took = grant
            .took_over_from
            .map(|h| format!(" (taken over from {h})"))
            .unwrap_or_default();
        let a = Active {
            spec: spec.clone(),
            namespace: namespace.clone(),
            service: spec.service.clone(),
            port: found.port.port,
            transport: found.port.protocol,
            tunnel_port,
            forwarder,
            span,
        };
        match existing {
            Some(i) => active[i] = a,
            None => active.push(a),
        }
        drop(active);
        self.ensure_renewer(link.clone());
        let (what, port) = match (&spec.header, found.port.protocol) {
            (Some((n, v)), _) => (
                format!("requests with {n}: {v}"),
                found.port.port.to_string(),
            ),
            (None, PortProtocol::Tcp) => ("all connections".into(), found.port.port.to_string()),
            (None, PortProtocol::Udp) => {
                ("all datagrams".into(), format!("{}/udp", found.port.port))
            }
        };
        Ok(format!(
            "rerouted {namespace}/{} port {port} to 127.0.0.1:{}: {what}{took}; stop with `burrow reroute --stop {}`",
            spec.service, spec.local_port, spec.service
        ))
    }

    fn ensure_renewer(self: &Arc<Self>, link: Link) {
        let Ok(mut r) = self.renewer.lock() else {
            return;
        };
        if r.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let me = self.clone();
        let span = link.span.clone();
        *r = Some(tokio::spawn(
            async move { me.renew_loop(link).await }.instrument(span),
        ));
    }

    async fn renew_loop(self: Arc<Self>, link: Link) {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            if self.active.lock().await.is_empty() {
                continue;
            }
            match link.renew().await {
                Ok(leases) => {
                    tracing::trace!(reroutes = leases.reroutes.len(), "reroute leases renewed");
                    // Tell (once) what someone else changed on a rerouted
                    // Service.
                    if !leases.taken_over.is_empty() {
                        let mut active = self.active.lock().await;
                        active.retain(|a| {
                            let taken = leases.taken_over.iter().find(|t| {
                                t.namespace == a.namespace
                                    && t.service == a.service
                                    && t.port == a.port
                                    && a.spec.header.is_none()
                            });
                            if let Some(t) = taken {
                                tracing::warn!(parent: &a.span, "laptop {} took this reroute over (--force): dropped here", t.by);
                            }
                            taken.is_none()
                        });
                    }
                    let mut told = self.told.lock().await;
                    for r in &leases.reroutes {
                        let key = (r.namespace.clone(), r.service.clone());
                        if told.get(&key) != r.changed.as_ref() {
                            if let Some(c) = &r.changed {
                                tracing::warn!(namespace = %r.namespace, service = %r.service, "{c}");
                            }
                            match &r.changed {
                                Some(c) => told.insert(key, c.clone()),
                                None => told.remove(&key),
                            };
                        }
                    }
                }
                Err(GatewayError::Refused {
                    status: StatusCode::NOT_FOUND,
                    ..
                }) => {
                    tracing::info!(
                        "the gateway does not know this laptop's reroutes (new gateway pod, or the lease ran out): establishing them again"
                    );
                    self.reestablish(&link).await;
                }
                Err(e) => tracing::warn!("renewing reroute leases: {e:#}"),
            }
        }
    }

    async fn reestablish(&self, link: &Link) {
        let mut active = self.active.lock().await;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let mut taken = Vec::new();
        for (i, a) in active.iter_mut().enumerate() {
            let established = establish(link, &a.spec, &a.namespace, a.tunnel_port, &tx)
                .instrument(a.span.clone())
                .await;
            match established {
                Ok((_, port, forwarder)) => {
                    a.tunnel_port = port;
                    a.forwarder = forwarder;
                    tracing::info!(parent: &a.span, "reroute established again");
                }
                // `--force` from another laptop: give up, do not fight.
                Err(e)
                    if e.downcast_ref::<GatewayError>()
                        .and_then(GatewayError::status)
                        == Some(StatusCode::CONFLICT) =>
                {
                    tracing::warn!(parent: &a.span, "the reroute was taken over by another laptop: {e:#}");
                    taken.push(i);
                }
                Err(e) => {
                    tracing::warn!(parent: &a.span, "establishing the reroute again: {e:#}")
                }
            }
        }
        for i in taken.into_iter().rev() {
            active.remove(i);
        }
    }

    /// Stops this laptop's reroutes (of `stop.service`, or all) and
    /// restores the Services no laptop reroutes any more.
    pub async fn stop(
        &self,
        link: Option<&Link>,
        stop: &Stop,
        tx: &Progress,
    ) -> anyhow::Result<String> {
        let mut active = self.active.lock().await;
        let Some(link) = link else {
            active.clear();
            if let Ok(mut r) = self.renewer.lock()
                && let Some(h) = r.take()
            {
                h.abort();
            }
            return Ok("not connected: no reroutes".into());
        };
        let namespace = stop
            .namespace
            .clone()
            .unwrap_or_else(|| link.cluster.namespace.clone());
        let req = StopRequest {
            namespace: stop.service.as_ref().map(|_| namespace.clone()),
            service: stop.service.clone(),
            port: None,
        };
        let mine: Vec<(String, String)> = active
            .iter()
            .filter(|a| {
                stop.service
                    .as_ref()
                    .is_none_or(|s| *s == a.service && a.namespace == namespace)
            })
            .map(|a| (a.namespace.clone(), a.service.clone()))
            .collect();
        let mut notes = Vec::new();
        let released: Vec<(String, String)> = match link.stop_at_gateway(&req).await {
            Ok(s) => {
                notes = s.notes;
                s.released
            }
            Err(GatewayError::Refused { status, message }) => {
                step(
                    tx,
                    format!(
                        "the gateway answered {} to stopping: {message}; restoring here",
                        status.as_u16()
                    ),
                );
                mine.clone()
            }
            Err(GatewayError::Failed(e)) => {
                step(
                    tx,
                    format!("the gateway did not answer ({e:#}); restoring here"),
                );
                mine.clone()
            }
        };
        // Only Services this laptop rerouted itself are restored here,
        // whatever the gateway's answer lists.
        let key = link.public_key;
        let mut restored = Vec::new();
        for (ns, svc) in &mine {
            if released.contains(&(ns.clone(), svc.clone())) {
                step(tx, format!("restoring Service {ns}/{svc}"));
                if let burrow_deploy::service::Restored::KeptNewerSelector(sel) =
                    burrow_deploy::reroute::restore(&link.cluster, ns, svc).await?
                {
                    notes.push(format!(
                        "Service {ns}/{svc}: someone else had put its selector back ({sel}) while it was rerouted; that newer selector was left in place"
                    ));
                }
                restored.push(format!("{ns}/{svc}"));
            } else {
                burrow_deploy::reroute::remove_record(&link.cluster, ns, svc, &key).await?;
            }
        }
        active.retain(|a| !mine.contains(&(a.namespace.clone(), a.service.clone())));
        if active.is_empty()
            && let Ok(mut r) = self.renewer.lock()
            && let Some(h) = r.take()
        {
            h.abort();
        }
        if stop.service.is_some() && mine.is_empty() {
            anyhow::bail!(
                "this machine does not reroute {namespace}/{}; see `burrow reroute --list`",
                stop.service.clone().unwrap_or_default()
            );
        }
        let mut text = if restored.is_empty() {
            format!(
                "stopped {} reroute(s); other laptops still reroute the Service",
                mine.len()
            )
        } else {
            format!(
                "stopped {} reroute(s); restored {}",
                mine.len(),
                restored.join(", ")
            )
        };
        notes.dedup();
        for n in notes {
            text.push_str("\nnote: ");
            text.push_str(&n);
        }
        Ok(text)
    }
}

/// The span of one reroute, inside the session's: which Service port, to
/// which local port, and which requests (`all`, or by a header).
fn reroute_span(namespace: &str, spec: &Spec) -> tracing::Span {
    let mode = match &spec.header {
        Some((name, value)) => format!("header {name}={value}"),
        None => "all".to_string(),
    };
    tracing::info_span!(
        "reroute",
        service = %format_args!("{namespace}/{}", spec.service),
        port = %spec.port,
        local_port = spec.local_port,
        %mode
    )
}

/// The whole establishment of one reroute (see the module doc). Rolls back
/// what it changed when a later step fails. Runs in the reroute's span.
async fn establish(
    link: &Link,
    spec: &Spec,
    namespace: &str,
    tunnel_port: u16,
    tx: &Progress,
) -> anyhow::Result<(RerouteGrant, u16, Forwarder)> {
    let cluster = &link.cluster;
    let key = link.public_key;
    let found = burrow_deploy::reroute::find(cluster, namespace, &spec.service, &spec.port).await?;
    let protocol = found.protocol(spec.protocol, spec.header.is_some())?;
    step(
        tx,
        format!(
            "checking you may patch Service {namespace}/{}",
            spec.service
        ),
    );
    burrow_deploy::reroute::check_may_patch(cluster, &found.service).await?;
    step(
        tx,
        "creating the shadow Service for traffic that stays in the cluster",
    );
    let shadow = burrow_deploy::reroute::ensure_shadow(cluster, &found.service).await?;
    if shadow.unlisted {
        step(
            tx,
            format!(
                "the cluster's endpoint-slice controller has not listed all of the shadow Service's \
                 pods within {} s (it is slow or not running)",
                burrow_deploy::service::CONTROLLER_WAIT.as_secs()
            ),
        );
    }
    if shadow.fresh {
        await_routed(
            tx,
            &found,
            SocketAddr::new(shadow.cluster_ip, found.port.port),
        )
        .await;
    }
    step(
        tx,
        format!(
            "writing this laptop's reroute record on Service {namespace}/{}",
            spec.service
        ),
    );
    burrow_deploy::reroute::write_record(cluster, &found.service, &key, &laptop_label()).await?;
    let undo = || async {
        let _ =
            burrow_deploy::reroute::remove_record(cluster, namespace, &spec.service, &key).await;
    };
    let (gateway, tunnel_ip) = link.gateway()?;
    let gateway_address = link.gateway_address()?;
    let forwarder = match start_forwarder(
        link,
        found.port.protocol,
        tunnel_ip,
        tunnel_port,
        spec.local_port,
        gateway_address,
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            undo().await;
            return Err(e);
        }
    };
    let tunnel_port = forwarder.port;
    let req = RerouteRequest {
        namespace: namespace.to_owned(),
        service: spec.service.clone(),
        ports: found.ports.clone(),
        port: found.port.port,
        laptop_port: tunnel_port,
        protocol,
        header: spec.header.clone(),
        force: spec.force,
        fallback: spec.fallback,
    };
    step(tx, format!("asking the gateway {} to listen", gateway.name));
    let grant = match link.request(&req).await {
        Ok(grant) => grant,
        Err(e) => {
            drop(forwarder);
            // This laptop's record goes again (and the shadow made just
            // now, when nobody reroutes the Service).
            undo().await;
            // A refusal keeps its status (409: another laptop holds it).
            return Err(e.into());
        }
    };
    step(
        tx,
        format!(
            "pointing Service {namespace}/{} at the gateway",
            spec.service
        ),
    );
    if let Err(e) = burrow_deploy::reroute::point_at_gateway(
        cluster,
        &found.service,
        &gateway,
        &grant.listeners,
        &laptop_label(),
    )
    .await
    {
        drop(forwarder);
        let stop = StopRequest {
            namespace: Some(namespace.to_owned()),
            service: Some(spec.service.clone()),
            port: Some(found.port.port),
        };
        let _ = link.stop_at_gateway(&stop).await;
        let _ = burrow_deploy::reroute::restore(cluster, namespace, &spec.service).await;
        return Err(e.into());
    }
    Ok((grant, tunnel_port, forwarder))
}

/// How long `reroute` waits for a new shadow Service to answer before it
/// goes on anyway (the gateway's own dials to it keep trying for a while).
const SHADOW_PROBE: Duration = Duration::from_secs(15);
/// One connection attempt of that wait: a SYN kube-proxy had no rule for
/// yet may be lost.
const SHADOW_PROBE_ATTEMPT: Duration = Duration::from_millis(700);

/// A shadow Service made a moment ago is handed callers (by the gateway,
/// once burrow's slice points the Service at it) only once kube-proxy
/// routes it: until then connections to it are refused or lost. For TCP,
/// connect to it through the tunnel, i.e. from the gateway as its own
/// dials will, until it answers (the connection is closed at once); for
/// UDP, which cannot be asked, wait kube-proxy's usual lag.
async fn await_routed(tx: &Progress, found: &burrow_deploy::reroute::Found, to: SocketAddr) {
    if found.port.protocol != PortProtocol::Tcp {
        tokio::time::sleep(burrow_deploy::service::KUBE_PROXY_LAG).await;
        return;
    }
    step(
        tx,
        format!("waiting until the cluster routes the shadow Service ({to})"),
    );
    let start = tokio::time::Instant::now();
    loop {
        let e = match tokio::time::timeout(SHADOW_PROBE_ATTEMPT, TcpStream::connect(to)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    after_ms = start.elapsed().as_millis() as u64,
                    "the shadow Service answers"
                );
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", SHADOW_PROBE_ATTEMPT.as_millis()),
        };
        if start.elapsed() >= SHADOW_PROBE {
            step(
                tx,
                format!(
                    "the shadow Service ({to}) did not answer within {} s ({e}); going on: \
                     requests the cluster's pods should answer may fail until it does",
                    SHADOW_PROBE.as_secs()
                ),
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A forwarder on the tunnel address (the port it had before if free,
/// else an ephemeral one), open in the inbound filter.
async fn start_forwarder(
    link: &Link,
    transport: PortProtocol,
    tunnel_ip: IpAddr,
    tunnel_port: u16,
    local_port: u16,
    gateway: IpAddr,
) -> anyhow::Result<Forwarder> {
    let context = || format!("cannot listen on the tunnel address {tunnel_ip}");
    let (task, port) = match transport {
        PortProtocol::Tcp => {
            let listener = match TcpListener::bind(SocketAddr::new(tunnel_ip, tunnel_port)).await {
                Ok(l) => Ok(l),
                Err(_) if tunnel_port != 0 => {
                    TcpListener::bind(SocketAddr::new(tunnel_ip, 0)).await
                }
                Err(e) => Err(e),
            }
            .with_context(context)?;
            let port = listener.local_addr()?.port();
            link.open.open(port);
            (
                tokio::spawn(forward(listener, local_port, gateway).in_current_span()),
                port,
            )
        }
        PortProtocol::Udp => {
            let socket = match UdpSocket::bind(SocketAddr::new(tunnel_ip, tunnel_port)).await {
                Ok(s) => Ok(s),
                Err(_) if tunnel_port != 0 => UdpSocket::bind(SocketAddr::new(tunnel_ip, 0)).await,
                Err(e) => Err(e),
            }
            .with_context(context)?;
            let port = socket.local_addr()?.port();
            link.open.open_udp(port);
            let task = tokio::spawn(
                forward_udp(socket, local_port, gateway, UdpLimits::default()).in_current_span(),
            );
            (task, port)
        }
    };
    Ok(Forwarder {
        task,
        port,
        transport,
        open: link.open.clone(),
    })
}

fn laptop_label() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "laptop".into());
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "root".into());
    format!("{user}@{host}")
}

/// Hands every connection arriving on the tunnel address from the
/// gateway's tunnel address to 127.0.0.1:`local_port` (any other source is
/// reset: rerouted connections come only from the gateway); nothing
/// listening there → the tunnel connection is reset (the gateway answers
/// 502 or resets the caller) and a line is logged.
async fn forward(listener: TcpListener, local_port: u16, gateway: IpAddr) {
    loop {
        let (mut conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept on the reroute forwarder: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if from.ip() != gateway {
            tracing::warn!(%from, "reroute forwarder: a connection not from the gateway; reset");
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
            drop(conn);
            continue;
        }
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            match TcpStream::connect(("127.0.0.1", local_port)).await {
                Ok(mut local) => {
                    let _ = local.set_nodelay(true);
                    tracing::debug!(%from, "rerouted connection: to 127.0.0.1:{local_port}");
                    match tokio::io::copy_bidirectional(&mut conn, &mut local).await {
                        Ok((to_local, to_cluster)) => tracing::debug!(%from, to_local, to_cluster, "rerouted connection closed"),
                        Err(e) => tracing::debug!(%from, "rerouted connection ended: {e}"),
                    }
                }
                Err(e) => {
                    tracing::warn!(%from, "rerouted connection: nothing answers on 127.0.0.1:{local_port} ({e}); is your local server running?");
                    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
                    drop(conn);
                }
            }
        }.in_current_span());
    }
}

/// Bounds of a UDP forwarder.
#[derive(Debug, Clone, Copy)]
struct UdpLimits {
    /// Sources (the gateway's flows, one per cluster caller) with a local
    /// socket at once.
    max_sources: usize,
    /// A source with no datagram either way for this long loses its
    /// socket; longer than the gateway's 60 s, so the gateway's end goes
    /// first.
    idle: Duration,
}

impl Default for UdpLimits {
    fn default() -> Self {
        Self {
            max_sources: 1024,
            idle: Duration::from_secs(120),
        }
    }
}

/// One source's local socket (connected to 127.0.0.1:LOCALPORT) and the
/// task that sends its replies back.
struct UdpSource {
    local: Arc<UdpSocket>,
    last: Arc<std::sync::atomic::AtomicU64>,
    replies: tokio::task::JoinHandle<()>,
}

impl Drop for UdpSource {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Hands the datagrams arriving on the tunnel address from the gateway's
/// tunnel address to 127.0.0.1:`local_port`: each source (the gateway's
/// end of one cluster caller's flow) from a socket of its own, so the
/// local server's replies go back to that source. Datagrams from anyone
/// else are dropped (the inbound filter already drops them); nothing
/// listening locally drops them too, with a log line.
async fn forward_udp(socket: UdpSocket, local_port: u16, gateway: IpAddr, limits: UdpLimits) {
    use std::sync::atomic::Ordering;
    let socket = Arc::new(socket);
    let start = std::time::Instant::now();
    let now_ms = move || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut sources: std::collections::HashMap<SocketAddr, UdpSource> = Default::default();
    let mut buf = vec![0u8; 65_535];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut said_full = false;
    let said_nothing_there = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("receive on the UDP reroute forwarder: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if from.ip() != gateway {
                    tracing::debug!(%from, "UDP reroute forwarder: a datagram not from the gateway; dropped");
                    continue;
                }
                if sources.get(&from).is_some_and(|s| s.replies.is_finished()) {
                    sources.remove(&from);
                }
                if !sources.contains_key(&from) {
                    if sources.len() >= limits.max_sources {
                        if !said_full {
                            said_full = true;
                            tracing::warn!(cap = limits.max_sources, "UDP reroute forwarder: as many cluster callers as it takes; datagrams of new ones are dropped until some are idle");
                        }
                        continue;
                    }
                    let local = match UdpSocket::bind(("127.0.0.1", 0)).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!("UDP reroute forwarder: no local socket: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = local.connect(("127.0.0.1", local_port)).await {
                        tracing::warn!("UDP reroute forwarder: {e}");
                        continue;
                    }
                    let local = Arc::new(local);
                    let last = Arc::new(std::sync::atomic::AtomicU64::new(now_ms()));
                    let replies = {
                        let (local, socket, last) = (local.clone(), socket.clone(), last.clone());
                        let nothing_there = said_nothing_there.clone();
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_535];
                            loop {
                                match local.recv(&mut buf).await {
                                    Ok(n) => {
                                        last.store(now_ms(), Ordering::Relaxed);
                                        nothing_there.store(false, Ordering::Relaxed);
                                        let _ = socket.send_to(buf.get(..n).unwrap_or_default(), from).await;
                                    }
                                    // ICMP port unreachable for an earlier datagram.
                                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                                        if !nothing_there.swap(true, Ordering::Relaxed) {
                                            tracing::warn!("rerouted datagrams: nothing answers on UDP 127.0.0.1:{local_port}; is your local server running?");
                                        }
                                    }
                                    Err(_) => break,
                                }
                            }
                        })
                    };
                    sources.insert(from, UdpSource { local, last, replies });
                }
                if let Some(s) = sources.get(&from) {
                    s.last.store(now_ms(), Ordering::Relaxed);
                    // Straight to the kernel; a full buffer drops it.
                    let _ = socket2::SockRef::from(s.local.as_ref()).send(buf.get(..n).unwrap_or_default());
                }
            }
            _ = sweep.tick() => {
                let now = now_ms();
                let idle = u64::try_from(limits.idle.as_millis()).unwrap_or(u64::MAX);
                sources.retain(|_, s| {
                    !s.replies.is_finished()
                        && now.saturating_sub(s.last.load(Ordering::Relaxed)) < idle
                });
                if sources.len() <= limits.max_sources / 2 {
                    said_full = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams from the gateway reach the local server, each source from
    /// a socket of its own, and the replies go back to their source;
    /// datagrams from anyone else never reach it.
    #[tokio::test]
    async fn udp_forwarder_relays_per_source_and_only_from_the_gateway() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let server = UdpSocket::bind(("127.0.0.1", 0)).await.expect("server");
        let local_port = server.local_addr().expect("addr").port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut reply = b"laptop:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&reply, from).await;
            }
        });
        let gateway: IpAddr = "127.0.0.1".parse().expect("ip");
        let socket = UdpSocket::bind(("127.0.0.1", 0)).await.expect("forwarder");
        let fwd = socket.local_addr().expect("addr");
        tokio::spawn(forward_udp(
            socket,
            local_port,
            gateway,
            UdpLimits::default(),
        ));

        let stranger = UdpSocket::bind(("127.0.0.2", 0)).await.expect("stranger");
        stranger.send_to(b"sneak", fwd).await.expect("send");
        let a = UdpSocket::bind(("127.0.0.1", 0)).await.expect("a");
        let b = UdpSocket::bind(("127.0.0.1", 0)).await.expect("b");
        async fn ask(s: &UdpSocket, fwd: SocketAddr, msg: &[u8]) -> Vec<u8> {
            s.send_to(msg, fwd).await.expect("send");
            let mut buf = [0u8; 512];
            let (n, from) = tokio::time::timeout(Duration::from_secs(10), s.recv_from(&mut buf))
                .await
                .expect("a reply")
                .expect("recv");
            assert_eq!(from, fwd, "replies come from the forwarder");
            buf[..n].to_vec()
        }
        assert_eq!(ask(&a, fwd, b"one").await, b"laptop:one");
        assert_eq!(ask(&b, fwd, b"two").await, b"laptop:two");
        assert_eq!(ask(&a, fwd, b"three").await, b"laptop:three");
        // The stranger's datagram came first, on the same socket.
        assert_eq!(
            seen.load(Ordering::SeqCst),
            3,
            "the stranger's never arrived"
        );
    }
}
