//! Defaulting, validation and allocation (Service ClusterIPs and
//! nodePorts) in front of the store, as the real API server's registry
//! strategies do. Used by the REST layer and directly by the controllers.
//!
//! As the real one: a Pod's container with a limit but no request gets
//! request = limit (`SetDefaults_Pod`, on Pods only, never on a template);
//! resource quantities are stored canonical (`cpu: 0.5` → `"500m"`); a
//! Pod's `status.qosClass` is computed; a Secret's `stringData` is merged
//! into `data` and never stored.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::patch::{self, PatchType};
use crate::resources::{ResourceType, must};
use crate::selectors::LabelSelector;
use crate::store::Store;

/// The Service ClusterIP range.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const CIDR_SIZE: u32 = 1 << 20;
/// The NodePort range.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Serializes allocation + write, so two concurrent creates never pick the
/// same IP or port (the store itself is the source of truth).
static ALLOC: Mutex<()> = Mutex::new(());

fn alloc_lock() -> std::sync::MutexGuard<'static, ()> {
    match ALLOC.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// How a write is done.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// `?dryRun=All`: everything but storing.
    pub dry_run: bool,
}

/// Rejects bodies whose well-known parts have the wrong JSON type (the real
/// server fails to decode them), so later steps can index them safely.
pub fn check_shape(obj: &Value) -> Result<(), ApiError> {
    let Some(m) = obj.as_object() else {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    };
    for key in ["metadata", "spec", "status"] {
        if let Some(v) = m.get(key)
            && !v.is_null()
            && !v.is_object()
        {
            return Err(ApiError::bad_request(format!(
                "json: cannot unmarshal {} into Go struct field of type {key}",
                match v {
                    Value::String(_) => "string",
                    Value::Array(_) => "array",
                    Value::Number(_) => "number",
                    _ => "bool",
                }
            )));
        }
    }
    if let Some(meta) = m.get("metadata").and_then(Value::as_object) {
        for key in ["labels", "annotations"] {
            if let Some(v) = meta.get(key)
                && !v.is_null()
                && !v
                    .as_object()
                    .is_some_and(|o| o.values().all(Value::is_string))
            {
                return Err(ApiError::bad_request(format!(
                    "json: cannot unmarshal metadata.{key}: must be a map of strings"
                )));
            }
        }
    }
    Ok(())
}

/// Defaults, validates and stores a new object.
pub fn create(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    obj: Value,
) -> Result<Value, ApiError> {
    create_with(store, rt, ns, obj, WriteOptions::default())
}

/// [`create`] with options (dry run).
pub fn create_with(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    mut obj: Value,
    opts: WriteOptions,
) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request was in an unknown format",
        ));
    }
    if let Some(kind) = obj.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the kind of the resource ({})",
            rt.kind
        )));
    }
    // Status of new objects is the server's, except for kinds without a
    // status subresource.
    default_object(rt, &mut obj);
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let _guard = (rt.key() == "core/v1/services").then(alloc_lock);
    if rt.key() == "core/v1/services" {
        let (ips, ports) = used_service_resources(store, None);
        allocate_service(rt, &name, &mut obj, None, &ips, &ports)?;
    }
    validate(rt, &name, &obj)?;
    if opts.dry_run {
        if store.get(rt, ns, &name).is_ok() {
            return Err(ApiError::already_exists(rt, &name));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        if rt.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["metadata"]["creationTimestamp"] = json!(now());
        return Ok(obj);
    }
    store.create(rt, ns, obj)
}

/// Replaces an object (PUT): `obj` is the whole new object. With
/// `status_only`, only its status is taken.
pub fn update(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    obj: Value,
    status_only: bool,
) -> Result<Value, ApiError> {
    update_with(
        store,
        rt,
        ns,
        name,
        obj,
        status_only,
        WriteOptions::default(),
    )
}

/// [`update`] with options.
pub fn update_with(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    obj: Value,
    status_only: bool,
    opts: WriteOptions,
) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request was in an unknown format",
        ));
    }
    write(store, rt, ns, name, status_only, opts, move |_| Ok(obj))
}

/// Patches an object. For `PatchType::Apply`, `field_manager` is required
/// and a missing object is created; returns the object and whether it was
/// created.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    kind: PatchType,
    body: &[u8],
    status_only: bool,
    field_manager: Option<&str>,
    opts: WriteOptions,
) -> Result<(Value, bool), ApiError> {
    if kind == PatchType::Apply {
        let Some(manager) = field_manager.filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "PATCH /apply requests require a non-empty fieldManager",
            ));
        };
        let applied = patch::parse_apply(body)?;
        check_shape(&applied)?;
        if let Some(n) = applied["metadata"]["name"].as_str()
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if store.get(rt, ns, name).is_err() && !status_only {
            let mut obj = applied;
            obj["metadata"]["name"] = json!(name);
            set_managed_fields(rt, &mut obj, manager, "Apply");
            if let Some(m) = obj.as_object_mut()
                && rt.has_status()
            {
                m.remove("status");
            }
            return create_with(store, rt, ns, obj, opts).map(|o| (o, true));
        }
        let manager = manager.to_string();
        let out = write(store, rt, ns, name, status_only, opts, move |cur| {
            let mut next = patch::strategic_merge(cur, &applied);
            set_managed_fields(rt, &mut next, &manager, "Apply");
            Ok(next)
        })?;
        return Ok((out, false));
    }
    let body = body.to_vec();
    let out = write(store, rt, ns, name, status_only, opts, move |cur| {
        let next = patch::apply_patch(cur, kind, &body)?;
        if !next.is_object() {
            return Err(ApiError::bad_request(
                "the patched object must be a JSON object",
            ));
        }
        Ok(next)
    })?;
    Ok((out, false))
}

fn set_managed_fields(rt: &ResourceType, obj: &mut Value, manager: &str, operation: &str) {
    let mut entries: Vec<Value> = obj["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    entries.retain(|e| !(e["manager"] == manager && e["operation"] == operation));
    entries.push(json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": rt.api_version(),
        "time": now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    }));
    obj["metadata"]["managedFields"] = Value::Array(entries);
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The common read-modify-write of update and patch: `mutate` computes the
/// new object from the stored one; then the server's rules apply
/// (resourceVersion precondition, status subresource, defaults, immutable
/// fields, allocation, validation).
fn write<F>(
    store: &Store,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    status_only: bool,
    opts: WriteOptions,
    mutate: F,
) -> Result<Value, ApiError>
where
    F: FnOnce(&Value) -> Result<Value, ApiError>,
{
    let is_service = rt.key() == "core/v1/services";
    let _guard = is_service.then(alloc_lock);
    let (ips, ports) = if is_service {
        used_service_resources(store, Some((ns, name)))
    } else {
        Default::default()
    };
    let step = |cur: &mut Value| -> Result<(), ApiError> {
        let next = mutate(cur)?;
        let next = finalize(rt, name, cur, next, status_only, &ips, &ports)?;
        *cur = next;
        Ok(())
    };
    if opts.dry_run {
        let mut cur = store.get(rt, ns, name)?;
        step(&mut cur)?;
        return Ok(cur);
    }
    store.update_with(rt, ns, name, step)
}

fn finalize(
    rt: &'static ResourceType,
    name: &str,
    cur: &Value,
    mut next: Value,
    status_only: bool,
    ips: &HashSet<u32>,
    ports: &HashSet<u16>,
) -> Result<Value, ApiError> {
    check_shape(&next)?;
    if next.get("metadata").is_none_or(|m| !m.is_object()) {
        next["metadata"] = json!({});
    }
    if let Some(want) = next["metadata"]["resourceVersion"].as_str()
        && !want.is_empty()
        && cur["metadata"]["resourceVersion"].as_str() != Some(want)
    {
        return Err(ApiError::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    if let Some(body_name) = next["metadata"]["name"].as_str()
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let Some(kind) = next.get("kind").and_then(Value::as_str)
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the object ({kind}) does not match the kind of the resource ({})",
            rt.kind
        )));
    }
    if status_only {
        let mut kept = cur.clone();
        match next.get("status") {
            Some(s) => kept["status"] = s.clone(),
            None => {
                if let Some(m) = kept.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        return Ok(kept);
    }
    if rt.has_status() {
        match cur.get("status") {
            Some(s) => next["status"] = s.clone(),
            None => {
                if let Some(m) = next.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    default_object(rt, &mut next);
    match rt.key().as_str() {
        "core/v1/services" => allocate_service(rt, name, &mut next, Some(cur), ips, ports)?,
        "discovery.k8s.io/v1/endpointslices" if next["addressType"] != cur["addressType"] => {
            return Err(ApiError::invalid(
                rt,
                name,
                &format!(
                    "addressType: Invalid value: {}: field is immutable",
                    next["addressType"]
                ),
            ));
        }
        "apps/v1/deployments"
        | "apps/v1/replicasets"
        | "apps/v1/statefulsets"
        | "apps/v1/daemonsets"
            if !cur["spec"]["selector"].is_null()
                && next["spec"]["selector"] != cur["spec"]["selector"] =>
        {
            return Err(ApiError::invalid(
                rt,
                name,
                &format!(
                    "spec.selector: Invalid value: {}: field is immutable",
                    go_label_selector(&next["spec"]["selector"])
                ),
            ));
        }
        _ => {}
    }
    validate(rt, name, &next)?;
    Ok(next)
}

fn go_label_selector(sel: &Value) -> String {
    format!(
        "v1.LabelSelector{{MatchLabels:{}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}}",
        go_map(&sel["matchLabels"])
    )
}

fn go_map(m: &Value) -> String {
    let inner: Vec<String> = m
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k:?}:{:?}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    format!("map[string]string{{{}}}", inner.join(", "))
}

/// ClusterIPs and nodePorts in use by Services other than `except`.
fn used_service_resources(
    store: &Store,
    except: Option<(&str, &str)>,
) -> (HashSet<u32>, HashSet<u16>) {
    let (svcs, _) = store.list(must("core/v1/services"), None);
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for s in svcs {
        let ns = s["metadata"]["namespace"].as_str().unwrap_or("");
        let name = s["metadata"]["name"].as_str().unwrap_or("");
        if except == Some((ns, name)) {
            continue;
        }
        let mut all_ips: Vec<&Value> = s["spec"]["clusterIPs"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        all_ips.push(&s["spec"]["clusterIP"]);
        for ip in all_ips {
            if let Some(ip) = ip.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
                ips.insert(u32::from(ip));
            }
        }
        for p in s["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(np) = p["nodePort"].as_u64() {
                ports.insert(np as u16);
            }
        }
    }
    (ips, ports)
}

fn in_range(ip: u32) -> bool {
    ip > CIDR_BASE && ip < CIDR_BASE + CIDR_SIZE - 1
}

fn pick_ip(used: &HashSet<u32>) -> Option<u32> {
    use rand::Rng;
    let reserved = |ip: u32| ip - CIDR_BASE <= 1 || ip - CIDR_BASE == 10;
    let mut rng = rand::rng();
    for _ in 0..64 {
        let ip = CIDR_BASE + rng.random_range(2..CIDR_SIZE - 1);
        if !reserved(ip) && !used.contains(&ip) {
            return Some(ip);
        }
    }
    (CIDR_BASE + 2..CIDR_BASE + CIDR_SIZE - 1).find(|ip| !reserved(*ip) && !used.contains(ip))
}

fn pick_port(used: &HashSet<u16>) -> Option<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..64 {
        let p = rng.random_range(NODE_PORT_RANGE);
        if !used.contains(&p) {
            return Some(p);
        }
    }
    NODE_PORT_RANGE.clone().find(|p| !used.contains(p))
}

/// ClusterIP and nodePort allocation (and keeping them on update).
fn allocate_service(
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
    used_ips: &HashSet<u32>,
    used_ports: &HashSet<u16>,
) -> Result<(), ApiError> {
    let spec = &mut obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if ty == "ExternalName" {
        return Ok(());
    }
    let requested = spec["clusterIP"]
        .as_str()
        .filter(|s| !s.is_empty())
        .or_else(|| spec["clusterIPs"][0].as_str().filter(|s| !s.is_empty()))
        .map(String::from);
    let old_ip = old
        .and_then(|o| o["spec"]["clusterIP"].as_str())
        .filter(|s| !s.is_empty())
        .map(String::from);
    let ip = match (requested, old_ip) {
        (None, Some(old)) => old,
        (Some(req), Some(old)) => {
            if req != old {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    &format!(
                        "spec.clusterIPs[0]: Invalid value: []string{{{req:?}}}: may not change once set"
                    ),
                ));
            }
            old
        }
        (Some(req), None) if req == "None" => req,
        (Some(req), None) => {
            let not_valid = |why: String| {
                ApiError::invalid(
                    rt,
                    name,
                    &format!(
                        "spec.clusterIPs: Invalid value: []string{{{req:?}}}: failed to allocate IP {req}: {why}"
                    ),
                )
            };
            let Ok(addr) = req.parse::<Ipv4Addr>() else {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    &format!(
                        "spec.clusterIPs[0]: Invalid value: {req:?}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
                    ),
                ));
            };
            let n = u32::from(addr);
            if !in_range(n) {
                return Err(not_valid(format!(
                    "the provided IP ({req}) is not in the valid range. The range of valid IPs is {SERVICE_CIDR}"
                )));
            }
            if used_ips.contains(&n) {
                return Err(not_valid("provided IP is already allocated".to_string()));
            }
            req
        }
        (None, None) => {
            let Some(n) = pick_ip(used_ips) else {
                return Err(ApiError::new(500, "InternalError", "range is full"));
            };
            Ipv4Addr::from(n).to_string()
        }
    };
    spec["clusterIP"] = json!(ip);
    spec["clusterIPs"] = json!([ip]);
    if ip != "None" || spec["ipFamilies"].is_null() {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    // nodePorts.
    let needs_node_ports = ty == "NodePort" || ty == "LoadBalancer";
    let mut taken: HashSet<u16> = used_ports.clone();
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports.iter_mut().filter(|p| p.is_object()) {
            if !needs_node_ports {
                if let Some(m) = p.as_object_mut() {
                    m.remove("nodePort");
                }
                continue;
            }
            let requested = p["nodePort"].as_u64().filter(|n| *n != 0);
            let kept = old.and_then(|o| {
                o["spec"]["ports"].as_array()?.iter().find_map(|op| {
                    (op["port"] == p["port"] && op["protocol"] == p["protocol"])
                        .then(|| op["nodePort"].as_u64())
                        .flatten()
                })
            });
            let np = match (requested, kept) {
                (Some(r), Some(k)) if r == k => r as u16,
                (None, Some(k)) => k as u16,
                (Some(r), _) => {
                    let r16 = u16::try_from(r)
                        .ok()
                        .filter(|r| NODE_PORT_RANGE.contains(r));
                    let Some(r16) = r16 else {
                        return Err(ApiError::invalid(
                            rt,
                            name,
                            &format!(
                                "spec.ports[0].nodePort: Invalid value: {r}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                            ),
                        ));
                    };
                    if taken.contains(&r16) {
                        return Err(ApiError::invalid(
                            rt,
                            name,
                            &format!(
                                "spec.ports[0].nodePort: Invalid value: {r}: provided port is already allocated"
                            ),
                        ));
                    }
                    r16
                }
                (None, None) => match pick_port(&taken) {
                    Some(p) => p,
                    None => return Err(ApiError::new(500, "InternalError", "range is full")),
                },
            };
            taken.insert(np);
            p["nodePort"] = json!(np);
        }
    }
    Ok(())
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if obj.is_object() && obj.get(key).is_none_or(Value::is_null) {
        obj[key] = v;
    }
}

/// Pure defaulting (no allocation), as the real API server's defaulters.
pub fn default_object(rt: &ResourceType, obj: &mut Value) {
    if obj.get("metadata").is_none_or(|m| !m.is_object()) {
        obj["metadata"] = json!({});
    }
    match rt.key().as_str() {
        "core/v1/pods" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            default_pod_spec(&mut obj["spec"]);
            default_pod_requests(&mut obj["spec"]);
            if !obj["status"].is_object() {
                obj["status"] = json!({});
            }
            set_default(&mut obj["status"], "phase", json!("Pending"));
            let qos = pod_qos_class(&obj["spec"]);
            set_default(&mut obj["status"], "qosClass", json!(qos));
        }
        "discovery.k8s.io/v1/endpointslices" => {
            // As the real defaulting: a port's name "" and protocol TCP.
            if let Some(ports) = obj["ports"].as_array_mut() {
                for p in ports.iter_mut().filter(|p| p.is_object()) {
                    if p.get("name").is_none_or(Value::is_null) {
                        p["name"] = json!("");
                    }
                    set_default(p, "protocol", json!("TCP"));
                }
            }
        }
        "core/v1/services" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            set_default(spec, "type", json!("ClusterIP"));
            let ty = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
            set_default(spec, "sessionAffinity", json!("None"));
            if ty != "ExternalName" {
                set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
                set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            }
            if ty == "NodePort" || ty == "LoadBalancer" {
                set_default(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if ty == "LoadBalancer" {
                set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
            }
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports.iter_mut().filter(|p| p.is_object()) {
                    set_default(p, "protocol", json!("TCP"));
                    if p.get("targetPort").is_none_or(Value::is_null) {
                        p["targetPort"] = p["port"].clone();
                    }
                }
            }
            if !obj["status"].is_object() {
                obj["status"] = json!({"loadBalancer": {}});
            }
        }
        "apps/v1/deployments" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(
                spec,
                "strategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            if !spec["strategy"].is_object() {
                spec["strategy"] = json!({});
            }
            if spec["strategy"]["type"].as_str().is_none_or(str::is_empty) {
                spec["strategy"]["type"] = json!("RollingUpdate");
            }
            if spec["strategy"]["type"] == "RollingUpdate" {
                let ru = &mut spec["strategy"]["rollingUpdate"];
                if !ru.is_object() {
                    *ru = json!({});
                }
                set_default(ru, "maxUnavailable", json!("25%"));
                set_default(ru, "maxSurge", json!("25%"));
            }
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            if spec["template"]["spec"].is_object() {
                default_pod_spec(&mut spec["template"]["spec"]);
            }
        }
        "apps/v1/statefulsets" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            set_default(spec, "replicas", json!(1));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            if spec["template"]["spec"].is_object() {
                default_pod_spec(&mut spec["template"]["spec"]);
            }
        }
        "apps/v1/daemonsets" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            let spec = &mut obj["spec"];
            set_default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            set_default(spec, "revisionHistoryLimit", json!(10));
            if spec["template"]["spec"].is_object() {
                default_pod_spec(&mut spec["template"]["spec"]);
            }
        }
        "apps/v1/replicasets" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({});
            }
            set_default(&mut obj["spec"], "replicas", json!(1));
            if obj["spec"]["template"]["spec"].is_object() {
                default_pod_spec(&mut obj["spec"]["template"]["spec"]);
            }
        }
        "core/v1/namespaces" => {
            if !obj["spec"].is_object() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            if !obj["status"].is_object() {
                obj["status"] = json!({"phase": "Active"});
            }
            if let Some(name) = obj["metadata"]["name"].as_str().map(String::from) {
                if !obj["metadata"]["labels"].is_object() {
                    obj["metadata"]["labels"] = json!({});
                }
                obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            }
        }
        "core/v1/secrets" => {
            set_default(obj, "type", json!("Opaque"));
            merge_string_data(obj);
        }
        "networking.k8s.io/v1/networkpolicies" => crate::networkpolicy::default(obj),
        _ => {}
    }
}

/// Resource quantities as the real API server stores them: always strings,
/// in canonical form (a YAML `cpu: 1` or `cpu: 0.5` arrives as a JSON
/// number; kube-rs and kubectl only ever see strings).
fn canonical_quantities(resources: &mut Value) {
    for field in ["limits", "requests"] {
        let Some(list) = resources.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        for (_, v) in list.iter_mut() {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => continue,
            };
            if let Some(c) = crate::quantity::canonical(&text) {
                *v = json!(c);
            }
        }
    }
}

/// `SetDefaults_Pod`: a container (or init container) with limits but no
/// request for a resource gets request = limit, per resource. On Pods
/// only, never on pod templates (Deployments, ReplicaSets), as the real
/// defaulter does.
fn default_pod_requests(spec: &mut Value) {
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            let Some(limits) = c["resources"]["limits"].as_object().cloned() else {
                continue;
            };
            if !c["resources"]["requests"].is_object() {
                c["resources"]["requests"] = json!({});
            }
            let requests = &mut c["resources"]["requests"];
            for (k, v) in limits {
                if requests.get(&k).is_none() {
                    requests[k] = v;
                }
            }
        }
    }
}

/// The pod's QoS class as `qos.GetPodQOS` computes it (cpu and memory of
/// containers and init containers; zero quantities ignored).
pub fn pod_qos_class(spec: &Value) -> &'static str {
    use crate::quantity::Quantity;
    use std::collections::BTreeMap;
    let mut requests: BTreeMap<&str, i128> = BTreeMap::new();
    let mut limits: BTreeMap<&str, i128> = BTreeMap::new();
    let mut guaranteed = true;
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for (field, sums) in [("requests", &mut requests), ("limits", &mut limits)] {
                let mut found = Vec::new();
                for res in ["cpu", "memory"] {
                    let q = c["resources"][field][res]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| c["resources"][field][res].as_i64().map(|n| n.to_string()))
                        .and_then(|s| Quantity::parse(&s));
                    if let Some(q) = q.filter(|q| q.nanos() > 0) {
                        *sums.entry(res).or_insert(0) += q.nanos();
                        found.push(res);
                    }
                }
                if field == "limits" && found.len() < 2 {
                    guaranteed = false;
                }
            }
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return "BestEffort";
    }
    if guaranteed
        && requests.len() == limits.len()
        && requests.iter().all(|(k, v)| limits.get(k) == Some(v))
    {
        return "Guaranteed";
    }
    "Burstable"
}

/// A Secret's `stringData` is merged into `data` (base64) and never
/// stored, as the real API server's conversion does.
fn merge_string_data(obj: &mut Value) {
    use base64::Engine;
    let Some(sd) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Some(sd) = sd.as_object() else { return };
    if sd.is_empty() {
        return;
    }
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (k, v) in sd {
        let s = v.as_str().unwrap_or("");
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(s));
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    if spec["serviceAccountName"].is_null() {
        let sa = spec["serviceAccount"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        spec["serviceAccountName"] = json!(sa);
    }
    if spec["serviceAccount"].is_null() {
        spec["serviceAccount"] = spec["serviceAccountName"].clone();
    }
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            for c in cs.iter_mut().filter(|c| c.is_object()) {
                let image = c["image"].as_str().unwrap_or("");
                let last = image.rsplit('/').next().unwrap_or("");
                let latest =
                    !last.contains(':') && !image.contains('@') || last.ends_with(":latest");
                set_default(
                    c,
                    "imagePullPolicy",
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                canonical_quantities(&mut c["resources"]);
                if let Some(ports) = c["ports"].as_array_mut() {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// What the real server lists for an unsupported port protocol.
pub(crate) const SUPPORTED_PORT_PROTOCOLS: &str = "supported values: \"SCTP\", \"TCP\", \"UDP\"";

const DNS_LABEL_RULE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

/// An EndpointSlice as the real validation checks it (after defaulting):
/// the address type, each endpoint's addresses (1 to 100, of that type),
/// and the ports (names RFC 1123 labels and unique, a known protocol).
fn validate_endpoint_slice(obj: &Value, errs: &mut Vec<String>) {
    let ty = obj["addressType"].as_str().unwrap_or("");
    match ty {
        "" => errs.push("addressType: Required value".to_string()),
        "IPv4" | "IPv6" | "FQDN" => {}
        other => errs.push(format!(
            "addressType: Unsupported value: {other:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
        )),
    }
    for (i, e) in obj["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addrs = e["addresses"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if addrs.is_empty() {
            errs.push(format!(
                "endpoints[{i}].addresses: Required value: must contain at least 1 address"
            ));
        } else if addrs.len() > 100 {
            errs.push(format!(
                "endpoints[{i}].addresses: Too many: {}: must have at most 100 items",
                addrs.len()
            ));
        }
        for (j, a) in addrs.iter().enumerate() {
            let a = a.as_str().unwrap_or("");
            let ok = match ty {
                "IPv4" => a.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => a.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => true,
            };
            if !ok {
                errs.push(format!(
                    "endpoints[{i}].addresses[{j}]: Invalid value: {a:?}: must be a valid {ty} address"
                ));
            }
        }
    }
    let mut names = HashSet::new();
    for (i, p) in obj["ports"].as_array().into_iter().flatten().enumerate() {
        let pname = p["name"].as_str().unwrap_or("");
        if !pname.is_empty() && !is_dns_label(pname) {
            errs.push(format!(
                "ports[{i}].name: Invalid value: {pname:?}: {DNS_LABEL_RULE}"
            ));
        }
        if !names.insert(pname.to_string()) {
            errs.push(format!("ports[{i}].name: Duplicate value: {pname:?}"));
        }
        let proto = p["protocol"].as_str().unwrap_or("");
        if !matches!(proto, "TCP" | "UDP" | "SCTP") {
            errs.push(format!(
                "ports[{i}].protocol: Unsupported value: {proto:?}: {SUPPORTED_PORT_PROTOCOLS}"
            ));
        }
    }
}

fn validate_pod_spec(prefix: &str, spec: &Value, errs: &mut Vec<String>) {
    let containers = spec["containers"].as_array();
    if containers.is_none_or(|c| c.is_empty()) {
        errs.push(format!("{prefix}.containers: Required value"));
        return;
    }
    let mut names = HashSet::new();
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let name = c["name"].as_str().unwrap_or("");
        if name.is_empty() {
            errs.push(format!("{prefix}.containers[{i}].name: Required value"));
        } else if !is_dns_label(name) {
            errs.push(format!(
                "{prefix}.containers[{i}].name: Invalid value: {name:?}: {DNS_LABEL_RULE}"
            ));
        } else if !names.insert(name.to_string()) {
            errs.push(format!(
                "{prefix}.containers[{i}].name: Duplicate value: {name:?}"
            ));
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            errs.push(format!("{prefix}.containers[{i}].image: Required value"));
        }
        for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
            match p["containerPort"].as_u64() {
                Some(n) if (1..=65535).contains(&n) => {}
                Some(n) => errs.push(format!(
                    "{prefix}.containers[{i}].ports[{j}].containerPort: Invalid value: {n}: must be between 1 and 65535, inclusive"
                )),
                None => errs.push(format!("{prefix}.containers[{i}].ports[{j}].containerPort: Required value")),
            }
        }
    }
}

/// Validation, as the real registry strategies do (the subset that matters
/// for the kinds the cluster runs).
pub fn validate(rt: &ResourceType, name: &str, obj: &Value) -> Result<(), ApiError> {
    let mut errs: Vec<String> = Vec::new();
    match rt.key().as_str() {
        "core/v1/pods" => validate_pod_spec("spec", &obj["spec"], &mut errs),
        "core/v1/services" => {
            let spec = &obj["spec"];
            let ty = spec["type"].as_str().unwrap_or("ClusterIP");
            if !matches!(
                ty,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                errs.push(format!(
                    "spec.type: Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
                ));
            }
            let headless = spec["clusterIP"] == "None";
            let ports = spec["ports"].as_array();
            if ports.is_none_or(|p| p.is_empty()) && !headless && ty != "ExternalName" {
                errs.push("spec.ports: Required value".to_string());
            }
            let ports = ports.map(Vec::as_slice).unwrap_or_default();
            let mut names = HashSet::new();
            for (i, p) in ports.iter().enumerate() {
                let pname = p["name"].as_str().unwrap_or("");
                if ports.len() > 1 && pname.is_empty() {
                    errs.push(format!("spec.ports[{i}].name: Required value"));
                } else if !pname.is_empty() && !is_dns_label(pname) {
                    // A Service port's name is an RFC 1123 label (not an
                    // IANA service name like a container port's).
                    errs.push(format!(
                        "spec.ports[{i}].name: Invalid value: {pname:?}: {DNS_LABEL_RULE}"
                    ));
                } else if !pname.is_empty() && !names.insert(pname.to_string()) {
                    errs.push(format!("spec.ports[{i}].name: Duplicate value: {pname:?}"));
                }
                match p["port"].as_u64() {
                    Some(n) if (1..=65535).contains(&n) => {}
                    Some(n) => errs.push(format!(
                        "spec.ports[{i}].port: Invalid value: {n}: must be between 1 and 65535, inclusive"
                    )),
                    None => errs.push(format!("spec.ports[{i}].port: Required value")),
                }
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                if !matches!(proto, "TCP" | "UDP" | "SCTP") {
                    errs.push(format!(
                        "spec.ports[{i}].protocol: Unsupported value: {proto:?}: {SUPPORTED_PORT_PROTOCOLS}"
                    ));
                }
            }
            if ty == "ExternalName" && spec["externalName"].as_str().is_none_or(str::is_empty) {
                errs.push("spec.externalName: Required value".to_string());
            }
        }
        "discovery.k8s.io/v1/endpointslices" => validate_endpoint_slice(obj, &mut errs),
        "apps/v1/deployments"
        | "apps/v1/replicasets"
        | "apps/v1/statefulsets"
        | "apps/v1/daemonsets" => {
            let spec = &obj["spec"];
            let sel = &spec["selector"];
            if !sel.is_object()
                || (sel["matchLabels"].is_null() && sel["matchExpressions"].is_null())
            {
                errs.push("spec.selector: Required value".to_string());
            } else {
                let labels = &spec["template"]["metadata"]["labels"];
                if !LabelSelector::from_object(sel).matches_labels(labels) {
                    errs.push(format!(
                        "spec.template.metadata.labels: Invalid value: {}: `selector` does not match template `labels`",
                        go_map(labels)
                    ));
                }
            }
            if let Some(r) = spec["replicas"].as_i64()
                && r < 0
            {
                errs.push(format!(
                    "spec.replicas: Invalid value: {r}: must be greater than or equal to 0"
                ));
            }
            validate_pod_spec("spec.template.spec", &spec["template"]["spec"], &mut errs);
        }
        "networking.k8s.io/v1/networkpolicies" => crate::networkpolicy::validate(obj, &mut errs),
        "rbac.authorization.k8s.io/v1/roles"
        | "rbac.authorization.k8s.io/v1/clusterroles"
        | "rbac.authorization.k8s.io/v1/rolebindings"
        | "rbac.authorization.k8s.io/v1/clusterrolebindings" => {
            crate::auth::validate(rt.kind, obj, &mut errs)
        }
        "core/v1/namespaces" if !name.is_empty() && !is_dns_label(name) => {
            errs.push(format!(
                "metadata.name: Invalid value: {name:?}: {DNS_LABEL_RULE}"
            ));
        }
        _ => {}
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_all(rt, name, &errs))
    }
}

/// The top-level fields each kind has, for `fieldValidation=Strict`
/// (`None`: not checked).
fn known_top_level(rt: &ResourceType) -> Option<&'static [&'static str]> {
    const COMMON: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];
    Some(match rt.kind {
        "Pod" | "Service" | "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet"
        | "Namespace" | "Node" => COMMON,
        "NetworkPolicy" => &["apiVersion", "kind", "metadata", "spec"],
        "ConfigMap" => &[
            "apiVersion",
            "kind",
            "metadata",
            "data",
            "binaryData",
            "immutable",
        ],
        "Secret" => &[
            "apiVersion",
            "kind",
            "metadata",
            "data",
            "stringData",
            "type",
            "immutable",
        ],
        "ServiceAccount" => &[
            "apiVersion",
            "kind",
            "metadata",
            "secrets",
            "imagePullSecrets",
            "automountServiceAccountToken",
        ],
        "Endpoints" => &["apiVersion", "kind", "metadata", "subsets"],
        "Role" | "ClusterRole" => &["apiVersion", "kind", "metadata", "rules", "aggregationRule"],
        "RoleBinding" | "ClusterRoleBinding" => {
            &["apiVersion", "kind", "metadata", "subjects", "roleRef"]
        }
        "EndpointSlice" => &[
            "apiVersion",
            "kind",
            "metadata",
            "addressType",
            "endpoints",
            "ports",
        ],
        _ => return None,
    })
}

/// `fieldValidation=Strict`: unknown top-level fields are a 400, as the
/// real server's strict decoding error.
pub fn check_strict_fields(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    let (Some(known), Some(m)) = (known_top_level(rt), obj.as_object()) else {
        return Ok(());
    };
    let unknown: Vec<String> = m
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("unknown field \"{k}\""))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            unknown.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let s = Store::new();
        for ns in ["default", "kube-system"] {
            s.create(
                must("core/v1/namespaces"),
                "",
                json!({"metadata": {"name": ns}}),
            )
            .expect("ns");
        }
        s
    }

    #[test]
    fn endpoint_slices_are_defaulted_and_validated_as_the_real_server_does() {
        let s = store();
        let es = must("discovery.k8s.io/v1/endpointslices");
        let ok = create(
            &s,
            es,
            "default",
            json!({"metadata": {"name": "web-a"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.9"]}],
            "ports": [{"port": 80}, {"name": "81-8081", "port": 8081, "protocol": "UDP"}]}),
        )
        .expect("a valid slice");
        assert_eq!(ok["ports"][0]["name"], "");
        assert_eq!(ok["ports"][0]["protocol"], "TCP");
        let mut changed = ok.clone();
        changed["addressType"] = json!("IPv6");
        changed["endpoints"] = json!([{"addresses": ["fd00::9"]}]);
        let err = update(&s, es, "default", "web-a", changed, false).expect_err("immutable");
        assert!(
            err.message
                .contains("addressType: Invalid value: \"IPv6\": field is immutable"),
            "{}",
            err.message
        );
        let cases = [
            (json!({"endpoints": []}), "addressType: Required value"),
            (
                json!({"addressType": "IPv5"}),
                "addressType: Unsupported value: \"IPv5\"",
            ),
            (
                json!({"addressType": "IPv4", "endpoints": [{"addresses": []}]}),
                "endpoints[0].addresses: Required value",
            ),
            (
                json!({"addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]}),
                "endpoints[0].addresses[0]: Invalid value: \"fd00::1\": must be a valid IPv4 address",
            ),
            (
                json!({"addressType": "IPv4", "ports": [{"name": "web.http", "port": 80}]}),
                "ports[0].name: Invalid value: \"web.http\"",
            ),
            (
                json!({"addressType": "IPv4", "ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]}),
                "ports[1].name: Duplicate value: \"http\"",
            ),
            (
                json!({"addressType": "IPv4", "ports": [{"port": 80}, {"port": 81}]}),
                "ports[1].name: Duplicate value: \"\"",
            ),
            (
                json!({"addressType": "IPv4", "ports": [{"port": 80, "protocol": "HTTP"}]}),
                "ports[0].protocol: Unsupported value: \"HTTP\"",
            ),
        ];
        for (i, (mut body, want)) in cases.into_iter().enumerate() {
            body["metadata"] = json!({"name": format!("bad-{i}")});
            let err = create(&s, es, "default", body).expect_err(want);
            assert_eq!(err.code, 422, "{want}");
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }

    #[test]
    fn service_allocation_and_immutability() {
        let s = store();
        let svc = must("core/v1/services");
        let dns = create(&s, svc, "kube-system", json!({"metadata": {"name": "kube-dns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}))
        .expect("dns");
        assert_eq!(dns["spec"]["clusterIP"], "10.96.0.10");
        let a = create(&s, svc, "default", json!({"metadata": {"name": "a"}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}}))
            .expect("a");
        let ip = a["spec"]["clusterIP"].as_str().expect("ip").to_string();
        assert_ne!(ip, "10.96.0.10");
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        let np = a["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .expect("nodePort");
        assert!((30000..=32767).contains(&np));
        let err = create(&s, svc, "default", json!({"metadata": {"name": "x"}, "spec": {"clusterIP": "1.2.3.4", "ports": [{"port": 80}]}}))
            .expect_err("out of range");
        assert_eq!(err.code, 422);
        assert_eq!(
            err.message,
            "Service \"x\" is invalid: spec.clusterIPs: Invalid value: []string{\"1.2.3.4\"}: failed to allocate IP 1.2.3.4: the provided IP (1.2.3.4) is not in the valid range. The range of valid IPs is 10.96.0.0/12"
        );
        let err = create(&s, svc, "default", json!({"metadata": {"name": "y"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}))
            .expect_err("taken");
        assert_eq!(err.code, 422);
        let err = create(&s, svc, "default", json!({"metadata": {"name": "z"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": np}]}}))
            .expect_err("taken port");
        assert_eq!(err.code, 422);
        // Patch omitting clusterIP keeps it; changing it is refused.
        let (p, _) = patch(
            &s,
            svc,
            "default",
            "a",
            PatchType::Merge,
            br#"{"spec":{"selector":{"app":"y"}}}"#,
            false,
            None,
            WriteOptions::default(),
        )
        .expect("patch");
        assert_eq!(p["spec"]["clusterIP"], ip.as_str());
        assert_eq!(p["spec"]["ports"][0]["nodePort"], np);
        let err = patch(
            &s,
            svc,
            "default",
            "a",
            PatchType::Merge,
            br#"{"spec":{"clusterIP":"10.96.0.99","clusterIPs":["10.96.0.99"]}}"#,
            false,
            None,
            WriteOptions::default(),
        )
        .expect_err("immutable");
        assert!(
            err.message.contains("may not change once set"),
            "{}",
            err.message
        );
        // Freed on delete.
        s.delete(svc, "kube-system", "kube-dns").expect("delete");
        create(&s, svc, "default", json!({"metadata": {"name": "y"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}))
            .expect("reuse");
        let err = create(
            &s,
            svc,
            "default",
            json!({"metadata": {"name": "noports"}, "spec": {}}),
        )
        .expect_err("ports");
        assert!(err.message.contains("spec.ports: Required value"));
        // Port names are RFC 1123 labels: what `kubectl create service`
        // makes passes, a name with a dot or a capital does not.
        create(&s, svc, "default", json!({"metadata": {"name": "kc"}, "spec": {"ports": [{"name": "81-8081", "port": 81}]}}))
            .expect("an RFC 1123 label");
        for bad in ["web.http", "Web", "-web"] {
            let err = create(&s, svc, "default", json!({"metadata": {"name": "badname"}, "spec": {"ports": [{"name": bad, "port": 81}]}}))
                .expect_err(bad);
            assert!(
                err.message.contains("spec.ports[0].name: Invalid value"),
                "{bad}: {}",
                err.message
            );
        }
    }

    #[test]
    fn deployment_defaults_and_validation() {
        let s = store();
        let d = must("apps/v1/deployments");
        let err = create(&s, d, "default", json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
        .expect_err("selector mismatch");
        assert!(
            err.message
                .contains("`selector` does not match template `labels`"),
            "{}",
            err.message
        );
        let ok = create(&s, d, "default", json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
        .expect("create");
        assert_eq!(ok["spec"]["replicas"], 1);
        assert_eq!(ok["spec"]["template"]["spec"]["restartPolicy"], "Always");
        let pod = create(&s, must("core/v1/pods"), "default", json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i:1", "ports": [{"containerPort": 80}]}]}}))
            .expect("pod");
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
        let err = create(
            &s,
            must("core/v1/pods"),
            "default",
            json!({"metadata": {"name": "q"}, "spec": {}}),
        )
        .expect_err("containers");
        assert_eq!(err.code, 422);
    }

    #[test]
    fn pod_requests_default_to_limits_on_pods_only() {
        let s = store();
        let spec = json!({"containers": [
            {"name": "a", "image": "i:1", "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}}},
            {"name": "b", "image": "i:1", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "250m"}}},
            {"name": "c", "image": "i:1"},
            {"name": "d", "image": "i:1", "resources": {"limits": {"cpu": 1, "memory": "1024Mi"}, "requests": {"cpu": 0.5}}}
        ]});
        let pod = create(
            &s,
            must("core/v1/pods"),
            "default",
            json!({"metadata": {"name": "r"}, "spec": spec.clone()}),
        )
        .expect("pod");
        let c = &pod["spec"]["containers"];
        assert_eq!(
            c[0]["resources"]["requests"],
            json!({"cpu": "500m", "memory": "64Mi"})
        );
        assert_eq!(
            c[1]["resources"]["requests"],
            json!({"cpu": "250m", "memory": "1Gi"})
        );
        assert_eq!(c[2]["resources"], json!({}));
        assert_eq!(
            c[3]["resources"],
            json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}})
        );
        assert_eq!(pod["status"]["qosClass"], "Burstable");
        let d = create(
            &s,
            must("apps/v1/deployments"),
            "default",
            json!({"metadata": {"name": "rd"}, "spec": {
            "selector": {"matchLabels": {"app": "rd"}},
            "template": {"metadata": {"labels": {"app": "rd"}}, "spec": spec}}}),
        )
        .expect("deployment");
        assert!(d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].is_null());

        let g = create(&s, must("core/v1/pods"), "default", json!({"metadata": {"name": "g"}, "spec": {"containers": [
            {"name": "a", "image": "i:1", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1000m"}}}]}}))
        .expect("pod");
        assert_eq!(g["status"]["qosClass"], "Guaranteed");
        let b = create(
            &s,
            must("core/v1/pods"),
            "default",
            json!({"metadata": {"name": "b"}, "spec": {"containers": [
            {"name": "a", "image": "i:1"}]}}),
        )
        .expect("pod");
        assert_eq!(b["status"]["qosClass"], "BestEffort");
    }

    #[test]
    fn secret_string_data_is_merged_into_data() {
        let s = store();
        let sec = create(
            &s,
            must("core/v1/secrets"),
            "default",
            json!({"metadata": {"name": "s"},
            "data": {"a": "YQ==", "b": "Yg=="}, "stringData": {"b": "B", "c": "x y"}}),
        )
        .expect("secret");
        assert!(sec.get("stringData").is_none());
        assert_eq!(sec["data"], json!({"a": "YQ==", "b": "Qg==", "c": "eCB5"}));
        assert_eq!(sec["type"], "Opaque");
    }
}
