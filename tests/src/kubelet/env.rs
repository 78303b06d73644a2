//! A container's environment as the kubelet builds it
//! (`makeEnvironmentVariables` in `pkg/kubelet/kubelet_pods.go`): service
//! links (`getServiceEnvVarMap`, `envvars.FromServices`), `envFrom`, `env`
//! with `$(VAR)` expansion, field references
//! (`podFieldSelectorRuntimeValue`, `fieldpath.ExtractFieldPathAsString`)
//! and resource references (`defaultPodLimitsForDownwardAPI`,
//! `ExtractContainerResourceValue`); `HOSTNAME` as the runtime
//! (containerd) adds it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine;
use minicluster_apiserver::quantity::{self, Quantity};
use serde_json::Value;

/// Reads a ConfigMap or Secret's data as bytes (`kind` is `configmaps` or
/// `secrets`; Secret `data` is base64, `stringData` plain; ConfigMap
/// `binaryData` base64).
pub fn object_data(kind: &str, obj: &Value) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let b64 = |v: &Value| {
        v.as_str().and_then(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .ok()
        })
    };
    if kind == "secrets" {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
        for (k, v) in obj["stringData"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
    } else {
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            if let Some(s) = v.as_str() {
                out.insert(k.clone(), s.as_bytes().to_vec());
            }
        }
        for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
            if let Some(b) = b64(v) {
                out.insert(k.clone(), b);
            }
        }
    }
    out
}

/// Looks up a ConfigMap/Secret (`configmaps`/`secrets`, name) in the pod's
/// namespace.
pub type Lookup<'a> = &'a dyn Fn(&str, &str) -> Option<Value>;

/// What environment variables are made from.
pub struct EnvSources<'a> {
    pub pod: &'a Value,
    /// `status.podIPs` (the first is `status.podIP`).
    pub pod_ips: &'a [Ipv4Addr],
    /// The node's IPs (`status.hostIPs`).
    pub host_ips: &'a [Ipv4Addr],
    /// Services for service links: those of the pod's namespace and
    /// `default/kubernetes` (others are ignored).
    pub services: &'a [Value],
    /// The Node's `status.allocatable` (limits a container does not set).
    pub node_allocatable: &'a Value,
    pub lookup: Lookup<'a>,
}

/// `$(VAR)` expansion as Kubernetes does it
/// (`third_party/forked/golang/expansion`: `$$` escapes, unknown
/// references and an unclosed `$(` stay as written).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(j) => {
                    let name = &body[..j];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Go's `strconv.Quote` (printable Unicode kept, the rest escaped).
pub(super) fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() || c == '\u{feff}' => {
                let n = c as u32;
                if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `fieldpath.FormatMap`: `key="value"` lines (Go-quoted), sorted by key,
/// no trailing newline.
pub(super) fn format_map(m: &Value) -> String {
    let mut pairs: Vec<(&String, &str)> = m
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k, v.as_str().unwrap_or("")))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pod's hostname as the kubelet gives it (`GeneratePodHostNameAndDomain`):
/// `spec.hostname` or the pod name, cut to 63 characters without a
/// trailing `-` or `.`.
pub fn pod_hostname(pod: &Value) -> String {
    let name = pod["spec"]["hostname"]
        .as_str()
        .filter(|h| !h.is_empty())
        .or_else(|| pod["metadata"]["name"].as_str())
        .unwrap_or("");
    if name.len() <= 63 {
        return name.to_string();
    }
    name[..63].trim_end_matches(['-', '.']).to_string()
}

/// The hostname the pod's containers get (UTS and `HOSTNAME`): the pod's
/// hostname, or with `setHostnameAsFQDN` and a subdomain its FQDN
/// `<hostname>.<subdomain>.<ns>.svc.cluster.local`, as the kubelet gives
/// the sandbox.
pub fn container_hostname(pod: &Value) -> String {
    let h = pod_hostname(pod);
    let sub = pod["spec"]["subdomain"].as_str().unwrap_or("");
    if pod["spec"]["setHostnameAsFQDN"].as_bool() == Some(true) && !sub.is_empty() {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
        return format!("{h}.{sub}.{ns}.svc.{}", crate::ctx::CLUSTER_DOMAIN);
    }
    h
}

/// `fieldpath.ExtractFieldPathAsString`: the `metadata.*` paths a
/// downward API volume may use (also the fallback of env field refs).
pub(super) fn metadata_field(pod: &Value, path: &str) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let meta = &pod["metadata"];
    // `path['key']`
    if let Some((base, rest)) = path.split_once("['") {
        let Some(key) = rest.strip_suffix("']") else {
            return Err(format!("unsupported fieldPath: {path}"));
        };
        return match base {
            "metadata.labels" => Ok(s(&meta["labels"][key])),
            "metadata.annotations" => Ok(s(&meta["annotations"][key])),
            _ => Err(format!("fieldPath {path:?} does not support subscript")),
        };
    }
    Ok(match path {
        "metadata.annotations" => format_map(&meta["annotations"]),
        "metadata.labels" => format_map(&meta["labels"]),
        "metadata.name" => s(&meta["name"]),
        "metadata.namespace" => s(&meta["namespace"]),
        "metadata.uid" => s(&meta["uid"]),
        _ => return Err(format!("unsupported fieldPath: {path}")),
    })
}

/// `podFieldSelectorRuntimeValue`: an env var's `fieldRef`.
pub(super) fn field_ref(src: &EnvSources<'_>, path: &str) -> Result<String, String> {
    let pod = src.pod;
    let ips = |v: &[Ipv4Addr]| {
        v.iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    Ok(match path {
        "spec.nodeName" => pod["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        "status.hostIP" => src
            .host_ips
            .first()
            .map(Ipv4Addr::to_string)
            .unwrap_or_default(),
        "status.hostIPs" => ips(src.host_ips),
        "status.podIP" => src
            .pod_ips
            .first()
            .map(Ipv4Addr::to_string)
            .unwrap_or_default(),
        "status.podIPs" => ips(src.pod_ips),
        _ => metadata_field(pod, path)?,
    })
}

fn quantity_of(v: &Value) -> Option<Quantity> {
    match v {
        Value::String(s) => Quantity::parse(s),
        Value::Number(n) => Quantity::parse(&n.to_string()),
        _ => None,
    }
}

/// A `resourceFieldRef` (env or downward API volume), as
/// `defaultPodLimitsForDownwardAPI` + `ExtractContainerResourceValue` do:
/// the container named by `containerName` (containers, then init
/// containers) or `container`; a cpu, memory or ephemeral-storage limit
/// that is unset or zero is the node's allocatable; an unset request is 0;
/// the value divided by `divisor` (unset or zero: 1), rounded up.
pub(super) fn resource_field_ref(
    src: &EnvSources<'_>,
    container: Option<&Value>,
    r: &Value,
) -> Result<String, String> {
    let cname = r["containerName"].as_str().unwrap_or("");
    let found;
    let container = if cname.is_empty() {
        container.ok_or_else(|| "resourceFieldRef without containerName".to_string())?
    } else {
        found = ["containers", "initContainers"]
            .iter()
            .flat_map(|l| src.pod["spec"][*l].as_array().into_iter().flatten())
            .find(|c| c["name"].as_str() == Some(cname))
            .ok_or_else(|| format!("container {cname} not found"))?;
        found
    };
    let resource = r["resource"].as_str().unwrap_or("");
    let divisor = r
        .get("divisor")
        .and_then(quantity_of)
        .unwrap_or(Quantity::ZERO);
    let (field, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported container resource : {resource}"))?;
    if !matches!(field, "limits" | "requests")
        || !(matches!(name, "cpu" | "memory" | "ephemeral-storage")
            || name.starts_with("hugepages-"))
    {
        return Err(format!("unsupported container resource : {resource}"));
    }
    let mut value = container["resources"][field]
        .get(name)
        .and_then(quantity_of)
        .unwrap_or(Quantity::ZERO);
    if field == "limits"
        && value.is_zero()
        && matches!(name, "cpu" | "memory" | "ephemeral-storage")
        && let Some(a) = src.node_allocatable.get(name).and_then(quantity_of)
    {
        value = a;
    }
    Ok(quantity::with_divisor(value, divisor))
}

fn what(kind: &str) -> &'static str {
    if kind == "secrets" {
        "secret"
    } else {
        "configmap"
    }
}

/// Keys and values a ConfigMap or Secret gives to env vars: a ConfigMap's
/// `data` only (never `binaryData`), a Secret's `data`.
fn env_data(kind: &str, obj: &Value) -> BTreeMap<String, String> {
    let mut data = object_data(kind, obj);
    if kind != "secrets" {
        let keys: Vec<String> = obj["data"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        data.retain(|k, _| keys.contains(k));
    }
    data.into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

fn key_ref(src: &EnvSources<'_>, kind: &str, r: &Value) -> Result<Option<String>, String> {
    let name = r["name"].as_str().unwrap_or("");
    let key = r["key"].as_str().unwrap_or("");
    let optional = r["optional"].as_bool() == Some(true);
    let ns = src.pod["metadata"]["namespace"].as_str().unwrap_or("");
    let kind_name = if kind == "secrets" {
        "Secret"
    } else {
        "ConfigMap"
    };
    match (src.lookup)(kind, name) {
        None if optional => Ok(None),
        None => Err(format!("{} \"{name}\" not found", what(kind))),
        Some(obj) => match env_data(kind, &obj).remove(key) {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(format!(
                "couldn't find key {key} in {kind_name} {ns}/{name}"
            )),
        },
    }
}

fn env_name(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

/// `getServiceEnvVarMap` + `envvars.FromServices`: `default/kubernetes`
/// always, the other Services of the pod's namespace when service links
/// are on (a namespace's own `kubernetes` Service wins over the master
/// one); Services without a ClusterIP (headless, ExternalName) give none.
pub fn service_env(pod: &Value, services: &[Value]) -> BTreeMap<String, String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
    let links = pod["spec"]["enableServiceLinks"].as_bool() != Some(false);
    let mut chosen: BTreeMap<String, &Value> = BTreeMap::new();
    for svc in services {
        let Some(_) = crate::proxy::cluster_ip(svc) else {
            continue;
        };
        let name = svc["metadata"]["name"].as_str().unwrap_or("");
        let sns = svc["metadata"]["namespace"].as_str().unwrap_or("");
        if sns == "default" && name == "kubernetes" {
            chosen.entry(name.to_string()).or_insert(svc);
        } else if sns == ns && links {
            chosen.insert(name.to_string(), svc);
        }
    }
    let mut env = BTreeMap::new();
    for svc in chosen.values() {
        let Some(ip) = crate::proxy::cluster_ip(svc) else {
            continue;
        };
        let name = env_name(svc["metadata"]["name"].as_str().unwrap_or(""));
        let ports = crate::proxy::service_ports(svc);
        let Some(first) = ports.first() else { continue };
        env.insert(format!("{name}_SERVICE_HOST"), ip.to_string());
        env.insert(format!("{name}_SERVICE_PORT"), first.port.to_string());
        for p in &ports {
            if !p.name.is_empty() {
                env.insert(
                    format!("{name}_SERVICE_PORT_{}", env_name(&p.name)),
                    p.port.to_string(),
                );
            }
        }
        env.insert(
            format!("{name}_PORT"),
            format!(
                "{}://{ip}:{}",
                first.protocol.to_ascii_lowercase(),
                first.port
            ),
        );
        for p in &ports {
            let proto = p.protocol.to_ascii_lowercase();
            let base = format!("{name}_PORT_{}_{}", p.port, p.protocol.to_ascii_uppercase());
            env.insert(base.clone(), format!("{proto}://{ip}:{}", p.port));
            env.insert(format!("{base}_PROTO"), proto);
            env.insert(format!("{base}_PORT"), p.port.to_string());
            env.insert(format!("{base}_ADDR"), ip.to_string());
        }
    }
    env
}

/// A container's environment, as the kubelet and the runtime build it:
/// `HOSTNAME` (the runtime's, overridable), service links, then `envFrom`
/// (later sources win), then `env` in order (each `value` expanded against
/// `envFrom`, the `env` entries before it and the service links; later
/// wins). An error is a CreateContainerConfigError message.
pub fn resolve_env(
    container: &Value,
    src: &EnvSources<'_>,
) -> Result<BTreeMap<String, String>, String> {
    let pod = src.pod;
    let services = service_env(pod, src.services);
    // What the kubelet's `tmpEnv` holds: envFrom, then env.
    let mut tmp: BTreeMap<String, String> = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or("");
        let (kind, r) = if from["configMapRef"].is_object() {
            ("configmaps", &from["configMapRef"])
        } else if from["secretRef"].is_object() {
            ("secrets", &from["secretRef"])
        } else {
            continue;
        };
        let name = r["name"].as_str().unwrap_or("");
        match (src.lookup)(kind, name) {
            Some(obj) => {
                for (k, v) in env_data(kind, &obj) {
                    tmp.insert(format!("{prefix}{k}"), v);
                }
            }
            None if r["optional"].as_bool() == Some(true) => {}
            None => return Err(format!("{} \"{name}\" not found", what(kind))),
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else {
            continue;
        };
        let value = e.get("value").and_then(Value::as_str).unwrap_or("");
        let value = if !value.is_empty() {
            // `expansion.MappingFuncFor(tmpEnv, serviceEnv)`.
            let mut ctx = services.clone();
            ctx.extend(tmp.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(expand(value, &ctx))
        } else if let Some(vf) = e.get("valueFrom").filter(|v| v.is_object()) {
            if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(src, path)?)
            } else if vf["resourceFieldRef"].is_object() {
                Some(resource_field_ref(
                    src,
                    Some(container),
                    &vf["resourceFieldRef"],
                )?)
            } else if vf["configMapKeyRef"].is_object() {
                key_ref(src, "configmaps", &vf["configMapKeyRef"])?
            } else if vf["secretKeyRef"].is_object() {
                key_ref(src, "secrets", &vf["secretKeyRef"])?
            } else {
                Some(String::new())
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            tmp.insert(name.to_string(), v);
        }
    }
    let mut env = BTreeMap::new();
    env.insert("HOSTNAME".to_string(), container_hostname(pod));
    env.extend(services);
    env.extend(tmp);
    Ok(env)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    use crate::ctx::NODE_UNDERLAY_IP;

    pub(in super::super) fn pod() -> Value {
        json!({
            "metadata": {"name": "echo-1", "namespace": "default", "uid": "abcdef12-3456", "labels": {"app": "echo"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "burrow"},
        })
    }

    pub(in super::super) fn lookup(kind: &str, name: &str) -> Option<Value> {
        match (kind, name) {
            ("configmaps", "cfg") => Some(
                json!({"data": {"GREETING": "hello", "MODE": "fast"}, "binaryData": {"BIN": "AAEC"}}),
            ),
            ("configmaps", "cfg2") => Some(json!({"data": {"GREETING": "hi", "OTHER": "o"}})),
            ("secrets", "sec") => Some(json!({"data": {"TOKEN": "czNjcjN0"}})),
            _ => None,
        }
    }

    const POD_IPS: &[Ipv4Addr] = &[Ipv4Addr::new(10, 244, 0, 9)];
    const HOST_IPS: &[Ipv4Addr] = &[NODE_UNDERLAY_IP];

    pub(in super::super) fn sources<'a>(
        pod: &'a Value,
        services: &'a [Value],
        alloc: &'a Value,
    ) -> EnvSources<'a> {
        EnvSources {
            pod,
            pod_ips: POD_IPS,
            host_ips: HOST_IPS,
            services,
            node_allocatable: alloc,
            lookup: &lookup,
        }
    }

    fn kubernetes() -> Value {
        json!({"metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}})
    }

    #[test]
    fn env_resolution() {
        let mut pod = pod();
        pod["metadata"]["namespace"] = json!("shop");
        pod["metadata"]["annotations"] = json!({"team": "core"});
        let services = vec![
            kubernetes(),
            json!({"metadata": {"name": "redis-main", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.50", "ports": [{"port": 6379, "protocol": "TCP"}, {"name": "metrics", "port": 9121, "protocol": "TCP"}]}}),
            json!({"metadata": {"name": "dns", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
            json!({"metadata": {"name": "headless", "namespace": "shop"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            json!({"metadata": {"name": "ext", "namespace": "shop"}, "spec": {"type": "ExternalName", "externalName": "example.com"}}),
            json!({"metadata": {"name": "elsewhere", "namespace": "other"}, "spec": {"clusterIP": "10.96.0.77", "ports": [{"port": 80}]}}),
        ];
        let alloc = json!({"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"});
        let src = sources(&pod, &services, &alloc);
        let c = json!({
            "name": "main",
            "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "250m", "memory": "64Mi"}},
            "envFrom": [
                {"configMapRef": {"name": "cfg"}},
                {"configMapRef": {"name": "cfg2"}},
                {"secretRef": {"name": "sec"}, "prefix": "S_"},
                {"configMapRef": {"name": "missing", "optional": true}}
            ],
            "env": [
                {"name": "PLAIN", "value": "x-$(GREETING)-$$(GREETING)-$(NOPE)-$(REDIS_MAIN_SERVICE_HOST)-$(LATER)-$"},
                {"name": "MODE", "value": "slow"},
                {"name": "EMPTY"},
                {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": true}}},
                {"name": "OTHER", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nokey", "optional": true}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "POD_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "HOST_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIPs"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "NOLABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['nope']"}}},
                {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['team']"}}},
                {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
                {"name": "CPU_LIMIT_CORES", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                {"name": "CPU_REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "MEM_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "EPH_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.ephemeral-storage", "divisor": "1Gi"}}},
                {"name": "EPH_REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.ephemeral-storage"}}},
                {"name": "LATER", "value": "l"},
                {"name": "REDIS_MAIN_SERVICE_PORT", "value": "override"}
            ]
        });
        let env = resolve_env(&c, &src).expect("env");
        let get = |k: &str| env.get(k).map(String::as_str);
        // envFrom: later sources win, binaryData never, prefix.
        assert_eq!(get("GREETING"), Some("hi"));
        assert_eq!(get("OTHER"), Some("o"));
        assert_eq!(get("BIN"), None);
        assert_eq!(get("S_TOKEN"), Some("s3cr3t"));
        assert_eq!(
            get("PLAIN"),
            Some("x-hi-$(GREETING)-$(NOPE)-10.96.0.50-$(LATER)-$")
        );
        assert_eq!(get("MODE"), Some("slow"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(get("CM"), Some("hello"));
        assert_eq!(get("SECRET"), Some("s3cr3t"));
        assert_eq!(get("OPT"), None);
        // An optional key that is missing leaves the envFrom value alone.
        assert_eq!(get("OTHER"), Some("o"));
        assert_eq!(get("POD_NAME"), Some("echo-1"));
        assert_eq!(get("POD_NS"), Some("shop"));
        assert_eq!(get("POD_UID"), Some("abcdef12-3456"));
        assert_eq!(get("POD_IP"), Some("10.244.0.9"));
        assert_eq!(get("POD_IPS"), Some("10.244.0.9"));
        assert_eq!(get("HOST_IP"), Some("192.168.240.1"));
        assert_eq!(get("HOST_IPS"), Some("192.168.240.1"));
        assert_eq!(get("NODE"), Some("node-1"));
        assert_eq!(get("SA"), Some("burrow"));
        assert_eq!(get("APP"), Some("echo"));
        assert_eq!(get("NOLABEL"), Some(""));
        assert_eq!(get("TEAM"), Some("core"));
        assert_eq!(get("CPU_LIMIT"), Some("500"));
        assert_eq!(get("CPU_LIMIT_CORES"), Some("1"));
        assert_eq!(get("CPU_REQ"), Some("250"));
        assert_eq!(get("MEM_LIMIT"), Some("64"));
        // No ephemeral-storage limit: the node's allocatable; no request: 0.
        assert_eq!(get("EPH_LIMIT"), Some("20"));
        assert_eq!(get("EPH_REQ"), Some("0"));
        assert_eq!(get("HOSTNAME"), Some("echo-1"));
        // Service links: the master service and the namespace's, not the
        // headless, ExternalName or other namespaces' ones.
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
        assert_eq!(get("REDIS_MAIN_SERVICE_HOST"), Some("10.96.0.50"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT"), Some("override"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT_METRICS"), Some("9121"));
        assert_eq!(get("REDIS_MAIN_PORT"), Some("tcp://10.96.0.50:6379"));
        assert_eq!(
            get("REDIS_MAIN_PORT_9121_TCP"),
            Some("tcp://10.96.0.50:9121")
        );
        assert_eq!(get("REDIS_MAIN_PORT_6379_TCP_PROTO"), Some("tcp"));
        assert_eq!(get("DNS_PORT"), Some("udp://10.96.0.53:53"));
        assert_eq!(get("DNS_PORT_53_UDP_PORT"), Some("53"));
        assert!(!env.keys().any(|k| k.starts_with("HEADLESS_")
            || k.starts_with("EXT_")
            || k.starts_with("ELSEWHERE_")));

        // enableServiceLinks: false keeps only the master service.
        let mut nolinks = pod.clone();
        nolinks["spec"]["enableServiceLinks"] = json!(false);
        let src2 = sources(&nolinks, &services, &alloc);
        let env2 = resolve_env(&json!({"name": "c"}), &src2).expect("env");
        assert!(env2.contains_key("KUBERNETES_SERVICE_HOST"));
        assert!(
            !env2
                .keys()
                .any(|k| k.starts_with("REDIS_MAIN_") || k.starts_with("DNS_"))
        );

        let bad = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing key"),
            "couldn't find key nope in ConfigMap shop/cfg"
        );
        let bad = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "BIN"}}}]});
        assert!(
            resolve_env(&bad, &src).is_err(),
            "binaryData is not for env"
        );
        let bad = json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope"}}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing key"),
            "couldn't find key nope in Secret shop/sec"
        );
        let bad = json!({"envFrom": [{"secretRef": {"name": "gone"}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing"),
            "secret \"gone\" not found"
        );
        let bad = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing"),
            "configmap \"gone\" not found"
        );
    }

    #[test]
    fn hostname_and_other_container() {
        let mut pod = pod();
        pod["spec"]["hostname"] = json!("db-main");
        pod["spec"]["containers"] =
            json!([{"name": "a", "resources": {"limits": {"memory": "1Gi"}}}, {"name": "b"}]);
        let alloc = json!({"cpu": "2", "memory": "4Gi"});
        let src = sources(&pod, &[], &alloc);
        let c = json!({"name": "b", "env": [
            {"name": "A_MEM", "valueFrom": {"resourceFieldRef": {"containerName": "a", "resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "B_MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "HOSTNAME_SEEN", "value": "$(HOSTNAME)"}
        ]});
        let env = resolve_env(&c, &src).expect("env");
        assert_eq!(env["HOSTNAME"], "db-main");
        assert_eq!(env["A_MEM"], "1024");
        assert_eq!(env["B_MEM"], "4096");
        // HOSTNAME comes from the runtime, not the kubelet: no expansion.
        assert_eq!(env["HOSTNAME_SEEN"], "$(HOSTNAME)");
        let mut fqdn = pod.clone();
        fqdn["spec"]["subdomain"] = json!("db");
        assert_eq!(container_hostname(&fqdn), "db-main");
        fqdn["spec"]["setHostnameAsFQDN"] = json!(true);
        assert_eq!(
            container_hostname(&fqdn),
            "db-main.db.default.svc.cluster.local"
        );
        let long = "a".repeat(62) + "-bcd";
        assert_eq!(
            pod_hostname(&json!({"metadata": {"name": long}})),
            "a".repeat(62)
        );
    }

    #[test]
    fn go_quoting() {
        assert_eq!(go_quote("plain"), "\"plain\"");
        assert_eq!(
            go_quote("a\"b\\c\nd\te\u{1}\u{e9}"),
            "\"a\\\"b\\\\c\\nd\\te\\x01\u{e9}\""
        );
    }
}
