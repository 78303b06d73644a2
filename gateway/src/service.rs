//! A rerouted Service in Kubernetes: what burrow changes, how it is written
//! down, and how it is given back. Shared by the client (which reroutes and
//! restores with the user's credentials) and the gateway (which restores
//! with its own when a lease expires and at its start).
//!
//! A reroute changes one field of the user's Service: `spec.selector` is
//! removed (a Service selector only selects pods of its own namespace, and
//! the gateway lives in another one), and the original selector is saved in
//! the annotation [`ANNOTATION`] in the same patch. burrow's own
//! EndpointSlice ([`slice_name`]) then points every TCP port of the Service
//! at the gateway pod's listeners, and a shadow Service ([`shadow_name`])
//! with the original selector and ports carries the traffic that must still
//! reach the original pods. Restore puts the selector back and removes the
//! annotation in one JSON patch (guarded by a `test` of the annotation, so
//! it never undoes a newer reroute), then deletes the EndpointSlice and the
//! shadow. Every step tolerates "already done", so restore is idempotent and
//! can be repeated after a crash at any point.
//!
//! Each laptop that reroutes a Service also leaves its **reroute record**
//! on it ([`RECORD_PREFIX`]`<key id>`: its public key and name), written
//! with the user's own credentials before it asks the gateway: the gateway
//! acts on a Service only for a laptop whose record it carries, so a laptop
//! can never make the gateway touch a Service its user could not patch.
//!
//! Names are checked ([`crate::api::names`]) before any request is built
//! (kube does not escape them), and burrow's own objects are deleted only
//! when they carry burrow's labels for that very Service and are owned by
//! it, with a uid precondition: a look-alike made by someone else is never
//! deleted.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::names;

/// The annotation holding the original selector ([`Saved`], JSON).
pub const ANNOTATION: &str = "burrow.dev/reroute";
/// Prefix of a laptop's reroute record annotation ([`Record`], JSON); the
/// rest is [`record_id`] of its key.
pub const RECORD_PREFIX: &str = "burrow.dev/laptop-";
/// Label on burrow's shadow Services and EndpointSlices: the rerouted
/// Service's name.
pub const REROUTE_OF: &str = "burrow.dev/reroute-of";
/// `app.kubernetes.io/managed-by` value on what burrow creates.
pub const MANAGED_BY: &str = "burrow";
/// The EndpointSlice label kube-proxy groups slices by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The EndpointSlice label naming its manager.
pub const SLICE_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// burrow's value for [`SLICE_MANAGED_BY`].
pub const SLICE_MANAGER: &str = "burrow.dev";
/// The endpoint-slice controller's value for [`SLICE_MANAGED_BY`].
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// The mirroring controller's value for [`SLICE_MANAGED_BY`] (slices it
/// makes from the legacy `Endpoints` of a Service without a selector).
pub const MIRROR_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// How long after burrow's EndpointSlice goes (or after the controllers'
/// go, when a reroute starts) kube-proxy may still send new connections
/// the old way: its iptables proxier syncs at most once per
/// `--iptables-min-sync-period` (1 s by default) after a change is seen.
/// The shadow Service and the gateway's listeners outlive burrow's slice
/// by this much, and `reroute` returns this much after the controllers'
/// slices are gone.
pub const KUBE_PROXY_LAG: std::time::Duration = std::time::Duration::from_millis(1500);
/// The longest a restore waits for the endpoint-slice controller to list
/// the pods again before burrow's slice goes anyway.
pub const CONTROLLER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the annotation records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    /// `spec.selector` as it was.
    pub original_selector: BTreeMap<String, String>,
    /// Who rerouted first (laptop name), for people reading the object.
    pub by: String,
}

/// The shadow Service of `service` (a name checked by
/// [`names::check_rerouted_service`]).
pub fn shadow_name(service: &str) -> String {
    names::shadow_name(service)
}

/// burrow's EndpointSlice for `service`.
pub fn slice_name(service: &str) -> String {
    names::slice_name(service)
}

/// A laptop's reroute record on a Service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The laptop's WireGuard public key, base64.
    pub key: String,
    /// Who (user and host), for people reading the object.
    pub laptop: String,
}

/// The id of a key in its record's annotation name: 20 hex digits.
pub fn record_id(key: &[u8; 32]) -> String {
    key[..10].iter().map(|b| format!("{b:02x}")).collect()
}

/// The annotation holding `key`'s record.
pub fn record_annotation(key: &[u8; 32]) -> String {
    format!("{RECORD_PREFIX}{}", record_id(key))
}

/// `key`'s record on `svc`, if there is one naming exactly that key.
pub fn record_of(svc: &Service, key: &[u8; 32]) -> Option<Record> {
    let text = svc
        .metadata
        .annotations
        .as_ref()?
        .get(&record_annotation(key))?;
    let record: Record = serde_json::from_str(text).ok()?;
    let named = base64::engine::general_purpose::STANDARD
        .decode(&record.key)
        .ok()?;
    (named.as_slice() == key.as_slice()).then_some(record)
}

/// The JSON patch that writes `key`'s record on `svc` (guarded by the
/// resourceVersion read, so a concurrent change makes it fail, not vanish).
pub fn record_patch(svc: &Service, key: &[u8; 32], laptop: &str) -> Result<Value, String> {
    let record = Record {
        key: base64::engine::general_purpose::STANDARD.encode(key),
        laptop: laptop.to_string(),
    };
    let text = serde_json::to_string(&record).map_err(|e| e.to_string())?;
    let mut ops = Vec::new();
    if let Some(rv) = &svc.metadata.resource_version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
    }
    if svc.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_key(&record_annotation(key))), "value": text}));
    Ok(Value::Array(ops))
}

/// The annotations of `svc` burrow wrote: the saved selector and every
/// laptop's record.
fn burrow_annotations(svc: &Service) -> Vec<(String, String)> {
    svc.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| *k == ANNOTATION || k.starts_with(RECORD_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Ops removing `keys` (each `test`ed against its value first, so what
/// another writer changed meanwhile is never removed), and the whole
/// annotations map when nothing else would be left in it.
fn remove_annotation_ops(svc: &Service, keys: &[(String, String)]) -> Vec<Value> {
    let mut ops: Vec<Value> = keys
        .iter()
        .map(|(k, v)| json!({"op": "test", "path": format!("/metadata/annotations/{}", pointer_key(k)), "value": v}))
        .collect();
    let total = svc.metadata.annotations.as_ref().map_or(0, BTreeMap::len);
    if total == keys.len() {
        ops.push(json!({"op": "remove", "path": "/metadata/annotations"}));
    } else {
        ops.extend(keys.iter().map(
            |(k, _)| json!({"op": "remove", "path": format!("/metadata/annotations/{}", pointer_key(k))}),
        ));
    }
    ops
}

/// The JSON patch that removes `key`'s record from `svc`, if it has one.
pub fn remove_record_patch(svc: &Service, key: &[u8; 32]) -> Option<Value> {
    let name = record_annotation(key);
    let value = svc.metadata.annotations.as_ref()?.get(&name)?.clone();
    Some(Value::Array(remove_annotation_ops(svc, &[(name, value)])))
}

fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The saved record on `svc`, if it is rerouted.
pub fn saved(svc: &Service) -> Option<(String, Saved)> {
    let text = svc.metadata.annotations.as_ref()?.get(ANNOTATION)?;
    let saved = serde_json::from_str(text).ok()?;
    Some((text.clone(), saved))
}

/// The JSON patch that reroutes `svc`: saves the selector in the
/// annotation and removes it, guarded by a `test` that the selector is
/// still the one saved (a concurrent reroute fails instead of saving an
/// empty selector).
pub fn reroute_patch(svc: &Service, by: &str) -> Result<(Value, Saved), String> {
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "it has no selector (its endpoints are managed by hand)".to_string())?;
    let saved = Saved {
        original_selector: selector.clone(),
        by: by.to_string(),
    };
    let text = serde_json::to_string(&saved).map_err(|e| e.to_string())?;
    let mut ops = vec![json!({"op": "test", "path": "/spec/selector", "value": selector})];
    if svc.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", pointer_key(ANNOTATION)), "value": text}));
    ops.push(json!({"op": "remove", "path": "/spec/selector"}));
    Ok((Value::Array(ops), saved))
}

/// The JSON patch that restores a rerouted Service whose annotation text is
/// `text`: the selector back, burrow's annotations (saved selector and
/// every laptop's record) gone, and the annotations map too when burrow's
/// were all it held, as before the reroute... unless it was an empty map,
/// which the API server does not keep apart from none. Guarded by the
/// resourceVersion read, so a change made meanwhile (someone putting a
/// selector back) makes it fail instead of being overwritten.
///
/// When `svc` already has a selector again (someone else put one back
/// while it was rerouted), that newer selector stays: only burrow's
/// annotations go.
pub fn restore_patch(svc: &Service, text: &str, saved: &Saved) -> Value {
    let key = pointer_key(ANNOTATION);
    let mut ops = Vec::new();
    if let Some(rv) = &svc.metadata.resource_version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
    }
    ops.push(json!({"op": "test", "path": format!("/metadata/annotations/{key}"), "value": text}));
    if newer_selector(svc).is_none() {
        ops.push(json!({"op": "add", "path": "/spec/selector", "value": saved.original_selector}));
    }
    let ours: Vec<(String, String)> = burrow_annotations(svc)
        .into_iter()
        .filter(|(k, _)| k != ANNOTATION)
        .chain(std::iter::once((ANNOTATION.to_string(), text.to_string())))
        .collect();
    ops.extend(remove_annotation_ops(svc, &ours));
    Value::Array(ops)
}

/// The selector of a rerouted `svc`, when someone else put one back
/// while it was rerouted (burrow's reroute removes it).
pub fn newer_selector(svc: &Service) -> Option<BTreeMap<String, String>> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .filter(|s| !s.is_empty())
}

/// `app=x,tier=y`.
pub fn describe_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The selector was put back.
    Restored,
    /// Someone else had put a selector back while the Service was
    /// rerouted: it was left in place (described), only burrow's
    /// annotations went.
    KeptNewerSelector(String),
    /// The Service was not rerouted (already restored): only leftovers were
    /// removed.
    NotRerouted,
    /// The Service is gone; its leftovers were removed.
    Gone,
}

fn bad_name(message: String) -> kube::Error {
    kube::Error::Api(Box::new(
        kube::core::Status::failure(&message, "Invalid").with_code(422),
    ))
}

/// Checks a namespace and Service name before they reach a URL.
pub fn check_names(namespace: &str, name: &str) -> Result<(), kube::Error> {
    names::check_namespace(namespace).map_err(bad_name)?;
    names::check_service(name).map_err(bad_name)
}

/// Applies a JSON patch built by this module.
async fn json_patch(services: &Api<Service>, name: &str, patch: Value) -> Result<(), kube::Error> {
    let patch: kube_json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| kube::Error::Service(Box::new(e)))?;
    services
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map(drop)
}

/// Restores `namespace/name` (see the module doc); idempotent.
///
/// Make-before-break: the selector comes back first while burrow's
/// EndpointSlice still points at the gateway (whose listener hands
/// everything to the shadow Service, i.e. the same pods); burrow's slice
/// goes only once the endpoint-slice controller lists the pods again
/// ([`await_controller`]), and the shadow only [`KUBE_PROXY_LAG`] after
/// that, so that no caller ever meets a Service without a ready endpoint.
/// A Service rerouted again meanwhile is left as it is.
pub async fn restore(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Restored, kube::Error> {
    check_names(namespace, name)?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let mut outcome = Restored::Gone;
    let mut uid = None;
    let mut restored = false;
    for _attempt in 0..5 {
        let Some(svc) = services.get_opt(name).await? else {
            outcome = Restored::Gone;
            uid = None;
            break;
        };
        uid = svc.metadata.uid.clone();
        let Some((text, saved)) = saved(&svc) else {
            outcome = Restored::NotRerouted;
            // Records a crash left behind go too.
            let records: Vec<(String, String)> = burrow_annotations(&svc);
            if !records.is_empty() {
                match json_patch(
                    &services,
                    name,
                    Value::Array(remove_annotation_ops(&svc, &records)),
                )
                .await
                {
                    Ok(()) => {}
                    Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => continue,
                    Err(e) => return Err(e),
                }
            }
            break;
        };
        let kept = newer_selector(&svc).map(|s| describe_selector(&s));
        match json_patch(&services, name, restore_patch(&svc, &text, &saved)).await {
            Ok(()) => {
                restored = true;
                outcome = match kept {
                    Some(k) => {
                        tracing::warn!(
                            namespace,
                            service = name,
                            selector = %k,
                            "someone else put a selector back while the Service was rerouted: left in place"
                        );
                        Restored::KeptNewerSelector(k)
                    }
                    None => Restored::Restored,
                };
                break;
            }
            // Changed under us (a `test` failed): look again.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                tracing::debug!(
                    namespace,
                    service = name,
                    "restore patch refused ({}): reading again",
                    s.message
                );
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    if uid.is_some() && !restored && outcome != Restored::NotRerouted {
        return Err(kube::Error::Api(Box::new(
            kube::core::Status::failure(
                &format!("Service {namespace}/{name} kept changing while burrow restored it"),
                "Conflict",
            )
            .with_code(409),
        )));
    }
    if uid.is_some() {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let ours = slices.get_opt(&slice_name(name)).await?;
        if ours.is_some() {
            // Callers may still be sent to the gateway: keep them served
            // until the pods are listed again.
            // A newer selector than burrow's may select other pods than
            // the shadow: then only a slice of the controller's is awaited.
            let like_shadow = !matches!(outcome, Restored::KeptNewerSelector(_));
            await_controller(client, namespace, name, like_shadow).await;
            if rerouted_again(&services, name).await? {
                return Ok(outcome);
            }
            delete_if_ours(&slices, &slice_name(name), name, uid.as_deref()).await?;
            tokio::time::sleep(KUBE_PROXY_LAG).await;
            if rerouted_again(&services, name).await? {
                return Ok(outcome);
            }
        }
    }
    remove_leftovers(client, namespace, name, uid.as_deref()).await?;
    Ok(outcome)
}

/// Whether `name` carries burrow's reroute annotation again (a laptop
/// rerouted it while a restore waited): its slice and shadow are needed.
async fn rerouted_again(services: &Api<Service>, name: &str) -> Result<bool, kube::Error> {
    Ok(services
        .get_opt(name)
        .await?
        .is_some_and(|s| saved(&s).is_some()))
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn ready_endpoints(slice: &EndpointSlice) -> usize {
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .count()
}

/// Waits (at most [`CONTROLLER_WAIT`]) until the endpoint-slice
/// controller lists for Service `name` as many ready endpoints as it
/// lists for its shadow (same selector, same pods; when `like_shadow`), or,
/// when the shadow has none or the selector is not burrow's, until it has
/// made a slice at all.
pub async fn await_controller(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    like_shadow: bool,
) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let of = |svc: &str| {
        ListParams::default().labels(&format!(
            "{SERVICE_NAME_LABEL}={svc},{SLICE_MANAGED_BY}={SLICE_CONTROLLER}"
        ))
    };
    let shadow = shadow_name(name);
    let deadline = tokio::time::Instant::now() + CONTROLLER_WAIT;
    loop {
        let listed = async {
            let theirs = slices.list(&of(name)).await.ok()?;
            let want = if like_shadow {
                slices
                    .list(&of(&shadow))
                    .await
                    .ok()
                    .map_or(0, |l| l.items.iter().map(ready_endpoints).sum::<usize>())
            } else {
                0
            };
            let have: usize = theirs.items.iter().map(ready_endpoints).sum();
            Some(!theirs.items.is_empty() && have >= want)
        };
        if listed.await == Some(true) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                namespace,
                service = name,
                "the endpoint controller did not list the pods again within {}s; giving the Service back anyway",
                CONTROLLER_WAIT.as_secs()
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits (at most [`CONTROLLER_WAIT`]) until the endpoint-slice
/// controller lists for the shadow of `name` as many ready endpoints as
/// for `name` itself (same selector), then [`KUBE_PROXY_LAG`]: a shadow
/// made a moment ago is not routable before kube-proxy has its rules, and
/// the gateway hands callers to it as soon as burrow's slice is in place.
pub async fn await_shadow(client: &kube::Client, namespace: &str, name: &str) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let ready = |svc: String| {
        let slices = slices.clone();
        async move {
            let lp = ListParams::default().labels(&format!(
                "{SERVICE_NAME_LABEL}={svc},{SLICE_MANAGED_BY}={SLICE_CONTROLLER}"
            ));
            slices.list(&lp).await.ok().map(|l| {
                (
                    !l.items.is_empty(),
                    l.items.iter().map(ready_endpoints).sum::<usize>(),
                )
            })
        }
    };
    let want = ready(name.to_string()).await.map_or(0, |(_, n)| n);
    let deadline = tokio::time::Instant::now() + CONTROLLER_WAIT;
    loop {
        if let Some((any, have)) = ready(shadow_name(name)).await
            && any
            && have >= want
        {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                namespace,
                service = name,
                "the endpoint controller did not list the shadow's pods within {}s",
                CONTROLLER_WAIT.as_secs()
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(KUBE_PROXY_LAG).await;
}

/// While `namespace/name` is rerouted (no selector, burrow's annotation),
/// removes every other source of endpoints for it: EndpointSlices that are
/// not burrow's (the endpoint-slice controller's, left behind or written
/// late by an in-flight sync; the mirroring controller's) and the legacy
/// `Endpoints` object (left by the endpoints controller; the mirroring
/// controller would mirror it). These are objects the controllers derive
/// from the Service and make again when the selector comes back; burrow
/// deletes them by uid, and only while the Service is rerouted. Returns
/// what it removed.
pub async fn remove_strays(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<String>, kube::Error> {
    check_names(namespace, name)?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let Some(svc) = services.get_opt(name).await? else {
        return Ok(Vec::new());
    };
    if saved(&svc).is_none() || newer_selector(&svc).is_some() {
        return Ok(Vec::new());
    }
    let uid = svc.metadata.uid.clone();
    let mut removed = Vec::new();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}"));
    for slice in slices.list(&lp).await?.items {
        let meta = &slice.metadata;
        if label(meta, SLICE_MANAGED_BY) == Some(SLICE_MANAGER)
            && is_ours(meta, name, uid.as_deref())
        {
            continue;
        }
        let Some(n) = meta.name.clone() else { continue };
        if delete_by_uid(&slices, &n, meta.uid.clone()).await? {
            removed.push(format!(
                "EndpointSlice {n} (managed by {})",
                label(meta, SLICE_MANAGED_BY).unwrap_or("unknown")
            ));
        }
    }
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> =
        Api::namespaced(client.clone(), namespace);
    if let Some(ep) = endpoints.get_opt(name).await?
        && delete_by_uid(&endpoints, name, ep.metadata.uid.clone()).await?
    {
        removed.push(format!("Endpoints {name}"));
    }
    Ok(removed)
}

/// Deletes `object` if it still has `uid`; whether it did.
async fn delete_by_uid<K>(
    api: &Api<K>,
    object: &str,
    uid: Option<String>,
) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(object, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `key`'s record from `namespace/name` (its laptop no longer
/// reroutes it); nothing when there is none.
pub async fn remove_record(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &[u8; 32],
) -> Result<(), kube::Error> {
    check_names(namespace, name)?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    for _attempt in 0..3 {
        let Some(svc) = services.get_opt(name).await? else {
            return Ok(());
        };
        let Some(patch) = remove_record_patch(&svc, key) else {
            return Ok(());
        };
        match json_patch(&services, name, patch).await {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => continue,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `meta` is burrow's object for Service `name`: burrow's labels
/// naming that Service, and (when the Service's uid is known) owned by it.
fn is_ours(meta: &ObjectMeta, name: &str, service_uid: Option<&str>) -> bool {
    let labels = meta.labels.as_ref();
    let labelled = labels.and_then(|l| l.get(REROUTE_OF)).map(String::as_str) == Some(name)
        && labels
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .map(String::as_str)
            == Some(MANAGED_BY);
    let owned =
        meta.owner_references.iter().flatten().any(|o| {
            o.kind == "Service" && o.name == name && service_uid.is_none_or(|u| o.uid == u)
        });
    labelled && owned
}

/// Deletes `object` from `api` if it is burrow's for Service `name`, with
/// its uid as a precondition.
async fn delete_if_ours<K>(
    api: &Api<K>,
    object: &str,
    name: &str,
    service_uid: Option<&str>,
) -> Result<(), kube::Error>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Metadata<Ty = ObjectMeta>,
{
    let Some(found) = api.get_opt(object).await? else {
        return Ok(());
    };
    let meta = found.metadata();
    if !is_ours(meta, name, service_uid) {
        tracing::warn!(
            object,
            service = name,
            "not burrow's (labels or owner differ): left alone"
        );
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: meta.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(object, &dp).await {
        Ok(_) => Ok(()),
        // Gone meanwhile, or replaced by another object of that name.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes burrow's EndpointSlice and shadow Service of `name`, if they
/// are burrow's for it (see [`is_ours`]). `service_uid`: the Service's uid
/// when it still exists.
pub async fn remove_leftovers(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    service_uid: Option<&str>,
) -> Result<(), kube::Error> {
    check_names(namespace, name)?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    delete_if_ours(&slices, &slice_name(name), name, service_uid).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    delete_if_ours(&services, &shadow_name(name), name, service_uid).await?;
    Ok(())
}

/// The ClusterIP of `svc`'s shadow Service, as the gateway itself finds it
/// (never a value a client sent): None when there is no shadow that is
/// burrow's for this Service.
pub async fn shadow_ip(
    client: &kube::Client,
    svc: &Service,
) -> Result<Option<IpAddr>, kube::Error> {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    check_names(&namespace, &name)?;
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let Some(shadow) = services.get_opt(&shadow_name(&name)).await? else {
        return Ok(None);
    };
    if !is_ours(&shadow.metadata, &name, svc.metadata.uid.as_deref()) {
        return Ok(None);
    }
    Ok(shadow
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok()))
}

/// Every rerouted Service (namespace, name) the client can list, plus every
/// Service with burrow leftovers (shadow or slice) but no reroute.
pub async fn find_rerouted(client: &kube::Client) -> Result<Vec<(String, String)>, kube::Error> {
    let services: Api<Service> = Api::all(client.clone());
    let mut out = Vec::new();
    for svc in services.list(&ListParams::default()).await?.items {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let found = if saved(&svc).is_some() || !burrow_annotations(&svc).is_empty() {
            svc.metadata.name.clone()
        } else {
            svc.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REROUTE_OF))
                .cloned()
        };
        // A label value is anyone's text: only names that are names.
        if let Some(name) = found
            && check_names(&ns, &name).is_ok()
        {
            out.push((ns, name));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Restores everything [`find_rerouted`] finds; returns what it restored
/// and what failed.
pub async fn restore_all(
    client: &kube::Client,
) -> Result<Vec<(String, String, Result<Restored, String>)>, kube::Error> {
    let mut out = Vec::new();
    for (ns, name) in find_rerouted(client).await? {
        let r = restore(client, &ns, &name).await.map_err(|e| e.to_string());
        out.push((ns, name, r));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(annotations: Option<Value>) -> Service {
        let mut v = json!({
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}
        });
        if let Some(a) = annotations {
            v["metadata"]["annotations"] = a;
        }
        serde_json::from_value(v).expect("service")
    }

    fn apply(svc: &Service, patch: Value) -> Service {
        let mut doc = serde_json::to_value(svc).expect("json");
        let patch: kube_json_patch::Patch = serde_json::from_value(patch).expect("patch");
        kube_json_patch::patch(&mut doc, &patch).expect("applies");
        serde_json::from_value(doc).expect("service")
    }

    #[test]
    fn reroute_then_restore_is_the_identity() {
        for annotations in [None, Some(json!({"team": "a"}))] {
            let before = svc(annotations);
            let (patch, saved) = reroute_patch(&before, "alice@laptop").expect("patch");
            let rerouted = apply(&before, patch);
            assert!(
                rerouted
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_none()
            );
            let (text, found) = super::saved(&rerouted).expect("annotated");
            assert_eq!(found, saved);
            let after = apply(&rerouted, restore_patch(&rerouted, &text, &found));
            assert_eq!(
                serde_json::to_value(&after).expect("json"),
                serde_json::to_value(&before).expect("json")
            );
        }
    }

    #[test]
    fn a_selector_put_back_by_someone_else_is_kept() {
        let before = svc(Some(json!({"team": "a"})));
        let (patch, _) = reroute_patch(&before, "alice@laptop").expect("patch");
        let mut rerouted = apply(&before, patch);
        rerouted.metadata.resource_version = Some("42".into());
        if let Some(spec) = rerouted.spec.as_mut() {
            spec.selector = Some(BTreeMap::from([
                ("app".to_string(), "echo".to_string()),
                ("track".to_string(), "stable".to_string()),
            ]));
        }
        let (text, found) = super::saved(&rerouted).expect("annotated");
        let after = apply(&rerouted, restore_patch(&rerouted, &text, &found));
        assert_eq!(
            after
                .spec
                .and_then(|s| s.selector)
                .map(|s| describe_selector(&s)),
            Some("app=echo,track=stable".to_string())
        );
        assert_eq!(
            after.metadata.annotations,
            Some(BTreeMap::from([("team".to_string(), "a".to_string())]))
        );
        // A change made after the read makes the patch fail, not vanish.
        let mut moved = rerouted.clone();
        moved.metadata.resource_version = Some("43".into());
        let mut doc = serde_json::to_value(&moved).expect("json");
        let patch: kube_json_patch::Patch =
            serde_json::from_value(restore_patch(&rerouted, &text, &found)).expect("patch");
        assert!(kube_json_patch::patch(&mut doc, &patch).is_err());
    }

    #[test]
    fn a_service_without_selector_is_refused() {
        let mut s = svc(None);
        if let Some(spec) = s.spec.as_mut() {
            spec.selector = None;
        }
        assert!(reroute_patch(&s, "x").is_err());
    }

    #[test]
    fn records_come_and_go_and_restore_removes_them_all() {
        for annotations in [None, Some(json!({"team": "a"}))] {
            let before = svc(annotations);
            let (k1, k2) = ([1u8; 32], [2u8; 32]);
            let with1 = apply(
                &before,
                record_patch(&before, &k1, "alice@a").expect("record"),
            );
            assert_eq!(
                record_of(&with1, &k1).map(|r| r.laptop),
                Some("alice@a".to_string())
            );
            assert!(record_of(&with1, &k2).is_none());
            // A record naming another key under k1's annotation is not k1's.
            let mut forged = with1.clone();
            if let Some(a) = forged.metadata.annotations.as_mut() {
                a.insert(
                    record_annotation(&k2),
                    serde_json::to_string(&Record {
                        key: base64::engine::general_purpose::STANDARD.encode(k1),
                        laptop: "x".into(),
                    })
                    .expect("json"),
                );
            }
            assert!(record_of(&forged, &k2).is_none());
            // Removing the only record gives the Service back as it was.
            let back = apply(&with1, remove_record_patch(&with1, &k1).expect("has one"));
            assert_eq!(
                serde_json::to_value(&back).expect("json"),
                serde_json::to_value(&before).expect("json")
            );
            // Rerouted with two records: restore removes all of burrow's.
            let with2 = apply(&with1, record_patch(&with1, &k2, "bob@b").expect("record"));
            let (patch, _) = reroute_patch(&with2, "alice@a").expect("patch");
            let rerouted = apply(&with2, patch);
            let (text, found) = super::saved(&rerouted).expect("annotated");
            let after = apply(&rerouted, restore_patch(&rerouted, &text, &found));
            assert_eq!(
                serde_json::to_value(&after).expect("json"),
                serde_json::to_value(&before).expect("json")
            );
        }
    }

    #[test]
    fn hostile_names_never_reach_a_request() {
        for (ns, name) in [
            ("default", "echo#"),
            ("kube-system", "kube-dns#"),
            ("a/b", "x"),
            ("default", "x?y"),
        ] {
            assert!(check_names(ns, name).is_err(), "{ns}/{name}");
        }
        assert!(check_names("default", "echo").is_ok());
    }
}
