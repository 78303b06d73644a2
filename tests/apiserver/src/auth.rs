//! Authentication (client certificates: CN = user, O = groups; bearer
//! tokens issued for service accounts) and RBAC authorization evaluated
//! against the Role/ClusterRole/RoleBinding/ClusterRoleBinding objects in the
//! store, as the real API server does: `system:masters` bypasses it;
//! ClusterRoles bound by RoleBindings grant only in that namespace and never
//! cluster-scoped kinds; API groups and subresources (`pods/portforward`,
//! `services/status`) are resources of their own; `resourceNames` match
//! only named requests (a list or watch pinned by
//! `fieldSelector=metadata.name=`); a server-side apply or update that
//! creates needs `create` too; a WebSocket `pods/portforward` (or exec,
//! attach; tunneled SPDY included) needs `get` and `create` as in
//! Kubernetes 1.35, the strictest, so a role that works here works on older
//! servers; a SPDY one (a POST) `create`. RBAC objects are validated.

use std::collections::HashMap;
use std::sync::RwLock;

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::resources::{ResourceType, must};
use crate::store::Store;

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn new(name: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        UserInfo {
            name: name.to_string(),
            groups,
        }
    }

    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What a request wants to do, as RBAC sees it.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: &'a str,
    pub resource: &'static ResourceType,
    pub subresource: Option<&'a str>,
    /// Empty for cluster-scoped resources and all-namespace requests.
    pub namespace: &'a str,
    /// Empty for collection requests.
    pub name: &'a str,
}

/// Authenticates requests and authorizes them with RBAC. Share it in an
/// `Arc`.
#[derive(Default)]
pub struct Authenticator {
    tokens: RwLock<HashMap<String, UserInfo>>,
}

fn random_token() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..48)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Authenticator {
    pub fn new() -> Self {
        Self::default()
    }

    /// An opaque bearer token for service account `sa` in `namespace`
    /// (user `system:serviceaccount:<ns>:<sa>`).
    pub fn issue_token(&self, namespace: &str, sa: &str) -> String {
        let user = UserInfo::new(
            &format!("system:serviceaccount:{namespace}:{sa}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
            ],
        );
        self.issue_token_for(user)
    }

    /// An opaque bearer token for an arbitrary user.
    pub fn issue_token_for(&self, user: UserInfo) -> String {
        let token = random_token();
        let mut tokens = match self.tokens.write() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        tokens.insert(token.clone(), user);
        token
    }

    /// Who sent a request: the subject of its verified client certificate
    /// (DER), or the owner of its `Authorization: Bearer` token.
    pub fn authenticate(
        &self,
        client_cert: Option<&[u8]>,
        authorization: Option<&str>,
    ) -> Result<UserInfo, ApiError> {
        if let Some(token) = authorization.and_then(|h| {
            let h = h.trim();
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) {
            let tokens = match self.tokens.read() {
                Ok(t) => t,
                Err(p) => p.into_inner(),
            };
            return tokens
                .get(token.trim())
                .cloned()
                .ok_or_else(ApiError::unauthorized);
        }
        if let Some(der) = client_cert
            && let Some((cn, orgs)) = crate::pki::subject_of(der)
            && !cn.is_empty()
        {
            let groups: Vec<&str> = orgs.iter().map(String::as_str).collect();
            return Ok(UserInfo::new(&cn, &groups));
        }
        Err(ApiError::unauthorized())
    }

    /// RBAC: `Ok` if `user` may do `attrs`, else 403 Forbidden with the real
    /// message.
    pub fn authorize(
        &self,
        store: &Store,
        user: &UserInfo,
        attrs: &Attributes<'_>,
    ) -> Result<(), ApiError> {
        authorize(store, user, attrs)
    }
}

/// RBAC evaluation against the store's roles and bindings.
pub fn authorize(store: &Store, user: &UserInfo, attrs: &Attributes<'_>) -> Result<(), ApiError> {
    if allowed(store, user, attrs) {
        return Ok(());
    }
    let ns = if attrs.resource.namespaced {
        attrs.namespace
    } else {
        ""
    };
    Err(ApiError::forbidden(
        &user.name,
        attrs.verb,
        attrs.resource,
        attrs.subresource,
        ns,
        attrs.name,
    ))
}

/// Whether RBAC allows the request.
pub fn allowed(store: &Store, user: &UserInfo, attrs: &Attributes<'_>) -> bool {
    if user.is_master() {
        return true;
    }
    let (crbs, _) = store.list(
        must("rbac.authorization.k8s.io/v1/clusterrolebindings"),
        None,
    );
    for b in &crbs {
        if binds(b, user)
            && b["roleRef"]["kind"] == "ClusterRole"
            && let Some(role) = cluster_role(store, &b["roleRef"]["name"])
            && rules_allow(&role, attrs)
        {
            return true;
        }
    }
    if attrs.resource.namespaced && !attrs.namespace.is_empty() {
        let (rbs, _) = store.list(
            must("rbac.authorization.k8s.io/v1/rolebindings"),
            Some(attrs.namespace),
        );
        for b in &rbs {
            if !binds(b, user) {
                continue;
            }
            let name = b["roleRef"]["name"].as_str().unwrap_or("");
            let role = match b["roleRef"]["kind"].as_str() {
                Some("ClusterRole") => cluster_role(store, &b["roleRef"]["name"]),
                Some("Role") => store
                    .get(
                        must("rbac.authorization.k8s.io/v1/roles"),
                        attrs.namespace,
                        name,
                    )
                    .ok(),
                _ => None,
            };
            if role.is_some_and(|r| rules_allow(&r, attrs)) {
                return true;
            }
        }
    }
    false
}

fn cluster_role(store: &Store, name: &Value) -> Option<Value> {
    store
        .get(
            must("rbac.authorization.k8s.io/v1/clusterroles"),
            "",
            name.as_str()?,
        )
        .ok()
}

fn binds(binding: &Value, user: &UserInfo) -> bool {
    let binding_ns = binding["metadata"]["namespace"].as_str().unwrap_or("");
    binding["subjects"].as_array().is_some_and(|subjects| {
        subjects.iter().any(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["kind"].as_str() {
                Some("User") => user.name == name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s["namespace"]
                        .as_str()
                        .filter(|n| !n.is_empty())
                        .unwrap_or(binding_ns);
                    user.name == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
    })
}

fn contains(list: &Value, want: &str) -> bool {
    list.as_array().is_some_and(|l| {
        l.iter()
            .any(|v| v.as_str().is_some_and(|s| s == want || s == "*"))
    })
}

fn rules_allow(role: &Value, attrs: &Attributes<'_>) -> bool {
    let Some(rules) = role["rules"].as_array() else {
        return false;
    };
    rules.iter().any(|rule| rule_allows(rule, attrs))
}

fn rule_allows(rule: &Value, attrs: &Attributes<'_>) -> bool {
    if !contains(&rule["verbs"], attrs.verb) || !contains(&rule["apiGroups"], attrs.resource.group)
    {
        return false;
    }
    let combined = match attrs.subresource {
        Some(s) => format!("{}/{}", attrs.resource.plural, s),
        None => attrs.resource.plural.to_string(),
    };
    let resource_ok = rule["resources"].as_array().is_some_and(|rs| {
        rs.iter().filter_map(Value::as_str).any(|r| {
            r == "*"
                || r == combined
                || attrs
                    .subresource
                    .is_some_and(|sub| r.strip_prefix("*/").is_some_and(|rsub| rsub == sub))
        })
    });
    if !resource_ok {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => {
            !attrs.name.is_empty() && names.iter().any(|n| n.as_str() == Some(attrs.name))
        }
        _ => true,
    }
}

/// The real validation of RBAC objects (`kind` Role, ClusterRole,
/// RoleBinding, ClusterRoleBinding): rules need verbs and, for resources,
/// API groups; bindings need a role of the right kind and known subjects.
pub fn validate(kind: &str, obj: &Value, errs: &mut Vec<String>) {
    match kind {
        "Role" | "ClusterRole" => {
            for (i, rule) in obj["rules"].as_array().into_iter().flatten().enumerate() {
                let empty = |k: &str| rule[k].as_array().is_none_or(|a| a.is_empty());
                if empty("verbs") {
                    errs.push(format!(
                        "rules[{i}].verbs: Required value: verbs must contain at least one value"
                    ));
                }
                if !empty("nonResourceURLs") {
                    if kind == "Role" {
                        errs.push(format!(
                            "rules[{i}].nonResourceURLs: Invalid value: {}: namespaced rules cannot apply to non-resource URLs",
                            rule["nonResourceURLs"]
                        ));
                    }
                    if !empty("apiGroups") || !empty("resources") || !empty("resourceNames") {
                        errs.push(format!(
                            "rules[{i}].nonResourceURLs: Invalid value: {}: rules cannot apply to both regular resources and non-resource URLs",
                            rule["nonResourceURLs"]
                        ));
                    }
                } else if empty("apiGroups") {
                    errs.push(format!(
                        "rules[{i}].apiGroups: Required value: resource rules must supply at least one api group"
                    ));
                } else if empty("resources") {
                    errs.push(format!(
                        "rules[{i}].resources: Required value: resource rules must supply at least one resource"
                    ));
                }
            }
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let role_ref = &obj["roleRef"];
            let group = role_ref["apiGroup"].as_str().unwrap_or("");
            if group != "rbac.authorization.k8s.io" {
                errs.push(format!(
                    "roleRef.apiGroup: Unsupported value: {group:?}: supported values: \"rbac.authorization.k8s.io\""
                ));
            }
            let ref_kind = role_ref["kind"].as_str().unwrap_or("");
            match (kind, ref_kind) {
                ("RoleBinding", "Role" | "ClusterRole") | ("ClusterRoleBinding", "ClusterRole") => {}
                ("RoleBinding", other) => errs.push(format!(
                    "roleRef.kind: Unsupported value: {other:?}: supported values: \"Role\", \"ClusterRole\""
                )),
                (_, other) => errs.push(format!(
                    "roleRef.kind: Unsupported value: {other:?}: supported values: \"ClusterRole\""
                )),
            }
            if role_ref["name"].as_str().is_none_or(str::is_empty) {
                errs.push("roleRef.name: Required value".to_string());
            }
            for (i, sub) in obj["subjects"].as_array().into_iter().flatten().enumerate() {
                if sub["name"].as_str().is_none_or(str::is_empty) {
                    errs.push(format!("subjects[{i}].name: Required value"));
                }
                match sub["kind"].as_str().unwrap_or("") {
                    "User" | "Group" => {}
                    "ServiceAccount" => {
                        if kind == "ClusterRoleBinding"
                            && sub["namespace"].as_str().is_none_or(str::is_empty)
                        {
                            errs.push(format!("subjects[{i}].namespace: Required value"));
                        }
                    }
                    other => errs.push(format!(
                        "subjects[{i}].kind: Unsupported value: {other:?}: supported values: \"ServiceAccount\", \"User\", \"Group\""
                    )),
                }
            }
        }
        _ => {}
    }
}

/// The default ClusterRoles of a fresh cluster (`cluster-admin`, `admin`,
/// `edit`, `view`, `system:basic-user`) and the bindings of `system:masters`
/// to `cluster-admin` and of every authenticated user to
/// `system:basic-user`, as objects to create.
pub fn bootstrap_rbac() -> Vec<(&'static ResourceType, Value)> {
    let cr = must("rbac.authorization.k8s.io/v1/clusterroles");
    let crb = must("rbac.authorization.k8s.io/v1/clusterrolebindings");
    let all = json!(["*"]);
    let write = json!([
        "create",
        "delete",
        "deletecollection",
        "patch",
        "update",
        "get",
        "list",
        "watch"
    ]);
    let read = json!(["get", "list", "watch"]);
    let core_rw = json!([
        "pods",
        "pods/portforward",
        "pods/log",
        "pods/exec",
        "pods/attach",
        "pods/status",
        "services",
        "endpoints",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "events",
        "persistentvolumeclaims",
        "replicationcontrollers"
    ]);
    let apps_rw = json!([
        "deployments",
        "deployments/scale",
        "replicasets",
        "replicasets/scale",
        "statefulsets",
        "daemonsets"
    ]);
    let core_ro = json!([
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "endpoints",
        "configmaps",
        "serviceaccounts",
        "events",
        "namespaces"
    ]);
    let apps_ro = json!(["deployments", "replicasets", "statefulsets", "daemonsets"]);
    let edit_rules = json!([
        {"apiGroups": [""], "resources": core_rw, "verbs": write},
        {"apiGroups": ["apps"], "resources": apps_rw, "verbs": write},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": read},
    ]);
    let mut admin_rules = edit_rules.clone();
    if let Some(rules) = admin_rules.as_array_mut() {
        rules.push(json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": write}));
    }
    let role = |name: &str, rules: Value| json!({"metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}}, "rules": rules});
    vec![
        (
            cr,
            role(
                "cluster-admin",
                json!([{"apiGroups": all, "resources": all, "verbs": all}, {"nonResourceURLs": all, "verbs": all}]),
            ),
        ),
        (cr, role("admin", admin_rules)),
        (cr, role("edit", edit_rules)),
        (
            cr,
            role(
                "view",
                json!([
                    {"apiGroups": [""], "resources": core_ro, "verbs": read},
                    {"apiGroups": ["apps"], "resources": apps_ro, "verbs": read},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                ]),
            ),
        ),
        (
            cr,
            role(
                "system:basic-user",
                json!([
                    {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
                ]),
            ),
        ),
        (
            crb,
            json!({
                "metadata": {"name": "system:basic-user", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:basic-user"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}],
            }),
        ),
        (
            crb,
            json!({
                "metadata": {"name": "cluster-admin", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}],
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_ns() -> Store {
        let s = Store::new();
        s.create(
            must("core/v1/namespaces"),
            "",
            json!({"metadata": {"name": "default"}}),
        )
        .expect("ns");
        s
    }

    #[test]
    fn rbac_roles_and_bindings() {
        let s = store_with_ns();
        let pods = must("core/v1/pods");
        let svc = must("core/v1/services");
        let alice = UserInfo::new("alice", &["devs"]);
        let attrs = Attributes {
            verb: "create",
            resource: pods,
            subresource: Some("portforward"),
            namespace: "default",
            name: "p",
        };
        assert!(!allowed(&s, &alice, &attrs));
        s.create(
            must("rbac.authorization.k8s.io/v1/roles"),
            "default",
            json!({"metadata": {"name": "pf"}, "rules": [
                {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["services"], "verbs": ["get"], "resourceNames": ["echo"]},
            ]}),
        )
        .expect("role");
        s.create(
            must("rbac.authorization.k8s.io/v1/rolebindings"),
            "default",
            json!({"metadata": {"name": "pf"}, "roleRef": {"kind": "Role", "name": "pf", "apiGroup": "rbac.authorization.k8s.io"},
                   "subjects": [{"kind": "Group", "name": "devs"}]}),
        )
        .expect("binding");
        assert!(allowed(&s, &alice, &attrs));
        let get_echo = Attributes {
            verb: "get",
            resource: svc,
            subresource: None,
            namespace: "default",
            name: "echo",
        };
        assert!(allowed(&s, &alice, &get_echo));
        let list = Attributes {
            verb: "list",
            resource: svc,
            subresource: None,
            namespace: "default",
            name: "",
        };
        assert!(!allowed(&s, &alice, &list));
        let patch = Attributes {
            verb: "patch",
            resource: svc,
            subresource: None,
            namespace: "default",
            name: "echo",
        };
        let err = authorize(&s, &alice, &patch).expect_err("forbidden");
        assert_eq!(
            err.message,
            "services \"echo\" is forbidden: User \"alice\" cannot patch resource \"services\" in API group \"\" in the namespace \"default\""
        );
        let auth = Authenticator::new();
        let tok = auth.issue_token("default", "burrow");
        let u = auth
            .authenticate(None, Some(&format!("Bearer {tok}")))
            .expect("token");
        assert_eq!(u.name, "system:serviceaccount:default:burrow");
        assert!(auth.authenticate(None, Some("Bearer nope")).is_err());
        assert!(auth.authenticate(None, None).is_err());
    }

    fn attrs<'a>(
        verb: &'a str,
        key: &str,
        sub: Option<&'a str>,
        ns: &'a str,
        name: &'a str,
    ) -> Attributes<'a> {
        Attributes {
            verb,
            resource: must(key),
            subresource: sub,
            namespace: ns,
            name,
        }
    }

    #[test]
    fn cluster_roles_bound_in_a_namespace_grant_only_there() {
        let s = store_with_ns();
        let dana = UserInfo::new("dana", &[]);
        s.create(
            must("rbac.authorization.k8s.io/v1/clusterroles"),
            "",
            json!({"metadata": {"name": "reroute"}, "rules": [
                {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "patch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["nodes", "pods"], "verbs": ["list"]},
            ]}),
        )
        .expect("cluster role");
        s.create(
            must("rbac.authorization.k8s.io/v1/rolebindings"),
            "default",
            json!({"metadata": {"name": "dana"}, "roleRef": {"kind": "ClusterRole", "name": "reroute", "apiGroup": "rbac.authorization.k8s.io"},
                   "subjects": [{"kind": "User", "name": "dana", "apiGroup": "rbac.authorization.k8s.io"}]}),
        )
        .expect("binding");
        let svc = "core/v1/services";
        let slices = "discovery.k8s.io/v1/endpointslices";
        assert!(allowed(
            &s,
            &dana,
            &attrs("patch", svc, None, "default", "echo")
        ));
        assert!(!allowed(
            &s,
            &dana,
            &attrs("patch", svc, None, "team", "echo")
        ));
        // All namespaces at once is not "every namespace it is bound in".
        assert!(!allowed(&s, &dana, &attrs("get", svc, None, "", "")));
        assert!(!allowed(
            &s,
            &dana,
            &attrs("delete", svc, None, "default", "echo")
        ));
        // The status subresource is a resource of its own.
        assert!(!allowed(
            &s,
            &dana,
            &attrs("patch", svc, Some("status"), "default", "echo")
        ));
        assert!(allowed(
            &s,
            &dana,
            &attrs("create", slices, None, "default", "")
        ));
        // A rule of the core group grants nothing in another group.
        let core_slices =
            json!([{"apiGroups": [""], "resources": ["endpointslices"], "verbs": ["*"]}]);
        assert!(!rules_allow(
            &json!({"rules": core_slices}),
            &attrs("delete", slices, None, "default", "x")
        ));
        // A cluster-scoped resource is never granted by a RoleBinding.
        assert!(!allowed(
            &s,
            &dana,
            &attrs("list", "core/v1/nodes", None, "", "")
        ));
        assert!(allowed(
            &s,
            &dana,
            &attrs("list", "core/v1/pods", None, "default", "")
        ));
        // `pods` does not grant `pods/portforward`.
        assert!(!allowed(
            &s,
            &dana,
            &attrs("list", "core/v1/pods", Some("portforward"), "default", "p")
        ));
    }

    #[test]
    fn resource_names_restrict_to_named_requests() {
        let role = json!({"rules": [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "create"], "resourceNames": ["gw"]},
        ]});
        let deploy = "apps/v1/deployments";
        assert!(rules_allow(&role, &attrs("get", deploy, None, "ns", "gw")));
        assert!(!rules_allow(
            &role,
            &attrs("get", deploy, None, "ns", "other")
        ));
        // A collection request names nothing (a create's name is in its body).
        assert!(!rules_allow(&role, &attrs("list", deploy, None, "ns", "")));
        assert!(!rules_allow(
            &role,
            &attrs("create", deploy, None, "ns", "")
        ));
    }

    #[test]
    fn rbac_objects_are_validated() {
        let mut errs = Vec::new();
        validate(
            "Role",
            &json!({"rules": [{"resources": ["pods"], "verbs": ["get"]}, {"apiGroups": [""], "resources": ["pods"]}, {"nonResourceURLs": ["/x"], "verbs": ["get"]}]}),
            &mut errs,
        );
        validate(
            "RoleBinding",
            &json!({"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Rol", "name": "x"}, "subjects": [{"kind": "user", "name": "u"}]}),
            &mut errs,
        );
        validate(
            "ClusterRoleBinding",
            &json!({"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ""}, "subjects": [{"kind": "ServiceAccount", "name": "sa"}]}),
            &mut errs,
        );
        assert_eq!(
            errs,
            [
                "rules[0].apiGroups: Required value: resource rules must supply at least one api group",
                "rules[1].verbs: Required value: verbs must contain at least one value",
                "rules[2].nonResourceURLs: Invalid value: [\"/x\"]: namespaced rules cannot apply to non-resource URLs",
                "roleRef.kind: Unsupported value: \"Rol\": supported values: \"Role\", \"ClusterRole\"",
                "subjects[0].kind: Unsupported value: \"user\": supported values: \"ServiceAccount\", \"User\", \"Group\"",
                "roleRef.kind: Unsupported value: \"Role\": supported values: \"ClusterRole\"",
                "roleRef.name: Required value",
                "subjects[0].namespace: Required value",
            ]
        );
    }
}
