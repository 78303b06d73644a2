//! `burrow`: the laptop side of burrow — CLI, background daemon, TUN device,
//! routes, DNS configuration, reroute forwarders, `env`/`run`.
//!
//! Must never: leave a device, route, state file or resolver change behind
//! after `disconnect`/SIGTERM, or after a crash once the next
//! `up`/`down`/`connect`/`disconnect` ran; touch a device or route it did
//! not create; accept a connection from the tunnel but on a reroute
//! forwarder's port; or change the cluster with anything but the user's
//! own credentials.
//!
//! - [`cli`]: one module per command family (`connect`/`status`/
//!   `disconnect`/`install`, `reroute`, `up`, `down`, `env`, `run`):
//!   parse, hand to the daemon or do it, print.
//! - [`protocol`]: the CLI⇄daemon messages; [`daemon`]: the background
//!   daemon (connect, transport, relay, supervisor; `daemon::reroute`).
//! - [`tunnel`]: the device's bring-up and teardown shared by `up` and the
//!   daemon, and its parts: `plan` (configuration → addresses, routes and
//!   peers, pure), `tun`, `netlink`, `offload`, `datapath` (TUN ⇄
//!   WireGuard ⇄ UDP, one task), `state` (the crash-safety state file).
//! - [`dns`]: the daemon's DNS (burrow-dns's stub, the system resolver,
//!   undone on disconnect); [`progress`]: progress lines for long commands.
//! - [`sandbox`]: `burrow run`'s private view (mount namespace, volumes at
//!   their mountPaths, resolv.conf) and the exec of its command.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use cli::{connect, down, env, reroute, run, up};

mod cli;
mod daemon;
mod dns;
mod progress;
mod protocol;
mod sandbox;
mod tunnel;

/// Make a Kubernetes cluster's network part of this machine.
#[derive(Parser)]
#[command(name = "burrow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

/// Options every command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Log format on stderr (and in the background log).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log detail: -v for debug, -vv for trace. RUST_LOG, when set,
    /// takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Directory for state files and background logs.
    #[arg(
        long,
        value_name = "DIR",
        global = true,
        env = "BURROW_RUN_DIR",
        default_value = "/run/burrow"
    )]
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    Up(up::UpArgs),
    Down(down::DownArgs),
    Connect(connect::ConnectArgs),
    Status(connect::StatusArgs),
    Disconnect(connect::DisconnectArgs),
    Daemon(connect::DaemonArgs),
    Install(connect::InstallArgs),
    Uninstall(connect::UninstallArgs),
    Reroute(reroute::RerouteArgs),
    Env(env::EnvArgs),
    Run(run::RunArgs),
    /// Internal: `burrow run`'s command starter (reads its plan from fd 3).
    #[command(hide = true)]
    SandboxExec,
}

fn init_logging(global: &Global) {
    let default = match global.verbose {
        0 => "info",
        1 => "info,burrow=debug,burrow_netstack=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match global.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Fail unless running as root, saying what needs it and how to run it.
pub fn require_root(command: &str, why: &str) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    anyhow::bail!(
        "`burrow {command}` needs root: {why}. Run it with sudo: `sudo burrow {command} ...`"
    )
}

/// jemalloc, not glibc's malloc: the data path allocates and frees
/// buffers of tens to hundreds of KiB per batch, which glibc hands back to
/// the kernel and takes again, so every batch paid for fresh, zeroed,
/// faulted-in pages (a sixth of the daemon's CPU during a download over
/// port-forward). jemalloc keeps freed pages for reuse and returns them
/// only after seconds unused.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Single-threaded until it execs the command: before anything else.
    if matches!(cli.command, Command::SandboxExec) {
        return sandbox::exec_from_fd();
    }
    init_logging(&cli.global);
    let result = match cli.command {
        Command::Up(args) => up::run(args, &cli.global),
        Command::Down(args) => down::run(args, &cli.global),
        Command::Connect(args) => connect::run_connect(args, &cli.global),
        Command::Status(args) => connect::run_status(args, &cli.global),
        Command::Disconnect(args) => connect::run_disconnect(args, &cli.global),
        Command::Daemon(args) => connect::run_daemon(args, &cli.global),
        Command::Install(args) => connect::run_install(args),
        Command::Uninstall(args) => connect::run_uninstall(args),
        Command::Reroute(args) => reroute::run(args, &cli.global),
        Command::Env(args) => env::run(args, &cli.global),
        Command::Run(args) => match run::run(args, &cli.global) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::SandboxExec => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow: {e:#}");
            ExitCode::FAILURE
        }
    }
}
