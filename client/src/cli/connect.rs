//! The CLI side of `connect`, `status`, `disconnect`, `daemon`, `install`
//! and `uninstall`: starts the daemon when needed, sends it one request
//! over its socket and prints the replies as they arrive.
//!
//! The daemon is `burrow daemon` detached (`setsid`, log
//! `<run dir>/daemon.log`) unless one answers on the socket; the request
//! carries the CLI's resolved kubeconfig path (the daemon's environment
//! differs). A connect that fails stops the daemon it started.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use burrow_deploy::Target;
use burrow_deploy::install::{self, DEFAULT_NAMESPACE, InstallOptions};
use clap::{Args, ValueEnum};
use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::Global;
use crate::daemon;
use crate::progress::Steps;
use crate::protocol::{ConnectRequest, Reply, Request, Status, Transport, socket_path};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Which cluster: kubectl's flags.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: KUBECONFIG, else ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, value_name = "NAME")]
    pub(crate) context: Option<String>,
    /// Namespace you work in (default: the context's).
    #[arg(short = 'n', long, value_name = "NS")]
    pub(crate) namespace: Option<String>,
    /// Namespace of the gateway.
    #[arg(long, value_name = "NS", default_value = DEFAULT_NAMESPACE)]
    gateway_namespace: String,
}

impl ClusterArgs {
    /// The kubeconfig to hand to the daemon, whose environment differs:
    /// `--kubeconfig`, else None (see `kubeconfig_list`).
    fn kubeconfig(&self) -> Option<PathBuf> {
        self.kubeconfig
            .as_ref()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
    }

    /// Without `--kubeconfig`: every file KUBECONFIG names, absolute, for
    /// the daemon to merge as kubectl does (empty: the daemon's default).
    fn kubeconfig_list(&self) -> Vec<PathBuf> {
        if self.kubeconfig.is_some() {
            return Vec::new();
        }
        let Some(list) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
            return Vec::new();
        };
        std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
            .collect()
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            kubeconfig: self.kubeconfig.clone(),
            kubeconfig_list: Vec::new(),
            context: self.context.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

/// Connect this machine to a cluster's network (starts the daemon).
#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// How WireGuard reaches the gateway: direct UDP to its NodePort (or
    /// --endpoint), through the API server (port-forward), or UDP when it
    /// answers within 1.5 s, else port-forward. A gateway that just started
    /// gets longer, for kube-proxy to route its NodePort: up to 6 s with
    /// auto, 20 s with udp.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Reach the gateway's WireGuard UDP port at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<String>,
    /// With the port-forward transport, open N streams through the API
    /// server and spread connections over them (one slow download does not
    /// hold up the others).
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    port_forward_streams: u8,
    /// Route this range into the cluster too.
    #[arg(long, value_name = "CIDR")]
    include: Vec<IpNet>,
    /// Do not route this range into the cluster (e.g. it collides with a
    /// network of this machine).
    #[arg(long, value_name = "CIDR")]
    exclude: Vec<IpNet>,
    /// Refuse, rather than install the gateway, when it is missing.
    #[arg(long)]
    no_install: bool,
    /// Keep the installed gateway even when its version differs.
    #[arg(long)]
    no_upgrade: bool,
    /// Cluster names on this machine: a DNS stub the system resolver
    /// points at (systemd-resolved split DNS, else /etc/resolv.conf), or
    /// `off` to leave the resolver configuration alone.
    #[arg(long, value_enum, default_value_t = crate::dns::DnsSetting::Auto)]
    dns: crate::dns::DnsSetting,
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Show the connection.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Disconnect: unregister, remove the device and routes, stop the daemon.
#[derive(Args, Debug)]
pub struct DisconnectArgs {}

/// Run the daemon in the foreground (for systemd).
#[derive(Args, Debug)]
pub struct DaemonArgs {}

/// Install (or upgrade) the gateway in the cluster, with its
/// NetworkPolicy and the roles developers need (bound by you: the output
/// says how).
#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Let pods of namespace NS scrape the gateway's metrics (port 9090)
    /// besides the gateway's own namespace; `--metrics-namespace ''`
    /// admits none. Without it, an upgrade keeps what the installed
    /// NetworkPolicy admits (none on a fresh install).
    #[arg(long, value_name = "NS")]
    metrics_namespace: Option<String>,
}

/// Remove the gateway and everything burrow created in the cluster.
#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run_daemon(_args: DaemonArgs, global: &Global) -> anyhow::Result<()> {
    crate::require_root("daemon", "it creates a TUN device and routes")?;
    runtime()?.block_on(daemon::serve(global.run_dir.clone()))
}

pub fn run_connect(args: ConnectArgs, global: &Global) -> anyhow::Result<()> {
    crate::require_root(
        "connect",
        "its daemon creates a TUN device and routes to the cluster",
    )?;
    let req = ConnectRequest {
        kubeconfig: args.cluster.kubeconfig(),
        kubeconfig_list: args.cluster.kubeconfig_list(),
        context: args.cluster.context.clone(),
        namespace: args.cluster.namespace.clone(),
        gateway_namespace: args.cluster.gateway_namespace.clone(),
        transport: args.transport,
        endpoint: args.endpoint,
        streams: Some(usize::from(args.port_forward_streams)),
        include: args.include,
        exclude: args.exclude,
        no_install: args.no_install,
        no_upgrade: args.no_upgrade,
        dns: args.dns,
    };
    runtime()?.block_on(async {
        let (conn, started) = ensure_daemon(global).await?;
        let status = match exchange(conn, &Request::Connect(req), args.output == Output::Text).await
        {
            Ok(status) => status,
            Err(e) => {
                stop_started(global, started).await;
                return Err(e);
            }
        };
        if args.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        Ok(())
    })
}

pub fn run_status(args: StatusArgs, global: &Global) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let status = match UnixStream::connect(socket_path(&global.run_dir)).await {
            Ok(conn) => exchange(conn, &Request::Status, false).await?,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                crate::require_root("status", "the daemon's socket is root-only")?;
                return Err(e.into());
            }
            Err(_) => Status::default(),
        };
        match args.output {
            Output::Json if !status.connected => println!(r#"{{"connected": false}}"#),
            Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
            Output::Text => print_status(&status),
        }
        Ok(())
    })
}

pub fn run_disconnect(_args: DisconnectArgs, global: &Global) -> anyhow::Result<()> {
    crate::require_root("disconnect", "it removes the TUN device and routes")?;
    runtime()?.block_on(async {
        let sock = socket_path(&global.run_dir);
        match UnixStream::connect(&sock).await {
            Ok(conn) => {
                // Who answers on the socket: the daemon, whose end this
                // command waits for.
                let daemon = conn.peer_cred().ok().and_then(|c| c.pid());
                exchange(conn, &Request::Disconnect, true).await?;
                // The daemon exits after answering: wait for its socket to
                // go, and for the process itself.
                let deadline = Instant::now() + Duration::from_secs(5);
                while (sock.exists() || daemon.is_some_and(process_alive))
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                println!("disconnected");
            }
            Err(_) => {
                let _ = std::fs::remove_file(&sock);
                let nl = crate::tunnel::netlink::Netlink::connect()?;
                match daemon::cleanup_stale(&nl, &global.run_dir).await? {
                    Some(note) => println!("{note}"),
                    None => println!("not connected"),
                }
            }
        }
        Ok(())
    })
}

pub fn run_install(args: InstallArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let cluster = args.cluster.target().resolve().await?;
        cluster.check_reachable().await?;
        let ns = &args.cluster.gateway_namespace;
        match install::find(&cluster, ns).await? {
            Some(f) if f.version == install::VERSION => {
                println!(
                    "the gateway {} is installed in {ns}; re-applying",
                    f.version
                )
            }
            Some(f) => println!(
                "upgrading the gateway in {ns} from {} to {}",
                f.version,
                install::VERSION
            ),
            None => println!("installing the gateway {} in {ns}", install::VERSION),
        }
        let opts = InstallOptions {
            namespace: ns.clone(),
            metrics_namespace: args.metrics_namespace.clone(),
            ..Default::default()
        };
        let steps = std::sync::Mutex::new(Steps::new(false));
        let progress = |s: &str| {
            if let Ok(mut steps) = steps.lock() {
                steps.step(s);
            }
        };
        let ready = async {
            install::apply(&cluster, &opts, &progress).await?;
            install::wait_ready(
                &cluster,
                ns,
                install::VERSION,
                Duration::from_secs(120),
                &progress,
            )
            .await
        }
        .await;
        if let Ok(mut steps) = steps.lock() {
            steps.finish(ready.is_ok());
        }
        let pod = ready?;
        println!("the gateway is ready: pod {} ({})", pod.name, pod.ip);
        println!();
        println!("{}", install::binding_instructions(ns));
        Ok(())
    })
}

pub fn run_uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let cluster = args.cluster.target().resolve().await?;
        cluster.check_reachable().await?;
        let ns = &args.cluster.gateway_namespace;
        let steps = std::sync::Mutex::new(Steps::new(false));
        let progress = |s: &str| {
            if let Ok(mut steps) = steps.lock() {
                steps.step(s);
            }
        };
        // Give back every rerouted Service before the gateway goes.
        let done = async {
            burrow_deploy::reroute::restore_all(&cluster, &progress).await?;
            install::uninstall(&cluster, ns, &progress).await
        }
        .await;
        if let Ok(mut steps) = steps.lock() {
            steps.finish(done.is_ok());
        }
        done?;
        println!("removed the gateway and namespace {ns}");
        let left = install::user_bindings(&cluster).await;
        if !left.is_empty() {
            println!(
                "bindings made for burrow's roles are left (they grant nothing without the roles); to remove them:"
            );
            for line in left {
                println!("  {line}");
            }
        }
        Ok(())
    })
}

/// Connect to the daemon, starting it (detached, log in the run dir) if
/// none answers.
async fn ensure_daemon(
    global: &Global,
) -> anyhow::Result<(UnixStream, Option<std::process::Child>)> {
    let sock = socket_path(&global.run_dir);
    if let Ok(c) = UnixStream::connect(&sock).await {
        return Ok((c, None));
    }
    std::fs::create_dir_all(&global.run_dir)
        .with_context(|| format!("cannot create {}", global.run_dir.display()))?;
    let run_dir = std::fs::canonicalize(&global.run_dir)?;
    let log_path = run_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the burrow executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--log-format")
        .arg(global.log_format.as_arg());
    for _ in 0..global.verbose {
        cmd.arg("-v");
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().context("cannot start the burrow daemon")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(c) = UnixStream::connect(&sock).await {
            return Ok((c, Some(child)));
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the burrow daemon exited ({status}); see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the burrow daemon did not open {} within 10s; see {}",
                sock.display(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The running daemon's socket; fails when none runs (not connected).
pub(crate) async fn daemon_conn(global: &Global) -> anyhow::Result<UnixStream> {
    let sock = socket_path(&global.run_dir);
    UnixStream::connect(&sock).await.with_context(|| {
        format!(
            "not connected (no daemon on {}): run `burrow connect` first",
            sock.display()
        )
    })
}

/// `burrow connect` with default options unless connected already; its
/// progress is shown.
pub(crate) async fn connect_quietly(cluster: &ClusterArgs, global: &Global) -> anyhow::Result<()> {
    let req = ConnectRequest {
        kubeconfig: cluster.kubeconfig(),
        kubeconfig_list: cluster.kubeconfig_list(),
        context: cluster.context.clone(),
        namespace: cluster.namespace.clone(),
        gateway_namespace: cluster.gateway_namespace.clone(),
        transport: Transport::Auto,
        endpoint: None,
        streams: None,
        include: Vec::new(),
        exclude: Vec::new(),
        no_install: false,
        no_upgrade: false,
        dns: crate::dns::DnsSetting::Auto,
    };
    let (conn, started) = ensure_daemon(global).await?;
    if let Err(e) = exchange(conn, &Request::Connect(req), false).await {
        stop_started(global, started).await;
        return Err(e);
    }
    Ok(())
}

/// A connect failed: the daemon started for it (if this connect started
/// one) has nothing to do. Stop it and wait until it has exited (killed
/// after 5 s), so a failed connect leaves nothing running.
/// Whether process `pid` still runs (a zombie has finished).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn stop_started(global: &Global, started: Option<std::process::Child>) {
    let Some(mut child) = started else { return };
    if let Ok(conn) = UnixStream::connect(socket_path(&global.run_dir)).await {
        let _ = exchange(conn, &Request::Disconnect, false).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("the daemon started for this connect did not stop; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Send one request; print progress (when `show`) until done; the done
/// message.
pub(crate) async fn exchange_message(
    conn: UnixStream,
    req: &Request,
    show: bool,
) -> anyhow::Result<String> {
    let (rd, mut wr) = conn.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Reply>(&line)? {
            Reply::Progress { step } => {
                if show {
                    eprintln!("{step}");
                }
            }
            Reply::Done { message, .. } => return Ok(message),
            Reply::Error { message } => anyhow::bail!("{message}"),
        }
    }
    anyhow::bail!("the daemon closed the connection without an answer")
}

/// Send one request; print progress (when `show`) until done.
pub(crate) async fn exchange(
    conn: UnixStream,
    req: &Request,
    show: bool,
) -> anyhow::Result<Status> {
    let (rd, mut wr) = conn.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let mut steps = Steps::new(!show);
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<Reply>(&line)? {
            Reply::Progress { step } => steps.step(&step),
            Reply::Done { status, .. } => {
                steps.finish(true);
                return Ok(status.map(|s| *s).unwrap_or_default());
            }
            Reply::Error { message } => {
                steps.finish(false);
                anyhow::bail!("{message}")
            }
        }
    }
    steps.finish(false);
    anyhow::bail!("the daemon closed the connection without an answer")
}

fn print_status(s: &Status) {
    if !s.connected {
        println!("not connected");
        return;
    }
    let age = s
        .handshake_age_secs
        .map(|a| format!("{a:.0}s ago"))
        .unwrap_or_else(|| "never".into());
    println!("connected to {} (context {})", s.server, s.context);
    println!("  namespace:      {}", s.namespace);
    println!(
        "  gateway:        {} in {} (pod {}, {})",
        s.gateway_version, s.gateway_namespace, s.gateway_pod, s.gateway_pod_ip
    );
    println!(
        "  transport:      {} to {} ({})",
        s.transport, s.endpoint, s.transport_reason
    );
    println!("  device:         {} {}", s.device, s.tunnel_address);
    println!("  routes:         {}", s.routes.join(", "));
    println!(
        "  cluster DNS:    {} ({}); {}",
        s.dns_servers.join(", "),
        s.cluster_domain,
        s.dns
    );
    if let Some(d) = &s.dns_stub {
        println!(
            "  DNS stub:       {} on {} (cache {} hits, {} misses; {} refused, {} malformed, {} failed)",
            d.mode, d.stub, d.hits, d.misses, d.refused, d.malformed, d.failures
        );
        if !d.upstreams.is_empty() {
            println!("  other names:    {}", d.upstreams.join(", "));
        }
        println!("  namespaces:     {}", d.namespaces);
    }
    println!("  handshake:      {age}");
    println!(
        "  bytes:          {} sent, {} received",
        s.tx_bytes, s.rx_bytes
    );
    match (s.tcp_flows, s.udp_flows) {
        (Some(tcp), Some(udp)) => {
            println!("  flows:          {tcp} TCP, {udp} UDP open at the gateway")
        }
        _ => println!("  flows:          unknown (the gateway did not answer)"),
    }
    let queue = s
        .tun_queue_dropped
        .map_or_else(|| "unknown".to_string(), |n| n.to_string());
    println!(
        "  dropped:        {} packet(s) in the data path, {queue} in the kernel's queue to {}",
        s.packets_dropped, s.device
    );
    println!("  reconnects:     {}", s.reconnects);
    if s.inbound_refused > 0 {
        println!(
            "  refused:        {} connection attempt(s) from the cluster to ports burrow does not forward",
            s.inbound_refused
        );
    }
    if let Some(e) = &s.last_reconnect_error {
        println!("  last error:     {e}");
    }
    for (i, e) in s.events.iter().enumerate() {
        let label = if i == 0 { "events:" } else { "" };
        println!("  {label:<15} {e}");
    }
}
