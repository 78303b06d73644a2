//! The reroute record: what burrow writes on a user's Service, as pure
//! functions of the Service object (no Kubernetes calls; `burrow-deploy`'s
//! `service` makes them).
//!
//! A reroute changes one field of the user's Service: `spec.selector` is
//! removed (a Service selector only selects pods of its own namespace, and
//! the gateway lives in another one), and the original selector is saved in
//! the annotation [`ANNOTATION`] in the same patch ([`reroute_patch`]).
//! burrow's own EndpointSlice ([`slice_name`]) then points every port of
//! the Service at the gateway pod's listeners, and a shadow Service
//! ([`shadow_name`]) with the original selector and ports carries the
//! traffic that must still reach the original pods. [`restore_patch`] puts
//! the selector back and removes burrow's annotations in one JSON patch
//! (guarded by a `test` of the annotation and the resourceVersion, so it
//! never undoes a newer reroute or overwrites a newer selector).
//!
//! Each laptop that reroutes a Service also leaves its **reroute record**
//! on it ([`RECORD_PREFIX`]`<key id>`: its public key and name), written
//! with the user's own credentials before it asks the gateway: the gateway
//! acts on a Service only for a laptop whose record it carries, so a laptop
//! can never make the gateway touch a Service its user could not patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{WgKey, names};

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
    /// The laptop's WireGuard public key.
    pub key: WgKey,
    /// Who (user and host), for people reading the object.
    pub laptop: String,
}

/// The id of a key in its record's annotation name: 20 hex digits.
pub fn record_id(key: &WgKey) -> String {
    key.as_bytes()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The annotation holding `key`'s record.
pub fn record_annotation(key: &WgKey) -> String {
    format!("{RECORD_PREFIX}{}", record_id(key))
}

/// `key`'s record on `svc`, if there is one naming exactly that key.
pub fn record_of(svc: &Service, key: &WgKey) -> Option<Record> {
    let text = svc
        .metadata
        .annotations
        .as_ref()?
        .get(&record_annotation(key))?;
    let record: Record = serde_json::from_str(text).ok()?;
    (record.key == *key).then_some(record)
}

/// The JSON patch that writes `key`'s record on `svc` (guarded by the
/// resourceVersion read, so a concurrent change makes it fail, not vanish).
pub fn record_patch(svc: &Service, key: &WgKey, laptop: &str) -> Result<Value, String> {
    let record = Record {
        key: *key,
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
pub fn burrow_annotations(svc: &Service) -> Vec<(String, String)> {
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
pub fn remove_annotation_ops(svc: &Service, keys: &[(String, String)]) -> Vec<Value> {
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
pub fn remove_record_patch(svc: &Service, key: &WgKey) -> Option<Value> {
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
            let (k1, k2) = (WgKey::from([1u8; 32]), WgKey::from([2u8; 32]));
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
                        key: k1,
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
}
