//! Server-side printing: `meta.k8s.io/v1 Table` responses with the columns
//! the real API server's printers produce, for `kubectl get`.

use serde_json::{Value, json};

use crate::resources::ResourceType;

/// What each row carries as `object` (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Go's `duration.HumanDuration`, as the AGE columns print.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age(ts: &Value) -> String {
    let Some(t) = ts
        .as_str()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
    else {
        return "<unknown>".into();
    };
    let secs = match std::time::SystemTime::now().duration_since(t) {
        Ok(d) => d.as_secs() as i64,
        Err(_) => 0,
    };
    human_duration(secs)
}

fn col(name: &str, ty: &str, priority: u8, description: &str) -> Value {
    let mut c = json!({"name": name, "type": ty, "format": "", "description": description, "priority": priority});
    if name == "Name" {
        c["format"] = json!("name");
    }
    c
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn join_map(m: &Value) -> String {
    m.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(m) = sel["matchLabels"].as_object() {
        parts.extend(m.iter().map(|(k, v)| format!("{k}={}", s(v))));
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let key = s(&e["key"]);
        parts.push(match s(&e["operator"]) {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    none_if_empty(parts.join(","))
}

/// Column definitions for a resource.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    let name = col(
        "Name",
        "string",
        0,
        "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    );
    let age = col(
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
    );
    match rt.kind {
        "Pod" => vec![
            name,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            age,
            col(
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                1,
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
            ),
            col(
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        "Service" => vec![
            name,
            col(
                "Type",
                "string",
                0,
                "type determines how the Service is exposed.",
            ),
            col(
                "Cluster-IP",
                "string",
                0,
                "clusterIP is the IP address of the service and is usually assigned randomly.",
            ),
            col(
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            age,
            col(
                "Selector",
                "string",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        "Endpoints" => vec![
            name,
            col(
                "Endpoints",
                "string",
                0,
                "Endpoints is the list of endpoints in the service.",
            ),
            age,
        ],
        "Deployment" => vec![
            name,
            col("Ready", "string", 0, "Number of the pod with ready state"),
            col(
                "Up-to-date",
                "integer",
                0,
                "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
            ),
            col(
                "Available",
                "integer",
                0,
                "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            age,
            col(
                "Containers",
                "string",
                1,
                "Names of each container in the template.",
            ),
            col(
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            col(
                "Selector",
                "string",
                1,
                "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
            ),
        ],
        "ReplicaSet" => vec![
            name,
            col(
                "Desired",
                "integer",
                0,
                "Replicas is the number of desired replicas.",
            ),
            col(
                "Current",
                "integer",
                0,
                "Replicas is the most recently observed number of replicas.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "The number of ready replicas for this replica set.",
            ),
            age,
            col(
                "Containers",
                "string",
                1,
                "Names of each container in the template.",
            ),
            col(
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            col(
                "Selector",
                "string",
                1,
                "Selector is a label query over pods that should match the replica count.",
            ),
        ],
        "Namespace" => vec![
            name,
            col("Status", "string", 0, "The status of the namespace"),
            age,
        ],
        "Node" => vec![
            name,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            age,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "External-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        "ConfigMap" => vec![
            name,
            col(
                "Data",
                "integer",
                0,
                "Data contains the configuration data.",
            ),
            age,
        ],
        "Secret" => vec![
            name,
            col(
                "Type",
                "string",
                0,
                "Used to facilitate programmatic handling of secret data.",
            ),
            col("Data", "integer", 0, "Data contains the secret data."),
            age,
        ],
        "ServiceAccount" => vec![
            name,
            col(
                "Secrets",
                "integer",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            age,
        ],
        "EndpointSlice" => vec![
            name,
            col(
                "AddressType",
                "string",
                0,
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            col(
                "Ports",
                "string",
                0,
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            col(
                "Endpoints",
                "string",
                0,
                "endpoints is a list of unique endpoints in this slice.",
            ),
            age,
        ],
        "NetworkPolicy" => vec![
            name,
            col(
                "Pod-Selector",
                "string",
                0,
                "podSelector selects the pods to which this NetworkPolicy object applies. The array of rules is applied to any pods selected by this field. An empty selector matches all pods in this namespace.",
            ),
            age,
        ],
        _ => vec![name, age],
    }
}

fn pod_cells(o: &Value) -> Vec<Value> {
    let cs = o["spec"]["containers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    let statuses = o["status"]["containerStatuses"].as_array();
    let ready = statuses
        .map(|st| st.iter().filter(|c| c["ready"] == true).count())
        .unwrap_or(0);
    let restarts: i64 = statuses
        .map(|st| st.iter().filter_map(|c| c["restartCount"].as_i64()).sum())
        .unwrap_or(0);
    let mut status = o["status"]["reason"]
        .as_str()
        .or_else(|| o["status"]["phase"].as_str())
        .unwrap_or("Pending")
        .to_string();
    for c in statuses.into_iter().flatten() {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str() {
            status = r.to_string();
        } else if let Some(r) = c["state"]["terminated"]["reason"].as_str() {
            status = r.to_string();
        }
    }
    if !o["metadata"]["deletionTimestamp"].is_null() {
        status = "Terminating".into();
    }
    vec![
        json!(s(&o["metadata"]["name"])),
        json!(format!("{ready}/{cs}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age(&o["metadata"]["creationTimestamp"])),
        json!(none_if_empty(s(&o["status"]["podIP"]).to_string())),
        json!(none_if_empty(s(&o["spec"]["nodeName"]).to_string())),
        json!(none_if_empty(
            s(&o["status"]["nominatedNodeName"]).to_string()
        )),
        json!("<none>"),
    ]
}

fn service_cells(o: &Value) -> Vec<Value> {
    let spec = &o["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    let mut external: Vec<String> = spec["externalIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let external = match ty {
        "ExternalName" => s(&spec["externalName"]).to_string(),
        "LoadBalancer" => {
            for i in o["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(ip) = i["ip"].as_str().or_else(|| i["hostname"].as_str()) {
                    external.push(ip.to_string());
                }
            }
            if external.is_empty() {
                "<pending>".into()
            } else {
                external.join(",")
            }
        }
        _ => none_if_empty(external.join(",")),
    };
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_u64() {
                Some(np) if np != 0 => format!("{}:{np}/{proto}", p["port"]),
                _ => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    vec![
        json!(s(&o["metadata"]["name"])),
        json!(ty),
        json!(none_if_empty(s(&spec["clusterIP"]).to_string())),
        json!(external),
        json!(none_if_empty(ports.join(","))),
        json!(age(&o["metadata"]["creationTimestamp"])),
        json!(none_if_empty(join_map(&spec["selector"]))),
    ]
}

fn endpoints_cells(o: &Value) -> Vec<Value> {
    let mut eps: Vec<String> = Vec::new();
    for subset in o["subsets"].as_array().into_iter().flatten() {
        let ports: Vec<&Value> = subset["ports"]
            .as_array()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        for a in subset["addresses"].as_array().into_iter().flatten() {
            let ip = s(&a["ip"]);
            if ports.is_empty() {
                eps.push(ip.to_string());
            }
            for p in &ports {
                eps.push(format!("{ip}:{}", p["port"]));
            }
        }
    }
    let text = if eps.len() > 3 {
        format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
    } else {
        none_if_empty(eps.join(","))
    };
    vec![
        json!(s(&o["metadata"]["name"])),
        json!(text),
        json!(age(&o["metadata"]["creationTimestamp"])),
    ]
}

fn template_cells(o: &Value) -> (String, String) {
    let cs = o["spec"]["template"]["spec"]["containers"].as_array();
    let names: Vec<&str> = cs.into_iter().flatten().map(|c| s(&c["name"])).collect();
    let images: Vec<&str> = cs.into_iter().flatten().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

fn cells(rt: &ResourceType, o: &Value) -> Vec<Value> {
    let name = json!(s(&o["metadata"]["name"]));
    let created = json!(age(&o["metadata"]["creationTimestamp"]));
    let int = |v: &Value| json!(v.as_i64().unwrap_or(0));
    match rt.kind {
        "Pod" => pod_cells(o),
        "Service" => service_cells(o),
        "Endpoints" => endpoints_cells(o),
        "Deployment" => {
            let (names, images) = template_cells(o);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    o["status"]["readyReplicas"].as_i64().unwrap_or(0),
                    o["spec"]["replicas"].as_i64().unwrap_or(0)
                )),
                int(&o["status"]["updatedReplicas"]),
                int(&o["status"]["availableReplicas"]),
                created,
                json!(names),
                json!(images),
                json!(selector_string(&o["spec"]["selector"])),
            ]
        }
        "ReplicaSet" => {
            let (names, images) = template_cells(o);
            vec![
                name,
                int(&o["spec"]["replicas"]),
                int(&o["status"]["replicas"]),
                int(&o["status"]["readyReplicas"]),
                created,
                json!(names),
                json!(images),
                json!(selector_string(&o["spec"]["selector"])),
            ]
        }
        "Namespace" => vec![
            name,
            json!(o["status"]["phase"].as_str().unwrap_or("Active")),
            created,
        ],
        "Node" => {
            let ready = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            let roles: Vec<&str> = o["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            let addr = |ty: &str| {
                none_if_empty(
                    o["status"]["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["type"] == ty)
                        .map(|a| s(&a["address"]).to_string())
                        .unwrap_or_default(),
                )
            };
            let info = &o["status"]["nodeInfo"];
            vec![
                name,
                json!(ready),
                json!(none_if_empty(roles.join(","))),
                created,
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(none_if_empty(s(&info["osImage"]).to_string())),
                json!(none_if_empty(s(&info["kernelVersion"]).to_string())),
                json!(none_if_empty(
                    s(&info["containerRuntimeVersion"]).to_string()
                )),
            ]
        }
        "ConfigMap" => {
            let n = o["data"].as_object().map(|m| m.len()).unwrap_or(0)
                + o["binaryData"].as_object().map(|m| m.len()).unwrap_or(0);
            vec![name, json!(n), created]
        }
        "Secret" => vec![
            name,
            json!(o["type"].as_str().unwrap_or("Opaque")),
            json!(o["data"].as_object().map(|m| m.len()).unwrap_or(0)),
            created,
        ],
        "ServiceAccount" => vec![
            name,
            json!(o["secrets"].as_array().map(Vec::len).unwrap_or(0)),
            created,
        ],
        "EndpointSlice" => {
            let ports: Vec<String> = o["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["port"].to_string())
                .collect();
            let addrs: Vec<&str> = o["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                })
                .collect();
            let addrs = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                none_if_empty(addrs.join(","))
            };
            vec![
                name,
                json!(s(&o["addressType"])),
                json!(none_if_empty(ports.join(","))),
                json!(addrs),
                created,
            ]
        }
        "NetworkPolicy" => vec![
            name,
            json!(selector_string(&o["spec"]["podSelector"])),
            created,
        ],
        _ => vec![name, created],
    }
}

fn row_object(o: &Value, include: IncludeObject) -> Value {
    match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => o.clone(),
        IncludeObject::Metadata => {
            let mut meta = o["metadata"].clone();
            if let Some(m) = meta.as_object_mut() {
                m.remove("managedFields");
            }
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
        }
    }
}

/// One row.
pub fn row(rt: &ResourceType, o: &Value, include: IncludeObject) -> Value {
    let mut r = json!({"cells": cells(rt, o)});
    let obj = row_object(o, include);
    if !obj.is_null() {
        r["object"] = obj;
    }
    r
}

/// A Table of `items`, with the list's resourceVersion (and continue token).
pub fn table(
    rt: &ResourceType,
    items: &[Value],
    rv: &str,
    include: IncludeObject,
    with_columns: bool,
) -> Value {
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "rows": items.iter().map(|o| row(rt, o, include)).collect::<Vec<_>>(),
    });
    if with_columns {
        t["columnDefinitions"] = Value::Array(columns(rt));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::must;

    #[test]
    fn durations_and_rows() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(60 * 45), "45m");
        assert_eq!(human_duration(3600 * 5 + 60), "5h1m");
        assert_eq!(human_duration(3600 * 30), "30h");
        assert_eq!(human_duration(86400 * 3 + 3600), "3d1h");
        let svc = json!({"metadata": {"name": "echo", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.5", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "echo"}}});
        let r = row(must("core/v1/services"), &svc, IncludeObject::Metadata);
        assert_eq!(r["cells"][3], "<none>");
        assert_eq!(r["cells"][4], "80:30080/TCP");
        assert_eq!(r["cells"][6], "app=echo");
        assert_eq!(
            columns(must("core/v1/services")).len(),
            r["cells"].as_array().map(Vec::len).unwrap_or(0)
        );
        for rt in crate::resources::RESOURCES {
            let o = json!({"metadata": {"name": "x"}});
            assert_eq!(columns(rt).len(), cells(rt, &o).len(), "{}", rt.kind);
        }
    }
}
