//! The three controllers that give a Service its endpoints, as in
//! kube-controller-manager (v1.33+), each with its own lagged cache and work
//! queue ([`crate::informer`]):
//!
//! - the endpoints controller: the legacy `Endpoints` object of a Service
//!   with a selector (labels: the Service's, `endpoints.kubernetes.io/
//!   managed-by: endpoint-controller`, the headless label); leaves it as it
//!   is when the selector goes, deletes it when the Service goes;
//! - the EndpointSlice controller: slices `<svc>-xxxxx` owned by the Service,
//!   `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io`;
//!   leaves them as they are when the selector goes (the garbage collector
//!   removes them with the Service), resyncs 1 s after someone else changes
//!   or deletes one;
//! - the EndpointSlice mirroring controller: for a Service without selector,
//!   mirrors its `Endpoints` into slices owned by the Endpoints, `managed-by:
//!   endpointslicemirroring-controller.k8s.io`; deletes them when the Service
//!   gets a selector or goes, when the Endpoints goes or is labelled
//!   `endpointslice.kubernetes.io/skip-mirror: "true"` (or carries a
//!   leader-election annotation); recreates one someone else deleted.
//!
//! Must never: touch an object another manager owns (a slice with another
//! managed-by, an Endpoints of a Service without selector), or write from
//! anything but its own cache.
//!
//! # As a real cluster makes them
//!
//! Read from kubernetes/kubernetes (`pkg/controller/endpoint/
//! endpoints_controller.go`, `pkg/controller/endpointslice/
//! endpointslice_controller.go` with `staging/src/k8s.io/endpointslice`,
//! `pkg/controller/endpointslicemirroring/{endpointslicemirroring_controller,
//! reconciler,utils}.go`, `pkg/proxy/endpointslicecache.go`); the stand-in
//! does the same unless said otherwise.
//!
//! | | endpoints controller | EndpointSlice controller | mirroring controller |
//! |---|---|---|---|
//! | acts for | Services with a selector | Services with a selector | Services **without** selector that have an `Endpoints` |
//! | objects | `Endpoints` named like the Service, no ownerReferences; labels = the Service's + `endpoints.kubernetes.io/managed-by: endpoint-controller` (v1.33+) + `service.kubernetes.io/headless` if no ClusterIP; **never** `skip-mirror` | `<svc>-xxxxx` (generateName), owner = the Service (controller, blockOwnerDeletion); labels = the Service's minus reserved + `kubernetes.io/service-name`, `endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io`, headless label; ports always named (`""`); one empty slice when there is no endpoint | `<endpoints>-xxxxx`, owner = the **Endpoints**; labels = the Endpoints' (so also `endpoints.kubernetes.io/managed-by: endpoint-controller`) with `service-name` = its name, `managed-by: endpointslicemirroring-controller.k8s.io`; annotations copied but `last-change-trigger-time` and `last-applied-configuration`; one slice per subset port set, `ready: true/false` from addresses/notReadyAddresses, no serving/terminating; invalid IPs and beyond 1000 per subset skipped |
//! | selector removed | `if Selector == nil { return nil }`: the Endpoints stays as it was | same: its slices stay as they were | (queued when selector nil-ness changes) mirrors the leftover Endpoints at once → a second set of slices with the pods' addresses |
//! | selector put back | updates the Endpoints (labels rewritten from the Service: a `skip-mirror` someone added is gone) | updates its own slices (same names) | deletes its mirrored slices |
//! | Service deleted | deletes the Endpoints by name (whoever made it); at start-up also every Endpoints without a Service (not leader-election ones) | nothing; the garbage collector deletes the slices (owner) | deletes its mirrored slices |
//! | others | — | a change or deletion of one of its slices by someone else → resync 1 s later (`endpointSliceChangeMinSyncDelay`), recreating a deleted slice while the selector holds; a slice with the Service's name label but another owner uid (a namesake deleted a moment ago) is deleted, never reused (`ownedBy`) | never mirrors an Endpoints labelled `endpointslice.kubernetes.io/skip-mirror: "true"` or annotated `control-plane.alpha.kubernetes.io/leader`, and deletes what it mirrored when that label appears; an Endpoints deletion deletes its slices; a mirrored slice deleted by someone else is recreated at once |
//!
//! The API server keeps `default/kubernetes` itself: an Endpoints labelled
//! `skip-mirror: "true"` and a slice `kubernetes` with only the service-name
//! label (bootstrap does the same). `kube-system/kube-dns` here is a
//! selectorless Service whose Endpoints the DNS keeps, so its slice is a
//! mirrored one (on a real cluster CoreDNS pods sit behind a selector).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use minicluster_apiserver::resources::must;
use minicluster_apiserver::{ResourceType, Store};
use serde_json::{Map, Value, json};

use crate::controllers::{
    EpGroup, compute_endpoints, endpoints_subsets, meta_name, meta_ns, meta_uid, owner_ref,
    rt_pods, s, slice_endpoints,
};
use crate::ctx::ClusterCtx;
use crate::informer::{self, Change, Controller, Informer, Lag, Op, Queue, SyncError};

pub const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
pub const MIRROR_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const HEADLESS: &str = "service.kubernetes.io/headless";
/// The label the endpoints controller puts on its Endpoints (v1.33+).
pub const ENDPOINTS_MANAGED_BY: &str = "endpoints.kubernetes.io/managed-by";
pub const ENDPOINTS_CONTROLLER: &str = "endpoint-controller";
/// `resourcelock.LeaderElectionRecordAnnotationKey`: never mirrored.
pub const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// `endpointSliceChangeMinSyncDelay`: the EndpointSlice controller resyncs
/// a Service this long after someone else changed one of its slices.
pub const SLICE_CHANGE_MIN_SYNC_DELAY: Duration = Duration::from_secs(1);
/// `--mirroring-max-endpoints-per-subset` default.
const MIRROR_MAX_PER_SUBSET: usize = 1000;

fn rt_services() -> &'static ResourceType {
    must("core/v1/services")
}
fn rt_endpoints() -> &'static ResourceType {
    must("core/v1/endpoints")
}
fn rt_slices() -> &'static ResourceType {
    must("discovery.k8s.io/v1/endpointslices")
}

fn meta_rv(v: &Value) -> u64 {
    s(v, "/metadata/resourceVersion").parse().unwrap_or(0)
}
fn label<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v["metadata"]["labels"][key].as_str()
}
fn key_of(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}
fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

/// Whether the Service has a selector (an empty one counts as none: the
/// controllers receive Services through protobuf, where `{}` is nil).
pub fn has_selector(svc: &Value) -> bool {
    svc["spec"]["selector"]
        .as_object()
        .is_some_and(|m| !m.is_empty())
}

/// `helper.IsServiceIPSet`: a ClusterIP that is not `None`.
pub fn service_ip_set(svc: &Value) -> bool {
    !matches!(s(svc, "/spec/clusterIP"), "" | "None")
}

fn is_external_name(svc: &Value) -> bool {
    s(svc, "/spec/type") == "ExternalName"
}

fn pod_matches(svc: &Value, pod: &Value) -> bool {
    has_selector(svc)
        && crate::controllers::matches_map(&svc["spec"]["selector"], &pod["metadata"]["labels"])
}

fn labels_of(v: &Value) -> Map<String, Value> {
    v["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------- endpoints

/// The labels the endpoints controller gives a Service's Endpoints.
pub fn endpoints_labels(svc: &Value) -> Value {
    let mut l = labels_of(svc);
    l.insert(ENDPOINTS_MANAGED_BY.into(), json!(ENDPOINTS_CONTROLLER));
    if service_ip_set(svc) {
        l.remove(HEADLESS);
    } else {
        l.insert(HEADLESS.into(), json!(""));
    }
    Value::Object(l)
}

/// What the endpoints controller writes for `svc` (with a selector), given
/// the pods of its namespace and the Endpoints it has cached.
pub fn plan_endpoints(svc: &Value, groups: &[EpGroup], existing: Option<&Value>) -> Vec<Op> {
    let ns = meta_ns(svc).to_string();
    let name = meta_name(svc).to_string();
    let subsets = endpoints_subsets(groups);
    let labels = endpoints_labels(svc);
    let want_subsets = (!subsets.is_empty()).then(|| json!(subsets));
    match existing {
        None => {
            let mut ep = json!({
                "apiVersion": "v1",
                "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
            });
            if let Some(sub) = want_subsets {
                ep["subsets"] = sub;
            }
            vec![Op::Create {
                rt: rt_endpoints(),
                ns,
                obj: ep,
            }]
        }
        Some(ep) => {
            let cur_subsets = ep
                .get("subsets")
                .filter(|v| v.as_array().is_some_and(|a| !a.is_empty()));
            if cur_subsets == want_subsets.as_ref() && ep["metadata"]["labels"] == labels {
                return vec![];
            }
            let mut next = ep.clone();
            next["metadata"]["labels"] = labels;
            match want_subsets {
                Some(sub) => next["subsets"] = sub,
                None => {
                    if let Some(m) = next.as_object_mut() {
                        m.remove("subsets");
                    }
                }
            }
            vec![Op::Update {
                rt: rt_endpoints(),
                ns,
                name,
                obj: next,
                rv: ep["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string),
            }]
        }
    }
}

/// `pkg/controller/endpoint`: the legacy Endpoints of Services with a
/// selector.
#[derive(Default)]
pub struct EndpointsController {
    /// The resourceVersion each Endpoints had after our last write
    /// (`staleEndpointsTracker`): a cache older than that is stale.
    written: HashMap<String, u64>,
}

fn services_of_pod<'a>(inf: &'a Informer, pod: &'a Value) -> impl Iterator<Item = String> + 'a {
    inf.list(rt_services(), Some(meta_ns(pod)))
        .filter(move |svc| pod_matches(svc, pod))
        .map(|svc| key_of(meta_ns(svc), meta_name(svc)))
}

fn pod_change_services(inf: &Informer, change: &Change) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for pod in change.old.iter().chain(change.new.iter()) {
        keys.extend(services_of_pod(inf, pod));
    }
    keys.sort();
    keys.dedup();
    keys
}

fn pods_in(inf: &Informer, ns: &str) -> Vec<Value> {
    inf.list(rt_pods(), Some(ns)).cloned().collect()
}

impl Controller for EndpointsController {
    const NAME: &'static str = "endpoint-controller";

    fn kinds(&self) -> Vec<&'static ResourceType> {
        vec![rt_services(), rt_pods(), rt_endpoints()]
    }

    fn on_start(&mut self, inf: &Informer, q: &mut Queue) {
        for svc in inf.list(rt_services(), None) {
            q.add(key_of(meta_ns(svc), meta_name(svc)));
        }
        // checkLeftoverEndpoints: Endpoints without a Service are deleted.
        for ep in inf.list(rt_endpoints(), None) {
            if ep["metadata"]["annotations"]
                .get(LEADER_ANNOTATION)
                .is_none()
            {
                q.add(key_of(meta_ns(ep), meta_name(ep)));
            }
        }
    }

    fn on_change(&mut self, inf: &Informer, change: &Change, q: &mut Queue) {
        let obj = change.new.as_ref().or(change.old.as_ref());
        let Some(obj) = obj else { return };
        match change.resource.plural {
            "services" => q.add(key_of(meta_ns(obj), meta_name(obj))),
            // `--endpoint-updates-batch-period` default: 0.
            "pods" => pod_change_services(inf, change)
                .into_iter()
                .for_each(|k| q.add(k)),
            "endpoints" if change.new.is_none() => {
                let key = key_of(meta_ns(obj), meta_name(obj));
                self.written.remove(&key);
                q.add(key);
            }
            _ => {}
        }
    }

    fn sync(&mut self, inf: &Informer, key: &str) -> Result<Vec<Op>, SyncError> {
        let (ns, name) = split_key(key);
        let Some(svc) = inf.get(rt_services(), ns, name) else {
            // The Service is gone: so is its Endpoints (whoever made it).
            self.written.remove(key);
            return Ok(vec![Op::Delete {
                rt: rt_endpoints(),
                ns: ns.to_string(),
                name: name.to_string(),
            }]);
        };
        if is_external_name(svc) || !has_selector(svc) {
            // No selector: the Endpoints is left exactly as it is.
            return Ok(vec![]);
        }
        let existing = inf.get(rt_endpoints(), ns, name);
        if let Some(want) = self.written.get(key)
            && existing.is_none_or(|e| meta_rv(e) < *want)
        {
            return Err(SyncError("Endpoints informer cache is out of date".into()));
        }
        let pods = pods_in(inf, ns);
        let groups = compute_endpoints(svc, &pods).unwrap_or_default();
        Ok(plan_endpoints(svc, &groups, existing))
    }

    fn wrote(&mut self, op: &Op, result: &Value) {
        match op {
            Op::Create { ns, .. } | Op::Update { ns, .. } => {
                self.written
                    .insert(key_of(ns, meta_name(result)), meta_rv(result));
            }
            Op::Delete { ns, name, .. } => {
                self.written.remove(&key_of(ns, name));
            }
        }
    }

    fn backoff(&self) -> fn(u32) -> Duration {
        informer::backoff_5ms
    }
}

// ---------------------------------------------------------------- slices

/// An EndpointSlice port: the name always present (`""` when the Service
/// port has none), as the controllers write it — kube-proxy ignores a port
/// without a name.
pub fn slice_port_json(name: &str, port: i64, protocol: &str, app_protocol: Option<&str>) -> Value {
    let mut v = json!({"name": name, "port": port, "protocol": protocol});
    if let Some(ap) = app_protocol {
        v["appProtocol"] = json!(ap);
    }
    v
}

/// The labels the EndpointSlice controller gives `svc`'s slices.
pub fn slice_labels(svc: &Value) -> Value {
    let mut l = labels_of(svc);
    for reserved in [SERVICE_NAME, MANAGED_BY, HEADLESS] {
        l.remove(reserved);
    }
    if !service_ip_set(svc) {
        l.insert(HEADLESS.into(), json!(""));
    }
    l.insert(SERVICE_NAME.into(), json!(meta_name(svc)));
    l.insert(MANAGED_BY.into(), json!(SLICE_CONTROLLER));
    Value::Object(l)
}

/// Whether `obj` names `owner` (by uid) among its owners: `ownedBy` of
/// the real reconciler.
fn owned_by(obj: &Value, owner: &Value) -> bool {
    let uid = meta_uid(owner);
    obj["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
}

/// What the EndpointSlice controller writes for `svc` (with a selector):
/// one slice per set of resolved ports, reusing its existing slices, one
/// empty slice when there is no endpoint at all. A slice labelled with the
/// Service's name but owned by another object (a Service of that name
/// deleted a moment ago, whose slices the garbage collector has not
/// removed yet) is deleted, never reused, as the real reconciler does.
pub fn plan_slices(svc: &Value, groups: &[EpGroup], existing: &[&Value]) -> Vec<Op> {
    let ns = meta_ns(svc).to_string();
    let name = meta_name(svc).to_string();
    let (mut existing, not_owned): (Vec<&Value>, Vec<&Value>) =
        existing.iter().partition(|sl| owned_by(sl, svc));
    let placeholder = [EpGroup {
        ports: vec![],
        addresses: vec![],
    }];
    let groups: &[EpGroup] = if groups.is_empty() {
        &placeholder
    } else {
        groups
    };
    let labels = slice_labels(svc);
    let mut ops = Vec::new();
    for g in groups {
        let ports_v = json!(
            g.ports
                .iter()
                .map(|p| slice_port_json(&p.name, p.port, &p.protocol, p.app_protocol.as_deref()))
                .collect::<Vec<_>>()
        );
        let endpoints_v = json!(slice_endpoints(g));
        let pos = existing
            .iter()
            .position(|sl| sl.get("ports").unwrap_or(&json!([])) == &ports_v)
            .or(if existing.is_empty() { None } else { Some(0) });
        match pos {
            Some(i) => {
                let sl = existing.remove(i);
                let cur_ports = sl.get("ports").cloned().unwrap_or(json!([]));
                let cur_eps = sl.get("endpoints").cloned().unwrap_or(json!([]));
                if cur_ports != ports_v
                    || cur_eps != endpoints_v
                    || sl["metadata"]["labels"] != labels
                {
                    let mut next = sl.clone();
                    next["metadata"]["labels"] = labels.clone();
                    next["ports"] = ports_v;
                    next["endpoints"] = endpoints_v;
                    ops.push(Op::Update {
                        rt: rt_slices(),
                        ns: ns.clone(),
                        name: meta_name(sl).to_string(),
                        obj: next,
                        rv: sl["metadata"]["resourceVersion"]
                            .as_str()
                            .map(str::to_string),
                    });
                }
            }
            None => ops.push(Op::Create {
                rt: rt_slices(),
                ns: ns.clone(),
                obj: json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "generateName": format!("{name}-"),
                        "namespace": ns,
                        "labels": labels,
                        "ownerReferences": owner_ref(svc, "v1", "Service"),
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints_v,
                    "ports": ports_v,
                }),
            }),
        }
    }
    for sl in existing.into_iter().chain(not_owned) {
        ops.push(Op::Delete {
            rt: rt_slices(),
            ns: ns.clone(),
            name: meta_name(sl).to_string(),
        });
    }
    ops
}

/// What a slice controller remembers of the slices it wrote
/// (`EndpointSliceTracker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    rv: u64,
    /// We deleted it; its deletion event is expected.
    deleted: bool,
}

#[derive(Default)]
struct SliceTracker {
    /// `namespace/slice-name` → what we last did to it, with the owning
    /// `namespace/service` key.
    slices: HashMap<String, (String, Tracked)>,
}

impl SliceTracker {
    fn wrote(&mut self, svc_key: &str, op: &Op, result: &Value) {
        match op {
            Op::Create { ns, .. } | Op::Update { ns, .. } => {
                self.slices.insert(
                    key_of(ns, meta_name(result)),
                    (
                        svc_key.to_string(),
                        Tracked {
                            rv: meta_rv(result),
                            deleted: false,
                        },
                    ),
                );
            }
            Op::Delete { ns, name, .. } => {
                if let Some((_, t)) = self.slices.get_mut(&key_of(ns, name)) {
                    t.deleted = true;
                }
            }
        }
    }

    /// `ShouldSync`: a slice event we did not cause.
    fn should_sync(&self, slice: &Value) -> bool {
        match self.slices.get(&key_of(meta_ns(slice), meta_name(slice))) {
            None => true,
            Some((_, t)) => t.deleted || meta_rv(slice) > t.rv,
        }
    }

    /// `HandleDeletion`: true if we expected it (and forget the slice).
    fn handle_deletion(&mut self, slice: &Value) -> bool {
        let k = key_of(meta_ns(slice), meta_name(slice));
        match self.slices.get(&k) {
            Some((_, t)) if t.deleted => {
                self.slices.remove(&k);
                true
            }
            Some(_) => {
                self.slices.remove(&k);
                false
            }
            None => true,
        }
    }

    fn has(&self, slice: &Value) -> bool {
        self.slices
            .contains_key(&key_of(meta_ns(slice), meta_name(slice)))
    }

    /// `StaleSlices`: the cache has not caught up with our writes for
    /// `svc_key` yet (a slice we wrote is older or missing there, one we
    /// deleted is still there).
    fn stale(&self, svc_key: &str, inf: &Informer) -> bool {
        self.slices
            .iter()
            .filter(|(_, (svc, _))| svc == svc_key)
            .any(|(k, (_, t))| {
                let (ns, name) = split_key(k);
                match (inf.get(rt_slices(), ns, name), t.deleted) {
                    (Some(_), true) => true,
                    (Some(c), false) => meta_rv(c) < t.rv,
                    (None, true) => false,
                    (None, false) => true,
                }
            })
    }

    fn delete_service(&mut self, svc_key: &str) {
        self.slices.retain(|_, (svc, _)| svc != svc_key);
    }
}

fn managed_by(slice: &Value, manager: &str) -> bool {
    label(slice, MANAGED_BY) == Some(manager)
}

fn slices_of<'a>(inf: &'a Informer, ns: &'a str, svc: &'a str, manager: &'a str) -> Vec<&'a Value> {
    inf.list(rt_slices(), Some(ns))
        .filter(|sl| label(sl, SERVICE_NAME) == Some(svc) && managed_by(sl, manager))
        .filter(|sl| sl["metadata"].get("deletionTimestamp").is_none())
        .collect()
}

/// The slice events both slice controllers react to: `(service keys, delay)`.
fn slice_change_keys(change: &Change, manager: &str, tracker: &mut SliceTracker) -> Vec<String> {
    let svc_key = |sl: &Value| -> Option<String> {
        label(sl, SERVICE_NAME)
            .filter(|n| !n.is_empty())
            .map(|n| key_of(meta_ns(sl), n))
    };
    match (&change.old, &change.new) {
        (None, Some(new)) => {
            if managed_by(new, manager) && tracker.should_sync(new) {
                return svc_key(new).into_iter().collect();
            }
        }
        (Some(old), Some(new)) => {
            if label(old, SERVICE_NAME) != label(new, SERVICE_NAME) {
                return svc_key(old).into_iter().chain(svc_key(new)).collect();
            }
            if managed_by(old, manager) != managed_by(new, manager)
                || (managed_by(new, manager) && tracker.should_sync(new))
            {
                return svc_key(new).into_iter().collect();
            }
        }
        (Some(old), None) => {
            if managed_by(old, manager) && tracker.has(old) && !tracker.handle_deletion(old) {
                return svc_key(old).into_iter().collect();
            }
        }
        (None, None) => {}
    }
    vec![]
}

/// `pkg/controller/endpointslice`: slices of Services with a selector.
#[derive(Default)]
pub struct SliceController {
    tracker: SliceTracker,
    /// The Service each pending write belongs to (for the tracker).
    syncing: String,
}

impl Controller for SliceController {
    const NAME: &'static str = "endpointslice-controller";

    fn kinds(&self) -> Vec<&'static ResourceType> {
        vec![rt_services(), rt_pods(), rt_slices()]
    }

    fn on_start(&mut self, inf: &Informer, q: &mut Queue) {
        for svc in inf.list(rt_services(), None) {
            q.add(key_of(meta_ns(svc), meta_name(svc)));
        }
    }

    fn on_change(&mut self, inf: &Informer, change: &Change, q: &mut Queue) {
        let Some(obj) = change.new.as_ref().or(change.old.as_ref()) else {
            return;
        };
        match change.resource.plural {
            "services" => q.add(key_of(meta_ns(obj), meta_name(obj))),
            // `--endpointslice-updates-batch-period` default: 0.
            "pods" => pod_change_services(inf, change)
                .into_iter()
                .for_each(|k| q.add(k)),
            "endpointslices" => {
                for k in slice_change_keys(change, SLICE_CONTROLLER, &mut self.tracker) {
                    q.add_after(k, SLICE_CHANGE_MIN_SYNC_DELAY);
                }
            }
            _ => {}
        }
    }

    fn sync(&mut self, inf: &Informer, key: &str) -> Result<Vec<Op>, SyncError> {
        let (ns, name) = split_key(key);
        self.syncing = key.to_string();
        let Some(svc) = inf.get(rt_services(), ns, name) else {
            // Its slices go with it (garbage collection by owner).
            self.tracker.delete_service(key);
            return Ok(vec![]);
        };
        if is_external_name(svc) || !has_selector(svc) {
            // No selector: the slices are left exactly as they are.
            return Ok(vec![]);
        }
        let existing = slices_of(inf, ns, name, SLICE_CONTROLLER);
        if self.tracker.stale(key, inf) {
            return Err(SyncError(
                "EndpointSlice informer cache is out of date".into(),
            ));
        }
        let pods = pods_in(inf, ns);
        let groups = compute_endpoints(svc, &pods).unwrap_or_default();
        Ok(plan_slices(svc, &groups, &existing))
    }

    fn wrote(&mut self, op: &Op, result: &Value) {
        let svc = self.syncing.clone();
        self.tracker.wrote(&svc, op, result);
    }

    fn backoff(&self) -> fn(u32) -> Duration {
        informer::backoff_1s
    }
}

// ---------------------------------------------------------------- mirroring

/// `shouldMirror`: not labelled skip-mirror, no leader-election annotation.
pub fn should_mirror(ep: &Value) -> bool {
    label(ep, SKIP_MIRROR) != Some("true")
        && ep["metadata"]["annotations"]
            .get(LEADER_ANNOTATION)
            .is_none()
}

/// The labels and annotations of a slice mirrored from `ep`.
pub fn mirror_meta(ep: &Value) -> (Value, Value) {
    let mut l = labels_of(ep);
    l.insert(SERVICE_NAME.into(), json!(meta_name(ep)));
    l.insert(MANAGED_BY.into(), json!(MIRROR_CONTROLLER));
    let mut a = ep["metadata"]["annotations"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    a.remove(TRIGGER_TIME);
    a.remove(LAST_APPLIED);
    (Value::Object(l), Value::Object(a))
}

/// The slices `ep` mirrors to: `(address type, ports) → endpoints`, the
/// endpoints sorted by address. Invalid addresses and those beyond 1000 per
/// subset are skipped; not-ready addresses are mirrored with `ready: false`.
pub fn mirror_desired(ep: &Value) -> BTreeMap<(String, String), (Value, Vec<Value>)> {
    let mut out: BTreeMap<(String, String), (Value, Vec<Value>)> = BTreeMap::new();
    for subset in ep["subsets"].as_array().into_iter().flatten() {
        let mut ports: Vec<Value> = subset["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                slice_port_json(
                    p["name"].as_str().unwrap_or(""),
                    p["port"].as_i64().unwrap_or(0),
                    p["protocol"].as_str().unwrap_or("TCP"),
                    p["appProtocol"].as_str(),
                )
            })
            .collect();
        ports.sort_by_key(|p| (p["port"].as_i64(), p["name"].to_string()));
        let ports_key = Value::Array(ports.clone()).to_string();
        let mut added = 0;
        for (field, ready) in [("addresses", true), ("notReadyAddresses", false)] {
            for a in subset[field].as_array().into_iter().flatten() {
                if added >= MIRROR_MAX_PER_SUBSET {
                    break;
                }
                let Ok(ip) = s(a, "/ip").parse::<std::net::IpAddr>() else {
                    continue;
                };
                added += 1;
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                let mut e = json!({"addresses": [ip.to_string()], "conditions": {"ready": ready}});
                for f in ["targetRef", "nodeName"] {
                    if let Some(v) = a.get(f).filter(|v| !v.is_null()) {
                        e[f] = v.clone();
                    }
                }
                if let Some(h) = a["hostname"].as_str().filter(|h| !h.is_empty()) {
                    e["hostname"] = json!(h);
                }
                let entry = out
                    .entry((family.to_string(), ports_key.clone()))
                    .or_insert_with(|| (json!(ports), Vec::new()));
                if !entry.1.iter().any(|x| x["addresses"] == e["addresses"]) {
                    entry.1.push(e);
                }
            }
        }
    }
    for (_, eps) in out.values_mut() {
        eps.sort_by(|a, b| a["addresses"].to_string().cmp(&b["addresses"].to_string()));
    }
    out
}

fn slice_key(sl: &Value) -> (String, String) {
    let mut ports: Vec<Value> = sl["ports"].as_array().cloned().unwrap_or_default();
    ports.sort_by_key(|p| (p["port"].as_i64(), p["name"].to_string()));
    (
        s(sl, "/addressType").to_string(),
        Value::Array(ports).to_string(),
    )
}

/// What the mirroring controller writes for `ep` (whose Service has no
/// selector), given the slices it mirrored before.
pub fn plan_mirror(ep: &Value, existing: &[&Value]) -> Vec<Op> {
    let ns = meta_ns(ep).to_string();
    let name = meta_name(ep).to_string();
    let desired = mirror_desired(ep);
    let (labels, annotations) = mirror_meta(ep);
    let mut by_key: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for sl in existing {
        by_key.entry(slice_key(sl)).or_default().push(sl);
    }
    let mut ops = Vec::new();
    let mut deletes: Vec<&Value> = Vec::new();
    let mut creates: Vec<Value> = Vec::new();
    for (key, (ports, eps)) in &desired {
        let family = &key.0;
        let have = by_key.remove(key).unwrap_or_default();
        let mk = |slice_name: Option<&str>| {
            let mut meta = json!({
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": owner_ref(ep, "v1", "Endpoints"),
            });
            match slice_name {
                Some(n) => meta["name"] = json!(n),
                None => meta["generateName"] = json!(format!("{name}-")),
            }
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": meta,
                "addressType": family,
                "endpoints": eps,
                "ports": ports,
            })
        };
        match have.split_first() {
            None => creates.push(mk(None)),
            Some((first, rest)) => {
                deletes.extend(rest.iter().copied());
                let mut cur_eps: Vec<Value> =
                    first["endpoints"].as_array().cloned().unwrap_or_default();
                cur_eps.sort_by(|a, b| a["addresses"].to_string().cmp(&b["addresses"].to_string()));
                let same = &cur_eps == eps
                    && first["metadata"]["labels"] == labels
                    && first["metadata"]["annotations"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default()
                        == annotations.as_object().cloned().unwrap_or_default();
                if !same {
                    // An unconditional update of a freshly built slice.
                    ops.push(Op::Update {
                        rt: rt_slices(),
                        ns: ns.clone(),
                        name: meta_name(first).to_string(),
                        obj: mk(Some(meta_name(first))),
                        rv: None,
                    });
                }
            }
        }
    }
    for rest in by_key.into_values() {
        deletes.extend(rest);
    }
    // Recycle slices that would be deleted instead of creating new ones.
    for obj in creates {
        match deletes.pop() {
            Some(old) => {
                let mut obj = obj;
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("generateName");
                }
                obj["metadata"]["name"] = json!(meta_name(old));
                ops.push(Op::Update {
                    rt: rt_slices(),
                    ns: ns.clone(),
                    name: meta_name(old).to_string(),
                    obj,
                    rv: None,
                });
            }
            None => ops.push(Op::Create {
                rt: rt_slices(),
                ns: ns.clone(),
                obj,
            }),
        }
    }
    for old in deletes {
        ops.push(Op::Delete {
            rt: rt_slices(),
            ns: ns.clone(),
            name: meta_name(old).to_string(),
        });
    }
    ops
}

/// `pkg/controller/endpointslicemirroring`: slices for selectorless
/// Services' Endpoints.
#[derive(Default)]
pub struct MirrorController {
    tracker: SliceTracker,
    syncing: String,
}

impl MirrorController {
    fn delete_mirrored(&mut self, inf: &Informer, ns: &str, name: &str) -> Vec<Op> {
        self.tracker.delete_service(&key_of(ns, name));
        slices_of(inf, ns, name, MIRROR_CONTROLLER)
            .into_iter()
            .map(|sl| Op::Delete {
                rt: rt_slices(),
                ns: ns.to_string(),
                name: meta_name(sl).to_string(),
            })
            .collect()
    }
}

impl Controller for MirrorController {
    const NAME: &'static str = "endpointslicemirroring-controller";

    fn kinds(&self) -> Vec<&'static ResourceType> {
        vec![rt_endpoints(), rt_services(), rt_slices()]
    }

    fn on_start(&mut self, inf: &Informer, q: &mut Queue) {
        for ep in inf.list(rt_endpoints(), None).filter(|e| should_mirror(e)) {
            q.add(key_of(meta_ns(ep), meta_name(ep)));
        }
        for svc in inf.list(rt_services(), None).filter(|s| !has_selector(s)) {
            q.add(key_of(meta_ns(svc), meta_name(svc)));
        }
        for sl in inf
            .list(rt_slices(), None)
            .filter(|sl| managed_by(sl, MIRROR_CONTROLLER))
        {
            if let Some(n) = label(sl, SERVICE_NAME) {
                q.add(key_of(meta_ns(sl), n));
            }
        }
    }

    fn on_change(&mut self, _inf: &Informer, change: &Change, q: &mut Queue) {
        let Some(obj) = change.new.as_ref().or(change.old.as_ref()) else {
            return;
        };
        let key = key_of(meta_ns(obj), meta_name(obj));
        match change.resource.plural {
            "endpoints" => {
                let mirror = change
                    .old
                    .iter()
                    .chain(change.new.iter())
                    .any(should_mirror);
                if mirror {
                    q.add(key);
                }
            }
            "services" => {
                let queue = match (&change.old, &change.new) {
                    (Some(o), Some(n)) => has_selector(o) != has_selector(n),
                    (_, Some(n)) => !has_selector(n),
                    (Some(o), None) => !has_selector(o),
                    (None, None) => false,
                };
                if queue {
                    q.add(key);
                }
            }
            // `--mirroring-endpointslice-updates-batch-period` default: 0.
            "endpointslices" => {
                for k in slice_change_keys(change, MIRROR_CONTROLLER, &mut self.tracker) {
                    q.add(k);
                }
            }
            _ => {}
        }
    }

    fn sync(&mut self, inf: &Informer, key: &str) -> Result<Vec<Op>, SyncError> {
        let (ns, name) = split_key(key);
        self.syncing = key.to_string();
        let Some(ep) = inf.get(rt_endpoints(), ns, name) else {
            return Ok(self.delete_mirrored(inf, ns, name));
        };
        if !should_mirror(ep) {
            return Ok(self.delete_mirrored(inf, ns, name));
        }
        match inf.get(rt_services(), ns, name) {
            None => return Ok(self.delete_mirrored(inf, ns, name)),
            Some(svc) if has_selector(svc) => return Ok(self.delete_mirrored(inf, ns, name)),
            Some(_) => {}
        }
        let existing = slices_of(inf, ns, name, MIRROR_CONTROLLER);
        if self.tracker.stale(key, inf) {
            return Err(SyncError(
                "EndpointSlice informer cache is out of date".into(),
            ));
        }
        Ok(plan_mirror(ep, &existing))
    }

    fn wrote(&mut self, op: &Op, result: &Value) {
        let svc = self.syncing.clone();
        self.tracker.wrote(&svc, op, result);
    }

    fn backoff(&self) -> fn(u32) -> Duration {
        informer::backoff_1s
    }
}

/// The endpoints controller, with the cluster's lag.
pub async fn endpoints_controller(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    informer::run(store, EndpointsController::default(), Lag::from_env()).await
}

/// The EndpointSlice controller, with the cluster's lag.
pub async fn slice_controller(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    informer::run(store, SliceController::default(), Lag::from_env()).await
}

/// The EndpointSlice mirroring controller, with the cluster's lag.
pub async fn mirroring_controller(store: Arc<Store>, _ctx: ClusterCtx) -> Result<()> {
    informer::run(store, MirrorController::default(), Lag::from_env()).await
}

/// All three, without lag (unit tests of the control plane).
pub async fn all_without_lag(store: Arc<Store>) -> Result<()> {
    tokio::try_join!(
        informer::run(store.clone(), EndpointsController::default(), Lag::NONE),
        informer::run(store.clone(), SliceController::default(), Lag::NONE),
        informer::run(store, MirrorController::default(), Lag::NONE),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use minicluster_apiserver::admission;

    fn svc(selector: Option<Value>) -> Value {
        let mut v = json!({
            "metadata": {"name": "echo", "namespace": "default", "uid": "svc-uid",
                         "labels": {"app": "echo", (SERVICE_NAME): "spoof"}},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]},
        });
        if let Some(sel) = selector {
            v["spec"]["selector"] = sel;
        }
        v
    }

    fn pod(name: &str, ip: &str, ready: bool) -> Value {
        json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": {"app": "echo"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        })
    }

    #[test]
    fn selectors_and_labels_like_the_real_controllers() {
        assert!(has_selector(&svc(Some(json!({"app": "echo"})))));
        assert!(!has_selector(&svc(None)));
        assert!(!has_selector(&svc(Some(json!({})))));
        let s = svc(Some(json!({"app": "echo"})));
        let l = endpoints_labels(&s);
        assert_eq!(l[ENDPOINTS_MANAGED_BY], ENDPOINTS_CONTROLLER);
        assert_eq!(l["app"], "echo");
        assert!(
            l.get(SKIP_MIRROR).is_none(),
            "the endpoints controller never sets skip-mirror"
        );
        assert!(l.get(HEADLESS).is_none());
        let mut headless = s.clone();
        headless["spec"]["clusterIP"] = json!("None");
        assert_eq!(endpoints_labels(&headless)[HEADLESS], "");
        let sl = slice_labels(&s);
        assert_eq!(
            sl[SERVICE_NAME], "echo",
            "reserved labels of the Service are overridden"
        );
        assert_eq!(sl[MANAGED_BY], SLICE_CONTROLLER);
        assert_eq!(sl["app"], "echo");
    }

    #[test]
    fn endpoints_plan_creates_updates_and_keeps() {
        let s = svc(Some(json!({"app": "echo"})));
        let pods = vec![pod("a", "10.244.0.3", true), pod("b", "10.244.0.4", false)];
        let groups = compute_endpoints(&s, &pods).expect("selector");
        let ops = plan_endpoints(&s, &groups, None);
        let [Op::Create { obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(obj["subsets"][0]["addresses"][0]["ip"], "10.244.0.3");
        assert_eq!(
            obj["subsets"][0]["notReadyAddresses"][0]["ip"],
            "10.244.0.4"
        );
        let mut stored = obj.clone();
        stored["metadata"]["resourceVersion"] = json!("7");
        assert!(plan_endpoints(&s, &groups, Some(&stored)).is_empty());
        let fewer = compute_endpoints(&s, &pods[..1]).expect("selector");
        let ops = plan_endpoints(&s, &fewer, Some(&stored));
        let [Op::Update { rv, obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(rv.as_deref(), Some("7"), "an update of the cached version");
        assert!(obj["subsets"][0].get("notReadyAddresses").is_none());
    }

    #[test]
    fn slices_plan_names_every_port_and_keeps_a_placeholder() {
        let s = svc(Some(json!({"app": "echo"})));
        let ops = plan_slices(&s, &[], &[]);
        let [Op::Create { obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(obj["endpoints"], json!([]));
        assert_eq!(obj["metadata"]["generateName"], "echo-");
        assert_eq!(obj["metadata"]["ownerReferences"][0]["kind"], "Service");
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
        let mut unnamed = s.clone();
        unnamed["spec"]["ports"] = json!([{"port": 80, "targetPort": 8080}]);
        let groups = compute_endpoints(&unnamed, &[pod("a", "10.244.0.3", true)]).expect("sel");
        let ops = plan_slices(&unnamed, &groups, &[]);
        let [Op::Create { obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(
            obj["ports"],
            json!([{"name": "", "port": 8080, "protocol": "TCP"}])
        );
    }

    #[test]
    fn slices_of_a_deleted_namesake_are_deleted_not_reused() {
        // A Service deleted and made again under the same name: the old
        // one's slice (same labels, the old uid as owner) is still there.
        let s = svc(Some(json!({"app": "echo"})));
        let groups = compute_endpoints(&s, &[pod("a", "10.244.0.3", true)]).expect("sel");
        let ops = plan_slices(&s, &groups, &[]);
        let [Op::Create { obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        let mut old = obj.clone();
        old["metadata"]["name"] = json!("echo-old12");
        old["metadata"]["resourceVersion"] = json!("5");
        old["metadata"]["ownerReferences"][0]["uid"] = json!("uid-of-the-deleted-one");
        let ops = plan_slices(&s, &groups, &[&old]);
        assert!(
            matches!(ops.as_slice(), [Op::Create { obj, .. }, Op::Delete { name, .. }]
                if obj["metadata"]["ownerReferences"][0]["uid"] == "svc-uid" && name == "echo-old12"),
            "{ops:?}"
        );
        // Its own slice is kept as it is.
        let mut own = old.clone();
        own["metadata"]["ownerReferences"][0]["uid"] = json!("svc-uid");
        assert!(plan_slices(&s, &groups, &[&own]).is_empty());
    }

    fn endpoints_obj() -> Value {
        json!({
            "metadata": {"name": "echo", "namespace": "default", "uid": "ep-uid",
                         "labels": {"app": "echo", (ENDPOINTS_MANAGED_BY): ENDPOINTS_CONTROLLER, (MANAGED_BY): "someone"},
                         "annotations": {(TRIGGER_TIME): "2024-01-01T00:00:00Z", "team": "a"}},
            "subsets": [
                {"addresses": [{"ip": "10.244.0.4", "nodeName": "node-1", "targetRef": {"kind": "Pod", "name": "b"}},
                               {"ip": "10.244.0.3"}, {"ip": "not-an-ip"}],
                 "notReadyAddresses": [{"ip": "10.244.0.9", "hostname": "h"}],
                 "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
                {"addresses": [{"ip": "10.244.0.5"}], "ports": [{"port": 9090}]}
            ]
        })
    }

    #[test]
    fn mirroring_copies_what_the_real_one_copies() {
        let ep = endpoints_obj();
        let d = mirror_desired(&ep);
        assert_eq!(d.len(), 2, "one slice per set of ports");
        let (ports, eps) = d
            .values()
            .find(|(p, _)| p[0]["port"] == 8080)
            .expect("8080");
        assert_eq!(
            ports,
            &json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        let ips: Vec<&str> = eps
            .iter()
            .map(|e| e["addresses"][0].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            ips,
            ["10.244.0.3", "10.244.0.4", "10.244.0.9"],
            "invalid address skipped"
        );
        assert_eq!(eps[2]["conditions"], json!({"ready": false}));
        assert_eq!(eps[2]["hostname"], "h");
        assert_eq!(eps[1]["nodeName"], "node-1");
        let (_, other) = d
            .values()
            .find(|(p, _)| p[0]["port"] == 9090)
            .expect("9090");
        assert_eq!(other[0]["conditions"], json!({"ready": true}));
        let ops = plan_mirror(&ep, &[]);
        assert_eq!(ops.len(), 2);
        let Op::Create { obj, .. } = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!(obj["metadata"]["labels"][MANAGED_BY], MIRROR_CONTROLLER);
        assert_eq!(obj["metadata"]["labels"][SERVICE_NAME], "echo");
        assert_eq!(
            obj["metadata"]["labels"][ENDPOINTS_MANAGED_BY],
            ENDPOINTS_CONTROLLER
        );
        assert_eq!(obj["metadata"]["annotations"], json!({"team": "a"}));
        assert_eq!(obj["metadata"]["ownerReferences"][0]["kind"], "Endpoints");
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], "ep-uid");
        assert_eq!(obj["metadata"]["generateName"], "echo-");
        // Mirrored again: nothing to write; a changed address: one update.
        let stored: Vec<Value> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| match op {
                Op::Create { obj, .. } => {
                    let mut o = obj.clone();
                    o["metadata"]["name"] = json!(format!("echo-{i}"));
                    o
                }
                _ => Value::Null,
            })
            .collect();
        let refs: Vec<&Value> = stored.iter().collect();
        assert!(plan_mirror(&ep, &refs).is_empty());
        let mut changed = ep.clone();
        changed["subsets"][1]["addresses"][0]["ip"] = json!("10.244.0.6");
        let ops = plan_mirror(&changed, &refs);
        let [Op::Update { rv: None, obj, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(obj["endpoints"][0]["addresses"][0], "10.244.0.6");
        // No subsets at all: its slices go.
        let mut empty = ep.clone();
        empty["subsets"] = json!([]);
        assert_eq!(plan_mirror(&empty, &refs).len(), 2);
        assert!(
            plan_mirror(&empty, &refs)
                .iter()
                .all(|o| matches!(o, Op::Delete { .. }))
        );
        assert!(should_mirror(&ep));
        let mut skip = ep.clone();
        skip["metadata"]["labels"][SKIP_MIRROR] = json!("true");
        assert!(!should_mirror(&skip));
        let mut leader = ep.clone();
        leader["metadata"]["annotations"][LEADER_ANNOTATION] = json!("{}");
        assert!(!should_mirror(&leader));
    }

    // ------------------------------------------------ the three together

    fn slices(store: &Store, manager: &str) -> Vec<Value> {
        store
            .list(rt_slices(), Some("default"))
            .0
            .into_iter()
            .filter(|s| label(s, SERVICE_NAME) == Some("echo") && managed_by(s, manager))
            .collect()
    }

    async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    use std::time::Instant;

    /// `v` as a client sends it: the store gives the uid.
    fn without_uid(mut v: Value) -> Value {
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("uid");
        }
        v
    }

    /// A store with namespace `default` and two ready `app=echo` pods.
    fn store_with_echo_pods() -> Arc<Store> {
        let store = Arc::new(Store::new());
        store
            .create(
                must("core/v1/namespaces"),
                "",
                json!({"metadata": {"name": "default"}}),
            )
            .expect("ns");
        for (n, ip) in [("a", "10.244.0.3"), ("b", "10.244.0.4")] {
            store
                .create(rt_pods(), "default", without_uid(pod(n, ip, true)))
                .expect("pod");
        }
        store
    }

    /// A Service deleted and made again at once under the same name (a
    /// reroute stopped and started again recreates its shadow): the new one
    /// gets a slice of its own every time, with the real lag, whatever order
    /// the Service and slice events reach the controller in.
    #[tokio::test]
    async fn a_service_made_again_at_once_gets_a_slice_of_its_own() {
        let store = store_with_echo_pods();
        let fresh_svc = || without_uid(svc(Some(json!({"app": "echo"}))));
        tokio::spawn(informer::run(
            store.clone(),
            SliceController::default(),
            Lag::REAL,
        ));
        let owned_slice = |uid: &str| {
            slices(&store, SLICE_CONTROLLER).into_iter().any(|s| {
                s["metadata"]["ownerReferences"][0]["uid"].as_str() == Some(uid)
                    && s["endpoints"].as_array().map(Vec::len) == Some(2)
            })
        };
        let made = admission::create(&store, rt_services(), "default", fresh_svc()).expect("svc");
        let uid = meta_uid(&made).to_string();
        eventually("the first slice", || owned_slice(&uid).then_some(())).await;
        for round in 0..12 {
            store
                .delete(rt_services(), "default", "echo")
                .expect("delete");
            tokio::time::sleep(Duration::from_millis(round * 5)).await;
            let made =
                admission::create(&store, rt_services(), "default", fresh_svc()).expect("again");
            let uid = meta_uid(&made).to_string();
            eventually(
                &format!("a slice of the new Service (round {round})"),
                || owned_slice(&uid).then_some(()),
            )
            .await;
        }
    }

    /// What a user of a real cluster sees when a Service's selector goes and
    /// comes back, with the real lag.
    #[tokio::test]
    async fn selector_removed_and_restored_with_lag() {
        let store = store_with_echo_pods();
        let mut s = without_uid(svc(Some(json!({"app": "echo"}))));
        s["metadata"]["labels"] = json!({"app": "echo"});
        admission::create(&store, rt_services(), "default", s).expect("svc");
        let lag = Lag::REAL;
        tokio::spawn(informer::run(
            store.clone(),
            EndpointsController::default(),
            lag,
        ));
        tokio::spawn(informer::run(
            store.clone(),
            SliceController::default(),
            lag,
        ));
        tokio::spawn(informer::run(
            store.clone(),
            MirrorController::default(),
            lag,
        ));
        let ctl = eventually("controller slice", || {
            let s = slices(&store, SLICE_CONTROLLER);
            (s.len() == 1 && s[0]["endpoints"].as_array().map(Vec::len) == Some(2))
                .then(|| s[0].clone())
        })
        .await;
        let ep = eventually("endpoints", || {
            store.get(rt_endpoints(), "default", "echo").ok()
        })
        .await;
        assert!(label(&ep, SKIP_MIRROR).is_none());

        // The selector goes: the Endpoints and the controller's slice stay,
        // a mirrored slice with the pods' addresses appears.
        store
            .update_with(rt_services(), "default", "echo", |v| {
                if let Some(m) = v["spec"].as_object_mut() {
                    m.remove("selector");
                }
                Ok(())
            })
            .expect("patch");
        let mirrored = eventually("mirrored slice", || {
            let s = slices(&store, MIRROR_CONTROLLER);
            (s.len() == 1).then(|| s[0].clone())
        })
        .await;
        let ips: Vec<&str> = mirrored["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["addresses"][0].as_str())
            .collect();
        assert_eq!(ips, ["10.244.0.3", "10.244.0.4"]);
        assert_eq!(
            mirrored["metadata"]["ownerReferences"][0]["kind"],
            "Endpoints"
        );
        assert_eq!(
            mirrored["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        tokio::time::sleep(lag.max_stale() * 3).await;
        assert_eq!(
            slices(&store, SLICE_CONTROLLER),
            vec![ctl.clone()],
            "left as it was"
        );
        assert!(store.get(rt_endpoints(), "default", "echo").is_ok());

        // Someone deletes the mirrored slice: mirrored again.
        store
            .delete(rt_slices(), "default", meta_name(&mirrored))
            .expect("delete mirrored");
        eventually("mirrored again", || {
            (slices(&store, MIRROR_CONTROLLER).len() == 1).then_some(())
        })
        .await;
        // The Endpoints labelled skip-mirror: its mirrored slices go.
        store
            .update_with(rt_endpoints(), "default", "echo", |v| {
                v["metadata"]["labels"][SKIP_MIRROR] = json!("true");
                Ok(())
            })
            .expect("label");
        eventually("mirrored gone", || {
            slices(&store, MIRROR_CONTROLLER).is_empty().then_some(())
        })
        .await;
        // A pod goes meanwhile: nobody updates anything for the Service.
        store.delete(rt_pods(), "default", "b").expect("pod b");
        tokio::time::sleep(lag.max_stale() * 3).await;
        assert_eq!(slices(&store, SLICE_CONTROLLER), vec![ctl.clone()]);

        // The selector comes back: the controller's slice and the Endpoints
        // are current (skip-mirror gone with the Service's labels), no
        // mirrored slice.
        store
            .update_with(rt_services(), "default", "echo", |v| {
                v["spec"]["selector"] = json!({"app": "echo"});
                Ok(())
            })
            .expect("restore");
        eventually("current slice", || {
            let s = slices(&store, SLICE_CONTROLLER);
            (s.len() == 1 && s[0]["endpoints"].as_array().map(Vec::len) == Some(1)).then_some(())
        })
        .await;
        let ep = eventually("current endpoints", || {
            let ep = store.get(rt_endpoints(), "default", "echo").ok()?;
            (ep["subsets"][0]["addresses"].as_array().map(Vec::len) == Some(1)).then_some(ep)
        })
        .await;
        assert!(label(&ep, SKIP_MIRROR).is_none());
        tokio::time::sleep(lag.max_stale() * 3).await;
        assert!(slices(&store, MIRROR_CONTROLLER).is_empty());

        // A controller slice deleted while the selector holds: back after
        // the 1 s resync.
        let gone = slices(&store, SLICE_CONTROLLER);
        store
            .delete(rt_slices(), "default", meta_name(&gone[0]))
            .expect("delete");
        eventually("recreated", || {
            (slices(&store, SLICE_CONTROLLER).len() == 1).then_some(())
        })
        .await;

        // The Service goes: the Endpoints and every slice go.
        store.delete(rt_services(), "default", "echo").expect("svc");
        eventually("endpoints deleted", || {
            store
                .get(rt_endpoints(), "default", "echo")
                .is_err()
                .then_some(())
        })
        .await;
        assert!(slices(&store, SLICE_CONTROLLER).is_empty());
    }
}
