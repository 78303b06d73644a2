//! Rerouted UDP ports: one UDP socket per UDP port of a rerouted Service
//! (burrow's EndpointSlice points the port there), relaying datagrams per
//! caller.
//!
//! Each caller (source address and port) gets a mapping, made on its first
//! datagram and kept while datagrams pass either way:
//! - a global route: a UDP flow through the tunnel from the gateway's
//!   tunnel address and an ephemeral port to the laptop's forwarder
//!   ([`crate::laptop::LaptopDialer::open_udp`]); the laptop's datagrams
//!   back on that flow go to the caller from this socket;
//! - no route: a socket connected to the shadow Service's ClusterIP and
//!   port; its replies go to the caller the same way.
//!
//! UDP has no connection to refuse: a datagram for a laptop that is gone
//! (no peer with its address) or has nothing listening is dropped, as the
//! network would drop it. A mapping made for one route is replaced when the
//! route changes (stop, takeover). Mappings idle for [`Limits::idle`] go;
//! at most [`Limits::max_callers`] exist per port, and datagrams of further
//! callers are dropped until some go (a flood of spoofed sources costs a
//! bounded number of sockets and flows). Header routes are HTTP-only and
//! never reach a UDP port (refused by `burrow_api::RerouteRequest::validate`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::laptop::{LaptopDatagrams, LaptopUdpSender};
use crate::reroute::PortRoutes;

/// Opens a UDP flow to a laptop's tunnel address through the tunnel.
pub type LaptopUdpOpen = Arc<
    dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<LaptopDatagrams>> + Send>>
        + Send
        + Sync,
>;

/// UDP flows to laptops through `dialer`'s data path.
pub fn opener(dialer: crate::laptop::LaptopDialer) -> LaptopUdpOpen {
    Arc::new(move |to| {
        let dialer = dialer.clone();
        Box::pin(async move { dialer.open_udp(to).await })
    })
}

/// Bounds of one port's relay.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Callers with a mapping at once.
    pub max_callers: usize,
    /// A mapping with no datagram either way for this long goes.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_callers: 1024,
            idle: Duration::from_secs(60),
        }
    }
}

/// How often idle mappings are looked for.
const SWEEP: Duration = Duration::from_secs(1);
/// Largest datagram taken (UDP's own limit).
const MAX_DATAGRAM: usize = 65_535;
/// Log a failure to reach a laptop at most this often per port.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A UDP socket on `ip` (unspecified: every address; IPv6 also takes
/// IPv4 callers) and an ephemeral port.
pub fn bind(ip: IpAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let open = |addr: SocketAddr| -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
        if addr.is_ipv6() && ip.is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        UdpSocket::from_std(socket.into())
    };
    match open(SocketAddr::new(ip, 0)) {
        Err(e)
            if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
        {
            open(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
        }
        other => other,
    }
}

/// Where a caller's datagrams go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum To {
    /// A laptop's forwarder (tunnel address and port).
    Laptop { addr: SocketAddr, name: String },
    /// The shadow Service.
    Shadow(SocketAddr),
}

fn wanted(routes: &PortRoutes) -> To {
    match &routes.global {
        Some(t) => To::Laptop {
            addr: t.addr,
            name: t.laptop.clone(),
        },
        None => To::Shadow(routes.shadow),
    }
}

enum Out {
    Laptop(LaptopUdpSender),
    Shadow(Arc<UdpSocket>),
}

/// One caller's mapping.
struct Mapping {
    to: To,
    out: Out,
    /// Milliseconds since the relay started, at the last datagram either
    /// way.
    last: Arc<AtomicU64>,
    /// Carries replies to the caller; ends when the upstream does.
    replies: JoinHandle<()>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// One port's relay: its socket, the routes it follows, the callers.
pub struct Relay {
    socket: Arc<UdpSocket>,
    routes: watch::Receiver<Arc<PortRoutes>>,
    laptop: LaptopUdpOpen,
    limits: Limits,
    callers: HashMap<SocketAddr, Mapping>,
    start: Instant,
    /// The caps were reached and said so (until the mappings fall to half).
    full_said: bool,
    last_failure_log: Option<Instant>,
}

/// Relays datagrams of `socket` until dropped (see the module doc).
pub async fn relay(
    socket: UdpSocket,
    routes: watch::Receiver<Arc<PortRoutes>>,
    laptop: LaptopUdpOpen,
    limits: Limits,
) {
    Relay::new(socket, routes, laptop, limits).run().await
}

impl Relay {
    pub fn new(
        socket: UdpSocket,
        routes: watch::Receiver<Arc<PortRoutes>>,
        laptop: LaptopUdpOpen,
        limits: Limits,
    ) -> Self {
        Self {
            socket: Arc::new(socket),
            routes,
            laptop,
            limits,
            callers: HashMap::new(),
            start: Instant::now(),
            full_said: false,
            last_failure_log: None,
        }
    }

    pub async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, caller)) => {
                        let datagram = buf.get(..n).unwrap_or_default();
                        self.on_datagram(caller, datagram).await;
                    }
                    Err(e) => {
                        tracing::debug!("receive on a rerouted UDP port: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                _ = sweep.tick() => self.sweep(Instant::now()),
            }
        }
    }

    /// Callers with a mapping now.
    pub fn callers(&self) -> usize {
        self.callers.len()
    }

    fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops mappings idle for longer than the limit, or whose upstream
    /// ended (the laptop unregistered).
    pub fn sweep(&mut self, now: Instant) {
        let now_ms = self.now_ms(now);
        let idle = u64::try_from(self.limits.idle.as_millis()).unwrap_or(u64::MAX);
        self.callers.retain(|_, m| {
            !m.replies.is_finished() && now_ms.saturating_sub(m.last.load(Ordering::Relaxed)) < idle
        });
        if self.callers.len() <= self.limits.max_callers / 2 {
            self.full_said = false;
        }
    }

    /// One datagram from `caller`: to its mapping, made (or remade, when
    /// the route changed) as needed.
    pub async fn on_datagram(&mut self, caller: SocketAddr, datagram: &[u8]) {
        let to = wanted(&self.routes.borrow());
        let current = self
            .callers
            .get(&caller)
            .is_some_and(|m| m.to == to && !m.replies.is_finished());
        if !current {
            self.callers.remove(&caller);
            if self.callers.len() >= self.limits.max_callers {
                if !self.full_said {
                    self.full_said = true;
                    tracing::warn!(
                        port = self.socket.local_addr().map(|a| a.port()).unwrap_or(0),
                        cap = self.limits.max_callers,
                        "a rerouted UDP port has as many callers as it may; datagrams of new callers are dropped until some are idle for {:?}",
                        self.limits.idle
                    );
                }
                return;
            }
            match self.open(caller, to).await {
                Ok(m) => {
                    self.callers.insert(caller, m);
                }
                Err(e) => {
                    let now = Instant::now();
                    if self
                        .last_failure_log
                        .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY)
                    {
                        self.last_failure_log = Some(now);
                        tracing::info!(%caller, "a rerouted UDP datagram was dropped: {e}");
                    }
                    return;
                }
            }
        }
        let now_ms = self.now_ms(Instant::now());
        let Some(m) = self.callers.get(&caller) else {
            return;
        };
        m.last.store(now_ms, Ordering::Relaxed);
        match &m.out {
            // False: dropped (queue full), as a full socket buffer drops.
            Out::Laptop(sender) => {
                let _ = sender.send(datagram);
            }
            Out::Shadow(up) => {
                // Straight to the kernel (tokio's `try_send` waits for a
                // first readiness event); a full buffer drops it.
                if let Err(e) = socket2::SockRef::from(up.as_ref()).send(datagram) {
                    tracing::trace!(%caller, "to the shadow Service: {e}");
                }
            }
        }
    }

    async fn open(&self, caller: SocketAddr, to: To) -> io::Result<Mapping> {
        let last = Arc::new(AtomicU64::new(self.now_ms(Instant::now())));
        let (socket, start) = (self.socket.clone(), self.start);
        let touch = {
            let last = last.clone();
            move || {
                let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                last.store(ms, Ordering::Relaxed);
            }
        };
        let (out, replies) = match &to {
            To::Laptop { addr, name } => {
                let mut flow = (self.laptop)(*addr)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("laptop {name}: {e}")))?;
                let sender = flow.sender();
                let task = tokio::spawn(async move {
                    while let Some(d) = flow.recv().await {
                        touch();
                        let _ = socket.send_to(&d, caller).await;
                    }
                });
                (Out::Laptop(sender), task)
            }
            To::Shadow(addr) => {
                let any = match addr {
                    SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let up = Arc::new(UdpSocket::bind(SocketAddr::new(any, 0)).await?);
                up.connect(addr).await?;
                let reader = up.clone();
                let task = tokio::spawn(async move {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    loop {
                        match reader.recv(&mut buf).await {
                            Ok(n) => {
                                touch();
                                let _ = socket
                                    .send_to(buf.get(..n).unwrap_or_default(), caller)
                                    .await;
                            }
                            // An ICMP error for an earlier datagram (no
                            // pod listening): UDP goes on.
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                            Err(_) => break,
                        }
                    }
                });
                (Out::Shadow(up), task)
            }
        };
        Ok(Mapping {
            to,
            out,
            last,
            replies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reroute::Target;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A UDP echo on loopback that prefixes its replies; returns its
    /// address.
    async fn echo(prefix: &'static str) -> SocketAddr {
        let s = UdpSocket::bind((LOOPBACK, 0)).await.expect("bind");
        let addr = s.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let mut reply = prefix.as_bytes().to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&reply, from).await;
            }
        });
        addr
    }

    /// A real data path with no laptops registered (dropped with the
    /// test's runtime).
    async fn no_laptops() -> LaptopUdpOpen {
        let cfg = crate::datapath::DatapathConfig {
            tunnel_address: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))),
            ..Default::default()
        };
        let key = boringtun::x25519::StaticSecret::from(rand::random::<[u8; 32]>());
        let datapath = crate::datapath::Datapath::new(key, Vec::new(), cfg).expect("data path");
        let udp = UdpSocket::bind((LOOPBACK, 0))
            .await
            .expect("wireguard socket");
        let (_framed_tx, framed_rx) = tokio::sync::mpsc::channel(1);
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _keep = _framed_tx;
            datapath
                .run(udp, framed_rx, control_rx, std::future::pending())
                .await
        });
        opener(crate::laptop::LaptopDialer::new(control_tx))
    }

    fn routes(shadow: SocketAddr, global: Option<SocketAddr>) -> Arc<PortRoutes> {
        Arc::new(PortRoutes {
            shadow,
            global: global.map(|addr| Target {
                addr,
                protocol: burrow_api::Protocol::Udp,
                laptop: "gone".into(),
                fallback: burrow_api::Fallback::Error,
            }),
            headers: Vec::new(),
        })
    }

    async fn ask(caller: &UdpSocket, relay: SocketAddr, msg: &[u8]) -> Vec<u8> {
        caller.send_to(msg, relay).await.expect("send");
        let mut buf = vec![0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), caller.recv_from(&mut buf))
            .await
            .expect("a reply")
            .expect("recv");
        assert_eq!(
            from.port(),
            relay.port(),
            "replies come from the relay's port"
        );
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn callers_reach_the_shadow_and_get_their_own_replies() {
        let shadow = echo("pod:").await;
        let (_tx, rx) = watch::channel(routes(shadow, None));
        let socket = bind(LOOPBACK).expect("bind");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(relay(socket, rx, no_laptops().await, Limits::default()));
        let a = UdpSocket::bind((LOOPBACK, 0)).await.expect("a");
        let b = UdpSocket::bind((LOOPBACK, 0)).await.expect("b");
        assert_eq!(ask(&a, addr, b"one").await, b"pod:one");
        assert_eq!(ask(&b, addr, b"two").await, b"pod:two");
        assert_eq!(ask(&a, addr, b"three").await, b"pod:three");
    }

    #[tokio::test]
    async fn callers_are_capped_and_idle_mappings_go() {
        let shadow = echo("pod:").await;
        let (_tx, rx) = watch::channel(routes(shadow, None));
        let socket = bind(LOOPBACK).expect("bind");
        let limits = Limits {
            max_callers: 2,
            idle: Duration::from_secs(60),
        };
        let mut r = Relay::new(socket, rx, no_laptops().await, limits);
        let caller = |p: u16| SocketAddr::new(LOOPBACK, p);
        r.on_datagram(caller(1001), b"x").await;
        r.on_datagram(caller(1002), b"x").await;
        r.on_datagram(caller(1003), b"x").await;
        assert_eq!(r.callers(), 2, "the third caller is refused a mapping");
        r.on_datagram(caller(1001), b"again").await;
        assert_eq!(r.callers(), 2, "a known caller keeps its mapping");
        r.sweep(Instant::now() + Duration::from_secs(30));
        assert_eq!(r.callers(), 2);
        r.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(r.callers(), 0, "idle mappings go");
        r.on_datagram(caller(1003), b"x").await;
        assert_eq!(r.callers(), 1, "room again");
    }

    #[tokio::test]
    async fn a_laptop_that_is_gone_drops_datagrams_and_a_stop_goes_back_to_the_pods() {
        let shadow = echo("pod:").await;
        let gone = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 9)), 40000);
        let (tx, rx) = watch::channel(routes(shadow, Some(gone)));
        let socket = bind(LOOPBACK).expect("bind");
        let mut r = Relay::new(socket, rx, no_laptops().await, Limits::default());
        let caller = SocketAddr::new(LOOPBACK, 1001);
        r.on_datagram(caller, b"x").await;
        assert_eq!(r.callers(), 0, "no mapping to a laptop that is not there");
        tx.send_replace(routes(shadow, None));
        r.on_datagram(caller, b"x").await;
        assert_eq!(r.callers(), 1, "the shadow once the route went");
    }
}
