//! The control-plane controllers of the miniature cluster: scheduler,
//! Deployment → ReplicaSet, ReplicaSet → Pod, service accounts and
//! namespaces; and the pure endpoint computations the endpoint controllers
//! (`crate::endpoints`) share.
//!
//! Each is a loop over the store's watch plus a full resync every few
//! seconds. Every pass reconciles the whole (small) cluster and writes only
//! what differs, so a pass over an unchanged cluster writes nothing.
//!
//! Must never: touch the network or processes (the kubelet, kube-proxy and DNS
//! controllers do that), or rewrite an object whose content did not change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ApiError, ResourceType, Store, WatchEvent};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::ctx::{ClusterCtx, NODE_NAME};

/// Safety-net resync period of every controller.
const RESYNC: Duration = Duration::from_secs(5);
/// After an event, wait this long for more before reconciling (batching).
const DEBOUNCE: Duration = Duration::from_millis(15);

/// Kubernetes' generateName / pod-template-hash alphabet.
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub(crate) fn rt_pods() -> &'static ResourceType {
    must("core/v1/pods")
}
fn rt_deployments() -> &'static ResourceType {
    must("apps/v1/deployments")
}
fn rt_replicasets() -> &'static ResourceType {
    must("apps/v1/replicasets")
}
fn rt_namespaces() -> &'static ResourceType {
    must("core/v1/namespaces")
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

pub(crate) fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn meta_ns(v: &Value) -> &str {
    s(v, "/metadata/namespace")
}
pub(crate) fn meta_name(v: &Value) -> &str {
    s(v, "/metadata/name")
}
pub(crate) fn meta_uid(v: &Value) -> &str {
    s(v, "/metadata/uid")
}

/// Runs `reconcile` once at start, after every batch of events `interested`
/// accepts, and every [`RESYNC`]. Errors of one pass are logged; the loop
/// only ends if the store's watch breaks.
async fn control_loop<I, R>(
    store: Arc<Store>,
    name: &'static str,
    interested: I,
    mut reconcile: R,
) -> Result<()>
where
    I: Fn(&WatchEvent) -> bool,
    R: FnMut(&Store) -> Result<()>,
{
    let (_, mut rx) = store
        .watch(None)
        .map_err(|e| anyhow::anyhow!("{name}: watch: {e}"))?;
    let mut pass = |store: &Store| {
        if let Err(e) = reconcile(store) {
            tracing::warn!(controller = name, "reconcile: {e:#}");
        }
    };
    pass(&store);
    loop {
        let woke = tokio::time::timeout(RESYNC, rx.recv()).await;
        match woke {
            Err(_) => {}
            Ok(Ok(ev)) => {
                if !interested(&ev) {
                    continue;
                }
                // Batch whatever follows closely.
                let deadline = tokio::time::Instant::now() + DEBOUNCE;
                loop {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => continue,
                        Ok(Err(RecvError::Closed)) => {
                            anyhow::bail!("{name}: the store's watch closed")
                        }
                        Err(_) => break,
                    }
                }
            }
            Ok(Err(RecvError::Lagged(n))) => {
                tracing::debug!(controller = name, "lagged {n} events")
            }
            Ok(Err(RecvError::Closed)) => anyhow::bail!("{name}: the store's watch closed"),
        }
        pass(&store);
    }
}

fn is(ev: &WatchEvent, keys: &[&str]) -> bool {
    let k = ev.resource.key();
    keys.iter().any(|want| *want == k)
}

/// Creates through admission (defaulting), treating AlreadyExists as done.
fn create(store: &Store, rt: &'static ResourceType, ns: &str, obj: Value) -> Result<Option<Value>> {
    match minicluster_apiserver::admission::create(store, rt, ns, obj) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code == 409 => Ok(None),
        Err(e) => Err(anyhow::anyhow!("create {} in {ns:?}: {e}", rt.plural)),
    }
}

fn ignore_not_found(r: Result<Value, ApiError>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- selectors

/// Whether `labels` match a Service-style selector (a plain map).
pub fn matches_map(selector: &Value, labels: &Value) -> bool {
    match selector.as_object() {
        Some(sel) => sel.iter().all(|(k, v)| labels.get(k) == Some(v)),
        None => true,
    }
}

/// Whether `labels` match a `LabelSelector` (matchLabels + matchExpressions).
/// An empty selector matches everything.
pub fn matches_label_selector(selector: &Value, labels: &Value) -> bool {
    if !matches_map(&selector["matchLabels"], labels) {
        return false;
    }
    let Some(exprs) = selector["matchExpressions"].as_array() else {
        return true;
    };
    exprs.iter().all(|e| {
        let key = s(e, "/key");
        let val = labels.get(key).and_then(Value::as_str);
        let values: Vec<&str> = e["values"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match s(e, "/operator") {
            "In" => val.is_some_and(|v| values.contains(&v)),
            "NotIn" => val.is_none_or(|v| !values.contains(&v)),
            "Exists" => val.is_some(),
            "DoesNotExist" => val.is_none(),
            _ => false,
        }
    })
}

fn controller_owner_uid(obj: &Value) -> Option<&str> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"].as_bool() == Some(true))
        .and_then(|r| r["uid"].as_str())
}

pub(crate) fn owner_ref(owner: &Value, api_version: &str, kind: &str) -> Value {
    json!([{
        "apiVersion": api_version,
        "kind": kind,
        "name": meta_name(owner),
        "uid": meta_uid(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    }])
}

// ---------------------------------------------------------------- pods

fn pod_phase(pod: &Value) -> &str {
    s(pod, "/status/phase")
}

/// A pod that counts towards its ReplicaSet: not finished, not terminating.
pub fn pod_active(pod: &Value) -> bool {
    !matches!(pod_phase(pod), "Failed" | "Succeeded")
        && pod["metadata"].get("deletionTimestamp").is_none()
}

pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

// ---------------------------------------------------------------- scheduler

/// Binds every pod without `spec.nodeName` to the one node.
pub async fn scheduler(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "scheduler",
        |ev| is(ev, &["core/v1/pods"]),
        |store| {
            let (pods, _) = store.list(rt_pods(), None);
            for pod in pods.iter().filter(|p| s(p, "/spec/nodeName").is_empty()) {
                let r = store.update_with(rt_pods(), meta_ns(pod), meta_name(pod), |p| {
                    if !s(p, "/spec/nodeName").is_empty() {
                        return Ok(());
                    }
                    p["spec"]["nodeName"] = json!(NODE_NAME);
                    if !p["status"].is_object() {
                        p["status"] = json!({});
                    }
                    if p["status"]["phase"].as_str().is_none() {
                        p["status"]["phase"] = json!("Pending");
                    }
                    let mut conds = p["status"]["conditions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if !conds.iter().any(|c| c["type"] == "PodScheduled") {
                        conds.push(json!({
                            "type": "PodScheduled",
                            "status": "True",
                            "lastProbeTime": null,
                            "lastTransitionTime": now(),
                        }));
                    }
                    p["status"]["conditions"] = json!(conds);
                    Ok(())
                });
                ignore_not_found(r)?;
                tracing::debug!("scheduled {}/{}", meta_ns(pod), meta_name(pod));
            }
            Ok(())
        },
    )
    .await
}

// ---------------------------------------------------------------- hashing

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            out.push('{');
            for (i, (k, v)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The `pod-template-hash` of a pod template: FNV-1a over its canonical JSON
/// (sorted keys), 10 characters of Kubernetes' safe alphabet.
pub fn pod_template_hash(template: &Value) -> String {
    let mut text = String::new();
    canonical(template, &mut text);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

// ---------------------------------------------------------------- deployments

fn replicas_of(obj: &Value) -> i64 {
    obj["spec"]["replicas"].as_i64().unwrap_or(1)
}

fn status_i64(obj: &Value, field: &str) -> i64 {
    obj["status"][field].as_i64().unwrap_or(0)
}

/// Builds a condition, keeping the old timestamps when nothing changed (no
/// write storms).
fn condition(old: &Value, ctype: &str, status: &str, reason: &str, message: &str) -> Value {
    let prev = old
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == ctype))
        .cloned();
    match prev {
        Some(p) if p["status"] == status && p["reason"] == reason && p["message"] == message => p,
        Some(p) if p["status"] == status => {
            let mut p = p;
            p["reason"] = json!(reason);
            p["message"] = json!(message);
            p["lastUpdateTime"] = json!(now());
            p
        }
        _ => json!({
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastUpdateTime": now(),
            "lastTransitionTime": now(),
        }),
    }
}

/// Deployments → ReplicaSets: one RS per pod-template hash; the current one
/// scaled to `spec.replicas`, older ones to 0.
pub async fn deployments(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "deployments",
        |ev| is(ev, &["apps/v1/deployments", "apps/v1/replicasets"]),
        |store| {
            let (deploys, _) = store.list(rt_deployments(), None);
            let (all_rs, _) = store.list(rt_replicasets(), None);
            for d in &deploys {
                if let Err(e) = reconcile_deployment(store, d, &all_rs) {
                    tracing::warn!("deployment {}/{}: {e:#}", meta_ns(d), meta_name(d));
                }
            }
            Ok(())
        },
    )
    .await
}

fn reconcile_deployment(store: &Store, d: &Value, all_rs: &[Value]) -> Result<()> {
    let ns = meta_ns(d);
    let name = meta_name(d);
    let uid = meta_uid(d);
    let template = d["spec"]["template"].clone();
    let hash = pod_template_hash(&template);
    let rs_name = format!("{name}-{hash}");
    let want = replicas_of(d);
    let owned: Vec<&Value> = all_rs
        .iter()
        .filter(|rs| meta_ns(rs) == ns && controller_owner_uid(rs) == Some(uid))
        .collect();
    let revision_of = |rs: &Value| -> i64 {
        s(
            rs,
            "/metadata/annotations/deployment.kubernetes.io~1revision",
        )
        .parse()
        .unwrap_or(0)
    };
    let max_revision = owned.iter().map(|rs| revision_of(rs)).max().unwrap_or(0);

    let mut current = owned
        .iter()
        .find(|rs| meta_name(rs) == rs_name)
        .map(|v| (*v).clone());
    if current.is_none() {
        let mut tpl = template.clone();
        if !tpl["metadata"].is_object() {
            tpl["metadata"] = json!({});
        }
        if !tpl["metadata"]["labels"].is_object() {
            tpl["metadata"]["labels"] = json!({});
        }
        tpl["metadata"]["labels"]["pod-template-hash"] = json!(hash);
        let mut selector = d["spec"]["selector"].clone();
        if !selector.is_object() {
            selector = json!({});
        }
        if !selector["matchLabels"].is_object() {
            selector["matchLabels"] = json!({});
        }
        selector["matchLabels"]["pod-template-hash"] = json!(hash);
        let mut labels = tpl["metadata"]["labels"].clone();
        labels["pod-template-hash"] = json!(hash);
        let rs = json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": rs_name,
                "namespace": ns,
                "labels": labels,
                "annotations": {
                    "deployment.kubernetes.io/desired-replicas": want.to_string(),
                    "deployment.kubernetes.io/max-replicas": want.to_string(),
                    "deployment.kubernetes.io/revision": (max_revision + 1).to_string(),
                },
                "ownerReferences": owner_ref(d, "apps/v1", "Deployment"),
            },
            "spec": {
                "replicas": want,
                "minReadySeconds": d["spec"]["minReadySeconds"].as_i64().unwrap_or(0),
                "selector": selector,
                "template": tpl,
            },
        });
        current = create(store, rt_replicasets(), ns, rs)?;
        tracing::info!("deployment {ns}/{name}: created replicaset {rs_name}");
    } else if let Some(cur) = &current
        && (replicas_of(cur) != want || revision_of(cur) < max_revision)
    {
        let next_rev = if revision_of(cur) < max_revision {
            max_revision + 1
        } else {
            revision_of(cur)
        };
        let updated = store.update_with(rt_replicasets(), ns, &rs_name, |rs| {
            rs["spec"]["replicas"] = json!(want);
            if !rs["metadata"]["annotations"].is_object() {
                rs["metadata"]["annotations"] = json!({});
            }
            let a = &mut rs["metadata"]["annotations"];
            a["deployment.kubernetes.io/revision"] = json!(next_rev.to_string());
            a["deployment.kubernetes.io/desired-replicas"] = json!(want.to_string());
            a["deployment.kubernetes.io/max-replicas"] = json!(want.to_string());
            Ok(())
        })?;
        current = Some(updated);
    }
    // Older ReplicaSets: scale to 0 (Recreate-like).
    for old in owned.iter().filter(|rs| meta_name(rs) != rs_name) {
        if replicas_of(old) != 0 {
            ignore_not_found(
                store.update_with(rt_replicasets(), ns, meta_name(old), |rs| {
                    rs["spec"]["replicas"] = json!(0);
                    Ok(())
                }),
            )?;
        }
    }

    // Status from the owned ReplicaSets.
    let (rs_now, _) = store.list(rt_replicasets(), Some(ns));
    let owned_now: Vec<&Value> = rs_now
        .iter()
        .filter(|rs| controller_owner_uid(rs) == Some(uid))
        .collect();
    let sum = |f: &str| owned_now.iter().map(|rs| status_i64(rs, f)).sum::<i64>();
    let replicas = sum("replicas");
    let ready = sum("readyReplicas");
    let available = sum("availableReplicas");
    let updated = current
        .as_ref()
        .map(|c| status_i64(c, "replicas"))
        .unwrap_or(0);
    let updated_available = current
        .as_ref()
        .map(|c| status_i64(c, "availableReplicas"))
        .unwrap_or(0);
    let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
    let max_unavailable = want / 4;
    let old_conds = &d["status"]["conditions"];
    let available_cond = if available >= want - max_unavailable {
        condition(
            old_conds,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        )
    } else {
        condition(
            old_conds,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        )
    };
    let progressing_cond = if updated == want && updated_available >= want && replicas == want {
        condition(
            old_conds,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        )
    } else {
        condition(
            old_conds,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{rs_name}\" is progressing."),
        )
    };
    let mut status = json!({
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "conditions": [available_cond, progressing_cond],
    });
    if want - available > 0 {
        status["unavailableReplicas"] = json!(want - available);
    }
    strip_zero(
        &mut status,
        &[
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
        ],
    );
    if d["status"] != status {
        ignore_not_found(store.update_with(rt_deployments(), ns, name, |d| {
            d["status"] = status;
            Ok(())
        }))?;
    }
    Ok(())
}

/// Kubernetes omits zero counts from status (`omitempty`).
fn strip_zero(status: &mut Value, fields: &[&str]) {
    if let Some(m) = status.as_object_mut() {
        for f in fields {
            if m.get(*f).and_then(Value::as_i64) == Some(0) {
                m.remove(*f);
            }
        }
    }
}

// ---------------------------------------------------------------- replicasets

/// What a ReplicaSet must do to reach its desired count.
#[derive(Debug, PartialEq, Eq)]
pub struct RsDiff {
    /// Pods to create.
    pub create: usize,
    /// Names of pods to delete (finished pods, then extras: not ready before
    /// ready, newest first).
    pub delete: Vec<String>,
}

/// Compares the pods a ReplicaSet controls with its desired count.
pub fn rs_diff(desired: i64, pods: &[Value]) -> RsDiff {
    let desired = desired.max(0) as usize;
    let mut delete: Vec<String> = pods
        .iter()
        .filter(|p| matches!(pod_phase(p), "Failed" | "Succeeded"))
        .map(|p| meta_name(p).to_string())
        .collect();
    let mut active: Vec<&Value> = pods.iter().filter(|p| pod_active(p)).collect();
    if active.len() > desired {
        // Delete first: not ready, then not running, then the newest.
        let rank = |p: &Value| -> (u8, u8, String) {
            (
                u8::from(!pod_ready(p)),
                u8::from(pod_phase(p) != "Running"),
                s(p, "/metadata/creationTimestamp").to_string(),
            )
        };
        active.sort_by_key(|p| std::cmp::Reverse(rank(p)));
        let extras = active.len() - desired;
        delete.extend(
            active
                .into_iter()
                .take(extras)
                .map(|p| meta_name(p).to_string()),
        );
        return RsDiff { create: 0, delete };
    }
    RsDiff {
        create: desired - active.len(),
        delete,
    }
}

/// ReplicaSets → Pods: keeps the count, replaces deleted or failed pods at
/// once, and keeps the status.
pub async fn replicasets(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "replicasets",
        |ev| is(ev, &["apps/v1/replicasets", "core/v1/pods"]),
        |store| {
            let (all_rs, _) = store.list(rt_replicasets(), None);
            let (pods, _) = store.list(rt_pods(), None);
            for rs in &all_rs {
                if let Err(e) = reconcile_replicaset(store, rs, &pods) {
                    tracing::warn!("replicaset {}/{}: {e:#}", meta_ns(rs), meta_name(rs));
                }
            }
            Ok(())
        },
    )
    .await
}

fn reconcile_replicaset(store: &Store, rs: &Value, all_pods: &[Value]) -> Result<()> {
    let ns = meta_ns(rs);
    let name = meta_name(rs);
    let uid = meta_uid(rs);
    let owned: Vec<Value> = all_pods
        .iter()
        .filter(|p| meta_ns(p) == ns && controller_owner_uid(p) == Some(uid))
        .cloned()
        .collect();
    let diff = rs_diff(replicas_of(rs), &owned);
    let tpl = &rs["spec"]["template"];
    for _ in 0..diff.create {
        let mut meta = json!({
            "generateName": format!("{name}-"),
            "namespace": ns,
            "labels": tpl["metadata"]["labels"].clone(),
            "ownerReferences": owner_ref(rs, "apps/v1", "ReplicaSet"),
        });
        if tpl["metadata"]["annotations"].is_object() {
            meta["annotations"] = tpl["metadata"]["annotations"].clone();
        }
        if !meta["labels"].is_object() {
            meta["labels"] = json!({});
        }
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": tpl["spec"].clone(),
        });
        if let Some(p) = create(store, rt_pods(), ns, pod)? {
            tracing::info!("replicaset {ns}/{name}: created pod {}", meta_name(&p));
        }
    }
    for victim in &diff.delete {
        tracing::info!("replicaset {ns}/{name}: deleting pod {victim}");
        ignore_not_found(store.delete(rt_pods(), ns, victim))?;
    }

    // Status, from what the pods look like now.
    let (pods_now, _) = store.list(rt_pods(), Some(ns));
    let active: Vec<&Value> = pods_now
        .iter()
        .filter(|p| controller_owner_uid(p) == Some(uid) && pod_active(p))
        .collect();
    let tpl_labels = &tpl["metadata"]["labels"];
    let ready = active.iter().filter(|p| pod_ready(p)).count();
    let fully = active
        .iter()
        .filter(|p| matches_map(tpl_labels, &p["metadata"]["labels"]))
        .count();
    let mut status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs["metadata"]["generation"].as_i64().unwrap_or(1),
    });
    strip_zero(
        &mut status,
        &["fullyLabeledReplicas", "readyReplicas", "availableReplicas"],
    );
    if rs["status"] != status {
        ignore_not_found(store.update_with(rt_replicasets(), ns, name, |rs| {
            rs["status"] = status;
            Ok(())
        }))?;
    }
    Ok(())
}

// ------------------------------------------------- statefulsets, daemonsets

fn rt_statefulsets() -> &'static ResourceType {
    must("apps/v1/statefulsets")
}
fn rt_daemonsets() -> &'static ResourceType {
    must("apps/v1/daemonsets")
}

/// A pod of a workload's template: the template's labels (plus `labels`)
/// and annotations, owned by `owner`.
fn pod_from_template(owner: &Value, kind: &str, meta: Value, labels: Value, spec: Value) -> Value {
    let tpl = &owner["spec"]["template"];
    let mut meta = meta;
    meta["namespace"] = json!(meta_ns(owner));
    meta["ownerReferences"] = owner_ref(owner, "apps/v1", kind);
    let mut all = tpl["metadata"]["labels"].clone();
    if !all.is_object() {
        all = json!({});
    }
    for (k, v) in labels.as_object().into_iter().flatten() {
        all[k] = v.clone();
    }
    meta["labels"] = all;
    if tpl["metadata"]["annotations"].is_object() {
        meta["annotations"] = tpl["metadata"]["annotations"].clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
}

fn write_status(
    store: &Store,
    rt: &'static ResourceType,
    obj: &Value,
    status: Value,
) -> Result<()> {
    if obj["status"] != status {
        ignore_not_found(store.update_with(rt, meta_ns(obj), meta_name(obj), |o| {
            o["status"] = status;
            Ok(())
        }))?;
    }
    Ok(())
}

/// StatefulSets → Pods `<name>-0..N-1`, as the StatefulSet controller
/// makes them: hostname = pod name, subdomain = `serviceName`, labels
/// `statefulset.kubernetes.io/pod-name`, `apps.kubernetes.io/pod-index`
/// and `controller-revision-hash`; `OrderedReady` (the default) creates
/// pod i only once pods 0..i are running and ready, `Parallel` at once;
/// scaling down deletes from the highest ordinal. Rolling updates are not
/// done (a changed template applies to pods created later).
pub async fn statefulsets(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "statefulsets",
        |ev| is(ev, &["apps/v1/statefulsets", "core/v1/pods"]),
        |store| {
            let (all, _) = store.list(rt_statefulsets(), None);
            let (pods, _) = store.list(rt_pods(), None);
            for sts in &all {
                if let Err(e) = reconcile_statefulset(store, sts, &pods) {
                    tracing::warn!("statefulset {}/{}: {e:#}", meta_ns(sts), meta_name(sts));
                }
            }
            Ok(())
        },
    )
    .await
}

fn reconcile_statefulset(store: &Store, sts: &Value, all_pods: &[Value]) -> Result<()> {
    let ns = meta_ns(sts);
    let name = meta_name(sts);
    let uid = meta_uid(sts);
    let replicas = replicas_of(sts).max(0);
    let parallel = sts["spec"]["podManagementPolicy"] == "Parallel";
    let revision = format!("{name}-{}", pod_template_hash(&sts["spec"]["template"]));
    let owned: BTreeMap<String, &Value> = all_pods
        .iter()
        .filter(|p| meta_ns(p) == ns && controller_owner_uid(p) == Some(uid))
        .map(|p| (meta_name(p).to_string(), p))
        .collect();
    for i in 0..replicas {
        let pod_name = format!("{name}-{i}");
        match owned.get(&pod_name) {
            Some(p) if pod_active(p) => {
                let up = pod_phase(p) == "Running" && pod_ready(p);
                if !up && !parallel {
                    break;
                }
                continue;
            }
            Some(p) => {
                // Failed or succeeded: replaced, as the controller does.
                if p["metadata"]["deletionTimestamp"].is_null() {
                    ignore_not_found(store.delete(rt_pods(), ns, &pod_name))?;
                }
                break;
            }
            None => {}
        }
        if all_pods
            .iter()
            .any(|p| meta_ns(p) == ns && meta_name(p) == pod_name)
        {
            break; // a pod of that name not ours (or still going)
        }
        let mut spec = sts["spec"]["template"]["spec"].clone();
        spec["hostname"] = json!(pod_name);
        if let Some(svc) = sts["spec"]["serviceName"]
            .as_str()
            .filter(|s| !s.is_empty())
        {
            spec["subdomain"] = json!(svc);
        }
        let pod = pod_from_template(
            sts,
            "StatefulSet",
            json!({"name": pod_name}),
            json!({
                "statefulset.kubernetes.io/pod-name": pod_name,
                "apps.kubernetes.io/pod-index": i.to_string(),
                "controller-revision-hash": revision,
            }),
            spec,
        );
        if let Some(p) = create(store, rt_pods(), ns, pod)? {
            tracing::info!("statefulset {ns}/{name}: created pod {}", meta_name(&p));
        }
        if !parallel {
            break;
        }
    }
    // Scale down: the highest ordinal first, one at a time unless Parallel.
    let mut extra: Vec<(i64, &str)> = owned
        .keys()
        .filter_map(|n| {
            let i: i64 = n.strip_prefix(&format!("{name}-"))?.parse().ok()?;
            (i >= replicas).then_some((i, n.as_str()))
        })
        .collect();
    extra.sort_by(|a, b| b.cmp(a));
    for (_, victim) in extra.iter().take(if parallel { usize::MAX } else { 1 }) {
        if owned[*victim]["metadata"]["deletionTimestamp"].is_null() {
            tracing::info!("statefulset {ns}/{name}: deleting pod {victim}");
            ignore_not_found(store.delete(rt_pods(), ns, victim))?;
        }
    }
    let (pods_now, _) = store.list(rt_pods(), Some(ns));
    let active: Vec<&Value> = pods_now
        .iter()
        .filter(|p| controller_owner_uid(p) == Some(uid) && pod_active(p))
        .collect();
    let ready = active.iter().filter(|p| pod_ready(p)).count();
    let mut status = json!({
        "observedGeneration": sts["metadata"]["generation"].as_i64().unwrap_or(1),
        "replicas": active.len(),
        "readyReplicas": ready,
        "currentReplicas": active.len(),
        "updatedReplicas": active.len(),
        "availableReplicas": ready,
        "currentRevision": revision,
        "updateRevision": revision,
        "collisionCount": 0,
    });
    strip_zero(
        &mut status,
        &["readyReplicas", "currentReplicas", "updatedReplicas"],
    );
    write_status(store, rt_statefulsets(), sts, status)
}

/// DaemonSets → one pod on the node, as the DaemonSet controller makes it:
/// `<name>-xxxxx`, bound to the node by a required node affinity on
/// `metadata.name`, with the controller's tolerations and labels
/// `controller-revision-hash` and `pod-template-generation`; a failed pod
/// is replaced.
pub async fn daemonsets(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "daemonsets",
        |ev| is(ev, &["apps/v1/daemonsets", "core/v1/pods"]),
        |store| {
            let (all, _) = store.list(rt_daemonsets(), None);
            let (pods, _) = store.list(rt_pods(), None);
            for ds in &all {
                if let Err(e) = reconcile_daemonset(store, ds, &pods) {
                    tracing::warn!("daemonset {}/{}: {e:#}", meta_ns(ds), meta_name(ds));
                }
            }
            Ok(())
        },
    )
    .await
}

fn reconcile_daemonset(store: &Store, ds: &Value, all_pods: &[Value]) -> Result<()> {
    let ns = meta_ns(ds);
    let name = meta_name(ds);
    let uid = meta_uid(ds);
    let generation = ds["metadata"]["generation"].as_i64().unwrap_or(1);
    let revision = pod_template_hash(&ds["spec"]["template"]);
    let owned: Vec<&Value> = all_pods
        .iter()
        .filter(|p| meta_ns(p) == ns && controller_owner_uid(p) == Some(uid))
        .collect();
    for p in owned.iter().filter(|p| !pod_active(p)) {
        if p["metadata"]["deletionTimestamp"].is_null() {
            ignore_not_found(store.delete(rt_pods(), ns, meta_name(p)))?;
        }
    }
    if !owned.iter().any(|p| pod_active(p)) {
        let mut spec = ds["spec"]["template"]["spec"].clone();
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
            "nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [NODE_NAME]}]}]
        });
        let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
        for (key, effect) in [
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/disk-pressure", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
            ("node.kubernetes.io/pid-pressure", "NoSchedule"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ] {
            if !tolerations.iter().any(|t| t["key"] == key) {
                tolerations.push(json!({"key": key, "operator": "Exists", "effect": effect}));
            }
        }
        spec["tolerations"] = json!(tolerations);
        let pod = pod_from_template(
            ds,
            "DaemonSet",
            json!({"generateName": format!("{name}-")}),
            json!({
                "controller-revision-hash": revision,
                "pod-template-generation": generation.to_string(),
            }),
            spec,
        );
        if let Some(p) = create(store, rt_pods(), ns, pod)? {
            tracing::info!("daemonset {ns}/{name}: created pod {}", meta_name(&p));
        }
    }
    let (pods_now, _) = store.list(rt_pods(), Some(ns));
    let active: Vec<&Value> = pods_now
        .iter()
        .filter(|p| controller_owner_uid(p) == Some(uid) && pod_active(p))
        .collect();
    let ready = active.iter().filter(|p| pod_ready(p)).count();
    let mut status = json!({
        "currentNumberScheduled": active.len().min(1),
        "desiredNumberScheduled": 1,
        "numberMisscheduled": 0,
        "numberReady": ready.min(1),
        "numberAvailable": ready.min(1),
        "updatedNumberScheduled": active.len().min(1),
        "observedGeneration": generation,
    });
    if ready == 0 {
        status["numberUnavailable"] = json!(1);
    }
    strip_zero(&mut status, &["numberAvailable", "updatedNumberScheduled"]);
    write_status(store, rt_daemonsets(), ds, status)
}

// ---------------------------------------------------------------- endpoints

/// One endpoint port: name (may be empty), port, protocol, appProtocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpPort {
    pub name: String,
    pub port: i64,
    pub protocol: String,
    pub app_protocol: Option<String>,
}

/// One pod's address behind a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpAddress {
    pub ip: String,
    pub ready: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub hostname: Option<String>,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
}

/// A set of addresses sharing the same ports (a subset / a slice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpGroup {
    pub ports: Vec<EpPort>,
    pub addresses: Vec<EpAddress>,
}

/// Resolves a Service port's targetPort for one pod: a number as is (default
/// `port`), a name through the pod's container ports.
pub fn resolve_target_port(svc_port: &Value, pod: &Value) -> Option<i64> {
    let tp = &svc_port["targetPort"];
    if let Some(n) = tp.as_i64() {
        return Some(n);
    }
    match tp.as_str() {
        None => svc_port["port"].as_i64(),
        Some(name) => {
            if let Ok(n) = name.parse::<i64>() {
                return Some(n);
            }
            let proto = svc_port["protocol"].as_str().unwrap_or("TCP");
            pod["spec"]["containers"].as_array()?.iter().find_map(|c| {
                c["ports"].as_array()?.iter().find_map(|p| {
                    (p["name"].as_str() == Some(name)
                        && p["protocol"].as_str().unwrap_or("TCP") == proto)
                        .then(|| p["containerPort"].as_i64())
                        .flatten()
                })
            })
        }
    }
}

/// What a Service with a selector resolves to, given every pod of its
/// namespace: addresses grouped by their resolved ports, sorted. `None` for a
/// Service without selector (its endpoints are managed by hand).
pub fn compute_endpoints(svc: &Value, pods: &[Value]) -> Option<Vec<EpGroup>> {
    let selector = svc["spec"]["selector"].as_object()?;
    if selector.is_empty() {
        return None;
    }
    let selector = &svc["spec"]["selector"];
    let svc_name = meta_name(svc);
    let ns = meta_ns(svc);
    let publish_not_ready = svc["spec"]["publishNotReadyAddresses"].as_bool() == Some(true);
    let svc_ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let mut groups: Vec<EpGroup> = Vec::new();
    for pod in pods {
        if meta_ns(pod) != ns || !matches_map(selector, &pod["metadata"]["labels"]) {
            continue;
        }
        if matches!(pod_phase(pod), "Failed" | "Succeeded") {
            continue;
        }
        let ip = s(pod, "/status/podIP");
        if ip.is_empty() {
            continue;
        }
        let terminating = pod["metadata"].get("deletionTimestamp").is_some();
        let ready = !terminating && (publish_not_ready || pod_ready(pod));
        let mut ports: Vec<EpPort> = svc_ports
            .iter()
            .filter_map(|sp| {
                Some(EpPort {
                    name: sp["name"].as_str().unwrap_or("").to_string(),
                    port: resolve_target_port(sp, pod)?,
                    protocol: sp["protocol"].as_str().unwrap_or("TCP").to_string(),
                    app_protocol: sp["appProtocol"].as_str().map(str::to_string),
                })
            })
            .collect();
        ports.sort();
        if !svc_ports.is_empty() && ports.is_empty() {
            continue;
        }
        let hostname = s(pod, "/spec/hostname");
        let hostname = (!hostname.is_empty() && s(pod, "/spec/subdomain") == svc_name)
            .then(|| hostname.to_string());
        let node = s(pod, "/spec/nodeName");
        let addr = EpAddress {
            ip: ip.to_string(),
            ready,
            terminating,
            node_name: (!node.is_empty()).then(|| node.to_string()),
            hostname,
            pod_name: meta_name(pod).to_string(),
            pod_namespace: ns.to_string(),
            pod_uid: meta_uid(pod).to_string(),
        };
        match groups.iter_mut().find(|g| g.ports == ports) {
            Some(g) => g.addresses.push(addr),
            None => groups.push(EpGroup {
                ports,
                addresses: vec![addr],
            }),
        }
    }
    for g in &mut groups {
        g.addresses.sort_by(|a, b| {
            let ka = a.ip.parse::<std::net::Ipv4Addr>().ok();
            let kb = b.ip.parse::<std::net::Ipv4Addr>().ok();
            ka.cmp(&kb).then(a.pod_name.cmp(&b.pod_name))
        });
    }
    groups.sort_by(|a, b| a.ports.cmp(&b.ports));
    Some(groups)
}

pub fn target_ref(a: &EpAddress) -> Value {
    json!({"kind": "Pod", "name": a.pod_name, "namespace": a.pod_namespace, "uid": a.pod_uid})
}

pub fn port_json(p: &EpPort) -> Value {
    let mut v = json!({"port": p.port, "protocol": p.protocol});
    if !p.name.is_empty() {
        v["name"] = json!(p.name);
    }
    if let Some(ap) = &p.app_protocol {
        v["appProtocol"] = json!(ap);
    }
    v
}

/// `Endpoints.subsets` for the groups (empty groups dropped).
pub fn endpoints_subsets(groups: &[EpGroup]) -> Vec<Value> {
    groups
        .iter()
        .filter(|g| !g.addresses.is_empty())
        .map(|g| {
            let addr = |a: &EpAddress| {
                let mut v = json!({"ip": a.ip, "targetRef": target_ref(a)});
                if let Some(n) = &a.node_name {
                    v["nodeName"] = json!(n);
                }
                if let Some(h) = &a.hostname {
                    v["hostname"] = json!(h);
                }
                v
            };
            let ready: Vec<Value> = g.addresses.iter().filter(|a| a.ready).map(addr).collect();
            let not_ready: Vec<Value> = g.addresses.iter().filter(|a| !a.ready).map(addr).collect();
            let mut subset = json!({});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            if !g.ports.is_empty() {
                subset["ports"] = json!(g.ports.iter().map(port_json).collect::<Vec<_>>());
            }
            subset
        })
        .collect()
}

/// `EndpointSlice.endpoints` for one group.
pub fn slice_endpoints(group: &EpGroup) -> Vec<Value> {
    group
        .addresses
        .iter()
        .map(|a| {
            let mut v = json!({
                "addresses": [a.ip],
                "conditions": {"ready": a.ready, "serving": a.ready || a.terminating, "terminating": a.terminating},
                "targetRef": target_ref(a),
            });
            if let Some(n) = &a.node_name {
                v["nodeName"] = json!(n);
            }
            if let Some(h) = &a.hostname {
                v["hostname"] = json!(h);
            }
            v
        })
        .collect()
}

// ---------------------------------------------------------------- namespaces

/// Every namespace gets ServiceAccount `default` and ConfigMap
/// `kube-root-ca.crt` (the cluster CA).
pub async fn serviceaccounts(store: Arc<Store>, ctx: ClusterCtx) -> Result<()> {
    let sa_rt = must("core/v1/serviceaccounts");
    let cm_rt = must("core/v1/configmaps");
    control_loop(
        store,
        "serviceaccounts",
        |ev| is(ev, &["core/v1/namespaces", "core/v1/serviceaccounts", "core/v1/configmaps"]),
        move |store| {
            let (nss, _) = store.list(rt_namespaces(), None);
            let (sas, _) = store.list(sa_rt, None);
            let (cms, _) = store.list(cm_rt, None);
            for n in &nss {
                let ns = meta_name(n);
                if s(n, "/status/phase") == "Terminating" {
                    continue;
                }
                if !sas.iter().any(|sa| meta_ns(sa) == ns && meta_name(sa) == "default") {
                    create(
                        store,
                        sa_rt,
                        ns,
                        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}),
                    )?;
                }
                let data = json!({"ca.crt": ctx.ca_pem});
                match cms.iter().find(|cm| meta_ns(cm) == ns && meta_name(cm) == "kube-root-ca.crt") {
                    None => {
                        create(
                            store,
                            cm_rt,
                            ns,
                            json!({
                                "apiVersion": "v1",
                                "kind": "ConfigMap",
                                "metadata": {
                                    "name": "kube-root-ca.crt",
                                    "namespace": ns,
                                    "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."},
                                },
                                "data": data,
                            }),
                        )?;
                    }
                    Some(cm) if cm["data"] != data => {
                        ignore_not_found(store.update_with(cm_rt, ns, "kube-root-ca.crt", |cm| {
                            cm["data"] = data;
                            Ok(())
                        }))?;
                    }
                    Some(_) => {}
                }
            }
            Ok(())
        },
    )
    .await
}

/// Namespaces: `status.phase: Active` and the `kubernetes.io/metadata.name`
/// label.
pub async fn namespaces(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    control_loop(
        store,
        "namespaces",
        |ev| is(ev, &["core/v1/namespaces"]),
        |store| {
            let (nss, _) = store.list(rt_namespaces(), None);
            for n in &nss {
                let name = meta_name(n);
                let label_ok = s(n, "/metadata/labels/kubernetes.io~1metadata.name") == name;
                let phase = s(n, "/status/phase");
                if phase.is_empty() || !label_ok {
                    ignore_not_found(store.update_with(rt_namespaces(), "", name, |n| {
                        if !n["metadata"]["labels"].is_object() {
                            n["metadata"]["labels"] = json!({});
                        }
                        n["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                        if s(n, "/status/phase").is_empty() {
                            if !n["status"].is_object() {
                                n["status"] = json!({});
                            }
                            n["status"]["phase"] = json!("Active");
                        }
                        Ok(())
                    }))?;
                }
            }
            Ok(())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, labels: Value, ports: Value) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": labels,
                          "creationTimestamp": format!("2024-01-01T00:00:0{}Z", name.len() % 10)},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        })
    }

    #[test]
    fn statefulset_pods_are_ordered_and_daemonset_pods_bound() {
        use minicluster_apiserver::admission;
        let store = Store::new();
        admission::create(
            &store,
            rt_namespaces(),
            "",
            json!({"metadata": {"name": "default"}}),
        )
        .expect("namespace");
        let tpl = json!({"metadata": {"labels": {"app": "db"}, "annotations": {"a": "1"}},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let sts = admission::create(&store, rt_statefulsets(), "default", json!({
            "metadata": {"name": "db"},
            "spec": {"replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": tpl}}))
        .expect("sts");
        assert_eq!(sts["spec"]["podManagementPolicy"], "OrderedReady");
        let pods = |store: &Store| store.list(rt_pods(), Some("default")).0;
        reconcile_statefulset(&store, &sts, &pods(&store)).expect("reconcile");
        let now = pods(&store);
        assert_eq!(now.len(), 1, "OrderedReady: one pod until it is ready");
        let p0 = &now[0];
        assert_eq!(meta_name(p0), "db-0");
        assert_eq!(p0["spec"]["hostname"], "db-0");
        assert_eq!(p0["spec"]["subdomain"], "db");
        assert_eq!(
            p0["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"],
            "db-0"
        );
        assert_eq!(
            p0["metadata"]["labels"]["apps.kubernetes.io/pod-index"],
            "0"
        );
        assert_eq!(p0["metadata"]["labels"]["app"], "db");
        assert_eq!(p0["metadata"]["annotations"]["a"], "1");
        assert_eq!(p0["metadata"]["ownerReferences"][0]["kind"], "StatefulSet");
        store
            .update_with(rt_pods(), "default", "db-0", |p| {
                p["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
                Ok(())
            })
            .expect("ready");
        reconcile_statefulset(&store, &sts, &pods(&store)).expect("reconcile");
        let names: Vec<String> = pods(&store)
            .iter()
            .map(|p| meta_name(p).to_string())
            .collect();
        assert_eq!(names, ["db-0", "db-1"]);

        let ds = admission::create(&store, rt_daemonsets(), "default", json!({
            "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
        .expect("ds");
        reconcile_daemonset(&store, &ds, &pods(&store)).expect("reconcile");
        reconcile_daemonset(&store, &ds, &pods(&store)).expect("reconcile again");
        let agents: Vec<Value> = pods(&store)
            .into_iter()
            .filter(|p| p["metadata"]["labels"]["app"] == "agent")
            .collect();
        assert_eq!(agents.len(), 1, "one pod per node");
        let a = &agents[0];
        assert!(meta_name(a).starts_with("agent-"));
        assert_eq!(a["metadata"]["labels"]["pod-template-generation"], "1");
        assert_eq!(
            a["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
            NODE_NAME
        );
        assert!(
            a["spec"]["tolerations"]
                .as_array()
                .is_some_and(|t| t.len() == 6)
        );
    }

    #[test]
    fn template_hash_is_stable_and_key_order_independent() {
        let a = json!({"metadata": {"labels": {"app": "web", "tier": "x"}}, "spec": {"containers": [{"name": "n", "image": "nginx"}]}});
        let b = json!({"spec": {"containers": [{"image": "nginx", "name": "n"}]}, "metadata": {"labels": {"tier": "x", "app": "web"}}});
        let h = pod_template_hash(&a);
        assert_eq!(h.len(), 10);
        assert!(h.bytes().all(|c| ALPHABET.contains(&c)));
        assert_eq!(h, pod_template_hash(&b));
        let c = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "n", "image": "nginx:2"}]}});
        assert_ne!(h, pod_template_hash(&c));
    }

    #[test]
    fn endpoints_resolve_named_target_port_per_pod() {
        let svc = json!({
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"name": "web", "port": 8080, "targetPort": "http", "protocol": "TCP"}]},
        });
        let pods = vec![
            pod(
                "echo-b",
                "10.244.0.12",
                true,
                json!({"app": "echo"}),
                json!([{"name": "http", "containerPort": 8080}]),
            ),
            pod(
                "echo-a",
                "10.244.0.3",
                false,
                json!({"app": "echo"}),
                json!([{"name": "http", "containerPort": 8080}]),
            ),
            pod(
                "echo-c",
                "10.244.0.4",
                true,
                json!({"app": "echo"}),
                json!([{"name": "http", "containerPort": 9090}]),
            ),
            pod(
                "echo-d",
                "10.244.0.5",
                true,
                json!({"app": "echo"}),
                json!([{"name": "other", "containerPort": 1}]),
            ),
            pod(
                "other",
                "10.244.0.6",
                true,
                json!({"app": "x"}),
                json!([{"name": "http", "containerPort": 8080}]),
            ),
        ];
        let groups = compute_endpoints(&svc, &pods).expect("has selector");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].ports[0].port, 8080);
        assert_eq!(groups[0].ports[0].name, "web");
        let ips: Vec<&str> = groups[0].addresses.iter().map(|a| a.ip.as_str()).collect();
        assert_eq!(ips, ["10.244.0.3", "10.244.0.12"]);
        assert!(!groups[0].addresses[0].ready);
        assert_eq!(groups[1].ports[0].port, 9090);
        let subsets = endpoints_subsets(&groups);
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.244.0.12");
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.244.0.3");
        assert_eq!(subsets[0]["addresses"][0]["targetRef"]["name"], "echo-b");
        assert_eq!(
            subsets[0]["ports"][0],
            json!({"name": "web", "port": 8080, "protocol": "TCP"})
        );
        let eps = slice_endpoints(&groups[0]);
        assert_eq!(eps[1]["conditions"]["ready"], true);
        assert_eq!(eps[0]["conditions"]["ready"], false);
    }

    #[test]
    fn endpoints_numeric_default_and_hostname() {
        let svc = json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"name": "pg", "port": 5432}]},
        });
        let mut p = pod("db-0", "10.244.0.9", true, json!({"app": "db"}), json!([]));
        p["spec"]["hostname"] = json!("db-0");
        p["spec"]["subdomain"] = json!("db");
        let groups = compute_endpoints(&svc, &[p]).expect("selector");
        assert_eq!(groups[0].ports[0].port, 5432);
        assert_eq!(groups[0].addresses[0].hostname.as_deref(), Some("db-0"));
        let none = json!({"metadata": {"name": "k", "namespace": "default"}, "spec": {"ports": [{"port": 443}]}});
        assert!(compute_endpoints(&none, &[]).is_none());
    }

    #[test]
    fn rs_diff_creates_and_deletes() {
        let mk = |name: &str, phase: &str, ready: bool, ts: &str| {
            json!({"metadata": {"name": name, "creationTimestamp": ts},
                   "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}})
        };
        let pods = vec![
            mk("a", "Running", true, "2024-01-01T00:00:01Z"),
            mk("b", "Running", true, "2024-01-01T00:00:03Z"),
            mk("c", "Pending", false, "2024-01-01T00:00:02Z"),
            mk("d", "Failed", false, "2024-01-01T00:00:00Z"),
        ];
        assert_eq!(
            rs_diff(5, &pods),
            RsDiff {
                create: 2,
                delete: vec!["d".into()]
            }
        );
        assert_eq!(
            rs_diff(3, &pods),
            RsDiff {
                create: 0,
                delete: vec!["d".into()]
            }
        );
        // Scale to 2: the not-ready pod goes first.
        assert_eq!(
            rs_diff(2, &pods),
            RsDiff {
                create: 0,
                delete: vec!["d".into(), "c".into()]
            }
        );
        // Scale to 1: then the newest ready one.
        assert_eq!(
            rs_diff(1, &pods),
            RsDiff {
                create: 0,
                delete: vec!["d".into(), "c".into(), "b".into()]
            }
        );
        assert_eq!(
            rs_diff(0, &[]),
            RsDiff {
                create: 0,
                delete: vec![]
            }
        );
    }

    #[test]
    fn label_selector_expressions() {
        let labels = json!({"app": "web", "tier": "front"});
        assert!(matches_label_selector(
            &json!({"matchLabels": {"app": "web"}}),
            &labels
        ));
        assert!(!matches_label_selector(
            &json!({"matchLabels": {"app": "db"}}),
            &labels
        ));
        assert!(matches_label_selector(
            &json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]}]}),
            &labels
        ));
        assert!(matches_label_selector(
            &json!({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}),
            &labels
        ));
        assert!(!matches_label_selector(
            &json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}),
            &labels
        ));
    }
}
