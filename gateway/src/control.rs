//! The control API servers (see [`burrow_api`]): laptops register their
//! WireGuard key on the loopback listener (through port-forward) and get a
//! tunnel address and the cluster facts; every later call arrives through
//! the tunnel, bound to the WireGuard peer it came from ([`Caller`]).
//!
//! The server owns the registry — who is registered, since when, with which
//! address — and tells the data path to add or remove WireGuard peers.
//! Addresses are stable: derived from the laptop's key, so the same laptop
//! gets the same address after a gateway restart, unless taken (then its
//! previous one if free; [`Allocator`] maps both ways).
//!
//! Registration (axum) listens only where `Listeners::bind_control` lets
//! it: the pod's loopback. The laptops' own calls never reach a socket:
//! the data path accepts connections to the gateway's tunnel address and
//! the control port itself (`Datapath::serve_api`, at the SYN) and hands
//! each over as a `LaptopStream` with the key of the WireGuard peer that
//! owns its source; [`serve_tunnel`] runs hyper on them with that
//! [`Caller`] as an extension. Anything else to the tunnel address is
//! refused (RST). A laptop silent past its grace (`--peer-grace`) is
//! forgotten by [`reap`]; its next registration answers `known: false`,
//! which is how the laptop learns it. The server reaches the peer table
//! only through the data path's channel.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use boringtun::x25519::StaticSecret;
use ipnet::Ipv4Net;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::datapath::DatapathHandle;
use crate::laptop::ApiConn;
use crate::reroute::{Laptop, Refused, Reroutes};
use burrow_api::{
    ApiError, Info, PeerInfo, RegisterRequest, Registration, RerouteRequest, StopRequest, WgKey,
    proof,
};

/// A registered laptop.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    address: Ipv4Addr,
    refreshed: Instant,
}

/// Hands out tunnel addresses: host addresses of `network`, the first one
/// being the gateway's own. Every operation is O(1) but a search for a
/// free address past taken ones, which only a nearly full network makes
/// long.
#[derive(Debug)]
pub struct Allocator {
    network: Ipv4Net,
    by_key: HashMap<WgKey, Entry>,
    by_address: HashMap<Ipv4Addr, WgKey>,
}

impl Allocator {
    pub fn new(network: Ipv4Net) -> Self {
        Self {
            network,
            by_key: HashMap::new(),
            by_address: HashMap::new(),
        }
    }

    /// The gateway's own tunnel address: the network's first host.
    pub fn gateway_address(&self) -> Ipv4Addr {
        let base = u32::from(self.network.network());
        Ipv4Addr::from(base + 1)
    }

    fn in_use(&self, addr: Ipv4Addr, except: &WgKey) -> bool {
        addr == self.gateway_address() || self.by_address.get(&addr).is_some_and(|k| k != except)
    }

    /// The address for `key`: its current one, else `previous` if free,
    /// else the one derived from the key, else the next free one. None
    /// when the network is full.
    pub fn assign(
        &mut self,
        key: WgKey,
        name: &str,
        previous: Option<Ipv4Addr>,
        now: Instant,
    ) -> Option<Ipv4Addr> {
        if let Some(e) = self.by_key.get_mut(&key) {
            e.refreshed = now;
            e.name = name.to_string();
            return Some(e.address);
        }
        let base = u32::from(self.network.network());
        let hosts = u32::from(self.network.broadcast()).saturating_sub(base);
        // Hosts are base+2 ..= base+hosts-1 (base+1 is the gateway).
        let usable = hosts.checked_sub(2)?;
        if usable == 0 || self.by_key.len() >= usable as usize {
            return None;
        }
        let valid = |a: Ipv4Addr| {
            let v = u32::from(a);
            v >= base + 2 && v < base + hosts
        };
        let derived = {
            let k = key.as_bytes();
            let seed = u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
            Ipv4Addr::from(base + 2 + seed % usable)
        };
        let start = match previous {
            Some(p) if self.network.contains(&p) && valid(p) && !self.in_use(p, &key) => p,
            _ => derived,
        };
        let offset = u32::from(start) - (base + 2);
        let found = (0..usable)
            .map(|i| Ipv4Addr::from(base + 2 + (offset + i) % usable))
            .find(|a| !self.in_use(*a, &key))?;
        self.by_key.insert(
            key,
            Entry {
                name: name.to_string(),
                address: found,
                refreshed: now,
            },
        );
        self.by_address.insert(found, key);
        Some(found)
    }

    /// The laptop's name and address, if registered.
    pub fn get(&self, key: &WgKey) -> Option<(String, Ipv4Addr)> {
        self.by_key.get(key).map(|e| (e.name.clone(), e.address))
    }

    pub fn contains(&self, key: &WgKey) -> bool {
        self.by_key.contains_key(key)
    }

    pub fn remove(&mut self, key: &WgKey) -> Option<Ipv4Addr> {
        let e = self.by_key.remove(key)?;
        self.by_address.remove(&e.address);
        Some(e.address)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Keys neither refreshed (registered) nor heard from (`last_heard`:
    /// time since the peer's last authenticated datagram) within `expiry`.
    pub fn expired(
        &self,
        now: Instant,
        expiry: Duration,
        last_heard: &HashMap<WgKey, Duration>,
    ) -> Vec<WgKey> {
        self.by_key
            .iter()
            .filter(|(k, e)| {
                let registered = now.saturating_duration_since(e.refreshed);
                let heard = last_heard.get(*k).copied().unwrap_or(Duration::MAX);
                registered > expiry && heard > expiry
            })
            .map(|(k, _)| *k)
            .collect()
    }
}

/// A token bucket: `rate` per second, bursts of `burst`.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Most registrations per second of keys the gateway does not know yet,
/// and their burst; refreshes of known keys (the laptops' heartbeats) have
/// their own, larger budget. Either way a refused registration is a 429,
/// and the data path never waits for one.
const NEW_KEYS_PER_SEC: f64 = 5.0;
const NEW_KEYS_BURST: f64 = 50.0;
const REQUESTS_PER_SEC: f64 = 100.0;
const REQUESTS_BURST: f64 = 200.0;
/// Connections to the tunnel API served at once (all laptops).
const TUNNEL_API_CONNECTIONS: usize = 256;
/// A tunnel API connection is closed after this long, whatever it does.
const TUNNEL_API_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The control server's shared state.
pub struct Control {
    pub peers: DatapathHandle,
    pub allocator: Mutex<Allocator>,
    pub info: Info,
    pub expiry: Duration,
    pub reroutes: Arc<Reroutes>,
    /// The gateway's WireGuard key, to check registration proofs.
    secret: StaticSecret,
    /// Makes and checks registration nonces; lives only in this process.
    nonce_key: [u8; 32],
    new_keys: Mutex<RateLimit>,
    requests: Mutex<RateLimit>,
}

impl Control {
    pub fn new(
        peers: DatapathHandle,
        tunnel_network: Ipv4Net,
        info: Info,
        expiry: Duration,
        reroutes: Arc<Reroutes>,
        secret: StaticSecret,
    ) -> Self {
        let now = Instant::now();
        Self {
            peers,
            allocator: Mutex::new(Allocator::new(tunnel_network)),
            info,
            expiry,
            reroutes,
            secret,
            nonce_key: rand::random(),
            new_keys: Mutex::new(RateLimit::new(NEW_KEYS_PER_SEC, NEW_KEYS_BURST, now)),
            requests: Mutex::new(RateLimit::new(REQUESTS_PER_SEC, REQUESTS_BURST, now)),
        }
    }
}

pub type Shared = Arc<Control>;

/// Serves registration on `listener` (the pod's loopback address, reached
/// through port-forward) until the task is dropped.
pub async fn serve_registration(listener: TcpListener, control: Shared) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/v1/info", get(info))
        .route("/v1/peers", post(register))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(control);
    axum::serve(listener, app).await
}

/// The laptop a tunnel API request came from (see [`crate::laptop::ApiConn`]).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub key: WgKey,
    pub address: IpAddr,
}

/// Serves the laptops' own API on the connections the data path takes at
/// the gateway's tunnel address, each bound to the peer it came from.
pub async fn serve_tunnel(mut conns: mpsc::Receiver<ApiConn>, control: Shared) {
    let app = axum::Router::new()
        .route("/v1/peer", get(my_peer).delete(unregister))
        .route("/v1/reroutes", get(list_reroutes).post(add_reroute))
        .route("/v1/reroutes/stop", post(stop_reroutes))
        .route("/v1/leases", post(renew_leases))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(control);
    let slots = Arc::new(tokio::sync::Semaphore::new(TUNNEL_API_CONNECTIONS));
    while let Some(conn) = conns.recv().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(from = %conn.from, "tunnel API busy: connection dropped");
            continue;
        };
        let caller = Caller {
            key: conn.key,
            address: conn.from.ip(),
        };
        let conn_from = conn.from;
        // The caller is the laptop owning this tunnel address: every log
        // line of its calls says so, as the data path's lines of its flows.
        let span = tracing::info_span!("laptop", laptop = %conn_from.ip(), key = %conn.key.short());
        tracing::debug!(parent: &span, from = %conn_from, "tunnel API connection");
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(caller)),
        );
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(conn.stream), service);
            match tokio::time::timeout(TUNNEL_API_CONNECTION_LIFETIME, served).await {
                Ok(Err(e)) => tracing::debug!(from = %conn_from, "tunnel API connection: {e}"),
                Err(_) => {
                    tracing::debug!(from = %conn_from, "tunnel API connection: closed after {TUNNEL_API_CONNECTION_LIFETIME:?}")
                }
                Ok(Ok(())) => {}
            }
            drop(slot);
        }.instrument(span));
    }
}

/// Forgets laptops that neither re-registered nor were heard from (an
/// authenticated datagram: handshake, data, keepalive) within the expiry;
/// runs until dropped. A handshake alone does not tell: a session moving
/// data rekeys only every 2 minutes.
pub async fn reap(control: Shared) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let heard = control.peers.last_heard().await;
        let gone = match control.allocator.lock() {
            Ok(mut a) => {
                let gone = a.expired(Instant::now(), control.expiry, &heard);
                for k in &gone {
                    a.remove(k);
                }
                gone
            }
            Err(_) => return,
        };
        for k in gone {
            tracing::info!(key = %k.short(), "laptop expired: neither registered nor heard from within its grace");
            control.peers.remove(k).await;
            control.reroutes.forget(k).await;
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn too_many() -> Response {
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "too many registrations right now: try again in a second",
    );
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    r
}

fn allowed(limit: &Mutex<RateLimit>) -> bool {
    limit
        .lock()
        .map(|mut l| l.take(Instant::now()))
        .unwrap_or(false)
}

async fn info(State(c): State<Shared>) -> Response {
    if !allowed(&c.requests) {
        return too_many();
    }
    let mut info = c.info.clone();
    info.registration_nonce = proof::nonce(&c.nonce_key, unix_now());
    Json(info).into_response()
}

/// A body that is not a registration (a malformed key included) is a 400
/// with an [`ApiError`] saying why.
async fn register(
    State(c): State<Shared>,
    req: Result<Json<RegisterRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match req {
        Ok(req) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if !allowed(&c.requests) {
        return too_many();
    }
    let key = req.public_key;
    if let Err(e) = proof::check_nonce(&c.nonce_key, &req.nonce, unix_now()) {
        return error(StatusCode::UNAUTHORIZED, e);
    }
    if !proof::verify(&c.secret, &key.public_key(), &req.nonce, &req.proof) {
        return error(
            StatusCode::UNAUTHORIZED,
            "the registration does not prove possession of the key's private half",
        );
    }
    let previous = match req.previous_address {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    let name: String = req
        .name
        .chars()
        .filter(|c| !c.is_control())
        .take(128)
        .collect();
    let known = c
        .allocator
        .lock()
        .map(|a| a.contains(&key))
        .unwrap_or(false);
    if !known && !allowed(&c.new_keys) {
        return too_many();
    }
    let (address, gateway_address, fresh) = {
        let Ok(mut a) = c.allocator.lock() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "registry lock poisoned");
        };
        let fresh = !a.contains(&key);
        match a.assign(key, &name, previous, Instant::now()) {
            Some(addr) => (addr, a.gateway_address(), fresh),
            None => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no tunnel address is free: too many laptops are connected",
                );
            }
        }
    };
    if let Err(e) = c.peers.add(key, IpAddr::V4(address)).await {
        if let Ok(mut a) = c.allocator.lock() {
            a.remove(&key);
        }
        return error(StatusCode::INTERNAL_SERVER_ERROR, e);
    }
    if fresh {
        tracing::info!(laptop = %address, key = %key.short(), name = %name, "laptop registered");
    }
    Json(Registration {
        address: IpAddr::V4(address),
        gateway_address: IpAddr::V4(gateway_address),
        info: c.info.clone(),
        expiry_secs: c.expiry.as_secs(),
        known: Some(!fresh),
    })
    .into_response()
}

/// The registered laptop that is calling: its key must still be registered
/// with the address the call came from.
fn laptop(c: &Control, caller: &Caller) -> Result<Laptop, Box<Response>> {
    let a = c.allocator.lock().map_err(|_| {
        Box::new(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "registry lock poisoned",
        ))
    })?;
    match a.get(&caller.key) {
        Some((name, address)) if IpAddr::V4(address) == caller.address => Ok(Laptop {
            key: caller.key,
            name,
            address: caller.address,
        }),
        _ => Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "this laptop is not registered with the gateway: connect first (`burrow connect`)",
        ))),
    }
}

async fn my_peer(State(c): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    let laptop = match laptop(&c, &caller) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let Some((tcp_flows, udp_flows)) = c.peers.flows_of(laptop.address).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the data path has stopped");
    };
    Json(PeerInfo {
        address: laptop.address,
        name: laptop.name,
        tcp_flows,
        udp_flows,
    })
    .into_response()
}

async fn unregister(State(c): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(r) = laptop(&c, &caller) {
        return *r;
    }
    let key = caller.key;
    let removed = c.allocator.lock().ok().and_then(|mut a| a.remove(&key));
    c.reroutes.forget(key).await;
    if removed.is_some() {
        tracing::info!(key = %key.short(), "laptop unregistered");
    }
    // Last, once this answer is on its way: the connection it leaves on
    // runs through the peer. Not when the laptop registered again since.
    let c = c.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !c.allocator.lock().map(|a| a.contains(&key)).unwrap_or(true) {
            c.peers.remove(key).await;
        }
    });
    StatusCode::NO_CONTENT.into_response()
}

async fn list_reroutes(State(c): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(r) = laptop(&c, &caller) {
        return *r;
    }
    Json(c.reroutes.list_of(caller.key)).into_response()
}

async fn add_reroute(
    State(c): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<RerouteRequest>,
) -> Response {
    let laptop = match laptop(&c, &caller) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match c.reroutes.add(&req, laptop).await {
        Ok(grant) => Json(grant).into_response(),
        Err(e @ (Refused::Held { .. } | Refused::HeaderTaken { .. })) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e @ Refused::NotYours(_)) => error(StatusCode::FORBIDDEN, e.to_string()),
        Err(e @ Refused::Limit(_)) => error(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        Err(e @ Refused::Unavailable(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn stop_reroutes(
    State(c): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<StopRequest>,
) -> Response {
    if let Err(r) = laptop(&c, &caller) {
        return *r;
    }
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    Json(c.reroutes.stop(&req, caller.key).await).into_response()
}

async fn renew_leases(State(c): State<Shared>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(r) = laptop(&c, &caller) {
        return *r;
    }
    if let Some(leases) = c.reroutes.renew(caller.key) {
        // The renewed reroutes, with what someone else changed on their
        // Services, and those taken over, so the daemon can tell its user.
        Json(leases).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            "no reroute of this laptop is known here",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Net {
        "198.19.0.0/24".parse().expect("net")
    }

    #[test]
    fn addresses_are_stable_unique_and_skip_the_gateway() {
        let now = Instant::now();
        let mut a = Allocator::new(net());
        assert_eq!(a.gateway_address(), Ipv4Addr::new(198, 19, 0, 1));
        let k1 = [1u8; 32];
        // A different key whose derived slot is the same as k1's.
        let mut k2 = k1;
        k2[31] = 9;
        let a1 = a.assign(WgKey::from(k1), "alice", None, now).expect("a1");
        let a2 = a.assign(WgKey::from(k2), "bob", None, now).expect("a2");
        assert_ne!(a1, a2);
        assert_eq!(
            a.assign(WgKey::from(k1), "alice", None, now),
            Some(a1),
            "same key, same address"
        );
        // A fresh allocator (gateway restart) derives the same address.
        let mut b = Allocator::new(net());
        assert_eq!(b.assign(WgKey::from(k1), "alice", None, now), Some(a1));
        // The previous address wins when free.
        let mut c = Allocator::new(net());
        let prev = Ipv4Addr::new(198, 19, 0, 77);
        assert_eq!(
            c.assign(WgKey::from(k2), "bob", Some(prev), now),
            Some(prev)
        );
        // Never the gateway's, network or broadcast address.
        for i in 0..=255u8 {
            let mut k = [0u8; 32];
            k[0] = i;
            k[5] = 1;
            if let Some(x) = c.assign(WgKey::from(k), "x", Some(Ipv4Addr::new(198, 19, 0, 1)), now)
            {
                assert!(x.octets()[3] >= 2 && x.octets()[3] <= 254, "{x}");
            }
        }
        assert_eq!(c.len(), 253, "every usable host handed out once");
        let mut k = [7u8; 32];
        k[9] = 3;
        assert_eq!(c.assign(WgKey::from(k), "late", None, now), None, "full");
    }

    #[test]
    fn expiry_needs_both_silence_and_no_registration() {
        let t0 = Instant::now();
        let mut a = Allocator::new(net());
        let k = WgKey::from([3u8; 32]);
        a.assign(k, "x", None, t0);
        let later = t0 + Duration::from_secs(60);
        let mut seen = HashMap::new();
        seen.insert(k, Duration::from_secs(2));
        assert!(a.expired(later, Duration::from_secs(30), &seen).is_empty());
        seen.insert(k, Duration::from_secs(45));
        assert_eq!(a.expired(later, Duration::from_secs(30), &seen), vec![k]);
    }
}
