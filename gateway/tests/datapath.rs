//! The gateway's data path in-process on loopback, with a laptop played by a
//! boringtun `Tunn` and a small smoltcp interface. Every socket is on
//! 127.0.0.1; nothing needs root.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_gateway::config::WgConfig;
use burrow_gateway::{ControlConfig, DatapathConfig, GatewayConfig, Listeners, framed};
use burrow_netstack::flow::LaptopLimits;
use burrow_netstack::framing::{FrameDecoder, encode_frame};
use burrow_netstack::wg::PeerConfig;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpProtocol, IpRepr, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

const LAPTOP_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const OTHER_PEER_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const GATEWAY_SECRET: [u8; 32] = [1; 32];
const LAPTOP_SECRET: [u8; 32] = [2; 32];
const OTHER_SECRET: [u8; 32] = [3; 32];

struct Gateway {
    control: SocketAddr,
    wg: SocketAddr,
    framed: SocketAddr,
    metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    async fn start() -> Self {
        Self::start_with(DatapathConfig {
            dial_timeout: Duration::from_secs(2),
            ..DatapathConfig::default()
        })
        .await
    }

    async fn start_with(datapath: DatapathConfig) -> Self {
        let mut listeners = Listeners::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, 0, Some(0))
            .await
            .expect("bind loopback ports");
        listeners
            .bind_control(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
            .await
            .expect("bind control port");
        let control = listeners
            .control
            .first()
            .and_then(|l| l.local_addr().ok())
            .expect("control addr");
        let wg = listeners.wireguard.local_addr().expect("addr");
        let framed = listeners.framed.local_addr().expect("addr");
        let metrics = listeners
            .metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .expect("metrics addr");
        let peer = |secret: [u8; 32], ip: Ipv4Addr| {
            PeerConfig::host(PublicKey::from(&StaticSecret::from(secret)), IpAddr::V4(ip))
        };
        let config = GatewayConfig {
            wg: WgConfig {
                private_key: StaticSecret::from(GATEWAY_SECRET),
                listen_port: None,
                peers: vec![
                    peer(LAPTOP_SECRET, LAPTOP_IP),
                    peer(OTHER_SECRET, OTHER_PEER_IP),
                ],
            },
            datapath,
            control: ControlConfig::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(burrow_gateway::serve(config, listeners, async move {
            let _ = stopped.await;
        }));
        Self {
            control,
            wg,
            framed,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics)
            .await
            .expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("response");
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        text
    }

    /// The value of one sample, e.g. `metric(&text, "x{a=\"b\"}")`.
    /// Wait until the gateway counts `n` framed connections (5 s at most).
    async fn until_framed_connections(&self, n: f64, otherwise: &str) {
        let start = Instant::now();
        while Gateway::metric(&self.metrics().await, "burrow_gateway_framed_connections") != n {
            assert!(start.elapsed() < Duration::from_secs(5), "{otherwise}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metric(text: &str, sample: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("gateway stops on shutdown")
            .expect("gateway task")
            .expect("gateway result");
    }
}

/// How the laptop reaches the gateway.
enum Transport {
    Udp {
        socket: UdpSocket,
        gateway: SocketAddr,
    },
    Framed {
        stream: TcpStream,
        decoder: FrameDecoder,
        frames: VecDeque<Vec<u8>>,
    },
}

impl Transport {
    async fn udp(gateway: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        Transport::Udp { socket, gateway }
    }

    async fn framed(gateway: SocketAddr) -> Self {
        let stream = TcpStream::connect(gateway).await.expect("framed port");
        Transport::Framed {
            stream,
            decoder: FrameDecoder::new(),
            frames: VecDeque::new(),
        }
    }

    async fn send(&mut self, datagram: &[u8]) {
        match self {
            Transport::Udp { socket, gateway } => {
                socket.send_to(datagram, *gateway).await.expect("send");
            }
            Transport::Framed { stream, .. } => {
                let mut buf = vec![0; datagram.len() + 2];
                let n = encode_frame(datagram, &mut buf).expect("frame");
                stream.write_all(&buf[..n]).await.expect("framed write");
            }
        }
    }

    async fn recv(&mut self, wait: Duration) -> Option<Vec<u8>> {
        match self {
            Transport::Udp { socket, .. } => {
                let mut buf = vec![0; 65536];
                let (n, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                buf.truncate(n);
                Some(buf)
            }
            Transport::Framed {
                stream,
                decoder,
                frames,
            } => {
                if let Some(f) = frames.pop_front() {
                    return Some(f);
                }
                let mut buf = vec![0; 65536];
                let n = tokio::time::timeout(wait, stream.read(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                let mut input = &buf[..n];
                while let Some(f) = decoder.decode(&mut input).expect("valid frames") {
                    frames.push_back(f.to_vec());
                }
                frames.pop_front()
            }
        }
    }
}

/// smoltcp device over two packet queues.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1420;
        caps
    }
}

/// A laptop: WireGuard session, transport, and a TCP/IP stack.
struct Laptop {
    tunn: Tunn,
    transport: Transport,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queues,
    epoch: Instant,
    next_port: u16,
    /// TCP segments with RST received from the gateway.
    rsts: usize,
}

impl Laptop {
    fn new(secret: [u8; 32], ip: Ipv4Addr, transport: Transport) -> Self {
        let gateway = PublicKey::from(&StaticSecret::from(GATEWAY_SECRET));
        let tunn = Tunn::new(StaticSecret::from(secret), gateway, None, None, 1, None);
        let mut dev = Queues::default();
        let iface_ip = IpAddress::Ipv4(ip);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut dev,
            SmolInstant::from_millis(0),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(iface_ip, 32));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(ip);
        Self {
            tunn,
            transport,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            epoch: Instant::now(),
            next_port: 40000,
            rsts: 0,
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Encrypt and send one IP packet.
    async fn send_ip(&mut self, packet: &[u8]) {
        let mut buf = vec![0; packet.len() + 256];
        if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut buf) {
            let d = d.to_vec();
            self.transport.send(&d).await;
        }
    }

    async fn on_datagram(&mut self, datagram: &[u8]) {
        let mut buf = vec![0; 65536];
        let mut result = self.tunn.decapsulate(None, datagram, &mut buf);
        loop {
            match result {
                TunnResult::WriteToNetwork(d) => {
                    let d = d.to_vec();
                    self.transport.send(&d).await;
                    result = self.tunn.decapsulate(None, &[], &mut buf);
                }
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    // IPv4 without options carrying TCP: flags at 20 + 13.
                    if p.len() > 33 && p[0] == 0x45 && p[9] == 6 && p[33] & 0x04 != 0 {
                        self.rsts += 1;
                    }
                    self.dev.rx.push_back(p.to_vec());
                    break;
                }
                _ => break,
            }
        }
    }

    /// One round: let smoltcp transmit, wait up to `wait` for datagrams.
    async fn pump(&mut self, wait: Duration) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            self.send_ip(&p).await;
        }
        let mut wait = wait;
        while let Some(d) = self.transport.recv(wait).await {
            self.on_datagram(&d).await;
            wait = Duration::from_millis(1);
        }
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        while let Some(p) = self.dev.tx.pop_front() {
            self.send_ip(&p).await;
        }
        let mut buf = vec![0; 256];
        if let TunnResult::WriteToNetwork(d) = self.tunn.update_timers(&mut buf) {
            let d = d.to_vec();
            self.transport.send(&d).await;
        }
    }

    /// Pump until `done` holds, or fail after `limit`.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            self.pump(Duration::from_millis(5)).await;
        }
    }

    /// A TCP connection through the tunnel to `dst`, established.
    async fn tcp_established(&mut self, dst: SocketAddr) -> SocketHandle {
        let h = self.tcp_connect(dst);
        self.until(
            "the handshake through the tunnel",
            Duration::from_secs(10),
            |l| l.tcp(h).state() == tcp::State::Established,
        )
        .await;
        h
    }

    fn tcp_connect(&mut self, dst: SocketAddr) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            tcp::SocketBuffer::new(vec![0; 64 * 1024]),
        );
        self.next_port += 1;
        socket
            .connect(
                self.iface.context(),
                IpEndpoint::new(IpAddress::from(dst.ip()), dst.port()),
                self.next_port,
            )
            .expect("connect");
        self.sockets.add(socket)
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Send `data` on an established socket, close our half, and collect
    /// everything until the other side's FIN.
    async fn tcp_round_trip(&mut self, h: SocketHandle, data: &[u8]) -> Vec<u8> {
        let mut sent = 0;
        let mut got = Vec::new();
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "round trip stalled: sent {sent}, got {} (state {})",
                got.len(),
                self.tcp(h).state()
            );
            let s = self.tcp(h);
            if sent < data.len() && s.can_send() {
                sent += s.send_slice(&data[sent..]).expect("send");
                if sent == data.len() {
                    s.close();
                }
            }
            let s = self.tcp(h);
            while s.can_recv() {
                let _ = s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                });
            }
            if sent == data.len() && !s.may_recv() && !s.can_recv() {
                return got;
            }
            self.pump(Duration::from_millis(2)).await;
        }
    }

    /// A raw IPv4/UDP packet, any source.
    fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
        let ip = IpRepr::new(s, d, IpProtocol::Udp, 8 + payload.len(), 64);
        let mut buf = vec![0; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        UdpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
        }
        .emit(
            &mut UdpPacket::new_unchecked(&mut buf[ip.header_len()..]),
            &s,
            &d,
            payload.len(),
            |p| p.copy_from_slice(payload),
            &caps,
        );
        buf
    }
}

/// A TCP server on 127.0.0.1 that echoes until EOF, then closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn tcp_echo_through(gw: &Gateway, transport: Transport) {
    let echo = echo_server().await;
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, transport);
    let h = laptop.tcp_established(echo).await;
    // Larger than every buffer on the way, so backpressure is exercised.
    let data = payload(1024 * 1024);
    let got = laptop.tcp_round_trip(h, &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    // Both FINs crossed: the gateway retires the flow.
    laptop
        .until("the flow to close", Duration::from_secs(5), |l| {
            matches!(l.tcp(h).state(), tcp::State::TimeWait | tcp::State::Closed)
        })
        .await;
    let start = Instant::now();
    loop {
        let m = gw.metrics().await;
        if Gateway::metric(&m, "burrow_gateway_flows_open{proto=\"tcp\"}") == 0.0 {
            assert!(
                Gateway::metric(
                    &m,
                    "burrow_gateway_flow_bytes_total{proto=\"tcp\",direction=\"to_cluster\"}"
                ) >= data.len() as f64
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "flow not retired:\n{m}"
        );
        laptop.pump(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_over_udp_transport() {
    let gw = Gateway::start().await;
    tcp_echo_through(&gw, Transport::udp(gw.wg).await).await;
    let m = gw.metrics().await;
    assert!(Gateway::metric(&m, "burrow_gateway_flows_opened_total{proto=\"tcp\"}") == 1.0);
    // Counts only: no label names a peer.
    assert!(
        Gateway::metric(&m, "burrow_gateway_peers_handshaken{within=\"180s\"}") >= 1.0,
        "{m}"
    );
    assert!(!m.contains("peer="), "{m}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_over_framed_transport() {
    let gw = Gateway::start().await;
    tcp_echo_through(&gw, Transport::framed(gw.framed).await).await;
    let m = gw.metrics().await;
    assert!(Gateway::metric(&m, "burrow_gateway_framed_connections_opened_total") == 1.0);
    assert!(
        Gateway::metric(
            &m,
            "burrow_gateway_wireguard_datagrams_total{transport=\"framed\",direction=\"rx\"}"
        ) > 0.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_port_answers_rst() {
    let gw = Gateway::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let h = laptop.tcp_connect(closed);
    let start = Instant::now();
    laptop
        .until("the RST", Duration::from_secs(5), |l| {
            l.tcp(h).state() == tcp::State::Closed
        })
        .await;
    // Refused at once, not after a timeout.
    assert!(start.elapsed() < Duration::from_secs(2));
    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(&m, "burrow_gateway_dial_errors_total{kind=\"refused\"}"),
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_side_reset_reaches_the_laptop() {
    let gw = Gateway::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            // Wait for the first bytes, then reset.
            let mut buf = [0u8; 16];
            let mut s = s;
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let h = laptop.tcp_connect(server);
    laptop
        .until("established", Duration::from_secs(10), |l| {
            l.tcp(h).state() == tcp::State::Established
        })
        .await;
    laptop.tcp(h).send_slice(b"hello").expect("send");
    laptop
        .until(
            "the RST from the cluster side",
            Duration::from_secs(5),
            |l| l.tcp(h).state() == tcp::State::Closed,
        )
        .await;
    gw.stop().await;
}

/// A laptop that gives up while connecting (its socket is gone when the
/// gateway's SYN-ACK arrives, so its stack answers RST): the gateway must
/// drop the flow and close the connection it dialled into the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laptop_giving_up_mid_handshake_closes_the_cluster_side() {
    use smoltcp::wire::{Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
    let gw = Gateway::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 16];
            // EOF or reset: either way the gateway let go of it.
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = closed_tx.send(n);
        }
    });
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    // A bare SYN: no socket on the laptop will own the answer.
    let IpAddr::V4(server_ip) = server.ip() else {
        panic!("IPv4 listener")
    };
    let syn = TcpRepr {
        src_port: 45000,
        dst_port: server.port(),
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1360),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: LAPTOP_IP,
        dst_addr: server_ip,
        next_header: IpProtocol::Tcp,
        payload_len: syn.buffer_len(),
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + syn.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut v4 = Ipv4Packet::new_unchecked(&mut packet[..]);
    ip.emit(&mut v4, &caps);
    syn.emit(
        &mut TcpPacket::new_unchecked(v4.payload_mut()),
        &IpAddress::Ipv4(LAPTOP_IP),
        &IpAddress::Ipv4(server_ip),
        &caps,
    );
    laptop.send_ip(&packet).await;
    // The laptop's stack answers the SYN-ACK with a RST by itself.
    let start = Instant::now();
    let mut closed_rx = closed_rx;
    loop {
        laptop.pump(Duration::from_millis(5)).await;
        if let Ok(n) = closed_rx.try_recv() {
            assert_eq!(n, 0, "nothing was sent on the cluster side");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the cluster-side connection stayed open"
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(&m, "burrow_gateway_flows_open{proto=\"tcp\"}"),
        0.0
    );
    gw.stop().await;
}

/// The cluster side closes first (an HTTP server after its response):
/// the laptop's FIN that follows must be acknowledged, not left for a
/// retransmission to draw a RST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laptop_fin_after_the_cluster_closed_is_acknowledged() {
    let gw = Gateway::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"bye").await;
            drop(s);
        }
    });
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    for round in 0..5 {
        let h = laptop.tcp_connect(server);
        laptop
            .until("the cluster side's FIN", Duration::from_secs(10), |l| {
                l.tcp(h).state() == tcp::State::CloseWait
            })
            .await;
        let mut got = Vec::new();
        let _ = laptop.tcp(h).recv(|b| {
            got.extend_from_slice(b);
            (b.len(), ())
        });
        assert_eq!(got, b"bye");
        laptop.tcp(h).close();
        laptop
            .until("the ACK of our FIN", Duration::from_secs(10), |l| {
                l.tcp(h).state() == tcp::State::Closed
            })
            .await;
        assert_eq!(laptop.rsts, 0, "round {round}: closed by a RST, not an ACK");
        laptop.sockets.remove(h);
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_round_trip() {
    let gw = Gateway::start().await;
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = server.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let mut socket = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
    );
    socket
        .bind((IpAddress::Ipv4(LAPTOP_IP), 5353))
        .expect("bind");
    let h = laptop.sockets.add(socket);
    let remote = IpEndpoint::new(IpAddress::from(server_addr.ip()), server_addr.port());
    for round in 0..3u8 {
        let msg = [b'q', round];
        laptop
            .sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(&msg, remote)
            .expect("send");
        let mut reply = None;
        laptop
            .until("the UDP reply", Duration::from_secs(5), |l| {
                let s = l.sockets.get_mut::<udp::Socket>(h);
                if let Ok((data, meta)) = s.recv() {
                    reply = Some((data.to_vec(), meta.endpoint));
                }
                reply.is_some()
            })
            .await;
        assert_eq!(reply, Some((msg.to_vec(), remote)));
    }
    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(&m, "burrow_gateway_flows_open{proto=\"udp\"}"),
        1.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_source_and_peer_to_peer_are_dropped_and_counted() {
    let gw = Gateway::start().await;
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = server.local_addr().expect("addr");
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let me = SocketAddr::new(IpAddr::V4(LAPTOP_IP), 7000);
    // A genuine packet first, so the session exists.
    let genuine = Laptop::udp_packet(me, server_addr, b"genuine");
    laptop.send_ip(&genuine).await;
    laptop.pump(Duration::from_millis(200)).await;
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
        .await
        .expect("genuine datagram arrives")
        .expect("recv");
    assert_eq!(&buf[..n], b"genuine");

    // Speaking with the other peer's address, and with an unassigned one.
    for forged_ip in [OTHER_PEER_IP, Ipv4Addr::new(100, 64, 0, 99)] {
        let forged = Laptop::udp_packet(
            SocketAddr::new(IpAddr::V4(forged_ip), 7000),
            server_addr,
            b"forged",
        );
        laptop.send_ip(&forged).await;
    }
    // Addressed to the other peer.
    let to_peer = Laptop::udp_packet(me, SocketAddr::new(IpAddr::V4(OTHER_PEER_IP), 9), b"hi");
    laptop.send_ip(&to_peer).await;
    laptop.pump(Duration::from_millis(100)).await;

    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(
            &m,
            "burrow_gateway_packets_dropped_total{reason=\"forged_source\"}"
        ),
        2.0
    );
    assert_eq!(
        Gateway::metric(
            &m,
            "burrow_gateway_packets_dropped_total{reason=\"peer_to_peer\"}"
        ),
        1.0
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.recv_from(&mut buf))
            .await
            .is_err(),
        "a forged datagram reached the server"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_only_metrics() {
    let gw = Gateway::start().await;
    let mut s = TcpStream::connect(gw.metrics).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    for request in ["HEAD /metrics HTTP/1.1\r\n\r\n", "POST /x HTTP/1.1\r\n\r\n"] {
        let mut s = TcpStream::connect(gw.metrics).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read");
        assert!(text.starts_with("HTTP/1.1 405"), "{request}: {text}");
    }
    let m = gw.metrics().await;
    assert!(m.contains("# TYPE burrow_gateway_flows_open gauge"));
    assert_eq!(Gateway::metric(&m, "burrow_gateway_peers"), 2.0);
    gw.stop().await;
}

/// A laptop UDP socket bound to `port` on its tunnel address.
fn laptop_udp_socket(laptop: &mut Laptop, port: u16) -> SocketHandle {
    let mut socket = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
    );
    socket
        .bind((IpAddress::Ipv4(LAPTOP_IP), port))
        .expect("bind");
    laptop.sockets.add(socket)
}

async fn udp_echo_once(laptop: &mut Laptop, h: SocketHandle, remote: IpEndpoint, msg: &[u8]) {
    laptop
        .sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(msg, remote)
        .expect("send");
    let mut reply = None;
    laptop
        .until("the UDP reply", Duration::from_secs(5), |l| {
            if let Ok((data, _)) = l.sockets.get_mut::<udp::Socket>(h).recv() {
                reply = Some(data.to_vec());
            }
            reply.is_some()
        })
        .await;
    assert_eq!(reply.as_deref(), Some(msg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_move_off_a_framed_connection_that_closed() {
    let gw = Gateway::start().await;
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let server_addr = server.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
    let remote = IpEndpoint::new(IpAddr::V4(Ipv4Addr::LOCALHOST).into(), server_addr.port());
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::framed(gw.framed).await);
    let h = laptop_udp_socket(&mut laptop, 5353);
    udp_echo_once(&mut laptop, h, remote, b"first connection").await;
    // A second connection from the same peer, then the first (the peer's
    // endpoint and only stream) closes: every reply must come on the
    // second (the laptop listens only there, so a reply sent on the first
    // would be lost and the round trip would time out). While both are
    // open and used, the gateway may send a flow on either (the laptop
    // listens on all its streams), so nothing is echoed in between.
    let second = Transport::framed(gw.framed).await;
    let first = std::mem::replace(&mut laptop.transport, second);
    gw.until_framed_connections(2.0, "the second connection never opened")
        .await;
    drop(first);
    gw.until_framed_connections(1.0, "the first connection never closed")
        .await;
    for i in 0..8u8 {
        udp_echo_once(&mut laptop, h, remote, &[b'x', i]).await;
    }
    gw.stop().await;
}

/// An ICMP echo request from the laptop to 127.0.0.1.
fn echo_request(ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr};
    let icmp = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    };
    let ip = IpRepr::new(
        IpAddress::Ipv4(LAPTOP_IP),
        IpAddress::Ipv4(Ipv4Addr::LOCALHOST),
        IpProtocol::Icmp,
        icmp.buffer_len(),
        64,
    );
    let mut buf = vec![0; ip.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut buf[..], &caps);
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[ip.header_len()..]),
        &caps,
    );
    buf
}

/// Whether this process may open unprivileged ping sockets
/// (`net.ipv4.ping_group_range`).
fn ping_sockets_permitted() -> bool {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::ICMPV4),
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_echo_when_permitted_else_counted_drop() {
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};
    let gw = Gateway::start().await;
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let request = echo_request(0x4242, 1, b"ping through burrow");
    laptop.send_ip(&request).await;
    if ping_sockets_permitted() {
        let start = Instant::now();
        let reply = loop {
            assert!(start.elapsed() < Duration::from_secs(5), "no echo reply");
            // Not `pump`: the laptop's own stack would swallow the reply.
            if let Some(d) = laptop.transport.recv(Duration::from_millis(20)).await {
                laptop.on_datagram(&d).await;
            }
            if let Some(p) = laptop.dev.rx.pop_front() {
                break p;
            }
        };
        let ip = Ipv4Packet::new_checked(&reply[..]).expect("IPv4");
        assert_eq!(ip.src_addr(), Ipv4Addr::LOCALHOST);
        assert_eq!(ip.dst_addr(), LAPTOP_IP);
        let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("ICMP");
        let repr = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).expect("valid");
        assert_eq!(
            repr,
            Icmpv4Repr::EchoReply {
                ident: 0x4242,
                seq_no: 1,
                data: b"ping through burrow"
            }
        );
    } else {
        laptop.pump(Duration::from_millis(200)).await;
        let m = gw.metrics().await;
        assert_eq!(
            Gateway::metric(
                &m,
                "burrow_gateway_packets_dropped_total{reason=\"icmp_not_permitted\"}"
            ),
            1.0
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cluster_reader_stalls_the_laptop_instead_of_buffering() {
    const TOTAL: usize = 8 * 1024 * 1024;
    let gw = Gateway::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    let (start_reading, reading) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<usize>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let _ = reading.await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        let _ = done_tx.send(sink.len());
    });
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let h = laptop.tcp_connect(server);
    laptop
        .until("established", Duration::from_secs(10), |l| {
            l.tcp(h).state() == tcp::State::Established
        })
        .await;
    let data = payload(TOTAL);
    let mut sent = 0;
    // Push until the laptop's window stays shut.
    let mut last_progress = Instant::now();
    let start = Instant::now();
    while last_progress.elapsed() < Duration::from_millis(500) {
        assert!(start.elapsed() < Duration::from_secs(30), "never stalled");
        let s = laptop.tcp(h);
        if s.can_send() {
            let n = s.send_slice(&data[sent..]).expect("send");
            if n > 0 {
                sent += n;
                last_progress = Instant::now();
            }
        }
        assert!(sent < TOTAL, "everything fit: no backpressure");
        laptop.pump(Duration::from_millis(2)).await;
    }
    let m = gw.metrics().await;
    let to_cluster = Gateway::metric(
        &m,
        "burrow_gateway_flow_bytes_total{proto=\"tcp\",direction=\"to_cluster\"}",
    );
    // What left the gateway sits in the kernel's socket buffers (a few MiB
    // on loopback); the gateway itself holds at most its smoltcp buffer and
    // the task's queue.
    eprintln!("stalled: laptop sent {sent}, gateway passed on {to_cluster}");
    assert!(to_cluster < TOTAL as f64, "{to_cluster}");
    // Between the laptop and the cluster socket the gateway holds at most
    // one smoltcp receive buffer plus what the laptop has not yet had
    // acknowledged (the same slack as with the former 64 KiB buffer).
    let bound = DatapathConfig::default().tcp_buffer + 192 * 1024;
    assert!(
        sent as f64 - to_cluster <= bound as f64,
        "sent {sent}, passed on {to_cluster}"
    );
    // Let the server read: the window reopens and everything arrives.
    let _ = start_reading.send(());
    while sent < TOTAL {
        let s = laptop.tcp(h);
        if s.can_send() {
            sent += s.send_slice(&data[sent..]).expect("send");
        }
        if sent == TOTAL {
            laptop.tcp(h).close();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stuck after resume at {sent}"
        );
        laptop.pump(Duration::from_millis(2)).await;
    }
    let mut done_rx = done_rx;
    let received = loop {
        laptop.pump(Duration::from_millis(5)).await;
        match done_rx.try_recv() {
            Ok(n) => break n,
            Err(oneshot::error::TryRecvError::Empty) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "server never saw EOF"
                );
            }
            Err(e) => panic!("server task: {e}"),
        }
    };
    assert_eq!(received, TOTAL);
    gw.stop().await;
}

/// One HTTP/1.1 request to the control API: (status, body).
async fn control_call(gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(gw.control).await.expect("control port");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("response");
    status_and_body(&text)
}

/// An HTTP/1.1 response's (status, body).
fn status_and_body(text: &str) -> (u16, String) {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A registration body for `secret`'s key, with a fresh nonce and a proof
/// signed by `signer` (the same secret, unless forging).
async fn registration(gw: &Gateway, secret: [u8; 32], signer: [u8; 32], name: &str) -> String {
    use base64::Engine as _;
    let (code, info) = control_call(gw, "GET", "/v1/info", "").await;
    assert_eq!(code, 200, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).expect("info is JSON");
    let nonce = info["registration_nonce"]
        .as_str()
        .expect("a nonce")
        .to_string();
    let gateway_key = PublicKey::from(&StaticSecret::from(GATEWAY_SECRET));
    let proof = burrow_api::proof::sign(&StaticSecret::from(signer), &gateway_key, &nonce);
    let key = base64::engine::general_purpose::STANDARD
        .encode(PublicKey::from(&StaticSecret::from(secret)).as_bytes());
    serde_json::json!({"public_key": key, "name": name, "nonce": nonce, "proof": proof}).to_string()
}

/// One HTTP/1.1 request to the laptop's own API through its tunnel.
async fn tunnel_call(laptop: &mut Laptop, method: &str, path: &str) -> (u16, String) {
    let h = laptop.tcp_connect(SocketAddr::from((
        Ipv4Addr::new(198, 19, 0, 1),
        burrow_api::CONTROL_PORT,
    )));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8(laptop.tcp_round_trip(h, req.as_bytes()).await).expect("utf-8");
    status_and_body(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laptops_register_at_runtime_and_are_forgotten_on_unregister() {
    let gw = Gateway::start().await;
    let secret = [9u8; 32];

    let (code, info) = control_call(&gw, "GET", "/v1/info", "").await;
    assert_eq!(code, 200, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).expect("info is JSON");
    let gateway_key = PublicKey::from(&StaticSecret::from(GATEWAY_SECRET));
    {
        use base64::Engine as _;
        assert_eq!(
            info["public_key"],
            base64::engine::general_purpose::STANDARD.encode(gateway_key.as_bytes())
        );
    }
    assert_eq!(info["framed_port"], gw.framed.port());

    // A registration must prove it holds the key's private half.
    let forged = registration(&gw, secret, [8u8; 32], "mallory").await;
    let (code, err) = control_call(&gw, "POST", "/v1/peers", &forged).await;
    assert_eq!(code, 401, "{err}");
    let body = registration(&gw, secret, secret, "alice@laptop").await;
    let (code, reg) = control_call(&gw, "POST", "/v1/peers", &body).await;
    assert_eq!(code, 200, "{reg}");
    let reg: serde_json::Value = serde_json::from_str(&reg).expect("registration is JSON");
    let addr: Ipv4Addr = reg["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("address");
    assert!(
        "198.19.0.0/16"
            .parse::<ipnet::Ipv4Net>()
            .expect("net")
            .contains(&addr),
        "{addr}"
    );
    assert_eq!(reg["gateway_address"], "198.19.0.1");
    // Registering again is the heartbeat: same address.
    let body = registration(&gw, secret, secret, "alice@laptop").await;
    let (_, again) = control_call(&gw, "POST", "/v1/peers", &body).await;
    let again: serde_json::Value = serde_json::from_str(&again).expect("JSON");
    assert_eq!(again["address"], reg["address"]);

    // The registered laptop reaches the cluster.
    let echo = echo_server().await;
    let mut laptop = Laptop::new(secret, addr, Transport::udp(gw.wg).await);
    let h = laptop.tcp_established(echo).await;
    assert_eq!(laptop.tcp_round_trip(h, b"hello").await, b"hello");

    // Its own API is in the tunnel, and knows it by its WireGuard peer.
    let (code, me) = tunnel_call(&mut laptop, "GET", "/v1/peer").await;
    assert_eq!(code, 200, "{me}");
    let me: serde_json::Value = serde_json::from_str(&me).expect("JSON");
    assert_eq!(me["address"], addr.to_string());
    assert_eq!(me["name"], "alice@laptop");
    let (code, list) = tunnel_call(&mut laptop, "GET", "/v1/reroutes").await;
    assert_eq!((code, list.as_str()), (200, "[]"));
    // Nothing else answers on the gateway's tunnel address.
    let h = laptop.tcp_connect(SocketAddr::from((Ipv4Addr::new(198, 19, 0, 1), 9090)));
    laptop.pump(Duration::from_millis(500)).await;
    assert_ne!(laptop.tcp(h).state(), tcp::State::Established);

    // Unregistered (through the tunnel): the gateway drops its packets; a
    // new connection never completes.
    let (code, _) = tunnel_call(&mut laptop, "DELETE", "/v1/peer").await;
    assert_eq!(code, 204);
    laptop.pump(Duration::from_millis(500)).await;
    let h2 = laptop.tcp_connect(echo);
    laptop.pump(Duration::from_secs(2)).await;
    assert_ne!(laptop.tcp(h2).state(), tcp::State::Established);

    // Malformed keys are refused with a reason.
    let (code, err) = control_call(
        &gw,
        "POST",
        "/v1/peers",
        r#"{"public_key":"AAAA","name":"x","nonce":"","proof":""}"#,
    )
    .await;
    assert_eq!(code, 400, "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    let (code, _) = control_call(&gw, "POST", "/v1/peers", "not json").await;
    assert!((400..500).contains(&code), "{code}");
    gw.stop().await;
}

#[tokio::test]
async fn registration_listens_on_loopback_only() {
    let mut listeners = Listeners::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 0, 0, None)
        .await
        .expect("bind");
    let err = listeners
        .bind_control(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
        .await
        .expect_err("0.0.0.0 is refused");
    assert!(format!("{err:#}").contains("loopback"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laptop_at_its_tcp_cap_gets_rst_and_another_laptop_does_not() {
    let gw = Gateway::start_with(DatapathConfig {
        dial_timeout: Duration::from_secs(2),
        per_laptop: LaptopLimits {
            tcp_flows: 2,
            ..LaptopLimits::default()
        },
        ..DatapathConfig::default()
    })
    .await;
    let echo = echo_server().await;
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let held: Vec<SocketHandle> = (0..2).map(|_| laptop.tcp_connect(echo)).collect();
    laptop
        .until("two connections", Duration::from_secs(10), |l| {
            held.iter()
                .all(|h| l.tcp(*h).state() == tcp::State::Established)
        })
        .await;
    let third = laptop.tcp_connect(echo);
    laptop
        .until("the third refused", Duration::from_secs(10), |l| {
            l.tcp(third).state() == tcp::State::Closed
        })
        .await;
    assert_eq!(laptop.rsts, 1, "refused with RST");
    // The other laptop is not held back.
    let mut other = Laptop::new(OTHER_SECRET, OTHER_PEER_IP, Transport::udp(gw.wg).await);
    let h = other.tcp_connect(echo);
    other
        .until(
            "the other laptop's connection",
            Duration::from_secs(10),
            |l| l.tcp(h).state() == tcp::State::Established,
        )
        .await;
    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(
            &m,
            "burrow_gateway_flows_refused_total{limit=\"tcp_flows\"}"
        ),
        1.0
    );
    assert_eq!(
        Gateway::metric(&m, "burrow_gateway_laptop_flow_limit{limit=\"tcp_flows\"}"),
        2.0
    );
    gw.stop().await;
}

/// Reads until the gateway closes `stream` (end of stream or reset);
/// false if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_connections_without_a_handshake_are_closed_and_capped() {
    let gw = Gateway::start_with(DatapathConfig {
        dial_timeout: Duration::from_secs(2),
        framed: framed::Limits {
            max_connections: 3,
            handshake_timeout: Duration::from_secs(1),
            // Long enough for the steps before the round trip below on a
            // loaded machine.
            idle_timeout: Duration::from_secs(6),
            ..framed::Limits::default()
        },
        ..DatapathConfig::default()
    })
    .await;
    // A laptop over the framed transport handshakes at once.
    let echo = echo_server().await;
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::framed(gw.framed).await);
    let h = laptop.tcp_connect(echo);
    laptop
        .until("the laptop's connection", Duration::from_secs(10), |l| {
            l.tcp(h).state() == tcp::State::Established
        })
        .await;
    // Two that never handshake: one silent, one sending a junk frame the
    // size of a handshake initiation.
    let mut silent = TcpStream::connect(gw.framed).await.expect("connect");
    let mut junk = TcpStream::connect(gw.framed).await.expect("connect");
    let mut frame = vec![0u8, 148, 1];
    frame.resize(150, 0x42);
    junk.write_all(&frame).await.expect("write");
    // The cap of 3 is reached: the next is reset at once (maybe before
    // the connect returns).
    if let Ok(mut over) = TcpStream::connect(gw.framed).await {
        assert!(
            closed_within(&mut over, Duration::from_secs(5)).await,
            "a connection beyond the cap is closed at once"
        );
    }
    // The deadline closes the two; the laptop's connection outlives it.
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(closed_within(&mut junk, Duration::from_secs(5)).await);
    let got = laptop.tcp_round_trip(h, b"after the deadline").await;
    assert_eq!(got, b"after the deadline");
    let m = gw.metrics().await;
    let sample = |s: &str| Gateway::metric(&m, s);
    assert_eq!(
        sample("burrow_gateway_framed_connections_refused_total{reason=\"total_limit\"}"),
        1.0
    );
    assert_eq!(
        sample("burrow_gateway_framed_connections_timed_out_total{reason=\"handshake\"}"),
        2.0
    );
    assert_eq!(
        sample("burrow_gateway_framed_connections_timed_out_total{reason=\"idle\"}"),
        0.0
    );
    // Silent for longer than the idle timeout: closed too.
    let Transport::Framed { stream, .. } = &mut laptop.transport else {
        unreachable!("a framed laptop")
    };
    assert!(closed_within(stream, Duration::from_secs(20)).await);
    let m = gw.metrics().await;
    assert_eq!(
        Gateway::metric(
            &m,
            "burrow_gateway_framed_connections_timed_out_total{reason=\"idle\"}"
        ),
        1.0
    );
    gw.stop().await;
}

/// What a subscriber wrote, for a test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// At debug level a laptop's connection reads as a story, each line in the
/// laptop's span (its tunnel address and key) and the flow's (its
/// destination): dialed, connected, closed with its bytes; a refused one
/// says the laptop got RST. A handful of lines per flow, none per packet.
///
/// The subscriber is the binary's global one (a thread's own would miss
/// spans whose callsites other tests' threads registered first): the other
/// tests' lines land beside these, told apart by the flows' destinations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laptops_flows_are_logged_in_its_span() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("burrow_gateway=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");

    let gw = Gateway::start().await;
    let echo = echo_server().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut laptop = Laptop::new(LAPTOP_SECRET, LAPTOP_IP, Transport::udp(gw.wg).await);
    let h = laptop.tcp_established(echo).await;
    let data = payload(100 * 1024);
    let got = laptop.tcp_round_trip(h, &data).await;
    assert_eq!(got.len(), data.len());
    let refused = laptop.tcp_connect(closed);
    laptop
        .until("the RST of the closed port", Duration::from_secs(10), |l| {
            l.tcp(refused).state() == tcp::State::Closed
        })
        .await;
    let flow = format!("flow{{dst={echo}");
    let start = Instant::now();
    while !captured
        .text()
        .lines()
        .any(|l| l.contains(&flow) && l.contains("flow closed"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no flow closed:\n{}",
            captured.text()
        );
        laptop.pump(Duration::from_millis(20)).await;
    }
    gw.stop().await;

    let log = captured.text();
    let laptop_span = format!("laptop{{laptop={LAPTOP_IP} key=");
    let of_flow: Vec<&str> = log.lines().filter(|l| l.contains(&flow)).collect();
    for line in &of_flow {
        assert!(
            line.contains(&laptop_span),
            "not in the laptop's span: {line}"
        );
    }
    let story: Vec<&str> = ["dialing", "connected", "flow closed"]
        .iter()
        .map(|what| {
            of_flow
                .iter()
                .find(|l| l.contains(what))
                .copied()
                .unwrap_or_else(|| panic!("no {what:?} line of the flow in:\n{log}"))
        })
        .collect();
    let total = data.len().to_string();
    assert!(
        story[2].contains(&format!("to_cluster={total}"))
            && story[2].contains(&format!("to_laptop={total}")),
        "the close says the bytes each way: {}",
        story[2]
    );
    // About a hundred packets each way: lines per flow, not per packet.
    assert!(
        of_flow.len() <= 6,
        "too many lines for one flow:\n{of_flow:#?}"
    );
    let refusal = format!("flow{{dst={closed}");
    assert!(
        log.lines()
            .any(|l| l.contains(&refusal) && l.contains("RST to the laptop")),
        "the refused dial is told:\n{log}"
    );
}
