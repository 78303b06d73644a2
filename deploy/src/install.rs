//! Installing, finding, upgrading and uninstalling the gateway.
//!
//! The objects are the plain manifests in `deploy/manifests/` (embedded at
//! build time, so `kubectl apply -f deploy/manifests/` and `burrow install`
//! install the same thing), with the namespace, image, version and metrics
//! namespace filled in, applied with server-side apply under the field
//! manager `burrow`. The gateway's WireGuard key lives in a Secret created
//! once and kept across upgrades, so laptops keep their sessions' trust in
//! the gateway's key. Besides the gateway and its NetworkPolicy, the
//! manifests hold the roles developers need (`user-roles.yaml`); burrow
//! creates them and never binds anyone: [`binding_instructions`] says how.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde::Deserialize as _;
use serde_json::Value;

use crate::error::DeployError;
use crate::target::Cluster;

/// The manifests of `deploy/manifests/`, in the order they are applied
/// (the order `kubectl apply -f deploy/manifests/` takes too).
const MANIFESTS: &[(&str, &str)] = &[
    ("gateway.yaml", include_str!("../manifests/gateway.yaml")),
    (
        "networkpolicy.yaml",
        include_str!("../manifests/networkpolicy.yaml"),
    ),
    (
        "user-roles.yaml",
        include_str!("../manifests/user-roles.yaml"),
    ),
];

/// The namespace the manifests use; `--gateway-namespace` moves it.
pub const DEFAULT_NAMESPACE: &str = "burrow-system";
/// Name of the Deployment, Service, ServiceAccount.
pub const NAME: &str = "burrow-gateway";
/// The Secret holding the gateway's WireGuard private key.
pub const CONFIG_SECRET: &str = "burrow-gateway-config";
/// Label selecting the gateway's pods.
pub const SELECTOR: &str = "app.kubernetes.io/name=burrow-gateway";
/// Label carrying the installed version.
pub const VERSION_LABEL: &str = "app.kubernetes.io/version";
/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "burrow";
/// The gateway's NetworkPolicy.
pub const NETWORK_POLICY: &str = "burrow-gateway";
/// Annotation on the NetworkPolicy naming the namespace admitted to the
/// metrics port besides the gateway's own (kept across upgrades).
pub const METRICS_NAMESPACE_ANNOTATION: &str = "burrow.dev/metrics-namespace";
/// The label every namespace carries with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The Role developers are bound to in the gateway's namespace to connect.
pub const CONNECT_ROLE: &str = "burrow-connect";
/// The ClusterRole bound cluster-wide, optionally, for what connect reads
/// outside the gateway's namespace (nodes, namespace names).
pub const CONNECT_CLUSTER_ROLE: &str = "burrow-connect-cluster";
/// The ClusterRole bound per namespace to reroute its Services.
pub const REROUTE_ROLE: &str = "burrow-reroute";

/// The client's version; the gateway it installs has the same.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub namespace: String,
    /// Container image of the gateway; the default is
    /// `burrow-gateway:<VERSION>` (override with `BURROW_GATEWAY_IMAGE` or
    /// `--gateway-image`).
    pub image: String,
    /// The namespace (besides the gateway's own) whose pods may scrape the
    /// gateway's metrics: `Some("")` none, `None` whatever the installed
    /// NetworkPolicy admits (none on a fresh install), so an upgrade by
    /// `burrow connect` keeps what the admin chose.
    pub metrics_namespace: Option<String>,
}

impl Default for InstallOptions {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_string(),
            image: std::env::var("BURROW_GATEWAY_IMAGE")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("burrow-gateway:{VERSION}")),
            metrics_namespace: None,
        }
    }
}

/// The gateway as found in the cluster.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Installed {
    pub namespace: String,
    /// The version label of the Deployment.
    pub version: String,
    pub image: String,
}

/// A ready gateway pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayPod {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub version: String,
    /// When the pod became ready, as the API reports it.
    pub started: Option<String>,
    /// The same instant, for arithmetic (a NodePort to a pod ready only
    /// a moment ago may not be programmed on the nodes yet).
    #[serde(skip)]
    pub ready_at: Option<std::time::SystemTime>,
}

/// The manifests' objects with namespace, image, version and metrics
/// namespace filled in.
pub fn render(opts: &InstallOptions) -> Result<Vec<Value>, DeployError> {
    let metrics = opts.metrics_namespace.as_deref().unwrap_or_default();
    if !metrics.is_empty() && !is_dns_label(metrics) {
        return Err(DeployError::new(
            format!("--metrics-namespace {metrics:?} is not a namespace name"),
            "a namespace name is lower-case letters, digits and '-', at most 63 characters",
        ));
    }
    let mut out = Vec::new();
    let docs = MANIFESTS
        .iter()
        .flat_map(|(file, text)| serde_yaml::Deserializer::from_str(text).map(move |d| (file, d)));
    for (file, doc) in docs {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| {
            DeployError::new(format!("internal: embedded manifest {file}: {e}"), "")
        })?;
        let mut obj: Value = serde_json::to_value(value)
            .map_err(|e| DeployError::new(format!("internal: manifest: {e}"), ""))?;
        if obj.is_null() {
            continue;
        }
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        if kind == "Namespace" {
            obj["metadata"]["name"] = Value::from(opts.namespace.clone());
        } else if obj["metadata"].get("namespace").is_some() {
            obj["metadata"]["namespace"] = Value::from(opts.namespace.clone());
        }
        if kind == "ClusterRoleBinding"
            && let Some(subjects) = obj["subjects"].as_array_mut()
        {
            for s in subjects {
                s["namespace"] = Value::from(opts.namespace.clone());
            }
        }
        if kind == "NetworkPolicy" {
            admit_metrics(&mut obj, &opts.namespace, metrics);
        }
        obj["metadata"]["labels"][VERSION_LABEL] = Value::from(VERSION);
        obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] = Value::from("burrow");
        if kind == "Deployment" {
            let tpl = &mut obj["spec"]["template"];
            tpl["metadata"]["labels"][VERSION_LABEL] = Value::from(VERSION);
            if let Some(containers) = tpl["spec"]["containers"].as_array_mut() {
                for c in containers {
                    c["image"] = Value::from(opts.image.clone());
                }
            }
        }
        out.push(obj);
    }
    Ok(out)
}

/// In the NetworkPolicy: the peers naming the manifests' namespace name the
/// gateway's, and `metrics` (if any) joins them; the annotation records it.
fn admit_metrics(policy: &mut Value, namespace: &str, metrics: &str) {
    let rules = policy["spec"]["ingress"].as_array_mut();
    for rule in rules.into_iter().flatten() {
        let Some(peers) = rule["from"].as_array_mut() else {
            continue;
        };
        let ours = |p: &Value| {
            p["namespaceSelector"]["matchLabels"][NAMESPACE_NAME_LABEL] == DEFAULT_NAMESPACE
        };
        if !peers.iter().any(ours) {
            continue;
        }
        for p in peers.iter_mut().filter(|p| ours(p)) {
            p["namespaceSelector"]["matchLabels"][NAMESPACE_NAME_LABEL] = Value::from(namespace);
        }
        if !metrics.is_empty() && metrics != namespace {
            peers.push(serde_json::json!({
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: metrics}}
            }));
        }
    }
    policy["metadata"]["annotations"][METRICS_NAMESPACE_ANNOTATION] = Value::from(metrics);
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The `kubectl` lines a cluster admin runs to give a developer what
/// burrow needs, with `USER` and `NAMESPACE` to fill in.
pub fn binding_instructions(namespace: &str) -> String {
    format!(
        "Developers need roles bound by a cluster admin (burrow binds nobody). For user USER:\n\
         \x20 to connect:\n\
         \x20   kubectl -n {namespace} create rolebinding {CONNECT_ROLE}-USER --role={CONNECT_ROLE} --user=USER\n\
         \x20 to reroute the Services of namespace NAMESPACE (once per namespace):\n\
         \x20   kubectl -n NAMESPACE create rolebinding {REROUTE_ROLE}-USER --clusterrole={REROUTE_ROLE} --user=USER\n\
         \x20 optional, cluster-wide: direct UDP to the NodePort, exact pod ranges, namespace names in DNS:\n\
         \x20   kubectl create clusterrolebinding {CONNECT_CLUSTER_ROLE}-USER --clusterrole={CONNECT_CLUSTER_ROLE} --user=USER\n\
         (--group=GROUP instead of --user=USER binds a whole group)"
    )
}

/// The metrics namespace the installed NetworkPolicy admits ("" when none
/// or not installed).
async fn installed_metrics_namespace(
    cluster: &Cluster,
    namespace: &str,
) -> Result<String, DeployError> {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let api: Api<NetworkPolicy> = Api::namespaced(cluster.client.clone(), namespace);
    let found = api.get_opt(NETWORK_POLICY).await.map_err(|e| {
        cluster.err(
            e,
            &format!("get NetworkPolicy {namespace}/{NETWORK_POLICY}"),
        )
    })?;
    Ok(found
        .and_then(|p| p.metadata.annotations)
        .and_then(|a| a.get(METRICS_NAMESPACE_ANNOTATION).cloned())
        .unwrap_or_default())
}

/// The gateway's Deployment, if installed.
pub async fn find(cluster: &Cluster, namespace: &str) -> Result<Option<Installed>, DeployError> {
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), namespace);
    match api.get_opt(NAME).await {
        Ok(None) => Ok(None),
        Ok(Some(d)) => {
            let version = d
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VERSION_LABEL))
                .cloned()
                .unwrap_or_else(|| "unknown".to_string());
            let image = d
                .spec
                .template
                .spec
                .and_then(|s| s.containers.into_iter().next())
                .and_then(|c| c.image)
                .unwrap_or_default();
            Ok(Some(Installed {
                namespace: namespace.to_string(),
                version,
                image,
            }))
        }
        Err(e) => Err(cluster.err(e, &format!("get Deployment {namespace}/{NAME}"))),
    }
}

/// Applies every object (server-side apply, field manager `burrow`) and
/// creates the key Secret if it does not exist. Idempotent; also upgrades.
pub async fn apply(
    cluster: &Cluster,
    opts: &InstallOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), DeployError> {
    let objects = render(opts)?;
    for obj in &objects {
        let kind = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        progress(&format!("applying {kind} {name}"));
        if kind == "NetworkPolicy" && opts.metrics_namespace.is_none() {
            // Keep the metrics namespace the installed policy admits. Asked
            // only here, so a user who may not install is refused at the
            // first object, the Namespace, as before.
            let kept = InstallOptions {
                metrics_namespace: Some(
                    installed_metrics_namespace(cluster, &opts.namespace).await?,
                ),
                ..opts.clone()
            };
            let policy = render(&kept)?
                .into_iter()
                .find(|o| o["kind"] == "NetworkPolicy")
                .ok_or_else(|| DeployError::new("internal: the NetworkPolicy went missing", ""))?;
            apply_object(cluster, &policy).await?;
            continue;
        }
        apply_object(cluster, obj).await?;
        if kind == "Namespace" {
            ensure_key_secret(cluster, &opts.namespace).await?;
        }
    }
    Ok(())
}

async fn apply_object(cluster: &Cluster, obj: &Value) -> Result<(), DeployError> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let ns = obj["metadata"]["namespace"].as_str();
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let ar = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &ar),
        None => Api::all_with(cluster.client.clone(), &ar),
    };
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &pp, &Patch::Apply(obj))
        .await
        .map(|_| ())
        .map_err(|e| {
            let what = match ns {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            };
            cluster.err(e, &format!("apply {what}"))
        })
}

/// The Secret with the gateway's WireGuard configuration: created once with
/// a fresh private key, never overwritten.
async fn ensure_key_secret(cluster: &Cluster, namespace: &str) -> Result<(), DeployError> {
    let api: Api<Secret> = Api::namespaced(cluster.client.clone(), namespace);
    let existing = api
        .get_opt(CONFIG_SECRET)
        .await
        .map_err(|e| cluster.err(e, &format!("get Secret {namespace}/{CONFIG_SECRET}")))?;
    if existing.is_some() {
        return Ok(());
    }
    let key = burrow_api::WgKey::from(rand::random::<[u8; 32]>());
    let conf = format!(
        "# burrow-gateway's WireGuard key; laptops register at runtime.\n[Interface]\nPrivateKey = {key}\n"
    );
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": CONFIG_SECRET,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": NAME, "app.kubernetes.io/managed-by": "burrow"},
        },
        "type": "Opaque",
        "stringData": {"gateway.conf": conf},
    }))
    .map_err(|e| DeployError::new(format!("internal: Secret: {e}"), ""))?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        // Someone else (another laptop installing at the same time) won.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(cluster.err(e, &format!("create Secret {namespace}/{CONFIG_SECRET}"))),
    }
}

/// Waits until a gateway pod of `version` is Ready and returns it. Calls
/// `progress` with what it is waiting for whenever that changes.
pub async fn wait_ready(
    cluster: &Cluster,
    namespace: &str,
    version: &str,
    timeout: Duration,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<GatewayPod, DeployError> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let lp = ListParams::default().labels(SELECTOR);
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let pods = api
            .list(&lp)
            .await
            .map_err(|e| cluster.err(e, &format!("list pods in {namespace}")))?;
        let mut state = format!("waiting for the gateway pod in {namespace} to be created");
        for pod in pods {
            if let Some(ready) = ready_gateway(&pod, namespace, version) {
                return Ok(ready);
            }
            if pod.metadata.deletion_timestamp.is_some() || !has_version(&pod, version) {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            state = describe_pod_wait(&name, &pod.status.clone().unwrap_or_default());
        }
        if state != last {
            progress(&state);
            last = state.clone();
        }
        if Instant::now() >= deadline {
            return Err(DeployError::new(
                format!(
                    "the gateway did not become ready within {}s: {last}",
                    timeout.as_secs()
                ),
                format!("look at `kubectl -n {namespace} describe pod -l {SELECTOR}` and its logs"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn has_version(pod: &Pod, version: &str) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(VERSION_LABEL))
        .map(String::as_str)
        == Some(version)
}

/// `pod` as a usable gateway: of `version`, not being deleted, Ready, with
/// an IP.
fn ready_gateway(pod: &Pod, namespace: &str, version: &str) -> Option<GatewayPod> {
    if pod.metadata.deletion_timestamp.is_some() || !has_version(pod, version) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let cond = status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(GatewayPod {
        namespace: namespace.to_string(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        ip: status.pod_ip.clone()?,
        version: version.to_string(),
        started: cond.last_transition_time.as_ref().map(|t| t.0.to_string()),
        ready_at: cond
            .last_transition_time
            .as_ref()
            .map(|t| std::time::SystemTime::from(t.0)),
    })
}

/// Watches the gateway's pods (one list, then a watch that kube-rs resumes
/// with backoff) and yields the Ready gateway pod, or None, whenever the
/// set of pods changes. The newest Ready pod wins when two overlap during
/// a rollout.
pub fn watch_ready(
    cluster: &Cluster,
    namespace: &str,
    version: &str,
) -> impl futures::Stream<Item = Result<Option<GatewayPod>, DeployError>> + Send + 'static {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, reflector, watcher};
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(SELECTOR);
    let namespace = namespace.to_string();
    let version = version.to_string();
    reflector(writer, watcher(api, config))
        .default_backoff()
        .map(move |event| match event {
            Ok(_) => {
                let mut ready: Vec<GatewayPod> = reader
                    .state()
                    .iter()
                    .filter_map(|p| ready_gateway(p, &namespace, &version))
                    .collect();
                ready.sort_by(|a, b| a.started.cmp(&b.started).then(a.name.cmp(&b.name)));
                Ok(ready.pop())
            }
            Err(e) => Err(DeployError::new(
                format!("watching the gateway pods in {namespace}: {e}"),
                "check that the API server is reachable and that you may watch pods there",
            )),
        })
}

/// "pod X: ContainerCreating" and the like.
fn describe_pod_wait(name: &str, status: &k8s_openapi::api::core::v1::PodStatus) -> String {
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref().and_then(|s| s.waiting.clone()));
    match waiting {
        Some(w) => {
            let reason = w.reason.unwrap_or_default();
            match w.message.filter(|m| !m.is_empty()) {
                Some(m) => format!("waiting for gateway pod {name}: {reason}: {m}"),
                None => format!("waiting for gateway pod {name}: {reason}"),
            }
        }
        None => format!(
            "waiting for gateway pod {name} to be ready ({})",
            status.phase.clone().unwrap_or_else(|| "Pending".into())
        ),
    }
}

/// The gateway Service's NodePorts: (WireGuard UDP, framed TCP).
pub async fn node_ports(
    cluster: &Cluster,
    namespace: &str,
) -> Result<(Option<u16>, Option<u16>), DeployError> {
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
    let svc = api
        .get(NAME)
        .await
        .map_err(|e| cluster.err(e, &format!("get Service {namespace}/{NAME}")))?;
    let mut wg = None;
    let mut framed = None;
    for p in svc.spec.and_then(|s| s.ports).unwrap_or_default() {
        let np = p.node_port.and_then(|n| u16::try_from(n).ok());
        match p.name.as_deref() {
            Some("wireguard") => wg = np,
            Some("framed") => framed = np,
            _ => {}
        }
    }
    Ok((wg, framed))
}

/// The nodes' addresses a laptop may reach a NodePort at: every node's
/// ExternalIPs first, then its InternalIPs (deduplicated, in list order).
pub async fn node_addresses(cluster: &Cluster) -> Result<Vec<std::net::IpAddr>, DeployError> {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client.clone());
    let nodes = api.list(&ListParams::default()).await.map_err(|e| {
        let mut err = cluster.err(e, "list nodes (to find the gateway's NodePort address)");
        if err.is_forbidden() {
            err.hint = format!(
                "the port-forward transport needs no node access; for direct UDP pass --endpoint NODE:PORT, \
                 or ask a cluster admin to bind the ClusterRole {CONNECT_CLUSTER_ROLE} to you"
            );
        }
        err
    })?;
    let mut out = Vec::new();
    for kind in ["ExternalIP", "InternalIP"] {
        for node in &nodes.items {
            let addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
            for a in addrs.into_iter().flatten() {
                if a.type_ == kind
                    && let Ok(ip) = a.address.parse()
                    && !out.contains(&ip)
                {
                    out.push(ip);
                }
            }
        }
    }
    Ok(out)
}

/// The bindings someone made to burrow's developer roles, as
/// `kubectl delete` commands (`uninstall` leaves them: it never made them;
/// without the roles they grant nothing). Empty when they cannot be listed.
pub async fn user_bindings(cluster: &Cluster) -> Vec<String> {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
    let ours = |kind: &str, name: &str| match kind {
        "Role" => name == CONNECT_ROLE,
        "ClusterRole" => name == REROUTE_ROLE || name == CONNECT_CLUSTER_ROLE,
        _ => false,
    };
    let mut out = Vec::new();
    let rbs: Api<RoleBinding> = Api::all(cluster.client.clone());
    if let Ok(list) = rbs.list(&ListParams::default()).await {
        for b in list {
            if ours(&b.role_ref.kind, &b.role_ref.name) {
                out.push(format!(
                    "kubectl -n {} delete rolebinding {}",
                    b.metadata.namespace.unwrap_or_default(),
                    b.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    let crbs: Api<ClusterRoleBinding> = Api::all(cluster.client.clone());
    if let Ok(list) = crbs.list(&ListParams::default()).await {
        for b in list {
            if ours(&b.role_ref.kind, &b.role_ref.name) {
                out.push(format!(
                    "kubectl delete clusterrolebinding {}",
                    b.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    out
}

/// Removes every object `apply` made, the namespace last, and waits until
/// the namespace is gone. Missing objects are fine (idempotent).
pub async fn uninstall(
    cluster: &Cluster,
    namespace: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), DeployError> {
    let opts = InstallOptions {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    let mut objects = render(&opts)?;
    // The Secret is not in the manifests; delete it with the rest.
    objects.push(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CONFIG_SECRET, "namespace": namespace}
    }));
    objects.reverse();
    let dp = DeleteParams::background();
    for obj in &objects {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &ar),
            None => Api::all_with(cluster.client.clone(), &ar),
        };
        progress(&format!("deleting {kind} {name}"));
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(cluster.err(e, &format!("delete {kind} {name}"))),
        }
    }
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    progress(&format!("waiting for namespace {namespace} to be gone"));
    loop {
        match api.get_opt(namespace).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Some(_)) => {
                return Err(DeployError::new(
                    format!("namespace {namespace} is still terminating after 60s"),
                    format!("look at `kubectl get ns {namespace} -o yaml` (finalizers?)"),
                ));
            }
            Err(e) => return Err(cluster.err(e, &format!("get namespace {namespace}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_in_namespace_image_and_version() {
        let objs = render(&InstallOptions {
            namespace: "tools".into(),
            image: "registry.example/burrow-gateway:9".into(),
            metrics_namespace: None,
        })
        .expect("render");
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Deployment",
                "Service",
                "NetworkPolicy",
                "Role",
                "ClusterRole",
                "ClusterRole",
            ]
        );
        assert_eq!(objs[0]["metadata"]["name"], "tools");
        for o in &objs[1..] {
            let cluster_wide = o["kind"].as_str().is_some_and(|k| k.starts_with("Cluster"));
            if !cluster_wide {
                assert_eq!(o["metadata"]["namespace"], "tools", "{o}");
            }
            assert_eq!(o["metadata"]["labels"][VERSION_LABEL], VERSION);
        }
        // The gateway's service account, wherever it is installed.
        assert_eq!(objs[3]["subjects"][0]["namespace"], "tools");
        let d = &objs[4];
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/burrow-gateway:9"
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"][VERSION_LABEL],
            VERSION
        );
        // PodSecurity "restricted" essentials stay in place.
        let sc = &d["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        // The developers' Role lives beside the gateway.
        assert_eq!(objs[7]["metadata"]["name"], CONNECT_ROLE);
        assert_eq!(objs[7]["metadata"]["namespace"], "tools");
    }

    fn rule_verbs(role: &Value) -> Vec<(String, String, Vec<String>)> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let mut out = Vec::new();
        for rule in role["rules"].as_array().into_iter().flatten() {
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    out.push((g.clone(), r, strings(&rule["verbs"])));
                }
            }
        }
        out
    }

    #[test]
    fn the_gateway_holds_only_what_a_restore_needs() {
        let objs = render(&InstallOptions::default()).expect("render");
        let role = objs
            .iter()
            .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == NAME)
            .expect("gateway ClusterRole");
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rule_verbs(role),
            [
                (
                    "".into(),
                    "services".into(),
                    v(&["get", "list", "watch", "patch", "delete"])
                ),
                (
                    "".into(),
                    "endpoints".into(),
                    v(&["get", "list", "watch", "delete"])
                ),
                (
                    "discovery.k8s.io".into(),
                    "endpointslices".into(),
                    v(&["get", "list", "watch", "delete"])
                ),
            ]
        );
    }

    fn policy(opts: &InstallOptions) -> Value {
        render(opts)
            .expect("render")
            .into_iter()
            .find(|o| o["kind"] == "NetworkPolicy")
            .expect("NetworkPolicy")
    }

    /// The namespaces admitted to the metrics port.
    fn metrics_from(p: &Value) -> Vec<String> {
        let rules = p["spec"]["ingress"].as_array().expect("ingress");
        let rule = rules
            .iter()
            .find(|r| r["ports"][0]["port"] == "metrics")
            .expect("metrics rule");
        rule["from"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                p["namespaceSelector"]["matchLabels"][NAMESPACE_NAME_LABEL]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_network_policy_admits_metrics_from_the_named_namespace_only() {
        let p = policy(&InstallOptions::default());
        assert_eq!(p["metadata"]["namespace"], DEFAULT_NAMESPACE);
        assert_eq!(metrics_from(&p), [DEFAULT_NAMESPACE]);
        assert_eq!(
            p["metadata"]["annotations"][METRICS_NAMESPACE_ANNOTATION],
            ""
        );
        let p = policy(&InstallOptions {
            namespace: "tools".into(),
            metrics_namespace: Some("monitoring".into()),
            ..Default::default()
        });
        assert_eq!(metrics_from(&p), ["tools", "monitoring"]);
        assert_eq!(
            p["metadata"]["annotations"][METRICS_NAMESPACE_ANNOTATION],
            "monitoring"
        );
        // Reroute listeners: every pod, the pinned ephemeral range, and
        // neither metrics nor control inside it.
        let rules = p["spec"]["ingress"].as_array().expect("ingress");
        let listeners = rules
            .iter()
            .find(|r| r["from"][0]["namespaceSelector"] == serde_json::json!({}))
            .expect("listener rule");
        let ranges: Vec<(&str, u64, u64)> = listeners["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["protocol"].as_str().unwrap_or(""),
                    p["port"].as_u64().unwrap_or(0),
                    p["endPort"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            ranges,
            [
                ("TCP", 32768, 51821),
                ("TCP", 51823, 60999),
                ("UDP", 32768, 60999)
            ]
        );
        let bad = InstallOptions {
            metrics_namespace: Some("Not A Namespace".into()),
            ..Default::default()
        };
        assert!(render(&bad).is_err());
    }

    #[test]
    fn the_pinned_port_range_is_the_one_the_policy_admits() {
        let objs = render(&InstallOptions::default()).expect("render");
        let d = objs
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("Deployment");
        let sysctls = d["spec"]["template"]["spec"]["securityContext"]["sysctls"]
            .as_array()
            .expect("sysctls");
        let range = sysctls
            .iter()
            .find(|s| s["name"] == "net.ipv4.ip_local_port_range")
            .expect("ip_local_port_range");
        assert_eq!(range["value"], "32768 60999");
    }

    #[test]
    fn binding_instructions_name_the_shipped_roles() {
        let text = binding_instructions("burrow-system");
        assert!(text.contains(
            "kubectl -n burrow-system create rolebinding burrow-connect-USER --role=burrow-connect --user=USER"
        ));
        assert!(text.contains(
            "kubectl -n NAMESPACE create rolebinding burrow-reroute-USER --clusterrole=burrow-reroute --user=USER"
        ));
        let objs = render(&InstallOptions::default()).expect("render");
        for role in [CONNECT_ROLE, REROUTE_ROLE, CONNECT_CLUSTER_ROLE] {
            assert!(
                objs.iter().any(|o| o["metadata"]["name"] == role),
                "{role} is not in the manifests"
            );
        }
    }
}
