//! mc-flows: many TCP flows at once, for the end-to-end tests of the data
//! path.
//!
//! - `mc-flows echo-server --port P`: a TCP echo server (runs in a pod):
//!   writes back everything it reads, and shuts its side down when the
//!   client does; and a UDP echo on the same port number.
//! - `mc-flows echo-clients --to IP:P --connections N --bytes B`: opens N
//!   connections at once, waits until all are established (or failed), then
//!   each sends B bytes of its own pattern, half-closes, and reads the echo
//!   back to EOF. Prints one summary line and exits 0 only if every
//!   connection got exactly its bytes back.
//! - `mc-flows hold --to IP:P --connections N`: opens N connections to an
//!   echo server (at most `--parallel` connects at a time), checks a byte
//!   echoes on each one that opened, prints one line counting them by
//!   outcome (`established`, `refused`, `timed-out`, `failed`) and keeps
//!   them open until its stdin closes.
//! - `mc-flows udp-flows --to IP:P --flows N`: N UDP sockets (N flows),
//!   each sending a datagram to a UDP echo, resent for a few rounds while
//!   unanswered; prints how many were answered.
//! - `mc-flows udp-sizes --to HOST:P --sizes 1400,8000,65000`: one
//!   datagram of each size (random bytes) to a UDP echo, resent up to three
//!   times while unanswered; exits 0 only when each came back whole and
//!   unchanged (a line per size either way).
//! - `mc-flows idle-connections --to IP:P --connections N`: opens N
//!   connections that each send one frame of junk (never a valid
//!   WireGuard message), prints how many opened (and how many were reset
//!   before the connect returned), then waits until the other end has
//!   closed every one that opened; exits 0 only then.
//! - `mc-flows http-every --to HOST:P [--header 'NAME: VALUE'] --every-ms 20`:
//!   starts a new connection with one `GET /` (`Connection: close`) every
//!   20 ms, each on its own task so a slow answer does not delay the next,
//!   until stdin closes; prints one line per request when it ends: `@@
//!   <unix seconds> <status or 0> <seconds taken> <"pod" field or -> <error
//!   or ->`.
//! - `mc-flows line-echo --to HOST:P --every-ms 1000`: one connection to
//!   a line echo (the `db` pod's `cat`), a numbered line every second, each
//!   awaited (however long) before the next: a line `@@ <unix seconds>
//!   <number> <seconds taken>` per answer; `!! <error>` and exit 1 when
//!   the connection fails. Runs until killed.
//! - `mc-flows pf-get --kubeconfig K --pod NS/NAME --port 80 --path /x
//!   --parallel N`: N plain port-forwards (kube-rs, WebSocket through the
//!   API server, as the laptop's kubeconfig says) to the pod's port, one
//!   `GET PATH` on each at once; prints the bytes of body received and
//!   MB/s over the wall time (`@@ <bytes> <MB/s>`): the path burrow's
//!   port-forward transport rides on, without burrow (benchmarks).
//! - `mc-flows soak --to IP:P --bulk 10 --rr 60 --idle 30 --duration-secs
//!   3600`: that many flows to an echo server at once for the duration:
//!   bulk flows send 4 MiB of their own pattern and read it back (verified)
//!   over and over on new connections, request/response flows exchange 64
//!   bytes every 100 ms on one connection, idle flows hold one connection
//!   and exchange a byte every 30 s. Every `--report-secs` and at the end a
//!   line `@@ <seconds> sent=<bytes> received=<bytes> in_flight=<bytes>
//!   errors=<n> exchanges=<n>` (received counts only bytes that came back
//!   as sent); error lines say what failed. Exits 0 only when nothing was
//!   lost or wrong.
//!
//! Must never: talk to anything but the address it is given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Barrier, Semaphore};

#[derive(Debug, Parser)]
#[command(name = "mc-flows")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// GET a path through plain port-forwards to a pod (benchmarks).
    PfGet {
        #[arg(long)]
        kubeconfig: std::path::PathBuf,
        /// NAMESPACE/NAME of the pod.
        #[arg(long)]
        pod: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Echo every TCP connection on 0.0.0.0:PORT.
    EchoServer {
        #[arg(long, env = "PORT")]
        port: u16,
    },
    /// Open connections to an echo server and hold them until stdin
    /// closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        /// Connects in flight at a time.
        #[arg(long, default_value_t = 200)]
        parallel: usize,
        #[arg(long, default_value_t = 30)]
        connect_timeout_secs: u64,
    },
    /// Open N UDP flows to an echo server; count the answered ones.
    UdpFlows {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        flows: usize,
        /// Rounds of resending to the unanswered, 2 s apart.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// One datagram of each size to a UDP echo; each must come back whole.
    UdpSizes {
        /// HOST:PORT (a name is resolved once).
        #[arg(long)]
        to: String,
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
    },
    /// Open connections that never make a valid handshake; wait until the
    /// other end closed them all.
    IdleConnections {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        parallel: usize,
        /// Give up waiting for the closes after this many seconds.
        #[arg(long, default_value_t = 120)]
        limit_secs: u64,
    },
    /// One connection to a line echo, a numbered line every EVERY_MS, each
    /// awaited; a line per answer, until killed or the connection fails.
    LineEcho {
        /// HOST:PORT (a name is resolved once).
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
    },
    /// One HTTP request on a new connection every EVERY_MS until stdin
    /// closes; a line per request.
    HttpEvery {
        /// HOST:PORT, an address or a name (resolved for every request, as
        /// a fresh client would).
        #[arg(long)]
        to: String,
        /// `NAME: VALUE` to send with every request.
        #[arg(long)]
        header: Option<String>,
        #[arg(long, default_value_t = 20)]
        every_ms: u64,
        /// A request not answered within this many seconds fails.
        #[arg(long, default_value_t = 10)]
        limit_secs: u64,
    },
    /// Open many connections to an echo server and check every echo.
    EchoClients {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
        /// Give up (and report what is missing) after this many seconds.
        #[arg(long, default_value_t = 120)]
        limit_secs: u64,
    },
    /// Mixed flows to an echo server for a while (the soak benchmark).
    Soak {
        #[arg(long)]
        to: SocketAddr,
        /// Flows that send and verify bulk data, over and over.
        #[arg(long, default_value_t = 10)]
        bulk: usize,
        /// Flows that exchange a 64-byte request and answer every 100 ms.
        #[arg(long, default_value_t = 60)]
        rr: usize,
        /// Flows that stay open and exchange one byte every 30 s.
        #[arg(long, default_value_t = 30)]
        idle: usize,
        #[arg(long, default_value_t = 3600)]
        duration_secs: u64,
        #[arg(long, default_value_t = 60)]
        report_secs: u64,
    },
}

/// Raises the soft open-files limit to the hard one: every flow is a socket.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn echo_server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding UDP 0.0.0.0:{port}"))?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = conn.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

/// Connection `index`'s bytes: distinct per connection, so crossed streams
/// show up as a mismatch.
fn pattern(index: usize, len: usize) -> Vec<u8> {
    let mut x = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One client: connected (or not) before the barrier, exchange after it.
async fn client(
    index: usize,
    to: SocketAddr,
    bytes: usize,
    all_open: Arc<Barrier>,
    opened_at: Arc<std::sync::OnceLock<Instant>>,
) -> Result<()> {
    let conn = TcpStream::connect(to).await;
    if all_open.wait().await.is_leader() {
        let _ = opened_at.set(Instant::now());
    }
    let mut conn = conn.with_context(|| format!("connection {index}: connect"))?;
    let data = pattern(index, bytes);
    let (mut r, mut w) = conn.split();
    let send = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(bytes);
    let recv = r.read_to_end(&mut back);
    let (sent, received) = tokio::join!(send, recv);
    sent.with_context(|| format!("connection {index}: send"))?;
    received.with_context(|| format!("connection {index}: receive"))?;
    if back != data {
        anyhow::bail!(
            "connection {index}: echoed {} bytes, {} sent; first difference at byte {:?}",
            back.len(),
            data.len(),
            back.iter().zip(&data).position(|(a, b)| a != b)
        );
    }
    Ok(())
}

async fn echo_clients(to: SocketAddr, n: usize, bytes: usize, limit: Duration) -> Result<bool> {
    let start = Instant::now();
    let all_open = Arc::new(Barrier::new(n));
    let opened_at = Arc::new(std::sync::OnceLock::new());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(client(i, to, bytes, all_open.clone(), opened_at.clone()));
    }
    let (mut ok, mut errors) = (0usize, Vec::new());
    let deadline = tokio::time::Instant::now() + limit;
    while ok + errors.len() < n {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(())))) => ok += 1,
            Ok(Some(Ok(Err(e)))) => errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => errors.push(format!("task: {e}")),
            Ok(None) => break,
            Err(_) => {
                errors.push(format!(
                    "{} connections still unfinished after {limit:?}",
                    n - ok - errors.len()
                ));
                break;
            }
        }
    }
    let connected = match opened_at.get() {
        Some(t) => format!("{:.1}s", t.duration_since(start).as_secs_f64()),
        None => "never".into(),
    };
    println!(
        "{ok}/{n} connections exchanged {bytes} bytes each way in {:.1}s (all connects done after {connected})",
        start.elapsed().as_secs_f64()
    );
    for e in errors.iter().take(20) {
        println!("error: {e}");
    }
    if errors.len() > 20 {
        println!("... and {} more errors", errors.len() - 20);
    }
    Ok(ok == n)
}

/// How one connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Established,
    Refused,
    TimedOut,
    Failed,
    /// Accepted by the other end's kernel, then reset before the connect
    /// returned.
    Reset,
}

/// Connect to `to` within `timeout`, at most `parallel` at a time.
async fn connect_limited(
    to: SocketAddr,
    timeout: Duration,
    parallel: Arc<Semaphore>,
) -> (Outcome, Option<TcpStream>, String) {
    let Ok(_permit) = parallel.acquire_owned().await else {
        return (Outcome::Failed, None, "semaphore closed".into());
    };
    match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(Ok(c)) => (Outcome::Established, Some(c), String::new()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            (Outcome::Refused, None, String::new())
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            (Outcome::Reset, None, String::new())
        }
        Ok(Err(e)) => (Outcome::Failed, None, e.to_string()),
        Err(_) => (Outcome::TimedOut, None, String::new()),
    }
}

/// Open `n` connections and run `then` on each that opened; counts by
/// outcome and the connections kept.
async fn open_many<F, Fut>(
    to: SocketAddr,
    n: usize,
    parallel: usize,
    timeout: Duration,
    then: F,
) -> ([usize; 5], Vec<TcpStream>, Vec<String>)
where
    F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>> + Send,
{
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permits = permits.clone();
        let then = then.clone();
        tasks.spawn(async move {
            match connect_limited(to, timeout, permits).await {
                (Outcome::Established, Some(c), _) => match then(c).await {
                    Ok(c) => (Outcome::Established, Some(c), String::new()),
                    Err(e) => (Outcome::Failed, None, format!("after connecting: {e}")),
                },
                other => other,
            }
        });
    }
    let mut counts = [0usize; 5];
    let mut kept = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (outcome, conn, error) =
            r.unwrap_or_else(|e| (Outcome::Failed, None, format!("task: {e}")));
        counts[outcome as usize] += 1;
        kept.extend(conn);
        if !error.is_empty() {
            errors.push(error);
        }
    }
    (counts, kept, errors)
}

/// On stderr: stdout's first line is the summary callers wait for.
fn print_errors(errors: &[String]) {
    for e in errors.iter().take(10) {
        eprintln!("error: {e}");
    }
    if errors.len() > 10 {
        eprintln!("... and {} more errors", errors.len() - 10);
    }
}

async fn hold(to: SocketAddr, n: usize, parallel: usize, timeout: Duration) -> Result<()> {
    let (counts, kept, errors) = open_many(to, n, parallel, timeout, |mut c: TcpStream| async {
        // One byte there and back: the flow really carries data.
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(30), c.read_exact(&mut b))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
        Ok(c)
    })
    .await;
    print_errors(&errors);
    println!(
        "established {} refused {} timed-out {} failed {} reset {}",
        counts[0], counts[1], counts[2], counts[3], counts[4]
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Held until stdin closes.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(kept);
    Ok(())
}

async fn udp_sizes(to: &str, sizes: &[usize]) -> Result<()> {
    let addr = tokio::net::lookup_host(to)
        .await
        .with_context(|| format!("resolving {to}"))?
        .next()
        .with_context(|| format!("{to}: no address"))?;
    let mut failed = Vec::new();
    for &size in sizes {
        let s = UdpSocket::bind(("0.0.0.0", 0))
            .await
            .context("UDP socket")?;
        s.connect(addr).await.context("UDP connect")?;
        let sent: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
        let mut buf = vec![0u8; 70_000];
        let mut outcome = "no answer".to_string();
        for _ in 0..3 {
            s.send(&sent)
                .await
                .with_context(|| format!("sending {size} bytes"))?;
            match tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
                Ok(Ok(n)) if buf[..n] == sent[..] => {
                    outcome = "ok".into();
                    break;
                }
                Ok(Ok(n)) => outcome = format!("came back as {n} different bytes"),
                Ok(Err(e)) => outcome = format!("error {e}"),
                Err(_) => {}
            }
        }
        println!("{size} {outcome}");
        if outcome != "ok" {
            failed.push(size);
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "datagrams of {failed:?} bytes did not come back whole"
    );
    Ok(())
}

async fn udp_flows(to: SocketAddr, n: usize, rounds: usize) -> Result<()> {
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let s = UdpSocket::bind(("0.0.0.0", 0))
            .await
            .with_context(|| format!("UDP socket {i}"))?;
        s.connect(to)
            .await
            .with_context(|| format!("UDP socket {i}"))?;
        sockets.push(Arc::new(s));
    }
    let mut answered = vec![false; n];
    for _ in 0..rounds.max(1) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, s) in sockets.iter().enumerate() {
            if answered[i] {
                continue;
            }
            let s = s.clone();
            tasks.spawn(async move {
                let msg = format!("flow {i}");
                if s.send(msg.as_bytes()).await.is_err() {
                    return None;
                }
                let mut buf = [0u8; 64];
                let got = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await;
                matches!(got, Ok(Ok(len)) if buf[..len] == *msg.as_bytes()).then_some(i)
            });
            // Paced a little: a burst of thousands is the laptop's own
            // queues' business, not the gateway's.
            if i % 256 == 255 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(i)) = r {
                answered[i] = true;
            }
        }
    }
    let count = answered.iter().filter(|a| **a).count();
    println!("answered {count} of {n}");
    Ok(())
}

async fn idle_connections(
    to: SocketAddr,
    n: usize,
    parallel: usize,
    limit: Duration,
) -> Result<bool> {
    // A frame the size of a handshake initiation with junk in it.
    let mut junk = vec![0u8, 148, 1];
    junk.resize(2 + 148, 0x42);
    let junk = Arc::new(junk);
    let (counts, kept, errors) =
        open_many(to, n, parallel, Duration::from_secs(30), move |mut c| {
            let junk = junk.clone();
            async move {
                // A connection reset at once fails here or on the read below:
                // either way, closed by the other end.
                let _ = c.write_all(&junk).await;
                Ok(c)
            }
        })
        .await;
    print_errors(&errors);
    println!(
        "opened {} reset-at-once {} refused {} timed-out {} failed {}",
        counts[0], counts[4], counts[1], counts[2], counts[3]
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    let opened = kept.len();
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in kept {
        tasks.spawn(async move {
            let mut buf = [0u8; 1024];
            // Closed by the other end: end of stream or a reset.
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return start.elapsed(),
                    Ok(_) => {}
                }
            }
        });
    }
    let deadline = tokio::time::Instant::now() + limit;
    let (mut closed, mut at_once, mut last) = (0usize, 0usize, Duration::ZERO);
    while closed < opened {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(after))) => {
                closed += 1;
                if after < Duration::from_secs(1) {
                    at_once += 1;
                }
                last = last.max(after);
            }
            Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
        }
    }
    println!(
        "closed by the other end: {closed} of {opened} ({at_once} within 1 s), the last after {:.1}s",
        last.as_secs_f64()
    );
    Ok(closed == opened && counts[0] + counts[4] == n)
}

/// See the module doc (`http-every`).
async fn http_every(
    to: String,
    header: Option<String>,
    every: Duration,
    limit: Duration,
) -> Result<()> {
    let mut request = format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n");
    if let Some(h) = header {
        request.push_str(&h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let request: Arc<[u8]> = request.into_bytes().into();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut stdin_closed = Box::pin(async {
        let mut sink = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = 0usize;
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut stdin_closed, if !stopping => stopping = true,
            _ = tick.tick(), if !stopping => {
                running += 1;
                let (request, done, to) = (request.clone(), done_tx.clone(), to.clone());
                tokio::spawn(async move {
                    let start = Instant::now();
                    let outcome = tokio::time::timeout(limit, one_get(&to, &request)).await;
                    let took = start.elapsed().as_secs_f64();
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    let line = match outcome {
                        Ok(Ok((status, pod))) => format!("@@ {at:.3} {status} {took:.4} {pod} -"),
                        Ok(Err(e)) => format!("@@ {at:.3} 0 {took:.4} - {}", e.to_string().replace(' ', "_")),
                        Err(_) => format!("@@ {at:.3} 0 {took:.4} - timed_out"),
                    };
                    let _ = done.send(line);
                });
            }
            Some(line) = done_rx.recv() => {
                running -= 1;
                println!("{line}");
                if stopping && running == 0 {
                    return Ok(());
                }
            }
        }
        if stopping && running == 0 {
            return Ok(());
        }
    }
}

/// See the module doc (`line-echo`).
async fn line_echo(to: &str, every: Duration) -> Result<()> {
    let addr = tokio::net::lookup_host(to)
        .await
        .context("resolve")?
        .next()
        .context("resolve: no address")?;
    let s = TcpStream::connect(addr).await.context("connect")?;
    let (rd, mut wr) = s.into_split();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(rd));
    println!("@@ connected {addr}");
    for n in 1u64.. {
        let start = Instant::now();
        wr.write_all(format!("{n}\n").as_bytes())
            .await
            .with_context(|| format!("write {n}"))?;
        let line = lines
            .next_line()
            .await
            .with_context(|| format!("read {n}"))?
            .with_context(|| format!("read {n}: the other end closed"))?;
        anyhow::ensure!(line == n.to_string(), "sent {n}, got back {line:?}");
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        println!("@@ {at:.3} {n} {:.3}", start.elapsed().as_secs_f64());
        tokio::time::sleep(every.saturating_sub(start.elapsed())).await;
    }
    Ok(())
}

/// One request on a new connection: the status and the answer's `"pod"`.
async fn one_get(to: &str, request: &[u8]) -> Result<(u16, String)> {
    // The callers run in a pod and resolve through the cluster's DNS, not
    // burrow: a query lost there (a UDP datagram) is asked again after a
    // second, as a resolver with `options timeout:1` would, rather than
    // after glibc's default 5 s.
    let mut found = None;
    for _ in 0..3 {
        if let Ok(r) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(to)).await
        {
            found = Some(r);
            break;
        }
    }
    let addr = found
        .context("resolve: no answer within 3 tries of 1s")?
        .context("resolve")?
        .next()
        .context("resolve: no address")?;
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.write_all(request).await.context("write")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.context("read")?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let pod = text
        .split("\"pod\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("-")
        .to_string();
    Ok((status, pod))
}

async fn pf_get(
    kubeconfig: &std::path::Path,
    pod: &str,
    port: u16,
    path: &str,
    parallel: usize,
) -> Result<()> {
    let (ns, name) = pod.split_once('/').context("--pod NAMESPACE/NAME")?;
    let config = kube::config::Kubeconfig::read_from(kubeconfig).context("kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .context("kubeconfig")?;
    let client = kube::Client::try_from(config).context("client")?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns);
    let mut forwards = Vec::new();
    for _ in 0..parallel {
        let mut pf = pods
            .portforward(name, &[port])
            .await
            .context("port-forward")?;
        let stream = pf.take_stream(port).context("no stream")?;
        forwards.push((pf, stream));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (pf, mut stream) in forwards {
        let request = format!("GET {path} HTTP/1.1\r\nHost: pf\r\nConnection: close\r\n\r\n");
        tasks.push(tokio::spawn(async move {
            let _pf = pf;
            stream.write_all(request.as_bytes()).await?;
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0usize;
            let mut head = Vec::new();
            let mut body_at = None;
            let mut length = None;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n;
                if body_at.is_none() {
                    head.extend_from_slice(&buf[..n.min(4096)]);
                    body_at = head
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| p + 4);
                    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    length = text
                        .split("content-length:")
                        .nth(1)
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<usize>().ok());
                }
                if let (Some(at), Some(len)) = (body_at, length)
                    && total >= at + len
                {
                    break;
                }
            }
            anyhow::Ok(total - body_at.unwrap_or(total))
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.context("task")??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("@@ {bytes} {:.1}", bytes as f64 / secs / 1e6);
    Ok(())
}

/// The soak's shared counters.
#[derive(Default)]
struct SoakCounts {
    sent: std::sync::atomic::AtomicU64,
    received: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    exchanges: std::sync::atomic::AtomicU64,
}

impl SoakCounts {
    fn add(c: &std::sync::atomic::AtomicU64, n: usize) {
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
    fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        Self::add(&self.errors, 1);
        println!("error: {what}: {e}");
    }
    fn line(&self, at: Duration) {
        let (sent, received) = (Self::get(&self.sent), Self::get(&self.received));
        println!(
            "@@ {} sent={sent} received={received} in_flight={} errors={} exchanges={}",
            at.as_secs(),
            sent.saturating_sub(received),
            Self::get(&self.errors),
            Self::get(&self.exchanges)
        );
    }
}

/// Byte `i` of flow `flow`'s pattern.
fn soak_pattern(flow: usize, i: usize) -> u8 {
    (i.wrapping_mul(31) ^ flow.wrapping_mul(131)) as u8
}

async fn soak(
    to: SocketAddr,
    [bulk, rr, idle]: [usize; 3],
    duration: Duration,
    report: Duration,
) -> bool {
    use std::sync::atomic::Ordering;
    let counts = Arc::new(SoakCounts::default());
    let start = Instant::now();
    let end = tokio::time::Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for f in 0..bulk {
        let c = counts.clone();
        tasks.spawn(async move {
            const BULK: usize = 4 << 20;
            let data: Vec<u8> = (0..BULK).map(|i| soak_pattern(f, i)).collect();
            while tokio::time::Instant::now() < end {
                let r = async {
                    let s = TcpStream::connect(to).await.context("connect")?;
                    let (mut rd, mut wr) = s.into_split();
                    let data = &data;
                    let c2 = c.clone();
                    let write = async move {
                        for chunk in data.chunks(64 << 10) {
                            wr.write_all(chunk).await.context("write")?;
                            SoakCounts::add(&c2.sent, chunk.len());
                        }
                        wr.shutdown().await.context("shutdown")?;
                        anyhow::Ok(())
                    };
                    let read = async {
                        let mut buf = vec![0u8; 64 << 10];
                        let mut at = 0;
                        loop {
                            let n = rd.read(&mut buf).await.context("read")?;
                            if n == 0 {
                                break;
                            }
                            if buf[..n] != data[at..(at + n).min(BULK)] {
                                anyhow::bail!("bulk flow {f}: bytes {at}..{} differ", at + n);
                            }
                            at += n;
                            SoakCounts::add(&c.received, n);
                        }
                        anyhow::ensure!(
                            at == BULK,
                            "bulk flow {f}: {at} of {BULK} bytes came back"
                        );
                        anyhow::Ok(())
                    };
                    tokio::try_join!(write, read)?;
                    anyhow::Ok(())
                }
                .await;
                match r {
                    Ok(()) => SoakCounts::add(&c.exchanges, 1),
                    Err(e) => {
                        c.error("bulk", format!("{e:#}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
    let steady = |f: usize, every: Duration, len: usize, c: Arc<SoakCounts>| async move {
        let mut conn: Option<TcpStream> = None;
        let mut round = 0usize;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while tokio::time::Instant::now() < end {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(end) => break,
            }
            let r = async {
                if conn.is_none() {
                    conn = Some(TcpStream::connect(to).await.context("connect")?);
                }
                let Some(s) = conn.as_mut() else {
                    unreachable!()
                };
                let msg: Vec<u8> = (0..len).map(|i| soak_pattern(f, round * len + i)).collect();
                s.write_all(&msg).await.context("write")?;
                SoakCounts::add(&c.sent, len);
                let mut back = vec![0u8; len];
                tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
                    .await
                    .context("no answer in 30 s")?
                    .context("read")?;
                anyhow::ensure!(back == msg, "flow {f}: answer differs");
                SoakCounts::add(&c.received, len);
                anyhow::Ok(())
            }
            .await;
            round += 1;
            match r {
                Ok(()) => SoakCounts::add(&c.exchanges, 1),
                Err(e) => {
                    conn = None;
                    c.error("request/response", format!("{e:#}"));
                }
            }
        }
    };
    for f in 0..rr {
        tasks.spawn(steady(
            bulk + f,
            Duration::from_millis(100),
            64,
            counts.clone(),
        ));
    }
    for f in 0..idle {
        tasks.spawn(steady(
            bulk + rr + f,
            Duration::from_secs(30),
            1,
            counts.clone(),
        ));
    }
    let reporter = {
        let c = counts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(report);
            tick.tick().await;
            loop {
                tick.tick().await;
                c.line(start.elapsed());
            }
        })
    };
    while tasks.join_next().await.is_some() {}
    reporter.abort();
    counts.line(start.elapsed());
    let (sent, received) = (
        counts.sent.load(Ordering::Relaxed),
        counts.received.load(Ordering::Relaxed),
    );
    counts.errors.load(Ordering::Relaxed) == 0 && sent == received
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile();
    match cli.command {
        Cmd::PfGet {
            kubeconfig,
            pod,
            port,
            path,
            parallel,
        } => pf_get(&kubeconfig, &pod, port, &path, parallel).await,
        Cmd::EchoServer { port } => echo_server(port).await,
        Cmd::Hold {
            to,
            connections,
            parallel,
            connect_timeout_secs,
        } => {
            hold(
                to,
                connections,
                parallel,
                Duration::from_secs(connect_timeout_secs),
            )
            .await
        }
        Cmd::UdpFlows { to, flows, rounds } => udp_flows(to, flows, rounds).await,
        Cmd::UdpSizes { to, sizes } => udp_sizes(&to, &sizes).await,
        Cmd::LineEcho { to, every_ms } => {
            if let Err(e) = line_echo(&to, Duration::from_millis(every_ms)).await {
                println!("!! {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::IdleConnections {
            to,
            connections,
            parallel,
            limit_secs,
        } => {
            let all = idle_connections(to, connections, parallel, Duration::from_secs(limit_secs))
                .await?;
            std::process::exit(if all { 0 } else { 1 });
        }
        Cmd::HttpEvery {
            to,
            header,
            every_ms,
            limit_secs,
        } => {
            http_every(
                to,
                header,
                Duration::from_millis(every_ms),
                Duration::from_secs(limit_secs),
            )
            .await
        }
        Cmd::Soak {
            to,
            bulk,
            rr,
            idle,
            duration_secs,
            report_secs,
        } => {
            let clean = soak(
                to,
                [bulk, rr, idle],
                Duration::from_secs(duration_secs),
                Duration::from_secs(report_secs),
            )
            .await;
            std::process::exit(if clean { 0 } else { 1 });
        }
        Cmd::EchoClients {
            to,
            connections,
            bytes,
            limit_secs,
        } => {
            let all = echo_clients(to, connections, bytes, Duration::from_secs(limit_secs)).await?;
            std::process::exit(if all { 0 } else { 1 });
        }
    }
}
