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

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The annotation holding the original selector ([`Saved`], JSON).
pub const ANNOTATION: &str = "burrow.dev/reroute";
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

/// What the annotation records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Saved {
    /// `spec.selector` as it was.
    pub original_selector: BTreeMap<String, String>,
    /// Who rerouted first (laptop name), for people reading the object.
    pub by: String,
}

/// Names are DNS labels: at most 63 characters.
fn label(base: &str, suffix: &str) -> String {
    let keep = 63usize.saturating_sub(suffix.len());
    let base: String = base.chars().take(keep).collect();
    format!("{}{suffix}", base.trim_end_matches('-'))
}

/// The shadow Service of `service`.
pub fn shadow_name(service: &str) -> String {
    label(service, "-burrow-shadow")
}

/// burrow's EndpointSlice for `service`.
pub fn slice_name(service: &str) -> String {
    label(service, "-burrow")
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
/// `text`: the selector back, the annotation gone (and the annotations map
/// too when burrow's was the only one, as before the reroute... unless it
/// was an empty map, which the API server does not keep apart from none).
pub fn restore_patch(svc: &Service, text: &str, saved: &Saved) -> Value {
    let key = pointer_key(ANNOTATION);
    let only_ours = svc
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.len() == 1);
    let mut ops = vec![
        json!({"op": "test", "path": format!("/metadata/annotations/{key}"), "value": text}),
        json!({"op": "add", "path": "/spec/selector", "value": saved.original_selector}),
    ];
    if only_ours {
        ops.push(json!({"op": "remove", "path": "/metadata/annotations"}));
    } else {
        ops.push(json!({"op": "remove", "path": format!("/metadata/annotations/{key}")}));
    }
    Value::Array(ops)
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The selector was put back.
    Restored,
    /// The Service was not rerouted (already restored): only leftovers were
    /// removed.
    NotRerouted,
    /// The Service is gone; its leftovers were removed.
    Gone,
}

/// Restores `namespace/name` (see the module doc); idempotent.
pub async fn restore(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Restored, kube::Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let mut outcome = Restored::Gone;
    for _attempt in 0..3 {
        let Some(svc) = services.get_opt(name).await? else {
            outcome = Restored::Gone;
            break;
        };
        let Some((text, saved)) = saved(&svc) else {
            outcome = Restored::NotRerouted;
            break;
        };
        let patch = restore_patch(&svc, &text, &saved);
        let patch: kube_json_patch::Patch =
            serde_json::from_value(patch).map_err(|e| kube::Error::Service(Box::new(e)))?;
        match services
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => {
                outcome = Restored::Restored;
                break;
            }
            // The annotation changed under us (a `test` failed): look again.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    remove_leftovers(client, namespace, name).await?;
    Ok(outcome)
}

/// Deletes burrow's EndpointSlice and shadow Service of `name`.
pub async fn remove_leftovers(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    ignore_404(
        slices
            .delete(&slice_name(name), &DeleteParams::default())
            .await,
    )?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    ignore_404(
        services
            .delete(&shadow_name(name), &DeleteParams::default())
            .await,
    )?;
    Ok(())
}

fn ignore_404<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every rerouted Service (namespace, name) the client can list, plus every
/// Service with burrow leftovers (shadow or slice) but no reroute.
pub async fn find_rerouted(client: &kube::Client) -> Result<Vec<(String, String)>, kube::Error> {
    let services: Api<Service> = Api::all(client.clone());
    let mut out = Vec::new();
    for svc in services.list(&ListParams::default()).await?.items {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        if saved(&svc).is_some() {
            out.push((ns, svc.metadata.name.clone().unwrap_or_default()));
        } else if let Some(of) = svc.metadata.labels.as_ref().and_then(|l| l.get(REROUTE_OF)) {
            out.push((ns, of.clone()));
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
    fn a_service_without_selector_is_refused() {
        let mut s = svc(None);
        if let Some(spec) = s.spec.as_mut() {
            spec.selector = None;
        }
        assert!(reroute_patch(&s, "x").is_err());
    }

    #[test]
    fn names_are_dns_labels() {
        let long = "a".repeat(70);
        assert!(shadow_name(&long).len() <= 63);
        assert!(slice_name(&long).len() <= 63);
        assert_eq!(shadow_name("echo"), "echo-burrow-shadow");
    }
}
