//! The gateway opens TCP connections *to* a laptop through the tunnel
//! (`burrow_gateway::laptop::LaptopDialer`, what reroutes are built on),
//! end to end: the real `burrow up` in a "laptop" namespace with ordinary
//! kernel sockets listening on its tunnel address, and the gateway's data
//! path (the library, on a thread inside a "gateway" namespace) dialling
//! them.
//!
//! ```text
//!  laptop ns                                    gateway ns
//!  burrow0 198.19.0.2 ── ul0 172.31.250.1 ══ ul1 172.31.250.2 ── Datapath (tunnel address 198.19.0.1)
//!  listeners on 198.19.0.2:700x                                 LaptopDialer::connect(198.19.0.2:700x)
//! ```
//!
//! Needs root and `ip` (iproute2); runs only with BURROW_E2E=1. Both
//! namespaces are created here and deleted on drop, also when the test
//! panics.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_gateway::datapath::{Command as DatapathCommand, Datapath, DatapathConfig};
use burrow_gateway::laptop::{LaptopDialer, LaptopStream};
use burrow_netstack::wg::PeerConfig;
use burrow_netstack::wgconf::encode_key;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const BURROW: &str = env!("CARGO_BIN_EXE_burrow");
const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const LAPTOP_TUNNEL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const GATEWAY_UNDERLAY: &str = "172.31.250.2";
/// Guard against hangs; never a measure of speed.
const PATIENCE: Duration = Duration::from_secs(20);

/// The laptop's servers, by port.
const ECHO: u16 = 7001;
const LAPTOP_CLOSES_FIRST: u16 = 7002;
const WATCH_CLOSE: u16 = 7003;
const SLOW_READER: u16 = 7004;
const NOBODY: u16 = 7999;
/// The laptop's firewall drops SYNs to this port.
const BLACK_HOLE: u16 = 7998;

fn e2e() -> bool {
    if std::env::var("BURROW_E2E").as_deref() != Ok("1") {
        eprintln!("skipped: set BURROW_E2E=1 to run (needs root, iproute2 and network namespaces)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "BURROW_E2E=1 but not root: this test creates network namespaces and a TUN device"
    );
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn secret() -> StaticSecret {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    StaticSecret::from(bytes)
}

/// Enter network namespace `ns` on the current thread.
fn enter(ns: &str) {
    let file = fs::File::open(format!("/run/netns/{ns}")).expect("namespace file");
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// A deterministic, non-repeating-looking payload.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Two namespaces joined by a veth pair and `burrow up` in the laptop's;
/// everything goes on drop.
struct Net {
    laptop: String,
    gateway: String,
    dir: tempfile::TempDir,
    up: Option<Child>,
    stop_servers: Arc<AtomicBool>,
}

impl Net {
    fn new(laptop_key: &StaticSecret, gateway_key: &StaticSecret) -> Self {
        let id = format!("bt-{}-dial", std::process::id());
        let net = Net {
            laptop: format!("{id}-l"),
            gateway: format!("{id}-g"),
            dir: tempfile::tempdir().expect("tempdir"),
            up: None,
            stop_servers: Arc::default(),
        };
        let (l, g) = (net.laptop.as_str(), net.gateway.as_str());
        ip(&["netns", "add", l]);
        ip(&["netns", "add", g]);
        ip(&[
            "-n", l, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1", "netns", g,
        ]);
        ip(&["-n", l, "addr", "add", "172.31.250.1/24", "dev", "ul0"]);
        ip(&["-n", l, "link", "set", "ul0", "up"]);
        ip(&["-n", l, "link", "set", "lo", "up"]);
        ip(&["-n", g, "addr", "add", "172.31.250.2/24", "dev", "ul1"]);
        ip(&["-n", g, "link", "set", "ul1", "up"]);
        ip(&["-n", g, "link", "set", "lo", "up"]);
        let status = Command::new("ip")
            .args(["netns", "exec", l, "iptables", "-A", "INPUT", "-p", "tcp"])
            .args(["--dport", &BLACK_HOLE.to_string(), "-j", "DROP"])
            .status()
            .expect("run iptables");
        assert!(status.success(), "iptables in the laptop namespace failed");
        // As `burrow connect` sets it up: a /32 tunnel address, the
        // gateway's tunnel address routed into the tunnel.
        let conf = net.dir.path().join("laptop.conf");
        fs::write(
            &conf,
            format!(
                "[Interface]\nPrivateKey = {}\nAddress = {LAPTOP_TUNNEL}/32\n\n\
                 [Peer]\nPublicKey = {}\nEndpoint = {GATEWAY_UNDERLAY}:51820\n\
                 AllowedIPs = {GATEWAY_TUNNEL}/32\nPersistentKeepalive = 25\n",
                encode_key(&laptop_key.to_bytes()),
                encode_key(PublicKey::from(gateway_key).as_bytes()),
            ),
        )
        .expect("write laptop.conf");
        net
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn up(&mut self) {
        let log = fs::File::create(self.path("up.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.laptop, BURROW, "up", "--wg-config"])
            .arg(self.path("laptop.conf"))
            .env("BURROW_RUN_DIR", self.path("run"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start burrow up");
        self.up = Some(child);
        let state = self.path("run").join("up-burrow0.json");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = fs::read(&state)
                .ok()
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|s| s["ready"] == true);
            if ready {
                return;
            }
            if let Some(Ok(Some(status))) = self.up.as_mut().map(|c| c.try_wait()) {
                panic!("burrow up exited early ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "burrow up not ready: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("up.log")).unwrap_or_default()
    }

    /// A server on the laptop's tunnel address: `handle` runs on a thread
    /// per connection.
    fn serve(&self, port: u16, handle: impl Fn(TcpStream) + Send + Sync + 'static) {
        let ns = self.laptop.clone();
        let listener = thread::spawn(move || {
            enter(&ns);
            TcpListener::bind((LAPTOP_TUNNEL, port))
        })
        .join()
        .expect("laptop thread")
        .expect("bind on the laptop's tunnel address");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = self.stop_servers.clone();
        let handle = Arc::new(handle);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let handle = handle.clone();
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(PATIENCE));
                        thread::spawn(move || handle(s));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
}

/// Make the laptop in `ns` send into the tunnel, so that it handshakes
/// and the gateway learns its endpoint (as `burrow connect`'s probe does).
fn poke_gateway(ns: &str) {
    let ns = ns.to_string();
    thread::spawn(move || {
        enter(&ns);
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        let _ = s.send_to(b"hello", (GATEWAY_TUNNEL, 9));
    })
    .join()
    .expect("laptop thread");
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_servers.store(true, Ordering::Relaxed);
        if let Some(c) = self.up.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.laptop, &self.gateway] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Echo until EOF, then close our half too.
fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Write `data` and read the echo back at the same time.
async fn round_trip(stream: LaptopStream, data: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async move {
        wr.write_all(&data).await.expect("write to the laptop");
        wr.shutdown().await.expect("shutdown");
    };
    let reader = async move {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.expect("read the echo");
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    back
}

async fn patient<F: std::future::Future>(what: &'static str, f: F) -> F::Output {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {PATIENCE:?}"))
}

#[test]
fn the_gateway_connects_to_a_laptop_through_the_tunnel() {
    if !e2e() {
        return;
    }
    let (laptop_key, gateway_key) = (secret(), secret());
    let mut net = Net::new(&laptop_key, &gateway_key);
    net.up();

    // Laptop → gateway half-close first: the laptop says hello, closes
    // its sending half, then reads what the gateway answers.
    // (Reports go over tokio channels: the gateway's runtime must keep
    // running while it waits for them.)
    let (closes_first_tx, mut closes_first_rx) = unbounded_channel::<Vec<u8>>();
    // How a connection the gateway dropped ended on the laptop.
    let (watch_tx, mut watch_rx) = unbounded_channel::<(Vec<u8>, std::io::Result<()>)>();
    // The slow reader reads only when told, then reports what it got.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let (slow_tx, mut slow_rx) = unbounded_channel::<Vec<u8>>();
    net.serve(ECHO, echo);
    net.serve(LAPTOP_CLOSES_FIRST, move |mut s| {
        s.write_all(b"hello from the laptop").expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = closes_first_tx.send(got);
    });
    net.serve(WATCH_CLOSE, move |mut s| {
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got).map(|_| ());
        let _ = watch_tx.send((got, end));
    });
    net.serve(SLOW_READER, move |mut s| {
        let _ = go_rx.lock().expect("lock").recv();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let _ = slow_tx.send(got);
    });

    let (gw_ns, laptop_ns) = (net.gateway.clone(), net.laptop.clone());
    let laptop_public = PublicKey::from(&laptop_key);
    let gateway = thread::spawn(move || {
        enter(&gw_ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let udp = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 51820))
                .await
                .expect("bind the WireGuard port");
            let peer = PeerConfig::host(laptop_public, IpAddr::V4(LAPTOP_TUNNEL));
            let datapath = Datapath::new(
                gateway_key,
                vec![peer],
                DatapathConfig {
                    tunnel_address: Some(IpAddr::V4(GATEWAY_TUNNEL)),
                    dial_timeout: Duration::from_secs(5),
                    ..DatapathConfig::default()
                },
            )
            .expect("data path");
            let (_framed_tx, framed_rx) = tokio::sync::mpsc::channel(1);
            let (control_tx, control_rx) = tokio::sync::mpsc::channel(16);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let run = tokio::spawn(datapath.run(udp, framed_rx, control_rx, async move {
                let _ = stop_rx.await;
            }));
            wait_for_handshake(&control_tx, &laptop_ns).await;
            gateway_side(
                LaptopDialer::new(control_tx.clone()),
                &mut closes_first_rx,
                &mut watch_rx,
                &go_tx,
                &mut slow_rx,
            )
            .await;
            let _ = stop_tx.send(());
            let _ = run.await;
        });
    });
    if let Err(panic) = gateway.join() {
        eprintln!("burrow up log:\n{}", net.log());
        std::panic::resume_unwind(panic);
    }
}

/// Until the gateway heard the laptop (its WireGuard handshake).
async fn wait_for_handshake(control: &tokio::sync::mpsc::Sender<DatapathCommand>, laptop_ns: &str) {
    let deadline = Instant::now() + PATIENCE;
    poke_gateway(laptop_ns);
    loop {
        let (reply, answer) = tokio::sync::oneshot::channel();
        control
            .send(DatapathCommand::LastHeard(reply))
            .await
            .expect("data path");
        if !answer.await.expect("answer").is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "the laptop never handshook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn gateway_side(
    dialer: LaptopDialer,
    closes_first: &mut UnboundedReceiver<Vec<u8>>,
    watch: &mut UnboundedReceiver<(Vec<u8>, std::io::Result<()>)>,
    go: &mpsc::Sender<()>,
    slow: &mut UnboundedReceiver<Vec<u8>>,
) {
    let laptop = |port| SocketAddr::from((LAPTOP_TUNNEL, port));

    // Data both ways, a few MiB, compared byte for byte.
    let stream = patient("connect", dialer.connect(laptop(ECHO)))
        .await
        .expect("connect to the laptop's echo server");
    assert_eq!(stream.peer_addr(), laptop(ECHO));
    assert_eq!(stream.local_addr().ip(), IpAddr::V4(GATEWAY_TUNNEL));
    let data = payload(6 * 1024 * 1024, 1);
    let back = patient("6 MiB echo", round_trip(stream, data.clone())).await;
    assert_eq!(back.len(), data.len(), "echoed length");
    assert!(back == data, "the echo differs from what was sent");

    // Refused: nobody listens on the port; the laptop answers RST.
    let err = patient("refused", dialer.connect(laptop(NOBODY)))
        .await
        .expect_err("nobody listens there");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // No such laptop.
    let err = patient(
        "no laptop",
        dialer.connect(SocketAddr::from(([198, 19, 0, 77], ECHO))),
    )
    .await
    .expect_err("no laptop has that address");
    assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable, "{err}");

    // Half-close, the laptop first: its data and FIN arrive, and our
    // answer still reaches it afterwards.
    let mut s = patient("connect", dialer.connect(laptop(LAPTOP_CLOSES_FIRST)))
        .await
        .expect("connect");
    let mut got = Vec::new();
    patient("read to EOF", s.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(got, b"hello from the laptop");
    s.write_all(b"hello from the gateway after your FIN")
        .await
        .expect("write after the laptop's FIN");
    s.shutdown().await.expect("shutdown");
    let heard = patient("the laptop's report", closes_first.recv())
        .await
        .expect("the laptop reports");
    assert_eq!(heard, b"hello from the gateway after your FIN");
    drop(s);
    // (The gateway-first half-close is the echo above: our FIN, then the
    // laptop's remaining data.)

    // Dropped without shutdown and nothing left unread: like a closed
    // kernel socket, FIN after the data written before.
    let mut s = patient("connect", dialer.connect(laptop(WATCH_CLOSE)))
        .await
        .expect("connect");
    s.write_all(b"last words").await.expect("write");
    drop(s);
    let (got, end) = patient("the laptop's read to end", watch.recv())
        .await
        .expect("the laptop reports");
    assert_eq!(got, b"last words");
    end.expect("an orderly close (FIN)");

    // Backpressure: a laptop that does not read stops our writes at a
    // bounded amount (its kernel buffer plus the flow's), and after it
    // reads everything arrives intact.
    let mut s = patient("connect", dialer.connect(laptop(SLOW_READER)))
        .await
        .expect("connect");
    let data = payload(32 * 1024 * 1024, 2);
    let mut written = 0;
    while written < data.len() {
        let end = (written + 64 * 1024).min(data.len());
        match tokio::time::timeout(Duration::from_secs(2), s.write(&data[written..end])).await {
            Ok(n) => written += n.expect("write"),
            Err(_) => break,
        }
    }
    assert!(
        written < data.len(),
        "32 MiB went into a connection whose reader never read: nothing pushed back"
    );
    go.send(()).expect("the slow reader waits");
    patient("rest of the data", s.write_all(&data[written..]))
        .await
        .expect("write after the reader woke");
    s.shutdown().await.expect("shutdown");
    let got = patient("the slow reader's report", slow.recv())
        .await
        .expect("the slow reader reports");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the slow reader got different bytes");
    drop(s);

    // Many at once.
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            let dialer = dialer.clone();
            tokio::spawn(async move {
                let s = dialer.connect(laptop(ECHO)).await.expect("connect");
                let data = payload(64 * 1024, 100 + i);
                let back = round_trip(s, data.clone()).await;
                back == data
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if patient("100 streams", t).await.expect("task") {
            ok += 1;
        }
    }
    assert_eq!(ok, 100, "streams echoed intact");

    // Last, as it may mark the laptop down: no answer at all (its firewall
    // drops the SYNs). While the laptop is still heard from (the streams
    // above closing), the dial times out; once it has been silent for
    // `LAPTOP_PATIENCE` the gateway takes it for gone instead, and further
    // dials fail at once until it is heard from again (fail-open: its
    // callers go to the pods). Which comes first depends on when the last
    // of those closes arrives.
    let err = patient("black hole", dialer.connect(laptop(BLACK_HOLE)))
        .await
        .expect_err("the SYNs are dropped");
    match err.kind() {
        std::io::ErrorKind::TimedOut => {}
        std::io::ErrorKind::HostUnreachable => {
            let err = patient("dial while down", dialer.connect(laptop(ECHO)))
                .await
                .expect_err("the laptop is down until heard from");
            assert_eq!(err.kind(), std::io::ErrorKind::HostUnreachable, "{err}");
        }
        other => panic!("a black-holed dial failed with {other:?}: {err}"),
    }
}
