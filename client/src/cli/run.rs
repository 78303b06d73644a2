//! `burrow run`: a local command as a workload of the cluster — its
//! environment (`cli::env`), its volumes at their mountPaths and the
//! namespace's names in a private view (`sandbox`), optionally its traffic
//! (a reroute held for as long as the command runs, restored when it
//! ends) — run as the user who invoked burrow.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context as _;
use burrow_api::{Fallback, Protocol};
use burrow_deploy::workload;
use clap::Args;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::cli::connect::{connect_quietly, daemon_conn, exchange_message};
use crate::cli::env::{Resolved, Selection, connection, report, sudo_user, write_files_dir};
use crate::protocol::{Request, Spec, Status, Stop};
use crate::sandbox::{Plan, PlanMount, RunAs};

/// Run a local command as a workload of the cluster.
///
/// CMD gets the workload container's environment (as `burrow env` prints
/// it), its ConfigMap, Secret, downward API and projected volumes at their
/// mountPaths (visible to CMD alone, in memory, gone when it ends), and
/// cluster names resolving as in the workload's pods (a short name is a
/// Service of the workload's namespace). It runs as the user who invoked
/// sudo. Connects first when needed. CMD's exit code is run's (128+N when
/// signal N ended it); Ctrl-C and signals sent to run reach CMD once.
///
/// With --reroute, the workload's Service port comes to CMD's local port
/// while CMD runs (every request, or with --header only those carrying
/// it), and is restored when CMD ends, however it ends. While nothing
/// listens on the local port (CMD starting or stopping), callers reach the
/// cluster's pods.
///
/// Examples:
///   sudo burrow run deploy/api -n shop -- ./api
///   sudo burrow run deploy/api --reroute 8080 --header x-burrow-route=me -- ./api
///   sudo burrow run api -- sh -c 'curl http://orders:8080/health'
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    #[command(flatten)]
    selection: Selection,
    /// PORT[:LOCALPORT]: reroute the workload's Service port PORT (the
    /// Service's port or the container port it targets; a number or a
    /// name) to LOCALPORT on 127.0.0.1 (default: the container port) while
    /// CMD runs.
    #[arg(long, value_name = "PORT[:LOCALPORT]")]
    reroute: Option<String>,
    /// With --reroute: only requests carrying this header come here (the
    /// rest keep reaching the cluster's pods).
    #[arg(long, value_name = "NAME=VALUE", requires = "reroute")]
    header: Option<String>,
    /// Write the volumes under DIR (DIR/<mountPath>, Secret files 0600)
    /// instead of showing them at their mountPaths.
    #[arg(long, value_name = "DIR")]
    files_dir: Option<PathBuf>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// The running command's pid, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// A signal that came before the command's pid was known.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The command has a process group of its own (and the terminal while
    // it runs): whatever reaches run reaches it once, passed on here.
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
        return;
    }
    // Not started yet: kept for `started`; taken here if it started
    // meanwhile (whoever swaps it out sends it, once).
    PENDING.store(sig, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    let sig = PENDING.swap(0, Ordering::SeqCst);
    if pid > 0 && sig != 0 {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The command runs as `pid`: signals from now on go to it, and one that
/// came while it was starting is passed on now.
fn started(pid: i32) {
    CHILD.store(pid, Ordering::SeqCst);
    let sig = PENDING.swap(0, Ordering::SeqCst);
    if sig != 0 {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Whether run holds the terminal's foreground (a shell started it in the
/// foreground): then the command takes it, so that Ctrl-C and Ctrl-\\
/// reach the command alone, as when a shell starts it.
fn holds_terminal() -> bool {
    // SAFETY: plain terminal queries on fd 0.
    unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
}

fn take_terminal_back() {
    // SAFETY: terminal ioctl on fd 0, SIGTTOU ignored around it so a
    // background run is not stopped.
    unsafe {
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(0, libc::getpgrp());
        libc::signal(libc::SIGTTOU, old);
    }
}

fn forward_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::SigAction(forward),
        SaFlags::SA_RESTART | SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only reads an atomic and calls kill(2).
        unsafe { sigaction(s, &action) }.with_context(|| format!("handling {s}"))?;
    }
    Ok(())
}

/// One reroute `run` holds.
struct Held {
    namespace: String,
    service: String,
}

/// Chooses the workload's Service port for `--reroute PORT[:LOCAL]`:
/// (Service, its port as the daemon takes it, the local port).
fn choose_port(
    services: &[Service],
    w: &workload::Workload,
    container: &str,
    text: &str,
) -> anyhow::Result<Vec<(String, String, u16)>> {
    let (want, local) = crate::cli::reroute::parse_port(text)?;
    let (want, want_proto) = match want.split_once('/') {
        Some((p, proto)) => (p.to_string(), Some(proto.to_ascii_uppercase())),
        None => (want, None),
    };
    let ports_of = |name: &str| -> Option<i32> {
        w.spec
            .containers
            .iter()
            .filter(|c| c.name == container)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    let mut out = Vec::new();
    let mut offered = Vec::new();
    for svc in services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        for p in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let target = match &p.target_port {
                None => Some(p.port),
                Some(IntOrString::Int(n)) => Some(*n),
                Some(IntOrString::String(s)) => ports_of(s),
            };
            offered.push(format!(
                "{name} {}{}/{proto}{}",
                p.port,
                p.name
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default(),
                target
                    .filter(|t| *t != p.port)
                    .map(|t| format!(" → {t}"))
                    .unwrap_or_default()
            ));
            if want_proto.as_deref().is_some_and(|w| *w != proto) {
                continue;
            }
            let by_port =
                want.parse::<i32>().ok() == Some(p.port) || p.name.as_deref() == Some(&want);
            let by_target =
                want.parse::<i32>().ok().is_some() && want.parse::<i32>().ok() == target;
            if !(by_port || by_target) {
                continue;
            }
            let local = match local {
                Some(l) if text.contains(':') => l,
                _ => target
                    .or(Some(p.port))
                    .and_then(|t| u16::try_from(t).ok())
                    .filter(|t| *t != 0)
                    .with_context(|| {
                        format!("--reroute {text}: give the local port (PORT:LOCALPORT)")
                    })?,
            };
            let svc_port = if proto == "TCP" {
                p.port.to_string()
            } else {
                format!("{}/{}", p.port, proto.to_ascii_lowercase())
            };
            out.push((name.clone(), svc_port, local));
            break;
        }
    }
    if out.is_empty() {
        let ns = &w.namespace;
        if services.is_empty() {
            anyhow::bail!(
                "--reroute {text}: no Service in namespace {ns} selects the pods of {}\n  hint: \
                 a reroute moves a Service's traffic; `kubectl get svc -n {ns} -o wide` shows \
                 the selectors",
                w.display()
            );
        }
        anyhow::bail!(
            "--reroute {text}: the Services of {} have no port {want}\n  hint: their ports: {}",
            w.display(),
            offered.join(", ")
        );
    }
    Ok(out)
}

/// The resolv.conf of the command's view: the stub, the workload
/// namespace's search list, then the machine's own search domains.
fn resolv_conf(status: &Status, namespace: &str) -> Option<String> {
    let stub = status.dns_stub.as_ref()?.stub.clone();
    let ip: std::net::IpAddr = stub
        .parse::<std::net::SocketAddr>()
        .ok()
        .filter(|a| a.port() == 53)
        .map(|a| a.ip())
        .or_else(|| stub.parse().ok())?;
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let original = burrow_dns::system::ResolvConf::parse(&text);
    let domain = if status.cluster_domain.is_empty() {
        "cluster.local"
    } else {
        status.cluster_domain.trim_end_matches('.')
    };
    // The connection's own cluster entries go: this is another namespace.
    let own: Vec<String> = original
        .search
        .iter()
        .filter(|s| !(s.as_str() == domain || s.ends_with(&format!("svc.{domain}"))))
        .cloned()
        .collect();
    let search = burrow_dns::system::search_list(namespace, domain, &own);
    let mut text = burrow_dns::system::stub_resolv_conf(ip, &search, &original);
    if !text.contains("ndots:") {
        text.push_str("options ndots:5\n");
    }
    Some(text)
}

/// Variables set for the command besides the workload's.
type ExtraEnv = Vec<(String, String)>;

/// The user the command runs as (under sudo the invoking one) and its
/// HOME, USER, LOGNAME.
fn run_as() -> anyhow::Result<Option<(RunAs, ExtraEnv)>> {
    let Some((uid, gid)) = sudo_user() else {
        return Ok(None);
    };
    if uid == 0 {
        return Ok(None);
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let mut groups = vec![gid];
    let mut env = Vec::new();
    if let Some(u) = &user {
        if let Ok(name) = CString::new(u.name.as_str())
            && let Ok(list) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        {
            groups = list.into_iter().map(|g| g.as_raw()).collect();
        }
        env.push(("HOME".to_string(), u.dir.to_string_lossy().into_owned()));
        env.push(("USER".to_string(), u.name.clone()));
        env.push(("LOGNAME".to_string(), u.name.clone()));
    }
    Ok(Some((RunAs { uid, gid, groups }, env)))
}

/// Removes staging directories of `run`s that are gone.
fn clean_stale(run_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name
            .strip_prefix("sandbox-")
            .and_then(|p| p.parse::<i32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

async fn stop_reroutes(held: &[Held], global: &crate::Global) {
    for h in held {
        let stop = Stop {
            namespace: Some(h.namespace.clone()),
            service: Some(h.service.clone()),
        };
        let result = match daemon_conn(global).await {
            Ok(conn) => exchange_message(conn, &Request::RerouteStop(stop), false).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(m) => eprintln!("burrow: {m}"),
            Err(e) => eprintln!(
                "burrow: could not restore {}/{}: {e:#}; the gateway restores it once this \
                 machine's lease runs out, or run `burrow reroute --stop {}`",
                h.namespace, h.service, h.service
            ),
        }
    }
}

/// Connects, holds the reroutes; returns the plan's pieces.
async fn prepare(
    args: &RunArgs,
    global: &crate::Global,
) -> anyhow::Result<(Resolved, Option<String>, Vec<Held>)> {
    let connected = connection(global).await;
    let r = crate::cli::env::resolve(&args.selection, connected.as_ref()).await?;
    report(&r);
    let ns = r.workload.namespace.clone();
    // Checked before anything changes: the Service port and the right to
    // patch it.
    let mut reroutes = Vec::new();
    if let Some(text) = &args.reroute {
        let services = workload::services_of(&r.cluster, &r.workload).await?;
        reroutes = choose_port(&services, &r.workload, &r.container, text)?;
        burrow_deploy::reroute::check_cluster_supports(&r.cluster).await?;
        for (svc, port, _) in &reroutes {
            let found = burrow_deploy::reroute::find(&r.cluster, &ns, svc, port).await?;
            found.protocol(
                if args.header.is_some() {
                    Protocol::Http
                } else {
                    Protocol::Auto
                },
                args.header.is_some(),
            )?;
            burrow_deploy::reroute::check_may_patch(&r.cluster, &found.service).await?;
        }
    }
    if connected.is_none() {
        connect_quietly(&args.selection.cluster, global).await?;
    }
    let status = connection(global)
        .await
        .context("burrow connected, but the daemon does not say so: see `burrow status`")?;
    if status.server != r.cluster.server {
        anyhow::bail!(
            "burrow is connected to {} (context {}), but this names {} (context {})\n  hint: \
             leave out --kubeconfig/--context to use the connection's cluster, or `burrow \
             disconnect` and connect to this one first",
            status.server,
            status.context,
            r.cluster.server,
            r.cluster.context
        );
    }
    let resolv = resolv_conf(&status, &ns);
    if resolv.is_none() {
        eprintln!(
            "burrow: the connection has no DNS stub (--dns off): short names resolve as this \
             machine resolves them"
        );
    }
    let header = match &args.header {
        None => None,
        Some(h) => {
            let (n, v) = h
                .split_once('=')
                .with_context(|| format!("--header {h}: expected NAME=VALUE"))?;
            Some((n.trim().to_owned(), v.trim().to_owned()))
        }
    };
    let mut held = Vec::new();
    for (service, port, local_port) in reroutes {
        let spec = Spec {
            namespace: Some(ns.clone()),
            service: service.clone(),
            port,
            local_port,
            protocol: if header.is_some() {
                Protocol::Http
            } else {
                Protocol::Auto
            },
            header: header.clone(),
            force: false,
            // Before the command listens and after it stops, callers reach
            // the pods, not an error.
            fallback: Fallback::Pods,
        };
        let result = match daemon_conn(global).await {
            Ok(conn) => exchange_message(conn, &Request::Reroute(spec), true).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(m) => {
                eprintln!("burrow: {m}");
                held.push(Held {
                    namespace: ns.clone(),
                    service,
                });
            }
            Err(e) => {
                stop_reroutes(&held, global).await;
                return Err(e);
            }
        }
    }
    Ok((r, resolv, held))
}

fn spawn(plan: &Plan, terminal: bool) -> anyhow::Result<std::process::Child> {
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let exe = std::env::current_exe().context("finding the burrow binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("sandbox-exec");
    let raw = read.as_raw_fd();
    // SAFETY: setpgid, dup2 and fcntl are async-signal-safe; nothing
    // allocates.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if terminal {
                // Taken before exec, so the command never reads the
                // terminal from the background (SIGTTIN would stop it).
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, libc::getpid());
                libc::signal(libc::SIGTTOU, libc::SIG_DFL);
            }
            if raw == crate::sandbox::PLAN_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, crate::sandbox::PLAN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the command")?;
    drop(read);
    let text = serde_json::to_vec(plan)?;
    // A large plan fills the pipe: written while the child reads.
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::from(write);
        std::io::Write::write_all(&mut f, &text)
    });
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing the plan panicked"))?
        .context("handing the plan to the command")?;
    Ok(child)
}

/// `burrow run ...`: CMD's exit code.
pub fn run(args: RunArgs, global: &crate::Global) -> anyhow::Result<ExitCode> {
    crate::require_root(
        "run",
        "it gives the command a private mount namespace and talks to the root-only daemon",
    )?;
    let rt = crate::cli::connect::runtime()?;
    let (r, resolv, held) = rt.block_on(prepare(&args, global))?;
    let result = (|| -> anyhow::Result<std::process::ExitStatus> {
        let user = run_as()?;
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| !r.env.contains_key(k))
            .collect();
        if let Some((_, extra)) = &user {
            env.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
            env.extend(extra.iter().cloned());
        }
        env.extend(r.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut mounts = Vec::new();
        match &args.files_dir {
            Some(dir) => {
                for (mount_path, path) in write_files_dir(dir, &r.mounts)? {
                    eprintln!("burrow: {mount_path} written to {}", path.display());
                }
            }
            None => {
                for m in &r.mounts {
                    mounts.push(PlanMount::from_mount(m)?);
                }
            }
        }
        std::fs::create_dir_all(&global.run_dir)?;
        clean_stale(&global.run_dir);
        let staging = global
            .run_dir
            .join(format!("sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir(&staging);
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let plan = Plan {
            argv: args.command.clone(),
            env,
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            user: user.map(|(u, _)| u),
            mounts,
            resolv_conf: resolv.clone(),
            staging: staging.clone(),
        };
        let terminal = holds_terminal();
        // Handled before the command exists, so that a signal sent as soon
        // as it runs is never lost (nor, when run was started with SIGINT
        // ignored, dropped).
        forward_signals()?;
        let spawned = spawn(&plan, terminal);
        drop(plan);
        let status = match spawned {
            Ok(mut child) => {
                let pid = i32::try_from(child.id()).unwrap_or(0);
                // Also here (as shells do), so the group exists when a
                // signal is passed on, whichever side ran first.
                // SAFETY: setpgid on our own child.
                unsafe {
                    libc::setpgid(pid, pid);
                }
                started(pid);
                let st = child.wait().context("waiting for the command");
                CHILD.store(0, Ordering::SeqCst);
                if terminal {
                    take_terminal_back();
                }
                st
            }
            Err(e) => Err(e),
        };
        // Empty outside the command's namespace; busy only while a process
        // the command left behind still uses it (removed by a later run).
        let _ = std::fs::remove_dir(&staging);
        status
    })();
    rt.block_on(stop_reroutes(&held, global));
    let status = result?;
    use std::os::unix::process::ExitStatusExt as _;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    };
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workload() -> workload::Workload {
        let spec = serde_json::from_value(json!({"containers": [{"name": "api",
            "ports": [{"name": "http", "containerPort": 8080}]}]}))
        .expect("spec");
        workload::Workload {
            kind: workload::Kind::Deployment,
            name: "api".into(),
            namespace: "shop".into(),
            pod_labels: Default::default(),
            spec,
            meta: Default::default(),
            pod: None,
            no_pod: String::new(),
        }
    }

    fn svc(ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "api"}, "spec": {"ports": ports}}))
            .expect("svc")
    }

    #[test]
    fn reroute_ports_match_the_service_or_its_target() {
        let w = workload();
        let s = [svc(
            json!([{"name": "web", "port": 80, "targetPort": "http"},
                             {"name": "dns", "port": 53, "protocol": "UDP"}]),
        )];
        let pick = |t: &str| choose_port(&s, &w, "api", t);
        assert_eq!(
            pick("80").expect("port"),
            [("api".into(), "80".into(), 8080)]
        );
        assert_eq!(
            pick("8080").expect("target"),
            [("api".into(), "80".into(), 8080)]
        );
        assert_eq!(
            pick("web:9000").expect("name"),
            [("api".into(), "80".into(), 9000)]
        );
        assert_eq!(
            pick("53/udp").expect("udp"),
            [("api".into(), "53/udp".into(), 53)]
        );
        let e = pick("81").expect_err("no port").to_string();
        assert!(
            e.contains("have no port 81") && e.contains("api 80 (web)/TCP → 8080"),
            "{e}"
        );
        let e = choose_port(&[], &w, "api", "80")
            .expect_err("no service")
            .to_string();
        assert!(e.contains("no Service in namespace shop selects"), "{e}");
    }
}
