//! Cluster DNS (dnsmasq in the node namespace on 10.244.0.1, reached at
//! 10.96.0.10:53 through kube-proxy's DNAT to the `kube-system/kube-dns`
//! endpoints, as CoreDNS is) and the laptops' "corporate" resolver (a
//! dnsmasq on the underlay at 192.168.240.53).
//!
//! Like CoreDNS, it answers a ClusterIP Service's name whatever its
//! endpoints, and it never stops answering: A, PTR and pod records live in
//! a hosts file re-read on SIGHUP (sent only to an instance that has
//! answered, so its handler is installed); SRV records are config lines, so
//! a change of them is a rolling replacement, as a CoreDNS rollout is: a new
//! instance on the next port ([`FIRST_PORT`]…), once it answers the
//! kube-dns Endpoints name its port (mirrored to a slice, then kube-proxy),
//! and the old one keeps answering until [`retire_after`] later. (Killing
//! and restarting one instance left milliseconds with nothing on port 53:
//! a query lost there while its AAAA twin got NODATA is glibc's "No
//! address associated with hostname", a CI failure once.)

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use minicluster_apiserver::Store;
use minicluster_apiserver::resources::must;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::ctx::{CLUSTER_DNS_IP, CLUSTER_DOMAIN, CORP_DNS_IP, ClusterCtx, POD_GATEWAY};
use crate::proxy::{backends, cluster_ip, is_headless, service_ports};

/// The corporate resolver's names.
pub const CORP_RECORDS: &[(&str, Ipv4Addr)] = &[
    ("intranet.example", Ipv4Addr::new(192, 168, 240, 80)),
    ("wiki.corp.example", Ipv4Addr::new(192, 168, 240, 81)),
];

/// The generated records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// hosts-file text (A records; dnsmasq derives PTR from them).
    pub hosts: String,
    /// `srv-host=` lines.
    pub srv: Vec<String>,
}

fn meta<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// `10.244.0.5` → `10-244-0-5`.
pub fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

/// Builds the cluster's DNS records from Services, their EndpointSlices
/// (CoreDNS reads slices only, every one labelled with the Service's name)
/// and pods.
pub fn records(services: &[Value], slices: &[Value], pods: &[Value]) -> Records {
    let d = CLUSTER_DOMAIN;
    // hosts lines, first name of an address first (it becomes the PTR).
    let mut lines: Vec<(Ipv4Addr, String)> = Vec::new();
    let mut srv = BTreeSet::new();
    let mut headless: BTreeSet<(String, String)> = BTreeSet::new();
    let mut services: Vec<&Value> = services.iter().collect();
    services.sort_by_key(|s| {
        (
            meta(s, "namespace").to_string(),
            meta(s, "name").to_string(),
        )
    });
    for svc in &services {
        let (ns, name) = (meta(svc, "namespace"), meta(svc, "name"));
        let fqdn = format!("{name}.{ns}.svc.{d}");
        if let Some(ip) = cluster_ip(svc) {
            lines.push((ip, fqdn.clone()));
            for p in service_ports(svc) {
                if !p.name.is_empty() {
                    srv.insert(format!(
                        "srv-host=_{}._{}.{fqdn},{fqdn},{},0,100",
                        p.name,
                        p.protocol.to_ascii_lowercase(),
                        p.port
                    ));
                }
            }
        } else if is_headless(svc) {
            headless.insert((ns.to_string(), name.to_string()));
            let ports = service_ports(svc);
            // The addresses: from every port's backends (a headless Service
            // may have no ports: then from the slices' endpoints directly).
            let mut addrs: BTreeMap<Ipv4Addr, Option<String>> = BTreeMap::new();
            let port_names: Vec<(String, String)> = if ports.is_empty() {
                vec![(String::new(), "TCP".to_string())]
            } else {
                ports
                    .iter()
                    .map(|p| (p.name.clone(), p.protocol.clone()))
                    .collect()
            };
            for (pname, proto) in &port_names {
                for b in backends(ns, name, pname, proto, slices)
                    .into_iter()
                    .filter(|b| b.ready)
                {
                    let target = format!(
                        "{}.{fqdn}",
                        b.hostname.clone().unwrap_or_else(|| dashed(b.ip))
                    );
                    if !pname.is_empty() {
                        srv.insert(format!(
                            "srv-host=_{pname}._{}.{fqdn},{target},{},0,100",
                            proto.to_ascii_lowercase(),
                            b.port
                        ));
                    }
                    let h = addrs.entry(b.ip).or_default();
                    if h.is_none() {
                        *h = b.hostname.clone();
                    }
                }
            }
            if ports.is_empty() {
                // Port-less headless: addresses straight from the slices.
                for s in slices.iter().filter(|s| {
                    meta(s, "namespace") == ns
                        && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                            == Some(name)
                }) {
                    for ep in s["endpoints"].as_array().into_iter().flatten() {
                        if ep["conditions"]["ready"].as_bool() == Some(false) {
                            continue;
                        }
                        for a in ep["addresses"].as_array().into_iter().flatten() {
                            if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                                addrs
                                    .entry(ip)
                                    .or_insert_with(|| ep["hostname"].as_str().map(str::to_string));
                            }
                        }
                    }
                }
            }
            for (ip, hostname) in addrs {
                let host = hostname.unwrap_or_else(|| dashed(ip));
                lines.push((ip, format!("{host}.{fqdn}")));
                lines.push((ip, fqdn.clone()));
            }
        }
    }
    let mut pods: Vec<&Value> = pods.iter().collect();
    pods.sort_by_key(|p| {
        (
            meta(p, "namespace").to_string(),
            meta(p, "name").to_string(),
        )
    });
    // Pods with hostname + subdomain naming a headless Service.
    for pod in &pods {
        let ns = meta(pod, "namespace");
        let Some(ip) = pod["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        if let (Some(h), Some(sub)) = (
            pod["spec"]["hostname"].as_str(),
            pod["spec"]["subdomain"].as_str(),
        ) && headless.contains(&(ns.to_string(), sub.to_string()))
        {
            lines.push((ip, format!("{h}.{sub}.{ns}.svc.{d}")));
        }
    }
    for pod in &pods {
        let ns = meta(pod, "namespace");
        if let Some(ip) = pod["status"]["podIP"]
            .as_str()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            lines.push((ip, format!("{}.{ns}.pod.{d}", dashed(ip))));
        }
    }
    let mut seen = BTreeSet::new();
    let mut hosts = String::new();
    for (ip, name) in lines {
        if seen.insert((ip, name.clone())) {
            hosts.push_str(&format!("{ip} {name}\n"));
        }
    }
    Records {
        hosts,
        srv: srv.into_iter().collect(),
    }
}

/// The first port a cluster DNS instance listens on (kube-dns's endpoints
/// port); later instances take the next ones, round the [`PORTS`].
pub const FIRST_PORT: u16 = 5301;
/// How many ports instances rotate through.
pub const PORTS: u16 = 16;

/// dnsmasq's configuration for a cluster DNS instance on `port`.
pub fn dnsmasq_conf(hosts_path: &Path, srv: &[String], port: u16) -> String {
    let mut c = format!(
        "# generated by the miniature cluster's DNS controller
no-resolv
no-hosts
no-poll
bind-interfaces
listen-address={POD_GATEWAY}
port={port}
user=root
local=/{CLUSTER_DOMAIN}/
local=/in-addr.arpa/
local=/ip6.arpa/
addn-hosts={}
local-ttl=5
log-facility=-
",
        hosts_path.display()
    );
    for l in srv {
        c.push_str(l);
        c.push('\n');
    }
    c
}

/// A `std::process::Command` that enters `netns` (network only) before exec.
pub fn command_in_netns(netns: &str, program: &str) -> anyhow::Result<std::process::Command> {
    let path = crate::net::netns_path(netns);
    let file = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut cmd = std::process::Command::new(program);
    // SAFETY: setns and setsid are async-signal-safe syscalls; the fd is
    // owned by the closure and stays open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawns a command and reaps it on a thread when it exits.
fn spawn_reaped(mut cmd: std::process::Command, what: &str) -> anyhow::Result<u32> {
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// Starts the laptops' corporate resolver: dnsmasq in the node namespace
/// bound to 192.168.240.53 only, answering `intranet.example` and
/// `wiki.corp.example`, REFUSED for the rest (no upstream). Returns its pid.
pub fn start_corp_dns(ctx: &ClusterCtx) -> anyhow::Result<u32> {
    let dir = ctx.state_dir.join("corp-dns");
    fs::create_dir_all(&dir)?;
    let log = fs::File::create(dir.join("dnsmasq.log"))?;
    let mut cmd = command_in_netns(&ctx.node_netns(), "dnsmasq")?;
    cmd.args([
        "-k",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        &format!("--listen-address={CORP_DNS_IP}"),
        "--user=root",
        "--local=/corp.example/",
        "--local=/example/",
        &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        "--log-facility=-",
    ]);
    for (name, ip) in CORP_RECORDS {
        cmd.arg(format!("--host-record={name},{ip}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let pid = spawn_reaped(cmd, "the corporate dnsmasq")?;
    wait_for_dns(
        &ctx.node_netns(),
        SocketAddr::from((CORP_DNS_IP, 53)),
        "intranet.example",
    )?;
    Ok(pid)
}

/// A minimal DNS query (`qtype` 1 = A, 33 = SRV), recursion desired.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

/// (rcode, answer count) of a response to query `id`.
pub fn parse_response_header(id: u16, resp: &[u8]) -> Option<(u8, u16)> {
    if resp.len() < 12 || u16::from_be_bytes([resp[0], resp[1]]) != id || resp[2] & 0x80 == 0 {
        return None;
    }
    Some((resp[3] & 0x0f, u16::from_be_bytes([resp[6], resp[7]])))
}

/// One UDP query from inside `netns`: (rcode, answer count).
pub fn query_in(
    netns: &str,
    server: SocketAddr,
    name: &str,
    qtype: u16,
) -> anyhow::Result<(u8, u16)> {
    let name = name.to_string();
    crate::net::in_netns(netns, move || -> anyhow::Result<(u8, u16)> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let id: u16 = rand::random();
        sock.send_to(&build_query(id, &name, qtype), server)?;
        let mut buf = [0u8; 1500];
        loop {
            let (n, _) = sock.recv_from(&mut buf)?;
            if let Some(r) = parse_response_header(id, &buf[..n]) {
                return Ok(r);
            }
        }
    })?
}

/// Whether cluster DNS answers `kubernetes.default.svc.cluster.local` at
/// 10.96.0.10 from inside the node namespace.
pub fn probe(ctx: &ClusterCtx) -> bool {
    matches!(
        query_in(
            &ctx.node_netns(),
            SocketAddr::from((CLUSTER_DNS_IP, 53)),
            &format!("kubernetes.default.svc.{CLUSTER_DOMAIN}"),
            1
        ),
        Ok((0, n)) if n > 0
    )
}

fn wait_for_dns(netns: &str, server: SocketAddr, name: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match query_in(netns, server, name, 1) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e.context(format!("dnsmasq at {server} does not answer")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One running cluster DNS instance.
struct Instance {
    child: tokio::process::Child,
    port: u16,
    srv: Vec<String>,
}

impl Instance {
    async fn start(
        dir: &Path,
        node: &str,
        hosts_path: &Path,
        srv: &[String],
        port: u16,
    ) -> anyhow::Result<Instance> {
        let conf_path = dir.join(format!("dnsmasq-{port}.conf"));
        fs::write(&conf_path, dnsmasq_conf(hosts_path, srv, port))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dnsmasq.log"))?;
        let mut cmd = command_in_netns(node, "dnsmasq")?;
        cmd.arg("-k")
            .arg(format!("--conf-file={}", conf_path.display()))
            .arg("--pid-file=")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let child = cmd.spawn().context("starting cluster dnsmasq")?;
        let mut inst = Instance {
            child,
            port,
            srv: srv.to_vec(),
        };
        // Signals only once it answers: a SIGHUP before dnsmasq installed
        // its handler would kill it.
        let (n, addr) = (node.to_string(), SocketAddr::from((POD_GATEWAY, port)));
        let probe = format!("kubernetes.default.svc.{CLUSTER_DOMAIN}");
        let answered = tokio::task::spawn_blocking(move || wait_for_dns(&n, addr, &probe)).await;
        match answered {
            // It answered and it is ours (not something else on the port).
            Ok(Ok(())) if !inst.exited() => Ok(inst),
            Ok(Ok(())) => Err(anyhow::anyhow!(
                "dnsmasq on port {port} exited (see {})",
                dir.join("dnsmasq.log").display()
            )),
            Ok(Err(e)) => {
                inst.stop().await;
                Err(e)
            }
            Err(e) => {
                inst.stop().await;
                Err(anyhow::anyhow!("waiting for dnsmasq: {e}"))
            }
        }
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait().await;
    }

    fn reload(&self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// How long a replaced instance keeps answering: past the longest the
/// switch of kube-dns's endpoints takes to reach kube-proxy's rules
/// (mirroring and kube-proxy informer lag, in-flight writes, two kube-proxy
/// sync periods), with 3 s to spare.
pub fn retire_after(lag: &crate::informer::Lag) -> Duration {
    lag.max_stale() * 2 + lag.proxy_min_sync * 2 + Duration::from_secs(3)
}

/// Points kube-dns's Endpoints at `port` (every subset port).
fn point_kube_dns(store: &Store, port: u16) -> anyhow::Result<()> {
    store
        .update_with(must("core/v1/endpoints"), "kube-system", "kube-dns", |ep| {
            for subset in ep["subsets"].as_array_mut().into_iter().flatten() {
                for p in subset["ports"].as_array_mut().into_iter().flatten() {
                    p["port"] = serde_json::json!(port);
                }
            }
            Ok(())
        })
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("pointing kube-dns at port {port}: {e}"))
}

fn current_records(store: &Store) -> Records {
    let (services, _) = store.list(must("core/v1/services"), None);
    let (slices, _) = store.list(must("discovery.k8s.io/v1/endpointslices"), None);
    let (pods, _) = store.list(must("core/v1/pods"), None);
    records(&services, &slices, &pods)
}

fn relevant(key: &str) -> bool {
    matches!(
        key,
        "core/v1/services" | "discovery.k8s.io/v1/endpointslices" | "core/v1/pods"
    )
}

/// Runs cluster DNS until the store's watch channel closes.
pub async fn run(store: Arc<Store>, ctx: ClusterCtx) -> anyhow::Result<()> {
    let dir = ctx.state_dir.join("dns");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hosts_path = dir.join("hosts");
    let node = ctx.node_netns();
    let retire = retire_after(&crate::informer::Lag::from_env());
    let (_, mut rx) = store
        .watch(None)
        .map_err(|e| anyhow::anyhow!("watch: {e:?}"))?;
    let mut active: Option<Instance> = None;
    let mut retiring: Vec<(Instant, Instance)> = Vec::new();
    let mut next_port = FIRST_PORT;
    let mut hosts_written: Option<String> = None;
    loop {
        let rec = current_records(&store);
        if hosts_written.as_ref() != Some(&rec.hosts) {
            let tmp = dir.join(".hosts.tmp");
            fs::write(&tmp, &rec.hosts)?;
            fs::rename(&tmp, &hosts_path)?;
            hosts_written = Some(rec.hosts.clone());
            for inst in active.iter().chain(retiring.iter().map(|(_, i)| i)) {
                inst.reload();
            }
        }
        let dead = active.as_mut().is_none_or(Instance::exited);
        let srv_changed = active.as_ref().is_some_and(|a| a.srv != rec.srv);
        // The next port no live instance holds (none free: wait for one to
        // retire).
        let busy: Vec<u16> = active
            .iter()
            .chain(retiring.iter().map(|(_, i)| i))
            .map(|i| i.port)
            .collect();
        let free = (0..PORTS)
            .map(|k| FIRST_PORT + (next_port - FIRST_PORT + k) % PORTS)
            .find(|p| !busy.contains(p));
        if let (true, Some(port)) = (dead || srv_changed, free) {
            next_port = FIRST_PORT + (port + 1 - FIRST_PORT) % PORTS;
            match Instance::start(&dir, &node, &hosts_path, &rec.srv, port).await {
                Ok(inst) => {
                    if let Err(e) = point_kube_dns(&store, port) {
                        tracing::error!("cluster DNS: {e:#}");
                    }
                    tracing::info!("cluster DNS: instance on port {port} answers");
                    if let Some(old) = active.replace(inst) {
                        retiring.push((Instant::now() + retire, old));
                    }
                }
                Err(e) => tracing::error!("cluster DNS: instance on port {port}: {e:#}"),
            }
        }
        let now = Instant::now();
        let mut keep = Vec::new();
        for (until, mut inst) in retiring.drain(..) {
            if until <= now || inst.exited() {
                tracing::info!("cluster DNS: instance on port {} retired", inst.port);
                inst.stop().await;
            } else {
                keep.push((until, inst));
            }
        }
        retiring = keep;
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if relevant(&ev.resource.key()) => return true,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return true,
                    Err(RecvError::Closed) => return false,
                }
            }
        };
        // Wake up now and then to retire old instances and restart one
        // that died.
        match tokio::time::timeout(Duration::from_millis(500), wait).await {
            Ok(false) => {
                for inst in active.iter_mut() {
                    inst.stop().await;
                }
                for (_, inst) in retiring.iter_mut() {
                    inst.stop().await;
                }
                return Ok(());
            }
            Ok(true) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects() -> (Vec<Value>, Vec<Value>, Vec<Value>) {
        let services = vec![
            json!({"metadata": {"namespace": "default", "name": "kubernetes"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}}),
            json!({"metadata": {"namespace": "default", "name": "echo"},
                   "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 8080}]}}),
            json!({"metadata": {"namespace": "data", "name": "db"},
                   "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        ];
        let slices = vec![json!({
            "metadata": {"namespace": "data", "name": "db-x", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.8"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.0.9"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.10"], "conditions": {"ready": false}}
            ]
        })];
        let pods = vec![
            json!({"metadata": {"namespace": "data", "name": "db-0"},
                   "spec": {"hostname": "db-0", "subdomain": "db"}, "status": {"podIP": "10.244.0.8"}}),
            json!({"metadata": {"namespace": "default", "name": "caller"}, "spec": {}, "status": {"podIP": "10.244.0.5"}}),
            json!({"metadata": {"namespace": "default", "name": "pending"}, "spec": {}, "status": {}}),
        ];
        (services, slices, pods)
    }

    #[test]
    fn records_for_services_headless_pods_and_srv() {
        let (s, sl, p) = objects();
        let r = records(&s, &sl, &p);
        let lines: Vec<&str> = r.hosts.lines().collect();
        for want in [
            "10.96.0.1 kubernetes.default.svc.cluster.local",
            "10.96.0.20 echo.default.svc.cluster.local",
            "10.244.0.8 db-0.db.data.svc.cluster.local",
            "10.244.0.8 db.data.svc.cluster.local",
            "10.244.0.9 10-244-0-9.db.data.svc.cluster.local",
            "10.244.0.9 db.data.svc.cluster.local",
            "10.244.0.8 10-244-0-8.data.pod.cluster.local",
            "10.244.0.5 10-244-0-5.default.pod.cluster.local",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{}", r.hosts);
        }
        assert!(!r.hosts.contains("10.244.0.10"));
        // No duplicate line for db-0 (endpoint hostname and pod subdomain).
        assert_eq!(
            lines
                .iter()
                .filter(|l| **l == "10.244.0.8 db-0.db.data.svc.cluster.local")
                .count(),
            1
        );
        // The service name comes before the pod name of the same address.
        let first_8 = lines
            .iter()
            .position(|l| l.starts_with("10.244.0.8 "))
            .unwrap_or(usize::MAX);
        assert_eq!(lines[first_8], "10.244.0.8 db-0.db.data.svc.cluster.local");
        assert_eq!(
            r.srv,
            vec![
                "srv-host=_http._tcp.echo.default.svc.cluster.local,echo.default.svc.cluster.local,8080,0,100",
                "srv-host=_https._tcp.kubernetes.default.svc.cluster.local,kubernetes.default.svc.cluster.local,443,0,100",
                "srv-host=_pg._tcp.db.data.svc.cluster.local,10-244-0-9.db.data.svc.cluster.local,5432,0,100",
                "srv-host=_pg._tcp.db.data.svc.cluster.local,db-0.db.data.svc.cluster.local,5432,0,100",
            ]
        );
    }

    #[test]
    fn config_text() {
        let c = dnsmasq_conf(
            Path::new("/x/hosts"),
            &["srv-host=_a._tcp.b,c,1,0,100".to_string()],
            5302,
        );
        for want in [
            "no-resolv\n",
            "no-hosts\n",
            "listen-address=10.244.0.1\n",
            "port=5302\n",
            "local=/cluster.local/\n",
            "addn-hosts=/x/hosts\n",
            "srv-host=_a._tcp.b,c,1,0,100\n",
        ] {
            assert!(c.contains(want), "{want:?}");
        }
    }

    #[test]
    fn query_encoding() {
        let q = build_query(0x1234, "a.bc", 1);
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1
            ]
        );
        let mut resp = q.clone();
        resp[2] |= 0x80;
        resp[3] = 3;
        assert_eq!(parse_response_header(0x1234, &resp), Some((3, 0)));
        assert_eq!(parse_response_header(0x1235, &resp), None);
    }
}
