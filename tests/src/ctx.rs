//! Facts shared by the controllers of one miniature cluster.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

/// Pod network (the node's bridge `cbr0`); also the node's `spec.podCIDRs`.
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The node's address on the pod bridge, pods' default gateway.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// `default/kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// `kube-system/kube-dns` Service.
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Underlay (the "real" network between laptops and the node): bridge `ul0`
/// in the node namespace.
pub const UNDERLAY_CIDR: &str = "192.168.240.0/24";
/// The node's underlay address: API server and NodePorts are reached here.
pub const NODE_UNDERLAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 240, 1);
/// The laptops' own ("corporate") resolver, a dnsmasq on the underlay.
pub const CORP_DNS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 240, 53);
/// API server port on the node's underlay address.
pub const API_PORT: u16 = 6443;
/// The one node's name.
pub const NODE_NAME: &str = "node-1";

/// Laptop `index` (1-based) has underlay address 192.168.240.(1+index).
pub fn laptop_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 240, (1 + index) as u8)
}

/// Network namespace names: `mc-<cluster>-node`, `mc-<cluster>-laptop`,
/// `mc-<cluster>-laptop2`, ...; pods get `mc-<cluster>-p-<uid prefix>`.
pub fn netns_name(cluster: &str, role: &str) -> String {
    format!("mc-{cluster}-{role}")
}

/// Every namespace name of any miniature cluster starts with this.
pub const NETNS_PREFIX: &str = "mc-";

/// Root of every cluster's files: `/run/minicluster/<name>/`.
pub const STATE_ROOT: &str = "/run/minicluster";

/// Issues a service-account token the API server accepts
/// (`namespace`, `serviceaccount name`) → bearer token.
pub type TokenIssuer = Arc<dyn Fn(&str, &str) -> String + Send + Sync>;

/// What every controller of one cluster knows.
#[derive(Clone)]
pub struct ClusterCtx {
    /// Cluster name (`demo`).
    pub name: String,
    /// `/run/minicluster/<name>/`.
    pub state_dir: PathBuf,
    /// Directory holding the workspace's built binaries (`burrow-gateway`,
    /// `mc-echo`): the directory of the running `minicluster`.
    pub bin_dir: PathBuf,
    /// PEM of the cluster CA, mounted into pods as `ca.crt`.
    pub ca_pem: String,
    pub issue_token: TokenIssuer,
}

impl ClusterCtx {
    pub fn node_netns(&self) -> String {
        netns_name(&self.name, "node")
    }
    pub fn laptop_netns(&self, index: usize) -> String {
        if index <= 1 {
            netns_name(&self.name, "laptop")
        } else {
            netns_name(&self.name, &format!("laptop{index}"))
        }
    }
}
