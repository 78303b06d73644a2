//! The resource kinds this API server serves. New kinds are data: add a row.

/// One REST resource (a group/version/plural), as discovery describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: the path segment (`pods`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources served besides the main resource (`status`, `portforward`).
    pub subresources: &'static [&'static str],
}

impl ResourceType {
    /// `v1` for core, `apps/v1` otherwise: the objects' `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// A stable key used by the store (`core/v1/pods`, `apps/v1/deployments`).
    pub fn key(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("{}/{}/{}", group, self.version, self.plural)
    }

    /// Create-only review resources (access reviews, who-am-i) that are
    /// computed per request and never stored.
    pub fn is_virtual(&self) -> bool {
        matches!(
            self.kind,
            "SelfSubjectAccessReview" | "SubjectAccessReview" | "SelfSubjectReview"
        )
    }

    /// Whether the status is a subresource: writes to the main resource keep
    /// the stored status, writes to `/status` change only the status.
    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }
}

#[allow(clippy::too_many_arguments)]
const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    subresources: &'static [&'static str],
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        subresources,
    }
}

/// Every resource served, in discovery order.
#[rustfmt::skip]
pub static RESOURCES: &[ResourceType] = &[
    rt("", "v1", "namespaces", "namespace", "Namespace", false, &["ns"], &["status"]),
    rt("", "v1", "nodes", "node", "Node", false, &["no"], &["status"]),
    rt("", "v1", "pods", "pod", "Pod", true, &["po"], &["status", "portforward", "log"]),
    rt("", "v1", "services", "service", "Service", true, &["svc"], &["status"]),
    rt("", "v1", "endpoints", "endpoints", "Endpoints", true, &["ep"], &[]),
    rt("", "v1", "configmaps", "configmap", "ConfigMap", true, &["cm"], &[]),
    rt("", "v1", "secrets", "secret", "Secret", true, &[], &[]),
    rt("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, &["sa"], &[]),
    rt("", "v1", "events", "event", "Event", true, &["ev"], &[]),
    rt("apps", "v1", "deployments", "deployment", "Deployment", true, &["deploy"], &["status", "scale"]),
    rt("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, &["rs"], &["status", "scale"]),
    rt("apps", "v1", "statefulsets", "statefulset", "StatefulSet", true, &["sts"], &["status", "scale"]),
    rt("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, &["ds"], &["status"]),
    rt("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, &[], &[]),
    rt("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", true, &[], &[]),
    rt("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", true, &[], &[]),
    rt("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", false, &[], &[]),
    rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, &[], &[]),
    rt("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, &[], &[]),
    // Stored and validated, never enforced: like a cluster whose network
    // plugin has no policy support (nothing here filters pod traffic).
    rt("networking.k8s.io", "v1", "networkpolicies", "networkpolicy", "NetworkPolicy", true, &["netpol"], &[]),
    rt("events.k8s.io", "v1", "events", "event", "Event", true, &[], &[]),
    // Virtual (create-only, never stored): answered by the REST layer.
    rt("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "", "SelfSubjectAccessReview", false, &[], &[]),
    rt("authorization.k8s.io", "v1", "subjectaccessreviews", "", "SubjectAccessReview", false, &[], &[]),
    rt("authentication.k8s.io", "v1", "selfsubjectreviews", "", "SelfSubjectReview", false, &[], &[]),
];

/// Finds a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds a resource by group and kind (any served version).
pub fn find_kind(group: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind)
}

/// Shorthand for the core/v1 or named-group resource the controllers use.
pub fn must(key: &str) -> &'static ResourceType {
    match RESOURCES.iter().find(|r| r.key() == key) {
        Some(r) => r,
        None => panic!("unknown resource key {key}: add it to RESOURCES"),
    }
}
