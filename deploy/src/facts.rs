//! What the laptop must route to reach the cluster: the Service range and
//! the pod ranges, learnt from the API.
//!
//! - Service range: a dry-run create of a Service with an address no
//!   cluster allows makes the API server answer with the range it allocates
//!   from ("… The range of valid IPs is 10.96.0.0/12"); nothing is stored.
//!   Without permission to create Services, the range is the smallest /16s
//!   that hold every ClusterIP the user can see.
//! - Pod ranges: the nodes' `spec.podCIDRs`; without permission to list
//!   nodes, the /16s of the pod IPs the user can see: pods of the user's
//!   namespace, else the endpoints of its EndpointSlices (a developer who
//!   may only reroute there can list those, not pods).
//!
//! Each fallback works with a 403 from the precise way: a developer bound
//! only to burrow's roles connects without any cluster-wide permission.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use serde::Serialize;

use crate::error::DeployError;
use crate::target::Cluster;

/// The cluster's address ranges and where each was learnt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Ranges {
    pub service: Vec<IpNet>,
    pub service_source: String,
    pub pods: Vec<IpNet>,
    pub pods_source: String,
}

/// Learns the Service and pod ranges. Fails only when neither the precise
/// nor the fallback way yields anything.
pub async fn ranges(cluster: &Cluster) -> Result<Ranges, DeployError> {
    let (service, service_source) = match service_range_by_validation(cluster).await {
        Ok(r) if !r.is_empty() => (r, "the API server's Service IP range".to_string()),
        first => {
            let why = match first {
                Err(e) => e.reason,
                Ok(_) => "the API server's answer named no range".to_string(),
            };
            let ips = visible_cluster_ips(cluster).await?;
            if ips.is_empty() {
                return Err(DeployError::new(
                    format!(
                        "cannot learn the cluster's Service range ({why}) and no Service is visible"
                    ),
                    "pass it with --include CIDR",
                ));
            }
            (
                covering_16s(&ips),
                format!("the ClusterIPs visible to you ({why})"),
            )
        }
    };
    let (pods, pods_source) = match node_pod_cidrs(cluster).await {
        Ok(r) if !r.is_empty() => (r, "the nodes' podCIDRs".to_string()),
        first => {
            let why = match first {
                Err(e) => e.reason,
                Ok(_) => "no node has spec.podCIDRs".to_string(),
            };
            let ips = visible_pod_ips(cluster).await.unwrap_or_default();
            (
                covering_16s(&ips),
                format!("the pod IPs visible to you ({why})"),
            )
        }
    };
    Ok(Ranges {
        service,
        service_source,
        pods,
        pods_source,
    })
}

/// The cluster's namespace names (the DNS stub treats `x.<namespace>` as a
/// cluster name, as a pod's search list does). Needs `list namespaces`.
pub async fn namespaces(cluster: &Cluster) -> Result<Vec<String>, DeployError> {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.err(e, "list namespaces"))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect())
}

async fn service_range_by_validation(cluster: &Cluster) -> Result<Vec<IpNet>, DeployError> {
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    // A public address: outside every Service range seen in practice (if
    // a cluster does allocate it, the dry run succeeds and the fallback
    // applies).
    let probe: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"generateName": "burrow-range-probe-"},
        "spec": {"clusterIP": "1.1.1.1", "ports": [{"port": 1}]}
    }))
    .map_err(|e| DeployError::new(format!("internal: probe Service: {e}"), ""))?;
    let pp = PostParams {
        dry_run: true,
        field_manager: Some("burrow".into()),
    };
    match api.create(&pp, &probe).await {
        Ok(_) => Err(DeployError::new(
            "the API server accepted 1.1.1.1 as a ClusterIP",
            "",
        )),
        Err(kube::Error::Api(status)) if status.code == 422 => {
            Ok(parse_valid_range(&status.message))
        }
        Err(e) => Err(cluster.err(e, "dry-run create a Service (to learn the Service range)")),
    }
}

/// The ranges in "… The range of valid IPs is 10.96.0.0/12[,fd00::/108]".
pub fn parse_valid_range(message: &str) -> Vec<IpNet> {
    let Some(at) = message.find("range of valid IPs is") else {
        return Vec::new();
    };
    message[at + "range of valid IPs is".len()..]
        .split(|c: char| c == ',' || c.is_whitespace())
        .map(|s| s.trim_end_matches(['.', '"', ')', ']']))
        .filter(|s| !s.is_empty())
        .map_while(|s| s.parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect()
}

async fn node_pod_cidrs(cluster: &Cluster) -> Result<Vec<IpNet>, DeployError> {
    let api: Api<Node> = Api::all(cluster.client.clone());
    let nodes = api
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.err(e, "list nodes (to learn the pod ranges)"))?;
    let mut out = BTreeSet::new();
    for node in nodes {
        let spec = node.spec.unwrap_or_default();
        let cidrs = spec
            .pod_cidrs
            .unwrap_or_default()
            .into_iter()
            .chain(spec.pod_cidr);
        for c in cidrs {
            if let Ok(net) = c.parse::<IpNet>() {
                out.insert(net.trunc());
            }
        }
    }
    Ok(aggregate(out))
}

async fn visible_cluster_ips(cluster: &Cluster) -> Result<Vec<IpAddr>, DeployError> {
    let all: Api<Service> = Api::all(cluster.client.clone());
    let list = match all.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(_) => {
            let ns: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
            ns.list(&ListParams::default())
                .await
                .map_err(|e| cluster.err(e, "list Services"))?
        }
    };
    Ok(list
        .into_iter()
        .filter_map(|s| s.spec)
        .flat_map(|s| {
            s.cluster_ips
                .unwrap_or_default()
                .into_iter()
                .chain(s.cluster_ip)
        })
        .filter_map(|ip| ip.parse().ok())
        .collect())
}

async fn visible_pod_ips(cluster: &Cluster) -> Result<Vec<IpAddr>, DeployError> {
    let ns: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list = match ns.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(_) => return endpoint_ips(cluster).await,
    };
    Ok(list
        .into_iter()
        .filter_map(|p| p.status)
        .flat_map(|s| {
            s.pod_ips
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.ip)
                .chain(s.pod_ip)
        })
        .filter_map(|ip| ip.parse().ok())
        .collect())
}

/// The pod addresses in the EndpointSlices of the user's namespace, for a
/// user who may not list pods. Only the endpoint controller's slices, and
/// only endpoints that are pods: a selector-less Service's slice may hold
/// any address (`default/kubernetes` holds the API server's).
async fn endpoint_ips(cluster: &Cluster) -> Result<Vec<IpAddr>, DeployError> {
    let api: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let lp = ListParams::default()
        .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io");
    let list = api.list(&lp).await.map_err(|e| {
        cluster.err(
            e,
            &format!("list pods or EndpointSlices in {}", cluster.namespace),
        )
    })?;
    Ok(list
        .into_iter()
        .flat_map(|s| s.endpoints.into_iter().flatten())
        .filter(|e| e.target_ref.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod"))
        .flat_map(|e| e.addresses)
        .filter_map(|ip| ip.parse().ok())
        .collect())
}

/// The /16 (IPv4) or /64 (IPv6) of each address, deduplicated.
pub fn covering_16s(ips: &[IpAddr]) -> Vec<IpNet> {
    let set: BTreeSet<IpNet> = ips
        .iter()
        .filter_map(|ip| {
            let len = if ip.is_ipv4() { 16 } else { 64 };
            IpNet::new(*ip, len).ok().map(|n| n.trunc())
        })
        .collect();
    aggregate(set)
}

fn aggregate(set: BTreeSet<IpNet>) -> Vec<IpNet> {
    IpNet::aggregate(&set.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_validation_message() {
        let m = "Service \"x\" is invalid: spec.clusterIPs: Invalid value: []string{\"0.0.0.1\"}: failed to allocate IP 0.0.0.1: the provided IP (0.0.0.1) is not in the valid range. The range of valid IPs is 10.96.0.0/12";
        assert_eq!(
            parse_valid_range(m),
            vec!["10.96.0.0/12".parse::<IpNet>().expect("cidr")]
        );
        let dual = "… The range of valid IPs is 10.43.0.0/16,fd00:10:43::/112";
        assert_eq!(
            parse_valid_range(dual),
            vec![
                "10.43.0.0/16".parse::<IpNet>().expect("cidr"),
                "fd00:10:43::/112".parse::<IpNet>().expect("cidr")
            ]
        );
        assert!(parse_valid_range("something else entirely").is_empty());
    }

    #[test]
    fn covering_ranges_merge_neighbours() {
        let ips: Vec<IpAddr> = ["10.244.0.5", "10.244.1.9", "10.245.3.3", "10.244.0.7"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(
            covering_16s(&ips),
            vec!["10.244.0.0/15".parse::<IpNet>().expect("cidr")]
        );
    }
}
