//! Kubernetes `Status` errors with the codes and reasons a real API server
//! returns, so kubectl and kube-rs print what they print against a real one.

use serde_json::{Value, json};

use crate::resources::ResourceType;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Forbidden`, ...
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (name, group, kind), when about one object.
    pub details: Option<Value>,
}

fn gr(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.to_string()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

/// `Kind` or `Kind.group`, as Go's `GroupKind.String()`.
fn qualified_kind(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.kind.to_string()
    } else {
        format!("{}.{}", rt.kind, rt.group)
    }
}

fn details(rt: &ResourceType, name: &str) -> Option<Value> {
    Some(json!({"name": name, "group": rt.group, "kind": rt.plural}))
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: details(rt, name),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", gr(rt), name),
            )
        }
    }
    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: details(rt, name),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", gr(rt), name),
            )
        }
    }
    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        ApiError {
            details: details(rt, name),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": {}",
                    gr(rt),
                    name,
                    why
                ),
            )
        }
    }
    /// 422 Invalid. `cause` is `field: message` (as in
    /// `spec.ports: Required value`); the Status carries it as a cause with
    /// `field` and `message`, which kubectl prints as `The Kind "name" is
    /// invalid: field: message`.
    pub fn invalid(rt: &ResourceType, name: &str, cause: &str) -> Self {
        Self::invalid_all(rt, name, &[cause.to_string()])
    }
    /// 422 Invalid with several causes (each `field: message`).
    pub fn invalid_all(rt: &ResourceType, name: &str, causes: &[String]) -> Self {
        let list: Vec<Value> = causes
            .iter()
            .map(|c| {
                let (field, message) = match c.split_once(": ") {
                    Some((f, m)) if !f.contains(' ') => (f, m),
                    _ => ("", c.as_str()),
                };
                let reason = if message.starts_with("Required value") {
                    "FieldValueRequired"
                } else if message.starts_with("Unsupported value") {
                    "FieldValueNotSupported"
                } else if message.starts_with("Duplicate value") {
                    "FieldValueDuplicate"
                } else if message.starts_with("Forbidden") {
                    "FieldValueForbidden"
                } else {
                    "FieldValueInvalid"
                };
                json!({"reason": reason, "message": message, "field": field})
            })
            .collect();
        let d = json!({"name": name, "group": rt.group, "kind": rt.kind, "causes": list});
        let joined = match causes {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        ApiError {
            details: Some(d),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{}\" is invalid: {}", qualified_kind(rt), name, joined),
            )
        }
    }
    /// `user` may not `verb` `rt` (named `name`, in `ns`).
    pub fn forbidden(
        user: &str,
        verb: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        ns: &str,
        name: &str,
    ) -> Self {
        let what = match subresource {
            Some(s) => format!("{}/{}", gr(rt), s),
            None => gr(rt),
        };
        let scope = if ns.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{ns}\"")
        };
        let subject = if name.is_empty() {
            what.clone()
        } else {
            format!("{what} \"{name}\"")
        };
        ApiError {
            details: details(rt, name),
            ..Self::new(
                403,
                "Forbidden",
                format!(
                    "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                    match subresource {
                        Some(s) => format!("{}/{}", rt.plural, s),
                        None => rt.plural.to_string(),
                    },
                    rt.group
                ),
            )
        }
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    pub fn gone(since: u64) -> Self {
        Self::new(410, "Expired", format!("too old resource version: {since}"))
    }
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    /// The `Status` object sent as the response body.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
