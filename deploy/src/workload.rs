//! A workload as `burrow env` and `burrow run` see it: which object
//! (`deploy/NAME`, `statefulset/NAME`, `daemonset/NAME`, `pod/NAME`, or a
//! bare NAME), its pod spec, a running pod for the fields only a pod has,
//! and the ConfigMaps, Secrets, Services and node its container's
//! environment is made from — read with the user's credentials. The
//! environment itself is [`crate::podenv`]'s.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, PodSpec, Secret, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Api;
use kube::api::ListParams;

use burrow_api::names;

use crate::podenv::{self, Source};
use crate::{Cluster, DeployError};

/// What kind of object a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Pod,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
            Kind::Pod => "Pod",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Kind::Deployment => "deploy",
            Kind::StatefulSet => "statefulset",
            Kind::DaemonSet => "daemonset",
            Kind::Pod => "pod",
        }
    }
}

/// What the user named: `deploy/api`, `pod/api-1`, `api`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    /// None: a Deployment, else a pod, of that name.
    pub kind: Option<Kind>,
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Some(k) => write!(f, "{}/{}", k.short(), self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for WorkloadRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, name) = match s.split_once('/') {
            None => (None, s),
            Some((k, n)) => {
                let kind = match k.to_ascii_lowercase().as_str() {
                    "deploy" | "deployment" | "deployments" | "deployment.apps"
                    | "deployments.apps" => Kind::Deployment,
                    "sts" | "statefulset" | "statefulsets" | "statefulset.apps"
                    | "statefulsets.apps" => Kind::StatefulSet,
                    "ds" | "daemonset" | "daemonsets" | "daemonset.apps" | "daemonsets.apps" => {
                        Kind::DaemonSet
                    }
                    "po" | "pod" | "pods" => Kind::Pod,
                    other => {
                        return Err(format!(
                            "{s}: unknown kind {other:?}; use deploy/NAME, statefulset/NAME, \
                             daemonset/NAME, pod/NAME or a bare NAME"
                        ));
                    }
                };
                (Some(kind), n)
            }
        };
        if !names::is_dns1123_subdomain(name) {
            return Err(format!(
                "{s}: {name:?} is not a Kubernetes object name (lower-case letters, digits, \
                 '-' and '.')"
            ));
        }
        Ok(Self {
            kind,
            name: name.to_string(),
        })
    }
}

/// A workload found in the cluster.
#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: Kind,
    pub name: String,
    pub namespace: String,
    /// The labels its pods carry (the template's; the pod's for a pod).
    pub pod_labels: BTreeMap<String, String>,
    /// The spec the environment comes from: the chosen pod's, else the
    /// template's defaulted as the API server defaults a pod.
    pub spec: PodSpec,
    /// The pod's metadata, else the template's (namespace filled in).
    pub meta: ObjectMeta,
    /// The running pod whose fields are used.
    pub pod: Option<Pod>,
    /// Why no running pod (when `pod` is None).
    pub no_pod: String,
}

impl Workload {
    /// `deploy/api` as the user would write it.
    pub fn display(&self) -> String {
        format!("{}/{}", self.kind.short(), self.name)
    }

    /// The container `-c` names, else the first; init containers only by
    /// name.
    pub fn container(&self, name: Option<&str>) -> Result<&Container, DeployError> {
        let all = || {
            self.spec
                .containers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            None => self.spec.containers.first().ok_or_else(|| {
                DeployError::new(format!("{} has no containers", self.display()), "")
            }),
            Some(n) => self
                .spec
                .containers
                .iter()
                .chain(self.spec.init_containers.iter().flatten())
                .find(|c| c.name == n)
                .ok_or_else(|| {
                    DeployError::new(
                        format!("{} has no container {n:?}", self.display()),
                        format!("its containers: {}; choose one with -c", all()),
                    )
                }),
        }
    }

    /// The pod IPs and the node's IPs of the chosen pod.
    pub fn ips(&self) -> (Vec<String>, Vec<String>) {
        let Some(st) = self.pod.as_ref().and_then(|p| p.status.as_ref()) else {
            return (Vec::new(), Vec::new());
        };
        let pod = match &st.pod_ips {
            Some(v) if !v.is_empty() => v.iter().map(|i| i.ip.clone()).collect(),
            _ => st.pod_ip.iter().cloned().collect(),
        };
        let host = match &st.host_ips {
            Some(v) if !v.is_empty() => v.iter().map(|i| i.ip.clone()).collect(),
            _ => st.host_ip.iter().cloned().collect(),
        };
        (pod, host)
    }
}

/// A label selector as the API's `labelSelector` parameter.
fn selector_string(sel: &LabelSelector) -> Result<String, String> {
    let mut parts = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        parts.push(format!("{k}={v}"));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("unknown selector operator {other:?}")),
        });
    }
    Ok(parts.join(","))
}

fn running_and_ready(p: &Pod) -> (bool, bool) {
    let st = p.status.as_ref();
    let running = st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.metadata.deletion_timestamp.is_none();
    let ready = st
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    (running, ready)
}

/// The newest running pod of the selector, ready ones first.
async fn pick_pod(
    cluster: &Cluster,
    namespace: &str,
    selector: &LabelSelector,
    what: &str,
) -> Result<(Option<Pod>, String), DeployError> {
    let sel =
        selector_string(selector).map_err(|e| DeployError::new(format!("{what}: {e}"), ""))?;
    if sel.is_empty() {
        return Ok((None, format!("{what} has an empty selector")));
    }
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let pods = api
        .list(&ListParams::default().labels(&sel))
        .await
        .map_err(|e| cluster.err(e, &format!("list pods of {what} in namespace {namespace}")))?
        .items;
    let total = pods.len();
    let mut running: Vec<(bool, Pod)> = pods
        .into_iter()
        .filter_map(|p| {
            let (run, ready) = running_and_ready(&p);
            run.then_some((ready, p))
        })
        .collect();
    running.sort_by(|(ra, a), (rb, b)| {
        rb.cmp(ra).then_with(|| {
            b.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&a.metadata.creation_timestamp.as_ref().map(|t| t.0))
        })
    });
    match running.into_iter().next() {
        Some((_, p)) => Ok((Some(p), String::new())),
        None if total == 0 => Ok((None, format!("{what} has no pods"))),
        None => Ok((
            None,
            format!("none of the {total} pods of {what} is running"),
        )),
    }
}

fn not_found(kind: &str, name: &str, namespace: &str) -> DeployError {
    DeployError::new(
        format!("{kind} {name} not found in namespace {namespace}"),
        format!(
            "check the name and the namespace (-n): `kubectl get {} -n {namespace}`",
            kind.to_ascii_lowercase() + "s"
        ),
    )
}

/// Finds the workload and a running pod of it.
pub async fn find(
    cluster: &Cluster,
    namespace: &str,
    wref: &WorkloadRef,
) -> Result<Workload, DeployError> {
    names::check_namespace(namespace).map_err(|e| DeployError::new(e, ""))?;
    let client = cluster.client.clone();
    let ns = namespace;
    let name = wref.name.as_str();
    let get_err = |e, what: &str| cluster.err(e, &format!("get {what} {ns}/{name}"));
    let templated = |kind: Kind,
                     template: k8s_openapi::api::core::v1::PodTemplateSpec,
                     selector: LabelSelector| async move {
        let what = format!("{}/{}", kind.short(), name);
        let (pod, no_pod) = pick_pod(cluster, ns, &selector, &what).await?;
        Ok::<_, DeployError>(from_template(kind, name, ns, template, pod, no_pod))
    };
    let kind = wref.kind;
    if matches!(kind, None | Some(Kind::Deployment)) {
        let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
        match api
            .get_opt(name)
            .await
            .map_err(|e| get_err(e, "Deployment"))?
        {
            Some(d) => {
                let spec = d.spec;
                return templated(Kind::Deployment, spec.template, spec.selector).await;
            }
            None if kind.is_some() => return Err(not_found("Deployment", name, ns)),
            None => {}
        }
    }
    if kind == Some(Kind::StatefulSet) {
        let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        let s = api
            .get_opt(name)
            .await
            .map_err(|e| get_err(e, "StatefulSet"))?
            .ok_or_else(|| not_found("StatefulSet", name, ns))?;
        let spec = s.spec;
        return templated(Kind::StatefulSet, spec.template, spec.selector).await;
    }
    if kind == Some(Kind::DaemonSet) {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        let s = api
            .get_opt(name)
            .await
            .map_err(|e| get_err(e, "DaemonSet"))?
            .ok_or_else(|| not_found("DaemonSet", name, ns))?;
        let spec = s.spec;
        return templated(Kind::DaemonSet, spec.template, spec.selector).await;
    }
    let api: Api<Pod> = Api::namespaced(client, ns);
    match api.get_opt(name).await.map_err(|e| get_err(e, "Pod"))? {
        Some(p) => {
            let (running, _) = running_and_ready(&p);
            let spec = p.spec.clone().unwrap_or_default();
            let meta = p.metadata.clone();
            let phase = p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into());
            Ok(Workload {
                kind: Kind::Pod,
                name: name.to_string(),
                namespace: ns.to_string(),
                pod_labels: meta.labels.clone().unwrap_or_default(),
                spec,
                meta,
                no_pod: if running {
                    String::new()
                } else {
                    format!("pod/{name} is {phase}, not running")
                },
                pod: running.then_some(p),
            })
        }
        None if kind.is_some() => Err(not_found("Pod", name, ns)),
        None => Err(DeployError::new(
            format!("no Deployment or Pod named {name} in namespace {ns}"),
            format!(
                "name the kind for others (statefulset/{name}, daemonset/{name}); list them with \
                 `kubectl get deploy,sts,ds,pods -n {ns}`; another namespace: -n"
            ),
        )),
    }
}

fn from_template(
    kind: Kind,
    name: &str,
    namespace: &str,
    template: k8s_openapi::api::core::v1::PodTemplateSpec,
    pod: Option<Pod>,
    no_pod: String,
) -> Workload {
    let tmeta = template.metadata.unwrap_or_default();
    let pod_labels = tmeta.labels.clone().unwrap_or_default();
    let (spec, meta) = match &pod {
        Some(p) => (p.spec.clone().unwrap_or_default(), p.metadata.clone()),
        None => {
            let mut spec = template.spec.unwrap_or_default();
            podenv::default_like_a_pod(&mut spec);
            let mut meta = tmeta;
            meta.namespace = Some(namespace.to_string());
            (spec, meta)
        }
    };
    Workload {
        kind,
        name: name.to_string(),
        namespace: namespace.to_string(),
        pod_labels,
        spec,
        meta,
        pod,
        no_pod,
    }
}

/// What to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Do not read Secrets (`--skip-secrets`).
    pub skip_secrets: bool,
}

/// Everything the environment of one container is made from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub configmaps: BTreeMap<String, Source>,
    pub secrets: BTreeMap<String, Source>,
    pub services: Vec<Service>,
    pub master: Option<Service>,
    pub allocatable: Option<BTreeMap<String, Quantity>>,
    /// Why the node's allocatable is unknown, when it is.
    pub node_note: String,
}

fn configmap_source(cm: ConfigMap) -> Source {
    Source::Found {
        data: cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        binary: cm
            .binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
    }
}

fn secret_source(s: Secret) -> Source {
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    // The API server folds stringData into data on write; a stand-in
    // that did not would still be read right.
    for (k, v) in s.string_data.unwrap_or_default() {
        data.entry(k).or_insert_with(|| v.into_bytes());
    }
    Source::Found {
        data,
        binary: BTreeMap::new(),
    }
}

/// Reads what `container`'s environment and volumes refer to.
pub async fn read_sources(
    cluster: &Cluster,
    w: &Workload,
    container: &Container,
    opts: ReadOptions,
) -> Result<Sources, DeployError> {
    let ns = w.namespace.as_str();
    let (cms, secrets) = podenv::referenced(&w.spec, container);
    let mut out = Sources::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), ns);
    for name in cms {
        if !names::is_dns1123_subdomain(&name) {
            out.configmaps.insert(name, Source::Missing);
            continue;
        }
        let src = match cm_api.get_opt(&name).await {
            Ok(Some(cm)) => configmap_source(cm),
            Ok(None) => Source::Missing,
            Err(e) => {
                let err = cluster.err(e, &format!("get ConfigMap {ns}/{name}"));
                if err.is_forbidden() {
                    Source::Forbidden
                } else {
                    return Err(err);
                }
            }
        };
        out.configmaps.insert(name, src);
    }
    let sec_api: Api<Secret> = Api::namespaced(cluster.client.clone(), ns);
    for name in secrets {
        if opts.skip_secrets {
            out.secrets.insert(name, Source::Skipped);
            continue;
        }
        if !names::is_dns1123_subdomain(&name) {
            out.secrets.insert(name, Source::Missing);
            continue;
        }
        let src = match sec_api.get_opt(&name).await {
            Ok(Some(s)) => secret_source(s),
            Ok(None) => Source::Missing,
            Err(e) => {
                let err = cluster.err(e, &format!("get Secret {ns}/{name}"));
                if err.is_forbidden() {
                    Source::Forbidden
                } else {
                    return Err(err);
                }
            }
        };
        out.secrets.insert(name, src);
    }
    let svc_api: Api<Service> = Api::namespaced(cluster.client.clone(), ns);
    if w.spec.enable_service_links != Some(false) {
        out.services = svc_api
            .list(&ListParams::default())
            .await
            .map_err(|e| {
                cluster.err(
                    e,
                    &format!("list Services in namespace {ns} (for the service-link variables)"),
                )
            })?
            .items;
    }
    let master_api: Api<Service> = Api::namespaced(cluster.client.clone(), "default");
    out.master = match master_api.get_opt("kubernetes").await {
        Ok(s) => s,
        Err(e) => {
            let err = cluster.err(e, "get Service default/kubernetes");
            if !err.is_forbidden() {
                return Err(err);
            }
            tracing::debug!("{err}");
            None
        }
    };
    if podenv::needs_node(&w.spec, container) {
        match w.spec.node_name.as_deref().filter(|_| w.pod.is_some()) {
            None => out.node_note = "no running pod, so no node".into(),
            Some(node) if !names::is_dns1123_subdomain(node) => {
                out.node_note = format!("the pod's node {node:?} is not a Kubernetes name");
            }
            Some(node) => {
                let api: Api<Node> = Api::all(cluster.client.clone());
                match api.get_opt(node).await {
                    Ok(Some(n)) => out.allocatable = n.status.and_then(|s| s.allocatable),
                    Ok(None) => out.node_note = format!("node {node} not found"),
                    Err(e) => {
                        let err = cluster.err(e, &format!("get Node {node}"));
                        if !err.is_forbidden() {
                            return Err(err);
                        }
                        out.node_note = format!("reading node {node} was refused (`get nodes`)");
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The Services of the workload's namespace that select its pods.
pub async fn services_of(cluster: &Cluster, w: &Workload) -> Result<Vec<Service>, DeployError> {
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), &w.namespace);
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|e| cluster.err(e, &format!("list Services in namespace {}", w.namespace)))?
        .items;
    Ok(all
        .into_iter()
        .filter(|s| {
            let sel = s.spec.as_ref().and_then(|sp| sp.selector.as_ref());
            sel.is_some_and(|sel| {
                !sel.is_empty() && sel.iter().all(|(k, v)| w.pod_labels.get(k) == Some(v))
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_parse_like_kubectl() {
        let p = |s: &str| s.parse::<WorkloadRef>();
        assert_eq!(
            p("deploy/api").expect("ok"),
            WorkloadRef {
                kind: Some(Kind::Deployment),
                name: "api".into()
            }
        );
        assert_eq!(p("sts/db").expect("ok").kind, Some(Kind::StatefulSet));
        assert_eq!(
            p("daemonsets.apps/x").expect("ok").kind,
            Some(Kind::DaemonSet)
        );
        assert_eq!(p("pod/api-1").expect("ok").kind, Some(Kind::Pod));
        assert_eq!(p("api").expect("ok").kind, None);
        assert!(p("job/x").expect_err("kind").contains("unknown kind"));
        assert!(p("deploy/../x").is_err());
        assert!(p("deploy/").is_err());
        assert!(p("Api").is_err());
    }

    #[test]
    fn selectors_as_query_strings() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "api"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]
        }))
        .expect("selector");
        assert_eq!(
            selector_string(&sel).expect("ok"),
            "app=api,tier in (a,b),!canary"
        );
    }
}
