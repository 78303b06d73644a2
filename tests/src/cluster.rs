//! One miniature cluster's life: the daemon ([`serve`], run by the hidden
//! `minicluster serve`), the handle the end-to-end tests use ([`Cluster`]),
//! and the garbage collector of leftovers ([`gc`]).
//!
//! State of cluster NAME lives in `/run/minicluster/NAME/`: `pid` (the
//! daemon), `log`, `status` (the current start-up step, for `up`'s
//! progress), `ready` (written once every workload pod is Running and Ready
//! and cluster DNS answers; holds the kubeconfig path), the kubeconfigs, the
//! PKI and `pods.json` (`"ns/name" → {uid, netns, podIP}`, for
//! `minicluster exec pod/NS/NAME`).
//!
//! Must never: leave a namespace, process or file behind after `down`/`gc`,
//! or start a second daemon for a name whose daemon is alive.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use minicluster_apiserver::resources::{self, must};
use minicluster_apiserver::{Store, admission, auth, pki, server};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::ctx::{
    API_PORT, CLUSTER_DNS_IP, ClusterCtx, KUBERNETES_SERVICE_IP, NODE_NAME, NODE_UNDERLAY_IP,
    POD_CIDR, POD_GATEWAY, STATE_ROOT,
};
use crate::{controllers, dns, endpoints, kubelet, net, proxy};

/// The workloads applied when `--workloads` is not given.
pub const DEFAULT_WORKLOADS: &str = include_str!("../workloads/default.yaml");

/// How long `up` waits for the cluster to be ready.
pub const UP_TIMEOUT: Duration = Duration::from_secs(120);

/// What to bring up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Cluster name (`demo`): lower-case letters, digits and `-`, at most 12
    /// characters (it ends up in namespace and interface names).
    pub name: String,
    /// Kubernetes YAML (multi-document) applied at start; the built-in
    /// default workloads when `None`.
    pub workloads: Option<PathBuf>,
    /// Number of laptop namespaces (`laptop`, `laptop2`, ...).
    pub laptops: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            name: "demo".into(),
            workloads: None,
            laptops: 1,
        }
    }
}

/// `/run/minicluster/<name>/`.
pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// Checks a cluster name: it becomes part of namespace and interface names.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 12
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "invalid cluster name {name:?}: use 1-12 lower-case letters, digits or '-' (not at either end), e.g. demo or t1"
        );
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S ..." — the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// The pid of the live daemon of the cluster whose state is in `dir`.
pub fn daemon_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    pid_alive(pid).then_some(pid)
}

/// A context for tearing down (or naming things of) a cluster without its
/// daemon: no CA, no tokens.
pub fn bare_ctx(name: &str) -> ClusterCtx {
    ClusterCtx {
        name: name.to_string(),
        state_dir: state_dir(name),
        bin_dir: bin_dir(),
        ca_pem: String::new(),
        issue_token: Arc::new(|_, _| String::new()),
    }
}

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The network namespace of `target` (`laptop`, `laptop2`, ..., `node`,
/// `pod/NAMESPACE/POD`) in cluster `name`.
pub fn target_netns(name: &str, target: &str) -> Result<String> {
    let ctx = bare_ctx(name);
    if target == "node" {
        return Ok(ctx.node_netns());
    }
    if target == "laptop" {
        return Ok(ctx.laptop_netns(1));
    }
    if let Some(n) = target.strip_prefix("laptop")
        && let Ok(i) = n.parse::<usize>()
        && i >= 1
    {
        return Ok(ctx.laptop_netns(i));
    }
    if let Some(rest) = target.strip_prefix("pod/") {
        let Some((ns, pod)) = rest.split_once('/') else {
            bail!("target {target:?}: expected pod/NAMESPACE/POD");
        };
        let path = state_dir(name).join("pods.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (is cluster {name} up?)", path.display()))?;
        let pods: BTreeMap<String, PodEntry> = serde_json::from_str(&text)?;
        return match pods.get(&format!("{ns}/{pod}")) {
            Some(p) => Ok(p.netns.clone()),
            None => bail!(
                "no pod {ns}/{pod} in cluster {name} (list them with: kubectl --kubeconfig $(minicluster kubeconfig --name {name} --host) get pods -A)"
            ),
        };
    }
    bail!("unknown target {target:?}: use laptop, laptop2..., node or pod/NAMESPACE/POD")
}

/// One line of `pods.json`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct PodEntry {
    pub uid: String,
    pub netns: String,
    #[serde(rename = "podIP", default)]
    pub pod_ip: String,
}

/// The network namespace the kubelet gives a pod: `mc-<cluster>-p-<first 8
/// hex digits of the uid>`.
pub fn pod_netns(cluster: &str, uid: &str) -> String {
    kubelet::pod_netns_name(cluster, uid)
}

/// The port-forward dialer: like the real kubelet, it connects to
/// `localhost:PORT` inside the pod's own network namespace, so a pod's
/// loopback-only listeners are reachable by port-forward and nothing else.
fn pod_dialer(cluster: String) -> minicluster_apiserver::server::Dialer {
    std::sync::Arc::new(move |t: minicluster_apiserver::server::PodTarget| {
        let netns = pod_netns(&cluster, &t.uid);
        Box::pin(async move {
            let local = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, t.port));
            net::dial_in(&netns, local, std::time::Duration::from_secs(5)).await
        })
    })
}

// ---------------------------------------------------------------- daemon

/// Writes the current start-up step for `up` to show.
fn set_status(state: &Path, step: &str) {
    tracing::info!("step: {step}");
    let _ = write_atomic(&state.join("status"), step.as_bytes());
}

fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn init_logging(state: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("log"))
        .context("opening the log")?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// The daemon: brings cluster `opts.name` up, keeps it running until SIGTERM
/// or SIGINT, then tears it down. Fails (after tearing down) if any
/// controller stops.
pub async fn serve(opts: ClusterOptions) -> Result<()> {
    validate_name(&opts.name)?;
    let state = state_dir(&opts.name);
    if let Some(pid) = daemon_pid(&state)
        && pid != std::process::id() as i32
    {
        bail!(
            "cluster {} is already running (pid {pid}); take it down with: minicluster down --name {}",
            opts.name,
            opts.name
        );
    }
    net::create_dir_shared(&state).with_context(|| format!("creating {}", state.display()))?;
    for stale in ["ready", "status", "pods.json"] {
        let _ = std::fs::remove_file(state.join(stale));
    }
    std::fs::write(state.join("pid"), std::process::id().to_string())
        .context("writing the pid file")?;
    init_logging(&state)?;
    let _ = STATE_DIR.set(state.clone());
    tracing::info!(
        "minicluster {} starting (pid {})",
        opts.name,
        std::process::id()
    );

    let mut tasks: JoinSet<(&'static str, Result<()>)> = JoinSet::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let result = tokio::select! {
        r = run(&opts, &state, &mut tasks) => r,
        _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
    };
    if let Err(e) = &result {
        tracing::error!("minicluster {} failed: {e:#}", opts.name);
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::info!("minicluster {} tearing down", opts.name);
    // Removes the namespaces, their processes and the state dir (the log
    // too: `up` keeps it open to show it when start-up fails).
    if let Err(e) = net::teardown(&opts.name) {
        tracing::error!("teardown: {e:#}");
    }
    tracing::info!("minicluster {} stopped", opts.name);
    result
}

async fn run(
    opts: &ClusterOptions,
    state: &Path,
    tasks: &mut JoinSet<(&'static str, Result<()>)>,
) -> Result<()> {
    let started = Instant::now();
    set_status(state, "certificates");
    let ip_sans: Vec<IpAddr> = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(NODE_UNDERLAY_IP),
        IpAddr::V4(KUBERNETES_SERVICE_IP),
    ];
    let dns_sans = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    ];
    let pki = pki::Pki::generate(&state.join("pki"), &ip_sans, &dns_sans)?;
    let authn = Arc::new(auth::Authenticator::new());
    let issuer = authn.clone();
    let ctx = ClusterCtx {
        name: opts.name.clone(),
        state_dir: state.to_path_buf(),
        bin_dir: bin_dir(),
        ca_pem: pki.ca_pem.clone(),
        issue_token: Arc::new(move |ns: &str, sa: &str| issuer.issue_token(ns, sa)),
    };

    set_status(state, "namespaces");
    net::create_node(&ctx).context("creating the node namespace")?;
    for i in 1..=opts.laptops {
        net::create_laptop(&ctx, i).with_context(|| format!("creating laptop {i}"))?;
    }

    set_status(state, "API server");
    let node_listener = net::in_netns(&ctx.node_netns(), move || {
        std::net::TcpListener::bind(SocketAddr::from((NODE_UNDERLAY_IP, API_PORT)))
    })
    .context("entering the node namespace")?
    .with_context(|| format!("binding {NODE_UNDERLAY_IP}:{API_PORT} in the node namespace"))?;
    let host_listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    let host_port = host_listener.local_addr()?.port();
    for l in [&node_listener, &host_listener] {
        l.set_nonblocking(true)?;
    }

    let (admin_cert, admin_key) = pki.client_cert("minicluster-admin", &["system:masters"])?;
    let (dev_cert, dev_key) = pki.client_cert("developer", &["developers"])?;
    let inside = format!("https://{NODE_UNDERLAY_IP}:{API_PORT}");
    let host = format!("https://127.0.0.1:{host_port}");
    let cluster_name = format!("minicluster-{}", opts.name);
    for (file, url, user, cert, key) in [
        (
            "kubeconfig",
            &inside,
            "minicluster-admin",
            &admin_cert,
            &admin_key,
        ),
        (
            "kubeconfig-host",
            &host,
            "minicluster-admin",
            &admin_cert,
            &admin_key,
        ),
        (
            "kubeconfig-limited",
            &inside,
            "developer",
            &dev_cert,
            &dev_key,
        ),
        (
            "kubeconfig-limited-host",
            &host,
            "developer",
            &dev_cert,
            &dev_key,
        ),
    ] {
        pki::write_kubeconfig(
            &state.join(file),
            &cluster_name,
            url,
            &pki.ca_pem,
            user,
            cert,
            key,
        )?;
    }

    let store = Arc::new(Store::new());
    bootstrap(&store).context("creating the cluster's own objects")?;

    let first_config = server::ServerConfig {
        store: store.clone(),
        auth: authn.clone(),
        tls_cert_pem: pki.server_cert_pem.clone(),
        tls_key_pem: pki.server_key_pem.clone(),
        ca_pem: pki.ca_pem.clone(),
        listeners: vec![node_listener, host_listener],
        dialer: pod_dialer(ctx.name.clone()),
        logs: Some(kubelet::log_source(store.clone(), ctx.clone())),
    };
    let make_config = {
        let (store, authn) = (store.clone(), authn.clone());
        let (cert, key, ca) = (
            pki.server_cert_pem.clone(),
            pki.server_key_pem.clone(),
            pki.ca_pem.clone(),
        );
        let (ctx, node_netns) = (ctx.clone(), ctx.node_netns());
        move || -> Result<server::ServerConfig> {
            let node_listener = net::in_netns(&node_netns, move || {
                std::net::TcpListener::bind(SocketAddr::from((NODE_UNDERLAY_IP, API_PORT)))
            })??;
            let host_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, host_port))?;
            Ok(server::ServerConfig {
                store: store.clone(),
                auth: authn.clone(),
                tls_cert_pem: cert.clone(),
                tls_key_pem: key.clone(),
                ca_pem: ca.clone(),
                listeners: vec![node_listener, host_listener],
                dialer: pod_dialer(ctx.name.clone()),
                logs: Some(kubelet::log_source(store.clone(), ctx.clone())),
            })
        }
    };
    let first = ApiServer::start(first_config)?;
    tasks.spawn(async move { ("apiserver", api_server_loop(first, make_config).await) });

    macro_rules! controller {
        ($name:literal, $f:path) => {{
            let (store, ctx) = (store.clone(), ctx.clone());
            tasks.spawn(async move { ($name, $f(store, ctx).await) });
        }};
    }
    controller!("namespaces", controllers::namespaces);
    controller!("serviceaccounts", controllers::serviceaccounts);
    controller!("scheduler", controllers::scheduler);
    controller!("deployments", controllers::deployments);
    controller!("replicasets", controllers::replicasets);
    controller!("statefulsets", controllers::statefulsets);
    controller!("daemonsets", controllers::daemonsets);
    controller!("endpoints", endpoints::endpoints_controller);
    controller!("endpointslices", endpoints::slice_controller);
    controller!("endpointslicemirroring", endpoints::mirroring_controller);
    controller!("kubelet", kubelet::run);
    controller!("kube-proxy", proxy::run);
    controller!("dns", dns::run);
    {
        let (store, state) = (store.clone(), state.to_path_buf());
        let cluster = ctx.name.clone();
        tasks.spawn(async move { ("pods.json", pods_index(store, cluster, state).await) });
    }
    let _corp_dns = dns::start_corp_dns(&ctx).context("starting the laptops' resolver")?;

    set_status(state, "workloads");
    let text = match &opts.workloads {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading workloads {}", p.display()))?,
        None => DEFAULT_WORKLOADS.to_string(),
    };
    let source = opts
        .workloads
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "built-in default.yaml".into());
    let applied = apply_yaml(&store, &text).with_context(|| format!("applying {source}"))?;
    tracing::info!("applied {} objects from {source}", applied.len());

    // Wait for the workloads (and watch the controllers meanwhile), then
    // for kube-proxy to serve them (a real cluster's Services answer a
    // moment after the pods are ready; `up` says ready once they do), then
    // DNS.
    let mut last = String::new();
    let mut dns_ok = false;
    let mut proxy_since: Option<Instant> = None;
    loop {
        if let Some(done) = tasks.try_join_next() {
            return Err(task_failure(done));
        }
        let (ready, total) = workloads_ready(&store);
        let waiting = ready < total || (total == 0 && !nothing_to_wait_for(&applied));
        let proxy_waiting = !waiting && {
            let since = *proxy_since.get_or_insert_with(Instant::now);
            // Bounded: rules that keep changing do not hold `up` forever.
            !proxy::in_sync(&store, &ctx.state_dir) && since.elapsed() < Duration::from_secs(10)
        };
        let step = if waiting {
            format!("workloads {ready}/{total} ready")
        } else if proxy_waiting {
            "kube-proxy".to_string()
        } else if !dns_ok {
            "DNS".to_string()
        } else {
            break;
        };
        if step != last {
            set_status(state, &step);
            last = step;
        }
        if last == "DNS" {
            let probe_ctx = ctx.clone();
            dns_ok = tokio::task::spawn_blocking(move || dns::probe(&probe_ctx))
                .await
                .unwrap_or(false);
            if dns_ok {
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kubeconfig = state.join("kubeconfig");
    write_atomic(
        &state.join("ready"),
        kubeconfig.display().to_string().as_bytes(),
    )?;
    set_status(state, "ready");
    tracing::info!(
        "cluster {} ready in {:.1}s; kubeconfig {} (host: {})",
        opts.name,
        started.elapsed().as_secs_f64(),
        kubeconfig.display(),
        state.join("kubeconfig-host").display()
    );

    match tasks.join_next().await {
        Some(done) => Err(task_failure(done)),
        None => bail!("no controllers running"),
    }
}

/// The API server on a runtime of its own, so that stopping it is what a
/// real API server's restart is to its clients: every connection (watches,
/// port-forward streams) ends at once and the port refuses until it is
/// back. The store (etcd) and the controllers stay.
struct ApiServer {
    /// Always Some but in `Drop`.
    runtime: Option<tokio::runtime::Runtime>,
    done: tokio::sync::oneshot::Receiver<Result<()>>,
}

impl ApiServer {
    fn start(config: server::ServerConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("apiserver")
            .enable_all()
            .build()
            .context("the API server's runtime")?;
        let (tx, done) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let _ = tx.send(server::serve(config).await);
        });
        Ok(Self {
            runtime: Some(runtime),
            done,
        })
    }
}

impl Drop for ApiServer {
    /// Every task of the API server ends (connections close); never
    /// waits (a runtime may not block inside another).
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What `minicluster apiserver stop|start` asks of the daemon: SIGUSR1
/// stops the API server, SIGUSR2 starts it again (same address, port,
/// certificates and store). `apiserver-state` in the state dir says which
/// it is in (`serving`, `stopped`) once done.
async fn api_server_loop(
    first: ApiServer,
    make_config: impl Fn() -> Result<server::ServerConfig> + Send,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut stop_sig = signal(SignalKind::user_defined1())?;
    let mut start_sig = signal(SignalKind::user_defined2())?;
    let mut running = Some(first);
    let state = |s: &str| {
        if let Some(dir) = STATE_DIR.get() {
            let _ = write_atomic(&dir.join("apiserver-state"), s.as_bytes());
        }
    };
    state("serving");
    loop {
        let failed = async {
            match running.as_mut() {
                Some(a) => (&mut a.done).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = failed => {
                return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => bail!("the API server's task ended"),
                };
            }
            _ = stop_sig.recv() => {
                if let Some(a) = running.take() {
                    tracing::info!("API server: stopping (SIGUSR1)");
                    drop(a);
                }
                state("stopped");
            }
            _ = start_sig.recv() => {
                if running.is_none() {
                    tracing::info!("API server: starting again (SIGUSR2)");
                    // The old listeners close as their runtime winds down:
                    // a bind may find the port still taken for a moment.
                    let mut config = make_config();
                    for _ in 0..50 {
                        if config.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        config = make_config();
                    }
                    running = Some(ApiServer::start(config.context("binding the API server's ports again")?)?);
                }
                state("serving");
            }
        }
    }
}

/// The state dir of the cluster this daemon runs (for the API server's
/// state file).
static STATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn task_failure(done: Result<(&'static str, Result<()>), tokio::task::JoinError>) -> anyhow::Error {
    let e = match done {
        Ok((name, Ok(()))) => anyhow::anyhow!("controller {name} stopped"),
        Ok((name, Err(e))) => e.context(format!("controller {name} failed")),
        Err(e) => anyhow::anyhow!("a controller panicked: {e}"),
    };
    tracing::error!("!!!!!!!! {e:#}");
    e
}

fn nothing_to_wait_for(applied: &[(String, String, String)]) -> bool {
    !applied.iter().any(|(kind, _, _)| {
        matches!(
            kind.as_str(),
            "Pod" | "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet"
        )
    })
}

/// (ready pods, pods wanted): every Deployment's replicas and every other
/// pod in the store must be Running and Ready.
fn workloads_ready(store: &Store) -> (usize, usize) {
    let (deploys, _) = store.list(must("apps/v1/deployments"), None);
    let (pods, _) = store.list(must("core/v1/pods"), None);
    let mut total = 0usize;
    let mut ready = 0usize;
    for d in &deploys {
        let want = d["spec"]["replicas"].as_i64().unwrap_or(1).max(0) as usize;
        let have = d["status"]["readyReplicas"].as_i64().unwrap_or(0).max(0) as usize;
        let updated = d["status"]["updatedReplicas"].as_i64().unwrap_or(0).max(0) as usize;
        total += want;
        ready += have.min(want).min(updated);
    }
    let owned_by_rs = |p: &Value| {
        p["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["kind"] == "ReplicaSet"))
    };
    for p in pods.iter().filter(|p| !owned_by_rs(p)) {
        total += 1;
        if p["status"]["phase"] == "Running" && controllers::pod_ready(p) {
            ready += 1;
        }
    }
    // Pods of Deployments that are not ready yet hold everything back too.
    let unready_rs_pods = pods
        .iter()
        .filter(|p| owned_by_rs(p) && controllers::pod_active(p) && !controllers::pod_ready(p))
        .count();
    if unready_rs_pods > 0 && ready == total {
        ready = total.saturating_sub(1);
    }
    (ready, total)
}

/// Keeps `<state>/pods.json` in step with the pods.
async fn pods_index(store: Arc<Store>, cluster: String, state: PathBuf) -> Result<()> {
    let pods_rt = must("core/v1/pods");
    let (_, mut rx) = store
        .watch(None)
        .map_err(|e| anyhow::anyhow!("watch: {e}"))?;
    let mut last = String::new();
    loop {
        let (pods, _) = store.list(pods_rt, None);
        let index: BTreeMap<String, PodEntry> = pods
            .iter()
            .map(|p| {
                let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
                let name = p["metadata"]["name"].as_str().unwrap_or("");
                let uid = p["metadata"]["uid"].as_str().unwrap_or("").to_string();
                (
                    format!("{ns}/{name}"),
                    PodEntry {
                        netns: pod_netns(&cluster, &uid),
                        uid,
                        pod_ip: p["status"]["podIP"].as_str().unwrap_or("").to_string(),
                    },
                )
            })
            .collect();
        let text = serde_json::to_string_pretty(&index)?;
        if text != last {
            write_atomic(&state.join("pods.json"), text.as_bytes())?;
            last = text;
        }
        // Wait for a pod event (or a resync).
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Err(_) => break,
                Ok(Ok(ev)) if ev.resource.key() == "core/v1/pods" => break,
                Ok(Ok(_)) => continue,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    bail!("the store's watch closed")
                }
            }
        }
    }
}

fn create_obj(store: &Store, key: &str, ns: &str, obj: Value) -> Result<Value> {
    let rt = must(key);
    admission::create(store, rt, ns, obj).map_err(|e| anyhow::anyhow!("creating {key} {ns}: {e}"))
}

/// The objects a fresh cluster has before any workload: namespaces, the
/// node, RBAC, `default/kubernetes` and `kube-system/kube-dns` with their
/// endpoints.
pub fn bootstrap(store: &Store) -> Result<()> {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        create_obj(
            store,
            "core/v1/namespaces",
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]}}),
        )?;
    }
    let hostname = NODE_NAME;
    create_obj(
        store,
        "core/v1/nodes",
        "",
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {
                "kubernetes.io/hostname": hostname,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "node-role.kubernetes.io/control-plane": "",
            }},
            "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": NODE_UNDERLAY_IP.to_string()},
                    {"type": "Hostname", "address": hostname},
                ],
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now(), "lastTransitionTime": now(),
                }],
                "capacity": {"cpu": "2", "memory": "4Gi", "pods": "250", "ephemeral-storage": "20Gi"},
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "250", "ephemeral-storage": "20Gi"},
                "nodeInfo": {
                    "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                    "operatingSystem": "linux",
                    "osImage": "minicluster (network namespaces)",
                    "kernelVersion": kernel_version(),
                    "containerRuntimeVersion": "minicluster://0.1.0",
                    "kubeletVersion": "v1.31.0",
                    "kubeProxyVersion": "v1.31.0",
                    "machineID": "", "systemUUID": "", "bootID": "",
                },
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            },
        }),
    )?;
    for (rt, obj) in auth::bootstrap_rbac() {
        admission::create(store, rt, "", obj)
            .map_err(|e| anyhow::anyhow!("creating RBAC defaults: {e}"))?;
    }
    create_obj(
        store,
        "rbac.authorization.k8s.io/v1/clusterrolebindings",
        "",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "developers-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "developer"},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developers"},
            ],
        }),
    )?;

    // default/kubernetes → the API server.
    create_obj(
        store,
        "core/v1/services",
        "default",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": KUBERNETES_SERVICE_IP.to_string(),
                "clusterIPs": [KUBERNETES_SERVICE_IP.to_string()],
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": API_PORT}],
                "sessionAffinity": "None",
            },
        }),
    )?;
    // As the API server's endpoint reconciler keeps them: an Endpoints
    // labelled skip-mirror and its own slice `kubernetes` (no managed-by).
    static_endpoints(
        store,
        "default",
        "kubernetes",
        json!({(endpoints::SKIP_MIRROR): "true"}),
        &NODE_UNDERLAY_IP.to_string(),
        &[("https", API_PORT, "TCP")],
        true,
    )?;
    // kube-system/kube-dns → the cluster DNS on the node's pod gateway.
    create_obj(
        store,
        "core/v1/services",
        "kube-system",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system",
                         "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": CLUSTER_DNS_IP.to_string(),
                "clusterIPs": [CLUSTER_DNS_IP.to_string()],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }),
    )?;
    // A selectorless Service whose Endpoints the cluster DNS keeps (see
    // `dns`): the mirroring controller makes its slice, as for any such
    // Service.
    static_endpoints(
        store,
        "kube-system",
        "kube-dns",
        json!({"k8s-app": "kube-dns"}),
        &POD_GATEWAY.to_string(),
        &[
            ("dns", dns::FIRST_PORT, "UDP"),
            ("dns-tcp", dns::FIRST_PORT, "TCP"),
        ],
        false,
    )?;
    Ok(())
}

/// Endpoints pointing at one address; with `own_slice`, the slice the API
/// server keeps beside it for `default/kubernetes` (named like the Service,
/// only the service-name label).
fn static_endpoints(
    store: &Store,
    ns: &str,
    name: &str,
    labels: Value,
    ip: &str,
    ports: &[(&str, u16, &str)],
    own_slice: bool,
) -> Result<()> {
    let ports_json: Vec<Value> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    create_obj(
        store,
        "core/v1/endpoints",
        ns,
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "subsets": [{"addresses": [{"ip": ip}], "ports": ports_json}],
        }),
    )?;
    if !own_slice {
        return Ok(());
    }
    create_obj(
        store,
        "discovery.k8s.io/v1/endpointslices",
        ns,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {(endpoints::SERVICE_NAME): name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}],
            "ports": ports_json,
        }),
    )?;
    Ok(())
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn kernel_version() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Applies multi-document Kubernetes YAML: Namespaces first, then the rest
/// in file order, each through admission. Returns (kind, namespace, name) of
/// what was created. Errors name the document.
pub fn apply_yaml(store: &Store, text: &str) -> Result<Vec<(String, String, String)>> {
    let docs = parse_yaml_docs(text)?;
    let mut order: Vec<(usize, Value)> = docs.into_iter().enumerate().collect();
    order.sort_by_key(|(_, d)| u8::from(d["kind"] != "Namespace"));
    let mut created = Vec::new();
    for (i, doc) in order {
        let kind = doc["kind"].as_str().unwrap_or("").to_string();
        let name = doc["metadata"]["name"].as_str().unwrap_or("").to_string();
        let what = format!(
            "document {} ({} {})",
            i + 1,
            if kind.is_empty() { "?" } else { &kind },
            name
        );
        let api_version = doc["apiVersion"].as_str().unwrap_or("");
        let group = match api_version.rsplit_once('/') {
            Some((g, _)) => g,
            None => "",
        };
        let Some(rt) = resources::find_kind(group, &kind) else {
            bail!("{what}: unknown kind {kind:?} in apiVersion {api_version:?}");
        };
        let ns = if rt.namespaced {
            doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        admission::create(store, rt, &ns, doc).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        created.push((kind, ns, name));
    }
    Ok(created)
}

/// Splits multi-document YAML into JSON objects (empty documents skipped;
/// `kind: List` expanded).
pub fn parse_yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v =
            Value::deserialize(de).with_context(|| format!("document {}: invalid YAML", i + 1))?;
        match v {
            Value::Null => {}
            Value::Object(_) if v["kind"] == "List" => {
                out.extend(v["items"].as_array().cloned().unwrap_or_default());
            }
            Value::Object(_) => out.push(v),
            _ => bail!("document {}: not a Kubernetes object", i + 1),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- handle

/// A running cluster, for the end-to-end tests: brought up through the
/// `minicluster` binary, torn down on [`Cluster::down`] or drop (also when a
/// test panics).
pub struct Cluster {
    name: String,
    bin: PathBuf,
    state_dir: PathBuf,
    down: bool,
}

impl Cluster {
    /// Runs `minicluster up` (the binary at `minicluster_bin`, e.g.
    /// `env!("CARGO_BIN_EXE_minicluster")`) and waits until the cluster is
    /// ready.
    pub fn up(minicluster_bin: &Path, opts: &ClusterOptions) -> Result<Cluster> {
        validate_name(&opts.name)?;
        let mut cmd = Command::new(minicluster_bin);
        cmd.args([
            "up",
            "--name",
            &opts.name,
            "--laptops",
            &opts.laptops.to_string(),
        ]);
        if let Some(w) = &opts.workloads {
            cmd.arg("--workloads").arg(w);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let out = cmd
            .output()
            .with_context(|| format!("running {} up", minicluster_bin.display()))?;
        let cluster = Cluster {
            name: opts.name.clone(),
            bin: minicluster_bin.to_path_buf(),
            state_dir: state_dir(&opts.name),
            down: false,
        };
        if !out.status.success() {
            // Dropping `cluster` takes down whatever started.
            bail!(
                "minicluster up --name {} failed ({})",
                opts.name,
                out.status
            );
        }
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Admin kubeconfig for use inside laptop namespaces (server
    /// https://192.168.240.1:6443).
    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }

    /// Admin kubeconfig for the host (server https://127.0.0.1:PORT).
    pub fn host_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig-host")
    }

    /// User `developer` (view only: may not patch services), for laptops.
    pub fn limited_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig-limited")
    }

    /// User `developer`, for the host.
    pub fn limited_host_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig-limited-host")
    }

    /// A kubeconfig for laptops (server https://192.168.240.1:6443) as
    /// `user` in `groups` (at most two), with a client certificate from the
    /// cluster's CA. The user has no rights beyond what bindings give it:
    /// every authenticated user may only review its own access.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let pki = pki::Pki::load(&self.state_dir.join("pki"))?;
        let (cert, key) = pki.client_cert(user, groups)?;
        let path = self.state_dir.join(format!("kubeconfig-user-{user}"));
        pki::write_kubeconfig(
            &path,
            &format!("minicluster-{}", self.name),
            &format!("https://{NODE_UNDERLAY_IP}:{API_PORT}"),
            &pki.ca_pem,
            user,
            &cert,
            &key,
        )?;
        Ok(path)
    }

    /// Takes laptop `target`'s underlay link down or up
    /// ([`net::set_laptop_link`]).
    pub fn set_laptop_link(&self, target: &str, up: bool) -> Result<()> {
        net::set_laptop_link(&self.netns(target)?, up)
    }

    /// Moves laptop `target` to underlay address `address`
    /// ([`net::set_laptop_address`]).
    pub fn set_laptop_address(&self, target: &str, address: Ipv4Addr) -> Result<()> {
        net::set_laptop_address(&self.netns(target)?, address)
    }

    /// Stops (`serving` false) or starts the API server and returns once
    /// it is done: stopped, every connection closed and the port refusing;
    /// or serving again.
    pub fn set_api_server(&self, serving: bool) -> Result<()> {
        set_api_server(&self.name, serving)
    }

    /// The network namespace of `laptop`, `laptop2`..., `node` or
    /// `pod/NAMESPACE/POD`.
    pub fn netns(&self, target: &str) -> Result<String> {
        target_netns(&self.name, target)
    }

    /// A command running `args` inside `target`'s namespace (through `ip
    /// netns exec`, so with its resolv.conf). If the target is unknown the
    /// command fails with exit code 127 and says why.
    pub fn exec(&self, target: &str, args: &[&str]) -> Command {
        match self.netns(target) {
            Ok(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns]).args(args);
                c
            }
            Err(e) => {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    "echo \"$0\" >&2; exit 127",
                    &format!("minicluster exec: {e:#}"),
                ]);
                c
            }
        }
    }

    /// Takes the cluster down (`minicluster down`).
    pub fn down(mut self) -> Result<()> {
        self.down = true;
        self.run_down()
    }

    fn run_down(&self) -> Result<()> {
        let status = Command::new(&self.bin)
            .args(["down", "--name", &self.name])
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("running {} down", self.bin.display()))?;
        if !status.success() {
            bail!("minicluster down --name {} failed ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down {
            self.down = true;
            let _ = self.run_down();
        }
    }
}

// ---------------------------------------------------------------- down / gc

/// Stops the daemon of cluster `name` (SIGTERM, then SIGKILL after
/// `patience`), tears down whatever is left and removes its state.
/// Succeeds if the cluster was not up. Returns whether anything was running.
pub fn down(name: &str, patience: Duration) -> Result<bool> {
    validate_name(name)?;
    let dir = state_dir(name);
    let was_running = match daemon_pid(&dir) {
        Some(pid) => {
            stop_pid(pid, patience);
            true
        }
        None => false,
    };
    net::teardown(name).with_context(|| format!("tearing down cluster {name}"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(was_running)
}

/// SIGTERM, wait up to `patience`, then SIGKILL.
pub fn stop_pid(pid: i32, patience: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + patience;
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Removes every leftover of every cluster: daemons (from their pid files),
/// namespaces, veths, rules, processes (`net::gc_all`) and state dirs.
/// Stops or starts cluster `name`'s API server (see [`Cluster::set_api_server`]).
pub fn set_api_server(name: &str, serving: bool) -> Result<()> {
    let dir = state_dir(name);
    let pid = daemon_pid(&dir).with_context(|| format!("cluster {name} is not running"))?;
    let want = if serving { "serving" } else { "stopped" };
    let file = dir.join("apiserver-state");
    let _ = std::fs::remove_file(&file);
    let sig = if serving {
        nix::sys::signal::Signal::SIGUSR2
    } else {
        nix::sys::signal::Signal::SIGUSR1
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .with_context(|| format!("signalling the cluster daemon {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(&file).is_ok_and(|s| s == want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the API server of {name} did not turn {want} within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn gc() -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(STATE_ROOT) {
        for e in entries.flatten() {
            if let Some(pid) = daemon_pid(&e.path()) {
                stop_pid(pid, Duration::from_secs(15));
            }
        }
    }
    net::gc_all().context("removing leftover namespaces")?;
    if Path::new(STATE_ROOT).exists() {
        std::fs::remove_dir_all(STATE_ROOT).with_context(|| format!("removing {STATE_ROOT}"))?;
    }
    Ok(())
}

/// Last `n` lines of a file (for showing why a daemon died).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    for l in &lines[start..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_targets() {
        assert!(validate_name("demo").is_ok());
        assert!(validate_name("t1").is_ok());
        assert!(validate_name("Demo").is_err());
        assert!(validate_name("a-very-long-name").is_err());
        assert_eq!(
            target_netns("t1", "laptop").expect("laptop"),
            "mc-t1-laptop"
        );
        assert_eq!(
            target_netns("t1", "laptop2").expect("laptop2"),
            "mc-t1-laptop2"
        );
        assert_eq!(target_netns("t1", "node").expect("node"), "mc-t1-node");
        assert!(target_netns("t1", "bogus").is_err());
        assert_eq!(
            pod_netns("t1", "0a1b2c3d-0000-4000-8000-000000000000"),
            "mc-t1-p-0a1b2c3d"
        );
    }

    /// The control plane end to end without a network: bootstrap, default
    /// workloads, the controllers and a fake kubelet that makes every
    /// scheduled pod Running and Ready.
    #[tokio::test]
    async fn control_plane_brings_default_workloads_up() {
        let store = Arc::new(Store::new());
        bootstrap(&store).expect("bootstrap");
        apply_yaml(&store, DEFAULT_WORKLOADS).expect("workloads");
        let mut ctx = bare_ctx("unit");
        ctx.ca_pem = "CA PEM".into();
        let mut tasks = JoinSet::new();
        tasks.spawn(controllers::namespaces(store.clone(), ctx.clone()));
        tasks.spawn(controllers::serviceaccounts(store.clone(), ctx.clone()));
        tasks.spawn(controllers::scheduler(store.clone(), ctx.clone()));
        tasks.spawn(controllers::deployments(store.clone(), ctx.clone()));
        tasks.spawn(controllers::replicasets(store.clone(), ctx.clone()));
        {
            let store = store.clone();
            tasks.spawn(async move { crate::endpoints::all_without_lag(store).await });
        }
        let kubelet_store = store.clone();
        tasks.spawn(async move {
            let pods = must("core/v1/pods");
            let mut next_ip = 2u8;
            loop {
                for p in kubelet_store.list(pods, None).0 {
                    let ns = p["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
                    if p["spec"]["nodeName"].is_string() && p["status"]["podIP"].is_null() {
                        next_ip += 1;
                        let ip = format!("10.244.0.{next_ip}");
                        let _ = kubelet_store.update_with(pods, &ns, &name, |p| {
                            p["status"]["phase"] = json!("Running");
                            p["status"]["podIP"] = json!(ip);
                            p["status"]["conditions"] =
                                json!([{"type": "Ready", "status": "True"}]);
                            Ok(())
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ready, total) = workloads_ready(&store);
            if total == 8 && ready == total {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "workloads not ready: {ready}/{total}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ep = store
            .get(must("core/v1/endpoints"), "default", "echo")
            .expect("echo endpoints");
        let addrs = ep["subsets"][0]["addresses"].as_array().expect("addresses");
        assert_eq!(addrs.len(), 2);
        assert_eq!(ep["subsets"][0]["ports"][0]["port"], 8080);
        let db = store
            .get(must("core/v1/endpoints"), "data", "db")
            .expect("db endpoints");
        assert_eq!(db["subsets"][0]["addresses"][0]["hostname"], "db-0");
        let (slices, _) = store.list(must("discovery.k8s.io/v1/endpointslices"), Some("default"));
        assert!(
            slices.iter().any(
                |s| s["metadata"]["labels"]["kubernetes.io/service-name"] == "echo"
                    && s["endpoints"].as_array().map(Vec::len) == Some(2)
            )
        );
        // Manual endpoints untouched.
        let k = store
            .get(must("core/v1/endpoints"), "default", "kubernetes")
            .expect("kubernetes endpoints");
        assert_eq!(k["subsets"][0]["addresses"][0]["ip"], "192.168.240.1");
        store
            .get(must("core/v1/serviceaccounts"), "data", "default")
            .expect("default SA");
        let cm = store
            .get(must("core/v1/configmaps"), "data", "kube-root-ca.crt")
            .expect("root CA");
        assert_eq!(cm["data"]["ca.crt"], "CA PEM");
        let ns = store
            .get(must("core/v1/namespaces"), "", "data")
            .expect("ns");
        assert_eq!(ns["status"]["phase"], "Active");
        let d = store
            .get(must("apps/v1/deployments"), "default", "web")
            .expect("web");
        assert_eq!(d["status"]["availableReplicas"], 2);
        assert_eq!(
            d["status"]["observedGeneration"],
            d["metadata"]["generation"]
        );

        // A quiet cluster writes nothing.
        let rv = store.resource_version();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(store.resource_version(), rv, "controllers keep writing");

        // A deleted pod is replaced.
        let pods = must("core/v1/pods");
        let web_pods = |store: &Store| -> Vec<String> {
            store
                .list(pods, Some("default"))
                .0
                .iter()
                .filter(|p| p["metadata"]["labels"]["app"] == "web")
                .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
                .collect()
        };
        let before = web_pods(&store);
        store.delete(pods, "default", &before[0]).expect("delete");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = web_pods(&store);
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(!after.contains(&before[0]));

        // A template change rolls to a new ReplicaSet.
        store
            .update_with(must("apps/v1/deployments"), "default", "web", |d| {
                d["spec"]["template"]["metadata"]["labels"]["rev"] = json!("2");
                Ok(())
            })
            .expect("update");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss, _) = store.list(must("apps/v1/replicasets"), Some("default"));
        let web_rs: Vec<&Value> = rss
            .iter()
            .filter(|r| {
                r["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("web-"))
            })
            .collect();
        assert_eq!(web_rs.len(), 2);
        assert!(web_rs.iter().any(|r| r["spec"]["replicas"] == 0));
        let now_pods = web_pods(&store);
        assert_eq!(now_pods.len(), 2, "{now_pods:?}");
        tasks.abort_all();
    }

    #[test]
    fn default_workloads_parse() {
        let docs = parse_yaml_docs(DEFAULT_WORKLOADS).expect("valid YAML");
        assert!(docs.len() >= 10);
        for d in &docs {
            let api_version = d["apiVersion"].as_str().expect("apiVersion");
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            let kind = d["kind"].as_str().expect("kind");
            assert!(
                resources::find_kind(group, kind).is_some(),
                "unknown {api_version} {kind}"
            );
        }
    }
}
