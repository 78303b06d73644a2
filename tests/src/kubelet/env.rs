//! A container's environment as the kubelet builds it: service links,
//! `KUBERNETES_*`, `envFrom`, `env` with `$(VAR)` expansion, field and
//! resource references.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine;
use serde_json::Value;

use crate::ctx::KUBERNETES_SERVICE_IP;

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
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    /// Services of the pod's namespace (service links).
    pub services: &'a [Value],
    pub lookup: Lookup<'a>,
}

/// `$(VAR)` expansion as Kubernetes does it (`$$` escapes, unknown
/// references stay as they are).
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

pub(super) fn field_ref(
    pod: &Value,
    path: &str,
    pod_ip: Option<Ipv4Addr>,
    host_ip: Ipv4Addr,
) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let bracket = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => s(&pod["metadata"]["name"]),
        "metadata.namespace" => s(&pod["metadata"]["namespace"]),
        "metadata.uid" => s(&pod["metadata"]["uid"]),
        "spec.nodeName" => s(&pod["spec"]["nodeName"]),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        "status.podIP" | "status.podIPs" => pod_ip.map(|i| i.to_string()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        _ => {
            if let Some(k) = bracket("metadata.labels['") {
                s(&pod["metadata"]["labels"][k.as_str()])
            } else if let Some(k) = bracket("metadata.annotations['") {
                s(&pod["metadata"]["annotations"][k.as_str()])
            } else {
                return Err(format!("unsupported fieldRef {path:?}"));
            }
        }
    })
}

fn key_ref(src: &EnvSources<'_>, kind: &str, r: &Value) -> Result<Option<String>, String> {
    let name = r["name"].as_str().unwrap_or("");
    let key = r["key"].as_str().unwrap_or("");
    let optional = r["optional"].as_bool() == Some(true);
    let what = if kind == "secrets" {
        "secret"
    } else {
        "configmap"
    };
    match (src.lookup)(kind, name) {
        None if optional => Ok(None),
        None => Err(format!("{what} \"{name}\" not found")),
        Some(obj) => match object_data(kind, &obj).remove(key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if optional => Ok(None),
            None => Err(format!("couldn't find key {key} in {what} {name}")),
        },
    }
}

fn env_name(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

/// A container's environment, as the kubelet builds it: service links and
/// `KUBERNETES_*` first, then `envFrom`, then `env` (later wins; `$(VAR)`
/// expanded against what came before), `HOSTNAME` = pod name. An error is a
/// CreateContainerConfigError message.
pub fn resolve_env(
    container: &Value,
    src: &EnvSources<'_>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    let pod = src.pod;
    env.insert(
        "HOSTNAME".to_string(),
        pod["metadata"]["name"].as_str().unwrap_or("").to_string(),
    );
    let k = KUBERNETES_SERVICE_IP;
    for (n, v) in [
        ("KUBERNETES_SERVICE_HOST", k.to_string()),
        ("KUBERNETES_SERVICE_PORT", "443".to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", "443".to_string()),
        ("KUBERNETES_PORT", format!("tcp://{k}:443")),
        ("KUBERNETES_PORT_443_TCP", format!("tcp://{k}:443")),
        ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".to_string()),
        ("KUBERNETES_PORT_443_TCP_PORT", "443".to_string()),
        ("KUBERNETES_PORT_443_TCP_ADDR", k.to_string()),
    ] {
        env.insert(n.to_string(), v);
    }
    if pod["spec"]["enableServiceLinks"].as_bool() != Some(false) {
        for svc in src.services {
            let Some(ip) = crate::proxy::cluster_ip(svc) else {
                continue;
            };
            let name = env_name(svc["metadata"]["name"].as_str().unwrap_or(""));
            let ports = crate::proxy::service_ports(svc);
            let Some(first) = ports.first() else { continue };
            env.insert(format!("{name}_SERVICE_HOST"), ip.to_string());
            env.insert(format!("{name}_SERVICE_PORT"), first.port.to_string());
            let proto = first.protocol.to_ascii_lowercase();
            env.insert(
                format!("{name}_PORT"),
                format!("{proto}://{ip}:{}", first.port),
            );
            for p in &ports {
                let proto = p.protocol.to_ascii_lowercase();
                if !p.name.is_empty() {
                    env.insert(
                        format!("{name}_SERVICE_PORT_{}", env_name(&p.name)),
                        p.port.to_string(),
                    );
                }
                let base = format!("{name}_PORT_{}_{}", p.port, p.protocol.to_ascii_uppercase());
                env.insert(base.clone(), format!("{proto}://{ip}:{}", p.port));
                env.insert(format!("{base}_PROTO"), proto);
                env.insert(format!("{base}_PORT"), p.port.to_string());
                env.insert(format!("{base}_ADDR"), ip.to_string());
            }
        }
    }
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
                for (k, v) in object_data(kind, &obj) {
                    env.insert(
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
            None if r["optional"].as_bool() == Some(true) => {}
            None => {
                let what = if kind == "secrets" {
                    "secret"
                } else {
                    "configmap"
                };
                return Err(format!("{what} \"{name}\" not found"));
            }
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let Some(name) = e["name"].as_str() else {
            continue;
        };
        let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
            Some(expand(v, &env))
        } else if let Some(vf) = e.get("valueFrom") {
            if vf["configMapKeyRef"].is_object() {
                key_ref(src, "configmaps", &vf["configMapKeyRef"])?
            } else if vf["secretKeyRef"].is_object() {
                key_ref(src, "secrets", &vf["secretKeyRef"])?
            } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(pod, path, src.pod_ip, src.host_ip)?)
            } else if vf["resourceFieldRef"].is_object() {
                Some("0".to_string())
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.insert(name.to_string(), v);
        }
    }
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
            ("configmaps", "cfg") => Some(json!({"data": {"GREETING": "hello", "MODE": "fast"}})),
            ("secrets", "sec") => Some(json!({"data": {"TOKEN": "czNjcjN0"}})),
            _ => None,
        }
    }

    #[test]
    fn env_resolution() {
        let pod = pod();
        let services = vec![
            json!({"metadata": {"name": "redis-main", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "redis", "port": 6379}]}}),
        ];
        let src = EnvSources {
            pod: &pod,
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 9)),
            host_ip: NODE_UNDERLAY_IP,
            services: &services,
            lookup: &lookup,
        };
        let c = json!({
            "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"}],
            "env": [
                {"name": "PLAIN", "value": "x-$(GREETING)-$$(GREETING)-$(NOPE)"},
                {"name": "MODE", "value": "slow"},
                {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": true}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}
            ]
        });
        let env = resolve_env(&c, &src).expect("env");
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("GREETING"), Some("hello"));
        assert_eq!(get("S_TOKEN"), Some("s3cr3t"));
        assert_eq!(get("PLAIN"), Some("x-hello-$(GREETING)-$(NOPE)"));
        assert_eq!(get("MODE"), Some("slow"));
        assert_eq!(get("CM"), Some("hello"));
        assert_eq!(get("SECRET"), Some("s3cr3t"));
        assert_eq!(get("OPT"), None);
        assert_eq!(get("POD_NAME"), Some("echo-1"));
        assert_eq!(get("POD_NS"), Some("default"));
        assert_eq!(get("POD_UID"), Some("abcdef12-3456"));
        assert_eq!(get("POD_IP"), Some("10.244.0.9"));
        assert_eq!(get("HOST_IP"), Some("192.168.240.1"));
        assert_eq!(get("NODE"), Some("node-1"));
        assert_eq!(get("SA"), Some("burrow"));
        assert_eq!(get("APP"), Some("echo"));
        assert_eq!(get("HOSTNAME"), Some("echo-1"));
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("REDIS_MAIN_SERVICE_HOST"), Some("10.96.0.50"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT"), Some("6379"));
        assert_eq!(get("REDIS_MAIN_SERVICE_PORT_REDIS"), Some("6379"));
        assert_eq!(get("REDIS_MAIN_PORT_6379_TCP_ADDR"), Some("10.96.0.50"));

        let bad = json!({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing key"),
            "couldn't find key nope in configmap cfg"
        );
        let bad = json!({"envFrom": [{"secretRef": {"name": "gone"}}]});
        assert_eq!(
            resolve_env(&bad, &src).expect_err("missing"),
            "secret \"gone\" not found"
        );
    }
}
