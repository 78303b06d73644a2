//! The laptop's and the gateway's sans-IO cores driven together in virtual
//! time, as quinn-proto tests its endpoints: the laptop's `Peers` with a
//! smoltcp stack standing in for its kernel, a simulated underlay
//! (latency, jitter that reorders, loss, chosen drops), and the gateway's
//! `Peers` and `FlowEngine` with a scripted cluster side that applies the
//! engine's release rules as the gateway's data path does. No sockets, no
//! sleeps: minutes of protocol time run in milliseconds.
//!
//! boringtun keeps its own clock; with this crate's `mock-instant` feature
//! it reads mock_instant's thread-local `MockClock`, which [`World`] moves
//! with virtual time. Run with
//! `cargo test -p burrow-netstack --features mock-instant --test pair`.
//! Not a default feature: cargo unifies features across one workspace
//! build, and the binaries the end-to-end tests run must keep boringtun's
//! real clock.
#![cfg(feature = "mock-instant")]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_netstack::flow::{FlowConfig, FlowEngine, FlowId, Ingress, Settled, TcpRead, TcpState};
use burrow_netstack::wg::{Decapsulated, Encapsulated, PeerConfig, PeerId, Peers};
use mock_instant::MockClock;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Packet, TcpPacket};

const LAPTOP_UNDERLAY: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 40000);
const GATEWAY_UNDERLAY: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51820);
const LAPTOP_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const MTU: usize = 1420;
/// How often both sides run boringtun's timers (as the drivers do).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often the gateway sweeps its flows (as its data path does).
const SWEEP_TICK: Duration = Duration::from_secs(1);
/// The laptop's persistent keepalive (the client's).
const KEEPALIVE: u16 = 25;
const ORPHAN_LINGER: Duration = Duration::from_secs(60);

// WireGuard message types: the first byte of a datagram.
const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const DATA: u8 = 4;
/// A data message with nothing inside: a keepalive.
const KEEPALIVE_LEN: usize = 32;

/// xorshift64: deterministic per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn up_to(&mut self, d: Duration) -> Duration {
        let micros = d.as_micros() as u64;
        if micros == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next() % (micros + 1))
    }
}

/// The underlay between laptop and gateway, the same both ways.
#[derive(Clone, Copy)]
struct Link {
    latency: Duration,
    /// Time to put one byte on the wire (datagrams leave one after the
    /// other, as on a real link).
    per_byte: Duration,
    /// Extra delay up to this much, per datagram: reorders neighbours.
    jitter: Duration,
    loss: f64,
}

impl Link {
    const CLEAN: Link = Link {
        latency: Duration::from_millis(5),
        // 100 Mbit/s.
        per_byte: Duration::from_nanos(80),
        jitter: Duration::ZERO,
        loss: 0.0,
    };
}

struct InFlight {
    at: Duration,
    seq: u64,
    to_gateway: bool,
    bytes: Vec<u8>,
}

/// WireGuard messages put on the underlay in one direction.
#[derive(Debug, Default)]
struct Seen {
    inits: usize,
    responses: usize,
    keepalives: usize,
    data: usize,
    lost: usize,
}

/// The laptop's TUN device, as two packet queues.
#[derive(Default)]
struct Tun {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Tun {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxToken, TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxToken(p), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

struct Laptop {
    peers: Peers,
    iface: Interface,
    sockets: SocketSet<'static>,
    tun: Tun,
    next_port: u16,
    /// TCP segments with RST that reached the laptop's stack.
    rsts: usize,
}

/// The cluster side of one flow at the gateway, scripted by the test.
#[derive(Default)]
struct ClusterEnd {
    /// Bytes from the laptop.
    got: Vec<u8>,
    /// Bytes for the laptop, and how many the engine took.
    out: Vec<u8>,
    sent: usize,
    /// Send back what arrives; close once the laptop closed.
    echo: bool,
    /// Close once `out` is sent, whatever the laptop does.
    close_when_sent: bool,
    laptop_eof: bool,
    closed: bool,
    /// Nobody reads this flow any more (a dropped stream).
    orphaned: bool,
}

struct Gateway {
    peers: Peers,
    laptop: PeerId,
    flows: FlowEngine,
    ends: HashMap<FlowId, ClusterEnd>,
    /// The next flow's cluster side.
    template: fn() -> ClusterEnd,
    /// How each flow ended, once it did.
    settled: Vec<(FlowId, Settled)>,
}

struct World {
    base: Instant,
    t: Duration,
    rng: Rng,
    link: Link,
    wire: Vec<InFlight>,
    seq: u64,
    /// When each direction's link is free again: [to the gateway, to the laptop].
    busy_until: [Duration; 2],
    next_timers: Duration,
    next_sweep: Duration,
    laptop: Laptop,
    gateway: Gateway,
    /// Chosen drops: (towards the gateway, message type, how many more).
    drops: Vec<(bool, u8, usize)>,
    to_gateway: Seen,
    to_laptop: Seen,
}

fn echo() -> ClusterEnd {
    ClusterEnd {
        echo: true,
        ..ClusterEnd::default()
    }
}

impl World {
    fn new(seed: u64, link: Link) -> Self {
        MockClock::set_time(Duration::ZERO);
        let base = Instant::now();
        let laptop_key = StaticSecret::from([2; 32]);
        let gateway_key = StaticSecret::from([1; 32]);
        let laptop_public = PublicKey::from(&laptop_key);
        let gateway_public = PublicKey::from(&gateway_key);

        let mut gw_peers = Peers::new(gateway_key);
        let laptop_id = gw_peers
            .add(PeerConfig::host(laptop_public, IpAddr::V4(LAPTOP_IP)))
            .expect("add the laptop");
        let flows = FlowEngine::new(
            FlowConfig {
                mtu: MTU,
                random_seed: seed,
                orphan_linger: ORPHAN_LINGER,
                ..FlowConfig::default()
            },
            base,
        );

        let mut peers = Peers::new_laptop(laptop_key);
        peers
            .add(PeerConfig {
                public_key: gateway_public,
                allowed_ips: vec!["10.0.0.0/8".parse().expect("net")],
                endpoint: Some(GATEWAY_UNDERLAY),
                preshared_key: None,
                persistent_keepalive: Some(KEEPALIVE),
            })
            .expect("add the gateway");
        let mut tun = Tun::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed ^ 0x5eed;
        let mut iface = Interface::new(config, &mut tun, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(LAPTOP_IP), 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(LAPTOP_IP);

        World {
            base,
            t: Duration::ZERO,
            rng: Rng(seed.max(1)),
            link,
            wire: Vec::new(),
            seq: 0,
            busy_until: [Duration::ZERO; 2],
            next_timers: TIMER_TICK,
            next_sweep: SWEEP_TICK,
            laptop: Laptop {
                peers,
                iface,
                sockets: SocketSet::new(Vec::new()),
                tun,
                next_port: 50000,
                rsts: 0,
            },
            gateway: Gateway {
                peers: gw_peers,
                laptop: laptop_id,
                flows,
                ends: HashMap::new(),
                template: echo,
                settled: Vec::new(),
            },
            drops: Vec::new(),
            to_gateway: Seen::default(),
            to_laptop: Seen::default(),
        }
    }

    fn now(&self) -> Instant {
        self.base + self.t
    }

    /// Put a datagram on the underlay (or lose it).
    fn send(&mut self, to_gateway: bool, bytes: Vec<u8>) {
        let kind = bytes.first().copied().unwrap_or(0);
        let seen = if to_gateway {
            &mut self.to_gateway
        } else {
            &mut self.to_laptop
        };
        match kind {
            HANDSHAKE_INIT => seen.inits += 1,
            HANDSHAKE_RESPONSE => seen.responses += 1,
            DATA if bytes.len() == KEEPALIVE_LEN => seen.keepalives += 1,
            DATA => seen.data += 1,
            _ => {}
        }
        let chosen = self
            .drops
            .iter_mut()
            .find(|(dir, k, n)| *dir == to_gateway && *k == kind && *n > 0);
        if let Some(drop) = chosen {
            drop.2 -= 1;
            seen.lost += 1;
            return;
        }
        if self.rng.chance(self.link.loss) {
            seen.lost += 1;
            return;
        }
        let link = &mut self.busy_until[usize::from(!to_gateway)];
        let sent = (*link).max(self.t) + self.link.per_byte * bytes.len() as u32;
        *link = sent;
        let at = sent + self.link.latency + self.rng.up_to(self.link.jitter);
        self.seq += 1;
        self.wire.push(InFlight {
            at,
            seq: self.seq,
            to_gateway,
            bytes,
        });
    }

    /// One datagram arrives.
    fn deliver(&mut self, d: InFlight) {
        let now = self.now();
        let mut buf = vec![0u8; d.bytes.len().max(2048)];
        let (peers, from) = if d.to_gateway {
            (&mut self.gateway.peers, LAPTOP_UNDERLAY)
        } else {
            (&mut self.laptop.peers, GATEWAY_UNDERLAY)
        };
        let mut replies = Vec::new();
        let mut packet = None;
        match peers.decapsulate(from, &d.bytes, &mut buf, now) {
            Decapsulated::Send { peer, datagram, .. } => {
                replies.push(datagram.to_vec());
                if let Some(peer) = peer {
                    let mut more = vec![0u8; 2048];
                    while let Decapsulated::Send { datagram, .. } =
                        peers.flush_queued(peer, &mut more)
                    {
                        replies.push(datagram.to_vec());
                    }
                }
            }
            Decapsulated::Packet { packet: p, .. } => packet = Some(p.to_vec()),
            Decapsulated::Nothing | Decapsulated::Keepalive { .. } | Decapsulated::Dropped(_) => {}
        }
        for r in replies {
            self.send(!d.to_gateway, r);
        }
        let Some(packet) = packet else { return };
        if d.to_gateway {
            self.gateway_ingress(&packet);
        } else {
            if is_rst(&packet) {
                self.laptop.rsts += 1;
            }
            self.laptop.tun.rx.push_back(packet);
        }
    }

    fn gateway_ingress(&mut self, packet: &[u8]) {
        let now = self.now();
        let g = &mut self.gateway;
        if let Ingress::NewTcp { id, dst, .. } = g.flows.ingress(packet, now) {
            assert_eq!(dst, SERVICE);
            // The dial into the cluster succeeds at once.
            g.flows.accept(id, now).expect("pending flow");
            g.ends.insert(id, (g.template)());
        }
    }

    /// Move what can move for every flow of the gateway, then apply the
    /// release rules (as `gateway::datapath` does).
    fn service_gateway(&mut self) {
        let now = self.now();
        let g = &mut self.gateway;
        let mut chunk = vec![0u8; 16 * 1024];
        let ids: Vec<FlowId> = g.ends.keys().copied().collect();
        for id in ids {
            let Some(end) = g.ends.get_mut(&id) else {
                continue;
            };
            let Some(state) = g.flows.tcp_state(id) else {
                g.ends.remove(&id);
                continue;
            };
            if !matches!(state, TcpState::SynReceived | TcpState::Listen) {
                while !end.laptop_eof {
                    match g.flows.tcp_recv(id, &mut chunk) {
                        Ok(TcpRead::Data(n)) => {
                            end.got.extend_from_slice(&chunk[..n]);
                            if end.echo {
                                end.out.extend_from_slice(&chunk[..n]);
                            }
                        }
                        Ok(TcpRead::Eof) => end.laptop_eof = true,
                        _ => break,
                    }
                }
            }
            if end.sent < end.out.len()
                && matches!(state, TcpState::Established | TcpState::CloseWait)
                && let Ok(n) = g.flows.tcp_send(id, &end.out[end.sent..])
            {
                end.sent += n;
            }
            let wants_close = (end.echo && end.laptop_eof) || end.close_when_sent;
            if !end.closed && wants_close && end.sent == end.out.len() {
                g.flows.tcp_close(id).expect("open flow");
                end.closed = true;
            }
            if end.orphaned && g.flows.tcp_orphaned(id, now) {
                g.flows.tcp_reset(id);
                g.ends.remove(&id);
                g.settled.push((id, Settled::Reset));
                continue;
            }
            let done = end.laptop_eof && end.closed;
            match g.flows.tcp_settle(id, done) {
                Settled::Open => {}
                settled => {
                    g.ends.remove(&id);
                    g.settled.push((id, settled));
                }
            }
        }
    }

    /// One step: both sides send what they have, time moves to the next
    /// thing that happens, and what is due arrives.
    fn step(&mut self) {
        let now = self.now();
        let smol_now = self.smol_now();
        // Laptop: its stack, then WireGuard.
        let l = &mut self.laptop;
        l.iface.poll(smol_now, &mut l.tun, &mut l.sockets);
        let packets: Vec<Vec<u8>> = l.tun.tx.drain(..).collect();
        let mut out = Vec::new();
        for p in packets {
            let mut buf = vec![0u8; p.len() + 256];
            if let Encapsulated::Send { datagram, .. } = l.peers.encapsulate(&p, &mut buf) {
                out.push(datagram.to_vec());
            }
        }
        for d in out {
            self.send(true, d);
        }
        // Gateway: its flows, then egress through WireGuard.
        self.service_gateway();
        let mut packets = Vec::new();
        self.gateway
            .flows
            .egress(now, &mut |p: &[u8]| packets.push(p.to_vec()));
        for p in packets {
            let mut buf = vec![0u8; p.len() + 256];
            if let Encapsulated::Send { datagram, .. } =
                self.gateway.peers.encapsulate(&p, &mut buf)
            {
                let d = datagram.to_vec();
                self.send(false, d);
            }
        }
        // Timers, both sides.
        if self.t >= self.next_timers {
            self.next_timers = self.t + TIMER_TICK;
            let mut buf = vec![0u8; 2048];
            let mut out = Vec::new();
            self.laptop
                .peers
                .update_timers(&mut buf, |_, _, d| out.push((true, d.to_vec())));
            self.gateway
                .peers
                .update_timers(&mut buf, |_, _, d| out.push((false, d.to_vec())));
            for (to_gateway, d) in out {
                self.send(to_gateway, d);
            }
        }
        if self.t >= self.next_sweep {
            self.next_sweep = self.t + SWEEP_TICK;
            self.gateway.flows.probe_stalled_flows();
        }
        // Advance to the next event.
        let mut next = self.next_timers.min(self.next_sweep);
        if let Some(d) = self.wire.iter().map(|d| d.at).min() {
            next = next.min(d);
        }
        if let Some(d) = self.laptop.iface.poll_delay(smol_now, &self.laptop.sockets) {
            next = next.min(self.t + Duration::from_micros(d.total_micros()));
        }
        if let Some(d) = self.gateway.flows.poll_delay(now) {
            next = next.min(self.t + d);
        }
        self.t = next.max(self.t + Duration::from_micros(10));
        MockClock::set_time(self.t);
        // Everything due, in order of arrival.
        loop {
            let due = self
                .wire
                .iter()
                .enumerate()
                .filter(|(_, d)| d.at <= self.t)
                .min_by_key(|(_, d)| (d.at, d.seq))
                .map(|(i, _)| i);
            let Some(i) = due else { break };
            let d = self.wire.swap_remove(i);
            self.deliver(d);
        }
    }

    fn smol_now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.t.as_micros() as i64)
    }

    /// Step until `done`, or fail after `limit` of virtual time.
    fn run_until(&mut self, limit: Duration, what: &str, mut done: impl FnMut(&mut World) -> bool) {
        let end = self.t + limit;
        while !done(self) {
            if self.t >= end {
                panic!(
                    "no {what} after {limit:?} (at {:?}; to gateway {:?}, to laptop {:?}; {})",
                    self.t,
                    self.to_gateway,
                    self.to_laptop,
                    self.describe()
                );
            }
            self.step();
        }
    }

    /// Where every flow stands, for failure messages.
    fn describe(&self) -> String {
        let mut text = String::new();
        for (_, socket) in self.laptop.sockets.iter() {
            if let smoltcp::socket::Socket::Tcp(s) = socket {
                text += &format!(
                    "laptop {} sendq {} recvq {}; ",
                    s.state(),
                    s.send_queue(),
                    s.recv_queue()
                );
            }
        }
        for (id, end) in &self.gateway.ends {
            let f = &self.gateway.flows;
            text += &format!(
                "gateway {:?} sendq {:?} recvq {:?} got {} sent {}/{}; ",
                f.tcp_state(*id),
                f.tcp_send_queue(*id),
                f.tcp_recv_queue(*id),
                end.got.len(),
                end.sent,
                end.out.len()
            );
        }
        text
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.t + d;
        while self.t < end {
            self.step();
        }
    }

    /// A laptop connection to the cluster service.
    fn connect(&mut self) -> SocketHandle {
        let l = &mut self.laptop;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        l.next_port += 1;
        socket
            .connect(
                l.iface.context(),
                IpEndpoint::new(IpAddress::from(SERVICE.ip()), SERVICE.port()),
                l.next_port,
            )
            .expect("connect");
        l.sockets.add(socket)
    }

    fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.laptop.sockets.get_mut::<tcp::Socket>(h)
    }

    fn established(&mut self, h: SocketHandle) {
        self.run_until(Duration::from_secs(30), "connection", |w| {
            w.socket(h).state() == TcpState::Established
        });
    }

    /// Send `data` from the laptop and read until `expect` bytes came back.
    fn exchange(&mut self, h: SocketHandle, data: &[u8], expect: usize) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        self.run_until(Duration::from_secs(60), "exchange", |w| {
            let s = w.socket(h);
            if sent < data.len() && s.can_send() {
                sent += s.send_slice(&data[sent..]).expect("send");
            }
            while s.can_recv() {
                let _ = s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            got.len() >= expect
        });
        got
    }

    fn flows_of_laptop(&self) -> (usize, usize) {
        self.gateway.flows.flows_of(IpAddr::V4(LAPTOP_IP))
    }

    fn gateway_heard_since(&self) -> Duration {
        let peer = self.gateway.peers.get(self.gateway.laptop).expect("peer");
        let heard = peer.last_received().expect("heard from the laptop");
        self.now().saturating_duration_since(heard)
    }

    fn last_handshake(&self) -> Duration {
        let peer = self.gateway.peers.get(self.gateway.laptop).expect("peer");
        peer.last_handshake()
            .expect("a handshake")
            .saturating_duration_since(self.base)
    }
}

fn is_rst(packet: &[u8]) -> bool {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return false;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return false;
    };
    tcp.rst()
}

#[test]
fn handshake_then_data_both_ways() {
    let mut w = World::new(1, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    assert_eq!(w.to_gateway.inits, 1, "one handshake");
    assert_eq!(w.to_laptop.responses, 1);
    let got = w.exchange(h, b"hello through the tunnel", 24);
    assert_eq!(got, b"hello through the tunnel");
    let end = w.gateway.ends.values().next().expect("the flow");
    assert_eq!(end.got, b"hello through the tunnel");
    assert!(w.t < Duration::from_millis(200), "took {:?}", w.t);
}

#[test]
fn rekey_after_the_rekey_interval() {
    let mut w = World::new(2, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    let first = w.last_handshake();
    // A request every 10 s for 3 minutes.
    for i in 0..18u8 {
        let got = w.exchange(h, &[i; 100], 100);
        assert_eq!(got, [i; 100]);
        w.run_for(Duration::from_secs(10));
    }
    assert!(w.to_gateway.inits >= 2, "{:?}", w.to_gateway);
    let latest = w.last_handshake();
    assert!(
        latest >= first + Duration::from_secs(120),
        "rekeyed at {latest:?} (first handshake {first:?})"
    );
    assert!(
        latest < first + Duration::from_secs(140),
        "rekeyed late: {latest:?}"
    );
    let got = w.exchange(h, b"after the rekey", 15);
    assert_eq!(got, b"after the rekey");
}

#[test]
fn keepalive_while_idle() {
    let mut w = World::new(3, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    w.exchange(h, b"x", 1);
    let before = w.to_gateway.keepalives;
    w.run_for(Duration::from_secs(100));
    let keepalives = w.to_gateway.keepalives - before;
    assert!(
        (3..=5).contains(&keepalives),
        "{keepalives} keepalives in 100 s"
    );
    assert!(
        w.gateway_heard_since() <= Duration::from_secs(u64::from(KEEPALIVE)),
        "last heard {:?} ago",
        w.gateway_heard_since()
    );
    // The idle connection still works.
    assert_eq!(w.exchange(h, b"still there", 11), b"still there");
}

#[test]
fn a_lost_handshake_response_is_retried() {
    let mut w = World::new(4, Link::CLEAN);
    w.drops.push((false, HANDSHAKE_RESPONSE, 1));
    let h = w.connect();
    w.established(h);
    assert_eq!(w.to_laptop.lost, 1);
    assert!(w.to_gateway.inits >= 2, "{:?}", w.to_gateway);
    // boringtun retries after REKEY_TIMEOUT (5 s).
    assert!(w.t >= Duration::from_secs(5), "connected at {:?}", w.t);
    assert!(w.t < Duration::from_secs(10), "connected at {:?}", w.t);
    assert_eq!(w.exchange(h, b"late but there", 14), b"late but there");
}

#[test]
fn bulk_transfer_with_5_percent_loss_delivers_every_byte() {
    let link = Link {
        latency: Duration::from_millis(10),
        jitter: Duration::from_micros(300),
        loss: 0.05,
        ..Link::CLEAN
    };
    let mut w = World::new(5, link);
    let data: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let h = w.connect();
    w.established(h);
    let got = w.exchange(h, &data, data.len());
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the echo differs");
    let end = w.gateway.ends.values().next().expect("the flow");
    assert!(end.got == data, "the gateway got other bytes");
    assert!(
        w.to_gateway.lost > 10 && w.to_laptop.lost > 10,
        "loss both ways: {:?} {:?}",
        w.to_gateway,
        w.to_laptop
    );
}

#[test]
fn release_rules_cluster_closes_first() {
    let mut w = World::new(6, Link::CLEAN);
    w.gateway.template = || ClusterEnd {
        out: b"bye".to_vec(),
        close_when_sent: true,
        ..ClusterEnd::default()
    };
    let h = w.connect();
    w.established(h);
    let got = w.exchange(h, b"hi", 3);
    assert_eq!(got, b"bye");
    w.run_until(Duration::from_secs(1), "gateway FIN", |w| {
        !w.socket(h).may_recv()
    });
    w.socket(h).close();
    // The laptop's FIN is acknowledged (no RST needed) and the gateway
    // forgets the flow.
    w.run_until(Duration::from_secs(1), "laptop closed", |w| {
        w.socket(h).state() == TcpState::Closed
    });
    assert_eq!(w.laptop.rsts, 0);
    assert_eq!(w.gateway.settled.len(), 1);
    assert_eq!(w.gateway.settled[0].1, Settled::Closed);
    assert_eq!(w.flows_of_laptop(), (0, 0));
    assert!(w.gateway.flows.tcp_flows().next().is_none());
}

#[test]
fn release_rules_laptop_closes_first() {
    let mut w = World::new(7, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    assert_eq!(w.exchange(h, b"ping", 4), b"ping");
    w.socket(h).close();
    w.run_until(Duration::from_secs(1), "both closed", |w| {
        matches!(w.socket(h).state(), TcpState::TimeWait | TcpState::Closed)
            && w.gateway.settled.len() == 1
    });
    assert_eq!(w.gateway.settled[0].1, Settled::Closed);
    assert_eq!(w.laptop.rsts, 0);
    assert_eq!(w.flows_of_laptop(), (0, 0));
}

#[test]
fn release_rules_laptop_reset() {
    let mut w = World::new(8, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    assert_eq!(w.exchange(h, b"ping", 4), b"ping");
    w.socket(h).abort();
    w.run_until(Duration::from_secs(1), "reset seen", |w| {
        !w.gateway.settled.is_empty()
    });
    assert_eq!(w.gateway.settled[0].1, Settled::Reset);
    assert_eq!(w.flows_of_laptop(), (0, 0));
}

#[test]
fn release_rules_orphan_linger() {
    let mut w = World::new(9, Link::CLEAN);
    let h = w.connect();
    w.established(h);
    assert_eq!(w.exchange(h, b"ping", 4), b"ping");
    for end in w.gateway.ends.values_mut() {
        end.orphaned = true;
    }
    let orphaned_at = w.t;
    w.run_until(
        Duration::from_secs(ORPHAN_LINGER.as_secs() + 5),
        "orphan reset",
        |w| !w.gateway.settled.is_empty(),
    );
    let after = w.t - orphaned_at;
    assert!(after >= ORPHAN_LINGER, "reset after {after:?}");
    assert_eq!(w.gateway.settled[0].1, Settled::Reset);
    w.run_until(Duration::from_secs(1), "RST at the laptop", |w| {
        w.socket(h).state() == TcpState::Closed
    });
    assert_eq!(w.laptop.rsts, 1);
    assert_eq!(w.flows_of_laptop(), (0, 0));
}
