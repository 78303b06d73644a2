//! A rerouted Service in Kubernetes: every call burrow makes on it. Used by
//! the client (which reroutes and restores with the user's credentials)
//! and the gateway (which restores with its own when a lease expires and
//! at its start). What is written (annotation, record, patches) is
//! `burrow_api::record`: pure functions of the Service object.
//!
//! Restore puts the selector back and removes the annotations in one JSON
//! patch, then deletes the EndpointSlice and the shadow, make-before-break
//! ([`restore`]). Every step tolerates "already done", so restore is
//! idempotent and can be repeated after a crash at any point.
//!
//! Names are checked (`burrow_api::names`) before any request is built
//! (kube does not escape them), and burrow's own objects are deleted only
//! when they carry burrow's labels for that very Service and are owned by
//! it, with a uid precondition: a look-alike made by someone else is never
//! deleted.

use std::net::IpAddr;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde_json::Value;

use burrow_api::names;
use burrow_api::record::*;

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
/// for `name` itself (same selector); returns how many ready endpoints the
/// shadow's slices list then, or None when the controller had not listed
/// them in time. A shadow made a moment ago is still not routable before
/// kube-proxy has its rules (see [`crate::reroute::Shadow::fresh`]).
pub async fn await_shadow(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    shadow_uid: Option<&str>,
) -> Option<usize> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    // Slices of `svc` made by the endpoint-slice controller; with `owner`,
    // only those of that very Service object: a shadow deleted a moment ago
    // (a reroute stopped and started again) leaves slices with the same
    // name label until the controller or the garbage collector removes
    // them, and they say nothing about the new shadow's ClusterIP.
    let ready = |svc: String, owner: Option<String>| {
        let slices = slices.clone();
        async move {
            let lp = ListParams::default().labels(&format!(
                "{SERVICE_NAME_LABEL}={svc},{SLICE_MANAGED_BY}={SLICE_CONTROLLER}"
            ));
            slices.list(&lp).await.ok().map(|l| {
                let mine: Vec<&EndpointSlice> = l
                    .items
                    .iter()
                    .filter(|s| {
                        owner.as_deref().is_none_or(|uid| {
                            s.metadata
                                .owner_references
                                .iter()
                                .flatten()
                                .any(|o| o.uid == uid)
                        })
                    })
                    .collect();
                (
                    !mine.is_empty(),
                    mine.iter().map(|s| ready_endpoints(s)).sum::<usize>(),
                )
            })
        }
    };
    let want = ready(name.to_string(), None).await.map_or(0, |(_, n)| n);
    let owner = shadow_uid.map(str::to_string);
    let deadline = tokio::time::Instant::now() + CONTROLLER_WAIT;
    loop {
        let seen = ready(shadow_name(name), owner.clone()).await;
        if let Some((any, have)) = seen
            && any
            && have >= want
        {
            return Some(have);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                namespace,
                service = name,
                "the endpoint controller did not list the shadow's pods within {}s",
                CONTROLLER_WAIT.as_secs()
            );
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
    key: &burrow_api::WgKey,
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
