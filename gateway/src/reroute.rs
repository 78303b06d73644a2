//! Reroutes: which laptop gets which Service port's connections, the
//! gateway listeners that receive them, and the leases that give them back.
//!
//! - [`Table`] (pure, no I/O) is the registry: per (namespace, Service,
//!   port number and transport) at most one global route and any number of
//!   header routes (TCP ports only), each
//!   with its laptop and lease. It decides conflicts (a global route held by
//!   another laptop is refused, naming the holder, unless forced) and
//!   expiry.
//! - [`Reroutes`] drives it: one TCP listener per TCP port of a rerouted
//!   Service and one UDP socket per UDP port ([`crate::udproute`]; the
//!   EndpointSlice points there), handed a fresh snapshot of
//!   the port's routes ([`PortRoutes`]) on every change; and, when the last
//!   route of a Service goes (stop, lease expiry, the laptop unregistering
//!   or expiring), a restore of the Service with the gateway's own
//!   credentials ([`burrow_deploy::service::restore`]).
//!
//! Per accepted connection: a global route splices the bytes to the
//! laptop's tunnel address (a laptop that refuses: the caller gets a reset
//! in `tcp` mode, a 502 in `http` mode); header routes hand the connection
//! to the HTTP router; no route passes it through to the shadow Service.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument as _;

use burrow_api::{
    self, Fallback, PortProtocol, Protocol, RerouteGrant, RerouteRequest, ServicePort, Stopped,
    WgKey,
};

/// How long a lease lasts without renewal. Laptops renew every 5 s; 12 s
/// tolerates two lost renewals and gives a Service back within 15 s of its
/// laptop's death (lease, plus the 1 s reaper tick, plus the restore).
pub const LEASE: Duration = Duration::from_secs(12);

pub use crate::httproute::BoxIo;
use crate::httproute::{self, Dial, DialFuture, Rule, Rules, Upstream};

/// Opens a TCP stream to a laptop's tunnel address through the tunnel
/// (refused → `ConnectionRefused`).
pub type LaptopConnect = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>> + Send + Sync,
>;

/// (namespace, Service).
pub type ServiceKey = (String, String);

/// A Service port: its number and transport (a Service may have TCP and
/// UDP ports of the same number, as DNS has).
pub type PortKey = (u16, PortProtocol);

/// A laptop as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Laptop {
    pub key: WgKey,
    pub name: String,
    pub address: IpAddr,
}

/// One laptop's route for one Service port.
#[derive(Debug, Clone)]
pub struct Route {
    laptop: Laptop,
    laptop_port: u16,
    protocol: Protocol,
    fallback: Fallback,
    header: Option<(String, String)>,
    since: SystemTime,
    renewed: Instant,
}

impl Route {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.laptop.address, self.laptop_port)
    }

    fn target(&self) -> Target {
        Target {
            addr: self.addr(),
            protocol: self.protocol,
            laptop: self.laptop.name.clone(),
            fallback: self.fallback,
        }
    }

    fn describe(&self, ns: &str, svc: &str, port: u16) -> burrow_api::Reroute {
        burrow_api::Reroute {
            namespace: ns.to_string(),
            service: svc.to_string(),
            port,
            laptop_port: self.laptop_port,
            protocol: self.protocol,
            header: self.header.clone(),
            since: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            changed: None,
            fallback: self.fallback,
        }
    }
}

/// Routes of one Service port.
#[derive(Debug, Clone, Default)]
struct PortEntry {
    global: Option<Route>,
    headers: Vec<Route>,
}

impl PortEntry {
    fn is_empty(&self) -> bool {
        self.global.is_none() && self.headers.is_empty()
    }

    fn retain(&mut self, mut keep: impl FnMut(&Route) -> bool) -> Vec<Route> {
        let mut gone = Vec::new();
        if let Some(g) = self.global.take() {
            if keep(&g) {
                self.global = Some(g);
            } else {
                gone.push(g);
            }
        }
        let (kept, dropped): (Vec<_>, Vec<_>) = self.headers.drain(..).partition(|r| keep(r));
        self.headers = kept;
        gone.extend(dropped);
        gone
    }
}

/// One rerouted Service.
#[derive(Debug, Clone)]
struct ServiceEntry {
    /// Every port of the Service (each gets a listener).
    ports: Vec<ServicePort>,
    shadow_ip: IpAddr,
    routes: BTreeMap<PortKey, PortEntry>,
    /// What someone else changed on the Service while it is rerouted
    /// (noticed by the gateway's watch), for `--list`.
    changed: Option<String>,
}

/// Why a reroute was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "{namespace}/{service} port {port} is already rerouted to laptop {holder} (since {since}); \
         use --force to take it over, or a --header route to share it"
    )]
    Held {
        namespace: String,
        service: String,
        port: u16,
        holder: String,
        since: String,
    },
    #[error(
        "{namespace}/{service} port {port} already sends {header} to laptop {holder}; choose another value"
    )]
    HeaderTaken {
        namespace: String,
        service: String,
        port: u16,
        header: String,
        holder: String,
    },
    #[error("{0}")]
    Invalid(String),
    /// The Service does not carry this laptop's reroute record.
    #[error("{0}")]
    NotYours(String),
    /// The laptop reroutes as many Services as it may.
    #[error("{0}")]
    Limit(String),
    /// The gateway cannot check or act right now.
    #[error("{0}")]
    Unavailable(String),
}

/// Most Services one laptop may reroute at once (each takes a listener per
/// TCP port in the gateway pod).
pub const MAX_SERVICES_PER_LAPTOP: usize = 32;

/// Routes that went, with their laptops (the wire type [`Stopped`] names
/// no laptop).
#[derive(Debug, Default)]
pub struct Removed {
    pub routes: Vec<(ServiceKey, u16, Route)>,
    /// Services with no route left.
    pub released: Vec<ServiceKey>,
}

impl Removed {
    pub fn to_api(&self) -> Stopped {
        Stopped {
            stopped: self
                .routes
                .iter()
                .map(|(k, port, r)| r.describe(&k.0, &k.1, *port))
                .collect(),
            released: self.released.clone(),
            notes: Vec::new(),
        }
    }
}

/// The registry of reroutes (pure).
#[derive(Debug, Default)]
pub struct Table {
    services: BTreeMap<ServiceKey, ServiceEntry>,
    /// Global routes taken over (`--force`) from a laptop, by its key:
    /// told to it when it renews, so it drops them instead of taking
    /// them back once the new holder leaves. Kept [`TAKEN_MEMORY`].
    taken: BTreeMap<WgKey, Vec<(burrow_api::TakenOver, Instant)>>,
}

/// How long a laptop is told that a route was taken from it.
const TAKEN_MEMORY: Duration = Duration::from_secs(120);

/// What [`Table::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub took_over_from: Option<String>,
}

impl Table {
    /// Adds (or renews, when the same laptop asks again) a route.
    /// `shadow_ip`: the shadow Service as the gateway found it.
    pub fn add(
        &mut self,
        req: &RerouteRequest,
        laptop: Laptop,
        shadow_ip: IpAddr,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Added, Refused> {
        req.validate().map_err(Refused::Invalid)?;
        let key = (req.namespace.clone(), req.service.clone());
        if !self.routes_of(laptop.key).any(|(k, _, _)| *k == key)
            && self.services_of(laptop.key) >= MAX_SERVICES_PER_LAPTOP
        {
            return Err(Refused::Limit(format!(
                "this laptop already reroutes {MAX_SERVICES_PER_LAPTOP} Services, the most one laptop may; stop one first (`burrow reroute --stop SERVICE`)"
            )));
        }
        if let Some(taken) = self.taken.get_mut(&laptop.key) {
            taken.retain(|(t, _)| {
                !(t.namespace == req.namespace && t.service == req.service && t.port == req.port)
            });
        }
        let entry = self.services.entry(key).or_insert_with(|| ServiceEntry {
            ports: req.ports.clone(),
            shadow_ip,
            routes: BTreeMap::new(),
            changed: None,
        });
        entry.ports = req.ports.clone();
        entry.shadow_ip = shadow_ip;
        let port = entry
            .routes
            .entry((req.port, req.protocol.transport()))
            .or_default();
        let route = Route {
            laptop: laptop.clone(),
            laptop_port: req.laptop_port,
            protocol: if req.header.is_some() {
                Protocol::Http
            } else {
                req.protocol
            },
            fallback: req.fallback,
            header: req.header.clone().map(|(n, v)| (n.to_ascii_lowercase(), v)),
            since: wall,
            renewed: now,
        };
        let mut added = Added {
            took_over_from: None,
        };
        match &route.header {
            None => {
                if let Some(g) = &port.global
                    && g.laptop.key != laptop.key
                {
                    if !req.force {
                        let refused = Refused::Held {
                            namespace: req.namespace.clone(),
                            service: req.service.clone(),
                            port: req.port,
                            holder: g.laptop.name.clone(),
                            since: humantime::format_rfc3339_seconds(g.since).to_string(),
                        };
                        self.prune();
                        return Err(refused);
                    }
                    added.took_over_from = Some(g.laptop.name.clone());
                    let from = self.taken.entry(g.laptop.key).or_default();
                    from.retain(|(t, _)| {
                        !(t.namespace == req.namespace
                            && t.service == req.service
                            && t.port == req.port)
                    });
                    from.truncate(64);
                    from.push((
                        burrow_api::TakenOver {
                            namespace: req.namespace.clone(),
                            service: req.service.clone(),
                            port: req.port,
                            by: laptop.name.clone(),
                        },
                        now,
                    ));
                }
                let since = match &port.global {
                    Some(g) if g.laptop.key == laptop.key => g.since,
                    _ => wall,
                };
                port.global = Some(Route { since, ..route });
            }
            Some(h) => {
                if let Some(other) = port
                    .headers
                    .iter()
                    .find(|r| r.header.as_ref() == Some(h) && r.laptop.key != laptop.key)
                {
                    let refused = Refused::HeaderTaken {
                        namespace: req.namespace.clone(),
                        service: req.service.clone(),
                        port: req.port,
                        header: format!("{}={}", h.0, h.1),
                        holder: other.laptop.name.clone(),
                    };
                    self.prune();
                    return Err(refused);
                }
                port.headers
                    .retain(|r| !(r.laptop.key == laptop.key && r.header.as_ref() == Some(h)));
                port.headers.push(route);
            }
        }
        Ok(added)
    }

    /// Drops Services without routes; returns them.
    fn prune(&mut self) -> Vec<ServiceKey> {
        let mut released = Vec::new();
        self.services.retain(|k, s| {
            s.routes.retain(|_, p| !p.is_empty());
            let keep = !s.routes.is_empty();
            if !keep {
                released.push(k.clone());
            }
            keep
        });
        released
    }

    fn remove_where(&mut self, mut gone: impl FnMut(&ServiceKey, u16, &Route) -> bool) -> Removed {
        let mut routes = Vec::new();
        for (k, s) in &mut self.services {
            for ((port, _), p) in &mut s.routes {
                for r in p.retain(|r| !gone(k, *port, r)) {
                    routes.push((k.clone(), *port, r));
                }
            }
        }
        Removed {
            routes,
            released: self.prune(),
        }
    }

    /// Stops a laptop's routes matching the request.
    pub fn stop(&mut self, req: &burrow_api::StopRequest, key: WgKey) -> Removed {
        self.remove_where(|(ns, svc), port, r| {
            r.laptop.key == key
                && req.namespace.as_ref().is_none_or(|n| n == ns)
                && req.service.as_ref().is_none_or(|s| s == svc)
                && req.port.is_none_or(|p| p == port)
        })
    }

    /// Stops every route of a laptop (it unregistered or expired).
    pub fn forget(&mut self, key: WgKey) -> Removed {
        self.taken.remove(&key);
        self.remove_where(|_, _, r| r.laptop.key == key)
    }

    /// The global routes taken over from the laptop with `key` lately.
    pub fn taken_from(&mut self, key: WgKey, now: Instant) -> Vec<burrow_api::TakenOver> {
        self.taken.retain(|_, v| {
            v.retain(|(_, at)| now.saturating_duration_since(*at) < TAKEN_MEMORY);
            !v.is_empty()
        });
        self.taken
            .get(&key)
            .map(|v| v.iter().map(|(t, _)| t.clone()).collect())
            .unwrap_or_default()
    }

    /// Every route of the laptop with `key`.
    fn routes_of(&self, key: WgKey) -> impl Iterator<Item = (&ServiceKey, u16, &Route)> {
        self.services.iter().flat_map(move |(k, s)| {
            s.routes.iter().flat_map(move |((port, _), p)| {
                p.global
                    .iter()
                    .chain(p.headers.iter())
                    .filter(move |r| r.laptop.key == key)
                    .map(move |r| (k, *port, r))
            })
        })
    }

    /// How many Services the laptop with `key` reroutes.
    fn services_of(&self, key: WgKey) -> usize {
        let mut seen: Vec<&ServiceKey> = self.routes_of(key).map(|(k, _, _)| k).collect();
        seen.dedup();
        seen.len()
    }

    /// Whether the laptop with `key` has a route on `svc`.
    pub fn reroutes(&self, key: WgKey, svc: &ServiceKey) -> bool {
        self.routes_of(key).any(|(k, _, _)| k == svc)
    }

    /// Renews a laptop's leases; false when it has none.
    pub fn renew(&mut self, key: WgKey, now: Instant) -> bool {
        let mut any = false;
        for s in self.services.values_mut() {
            for p in s.routes.values_mut() {
                for r in p.global.iter_mut().chain(p.headers.iter_mut()) {
                    if r.laptop.key == key {
                        r.renewed = now;
                        any = true;
                    }
                }
            }
        }
        any
    }

    /// Drops the routes whose lease ran out.
    pub fn expire(&mut self, now: Instant, lease: Duration) -> Removed {
        self.remove_where(|_, _, r| now.saturating_duration_since(r.renewed) > lease)
    }

    /// The routes of the laptop with `key` (never anyone else's).
    pub fn list_of(&self, key: WgKey) -> Vec<burrow_api::Reroute> {
        self.routes_of(key)
            .map(|(k, port, r)| {
                let mut d = r.describe(&k.0, &k.1, port);
                d.changed = self.services.get(k).and_then(|s| s.changed.clone());
                d
            })
            .collect()
    }

    /// Notes (or clears, with None) what someone else changed on `svc`;
    /// whether that is news.
    pub fn note_change(&mut self, svc: &ServiceKey, changed: Option<String>) -> bool {
        match self.services.get_mut(svc) {
            Some(s) if s.changed != changed => {
                s.changed = changed;
                true
            }
            _ => false,
        }
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// What the listener of `svc`'s TCP `port` routes by, right now.
    pub fn snapshot(&self, svc: &ServiceKey, port: u16) -> Option<PortRoutes> {
        self.snapshot_port(svc, (port, PortProtocol::Tcp))
    }

    /// What the listener of `svc`'s `port` (TCP or UDP) routes by, right
    /// now.
    pub fn snapshot_port(&self, svc: &ServiceKey, key: PortKey) -> Option<PortRoutes> {
        let s = self.services.get(svc)?;
        let port = key.0;
        let p = s.routes.get(&key).cloned().unwrap_or_default();
        Some(PortRoutes {
            shadow: SocketAddr::new(s.shadow_ip, port),
            global: p.global.map(|r| r.target()),
            headers: p
                .headers
                .into_iter()
                .filter_map(|r| {
                    let (name, value) = r.header.clone()?;
                    Some(HeaderRoute {
                        name,
                        value,
                        target: r.target(),
                    })
                })
                .collect(),
        })
    }

    /// Every port of `svc`.
    pub fn ports(&self, svc: &ServiceKey) -> Vec<ServicePort> {
        self.services
            .get(svc)
            .map(|s| s.ports.clone())
            .unwrap_or_default()
    }
}

/// Where a route sends connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub laptop: String,
    /// Nothing listening on the laptop: the caller is told, or sent to the
    /// pods.
    pub fallback: Fallback,
}

/// A header route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRoute {
    /// Lower case.
    pub name: String,
    pub value: String,
    pub target: Target,
}

/// A snapshot of one Service port's routes, for its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRoutes {
    /// The shadow Service's ClusterIP and this port.
    pub shadow: SocketAddr,
    pub global: Option<Target>,
    pub headers: Vec<HeaderRoute>,
}

impl PortRoutes {
    /// The header rules for the HTTP router.
    pub fn rules(&self) -> Rules {
        let mut rules = Rules::new(Upstream::Cluster(self.shadow));
        for h in &self.headers {
            let (Ok(header), Ok(value)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                http::HeaderValue::from_str(&h.value),
            ) else {
                continue;
            };
            rules.rules.push(Rule {
                header,
                value,
                to: h.target.upstream(),
                fallback: h.target.fallback,
            });
        }
        rules
    }
}

impl Target {
    fn upstream(&self) -> Upstream {
        Upstream::Laptop {
            name: self.laptop.clone(),
            addr: self.addr,
        }
    }
}

/// How long a dial to the pods (the shadow Service) is tried again when
/// kube-proxy does not route it yet. 5 s was not enough on a loaded CI
/// machine (a new shadow still unrouted 6.5 s after its slices listed the
/// pods); a first request that waits is better than a 502.
const SHADOW_SETTLE: Duration = Duration::from_secs(15);
/// One attempt of that dial: a SYN kube-proxy had no rule for is lost
/// (real cluster) or answered "host unreachable" after the ARP timeout
/// (3 s); a fresh attempt goes out soon after the rules are written.
const SHADOW_ATTEMPT: Duration = Duration::from_millis(700);

/// Whether a failed dial to a ClusterIP may be kube-proxy not having
/// caught up yet (a shadow made a moment ago, a rollout): no rule yet
/// (unreachable, or no answer), or a rule for a Service with no endpoints
/// (refused).
fn not_routed_yet(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | HostUnreachable | NetworkUnreachable | TimedOut
    )
}

/// Laptops through the tunnel, the cluster with TCP.
struct Dialer {
    laptop: LaptopConnect,
}

impl Dial for Dialer {
    fn dial(&self, to: &Upstream) -> DialFuture<'_> {
        match to.clone() {
            Upstream::Laptop { addr, .. } => (self.laptop)(addr),
            Upstream::Cluster(addr) => Box::pin(async move {
                // Tried again for a moment before the caller hears of it:
                // kube-proxy writes a new Service's rules a second or more
                // after the endpoint controller listed its pods.
                let deadline = Instant::now() + SHADOW_SETTLE;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let attempt = SHADOW_ATTEMPT.min(left).max(Duration::from_millis(100));
                    let e = match tokio::time::timeout(attempt, TcpStream::connect(addr)).await {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Box::new(s) as BoxIo);
                        }
                        Ok(Err(e)) => e,
                        Err(_) => std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer from {addr} within {} ms", attempt.as_millis()),
                        ),
                    };
                    if !not_routed_yet(&e) || Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(to = %addr, "dial to the pods: {e}; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }),
        }
    }
}

/// A running listener of one Service port.
struct Listener {
    port: u16,
    routes: watch::Sender<Arc<PortRoutes>>,
    rules: watch::Sender<Arc<Rules>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reroutes of this gateway: table, listeners, restores.
pub struct Reroutes {
    table: Mutex<Table>,
    listeners: Mutex<BTreeMap<(ServiceKey, PortKey), Listener>>,
    /// Per rerouted Service, the watch that keeps other endpoints away
    /// and notices changes made by someone else ([`guard`]).
    guards: Mutex<BTreeMap<ServiceKey, tokio::task::JoinHandle<()>>>,
    laptop: LaptopConnect,
    /// UDP flows to laptops' tunnel addresses, for UDP ports.
    laptop_udp: crate::udproute::LaptopUdpOpen,
    kube: Option<kube::Client>,
    listen_ip: IpAddr,
}

impl Reroutes {
    pub fn new(
        laptop: LaptopConnect,
        laptop_udp: crate::udproute::LaptopUdpOpen,
        kube: Option<kube::Client>,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            listeners: Mutex::new(BTreeMap::new()),
            guards: Mutex::new(BTreeMap::new()),
            laptop,
            laptop_udp,
            kube,
            listen_ip: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        })
    }

    /// Notes what someone else changed on `svc` (None: nothing); logs news.
    fn note_change(&self, svc: &ServiceKey, changed: Option<String>) {
        let news = self
            .table
            .lock()
            .map(|mut t| t.note_change(svc, changed.clone()))
            .unwrap_or(false);
        if news {
            match changed {
                Some(c) => tracing::warn!(namespace = %svc.0, service = %svc.1, "{c}"),
                None => {
                    tracing::info!(namespace = %svc.0, service = %svc.1, "the rerouted Service is as burrow left it again")
                }
            }
        }
    }

    /// The reroutes of the laptop with `key`.
    pub fn list_of(&self, key: WgKey) -> Vec<burrow_api::Reroute> {
        self.table
            .lock()
            .map(|t| t.list_of(key))
            .unwrap_or_default()
    }

    /// What the cluster says of the request, read with the gateway's own
    /// credentials: the Service must exist and carry `laptop`'s reroute
    /// record (written with the user's credentials, so the user may patch
    /// it), and its shadow must be burrow's; answers the shadow's
    /// ClusterIP.
    async fn check_service(
        &self,
        req: &RerouteRequest,
        laptop: &Laptop,
    ) -> Result<IpAddr, Refused> {
        let Some(client) = self.kube.clone() else {
            return Err(Refused::Unavailable(
                "the gateway has no access to the Kubernetes API, so it cannot check the Service's reroute record".into(),
            ));
        };
        let (ns, name) = (&req.namespace, &req.service);
        let unavailable = |e: kube::Error| {
            Refused::Unavailable(format!("the gateway cannot read Service {ns}/{name}: {e}"))
        };
        let work = async {
            let services: kube::Api<k8s_openapi::api::core::v1::Service> =
                kube::Api::namespaced(client.clone(), ns);
            let svc = services
                .get_opt(name)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| Refused::Invalid(format!("Service {ns}/{name} does not exist")))?;
            if burrow_api::record::record_of(&svc, &laptop.key).is_none() {
                return Err(Refused::NotYours(format!(
                    "Service {ns}/{name} carries no reroute record for this laptop: `burrow reroute` writes one with your own credentials before asking the gateway, so you need `patch` on services in namespace {ns}"
                )));
            }
            burrow_deploy::service::shadow_ip(&client, &svc)
                .await
                .map_err(unavailable)?
                .ok_or_else(|| {
                    Refused::Invalid(format!(
                        "Service {ns}/{name} has no shadow Service of burrow's ({}): `burrow reroute` creates it with your credentials first",
                        burrow_api::record::shadow_name(name)
                    ))
                })
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .map_err(|_| {
                Refused::Unavailable(format!(
                    "the Kubernetes API did not answer the gateway about Service {ns}/{name} within 10s"
                ))
            })?
    }

    /// Adds a route and makes sure every port of its Service has a
    /// listener.
    pub async fn add(
        self: &Arc<Self>,
        req: &RerouteRequest,
        laptop: Laptop,
    ) -> Result<RerouteGrant, Refused> {
        let svc = (req.namespace.clone(), req.service.clone());
        let span = route_span(&svc, req.port, &laptop, req.header.as_ref());
        self.add_route(req, laptop).instrument(span).await
    }

    async fn add_route(
        self: &Arc<Self>,
        req: &RerouteRequest,
        laptop: Laptop,
    ) -> Result<RerouteGrant, Refused> {
        req.validate().map_err(Refused::Invalid)?;
        let shadow_ip = self.check_service(req, &laptop).await?;
        let svc = (req.namespace.clone(), req.service.clone());
        let key = laptop.key;
        let added = {
            let mut t = self
                .table
                .lock()
                .map_err(|_| Refused::Invalid("internal: table lock poisoned".into()))?;
            t.add(req, laptop, shadow_ip, Instant::now(), SystemTime::now())?
        };
        let listeners = match self.sync(&svc).await {
            Ok(l) => l,
            Err(e) => {
                // Undo: without listeners the route is useless.
                if let Ok(mut t) = self.table.lock() {
                    t.stop(
                        &burrow_api::StopRequest {
                            namespace: Some(svc.0.clone()),
                            service: Some(svc.1.clone()),
                            port: Some(req.port),
                        },
                        key,
                    );
                }
                return Err(Refused::Invalid(format!(
                    "the gateway cannot listen for {}/{}: {e}",
                    svc.0, svc.1
                )));
            }
        };
        self.ensure_guard(&svc);
        tracing::info!(
            protocol = ?req.protocol,
            took_over_from = ?added.took_over_from,
            "reroute added"
        );
        Ok(RerouteGrant {
            listeners,
            lease_secs: LEASE.as_secs(),
            took_over_from: added.took_over_from,
        })
    }

    /// Brings `svc`'s listeners in line with the table: one per port (a
    /// TCP listener, or a UDP socket for a UDP port) while it has routes
    /// (fresh snapshots pushed), none otherwise.
    async fn sync(self: &Arc<Self>, svc: &ServiceKey) -> io::Result<Vec<(ServicePort, u16)>> {
        let ports = self.table.lock().map(|t| t.ports(svc)).unwrap_or_default();
        let mut out = Vec::new();
        for sp in ports {
            let port_key = (sp.port, sp.protocol);
            let snapshot = self
                .table
                .lock()
                .ok()
                .and_then(|t| t.snapshot_port(svc, port_key));
            let Some(snapshot) = snapshot else { continue };
            let key = (svc.clone(), port_key);
            let existing = self
                .listeners
                .lock()
                .ok()
                .and_then(|l| l.get(&key).map(|l| l.port));
            match existing {
                Some(port) => {
                    if let Ok(l) = self.listeners.lock()
                        && let Some(l) = l.get(&key)
                    {
                        l.rules.send_replace(Arc::new(snapshot.rules()));
                        l.routes.send_replace(Arc::new(snapshot));
                    }
                    out.push((sp, port));
                }
                None => {
                    let (rules_tx, rules_rx) = watch::channel(Arc::new(snapshot.rules()));
                    let (tx, rx) = watch::channel(Arc::new(snapshot));
                    // Every log line of this port's callers names it; the
                    // listener serves every laptop's routes of the port, so
                    // its span is no route's (nor the asking laptop's).
                    let span = tracing::info_span!(
                        parent: None,
                        "listener",
                        service = %format_args!("{}/{}", svc.0, svc.1),
                        port = sp.port,
                        protocol = %sp.protocol
                    );
                    let (port, task) = match sp.protocol {
                        PortProtocol::Tcp => {
                            let listener =
                                TcpListener::bind(SocketAddr::new(self.listen_ip, 0)).await?;
                            let port = listener.local_addr()?.port();
                            let dial: Arc<dyn Dial> = Arc::new(Dialer {
                                laptop: self.laptop.clone(),
                            });
                            (
                                port,
                                tokio::spawn(
                                    accept_loop(listener, rx, rules_rx, dial).instrument(span),
                                ),
                            )
                        }
                        PortProtocol::Udp => {
                            let socket = crate::udproute::bind(self.listen_ip)?;
                            let port = socket.local_addr()?.port();
                            (
                                port,
                                tokio::spawn(
                                    crate::udproute::relay(
                                        socket,
                                        rx,
                                        self.laptop_udp.clone(),
                                        crate::udproute::Limits::default(),
                                    )
                                    .instrument(span),
                                ),
                            )
                        }
                    };
                    tracing::info!(namespace = %svc.0, service = %svc.1, service_port = sp.port, protocol = %sp.protocol, listener = port, "listening for a rerouted port");
                    if let Ok(mut l) = self.listeners.lock() {
                        l.insert(
                            key,
                            Listener {
                                port,
                                routes: tx,
                                rules: rules_tx,
                                task,
                            },
                        );
                    }
                    out.push((sp, port));
                }
            }
        }
        Ok(out)
    }

    /// After routes went: update listeners, close those of released
    /// Services and restore them, and take the records of laptops that no
    /// longer reroute a Service off it.
    async fn settle(self: &Arc<Self>, removed: &Removed, why: &'static str) -> Vec<String> {
        let mut touched: Vec<(ServiceKey, WgKey)> = removed
            .routes
            .iter()
            .map(|(k, _, r)| (k.clone(), r.laptop.key))
            .collect();
        touched.sort();
        touched.dedup();
        let mut synced: Vec<&ServiceKey> = Vec::new();
        for (svc, _) in &touched {
            if !removed.released.contains(svc) && !synced.contains(&svc) {
                let _ = self.sync(svc).await;
                synced.push(svc);
            }
        }
        for (k, port, r) in &removed.routes {
            let span = route_span(k, *port, &r.laptop, r.header.as_ref());
            tracing::info!(parent: &span, why, "reroute stopped");
        }
        for (svc, key) in &touched {
            let still = self
                .table
                .lock()
                .map(|t| t.reroutes(*key, svc))
                .unwrap_or(true);
            if still || removed.released.contains(svc) {
                continue;
            }
            if let Some(client) = &self.kube
                && let Err(e) =
                    burrow_deploy::service::remove_record(client, &svc.0, &svc.1, key).await
            {
                tracing::warn!(namespace = %svc.0, service = %svc.1, "removing a laptop's reroute record: {e}");
            }
        }
        let mut notes = Vec::new();
        for svc in &removed.released {
            self.stop_guard(svc);
            // Make-before-break: until the restore has the pods listed
            // again and kube-proxy has caught up, callers may still be
            // sent here; the listeners stay and hand them to the shadow.
            self.shadow_only(svc);
            if let Some(note) = self.restore(svc.clone()).await {
                notes.push(note);
            }
            let again = self
                .table
                .lock()
                .map(|t| t.services.contains_key(svc))
                .unwrap_or(false);
            if !again && let Ok(mut l) = self.listeners.lock() {
                l.retain(|(s, _), _| s != svc);
            }
        }
        notes
    }

    /// Points every listener of `svc` at its shadow only (no laptop).
    fn shadow_only(&self, svc: &ServiceKey) {
        if let Ok(l) = self.listeners.lock() {
            for ((s, _), l) in l.iter() {
                if s != svc {
                    continue;
                }
                let shadow = l.routes.borrow().shadow;
                l.rules
                    .send_replace(Arc::new(Rules::new(Upstream::Cluster(shadow))));
                l.routes.send_replace(Arc::new(PortRoutes {
                    shadow,
                    global: None,
                    headers: Vec::new(),
                }));
            }
        }
    }

    /// Starts the watch over `svc` while it is rerouted (once).
    fn ensure_guard(self: &Arc<Self>, svc: &ServiceKey) {
        let Some(client) = self.kube.clone() else {
            return;
        };
        let Ok(mut guards) = self.guards.lock() else {
            return;
        };
        if guards.get(svc).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let me = Arc::downgrade(self);
        guards.insert(svc.clone(), tokio::spawn(guard(me, client, svc.clone())));
    }

    fn stop_guard(&self, svc: &ServiceKey) {
        if let Ok(mut guards) = self.guards.lock()
            && let Some(h) = guards.remove(svc)
        {
            h.abort();
        }
    }

    /// Restores a Service no laptop reroutes any more: the first attempt
    /// before answering (so a laptop's next reroute of it never races with
    /// this restore), retries in the background; the client restores too.
    async fn restore(self: &Arc<Self>, svc: ServiceKey) -> Option<String> {
        let Some(client) = self.kube.clone() else {
            tracing::warn!(namespace = %svc.0, service = %svc.1, "no Kubernetes access: the Service is left to the client to restore");
            return None;
        };
        let attempt = |client: kube::Client, svc: ServiceKey, me: Arc<Self>| async move {
            // Rerouted again in the meantime: not ours to restore.
            if me
                .table
                .lock()
                .map(|t| t.services.contains_key(&svc))
                .unwrap_or(false)
            {
                return Some(None);
            }
            match burrow_deploy::service::restore(&client, &svc.0, &svc.1).await {
                Ok(outcome) => {
                    tracing::info!(namespace = %svc.0, service = %svc.1, ?outcome, "Service restored");
                    Some(match outcome {
                        burrow_deploy::service::Restored::KeptNewerSelector(sel) => Some(format!(
                            "Service {}/{}: someone else had put its selector back ({sel}) while it was rerouted; that newer selector was left in place",
                            svc.0, svc.1
                        )),
                        _ => None,
                    })
                }
                Err(e) => {
                    tracing::warn!(namespace = %svc.0, service = %svc.1, "restoring the Service: {e}");
                    None
                }
            }
        };
        if let Some(note) = attempt(client.clone(), svc.clone(), self.clone()).await {
            return note;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for n in 0..5u32 {
                tokio::time::sleep(Duration::from_secs(1 << n)).await;
                if attempt(client.clone(), svc.clone(), me.clone())
                    .await
                    .is_some()
                {
                    return;
                }
            }
        });
        None
    }

    /// Drops every route and restores every Service (the gateway is
    /// stopping); waits for the restores.
    pub async fn release_all(&self) {
        let services: Vec<ServiceKey> = match self.table.lock() {
            Ok(mut t) => std::mem::take(&mut t.services).into_keys().collect(),
            Err(_) => return,
        };
        for svc in &services {
            self.stop_guard(svc);
            self.shadow_only(svc);
        }
        if let Some(client) = &self.kube {
            // All at once: each waits for its pods to be listed again.
            futures::future::join_all(services.iter().map(|(ns, name)| async move {
                match burrow_deploy::service::restore(client, ns, name).await {
                    Ok(outcome) => {
                        tracing::info!(namespace = %ns, service = %name, ?outcome, "Service restored (gateway stopping)")
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, service = %name, "restoring the Service: {e}")
                    }
                }
            }))
            .await;
        }
        if let Ok(mut l) = self.listeners.lock() {
            l.clear();
        }
    }

    /// Stops the routes of the laptop with `key` that `req` names.
    pub async fn stop(self: &Arc<Self>, req: &burrow_api::StopRequest, key: WgKey) -> Stopped {
        let removed = self
            .table
            .lock()
            .map(|mut t| t.stop(req, key))
            .unwrap_or_default();
        let notes = self.settle(&removed, "stopped by its laptop").await;
        let mut stopped = removed.to_api();
        stopped.notes = notes;
        stopped
    }

    pub async fn forget(self: &Arc<Self>, key: WgKey) {
        let removed = self
            .table
            .lock()
            .map(|mut t| t.forget(key))
            .unwrap_or_default();
        self.settle(&removed, "its laptop is gone").await;
    }

    /// Renews the leases of the laptop with `key`: its reroutes and the
    /// ones taken over from it lately; None when it has neither.
    pub fn renew(&self, key: WgKey) -> Option<burrow_api::Leases> {
        let mut t = self.table.lock().ok()?;
        let now = Instant::now();
        let renewed = t.renew(key, now);
        let taken_over = t.taken_from(key, now);
        tracing::trace!(
            renewed,
            taken_over = taken_over.len(),
            "reroute leases renewed"
        );
        (renewed || !taken_over.is_empty()).then(|| burrow_api::Leases {
            reroutes: t.list_of(key),
            taken_over,
        })
    }

    /// Drops expired leases every second; runs until dropped.
    pub async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let removed = self
                .table
                .lock()
                .map(|mut t| t.expire(Instant::now(), LEASE))
                .unwrap_or_default();
            if !removed.routes.is_empty() {
                tracing::info!(count = removed.routes.len(), "reroute leases expired");
                self.settle(&removed, "lease expired").await;
            }
        }
    }
}

/// The span of one route: which Service port, how its requests are
/// chosen (`all`, or by a header), and whose laptop it is.
fn route_span(
    svc: &ServiceKey,
    port: u16,
    laptop: &Laptop,
    header: Option<&(String, String)>,
) -> tracing::Span {
    let mode = match header {
        Some((name, value)) => format!("header {name}={value}"),
        None => "all".to_string(),
    };
    tracing::info_span!(
        "reroute",
        service = %format_args!("{}/{}", svc.0, svc.1),
        port,
        %mode,
        laptop = %laptop.address,
        name = %laptop.name
    )
}

/// The object of an added or changed event.
fn applied<K>(e: kube::runtime::watcher::Event<K>) -> Option<K> {
    use kube::runtime::watcher::Event;
    match e {
        Event::Apply(o) | Event::InitApply(o) => Some(o),
        _ => None,
    }
}

/// What [`guard`] saw.
enum Seen {
    /// An EndpointSlice or Endpoints object that is not burrow's.
    Stray,
    Service(Box<k8s_openapi::api::core::v1::Service>),
}

/// While `svc` is rerouted: watches its EndpointSlices, its legacy
/// Endpoints and the Service itself. Any other source of endpoints that
/// appears (an in-flight controller sync writing late, a controller
/// restart, the mirroring controller) is removed at once
/// ([`burrow_deploy::service::remove_strays`]); a selector put back or ports
/// changed by someone else (a GitOps self-heal, `kubectl edit`) are noted
/// for `--list` and logged. Runs until aborted (the Service released).
async fn guard(me: std::sync::Weak<Reroutes>, client: kube::Client, svc: ServiceKey) {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::{Endpoints, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::runtime::{WatchStreamExt as _, watcher};

    let (ns, name) = (svc.0.clone(), svc.1.clone());
    let slices = watcher(
        kube::Api::<EndpointSlice>::namespaced(client.clone(), &ns),
        watcher::Config::default().labels(&format!(
            "{}={name}",
            burrow_api::record::SERVICE_NAME_LABEL
        )),
    )
    .default_backoff()
    .filter_map(move |e| {
        let seen = e.ok().and_then(applied).and_then(|s: EndpointSlice| {
            let ours = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(burrow_api::record::SLICE_MANAGED_BY))
                .is_some_and(|m| m == burrow_api::record::SLICE_MANAGER);
            (!ours).then_some(Seen::Stray)
        });
        std::future::ready(seen)
    })
    .boxed();
    let endpoints = watcher(
        kube::Api::<Endpoints>::namespaced(client.clone(), &ns),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .filter_map(move |e| {
        std::future::ready(e.ok().and_then(applied).map(|_: Endpoints| Seen::Stray))
    })
    .boxed();
    let services = watcher(
        kube::Api::<Service>::namespaced(client.clone(), &ns),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .filter_map(move |e| {
        std::future::ready(
            e.ok()
                .and_then(applied)
                .map(|s: Service| Seen::Service(Box::new(s))),
        )
    })
    .boxed();
    let mut seen = futures::stream::select_all([slices, endpoints, services]);
    // Until the laptop has pointed the Service at the gateway (burrow's
    // saved selector on it), the Service seen is the one before the
    // reroute, not something someone else changed.
    let mut pointed = false;
    while let Some(event) = seen.next().await {
        let Some(me) = me.upgrade() else { return };
        match event {
            Seen::Stray => match burrow_deploy::service::remove_strays(&client, &ns, &name).await {
                Ok(removed) if !removed.is_empty() => tracing::info!(
                    namespace = %ns, service = %name,
                    "removed what appeared beside burrow's EndpointSlice of the rerouted Service: {}",
                    removed.join(", ")
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(namespace = %ns, service = %name, "removing other endpoints of the rerouted Service: {e}")
                }
            },
            Seen::Service(s) => {
                pointed |= burrow_api::record::saved(&s).is_some();
                if !pointed {
                    continue;
                }
                let ports = me.table.lock().map(|t| t.ports(&svc)).unwrap_or_default();
                me.note_change(&svc, change_of(&s, &ports));
            }
        }
    }
}

/// What someone else changed on a rerouted Service, compared with what
/// burrow left: its selector put back, burrow's annotation gone, its
/// ports changed.
fn change_of(svc: &k8s_openapi::api::core::v1::Service, ports: &[ServicePort]) -> Option<String> {
    if let Some(sel) = burrow_api::record::newer_selector(svc) {
        return Some(format!(
            "someone else put the selector back ({}): callers reach the pods, not this reroute; `reroute --stop` will leave that selector in place",
            burrow_api::record::describe_selector(&sel)
        ));
    }
    if burrow_api::record::saved(svc).is_none() {
        return Some(
            "someone else removed burrow's reroute annotation from the Service".to_string(),
        );
    }
    let mut now: Vec<(String, u16)> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port).unwrap_or(0),
            )
        })
        .collect();
    let mut then: Vec<(String, u16)> = ports.iter().map(|p| (p.name.clone(), p.port)).collect();
    now.sort();
    then.sort();
    if !then.is_empty() && now != then {
        let list = |v: &[(String, u16)]| {
            v.iter()
                .map(|(n, p)| {
                    if n.is_empty() {
                        p.to_string()
                    } else {
                        format!("{p} ({n})")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Some(format!(
            "someone else changed the Service's ports to {} (burrow rerouted {}): reroute again to follow them",
            list(&now),
            list(&then)
        ));
    }
    None
}

/// At start: restore every Service a previous gateway left rerouted (its
/// listeners are gone with it; the laptops re-establish their reroutes on
/// this gateway).
pub async fn restore_orphans(client: &kube::Client) {
    match burrow_deploy::service::restore_all(client).await {
        Ok(done) => {
            for (ns, name, r) in done {
                match r {
                    Ok(outcome) => {
                        tracing::info!(namespace = %ns, service = %name, ?outcome, "restored a Service left rerouted")
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, service = %name, "cannot restore a Service left rerouted: {e}")
                    }
                }
            }
        }
        Err(e) => tracing::warn!("cannot look for Services left rerouted: {e}"),
    }
}

async fn accept_loop(
    listener: TcpListener,
    routes: watch::Receiver<Arc<PortRoutes>>,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept on a reroute listener: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let snapshot = routes.borrow().clone();
        let rules = rules.clone();
        let dial = dial.clone();
        let span = tracing::debug_span!("caller", client = %peer);
        tokio::spawn(
            async move {
                match handle(conn, &snapshot, rules, dial).await {
                    Ok(()) => tracing::debug!("rerouted connection closed"),
                    Err(e) => tracing::debug!("rerouted connection: {e}"),
                }
            }
            .instrument(span),
        );
    }
}

async fn handle(
    mut conn: TcpStream,
    routes: &PortRoutes,
    rules: watch::Receiver<Arc<Rules>>,
    dial: Arc<dyn Dial>,
) -> Result<(), String> {
    match &routes.global {
        // The laptop's, or the pods' when it cannot be reached (or nothing
        // listens there and its fallback says so).
        Some(target) => {
            tracing::debug!(to = %target.upstream(), "every request to the laptop");
            let route = httproute::Global {
                laptop: target.upstream(),
                pods: Upstream::Cluster(routes.shadow),
                protocol: target.protocol,
                fallback: target.fallback,
            };
            httproute::global(conn, dial.as_ref(), &route)
                .await
                .map_err(|e| e.to_string())
        }
        None if !routes.headers.is_empty() => {
            tracing::debug!(
                rules = routes.headers.len(),
                "routing each request by its headers"
            );
            crate::passthrough::serve(conn, rules, dial)
                .await
                .map_err(|e| e.to_string())
        }
        None => {
            tracing::debug!(to = %routes.shadow, "no laptop: to the pods");
            let mut up = dial
                .dial(&Upstream::Cluster(routes.shadow))
                .await
                .map_err(|e| e.to_string())?;
            tokio::io::copy_bidirectional(&mut conn, &mut up)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laptop(n: u8) -> Laptop {
        Laptop {
            key: WgKey::from([n; 32]),
            name: format!("laptop{n}"),
            address: IpAddr::from([198, 19, 0, n]),
        }
    }

    const SHADOW: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 99));

    fn req(header: Option<(&str, &str)>, force: bool) -> RerouteRequest {
        RerouteRequest {
            namespace: "default".into(),
            service: "echo".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: PortProtocol::Tcp,
            }],
            port: 8080,
            laptop_port: 3000,
            protocol: Protocol::Http,
            header: header.map(|(n, v)| (n.to_string(), v.to_string())),
            force,
            fallback: Fallback::Error,
        }
    }

    fn key() -> ServiceKey {
        ("default".into(), "echo".into())
    }

    #[test]
    fn a_global_route_is_held_until_forced() {
        let mut t = Table::default();
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        t.add(&req(None, false), laptop(2), SHADOW, now, wall)
            .expect("first");
        // The same laptop again: a renewal, not a conflict.
        t.add(&req(None, false), laptop(2), SHADOW, now, wall)
            .expect("again");
        let err = t
            .add(&req(None, false), laptop(3), SHADOW, now, wall)
            .expect_err("held");
        let text = err.to_string();
        assert!(
            text.contains("laptop2") && text.contains("2023-11-14T22:13:20Z"),
            "{text}"
        );
        let added = t
            .add(&req(None, true), laptop(3), SHADOW, now, wall)
            .expect("forced");
        assert_eq!(added.took_over_from.as_deref(), Some("laptop2"));
        let snap = t.snapshot(&key(), 8080).expect("snapshot");
        assert_eq!(snap.global.map(|g| g.laptop), Some("laptop3".to_string()));
        // The laptop it was taken from is told (so it does not take it
        // back when the new holder leaves), for a while, and only it.
        let taken = t.taken_from(laptop(2).key, now);
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].port, taken[0].by.as_str()), (8080, "laptop3"));
        assert!(t.taken_from(laptop(3).key, now).is_empty());
        assert!(
            t.taken_from(laptop(2).key, now + TAKEN_MEMORY + Duration::from_secs(1))
                .is_empty()
        );
    }

    #[test]
    fn header_routes_coexist_and_release_the_service_when_the_last_goes() {
        let mut t = Table::default();
        let now = Instant::now();
        let wall = SystemTime::now();
        t.add(
            &req(Some(("X-Burrow-Route", "alice")), false),
            laptop(2),
            SHADOW,
            now,
            wall,
        )
        .expect("alice");
        t.add(
            &req(Some(("x-burrow-route", "bob")), false),
            laptop(3),
            SHADOW,
            now,
            wall,
        )
        .expect("bob");
        assert!(
            t.add(
                &req(Some(("x-burrow-route", "bob")), false),
                laptop(2),
                SHADOW,
                now,
                wall
            )
            .is_err()
        );
        let snap = t.snapshot(&key(), 8080).expect("snapshot");
        assert_eq!(snap.headers.len(), 2);
        assert_eq!(snap.headers[0].name, "x-burrow-route");
        let s = t.forget(WgKey::from([2; 32]));
        assert_eq!(s.routes.len(), 1);
        assert!(s.released.is_empty());
        let s = t.forget(WgKey::from([3; 32]));
        assert_eq!(s.released, vec![key()]);
        assert!(t.snapshot(&key(), 8080).is_none());
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let mut t = Table::default();
        let start = Instant::now();
        t.add(
            &req(None, false),
            laptop(2),
            SHADOW,
            start,
            SystemTime::now(),
        )
        .expect("add");
        t.add(
            &req(Some(("x", "y")), false),
            laptop(3),
            SHADOW,
            start,
            SystemTime::now(),
        )
        .expect("add");
        let later = start + Duration::from_secs(10);
        assert!(t.renew(WgKey::from([2; 32]), later));
        assert!(!t.renew(WgKey::from([9; 32]), later));
        let s = t.expire(start + Duration::from_secs(20), LEASE);
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.routes[0].2.laptop.name, "laptop3");
        let s = t.expire(start + Duration::from_secs(40), LEASE);
        assert_eq!(s.released, vec![key()]);
    }

    #[test]
    fn hostile_names_and_too_many_services_are_refused() {
        let mut t = Table::default();
        let now = Instant::now();
        for bad in ["echo#", "a/b", "x?y", &"a".repeat(64)] {
            let mut r = req(None, false);
            r.service = bad.to_string();
            assert!(
                matches!(
                    t.add(&r, laptop(2), SHADOW, now, SystemTime::now()),
                    Err(Refused::Invalid(_))
                ),
                "{bad}"
            );
            let mut r = req(None, false);
            r.namespace = bad.to_string();
            assert!(
                matches!(
                    t.add(&r, laptop(2), SHADOW, now, SystemTime::now()),
                    Err(Refused::Invalid(_))
                ),
                "{bad}"
            );
        }
        assert!(t.list_of(WgKey::from([2; 32])).is_empty());
        for i in 0..MAX_SERVICES_PER_LAPTOP {
            let mut r = req(None, false);
            r.service = format!("svc{i}");
            t.add(&r, laptop(2), SHADOW, now, SystemTime::now())
                .expect("under the cap");
        }
        let mut r = req(None, false);
        r.service = "one-more".into();
        assert!(matches!(
            t.add(&r, laptop(2), SHADOW, now, SystemTime::now()),
            Err(Refused::Limit(_))
        ));
        // Another laptop is not affected, and a known Service is a renewal.
        t.add(&r, laptop(3), SHADOW, now, SystemTime::now())
            .expect("laptop 3");
        let mut r = req(None, false);
        r.service = "svc0".into();
        t.add(&r, laptop(2), SHADOW, now, SystemTime::now())
            .expect("renewal");
        assert_eq!(
            t.list_of(WgKey::from([3; 32])).len(),
            1,
            "each laptop lists its own"
        );
    }

    /// A Service with TCP and UDP port 53 (as DNS has).
    fn dns_req(protocol: Protocol, header: Option<(&str, &str)>) -> RerouteRequest {
        let port = |name: &str, protocol| ServicePort {
            name: name.into(),
            port: 53,
            protocol,
        };
        RerouteRequest {
            namespace: "default".into(),
            service: "dns".into(),
            ports: vec![
                port("dns", PortProtocol::Udp),
                port("dns-tcp", PortProtocol::Tcp),
            ],
            port: 53,
            laptop_port: 3000,
            protocol,
            header: header.map(|(n, v)| (n.to_string(), v.to_string())),
            force: false,
            fallback: Fallback::Error,
        }
    }

    #[test]
    fn udp_and_tcp_ports_of_one_number_are_routed_apart() {
        let mut t = Table::default();
        let now = Instant::now();
        let svc = ("default".to_string(), "dns".to_string());
        t.add(
            &dns_req(Protocol::Udp, None),
            laptop(2),
            SHADOW,
            now,
            SystemTime::now(),
        )
        .expect("udp");
        let udp = t.snapshot_port(&svc, (53, PortProtocol::Udp)).expect("udp");
        assert_eq!(udp.global.map(|g| g.protocol), Some(Protocol::Udp));
        let tcp = t.snapshot_port(&svc, (53, PortProtocol::Tcp)).expect("tcp");
        assert!(tcp.global.is_none(), "TCP 53 still goes to the pods");
        assert_eq!(tcp.shadow, SocketAddr::new(SHADOW, 53));
        // Another laptop may take TCP 53 without touching UDP 53.
        t.add(
            &dns_req(Protocol::Tcp, None),
            laptop(3),
            SHADOW,
            now,
            SystemTime::now(),
        )
        .expect("tcp by another laptop");
        let listed = t.list_of(WgKey::from([2; 32]));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].protocol, Protocol::Udp);
        // A header reroute of the UDP port: HTTP-only, says so.
        for req in [
            dns_req(Protocol::Udp, Some(("x-user", "a"))),
            dns_req(Protocol::Http, Some(("x-user", "a"))),
        ] {
            let mut only_udp = req.clone();
            only_udp.ports.retain(|p| p.protocol == PortProtocol::Udp);
            for r in [req, only_udp] {
                let err = t.add(&r, laptop(2), SHADOW, now, SystemTime::now());
                if r.protocol == Protocol::Http && r.ports.len() == 2 {
                    // TCP 53 exists: that is a header route of TCP 53.
                    assert!(err.is_ok(), "{err:?}");
                    continue;
                }
                let text = err.expect_err("refused").to_string();
                assert!(
                    text.contains("header reroutes are HTTP-only")
                        && text.contains("global reroute"),
                    "{text}"
                );
            }
        }
        // A UDP route of a number the Service has only as TCP is refused.
        let mut r = req(None, false);
        r.protocol = Protocol::Udp;
        assert!(matches!(
            t.add(&r, laptop(2), SHADOW, now, SystemTime::now()),
            Err(Refused::Invalid(_))
        ));
        // Stopping by number stops the laptop's routes of that number.
        let gone = t.stop(
            &burrow_api::StopRequest {
                namespace: Some("default".into()),
                service: Some("dns".into()),
                port: Some(53),
            },
            WgKey::from([2; 32]),
        );
        assert_eq!(
            gone.routes.len(),
            2,
            "UDP 53 and the header route of TCP 53"
        );
        assert!(t.snapshot_port(&svc, (53, PortProtocol::Tcp)).is_some());
    }

    #[test]
    fn protocol_and_fallback_reach_the_listener() {
        let mut t = Table::default();
        let now = Instant::now();
        let mut global = req(None, false);
        global.protocol = Protocol::Auto;
        global.fallback = Fallback::Pods;
        t.add(&global, laptop(2), SHADOW, now, SystemTime::now())
            .expect("global");
        let mut header = req(Some(("x-burrow-route", "me")), false);
        header.protocol = Protocol::Tcp;
        header.fallback = Fallback::Pods;
        t.add(&header, laptop(3), SHADOW, now, SystemTime::now())
            .expect("header");
        let snap = t.snapshot(&key(), 8080).expect("snapshot");
        let g = snap.global.clone().expect("global target");
        assert_eq!((g.protocol, g.fallback), (Protocol::Auto, Fallback::Pods));
        // Header routes are HTTP whatever was asked; the fallback stays.
        let h = &snap.headers[0].target;
        assert_eq!((h.protocol, h.fallback), (Protocol::Http, Fallback::Pods));
        assert_eq!(snap.rules().rules[0].fallback, Fallback::Pods);
        assert_eq!(t.list_of(WgKey::from([2; 32]))[0].fallback, Fallback::Pods);
        // Missing on the wire: auto, error.
        let old: RerouteRequest = serde_json::from_str(
            r#"{"namespace":"default","service":"echo","ports":[{"name":"","port":8080}],"port":8080,"laptop_port":3000}"#,
        )
        .expect("an older client's request");
        assert_eq!(
            (old.protocol, old.fallback),
            (Protocol::Auto, Fallback::Error)
        );
    }

    /// A dial to the pods that kube-proxy does not route yet (refused now,
    /// answered a moment later) reaches them; one that is refused
    /// throughout fails once the settle time is over.
    #[tokio::test]
    async fn a_dial_to_the_pods_waits_for_kube_proxy() {
        let laptop: LaptopConnect =
            Arc::new(|_| Box::pin(async { Err(io::Error::other("no laptop in this test")) }));
        let dialer = Dialer { laptop };
        let spare = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = spare.local_addr().expect("addr");
        drop(spare);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let l = TcpListener::bind(addr).await.expect("bind again");
            let (mut c, _) = l.accept().await.expect("accept");
            tokio::io::AsyncWriteExt::write_all(&mut c, b"pods")
                .await
                .expect("write");
        });
        let started = Instant::now();
        let mut up = match dialer.dial(&Upstream::Cluster(addr)).await {
            Ok(up) => up,
            Err(e) => panic!("the dial gave up: {e}"),
        };
        assert!(started.elapsed() >= Duration::from_millis(700));
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut up, &mut got)
            .await
            .expect("read");
        assert_eq!(got, b"pods");
        late.await.expect("server task");

        let never = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = never.local_addr().expect("addr");
        drop(never);
        let started = Instant::now();
        let e = match dialer.dial(&Upstream::Cluster(addr)).await {
            Ok(_) => panic!("nothing listens on {addr}"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            started.elapsed() >= SHADOW_SETTLE,
            "{:?}",
            started.elapsed()
        );
    }
}
