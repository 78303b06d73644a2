//! The one generic object store: JSON objects keyed by resource, namespace and
//! name; one resourceVersion counter; watch channels.
//!
//! Everything the REST layer and the controllers do goes through here, so the
//! order of events a watcher sees is the order in which writes happened, as
//! with etcd behind a real API server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::resources::ResourceType;

/// How many past events are kept so a watch can start from an older
/// resourceVersion; older ones get 410 Gone, as with etcd compaction.
const HISTORY: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change to one object, as a watcher receives it.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub rv: u64,
    pub kind: EventType,
    pub resource: &'static ResourceType,
    /// The object after the change (for `Deleted`: its last state, with the
    /// deletion's resourceVersion).
    pub object: Value,
}

impl WatchEvent {
    pub fn namespace(&self) -> &str {
        self.object["metadata"]["namespace"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or("")
    }
}

type Key = (String, String, String);

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, (&'static ResourceType, Value)>,
    history: VecDeque<WatchEvent>,
}

/// The object store. Cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<WatchEvent>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

fn key(rt: &ResourceType, ns: &str, name: &str) -> Key {
    let ns = if rt.namespaced { ns } else { "" };
    (rt.key(), ns.to_string(), name.to_string())
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn random_suffix(n: usize) -> String {
    use rand::Rng;
    // Kubernetes' generateName alphabet: no vowels, no confusable digits.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn uid() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// DNS-1123 subdomain, as Kubernetes requires of most object names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(65_536);
        Store {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
            }),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every
        // write is a single insert/remove), so poisoning is not fatal.
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The current resourceVersion (of the last write).
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn emit(&self, inner: &mut Inner, ev: WatchEvent) {
        inner.history.push_back(ev.clone());
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    /// Creates an object. Fills metadata (uid, creationTimestamp,
    /// resourceVersion, generation, namespace, name from generateName),
    /// apiVersion and kind.
    pub fn create(
        &self,
        rt: &'static ResourceType,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if obj.get("metadata").is_none_or(|m| !m.is_object()) {
            obj["metadata"] = json!({});
        }
        let mut inner = self.lock();
        if rt.namespaced {
            if ns.is_empty() {
                return Err(ApiError::bad_request(
                    "a namespace is required for a namespaced resource",
                ));
            }
            if let Some(body_ns) = obj["metadata"]["namespace"].as_str()
                && body_ns != ns
            {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            let ns_rt = crate::resources::must("core/v1/namespaces");
            if !inner.objects.contains_key(&key(ns_rt, "", ns)) {
                return Err(ApiError::not_found(ns_rt, ns));
            }
        }
        let mut name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        if name.is_empty()
            && let Some(prefix) = obj["metadata"]["generateName"].as_str()
        {
            let prefix = prefix.to_string();
            loop {
                let candidate = format!("{prefix}{}", random_suffix(5));
                if !inner.objects.contains_key(&key(rt, ns, &candidate)) {
                    name = candidate;
                    break;
                }
            }
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                rt,
                "",
                "metadata.name: Required value: name or generateName is required",
            ));
        }
        if rt.group == "rbac.authorization.k8s.io" {
            // RBAC names are path segments (`system:basic-user`).
            if name == "." || name == ".." || name.contains(['/', '%']) {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    &format!(
                        "metadata.name: Invalid value: \"{name}\": may not contain '/' or '%' and may not be '.' or '..'"
                    ),
                ));
            }
        } else if !valid_name(&name) {
            return Err(ApiError::invalid(
                rt,
                &name,
                &format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        let k = key(rt, ns, &name);
        if inner.objects.contains_key(&k) {
            return Err(ApiError::already_exists(rt, &name));
        }
        inner.rv += 1;
        let rv = inner.rv;
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if rt.namespaced {
            meta["namespace"] = json!(ns);
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        meta["uid"] = json!(uid());
        meta["creationTimestamp"] = json!(now());
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
        }
        inner.objects.insert(k, (rt, obj.clone()));
        self.emit(
            &mut inner,
            WatchEvent {
                rv,
                kind: EventType::Added,
                resource: rt,
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    pub fn get(&self, rt: &'static ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .objects
            .get(&key(rt, ns, name))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Lists objects of one resource, in one namespace or (with `None`) all,
    /// sorted by namespace and name, with the list's resourceVersion.
    pub fn list(&self, rt: &'static ResourceType, ns: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let rk = rt.key();
        let items = inner
            .objects
            .iter()
            .filter(|((r, n, _), _)| *r == rk && ns.is_none_or(|want| !rt.namespaced || n == want))
            .map(|(_, (_, v))| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Replaces an object (PUT). With `status_only`, only `.status` is taken
    /// from `obj`; otherwise, for resources with a status subresource, the
    /// stored status is kept. A resourceVersion in `obj` that differs from
    /// the stored one is a 409 Conflict.
    pub fn replace(
        &self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        obj: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        self.update_with(rt, ns, name, |current| {
            if let Some(want) = obj["metadata"]["resourceVersion"].as_str()
                && !want.is_empty() && current["metadata"]["resourceVersion"].as_str() != Some(want) {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
            if let Some(body_name) = obj["metadata"]["name"].as_str()
                && body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
            let mut next = obj.clone();
            if status_only {
                let mut kept = current.clone();
                kept["status"] = next.get("status").cloned().unwrap_or(Value::Null);
                next = kept;
            } else if rt.has_status() {
                match current.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            *current = next;
            Ok(())
        })
    }

    /// Read-modify-write under the store lock: `f` edits the stored object in
    /// place. Identity fields (name, namespace, uid, creationTimestamp) are
    /// kept; resourceVersion is bumped and `generation` too when `spec`
    /// changed. A no-op edit writes nothing and emits no event.
    pub fn update_with<F>(
        &self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
        f: F,
    ) -> Result<Value, ApiError>
    where
        F: FnOnce(&mut Value) -> Result<(), ApiError>,
    {
        let mut inner = self.lock();
        let k = key(rt, ns, name);
        let Some((_, stored)) = inner.objects.get(&k) else {
            return Err(ApiError::not_found(rt, name));
        };
        let before = stored.clone();
        let mut next = before.clone();
        f(&mut next)?;
        if !next.is_object() {
            return Err(ApiError::bad_request("the object must be a JSON object"));
        }
        if next.get("metadata").is_none_or(|m| !m.is_object()) {
            next["metadata"] = json!({});
        }
        next["apiVersion"] = json!(rt.api_version());
        next["kind"] = json!(rt.kind);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
        ] {
            match before["metadata"].get(field) {
                Some(v) => next["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        next["metadata"]["resourceVersion"] = before["metadata"]["resourceVersion"].clone();
        let generation = before["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation);
        if next == before {
            return Ok(before);
        }
        if next.get("spec") != before.get("spec") {
            next["metadata"]["generation"] = json!(generation + 1);
        }
        inner.rv += 1;
        let rv = inner.rv;
        next["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.objects.insert(k, (rt, next.clone()));
        self.emit(
            &mut inner,
            WatchEvent {
                rv,
                kind: EventType::Modified,
                resource: rt,
                object: next.clone(),
            },
        );
        Ok(next)
    }

    /// Deletes an object and, as the garbage collector would (background
    /// propagation), every object that names it in `ownerReferences`;
    /// deleting a Namespace deletes everything in it.
    pub fn delete(
        &self,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let deleted = self.delete_locked(&mut inner, rt, ns, name)?;
        Ok(deleted)
    }

    fn delete_locked(
        &self,
        inner: &mut Inner,
        rt: &'static ResourceType,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let k = key(rt, ns, name);
        let Some((_, mut obj)) = inner.objects.remove(&k) else {
            return Err(ApiError::not_found(rt, name));
        };
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(
            inner,
            WatchEvent {
                rv,
                kind: EventType::Deleted,
                resource: rt,
                object: obj.clone(),
            },
        );
        let uid = obj["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let is_namespace = rt.key() == "core/v1/namespaces";
        let dependents: Vec<(&'static ResourceType, String, String)> = inner
            .objects
            .iter()
            .filter(|((_, n, _), (_, v))| {
                (is_namespace && n == name)
                    || v["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| {
                            refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str()))
                        })
            })
            .map(|((_, n, nm), (rt, _))| (*rt, n.clone(), nm.clone()))
            .collect();
        for (drt, dns, dname) in dependents {
            // Already gone through another owner: fine.
            let _ = self.delete_locked(inner, drt, &dns, &dname);
        }
        Ok(obj)
    }

    /// Starts a watch. Events after `since_rv` that are still in history are
    /// returned first (410 Gone if history no longer reaches back that far);
    /// the receiver yields every later event of every resource: filter by
    /// `event.resource` and namespace.
    pub fn watch(
        &self,
        since_rv: Option<u64>,
    ) -> Result<(Vec<WatchEvent>, broadcast::Receiver<WatchEvent>), ApiError> {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let mut backlog = Vec::new();
        if let Some(since) = since_rv
            && since < inner.rv
        {
            let oldest = inner.history.front().map(|e| e.rv).unwrap_or(inner.rv + 1);
            if oldest > since + 1 && since < inner.rv {
                // Only gone if there were events we can no longer replay.
                if inner.history.len() >= HISTORY {
                    return Err(ApiError::gone(since));
                }
            }
            backlog = inner
                .history
                .iter()
                .filter(|e| e.rv > since)
                .cloned()
                .collect();
        }
        Ok((backlog, rx))
    }
}
