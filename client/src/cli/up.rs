//! `burrow up --wg-config FILE`: a WireGuard tunnel from a wg-quick style
//! file, in the foreground or (`-d`) as a detached copy of itself.
//!
//! Order of work, so that a refusal changes nothing and a crash leaves a
//! record: parse and plan (errors name file and line) → clean up after a
//! killed predecessor → check the device name and the routes → bind the UDP
//! socket → write the state file → create the device, configure it, add
//! routes → run the data path until SIGINT/SIGTERM/SIGHUP → delete routes
//! and device → remove the state file. Setup failures after the state file
//! run the same teardown.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use burrow_netstack::wgconf::{self, Endpoint, WgConf};
use clap::Args;

use crate::Global;
use crate::tunnel::datapath::{Datapath, bind_udp};
use crate::tunnel::links::{LinkEvent, Links, link_addr};
use crate::tunnel::netlink::Netlink;
use crate::tunnel::plan::Plan;
use crate::tunnel::state::{self, Paths, Previous};
use crate::tunnel::tun::{DEFAULT_IFNAME, TunError, parse_ifname};
use crate::tunnel::{Device, Layout, Refusal, check_free};

/// How long `up -d` waits for the background tunnel to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const LONG_ABOUT: &str = "\
Start a WireGuard tunnel from a configuration file in wg-quick's format, in
userspace (no kernel WireGuard, no wg-quick): burrow creates a TUN device, gives
it the configured addresses and MTU, routes every AllowedIPs prefix to it, and
moves packets until SIGINT or SIGTERM, then removes the device and its routes.
Needs root, for the TUN device and the routes.

Example configuration:

  [Interface]
  PrivateKey = <this machine's key, e.g. from `wg genkey`>
  Address = 100.64.0.2/32          # one or more, comma separated, CIDR
  MTU = 1420                       # optional, default 1420
  ListenPort = 51820               # optional, default any free port

  [Peer]
  PublicKey = <the gateway's public key>
  PresharedKey = <base64>          # optional
  Endpoint = gw.example.com:51820  # or 192.0.2.1:51820 or [2001:db8::1]:51820
  AllowedIPs = 10.96.0.0/12, 10.244.0.0/16
  PersistentKeepalive = 25         # optional, seconds

Several [Peer] sections may be given: a packet goes to the peer whose AllowedIPs
match its destination most specifically, and a peer's packets are accepted only
from its AllowedIPs. DNS is accepted and ignored (the system resolver is left
alone), as are wg-quick's Table, PreUp, PostUp, PreDown, PostDown, SaveConfig
and FwMark.

Routes: one per AllowedIPs prefix, through the device. A prefix that covers a
peer's own Endpoint gets no route (it would loop). 0.0.0.0/0 and ::/0 (a full
tunnel) are refused, and so is a prefix that duplicates or overlaps a route that
already exists (default routes aside).

The device is named burrow0 unless --name says otherwise; unlike wg-quick the
name does not come from the file name, so `burrow down` needs no file.

Crash safety: <run dir>/up-<name>.json records what was changed before it is
changed. If burrow up is killed, the next `burrow up` or `burrow down` on that
name removes whatever is left and says so.";

/// Start a WireGuard tunnel from a wg-quick style configuration file.
#[derive(Args, Debug)]
#[command(long_about = LONG_ABOUT)]
pub struct UpArgs {
    /// WireGuard configuration file in wg-quick's format (`--help` shows an
    /// example).
    #[arg(long, value_name = "FILE")]
    wg_config: PathBuf,
    /// Name of the TUN device to create.
    #[arg(long, value_name = "IFNAME", default_value = DEFAULT_IFNAME, value_parser = parse_ifname)]
    name: String,
    /// Run in the background: start a detached `burrow up`, wait until the
    /// tunnel is up, print where its log is, and return. Stop it with
    /// `burrow down`.
    #[arg(short = 'd', long)]
    background: bool,
    /// Reach the peer's Endpoint over N TCP connections carrying
    /// length-framed WireGuard datagrams (burrow-gateway's framed port,
    /// what a port-forward reaches) instead of UDP; one peer only.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    framed_streams: Option<u8>,
}

pub fn run(args: UpArgs, global: &Global) -> anyhow::Result<()> {
    crate::require_root("up", "it creates a TUN device and routes")?;
    // Framed streams are pumped by tasks of their own: give them a thread.
    let runtime = match args.framed_streams {
        Some(_) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(up(args, global))
}

async fn up(args: UpArgs, global: &Global) -> anyhow::Result<()> {
    let conf = wgconf::load(&args.wg_config)?;
    let endpoints = resolve_endpoints(&conf).await?;
    let plan = Plan::new(&conf, &endpoints)?;
    let paths = Paths::new(&global.run_dir, &args.name);
    let nl = Netlink::connect()?;
    take_over(&nl, &paths, &args.name).await?;
    if args.background {
        return start_background(&args, global, &paths).await;
    }
    let shutdown = Shutdown::install()?;
    for note in &plan.notes {
        tracing::warn!("{note}");
    }
    let framed = match args.framed_streams {
        None => None,
        Some(n) => {
            let [peer] = plan.peers.as_slice() else {
                anyhow::bail!("--framed-streams takes a configuration with exactly one [Peer]");
            };
            let to = peer.endpoint.with_context(|| {
                format!(
                    "--framed-streams: the [Peer] in {} has no Endpoint",
                    conf.file.display()
                )
            })?;
            Some((to, usize::from(n)))
        }
    };
    foreground(&nl, conf, plan, &paths, &args.name, shutdown, framed).await
}

/// `--framed-streams`: `n` TCP connections to `to` feeding the data path's
/// links, each reopened (after 1 s) when it breaks.
fn start_framed(
    to: SocketAddr,
    n: usize,
) -> (
    std::sync::Arc<Links>,
    tokio::sync::mpsc::Receiver<LinkEvent>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let links = std::sync::Arc::new(Links::new(n, &[]));
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    for i in 0..links.count() {
        let (links, tx) = (links.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let stream = match tokio::net::TcpStream::connect(to).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(stream = i, "framed connection to {to}: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (mut rd, mut wr) = stream.into_split();
                links.set_live(i, true);
                if tx.send(LinkEvent::Opened(i)).await.is_err() {
                    return;
                }
                let up = async {
                    while let Some(batch) = links.take(i).await {
                        wr.write_all(&batch).await?;
                    }
                    Err(std::io::Error::other(
                        "it went out of step (a frame burrow cannot read)",
                    ))
                };
                let down = async {
                    loop {
                        let mut buf = bytes::BytesMut::with_capacity(64 << 10);
                        if rd.read_buf(&mut buf).await? == 0 {
                            return std::io::Result::Ok(());
                        }
                        if tx.send(LinkEvent::Data(i, buf.freeze())).await.is_err() {
                            return Ok(());
                        }
                    }
                };
                let r = tokio::select! { r = up => r, r = down => r };
                tracing::warn!(stream = i, "framed connection ended: {r:?}");
                links.set_live(i, false);
                let _ = tx.send(LinkEvent::Closed(i)).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    (links, rx)
}

/// Resolve every peer's `Endpoint` (names through the system resolver).
async fn resolve_endpoints(conf: &WgConf) -> anyhow::Result<Vec<Option<SocketAddr>>> {
    let mut out = Vec::with_capacity(conf.peers.len());
    for p in &conf.peers {
        let Some(endpoint) = &p.endpoint else {
            out.push(None);
            continue;
        };
        let addr = match &endpoint.value {
            Endpoint::Addr(a) => *a,
            Endpoint::Name { host, port } => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| conf.error(endpoint.line, format!("cannot resolve {host}: {e}")))?
                .next()
                .ok_or_else(|| conf.error(endpoint.line, format!("{host} has no address")))?,
        };
        out.push(Some(addr));
    }
    Ok(out)
}

/// Refuse if a `burrow up` already runs on this name; clean up after one
/// that was killed.
async fn take_over(nl: &Netlink, paths: &Paths, name: &str) -> anyhow::Result<()> {
    match state::inspect(paths)? {
        Previous::None => {}
        Previous::Running(st) => anyhow::bail!(
            "`burrow up` is already running on {name} (pid {}); stop it with `sudo burrow down{}`",
            st.pid,
            name_flag(name)
        ),
        Previous::Stale(st) => tracing::warn!("{}", state::clean_stale(nl, &st, paths).await?),
        Previous::Unreadable(why) => tracing::warn!("{}", state::clean_unreadable(paths, &why)?),
    }
    Ok(())
}

/// ` --name X` unless X is the default.
pub fn name_flag(name: &str) -> String {
    if name == DEFAULT_IFNAME {
        String::new()
    } else {
        format!(" --name {name}")
    }
}

async fn foreground(
    nl: &Netlink,
    conf: WgConf,
    plan: Plan,
    paths: &Paths,
    name: &str,
    shutdown: Shutdown,
    framed: Option<(SocketAddr, usize)>,
) -> anyhow::Result<()> {
    let mut plan = plan;
    // Refusals first: nothing is changed yet.
    match check_free(nl, name, &plan.routes).await? {
        None => {}
        Some(Refusal::NameInUse) => return Err(TunError::NameInUse(name.to_owned()).into()),
        Some(Refusal::Overlap { ours, theirs }) => anyhow::bail!(
            "refusing to add route {ours} dev {name}: it overlaps the existing route `{theirs}`; \
             remove that route, or leave {ours} out of AllowedIPs in {}",
            conf.file.display()
        ),
    }
    let udp = bind_udp(plan.listen_port.unwrap_or(0)).with_context(|| match plan.listen_port {
        Some(p) => format!(
            "cannot bind UDP port {p} (ListenPort in {})",
            conf.file.display()
        ),
        None => "cannot bind a UDP port".to_owned(),
    })?;
    let config_path = std::fs::canonicalize(&conf.file).unwrap_or_else(|_| conf.file.clone());
    let layout = Layout {
        name,
        mtu: plan.mtu,
        addresses: &plan.addresses,
        routes: &plan.routes,
        config: config_path,
    };
    let (mut device, tun) = Device::bring_up(nl, paths, layout).await?;

    let result = async {
        let index = device.index();
        let udp_port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
        if framed.is_some()
            && let Some(peer) = plan.peers.first_mut()
        {
            peer.endpoint = Some(link_addr(0));
        }
        let mut datapath = Datapath::new(
            conf.interface.private_key.clone(),
            plan.peers,
            tun,
            udp,
            plan.mtu,
        )
        .with_context(|| format!("invalid peers in {}", conf.file.display()))?;
        if let Some((to, n)) = framed {
            let (links, events) = start_framed(to, n);
            datapath = datapath.with_links(links, events);
        }
        device.set_ready()?;
        tracing::info!(
            device = name,
            addresses = %join(&plan.addresses),
            routes = %join(&plan.routes),
            mtu = plan.mtu,
            udp_port,
            "tunnel is up"
        );
        let deleted = std::cell::Cell::new(false);
        let stop = async {
            tokio::select! {
                () = shutdown.wait() => {}
                () = device_deleted(nl, index, name) => deleted.set(true),
            }
        };
        let counters = datapath
            .run(stop)
            .await
            .with_context(|| format!("device {name} failed"))?;
        tracing::info!(?counters, "tunnel stopping");
        if deleted.get() {
            anyhow::bail!("device {name} was deleted while the tunnel ran; stopped");
        }
        anyhow::Ok(())
    }
    .await;
    // The device is closed by now (dropped with the data path), which takes
    // its routes with it; teardown makes sure and removes the state file.
    let cleanup = device.tear_down(nl).await;
    match (result, cleanup) {
        (Ok(()), Ok(())) => {
            tracing::info!(
                device = name,
                "removed the device, its routes and the state file"
            );
            Ok(())
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c),
        (Err(e), Err(c)) => Err(anyhow::anyhow!("{e:#}; and cleaning up failed too: {c:#}")),
    }
}

fn join(nets: &[ipnet::IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves once link `index` is no longer `name` (someone deleted it: a
/// TUN reader is not woken by that).
async fn device_deleted(nl: &Netlink, index: u32, name: &str) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(current) = nl.link_name(index).await
            && current.as_deref() != Some(name)
        {
            return;
        }
    }
}

/// SIGINT, SIGTERM or SIGHUP, installed before any change so that none of
/// them can end the process between a change and its undoing.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| signal(kind).context("cannot install signal handlers");
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = self.hup.recv() => tracing::info!("SIGHUP: shutting down"),
        }
    }
}

/// Start a detached `burrow up` (same options, no `-d`), its output appended
/// to the log, and wait until its state file says the tunnel is ready.
async fn start_background(args: &UpArgs, global: &Global, paths: &Paths) -> anyhow::Result<()> {
    paths.ensure_dir()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("cannot open the log {}", paths.log.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the burrow executable")?;
    // The daemon runs in `/`: every path it gets is absolute.
    let config = std::fs::canonicalize(&args.wg_config)
        .with_context(|| format!("cannot read {}", args.wg_config.display()))?;
    let run_dir = std::fs::canonicalize(&global.run_dir)
        .with_context(|| format!("cannot read {}", global.run_dir.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up")
        .arg("--wg-config")
        .arg(&config)
        .arg("--name")
        .arg(&args.name);
    if let Some(n) = args.framed_streams {
        cmd.arg("--framed-streams").arg(n.to_string());
    }
    cmd.arg("--run-dir")
        .arg(&run_dir)
        .arg("--log-format")
        .arg(global.log_format.as_arg());
    for _ in 0..global.verbose {
        cmd.arg("-v");
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log")?)
        .stderr(log)
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            // A session of its own: no controlling terminal, no SIGHUP or
            // SIGINT when the terminal that started it goes away.
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .context("cannot start the background burrow up")?;
    let pid = child.id();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child
            .try_wait()
            .context("cannot watch the background burrow up")?
        {
            anyhow::bail!(
                "the background `burrow up` exited ({status}): {}\n(log: {})",
                last_error(&paths.log, log_start),
                paths.log.display()
            );
        }
        if let Previous::Running(st) = state::inspect(paths)?
            && st.pid == pid
            && st.ready
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            anyhow::bail!(
                "the background `burrow up` (pid {pid}) was not up after {}s; stopped it (log: {})",
                READY_TIMEOUT.as_secs(),
                paths.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{} is up in the background (pid {pid}); log: {}; stop it with `sudo burrow down{}`",
        args.name,
        paths.log.display(),
        name_flag(&args.name)
    );
    Ok(())
}

/// The error line the daemon printed (after `from`), else its last lines.
fn last_error(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(line) = lines.iter().rev().find(|l| l.starts_with("burrow: ")) {
        return line.trim_start_matches("burrow: ").to_owned();
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    if tail.is_empty() {
        "it printed nothing".to_owned()
    } else {
        tail.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_finds_the_error_line_after_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("up.log");
        std::fs::write(
            &log,
            "burrow: old error\nINFO starting\nburrow: wg0.conf:3: bad key\n",
        )
        .expect("write");
        assert_eq!(last_error(&log, 0), "wg0.conf:3: bad key");
        std::fs::write(&log, "burrow: old error\nline a\nline b\n").expect("write");
        assert_eq!(last_error(&log, 18), "line a\nline b");
        assert_eq!(
            last_error(&dir.path().join("nope"), 0),
            "it printed nothing"
        );
    }

    #[test]
    fn name_flag_only_when_not_default() {
        assert_eq!(name_flag(DEFAULT_IFNAME), "");
        assert_eq!(name_flag("wg7"), " --name wg7");
    }
}
