//! The four patch types: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902), strategic merge patch (with the patch strategies of the
//! built-in types) and server-side apply (merged like a strategic patch).

use serde_json::{Map, Value};

use crate::error::ApiError;

/// The patch types, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml"
            | "application/apply-patch+json"
            | "application/apply-patch+cbor" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

/// Applies a (non-apply) patch body to `current`.
pub fn apply_patch(current: &Value, kind: PatchType, body: &[u8]) -> Result<Value, ApiError> {
    match kind {
        PatchType::Merge => {
            let patch: Value = parse_json(body)?;
            let mut out = current.clone();
            json_patch::merge(&mut out, &patch);
            Ok(out)
        }
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            let mut out = current.clone();
            json_patch::patch(&mut out, &patch).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            Ok(out)
        }
        PatchType::Strategic => {
            let patch: Value = parse_json(body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "unable to find api field in struct for the patch: the patch must be a JSON object",
                ));
            }
            Ok(strategic_merge(current, &patch))
        }
        PatchType::Apply => {
            let applied = parse_apply(body)?;
            Ok(strategic_merge(current, &applied))
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Parses an apply body (YAML or JSON).
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    }
    Ok(v)
}

/// How a list field merges, by its path of field names.
enum ListStrategy {
    /// Merge maps by this key.
    Key(&'static str),
    /// Merge primitives as a set.
    Set,
    /// Replace the list.
    Atomic,
}

fn list_strategy(path: &[String]) -> ListStrategy {
    let field = path.last().map(String::as_str).unwrap_or("");
    let parent = if path.len() >= 2 {
        path[path.len() - 2].as_str()
    } else {
        ""
    };
    let in_container = path.iter().any(|p| {
        matches!(
            p.as_str(),
            "containers" | "initContainers" | "ephemeralContainers"
        )
    });
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "containerStatuses"
        | "initContainerStatuses" => ListStrategy::Key("name"),
        "volumeMounts" => ListStrategy::Key("mountPath"),
        "volumeDevices" => ListStrategy::Key("devicePath"),
        "ports" if in_container => ListStrategy::Key("containerPort"),
        "ports" if parent == "spec" => ListStrategy::Key("port"),
        "ownerReferences" => ListStrategy::Key("uid"),
        "conditions" => ListStrategy::Key("type"),
        "addresses" if parent == "status" => ListStrategy::Key("type"),
        "hostAliases" => ListStrategy::Key("ip"),
        "topologySpreadConstraints" => ListStrategy::Key("topologyKey"),
        "podIPs" | "hostIPs" => ListStrategy::Key("ip"),
        "finalizers" if parent == "metadata" => ListStrategy::Set,
        _ => ListStrategy::Atomic,
    }
}

/// Strategic merge of `patch` into `original`.
pub fn strategic_merge(original: &Value, patch: &Value) -> Value {
    let mut path = Vec::new();
    merge_value(Some(original), patch, &mut path).unwrap_or(Value::Null)
}

/// Returns `None` when the result is deleted.
fn merge_value(original: Option<&Value>, patch: &Value, path: &mut Vec<String>) -> Option<Value> {
    match patch {
        Value::Object(p) => {
            match p.get("$patch").and_then(Value::as_str) {
                Some("delete") => return None,
                Some("replace") => {
                    let mut m = p.clone();
                    m.remove("$patch");
                    return Some(clean(&Value::Object(m)));
                }
                _ => {}
            }
            let empty = Map::new();
            let orig = match original {
                Some(Value::Object(o)) => o,
                _ => &empty,
            };
            let mut out = orig.clone();
            for (k, v) in p {
                if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
                    continue;
                }
                if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
                    if let (Some(Value::Array(list)), Some(del)) =
                        (out.get_mut(field), v.as_array())
                    {
                        list.retain(|x| !del.contains(x));
                    }
                    continue;
                }
                if v.is_null() {
                    out.remove(k);
                    continue;
                }
                path.push(k.clone());
                let merged = match v {
                    Value::Array(items) => merge_list(out.get(k), items, path),
                    _ => merge_value(out.get(k), v, path),
                };
                path.pop();
                match merged {
                    Some(m) => {
                        out.insert(k.clone(), m);
                    }
                    None => {
                        out.remove(k);
                    }
                }
            }
            if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
                out.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => merge_list(original, items, path),
        other => Some(other.clone()),
    }
}

/// Removes directive keys from a value being set wholesale.
fn clean(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), clean(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|x| {
                    !(x.get("$patch").is_some() && x.as_object().is_some_and(|m| m.len() == 1))
                })
                .map(clean)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_list(original: Option<&Value>, items: &[Value], path: &mut Vec<String>) -> Option<Value> {
    // A `{"$patch": "replace"}` element replaces the whole list.
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let orig: Vec<Value> = match original {
        Some(Value::Array(a)) if !replace => a.clone(),
        _ => Vec::new(),
    };
    match list_strategy(path) {
        ListStrategy::Atomic => Some(clean(&Value::Array(items.to_vec()))),
        ListStrategy::Set => {
            let mut out = orig;
            for i in items {
                if i.is_object() {
                    continue;
                }
                if !out.contains(i) {
                    out.push(i.clone());
                }
            }
            Some(Value::Array(out))
        }
        ListStrategy::Key(key) => {
            let mut out = orig;
            for item in items {
                let Some(m) = item.as_object() else {
                    continue;
                };
                let directive = m.get("$patch").and_then(Value::as_str);
                if directive == Some("replace") && m.len() == 1 {
                    continue;
                }
                let Some(kv) = m.get(key) else {
                    // No merge key: append as is.
                    out.push(clean(item));
                    continue;
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                match (pos, directive) {
                    (Some(i), Some("delete")) => {
                        out.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        if let Some(merged) = merge_value(Some(&out[i]), item, path) {
                            out[i] = merged;
                        }
                    }
                    (None, _) => {
                        if let Some(merged) = merge_value(None, item, path) {
                            out.push(merged);
                        }
                    }
                }
            }
            Some(Value::Array(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let orig = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "ports": [{"containerPort": 80}], "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}}}});
        let patch = json!({"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
        "containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
            {"name": "b", "$patch": "delete"}
        ]}}}});
        let out = strategic_merge(&orig, &patch);
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs.as_array().map(Vec::len), Some(1));
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["ports"][0]["containerPort"], 80);
        assert_eq!(cs[0]["env"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn strategic_service_ports_and_maps() {
        let orig = json!({"spec": {"selector": {"app": "x", "tier": "t"}, "ports": [{"port": 80, "targetPort": 8080}], "args": ["a"]}});
        let patch = json!({"spec": {"selector": {"app": "y", "tier": null}, "ports": [{"port": 443}], "args": ["b"]},
                           "metadata": {"finalizers": ["f"], "$deleteFromPrimitiveList/finalizers": ["g"]}});
        let out = strategic_merge(&orig, &patch);
        assert_eq!(out["spec"]["selector"], json!({"app": "y"}));
        assert_eq!(out["spec"]["ports"].as_array().map(Vec::len), Some(2));
        assert_eq!(out["spec"]["args"], json!(["b"]));
        assert_eq!(out["metadata"]["finalizers"], json!(["f"]));
        let out = strategic_merge(
            &out,
            &json!({"spec": {"selector": {"$patch": "replace", "z": "1"}}}),
        );
        assert_eq!(out["spec"]["selector"], json!({"z": "1"}));
        let out = strategic_merge(
            &out,
            &json!({"spec": {"$retainKeys": ["ports"], "ports": [{"port": 80}]}}),
        );
        assert!(out["spec"].get("selector").is_none());
    }
}
