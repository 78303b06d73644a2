//! The daemon's DNS: starts burrow-dns's stub on the laptop's tunnel
//! address once the tunnel is up, points the system's resolver at it
//! (resolv.conf rewrite, or systemd-resolved split DNS on the TUN device),
//! keeps the stub's list of namespaces fresh, and undoes it all on
//! disconnect — or, after a crash, at the next start ([`cleanup_stale`]).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use burrow_deploy::{Cluster, facts};
use burrow_dns::stub::{Config, Server, Stub};
use burrow_dns::system::{self, Mode, ResolvConf};
use burrow_dns::{ClusterView, Network};
use hickory_proto::rr::Name;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

/// How often the namespace list is refreshed.
const NAMESPACES_EVERY: Duration = Duration::from_secs(30);

/// `burrow connect --dns`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DnsSetting {
    /// systemd-resolved split DNS when resolved manages the system's
    /// resolver, else a resolv.conf rewrite.
    #[default]
    Auto,
    /// Leave the resolver configuration alone (no stub).
    Off,
}

/// What `burrow status` shows of DNS.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DnsStatus {
    pub mode: String,
    pub stub: String,
    pub upstreams: Vec<String>,
    /// Namespaces known to the stub, or why they are not.
    pub namespaces: String,
    pub hits: u64,
    pub misses: u64,
    pub refused: u64,
    pub malformed: u64,
    pub failures: u64,
}

/// What the daemon needs to start DNS.
pub struct Setup<'a> {
    pub setting: DnsSetting,
    pub run_dir: &'a Path,
    pub ifname: &'a str,
    /// The laptop's tunnel address: the stub listens there.
    pub address: IpAddr,
    /// The connect namespace.
    pub namespace: &'a str,
    pub domain: &'a str,
    pub cluster_dns: &'a [IpAddr],
    /// Addresses routed into the cluster (for reverse names).
    pub networks: &'a [IpNet],
    pub cluster: &'a Cluster,
}

/// The running stub and what was changed for it.
pub struct Running {
    mode: Mode,
    stub: Option<Arc<Stub>>,
    server: Option<Server>,
    refresher: Option<tokio::task::JoinHandle<()>>,
    run_dir: PathBuf,
    ifname: String,
    upstreams: Vec<SocketAddr>,
    namespaces: Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn off(run_dir: &Path) -> Self {
        Self {
            mode: Mode::Off,
            stub: None,
            server: None,
            refresher: None,
            run_dir: run_dir.to_owned(),
            ifname: String::new(),
            upstreams: Vec::new(),
            namespaces: Arc::default(),
        }
    }

    pub fn status(&self) -> DnsStatus {
        let stats = self.stub.as_ref().map(|s| s.stats()).unwrap_or_default();
        DnsStatus {
            mode: self.mode.to_string(),
            stub: self
                .server
                .as_ref()
                .map(|s| s.addr.to_string())
                .unwrap_or_default(),
            upstreams: self.upstreams.iter().map(ToString::to_string).collect(),
            namespaces: self
                .namespaces
                .lock()
                .map(|n| n.clone())
                .unwrap_or_default(),
            hits: stats.hits,
            misses: stats.misses,
            refused: stats.refused,
            malformed: stats.malformed,
            failures: stats.failures,
        }
    }

    /// One line for the human status.
    pub fn summary(&self) -> String {
        match self.mode {
            Mode::Off => "off (--dns=off: resolver configuration untouched)".into(),
            m => {
                let s = self.status();
                format!(
                    "{m}, stub {} (cache {} hits, {} misses)",
                    s.stub, s.hits, s.misses
                )
            }
        }
    }

    /// Stops the stub and restores the resolver configuration.
    pub fn stop(mut self) -> anyhow::Result<Option<String>> {
        if let Some(t) = self.refresher.take() {
            t.abort();
        }
        let note = match self.mode {
            Mode::Off => None,
            Mode::ResolvConf => system::restore(&self.run_dir)?,
            Mode::SystemdResolved => {
                system::resolved_revert(&self.ifname)?;
                Some(format!(
                    "reverted systemd-resolved settings of {}",
                    self.ifname
                ))
            }
        };
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        Ok(note)
    }
}

/// Puts back a resolv.conf a killed daemon left rewritten.
pub fn cleanup_stale(run_dir: &Path) -> anyhow::Result<Option<String>> {
    Ok(system::restore(run_dir)?.map(|n| format!("{n} (left by an earlier burrow)")))
}

async fn list_namespaces(cluster: &Cluster) -> Result<HashSet<String>, String> {
    match tokio::time::timeout(Duration::from_secs(10), facts::namespaces(cluster)).await {
        Ok(Ok(v)) => Ok(v.into_iter().collect()),
        Ok(Err(e)) => Err(e.reason),
        Err(_) => Err("listing namespaces took more than 10s".into()),
    }
}

fn describe(ns: &Result<HashSet<String>, String>) -> String {
    match ns {
        Ok(set) => {
            let mut v: Vec<&String> = set.iter().collect();
            v.sort();
            let v: Vec<&str> = v.into_iter().map(String::as_str).collect();
            v.join(", ")
        }
        Err(why) => format!(
            "unknown ({why}): `x.y` names are tried in the cluster first, then the laptop's resolvers"
        ),
    }
}

/// Starts the stub and points the system at it.
pub async fn start(s: Setup<'_>) -> anyhow::Result<Running> {
    if s.setting == DnsSetting::Off {
        return Ok(Running::off(s.run_dir));
    }
    let path = Path::new(system::RESOLV_CONF);
    let mode = system::detect(path);
    let domain = s.domain.trim_end_matches('.');
    if domain.is_empty() {
        anyhow::bail!(
            "the gateway reported no cluster domain (its resolv.conf has no `svc.<domain>` search entry); \
             connect with --dns=off, or check the gateway pod's DNS settings"
        );
    }
    let domain_name = Name::from_ascii(format!("{domain}."))
        .with_context(|| format!("the cluster domain {domain:?} is not a DNS name"))?;
    // The laptop's own servers: systemd-resolved's real upstreams (never
    // its own stub, which would route cluster names back here).
    let upstream_file = match mode {
        Mode::SystemdResolved => system::RESOLVED_UPSTREAMS,
        _ => system::RESOLV_CONF,
    };
    let original = ResolvConf::parse(&std::fs::read_to_string(upstream_file).unwrap_or_default());
    let upstreams = original.upstreams(s.address);
    let ns = list_namespaces(s.cluster).await;
    let namespaces = Arc::new(std::sync::Mutex::new(describe(&ns)));
    let view = ClusterView {
        domain: domain_name,
        namespace: s.namespace.to_owned(),
        namespaces: ns.as_ref().ok().cloned(),
        networks: s.networks.to_vec(),
    };
    let stub = Arc::new(Stub::new(
        Config {
            view,
            cluster_dns: s
                .cluster_dns
                .iter()
                .map(|ip| SocketAddr::new(*ip, 53))
                .collect(),
            upstreams: upstreams.clone(),
            allowed_sources: vec![s.address],
        },
        Arc::new(Network),
    ));
    let listen = SocketAddr::new(s.address, 53);
    let mut server = Server::start(stub.clone(), listen).await.with_context(|| {
        format!(
            "cannot start the DNS stub on {listen} (is another DNS server bound to every address?); \
             connect with --dns=off to do without cluster names"
        )
    })?;
    let search = system::search_list(s.namespace, domain, &original.search);
    let applied = match mode {
        Mode::SystemdResolved => {
            let list: Vec<String> = ns.iter().flatten().cloned().collect();
            system::resolved_apply(s.ifname, s.address, &search, domain, &list)
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
        _ => system::rewrite(path, s.run_dir, |orig| {
            let search = system::search_list(s.namespace, domain, &orig.search);
            system::stub_resolv_conf(s.address, &search, orig)
        })
        .map(|_| ())
        .map_err(anyhow::Error::from),
    };
    if let Err(e) = applied {
        server.stop();
        return Err(e.context(format!(
            "cannot point the system's resolver at the stub ({mode})"
        )));
    }
    let refresher = tokio::spawn(
        refresh(
            s.cluster.clone(),
            stub.clone(),
            namespaces.clone(),
            ns.ok(),
            mode,
            s.ifname.to_owned(),
            s.address,
            search,
            domain.to_owned(),
        )
        .in_current_span(),
    );
    Ok(Running {
        mode,
        stub: Some(stub),
        server: Some(server),
        refresher: Some(refresher),
        run_dir: s.run_dir.to_owned(),
        ifname: s.ifname.to_owned(),
        upstreams,
        namespaces,
    })
}

/// Keeps the namespace list fresh (and, with systemd-resolved, the routing
/// domains).
#[allow(clippy::too_many_arguments)]
async fn refresh(
    cluster: Cluster,
    stub: Arc<Stub>,
    shown: Arc<std::sync::Mutex<String>>,
    mut last: Option<HashSet<String>>,
    mode: Mode,
    ifname: String,
    address: IpAddr,
    search: Vec<String>,
    domain: String,
) {
    loop {
        tokio::time::sleep(NAMESPACES_EVERY).await;
        let ns = list_namespaces(&cluster).await;
        if let Ok(mut s) = shown.lock() {
            *s = describe(&ns);
        }
        let now = ns.ok();
        if now == last {
            continue;
        }
        stub.set_namespaces(now.clone());
        if mode == Mode::SystemdResolved {
            let list: Vec<String> = now.iter().flatten().cloned().collect();
            if let Err(e) = system::resolved_apply(&ifname, address, &search, &domain, &list) {
                tracing::warn!("updating systemd-resolved's routing domains: {e}");
            }
        }
        last = now;
    }
}
