//! A container's environment and volume files, computed the way the kubelet
//! computes them (`makeEnvironmentVariables`, the downward API, the
//! ConfigMap/Secret/projected volume plugins): pure functions over the
//! objects [`crate::workload`] reads.
//!
//! Environment, in the kubelet's order: `envFrom` sources (later wins),
//! then `env` (`$(VAR)` expanded against what came before and the service
//! variables), then the service-link variables of the namespace's Services
//! and the `kubernetes` Service for names not yet set. Nothing from the
//! image (PATH, HOME, `ENV` lines) or the runtime (HOSTNAME is the pod's
//! hostname: the caller adds it when a pod is known).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{
    Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, PodSpec,
    ResourceFieldSelector, Service,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A ConfigMap's or Secret's data as read, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `data` (and a ConfigMap's `binaryData`, kept apart: `envFrom` and
    /// key references read `data` only).
    Found {
        data: BTreeMap<String, Vec<u8>>,
        binary: BTreeMap<String, Vec<u8>>,
    },
    /// It does not exist.
    Missing,
    /// Reading it was refused (HTTP 403).
    Forbidden,
    /// Not read: `--skip-secrets`.
    Skipped,
}

/// Everything a container's environment and files are made from.
pub struct Inputs<'a> {
    /// The pod spec (a running pod's when there is one: it is what the
    /// kubelet used; else the workload's template, defaulted as the API
    /// server defaults a pod).
    pub spec: &'a PodSpec,
    /// The pod's metadata (a template's when there is no pod, with the
    /// namespace filled in).
    pub meta: &'a ObjectMeta,
    /// Whether `meta` and `status` come from a real pod.
    pub have_pod: bool,
    /// A running pod's IPs and its node's IPs.
    pub pod_ips: Vec<String>,
    pub host_ips: Vec<String>,
    /// ConfigMaps and Secrets of the namespace, by name, for every name
    /// the spec refers to.
    pub configmaps: &'a BTreeMap<String, Source>,
    pub secrets: &'a BTreeMap<String, Source>,
    /// The namespace's Services (for service links).
    pub services: &'a [Service],
    /// The `kubernetes` Service of the `default` namespace.
    pub master: Option<&'a Service>,
    /// The node's allocatable resources (limits the container does not
    /// set are the node's), when known.
    pub allocatable: Option<&'a BTreeMap<String, Quantity>>,
}

/// Why a variable or file could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A ConfigMap or Secret that is not optional does not exist, or lacks
    /// the key: the kubelet would refuse to start the container.
    #[error("{kind} {name} {}", match key { Some(k) => format!("has no key {k:?}"), None => "does not exist".to_string() })]
    Missing {
        kind: &'static str,
        name: String,
        key: Option<String>,
    },
    /// Reading a Secret (or ConfigMap) was refused.
    #[error("reading {kind} {name} was refused")]
    Forbidden { kind: &'static str, name: String },
    /// Needs a running pod (its name, uid, IPs, node).
    #[error("{what} needs a running pod ({field})")]
    NeedsPod { what: String, field: String },
    /// Needs the node's allocatable resources.
    #[error("{what} needs the node's allocatable {resource} (the container sets no limit)")]
    NeedsNode { what: String, resource: String },
    /// Something the kubelet itself would refuse, or burrow cannot do.
    #[error("{what}: {why}")]
    Unsupported { what: String, why: String },
}

/// What was left out, and why (with `--skip-secrets` or
/// `--allow-missing-pod-fields`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub what: String,
    pub why: String,
}

/// How lenient to be.
#[derive(Debug, Clone, Copy, Default)]
pub struct Leniency {
    /// Leave out what needs a pod or a node instead of failing.
    pub allow_missing_pod_fields: bool,
}

/// A container's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub vars: BTreeMap<String, String>,
    pub left_out: Vec<Left>,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, a reference
/// nothing defines stays as written, as does a `$(` never closed.
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(j) => {
                    let name = &body[..j];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The variable-name rule of current Kubernetes for `envFrom` keys:
/// printable ASCII except `=` (invalid keys are skipped, with an event).
fn is_env_name(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'=')
}

fn env_name(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

fn host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// The service-link variables of `services` (`envvars.FromServices`).
pub fn service_links<'s>(
    services: impl IntoIterator<Item = &'s Service>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|i| !i.is_empty() && *i != "None")
        else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let prefix = env_name(svc.metadata.name.as_deref().unwrap_or_default());
        out.insert(format!("{prefix}_SERVICE_HOST"), ip.to_string());
        out.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
        for p in ports {
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.insert(
                    format!("{prefix}_SERVICE_PORT_{}", env_name(n)),
                    p.port.to_string(),
                );
            }
        }
        for (i, p) in ports.iter().enumerate() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            let lower = proto.to_ascii_lowercase();
            let url = format!("{lower}://{}", host_port(ip, p.port));
            if i == 0 {
                out.insert(format!("{prefix}_PORT"), url.clone());
            }
            let pp = format!("{prefix}_PORT_{}_{}", p.port, proto.to_ascii_uppercase());
            out.insert(pp.clone(), url);
            out.insert(format!("{pp}_PROTO"), lower);
            out.insert(format!("{pp}_PORT"), p.port.to_string());
            out.insert(format!("{pp}_ADDR"), ip.to_string());
        }
    }
    out
}

/// Go's `%q` of a string (the downward API's label and annotation files).
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if c.is_control() => {
                let n = c as u32;
                if n < 0x80 {
                    let _ = write!(out, "\\x{n:02x}");
                } else if n < 0x10000 {
                    let _ = write!(out, "\\u{n:04x}");
                } else {
                    let _ = write!(out, "\\U{n:08x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `fieldpath.FormatMap`: sorted `k="v"` lines, no newline at the end.
fn format_map(m: Option<&BTreeMap<String, String>>) -> String {
    m.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A quantity as an exact fraction (num/den), positive values only.
fn quantity(q: &str) -> Option<(i128, i128)> {
    let q = q.trim();
    let (sign, q) = match q.strip_prefix('-') {
        Some(r) => (-1, r),
        None => (1, q.strip_prefix('+').unwrap_or(q)),
    };
    let end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(end);
    if number.is_empty() || number == "." {
        return None;
    }
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{int}{frac}");
    let mut num: i128 = digits.parse().ok()?;
    let mut den: i128 = 10i128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let pow = |base: i128, e: u32| base.checked_pow(e);
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let e = match suffix {
                "Ki" => 1,
                "Mi" => 2,
                "Gi" => 3,
                "Ti" => 4,
                "Pi" => 5,
                _ => 6,
            };
            num = num.checked_mul(pow(1024, e)?)?;
        }
        "n" => den = den.checked_mul(1_000_000_000)?,
        "u" => den = den.checked_mul(1_000_000)?,
        "m" => den = den.checked_mul(1_000)?,
        "k" => num = num.checked_mul(1_000)?,
        "M" => num = num.checked_mul(pow(10, 6)?)?,
        "G" => num = num.checked_mul(pow(10, 9)?)?,
        "T" => num = num.checked_mul(pow(10, 12)?)?,
        "P" => num = num.checked_mul(pow(10, 15)?)?,
        "E" => num = num.checked_mul(pow(10, 18)?)?,
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..].parse().ok()?;
            if e >= 0 {
                num = num.checked_mul(pow(10, e.unsigned_abs())?)?;
            } else {
                den = den.checked_mul(pow(10, e.unsigned_abs())?)?;
            }
        }
        _ => return None,
    }
    Some((sign * num, den))
}

fn ceil_div(a: i128, b: i128) -> i128 {
    if b == 0 {
        return 0;
    }
    let q = a / b;
    if (a % b != 0) && ((a > 0) == (b > 0)) {
        q + 1
    } else {
        q
    }
}

/// `ExtractContainerResourceValue` over a container whose unset limits are
/// the node's allocatable (`defaultPodLimitsForDownwardAPI`).
fn resource_value(
    sel: &ResourceFieldSelector,
    container: &Container,
    allocatable: Option<&BTreeMap<String, Quantity>>,
    what: &str,
) -> Result<String, Problem> {
    let unsupported = |why: String| Problem::Unsupported {
        what: what.to_string(),
        why,
    };
    let (class, name) = sel
        .resource
        .split_once('.')
        .ok_or_else(|| unsupported(format!("unknown resource {:?}", sel.resource)))?;
    let res = container.resources.as_ref();
    let set = match class {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(unsupported(format!("unknown resource {:?}", sel.resource))),
    };
    let defaults_to_node = ["cpu", "memory", "ephemeral-storage"].contains(&name);
    if !defaults_to_node && !name.starts_with("hugepages-") {
        return Err(unsupported(format!(
            "unsupported resource {:?}",
            sel.resource
        )));
    }
    let value = match set.and_then(|m| m.get(name)) {
        Some(q) => q.0.clone(),
        None if class == "limits" && defaults_to_node => {
            match allocatable.and_then(|a| a.get(name)) {
                Some(q) => q.0.clone(),
                None => {
                    return Err(Problem::NeedsNode {
                        what: what.to_string(),
                        resource: name.to_string(),
                    });
                }
            }
        }
        None => "0".to_string(),
    };
    let (num, den) =
        quantity(&value).ok_or_else(|| unsupported(format!("bad quantity {value:?}")))?;
    let divisor = sel
        .divisor
        .as_ref()
        .map(|q| q.0.as_str())
        .filter(|d| quantity(d).is_some_and(|(n, _)| n != 0))
        .unwrap_or("1");
    let (dn, dd) =
        quantity(divisor).ok_or_else(|| unsupported(format!("bad divisor {divisor:?}")))?;
    let out = if name == "cpu" {
        // ceil(milli(value) / milli(divisor)), each milli rounded up.
        let milli = ceil_div(num * 1000, den);
        let dmilli = ceil_div(dn * 1000, dd);
        ceil_div(milli, dmilli)
    } else {
        let v = ceil_div(num, den);
        let d = ceil_div(dn, dd);
        ceil_div(v, d)
    };
    Ok(out.to_string())
}

impl Inputs<'_> {
    fn field(&self, sel: &ObjectFieldSelector, what: &str) -> Result<String, Problem> {
        let path = sel.field_path.as_str();
        let needs_pod = || Problem::NeedsPod {
            what: what.to_string(),
            field: path.to_string(),
        };
        let key = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        let m = self.meta;
        Ok(match path {
            "metadata.name" if self.have_pod => m.name.clone().unwrap_or_default(),
            "metadata.uid" if self.have_pod => m.uid.clone().unwrap_or_default(),
            "metadata.name" | "metadata.uid" => return Err(needs_pod()),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.labels" => format_map(m.labels.as_ref()),
            "metadata.annotations" => format_map(m.annotations.as_ref()),
            "spec.serviceAccountName" => self
                .spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            "spec.nodeName" if self.have_pod => self.spec.node_name.clone().unwrap_or_default(),
            "status.podIP" if self.have_pod => self.pod_ips.first().cloned().unwrap_or_default(),
            "status.podIPs" if self.have_pod => self.pod_ips.join(","),
            "status.hostIP" if self.have_pod => self.host_ips.first().cloned().unwrap_or_default(),
            "status.hostIPs" if self.have_pod => self.host_ips.join(","),
            "spec.nodeName" | "status.podIP" | "status.podIPs" | "status.hostIP"
            | "status.hostIPs" => return Err(needs_pod()),
            _ => {
                if let Some(k) = key("metadata.labels['") {
                    m.labels
                        .as_ref()
                        .and_then(|l| l.get(&k))
                        .cloned()
                        .unwrap_or_default()
                } else if let Some(k) = key("metadata.annotations['") {
                    m.annotations
                        .as_ref()
                        .and_then(|l| l.get(&k))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    return Err(Problem::Unsupported {
                        what: what.to_string(),
                        why: format!("fieldPath {path:?} is not one Kubernetes supports"),
                    });
                }
            }
        })
    }

    fn container_named(&self, name: &str) -> Option<&Container> {
        self.spec
            .containers
            .iter()
            .chain(self.spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
    }

    fn resource(
        &self,
        sel: &ResourceFieldSelector,
        own: Option<&Container>,
        what: &str,
    ) -> Result<String, Problem> {
        let container = match sel.container_name.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => self
                .container_named(n)
                .ok_or_else(|| Problem::Unsupported {
                    what: what.to_string(),
                    why: format!("no container {n:?} in the pod"),
                })?,
            None => own.ok_or_else(|| Problem::Unsupported {
                what: what.to_string(),
                why: "a volume's resourceFieldRef must name its container".into(),
            })?,
        };
        resource_value(sel, container, self.allocatable, what)
    }

    /// `kind` is "ConfigMap" or "Secret".
    fn source(&self, kind: &'static str, name: &str) -> &Source {
        static MISSING: Source = Source::Missing;
        let map = if kind == "Secret" {
            self.secrets
        } else {
            self.configmaps
        };
        map.get(name).unwrap_or(&MISSING)
    }

    /// A ConfigMap's or Secret's (`data`, `binaryData`) for `what`; None
    /// when it may be left out (optional and missing; not read, which is
    /// said in `left`); a missing non-optional one or a refused read fails.
    fn read(
        &self,
        kind: &'static str,
        name: &str,
        optional: bool,
        what: &str,
        left: &mut Vec<Left>,
    ) -> Result<Option<(&Data, &Data)>, Problem> {
        match self.source(kind, name) {
            Source::Found { data, binary } => Ok(Some((data, binary))),
            Source::Missing if optional => Ok(None),
            Source::Missing => Err(Problem::Missing {
                kind,
                name: name.to_string(),
                key: None,
            }),
            Source::Forbidden => Err(Problem::Forbidden {
                kind,
                name: name.to_string(),
            }),
            Source::Skipped => {
                left.push(Left {
                    what: what.to_string(),
                    why: format!("{kind} {name} not read (--skip-secrets)"),
                });
                Ok(None)
            }
        }
    }
}

/// A ConfigMap's or Secret's keys and values.
type Data = BTreeMap<String, Vec<u8>>;

/// Turns a problem into a left-out entry when it may be (a value only the
/// node knows; with `--allow-missing-pod-fields`, one only a pod knows),
/// else fails.
fn tolerate(p: Problem, lenient: Leniency, left: &mut Vec<Left>) -> Result<(), Problem> {
    match &p {
        // The node is often not readable (`view` cannot): said, not fatal.
        Problem::NeedsNode { what, resource } => {
            left.push(Left {
                what: what.clone(),
                why: format!("the node's allocatable {resource} (the container sets no limit)"),
            });
            Ok(())
        }
        Problem::NeedsPod { what, field } if lenient.allow_missing_pod_fields => {
            left.push(Left {
                what: what.clone(),
                why: format!("needs a running pod ({field})"),
            });
            Ok(())
        }
        _ => Err(p),
    }
}

/// The environment of `container` as the kubelet builds it.
pub fn environment(
    inputs: &Inputs<'_>,
    container: &Container,
    lenient: Leniency,
) -> Result<Environment, Problem> {
    let mut left = Vec::new();
    let links = inputs.spec.enable_service_links != Some(false);
    let service_env = service_links(
        inputs
            .master
            .into_iter()
            .chain(inputs.services.iter().filter(|_| links)),
    );
    let mut tmp: BTreeMap<String, String> = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        let (kind, name, optional) = if let Some(r) = &from.config_map_ref {
            ("ConfigMap", r.name.as_str(), r.optional == Some(true))
        } else if let Some(r) = &from.secret_ref {
            ("Secret", r.name.as_str(), r.optional == Some(true))
        } else {
            continue;
        };
        let what = format!("envFrom {kind} {name}");
        if let Some((data, _)) = inputs.read(kind, name, optional, &what, &mut left)? {
            for (k, v) in data {
                let k = format!("{prefix}{k}");
                if is_env_name(&k) {
                    tmp.insert(k, lossy(v));
                }
            }
        }
    }
    for e in container.env.iter().flatten() {
        let what = format!("variable {}", e.name);
        let value = match &e.value_from {
            None => {
                let raw = e.value.as_deref().unwrap_or("");
                let lookup = |n: &str| tmp.get(n).or_else(|| service_env.get(n)).cloned();
                Some(expand(raw, &lookup))
            }
            Some(vf) => {
                let mut keyed = |kind: &'static str, name: &str, key: &str, optional: bool| {
                    let Some((data, _)) = inputs.read(kind, name, optional, &what, &mut left)?
                    else {
                        return Ok(None);
                    };
                    match data.get(key) {
                        Some(v) => Ok(Some(lossy(v))),
                        None if optional => Ok(None),
                        None => Err(Problem::Missing {
                            kind,
                            name: name.to_string(),
                            key: Some(key.to_string()),
                        }),
                    }
                };
                let got = if let Some(r) = &vf.config_map_key_ref {
                    keyed("ConfigMap", &r.name, &r.key, r.optional == Some(true))
                } else if let Some(r) = &vf.secret_key_ref {
                    keyed("Secret", &r.name, &r.key, r.optional == Some(true))
                } else if let Some(f) = &vf.field_ref {
                    inputs.field(f, &what).map(Some)
                } else if let Some(r) = &vf.resource_field_ref {
                    inputs.resource(r, Some(container), &what).map(Some)
                } else {
                    Ok(None)
                };
                match got {
                    Ok(v) => v,
                    Err(p) => {
                        tolerate(p, lenient, &mut left)?;
                        None
                    }
                }
            }
        };
        if let Some(v) = value {
            tmp.insert(e.name.clone(), v);
        }
    }
    for (k, v) in service_env {
        tmp.entry(k).or_insert(v);
    }
    Ok(Environment {
        vars: tmp,
        left_out: left,
    })
}

/// One file of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Relative to the volume's root, `/`-separated, no `..`.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// What a volume mount shows a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Files (ConfigMap, Secret, downward API, projected).
    Files(Vec<File>),
    /// An empty writable directory (emptyDir).
    Empty,
}

/// One of the container's volume mounts, with what it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub mount_path: String,
    /// `subPath` (or the expanded `subPathExpr`): a file or directory of
    /// the volume, mounted alone.
    pub sub_path: Option<String>,
    pub read_only: bool,
    /// Holds Secret material.
    pub secret: bool,
    pub content: Content,
}

/// A relative path without `..`, `.` or empty parts.
fn clean_rel(p: &str) -> Option<String> {
    let parts: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|s| *s == "." || *s == "..") {
        return None;
    }
    Some(parts.join("/"))
}

/// A ConfigMap or Secret as a volume (or a projected source) names it.
struct Keyed<'a> {
    kind: &'static str,
    name: &'a str,
    items: Option<&'a [KeyToPath]>,
    optional: bool,
    mode: u32,
}

fn keyed_files(
    inputs: &Inputs<'_>,
    r: Keyed<'_>,
    what: &str,
    out: &mut Vec<File>,
    left: &mut Vec<Left>,
) -> Result<(), Problem> {
    let Keyed {
        kind,
        name,
        items,
        optional,
        mode,
    } = r;
    let Some((data, binary)) = inputs.read(kind, name, optional, what, left)? else {
        return Ok(());
    };
    let get = |k: &str| data.get(k).or_else(|| binary.get(k));
    match items {
        Some(items) => {
            for it in items {
                match get(&it.key) {
                    Some(b) => {
                        let path = clean_rel(&it.path).ok_or_else(|| Problem::Unsupported {
                            what: what.to_string(),
                            why: format!("bad item path {:?}", it.path),
                        })?;
                        let m = it.mode.map(|m| m as u32).unwrap_or(mode);
                        out.push(File {
                            path,
                            data: b.clone(),
                            mode: m,
                        });
                    }
                    None if optional => {}
                    None => {
                        return Err(Problem::Missing {
                            kind,
                            name: name.to_string(),
                            key: Some(it.key.clone()),
                        });
                    }
                }
            }
        }
        None => {
            for (k, b) in data.iter().chain(binary.iter()) {
                if let Some(path) = clean_rel(k) {
                    out.push(File {
                        path,
                        data: b.clone(),
                        mode,
                    });
                }
            }
        }
    }
    Ok(())
}

fn downward_files(
    inputs: &Inputs<'_>,
    items: &[DownwardAPIVolumeFile],
    mode: u32,
    what: &str,
    out: &mut Vec<File>,
) -> Result<(), Problem> {
    for it in items {
        let path = clean_rel(&it.path).ok_or_else(|| Problem::Unsupported {
            what: what.to_string(),
            why: format!("bad item path {:?}", it.path),
        })?;
        let value = if let Some(f) = &it.field_ref {
            inputs.field(f, what)?
        } else if let Some(r) = &it.resource_field_ref {
            inputs.resource(r, None, what)?
        } else {
            continue;
        };
        out.push(File {
            path,
            data: value.into_bytes(),
            mode: it.mode.map(|m| m as u32).unwrap_or(mode),
        });
    }
    Ok(())
}

/// The container's volume mounts with what each shows. Volumes burrow
/// cannot show on the laptop (PersistentVolumeClaims, hostPath, service
/// account tokens, ...) are left out and said.
pub fn mounts(
    inputs: &Inputs<'_>,
    container: &Container,
    env: &BTreeMap<String, String>,
    lenient: Leniency,
) -> Result<(Vec<Mount>, Vec<Left>), Problem> {
    let mut out = Vec::new();
    let mut left = Vec::new();
    let fs_group = inputs
        .spec
        .security_context
        .as_ref()
        .and_then(|s| s.fs_group)
        .is_some();
    for vm in container.volume_mounts.iter().flatten() {
        let what = format!("volume {} at {}", vm.name, vm.mount_path);
        let Some(vol) = inputs
            .spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == vm.name)
        else {
            return Err(Problem::Unsupported {
                what,
                why: "the pod has no such volume".into(),
            });
        };
        let mut files = Vec::new();
        let mut secret = false;
        let mut result: Result<Option<Content>, Problem> = Ok(None);
        if let Some(cm) = &vol.config_map {
            let mode = cm.default_mode.map(|m| m as u32).unwrap_or(0o644);
            result = keyed_files(
                inputs,
                Keyed {
                    kind: "ConfigMap",
                    name: &cm.name,
                    items: cm.items.as_deref(),
                    optional: cm.optional == Some(true),
                    mode,
                },
                &what,
                &mut files,
                &mut left,
            )
            .map(|()| None);
        } else if let Some(s) = &vol.secret {
            secret = true;
            let name = s.secret_name.as_deref().unwrap_or_default();
            if inputs.source("Secret", name) == &Source::Skipped {
                left.push(Left {
                    what: what.clone(),
                    why: format!("Secret {name} not read (--skip-secrets)"),
                });
                continue;
            }
            let mode = s.default_mode.map(|m| m as u32).unwrap_or(0o644);
            result = keyed_files(
                inputs,
                Keyed {
                    kind: "Secret",
                    name: s.secret_name.as_deref().unwrap_or_default(),
                    items: s.items.as_deref(),
                    optional: s.optional == Some(true),
                    mode,
                },
                &what,
                &mut files,
                &mut left,
            )
            .map(|()| None);
        } else if let Some(d) = &vol.downward_api {
            let mode = d.default_mode.map(|m| m as u32).unwrap_or(0o644);
            result = downward_files(
                inputs,
                d.items.as_deref().unwrap_or_default(),
                mode,
                &what,
                &mut files,
            )
            .map(|()| None);
        } else if let Some(p) = &vol.projected {
            let mode = p.default_mode.map(|m| m as u32).unwrap_or(0o644);
            for s in p.sources.iter().flatten() {
                let r = if let Some(cm) = &s.config_map {
                    keyed_files(
                        inputs,
                        Keyed {
                            kind: "ConfigMap",
                            name: &cm.name,
                            items: cm.items.as_deref(),
                            optional: cm.optional == Some(true),
                            mode,
                        },
                        &what,
                        &mut files,
                        &mut left,
                    )
                } else if let Some(sec) = &s.secret {
                    secret = true;
                    keyed_files(
                        inputs,
                        Keyed {
                            kind: "Secret",
                            name: &sec.name,
                            items: sec.items.as_deref(),
                            optional: sec.optional == Some(true),
                            mode,
                        },
                        &what,
                        &mut files,
                        &mut left,
                    )
                } else if let Some(d) = &s.downward_api {
                    downward_files(
                        inputs,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                        &what,
                        &mut files,
                    )
                } else if let Some(t) = &s.service_account_token {
                    left.push(Left {
                        what: format!("{what}: {}", t.path),
                        why: "a service account token is not handed to the laptop".into(),
                    });
                    Ok(())
                } else {
                    left.push(Left {
                        what: what.clone(),
                        why: "this projected source is not supported".into(),
                    });
                    Ok(())
                };
                if let Err(e) = r {
                    result = Err(e);
                    break;
                }
            }
        } else if vol.empty_dir.is_some() {
            result = Ok(Some(Content::Empty));
        } else {
            left.push(Left {
                what: what.clone(),
                why: "only ConfigMap, Secret, downward API, projected and emptyDir volumes are \
                      made on the laptop"
                    .into(),
            });
            continue;
        }
        let content = match result {
            Ok(Some(c)) => c,
            Ok(None) => {
                if fs_group {
                    // SetVolumeOwnership on a read-only volume: group read.
                    for f in &mut files {
                        f.mode |= 0o440;
                    }
                }
                Content::Files(files)
            }
            Err(p) => {
                tolerate(p, lenient, &mut left)?;
                continue;
            }
        };
        let sub = match (&vm.sub_path, &vm.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => Some(s.clone()),
            (_, Some(e)) if !e.is_empty() => Some(expand(e, &|n| env.get(n).cloned())),
            _ => None,
        };
        let sub_path = match sub {
            None => None,
            Some(s) => Some(clean_rel(&s).ok_or_else(|| Problem::Unsupported {
                what: what.clone(),
                why: format!("bad subPath {s:?}"),
            })?),
        };
        let read_only = vm.read_only == Some(true) || !matches!(content, Content::Empty);
        out.push(Mount {
            volume: vm.name.clone(),
            mount_path: vm.mount_path.clone(),
            sub_path,
            read_only,
            secret,
            content,
        });
    }
    Ok((out, left))
}

/// The names of the ConfigMaps and Secrets a container refers to (env,
/// envFrom and its mounted volumes), to read before [`environment`].
pub fn referenced(spec: &PodSpec, container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for f in container.env_from.iter().flatten() {
        if let Some(r) = &f.config_map_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &f.secret_ref {
            secrets.insert(r.name.clone());
        }
    }
    for e in container.env.iter().flatten() {
        if let Some(vf) = &e.value_from {
            if let Some(r) = &vf.config_map_key_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &vf.secret_key_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    let mounted: BTreeSet<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    for v in spec.volumes.iter().flatten() {
        if !mounted.contains(v.name.as_str()) {
            continue;
        }
        if let Some(c) = &v.config_map {
            cms.insert(c.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            secrets.insert(s);
        }
        for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &s.config_map {
                cms.insert(c.name.clone());
            }
            if let Some(c) = &s.secret {
                secrets.insert(c.name.clone());
            }
        }
    }
    (cms, secrets)
}

/// Whether the environment needs the node (a limit the container does not
/// set).
pub fn needs_node(spec: &PodSpec, container: &Container) -> bool {
    let unset = |c: &Container, r: &ResourceFieldSelector| {
        let Some(name) = r.resource.strip_prefix("limits.") else {
            return false;
        };
        let c = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => match spec.containers.iter().find(|x| x.name == n) {
                Some(x) => x,
                None => return false,
            },
            None => c,
        };
        !c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| l.contains_key(name))
    };
    let env = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.resource_field_ref.as_ref())
        .any(|r| unset(container, r));
    let mounted: BTreeSet<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    let vols = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| mounted.contains(v.name.as_str()))
        .flat_map(|v| {
            let direct = v.downward_api.iter().flat_map(|d| d.items.iter().flatten());
            let projected = v
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .flat_map(|s| s.downward_api.iter().flat_map(|d| d.items.iter().flatten()));
            direct.chain(projected).collect::<Vec<_>>()
        })
        .filter_map(|i| i.resource_field_ref.as_ref())
        .any(|r| unset(container, r));
    env || vols
}

/// The API server's defaulting of a pod's containers (`SetDefaults_Pod`),
/// for a template read without a pod: requests default to limits.
pub fn default_like_a_pod(spec: &mut PodSpec) {
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(r) = c.resources.as_mut()
            && let Some(limits) = r.limits.clone()
        {
            let req = r.requests.get_or_insert_with(BTreeMap::new);
            for (k, v) in limits {
                req.entry(k).or_insert(v);
            }
        }
    }
    if spec
        .service_account_name
        .as_deref()
        .unwrap_or("")
        .is_empty()
    {
        spec.service_account_name = Some("default".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).expect("container")
    }

    fn found(pairs: &[(&str, &str)]) -> Source {
        Source::Found {
            data: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            binary: BTreeMap::new(),
        }
    }

    struct World {
        spec: PodSpec,
        meta: ObjectMeta,
        cms: BTreeMap<String, Source>,
        secrets: BTreeMap<String, Source>,
        services: Vec<Service>,
        master: Service,
        alloc: BTreeMap<String, Quantity>,
    }

    fn world() -> World {
        let svc = |name: &str, ip: &str, ports: serde_json::Value| -> Service {
            serde_json::from_value(
                json!({"metadata": {"name": name}, "spec": {"clusterIP": ip, "ports": ports}}),
            )
            .expect("svc")
        };
        World {
            spec: serde_json::from_value(
                json!({"containers": [], "nodeName": "node-1", "serviceAccountName": "sa"}),
            )
            .expect("spec"),
            meta: serde_json::from_value(
                json!({"name": "api-1", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "api", "tier": "b\"e"}, "annotations": {"note": "x"}}),
            )
            .expect("meta"),
            cms: [(
                "cfg".to_string(),
                found(&[("A", "1"), ("B", "2"), ("bad=key", "z")]),
            )]
            .into(),
            secrets: [(
                "sec".to_string(),
                found(&[("TOKEN", "s3cr3t"), ("B", "from-secret")]),
            )]
            .into(),
            services: vec![
                svc(
                    "web-front",
                    "10.96.0.5",
                    json!([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
                ),
                svc("headless", "None", json!([{"port": 80}])),
            ],
            master: svc(
                "kubernetes",
                "10.96.0.1",
                json!([{"name": "https", "port": 443}]),
            ),
            alloc: [
                ("cpu".to_string(), Quantity("2".into())),
                ("memory".to_string(), Quantity("4Gi".into())),
            ]
            .into(),
        }
    }

    fn inputs(w: &World) -> Inputs<'_> {
        Inputs {
            spec: &w.spec,
            meta: &w.meta,
            have_pod: true,
            pod_ips: vec!["10.244.0.7".into(), "fd00::7".into()],
            host_ips: vec!["192.168.240.1".into()],
            configmaps: &w.cms,
            secrets: &w.secrets,
            services: &w.services,
            master: Some(&w.master),
            allocatable: Some(&w.alloc),
        }
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        let l = |n: &str| env.get(n).cloned();
        assert_eq!(expand("$(A)-$(B)", &l), "x-$(B)");
        assert_eq!(expand("$$(A) $$ $x $(A", &l), "$(A) $ $x $(A");
        assert_eq!(expand("a$", &l), "a$");
    }

    #[test]
    fn environment_in_the_kubelets_order() {
        let w = world();
        let c = container(json!({"name": "c",
        "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "250m"}},
        "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"},
                    {"configMapRef": {"name": "gone", "optional": true}}],
        "env": [
            {"name": "A", "value": "over-$(B)-$(WEB_FRONT_SERVICE_HOST)-$$(A)-$(NOPE)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
            {"name": "TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "CPU_REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "CPU_REQ1", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": true}}},
            {"name": "TOK", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {"name": "WEB_FRONT_SERVICE_PORT", "value": "mine"},
            {"name": "EMPTY"}
        ]}));
        let env = environment(&inputs(&w), &c, Leniency::default())
            .expect("env")
            .vars;
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("A"), Some("over-2-10.96.0.5-$(A)-$(NOPE)"));
        assert_eq!(get("S_B"), Some("from-secret"));
        assert_eq!(get("bad=key"), None);
        assert_eq!(get("POD"), Some("api-1"));
        assert_eq!(get("IPS"), Some("10.244.0.7,fd00::7"));
        assert_eq!(get("TIER"), Some("b\"e"));
        assert_eq!(get("SA"), Some("sa"));
        assert_eq!(get("MEM"), Some("256"));
        assert_eq!(get("CPU_LIMIT"), Some("2"), "node allocatable");
        assert_eq!(get("CPU_REQ"), Some("250"));
        assert_eq!(get("CPU_REQ1"), Some("1"), "rounded up");
        assert_eq!(get("OPT"), None);
        assert_eq!(get("TOK"), Some("s3cr3t"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(
            get("WEB_FRONT_SERVICE_PORT"),
            Some("mine"),
            "env wins over links"
        );
        assert_eq!(get("WEB_FRONT_SERVICE_PORT_DNS"), Some("53"));
        assert_eq!(get("WEB_FRONT_PORT"), Some("tcp://10.96.0.5:80"));
        assert_eq!(get("WEB_FRONT_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
        assert_eq!(get("HEADLESS_SERVICE_HOST"), None);
    }

    #[test]
    fn service_links_can_be_off_but_kubernetes_stays() {
        let mut w = world();
        w.spec.enable_service_links = Some(false);
        let env = environment(
            &inputs(&w),
            &container(json!({"name": "c"})),
            Leniency::default(),
        )
        .expect("env")
        .vars;
        assert!(env.contains_key("KUBERNETES_SERVICE_HOST"));
        assert!(!env.contains_key("WEB_FRONT_SERVICE_HOST"));
    }

    #[test]
    fn missing_sources_and_pod_fields_are_named() {
        let w = world();
        let run =
            |c: serde_json::Value, i: &Inputs<'_>, l: Leniency| environment(i, &container(c), l);
        let i = inputs(&w);
        let e = run(json!({"name": "c", "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope"}}}]}), &i, Leniency::default())
            .expect_err("missing key");
        assert_eq!(e.to_string(), "ConfigMap cfg has no key \"nope\"");
        let e = run(
            json!({"name": "c", "envFrom": [{"secretRef": {"name": "gone"}}]}),
            &i,
            Leniency::default(),
        )
        .expect_err("missing secret");
        assert_eq!(e.to_string(), "Secret gone does not exist");
        let mut i = inputs(&w);
        i.have_pod = false;
        let c = json!({"name": "c", "env": [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]});
        assert!(matches!(
            run(c.clone(), &i, Leniency::default()),
            Err(Problem::NeedsPod { .. })
        ));
        let env = run(
            c,
            &i,
            Leniency {
                allow_missing_pod_fields: true,
            },
        )
        .expect("lenient");
        assert_eq!(env.vars.get("NS").map(String::as_str), Some("shop"));
        assert!(!env.vars.contains_key("IP"));
        assert_eq!(env.left_out.len(), 1);
        let mut secrets = BTreeMap::new();
        secrets.insert("sec".to_string(), Source::Forbidden);
        let mut i = inputs(&w);
        i.secrets = &secrets;
        let e = run(json!({"name": "c", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}}]}), &i, Leniency::default())
            .expect_err("forbidden");
        assert_eq!(
            e,
            Problem::Forbidden {
                kind: "Secret",
                name: "sec".into()
            }
        );
        secrets.insert("sec".to_string(), Source::Skipped);
        let mut i = inputs(&w);
        i.secrets = &secrets;
        let env = run(json!({"name": "c", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}}],
            "envFrom": [{"secretRef": {"name": "sec"}}]}), &i, Leniency::default())
        .expect("skipped");
        assert!(!env.vars.contains_key("T"));
        assert_eq!(env.left_out.len(), 2);
    }

    #[test]
    fn quantities_and_divisors() {
        let c = |r: serde_json::Value| container(json!({"name": "c", "resources": r}));
        let sel = |res: &str, div: Option<&str>| ResourceFieldSelector {
            resource: res.into(),
            divisor: div.map(|d| Quantity(d.into())),
            container_name: None,
        };
        let v = |r: serde_json::Value, res: &str, div: Option<&str>| {
            resource_value(&sel(res, div), &c(r), None, "x").expect("value")
        };
        assert_eq!(
            v(json!({"limits": {"cpu": "1500m"}}), "limits.cpu", None),
            "2"
        );
        assert_eq!(
            v(json!({"limits": {"cpu": "1.5"}}), "limits.cpu", Some("1m")),
            "1500"
        );
        assert_eq!(
            v(
                json!({"limits": {"memory": "1G"}}),
                "limits.memory",
                Some("1Mi")
            ),
            "954"
        );
        assert_eq!(
            v(
                json!({"limits": {"memory": "128Mi"}}),
                "limits.memory",
                None
            ),
            "134217728"
        );
        assert_eq!(
            v(
                json!({"requests": {"memory": "1e3"}}),
                "requests.memory",
                Some("1k")
            ),
            "1"
        );
        assert_eq!(v(json!({}), "requests.ephemeral-storage", None), "0");
        assert!(matches!(
            resource_value(&sel("limits.memory", None), &c(json!({})), None, "x"),
            Err(Problem::NeedsNode { .. })
        ));
    }

    #[test]
    fn volumes_as_the_kubelet_writes_them() {
        let mut w = world();
        w.spec = serde_json::from_value(json!({
            "securityContext": {"fsGroup": 2000},
            "containers": [],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "A", "path": "sub/a.txt"}]}},
                {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                {"name": "proj", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}, {"configMap": {"name": "cfg", "items": [{"key": "B", "path": "b"}]}}]}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "d"}}
            ]}))
        .expect("spec");
        let c = container(json!({"name": "c", "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app"},
            {"name": "sec", "mountPath": "/run/sec"},
            {"name": "info", "mountPath": "/etc/info"},
            {"name": "proj", "mountPath": "/etc/proj/b", "subPath": "b"},
            {"name": "scratch", "mountPath": "/scratch"},
            {"name": "data", "mountPath": "/data"}]}));
        let (m, left) =
            mounts(&inputs(&w), &c, &BTreeMap::new(), Leniency::default()).expect("mounts");
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[0].content,
            Content::Files(vec![File {
                path: "sub/a.txt".into(),
                data: b"1".to_vec(),
                mode: 0o644
            }])
        );
        assert!(m[1].secret);
        let Content::Files(f) = &m[1].content else {
            panic!("files")
        };
        assert!(f.iter().all(|f| f.mode == 0o440), "{f:?}");
        let Content::Files(f) = &m[2].content else {
            panic!("files")
        };
        assert_eq!(f[0].data, b"app=\"api\"\ntier=\"b\\\"e\"");
        assert_eq!(m[3].sub_path.as_deref(), Some("b"));
        assert_eq!(m[4].content, Content::Empty);
        assert!(!m[4].read_only);
        assert_eq!(left.len(), 2, "{left:?}");
        let (cms, secrets) = referenced(&w.spec, &c);
        assert_eq!(cms.into_iter().collect::<Vec<_>>(), ["cfg"]);
        assert_eq!(secrets.into_iter().collect::<Vec<_>>(), ["sec"]);
    }
}
