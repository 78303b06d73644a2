//! kube-proxy, iptables mode, for the one node: ClusterIP:port and
//! NodePort → DNAT to the endpoints of every EndpointSlice labelled
//! `kubernetes.io/service-name` for the Service (whoever made it: the
//! EndpointSlice controller, the mirroring controller, anyone), ready ones
//! with random spread — serving terminating ones when none is ready — as
//! `pkg/proxy/endpointslicecache.go` does; a slice port without a name is
//! ignored, as there (so an unnamed Service port must be written
//! `"name": ""`). Endpoints objects are never read (kube-proxy has
//! proxied from EndpointSlices only since v1.22). Services without
//! endpoints → REJECT. Rewritten atomically (`iptables-restore --noflush`)
//! when the rule text changed, as the real one's `--iptables-min-sync-period`
//! (1 s) allows: a change after a quiet second at once (plus the informer
//! lag), changes within a second of the last write one second after it.
//! After each rewrite, the UDP
//! conntrack entries that would keep a flow on a removed endpoint (or on a
//! Service's earlier lack of one) are deleted, as kube-proxy does
//! (`conntrack -D` in the node namespace): a UDP client that keeps sending
//! reaches the new endpoints. The rules in force are recorded in the state
//! dir ([`SYNCED_RULES`]); `minicluster up` says ready only once they are
//! what the store asks for ([`in_sync`]), so a Service answers as soon as
//! `up` returns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use minicluster_apiserver::Store;
use minicluster_apiserver::resources::must;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::ctx::{ClusterCtx, NODE_UNDERLAY_IP};

/// One address of a Service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// `conditions.ready`, absent meaning true.
    pub ready: bool,
    /// `conditions.serving`, absent meaning true.
    pub serving: bool,
    /// `conditions.terminating`, absent meaning false.
    pub terminating: bool,
    /// `hostname` of the endpoint (headless Services with pod hostnames).
    pub hostname: Option<String>,
}

/// A Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    pub node_port: Option<u16>,
}

pub fn service_ports(svc: &Value) -> Vec<ServicePort> {
    svc["spec"]["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    Some(ServicePort {
                        name: p["name"].as_str().unwrap_or("").to_string(),
                        port: u16::try_from(p["port"].as_u64()?).ok()?,
                        protocol: p["protocol"].as_str().unwrap_or("TCP").to_string(),
                        node_port: p["nodePort"]
                            .as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|&n| n > 0),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The Service's ClusterIP, if it has one (not headless, not ExternalName).
pub fn cluster_ip(svc: &Value) -> Option<Ipv4Addr> {
    if svc["spec"]["type"].as_str() == Some("ExternalName") {
        return None;
    }
    svc["spec"]["clusterIP"].as_str()?.parse().ok()
}

pub fn is_headless(svc: &Value) -> bool {
    svc["spec"]["clusterIP"].as_str() == Some("None")
}

fn meta<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or("")
}

/// The backends of port (`port_name`, `protocol`) of Service `ns/name`:
/// the union of the endpoints of every IPv4 EndpointSlice labelled
/// `kubernetes.io/service-name: name` in `ns` (an address in two slices
/// counts once). Sorted.
pub fn backends(
    ns: &str,
    name: &str,
    port_name: &str,
    protocol: &str,
    slices: &[Value],
) -> Vec<Backend> {
    let mut out: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
    let own = slices.iter().filter(|s| {
        meta(s, "namespace") == ns
            && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str() == Some(name)
            && s["addressType"].as_str().unwrap_or("IPv4") == "IPv4"
    });
    for slice in own {
        let Some(ports) = slice["ports"].as_array() else {
            continue;
        };
        for p in ports {
            // A port without a name is skipped ("Ignoring port with nil
            // name"): only `""` names an unnamed Service port.
            let Some(pname) = p["name"].as_str() else {
                continue;
            };
            if pname != port_name || p["protocol"].as_str().unwrap_or("TCP") != protocol {
                continue;
            }
            let Some(port) = p["port"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            else {
                continue;
            };
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                let c = &ep["conditions"];
                let hostname = ep["hostname"].as_str().map(str::to_string);
                // The first address of an endpoint is the one proxied to.
                let Some(ip) = ep["addresses"][0]
                    .as_str()
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
                else {
                    continue;
                };
                out.entry((ip, port)).or_insert(Backend {
                    ip,
                    port,
                    ready: c["ready"].as_bool() != Some(false),
                    serving: c["serving"].as_bool() != Some(false),
                    terminating: c["terminating"].as_bool() == Some(true),
                    hostname,
                });
            }
        }
    }
    out.into_values().collect()
}

/// The endpoints kube-proxy sends new connections to: the ready ones, or if
/// there is none, the serving terminating ones.
pub fn usable(all: &[Backend]) -> Vec<&Backend> {
    let ready: Vec<&Backend> = all.iter().filter(|b| b.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    all.iter().filter(|b| b.serving && b.terminating).collect()
}

fn dnat_rules(out: &mut String, chain: &str, matcher: &str, comment: &str, ready: &[&Backend]) {
    let n = ready.len();
    for (i, b) in ready.iter().enumerate() {
        let spread = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "-A {chain} {matcher} -m comment --comment \"{comment}\"{spread} -j DNAT --to-destination {}:{}\n",
            b.ip, b.port
        ));
    }
}

/// The `iptables-restore --noflush` input for the Services and their
/// endpoints: nat `KUBE-SERVICES`/`KUBE-NODEPORTS` and filter
/// `KUBE-SERVICES` (declaring a chain flushes it). Deterministic.
pub fn rules_text(services: &[Value], slices: &[Value]) -> String {
    let mut nat = String::new();
    let mut nodeports = String::new();
    let mut filter = String::new();
    let mut services: Vec<&Value> = services.iter().collect();
    services.sort_by_key(|s| {
        (
            meta(s, "namespace").to_string(),
            meta(s, "name").to_string(),
        )
    });
    for svc in services {
        let Some(ip) = cluster_ip(svc) else { continue };
        let (ns, name) = (meta(svc, "namespace"), meta(svc, "name"));
        for sp in service_ports(svc) {
            let proto = sp.protocol.to_ascii_lowercase();
            let comment = if sp.name.is_empty() {
                format!("{ns}/{name}")
            } else {
                format!("{ns}/{name}:{}", sp.name)
            };
            let all = backends(ns, name, &sp.name, &sp.protocol, slices);
            let ready = usable(&all);
            let cluster_match = format!("-d {ip}/32 -p {proto} -m {proto} --dport {}", sp.port);
            let node_match = sp
                .node_port
                .map(|np| format!("-p {proto} -m {proto} --dport {np}"));
            if ready.is_empty() {
                let reject = if proto == "tcp" {
                    "tcp-reset"
                } else {
                    "icmp-port-unreachable"
                };
                filter.push_str(&format!(
                    "-A KUBE-SERVICES {cluster_match} -m comment --comment \"{comment} has no endpoints\" -j REJECT --reject-with {reject}\n"
                ));
                if let Some(np) = sp.node_port {
                    filter.push_str(&format!(
                        "-A KUBE-SERVICES -d {NODE_UNDERLAY_IP}/32 -p {proto} -m {proto} --dport {np} -m comment --comment \"{comment} has no endpoints\" -j REJECT --reject-with {reject}\n"
                    ));
                }
            } else {
                dnat_rules(&mut nat, "KUBE-SERVICES", &cluster_match, &comment, &ready);
                if let Some(m) = node_match {
                    dnat_rules(&mut nodeports, "KUBE-NODEPORTS", &m, &comment, &ready);
                }
            }
        }
    }
    format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n{nat}-A KUBE-SERVICES -d {NODE_UNDERLAY_IP}/32 -j KUBE-NODEPORTS\n{nodeports}COMMIT\n*filter\n:KUBE-SERVICES - [0:0]\n{filter}COMMIT\n"
    )
}

/// A UDP Service port, as kube-proxy's conntrack cleanup sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpPort {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// Every UDP Service port with its ready endpoints (IP, port).
pub fn udp_endpoints(
    services: &[Value],
    slices: &[Value],
) -> BTreeMap<UdpPort, BTreeSet<(Ipv4Addr, u16)>> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(ip) = cluster_ip(svc) else { continue };
        let (ns, name) = (meta(svc, "namespace"), meta(svc, "name"));
        for sp in service_ports(svc)
            .into_iter()
            .filter(|p| p.protocol == "UDP")
        {
            let all = backends(ns, name, &sp.name, "UDP", slices);
            let ready = usable(&all).into_iter().map(|b| (b.ip, b.port)).collect();
            out.insert(
                UdpPort {
                    cluster_ip: ip,
                    port: sp.port,
                    node_port: sp.node_port,
                },
                ready,
            );
        }
    }
    out
}

/// The `conntrack` invocations (arguments) that clear UDP state made stale
/// by going from `old` to `new` endpoints, as kube-proxy's cleanup does:
/// flows DNAT'd to an endpoint (IP and port) that was removed (by ClusterIP
/// and by NodePort), and flows to a Service port that had no endpoints before
/// (they were rejected and must not stick to that).
pub fn conntrack_cleanup(
    old: &BTreeMap<UdpPort, BTreeSet<(Ipv4Addr, u16)>>,
    new: &BTreeMap<UdpPort, BTreeSet<(Ipv4Addr, u16)>>,
) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut push = |args: Vec<String>| {
        if !out.contains(&args) {
            out.push(args);
        }
    };
    let none = BTreeSet::new();
    for (svc, was) in old {
        let now = new.get(svc).unwrap_or(&none);
        // By endpoint IP and port, as kube-proxy's conntrack reconciler
        // does: an endpoint that moved to another port of the same IP
        // (the cluster DNS's rolling replacement) keeps its new flows.
        for (ip, port) in was.difference(now) {
            let (ip, port) = (ip.to_string(), port.to_string());
            push(vec![
                "-D".into(),
                "-p".into(),
                "udp".into(),
                "--orig-dst".into(),
                svc.cluster_ip.to_string(),
                "--dst-nat".into(),
                ip.clone(),
                "--reply-port-src".into(),
                port.clone(),
            ]);
            if let Some(np) = svc.node_port {
                push(vec![
                    "-D".into(),
                    "-p".into(),
                    "udp".into(),
                    "--orig-port-dst".into(),
                    np.to_string(),
                    "--dst-nat".into(),
                    ip,
                    "--reply-port-src".into(),
                    port,
                ]);
            }
        }
    }
    for (svc, now) in new {
        let had = old.get(svc).is_some_and(|w| !w.is_empty());
        if !now.is_empty() && !had {
            push(vec![
                "-D".into(),
                "-p".into(),
                "udp".into(),
                "--orig-dst".into(),
                svc.cluster_ip.to_string(),
                "--orig-port-dst".into(),
                svc.port.to_string(),
            ]);
            if let Some(np) = svc.node_port {
                push(vec![
                    "-D".into(),
                    "-p".into(),
                    "udp".into(),
                    "--orig-port-dst".into(),
                    np.to_string(),
                ]);
            }
        }
    }
    out
}

/// Runs `conntrack ARGS` in the node namespace; "0 flow entries have been
/// deleted" is not an error.
pub fn run_conntrack(node_netns: &str, args: &[String]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", node_netns, "conntrack"];
    all.extend(args.iter().map(String::as_str));
    match crate::net::run_cmd("ip", &all) {
        Ok(_) => Ok(()),
        Err(e) if format!("{e:#}").contains("0 flow entries") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies rule text in the node namespace.
pub fn apply(node_netns: &str, text: &str) -> anyhow::Result<()> {
    crate::net::run_cmd_input(
        "ip",
        &["netns", "exec", node_netns, "iptables-restore", "--noflush"],
        Some(text),
    )
    .map(|_| ())
}

type UdpState = BTreeMap<UdpPort, BTreeSet<(Ipv4Addr, u16)>>;

/// The rule text and the UDP endpoints it sends to.
/// The rules kube-proxy last put in force, in the cluster's state dir.
pub const SYNCED_RULES: &str = "kube-proxy.rules";

/// Whether kube-proxy's rules in force are the ones the store asks for now.
pub fn in_sync(store: &Store, state_dir: &std::path::Path) -> bool {
    std::fs::read_to_string(state_dir.join(SYNCED_RULES))
        .is_ok_and(|applied| applied == current_rules(store).0)
}

fn current_rules(store: &Store) -> (String, UdpState) {
    let (services, _) = store.list(must("core/v1/services"), None);
    let (slices, _) = store.list(must("discovery.k8s.io/v1/endpointslices"), None);
    (
        rules_text(&services, &slices),
        udp_endpoints(&services, &slices),
    )
}

fn relevant(key: &str) -> bool {
    matches!(
        key,
        "core/v1/services" | "discovery.k8s.io/v1/endpointslices"
    )
}

/// kube-proxy's sync runner (`BoundedFrequencyRunner`): a token bucket of
/// `burst` syncs refilled at one per `min_interval`.
#[derive(Debug, Clone)]
pub struct SyncRunner {
    min_interval: Duration,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl SyncRunner {
    /// kube-proxy's iptables mode: burst 2.
    pub fn new(min_interval: Duration) -> SyncRunner {
        SyncRunner {
            min_interval,
            burst: 2.0,
            tokens: 2.0,
            at: tokio::time::Instant::now(),
        }
    }

    fn refill(&mut self, now: tokio::time::Instant) {
        if self.min_interval.is_zero() {
            self.tokens = self.burst;
        } else {
            let gained =
                now.duration_since(self.at).as_secs_f64() / self.min_interval.as_secs_f64();
            self.tokens = (self.tokens + gained).min(self.burst);
        }
        self.at = now;
    }

    /// When the next sync may run (now, or when a token is back).
    pub fn ready_at(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            now
        } else {
            now + self.min_interval.mul_f64(1.0 - self.tokens)
        }
    }

    /// A sync ran at `now`.
    pub fn took(&mut self, now: tokio::time::Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Runs kube-proxy until the store's watch channel closes. After a change it
/// waits the informer lag, then for its sync runner, then reads what is
/// there and writes the rules if they differ.
pub async fn run(store: Arc<Store>, ctx: ClusterCtx) -> anyhow::Result<()> {
    let lag = crate::informer::Lag::from_env();
    let node = ctx.node_netns();
    let (_, mut rx) = store
        .watch(None)
        .map_err(|e| anyhow::anyhow!("watch: {e:?}"))?;
    let mut runner = SyncRunner::new(lag.proxy_min_sync);
    let mut last = String::new();
    // The UDP endpoints the applied rules send to.
    let mut last_udp = UdpState::new();
    loop {
        let (text, udp) = current_rules(&store);
        if text != last {
            runner.took(tokio::time::Instant::now());
            let (n, t) = (node.clone(), text.clone());
            match tokio::task::spawn_blocking(move || apply(&n, &t)).await {
                Ok(Ok(())) => {
                    // When the rules changed, for a failed test's log (a
                    // Service that refused for longer than kube-proxy's
                    // lag).
                    tracing::info!(
                        rules = text.lines().count(),
                        udp_services = udp.len(),
                        "kube-proxy: rules written"
                    );
                    last = text.clone();
                    // What is in force, for `minicluster up` to wait on.
                    let synced = ctx.state_dir.join(SYNCED_RULES);
                    let tmp = ctx.state_dir.join(".kube-proxy-rules.tmp");
                    if let Err(e) =
                        std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &synced))
                    {
                        tracing::debug!("kube-proxy: recording its rules: {e}");
                    }
                    // After the new rules are in: no new flow can pick the
                    // old endpoints any more.
                    let cleanup = conntrack_cleanup(&last_udp, &udp);
                    last_udp = udp;
                    if !cleanup.is_empty() {
                        let n = node.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            for args in cleanup {
                                if let Err(e) = run_conntrack(&n, &args) {
                                    tracing::warn!("kube-proxy: {e:#}");
                                }
                            }
                        })
                        .await;
                    }
                }
                Ok(Err(e)) => tracing::error!("kube-proxy: {e:#}"),
                Err(e) => tracing::error!("kube-proxy: {e}"),
            }
        }
        // Wait for a relevant change (or retry a failed write soon).
        let retry = text != last;
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
        if retry {
            let _ = tokio::time::timeout(Duration::from_millis(500), wait).await;
        } else if !wait.await {
            return Ok(());
        }
        // The change reaches kube-proxy's informer after the watch lag;
        // then the sync runner decides when the rules are written.
        tokio::time::sleep(lag.informer_delay()).await;
        let at = runner.ready_at(tokio::time::Instant::now());
        tokio::time::sleep_until(at).await;
        while let Ok(_ev) = rx.try_recv() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}, "spec": {"clusterIP": ip, "ports": ports}})
    }

    fn slice(ns: &str, svc: &str, ports: Value, eps: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": format!("{svc}-abc"),
                "labels": {"kubernetes.io/service-name": svc}},
               "addressType": "IPv4", "ports": ports, "endpoints": eps})
    }

    #[test]
    fn dnat_with_random_spread_and_named_ports() {
        let services = vec![svc(
            "default",
            "echo",
            "10.96.0.20",
            json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}]),
        )];
        let slices = vec![slice(
            "default",
            "echo",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            json!([
                {"addresses": ["10.244.0.3"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.4"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.5"], "conditions": {}},
                {"addresses": ["10.244.0.6"], "conditions": {"ready": false}}
            ]),
        )];
        let text = rules_text(&services, &slices);
        let m = "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -m comment --comment \"default/echo:http\"";
        assert!(text.contains(&format!(
            "{m} -m statistic --mode random --probability 0.3333333333 -j DNAT --to-destination 10.244.0.3:8080\n"
        )));
        assert!(text.contains(&format!(
            "{m} -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.244.0.4:8080\n"
        )));
        assert!(text.contains(&format!("{m} -j DNAT --to-destination 10.244.0.5:8080\n")));
        assert!(!text.contains("10.244.0.6"));
        assert!(text.contains("-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -m comment --comment \"default/echo:http\" -m statistic --mode random --probability 0.3333333333 -j DNAT --to-destination 10.244.0.3:8080\n"));
        assert!(text.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n"));
        assert!(text.contains("-A KUBE-SERVICES -d 192.168.240.1/32 -j KUBE-NODEPORTS\n"));
        assert!(text.ends_with("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n"));
        // The nodeport jump comes after every ClusterIP rule.
        let jump = text.find("-j KUBE-NODEPORTS").unwrap_or(0);
        assert!(
            text.rfind("-A KUBE-SERVICES -d 10.96")
                .unwrap_or(usize::MAX)
                < jump
        );
    }

    #[test]
    fn no_endpoints_reject_and_udp_and_mirrored_slices() {
        let services = vec![
            svc("default", "empty", "10.96.0.30", json!([{"port": 80}])),
            svc(
                "default",
                "udp",
                "10.96.0.31",
                json!([{"port": 9000, "protocol": "UDP", "nodePort": 30900}]),
            ),
            svc(
                "kube-system",
                "kube-dns",
                "10.96.0.10",
                json!([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
            ),
            svc("data", "db", "None", json!([{"port": 5432}])),
        ];
        let mut mirrored = slice(
            "kube-system",
            "kube-dns",
            json!([{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
            json!([{"addresses": ["10.244.0.1"], "conditions": {"ready": true}}]),
        );
        mirrored["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] =
            json!("endpointslicemirroring-controller.k8s.io");
        let slices = vec![mirrored];
        let text = rules_text(&services, &slices);
        assert!(text.contains("-A KUBE-SERVICES -d 10.96.0.30/32 -p tcp -m tcp --dport 80 -m comment --comment \"default/empty has no endpoints\" -j REJECT --reject-with tcp-reset\n"));
        assert!(text.contains("-A KUBE-SERVICES -d 10.96.0.31/32 -p udp -m udp --dport 9000 -m comment --comment \"default/udp has no endpoints\" -j REJECT --reject-with icmp-port-unreachable\n"));
        assert!(text.contains("-A KUBE-SERVICES -d 192.168.240.1/32 -p udp -m udp --dport 30900 -m comment --comment \"default/udp has no endpoints\" -j REJECT --reject-with icmp-port-unreachable\n"));
        assert!(text.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -m comment --comment \"kube-system/kube-dns:dns\" -j DNAT --to-destination 10.244.0.1:53\n"));
        assert!(text.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -m comment --comment \"kube-system/kube-dns:dns-tcp\" -j DNAT --to-destination 10.244.0.1:53\n"));
        assert!(!text.contains("data/db"));
        // Deterministic.
        assert_eq!(text, rules_text(&services, &slices));
    }

    #[test]
    fn udp_conntrack_is_cleared_for_removed_endpoints_and_new_services() {
        let services = vec![
            svc(
                "default",
                "udp-echo",
                "10.96.0.31",
                json!([{"name": "udp", "port": 9000, "protocol": "UDP", "nodePort": 30900}]),
            ),
            svc("default", "web", "10.96.0.40", json!([{"port": 80}])),
        ];
        let slice_with = |ips: &[&str]| {
            let eps: Vec<Value> = ips
                .iter()
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
                .collect();
            vec![slice(
                "default",
                "udp-echo",
                json!([{"name": "udp", "port": 9000, "protocol": "UDP"}]),
                json!(eps),
            )]
        };
        let before = udp_endpoints(&services, &slice_with(&["10.244.0.5", "10.244.0.6"]));
        assert_eq!(before.len(), 1, "TCP ports are not tracked: {before:?}");
        let port = UdpPort {
            cluster_ip: "10.96.0.31".parse().expect("ip"),
            port: 9000,
            node_port: Some(30900),
        };
        assert_eq!(before[&port].len(), 2);
        let s = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        // One endpoint goes: its flows, by ClusterIP and by NodePort.
        let after = udp_endpoints(&services, &slice_with(&["10.244.0.6"]));
        assert_eq!(
            conntrack_cleanup(&before, &after),
            vec![
                s(&[
                    "-D",
                    "-p",
                    "udp",
                    "--orig-dst",
                    "10.96.0.31",
                    "--dst-nat",
                    "10.244.0.5",
                    "--reply-port-src",
                    "9000"
                ]),
                s(&[
                    "-D",
                    "-p",
                    "udp",
                    "--orig-port-dst",
                    "30900",
                    "--dst-nat",
                    "10.244.0.5",
                    "--reply-port-src",
                    "9000"
                ]),
            ]
        );
        // Nothing changed: nothing to clear.
        assert!(conntrack_cleanup(&after, &after).is_empty());
        // All gone, then a replacement: the old one's flows, then anything
        // that stuck to the Service while it had none.
        let empty = udp_endpoints(&services, &slice_with(&[]));
        assert_eq!(conntrack_cleanup(&after, &empty).len(), 2);
        let replaced = udp_endpoints(&services, &slice_with(&["10.244.0.9"]));
        assert_eq!(
            conntrack_cleanup(&empty, &replaced),
            vec![
                s(&[
                    "-D",
                    "-p",
                    "udp",
                    "--orig-dst",
                    "10.96.0.31",
                    "--orig-port-dst",
                    "9000"
                ]),
                s(&["-D", "-p", "udp", "--orig-port-dst", "30900"]),
            ]
        );
        // Straight from one endpoint to another: the old one's flows.
        assert_eq!(conntrack_cleanup(&after, &replaced).len(), 2);
        // The same IP on another port (a rolling replacement): only the
        // old port's flows go.
        let moved = udp_endpoints(
            &services,
            &slice_with(&["10.244.0.6"])
                .into_iter()
                .map(|mut sl| {
                    sl["ports"][0]["port"] = json!(9001);
                    sl
                })
                .collect::<Vec<_>>(),
        );
        let cleared = conntrack_cleanup(&after, &moved);
        assert_eq!(cleared.len(), 2, "{cleared:?}");
        assert!(
            cleared
                .iter()
                .all(|a| a.ends_with(&s(&["--reply-port-src", "9000"]))),
            "{cleared:?}"
        );
        assert_eq!(conntrack_cleanup(&UdpState::new(), &replaced).len(), 2);
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let services = vec![svc(
            "default",
            "web",
            "10.96.0.40",
            json!([{"name": "a", "port": 80}, {"name": "b", "port": 81}]),
        )];
        let slices = vec![slice(
            "default",
            "web",
            json!([{"name": "a", "port": 8080}, {"name": "b", "port": 8081, "protocol": "UDP"}]),
            json!([{"addresses": ["10.244.0.9"]}]),
        )];
        let text = rules_text(&services, &slices);
        assert!(text.contains("--dport 80 -m comment --comment \"default/web:a\" -j DNAT --to-destination 10.244.0.9:8080"));
        assert!(text.contains(
            "--dport 81 -m comment --comment \"default/web:b has no endpoints\" -j REJECT"
        ));
    }

    /// Every slice of the Service counts (the controller's, a mirrored one,
    /// anyone's), an address in two slices once; a port without a name is
    /// ignored; with no ready endpoint, serving terminating ones are used.
    #[test]
    fn union_of_all_slices_nameless_ports_and_terminating_fallback() {
        let services = vec![
            svc("default", "echo", "10.96.0.20", json!([{"port": 80}])),
            svc(
                "default",
                "drain",
                "10.96.0.21",
                json!([{"name": "h", "port": 80}]),
            ),
        ];
        let mut controller = slice(
            "default",
            "echo",
            json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
            json!([{"addresses": ["10.244.0.3"], "conditions": {"ready": true}},
                   {"addresses": ["10.244.0.4"], "conditions": {"ready": true}}]),
        );
        controller["metadata"]["name"] = json!("echo-ctl");
        let mut mirrored = slice(
            "default",
            "echo",
            json!([{"name": "", "port": 8080, "protocol": "TCP"}]),
            json!([{"addresses": ["10.244.0.4"], "conditions": {"ready": true}},
                   {"addresses": ["10.244.0.5"], "conditions": {"ready": true}}]),
        );
        mirrored["metadata"]["name"] = json!("echo-mirror");
        // A port with no name at all (JSON null): kube-proxy skips it.
        let mut nameless = slice(
            "default",
            "echo",
            json!([{"name": null, "port": 3000, "protocol": "TCP"}]),
            json!([{"addresses": ["10.244.0.66"], "conditions": {"ready": true}}]),
        );
        nameless["metadata"]["name"] = json!("echo-nameless");
        let draining = slice(
            "default",
            "drain",
            json!([{"name": "h", "port": 80, "protocol": "TCP"}]),
            json!([
                {"addresses": ["10.244.0.7"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.0.8"], "conditions": {"ready": false, "serving": false, "terminating": true}}
            ]),
        );
        let slices = vec![controller, mirrored, nameless, draining];
        let all = backends("default", "echo", "", "TCP", &slices);
        let ips: Vec<String> = all.iter().map(|b| b.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.0.3", "10.244.0.4", "10.244.0.5"]);
        let text = rules_text(&services, &slices);
        assert!(text.contains("probability 0.3333333333 -j DNAT --to-destination 10.244.0.3:8080"));
        assert!(!text.contains("10.244.0.66"));
        assert!(text.contains("\"default/drain:h\" -j DNAT --to-destination 10.244.0.7:80\n"));
        assert!(!text.contains("10.244.0.8"));
    }

    #[tokio::test]
    async fn sync_runner_bursts_two_then_one_per_period() {
        let t0 = tokio::time::Instant::now();
        let mut r = SyncRunner::new(Duration::from_secs(1));
        assert_eq!(r.ready_at(t0), t0);
        r.took(t0);
        assert_eq!(r.ready_at(t0), t0);
        r.took(t0);
        let next = r.ready_at(t0);
        assert!(next >= t0 + Duration::from_millis(999), "{:?}", next - t0);
        let mut none = SyncRunner::new(Duration::ZERO);
        for _ in 0..5 {
            none.took(t0);
        }
        assert_eq!(none.ready_at(t0), t0);
    }
}
