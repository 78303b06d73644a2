//! minicluster: brings a miniature Kubernetes cluster (Linux network
//! namespaces, real servers, a stand-in API server) up and down, and runs
//! commands inside it.
//!
//! Must never: touch the machine's own network configuration, or leave
//! anything behind after `down`/`gc`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burrow_tests::cluster::{self, ClusterOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "minicluster",
    about = "A miniature Kubernetes cluster made of Linux network namespaces",
    long_about = "A miniature Kubernetes cluster made of Linux network namespaces: one node namespace \
(pod bridge 10.244.0.0/16, kube-proxy as iptables DNAT for ClusterIPs 10.96.0.0/12, cluster DNS at \
10.96.0.10), one namespace per pod running real programs, laptop namespaces that reach the node only \
over an underlay (192.168.240.0/24), and a stand-in Kubernetes API server (HTTPS, kubectl and kube-rs \
work against it).\n\nEverything needs root. Several clusters with different --name can run at once.",
    after_help = "Examples (as root):\n  \
minicluster up                                   # cluster 'demo' with the default workloads\n  \
kubectl --kubeconfig $(minicluster kubeconfig --host) get pods,svc -A\n  \
minicluster exec pod/default/caller -- curl -s http://web\n  \
minicluster exec laptop -- kubectl --kubeconfig $(minicluster kubeconfig) get nodes\n  \
minicluster down\n  \
minicluster gc                                   # remove leftovers of every cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum LaptopAction {
    /// Take the underlay link down.
    LinkDown,
    /// Bring it back up.
    LinkUp,
    /// Replace its underlay address (e.g. 192.168.240.130).
    Address { address: std::net::Ipv4Addr },
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring a cluster up in the background; return when every workload pod
    /// is Running and Ready and cluster DNS answers. The last line on stdout
    /// is `kubeconfig: PATH` (for use inside laptop namespaces).
    Up {
        /// Cluster name (1-12 of a-z, 0-9, '-').
        #[arg(long, default_value = "demo")]
        name: String,
        /// Kubernetes YAML (multi-document) to apply at start instead of the
        /// default workloads (web, echo, redis, udp-echo, db, caller).
        #[arg(long, value_name = "FILE")]
        workloads: Option<PathBuf>,
        /// Number of laptop namespaces: laptop, laptop2, ...
        #[arg(long, default_value_t = 1, value_name = "N")]
        laptops: usize,
    },
    /// Print the path of a running cluster's kubeconfig. Without flags: the
    /// admin kubeconfig for use inside laptop namespaces (server
    /// https://192.168.240.1:6443).
    Kubeconfig {
        #[arg(long, default_value = "demo")]
        name: String,
        /// The kubeconfig for the host itself (server https://127.0.0.1:PORT).
        #[arg(long)]
        host: bool,
        /// User `developer`: may get/list/watch, may not change anything
        /// (e.g. `kubectl patch svc` answers 403 Forbidden).
        #[arg(long)]
        limited: bool,
    },
    /// Run a command inside a namespace of the cluster, passing stdin,
    /// stdout, stderr and the exit code through.
    ///
    /// TARGET is `laptop` (`laptop2`, ... with --laptops above 1), `node`, or
    /// `pod/NAMESPACE/POD` (the command sees that pod's network and
    /// resolv.conf).
    Exec {
        #[arg(long, default_value = "demo")]
        name: String,
        /// laptop, laptopN, node or pod/NAMESPACE/POD.
        target: String,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Change a laptop's underlay as real life does: its link goes down
    /// (`link-down`: Wi-Fi gone, lid closed) or comes back (`link-up`), or
    /// it gets another address (`address IP`: a new network or DHCP lease;
    /// the old one and its routes go).
    Laptop {
        #[arg(long, default_value = "demo")]
        name: String,
        /// laptop, laptop2, ...
        target: String,
        #[command(subcommand)]
        action: LaptopAction,
    },
    /// Stop, start or restart the API server as a real one restarts: every
    /// connection (watches, port-forwards) ends, the port refuses until it
    /// is back; the stored objects, controllers and pods stay.
    Apiserver {
        #[arg(long, default_value = "demo")]
        name: String,
        #[arg(value_parser = ["stop", "start", "restart"])]
        action: String,
        /// For `restart`: how long it stays down.
        #[arg(long, default_value_t = 2, value_name = "SECONDS")]
        down_for: u64,
    },
    /// Take a cluster down: stop its daemon and remove its namespaces,
    /// processes and files. Succeeds if it is not up.
    Down {
        #[arg(long, default_value = "demo")]
        name: String,
    },
    /// Remove every leftover namespace, process, veth, iptables rule and file
    /// of any cluster (running ones included).
    Gc,
    /// The cluster daemon itself (started by `up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        workloads: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        laptops: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Laptop {
            name,
            target,
            action,
        } => cluster::target_netns(&name, &target).and_then(|ns| {
            if !ns.contains("-laptop") {
                bail!("{target} is not a laptop");
            }
            match action {
                LaptopAction::LinkDown => burrow_tests::net::set_laptop_link(&ns, false),
                LaptopAction::LinkUp => burrow_tests::net::set_laptop_link(&ns, true),
                LaptopAction::Address { address } => {
                    burrow_tests::net::set_laptop_address(&ns, address)
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }),
        Cmd::Apiserver {
            name,
            action,
            down_for,
        } => match action.as_str() {
            "stop" => cluster::set_api_server(&name, false),
            "start" => cluster::set_api_server(&name, true),
            _ => cluster::set_api_server(&name, false).and_then(|()| {
                std::thread::sleep(Duration::from_secs(down_for));
                cluster::set_api_server(&name, true)
            }),
        }
        .map(|()| ExitCode::SUCCESS),
        Cmd::Up {
            name,
            workloads,
            laptops,
        } => up(&name, workloads, laptops),
        Cmd::Kubeconfig {
            name,
            host,
            limited,
        } => kubeconfig(&name, host, limited),
        Cmd::Exec {
            name,
            target,
            command,
        } => exec(&name, &target, &command),
        Cmd::Down { name } => down(&name),
        Cmd::Gc => gc(),
        Cmd::Serve {
            name,
            workloads,
            laptops,
        } => serve(ClusterOptions {
            name,
            workloads,
            laptops,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("minicluster: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("minicluster creates network namespaces and must run as root, e.g. with sudo");
    }
    Ok(())
}

fn serve(opts: ClusterOptions) -> Result<ExitCode> {
    require_root()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(cluster::serve(opts))?;
    // Pods' helper threads must not keep us alive.
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

fn up(name: &str, workloads: Option<PathBuf>, laptops: usize) -> Result<ExitCode> {
    require_root()?;
    cluster::validate_name(name)?;
    if laptops == 0 {
        bail!("--laptops must be at least 1");
    }
    let state = cluster::state_dir(name);
    if let Some(pid) = cluster::daemon_pid(&state) {
        bail!(
            "cluster {name} is already up (daemon pid {pid}); take it down first with: minicluster down --name {name}"
        );
    }
    let workloads = match workloads {
        Some(p) => Some(
            std::fs::canonicalize(&p).with_context(|| format!("workloads file {}", p.display()))?,
        ),
        None => None,
    };
    // Leftovers of an earlier run of this name that died hard.
    burrow_tests::net::teardown(name)
        .with_context(|| format!("removing leftovers of cluster {name}"))?;
    burrow_tests::net::create_dir_shared(&state)
        .with_context(|| format!("creating {}", state.display()))?;
    let log_path = state.join("log");
    File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    // Append mode: the daemon's stderr and its tracing output share the file.
    let log = std::fs::OpenOptions::new().append(true).open(&log_path)?;
    // Kept open: if the daemon fails it removes its state dir, log included,
    // and this handle still reads it.
    let mut log_reader = File::open(&log_path)?;

    let exe = std::env::current_exe().context("finding the minicluster binary")?;
    let mut cmd = Command::new(&exe);
    cmd.args(["serve", "--name", name, "--laptops", &laptops.to_string()]);
    if let Some(w) = &workloads {
        cmd.arg("--workloads").arg(w);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting the cluster daemon")?;
    eprintln!(
        "minicluster: starting cluster {name} (daemon pid {}, log {})",
        child.id(),
        log_path.display()
    );

    let ready = state.join("ready");
    let status = state.join("status");
    let mut last = String::new();
    loop {
        if let Some(exit) = child.try_wait()? {
            eprintln!(
                "minicluster: the cluster daemon exited ({exit}) before the cluster was ready; last log lines:"
            );
            eprint!("{}", tail_of(&mut log_reader, 30));
            return Ok(ExitCode::FAILURE);
        }
        if let Ok(step) = std::fs::read_to_string(&status) {
            let step = step.trim().to_string();
            if !step.is_empty() && step != last && step != "ready" {
                eprintln!(
                    "minicluster: [{:5.1}s] {step}",
                    started.elapsed().as_secs_f64()
                );
                last = step;
            }
        }
        if let Ok(kubeconfig) = std::fs::read_to_string(&ready) {
            let kubeconfig = kubeconfig.trim();
            eprintln!(
                "minicluster: cluster {name} ready in {:.1}s (host kubeconfig: {})",
                started.elapsed().as_secs_f64(),
                state.join("kubeconfig-host").display()
            );
            println!("kubeconfig: {kubeconfig}");
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > cluster::UP_TIMEOUT {
            eprintln!(
                "minicluster: cluster {name} not ready after {}s (stuck at: {last}); last log lines:",
                cluster::UP_TIMEOUT.as_secs()
            );
            eprint!("{}", tail_of(&mut log_reader, 30));
            eprintln!("minicluster: taking cluster {name} down");
            let _ = cluster::down(name, Duration::from_secs(20));
            let _ = child.try_wait();
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail_of(f: &mut File, n: usize) -> String {
    let mut text = String::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        out.push_str("  | ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn require_up(name: &str) -> Result<PathBuf> {
    cluster::validate_name(name)?;
    let state = cluster::state_dir(name);
    if cluster::daemon_pid(&state).is_none() {
        bail!("cluster {name} is not up (start it with: minicluster up --name {name})");
    }
    Ok(state)
}

fn kubeconfig(name: &str, host: bool, limited: bool) -> Result<ExitCode> {
    let state = require_up(name)?;
    let file = match (limited, host) {
        (false, false) => "kubeconfig",
        (false, true) => "kubeconfig-host",
        (true, false) => "kubeconfig-limited",
        (true, true) => "kubeconfig-limited-host",
    };
    let path = state.join(file);
    if !path.exists() {
        bail!(
            "cluster {name} is still starting: {} does not exist yet",
            path.display()
        );
    }
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}

fn exec(name: &str, target: &str, command: &[String]) -> Result<ExitCode> {
    require_root()?;
    require_up(name)?;
    let netns = cluster::target_netns(name, target)?;
    if !Path::new("/run/netns").join(&netns).exists() {
        bail!("network namespace {netns} of {target} does not exist (is the pod running?)");
    }
    let status = Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(command)
        .status()
        .context("running ip netns exec")?;
    if let Some(code) = status.code() {
        return Ok(ExitCode::from(code.clamp(0, 255) as u8));
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(ExitCode::from(
        128u8.saturating_add(status.signal().unwrap_or(0) as u8),
    ))
}

fn down(name: &str) -> Result<ExitCode> {
    require_root()?;
    let was_up = cluster::down(name, Duration::from_secs(30))?;
    if was_up {
        eprintln!("minicluster: cluster {name} is down");
    } else {
        eprintln!("minicluster: cluster {name} was not up (leftovers, if any, removed)");
    }
    Ok(ExitCode::SUCCESS)
}

fn gc() -> Result<ExitCode> {
    require_root()?;
    cluster::gc()?;
    eprintln!("minicluster: removed every leftover of every cluster");
    Ok(ExitCode::SUCCESS)
}
