//! mc-flows: many TCP flows at once, for the end-to-end tests of the data
//! path.
//!
//! - `mc-flows echo-server --port P`: a TCP echo server (runs in a pod):
//!   writes back everything it reads, and shuts its side down when the
//!   client does.
//! - `mc-flows echo-clients --to IP:P --connections N --bytes B`: opens N
//!   connections at once, waits until all are established (or failed), then
//!   each sends B bytes of its own pattern, half-closes, and reads the echo
//!   back to EOF. Prints one summary line and exits 0 only if every
//!   connection got exactly its bytes back.
//!
//! Must never: talk to anything but the address it is given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

#[derive(Debug, Parser)]
#[command(name = "mc-flows")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo every TCP connection on 0.0.0.0:PORT.
    EchoServer {
        #[arg(long, env = "PORT")]
        port: u16,
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile();
    match cli.command {
        Cmd::EchoServer { port } => echo_server(port).await,
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
