//! burrow's gateway deployed into a miniature cluster the way a user would:
//! WireGuard keys generated with `wg`, the configuration Secret, `kubectl
//! apply` of `deploy/manifests/gateway.yaml`, waiting for the pod to be
//! Ready, and the NodePorts of its Service.
//!
//! Must never: start the gateway any other way than through the API server
//! (the kubelet runs the freshly built `burrow-gateway` for the manifest's
//! image), or keep state outside the cluster (everything goes with `down`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cluster::{Cluster, tail};
use crate::ctx::{NODE_UNDERLAY_IP, POD_GATEWAY};
use crate::net;

/// Namespace, Deployment/Service name and pod label of the manifest.
pub const NAMESPACE: &str = "burrow-system";
pub const NAME: &str = "burrow-gateway";
pub const SECRET: &str = "burrow-gateway-config";
const POD_SELECTOR: &str = "app.kubernetes.io/name=burrow-gateway";
/// The gateway's metrics port (the manifest's `--metrics-port`).
pub const METRICS_PORT: u16 = 9090;

/// How long the gateway pod may take to become Ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `deploy/manifests/gateway.yaml` of this workspace.
pub fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/gateway.yaml")
}

/// A WireGuard key pair in WireGuard's base64 form.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_key: String,
    pub public_key: String,
}

impl KeyPair {
    /// `wg genkey` and `wg pubkey` (package wireguard-tools).
    pub fn generate() -> Result<KeyPair> {
        let private_key = net::run_cmd("wg", &["genkey"])
            .context("generating a WireGuard key (is wireguard-tools installed?)")?
            .trim()
            .to_string();
        let public_key = net::run_cmd_input("wg", &["pubkey"], Some(&private_key))
            .context("deriving a WireGuard public key")?
            .trim()
            .to_string();
        Ok(KeyPair {
            private_key,
            public_key,
        })
    }
}

/// One laptop the gateway knows: its keys and its tunnel address.
#[derive(Debug, Clone)]
pub struct Peer {
    pub keys: KeyPair,
    pub tunnel_ip: Ipv4Addr,
}

/// A running gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub keys: KeyPair,
    pub peers: Vec<Peer>,
    pub pod: String,
    pub pod_ip: Ipv4Addr,
    /// NodePort of the `wireguard` (UDP) port.
    pub wg_node_port: u16,
    /// NodePort of the `framed` (TCP) port.
    pub framed_node_port: u16,
    log: PathBuf,
}

impl Gateway {
    /// Where laptops send WireGuard over UDP: the node's underlay address
    /// and the Service's NodePort.
    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(NODE_UNDERLAY_IP, self.wg_node_port)
    }

    /// `http://<pod IP>:9090/metrics`.
    pub fn metrics_url(&self) -> String {
        format!("http://{}:{METRICS_PORT}/metrics", self.pod_ip)
    }

    /// The last lines of the gateway's log (its container's stderr), for
    /// failure messages; without the kubelet's readiness probes (framed
    /// connections from the node's pod-bridge address).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let probe = format!("{POD_GATEWAY}]");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !(l.contains("framed connection") && l.contains(&probe)))
            .collect();
        let mut out = kept[kept.len().saturating_sub(lines)..].join("\n");
        out.push('\n');
        out
    }

    /// `pod/burrow-system/<pod>`, a target for [`Cluster::exec`].
    pub fn target(&self) -> String {
        format!("pod/{NAMESPACE}/{}", self.pod)
    }
}

/// The gateway's configuration file: its key and one `[Peer]` per laptop.
pub fn gateway_conf(keys: &KeyPair, peers: &[Peer]) -> String {
    let mut text = format!("[Interface]\nPrivateKey = {}\n", keys.private_key);
    for p in peers {
        text.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            p.keys.public_key, p.tunnel_ip
        ));
    }
    text
}

/// `kubectl --kubeconfig <host kubeconfig> ARGS`, `input` on stdin; stdout,
/// or an error with stderr.
fn kubectl(cluster: &Cluster, args: &[&str], input: Option<&str>) -> Result<String> {
    let kubeconfig = cluster.host_kubeconfig();
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap_or_default()];
    all.extend_from_slice(args);
    net::run_cmd_input("kubectl", &all, input)
}

/// Deploys the gateway with one peer per address in `tunnel_ips` (fresh
/// keys for everyone) and waits until its pod is Ready.
pub fn deploy(cluster: &Cluster, tunnel_ips: &[Ipv4Addr]) -> Result<Gateway> {
    let manifest = manifest_path();
    if !manifest.exists() {
        bail!("no gateway manifest at {}", manifest.display());
    }
    let keys = KeyPair::generate()?;
    let peers = tunnel_ips
        .iter()
        .map(|&tunnel_ip| {
            Ok(Peer {
                keys: KeyPair::generate()?,
                tunnel_ip,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    // The Secret first (as `burrow install` does), so the pod never starts
    // without its configuration.
    let namespace = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE},
    });
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NAMESPACE},
        "type": "Opaque",
        "stringData": {"gateway.conf": gateway_conf(&keys, &peers)},
    });
    let secret = format!(
        "{}---\n{}",
        serde_yaml::to_string(&namespace)?,
        serde_yaml::to_string(&secret)?
    );
    kubectl(cluster, &["apply", "-f", "-"], Some(&secret))
        .context("creating the gateway's configuration Secret")?;
    kubectl(
        cluster,
        &["apply", "-f", manifest.to_str().unwrap_or_default()],
        None,
    )
    .with_context(|| format!("kubectl apply -f {}", manifest.display()))?;

    let pod = wait_ready(cluster)?;
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let pod_ip: Ipv4Addr = pod["status"]["podIP"]
        .as_str()
        .unwrap_or("")
        .parse()
        .with_context(|| format!("pod {name} has no IPv4 podIP"))?;

    let svc: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "service", NAME, "-n", NAMESPACE, "-o", "json"],
        None,
    )?)
    .context("parsing the gateway Service")?;
    let node_port = |port: &str| -> Result<u16> {
        svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == port)
            .and_then(|p| p["nodePort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("Service {NAMESPACE}/{NAME} has no nodePort for {port}"))
    };
    Ok(Gateway {
        keys,
        peers,
        wg_node_port: node_port("wireguard")?,
        framed_node_port: node_port("framed")?,
        log: cluster
            .state_dir()
            .join("pods")
            .join(format!("{NAMESPACE}_{name}"))
            .join("gateway.log"),
        pod: name,
        pod_ip,
    })
}

/// Polls until one gateway pod is Ready; returns it.
fn wait_ready(cluster: &Cluster) -> Result<Value> {
    let start = Instant::now();
    let mut last = String::from("no pod yet");
    while start.elapsed() < READY_TIMEOUT {
        let list: Value = serde_json::from_str(&kubectl(
            cluster,
            &[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                POD_SELECTOR,
                "-o",
                "json",
            ],
            None,
        )?)
        .context("parsing the gateway pods")?;
        for pod in list["items"].as_array().into_iter().flatten() {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready && pod["metadata"]["deletionTimestamp"].is_null() {
                return Ok(pod.clone());
            }
            last = format!(
                "pod {} is {}: {}",
                pod["metadata"]["name"].as_str().unwrap_or("?"),
                pod["status"]["phase"].as_str().unwrap_or("?"),
                pod["status"]["containerStatuses"]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = log_tails(cluster);
    bail!("the gateway pod was not Ready within {READY_TIMEOUT:?}; {last}\ngateway log:\n{logs}")
}

/// The tail of every gateway container log in the cluster's state dir.
fn log_tails(cluster: &Cluster) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(cluster.state_dir().join("pods")) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{NAMESPACE}_"))
            {
                out.push_str(&tail(&e.path().join("gateway.log"), 20));
            }
        }
    }
    out
}

/// Runs `curl` in `target` (of [`Cluster::exec`]) for the gateway's
/// metrics and returns the exposition text.
pub fn scrape(cluster: &Cluster, from: &str, gateway: &Gateway) -> Result<String> {
    let out = cluster
        .exec(
            from,
            &["curl", "-sS", "--max-time", "5", &gateway.metrics_url()],
        )
        .stdin(Stdio::null())
        .output()
        .context("running curl for the gateway's metrics")?;
    if !out.status.success() {
        bail!(
            "curl {} from {from} failed ({}): {}",
            gateway.metrics_url(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of sample `name{labels}` (labels exactly as exposed, e.g.
/// `reason="forged_source"`; "" for none) in a Prometheus exposition.
pub fn sample(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let series = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    exposition.lines().find_map(|line| {
        let (s, v) = line.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

/// The pid (in the machine's pid namespace) of the gateway process: the
/// one process in the pod's network namespace.
pub fn process_id(cluster: &Cluster, gateway: &Gateway) -> Result<i32> {
    let netns = cluster.netns(&gateway.target())?;
    let out = net::run_cmd("ip", &["netns", "pids", &netns])?;
    let pids: Vec<i32> = out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    match pids.as_slice() {
        [pid] => Ok(*pid),
        _ => bail!(
            "expected exactly one process in the gateway pod's namespace {netns}, found {pids:?}"
        ),
    }
}

/// Which command the process `pid` runs (`/proc/<pid>/exe`).
pub fn process_exe(pid: i32) -> Result<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_conf_lists_every_peer() {
        let k = |s: &str| KeyPair {
            private_key: format!("{s}-priv"),
            public_key: format!("{s}-pub"),
        };
        let text = gateway_conf(
            &k("gw"),
            &[
                Peer {
                    keys: k("a"),
                    tunnel_ip: Ipv4Addr::new(100, 64, 0, 2),
                },
                Peer {
                    keys: k("b"),
                    tunnel_ip: Ipv4Addr::new(100, 64, 0, 3),
                },
            ],
        );
        assert_eq!(
            text,
            "[Interface]\nPrivateKey = gw-priv\n\n[Peer]\nPublicKey = a-pub\nAllowedIPs = 100.64.0.2/32\n\n[Peer]\nPublicKey = b-pub\nAllowedIPs = 100.64.0.3/32\n"
        );
    }

    #[test]
    fn samples_by_name_and_labels() {
        let text = "# HELP x y\n# TYPE x counter\nburrow_gateway_packets_dropped_total{reason=\"forged_source\"} 3\nburrow_gateway_packets_dropped_total{reason=\"peer_to_peer\"} 0\nburrow_gateway_peers 2\n";
        assert_eq!(
            sample(
                text,
                "burrow_gateway_packets_dropped_total",
                "reason=\"forged_source\""
            ),
            Some(3.0)
        );
        assert_eq!(sample(text, "burrow_gateway_peers", ""), Some(2.0));
        assert_eq!(sample(text, "burrow_gateway_nothing", ""), None);
    }
}
