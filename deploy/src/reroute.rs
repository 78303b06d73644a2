//! The Kubernetes side of `burrow reroute`, done with the user's own
//! credentials (so their RBAC applies): find the Service and port, check
//! the user may patch it, create the shadow Service, point the Service at
//! the gateway, and restore it. What is changed and how it is recorded is
//! in `burrow_api::record` and `crate::service`, shared with the gateway, which restores
//! with its own credentials when a lease runs out.

use std::net::IpAddr;

use burrow_api::record::{
    self, MANAGED_BY, REROUTE_OF, SERVICE_NAME_LABEL, SLICE_MANAGED_BY, SLICE_MANAGER,
};
use burrow_api::{PortProtocol, Protocol, ServicePort, names};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::error::DeployError;
use crate::install::{FIELD_MANAGER, GatewayPod};
use crate::service::{self, Restored};
use crate::target::Cluster;

/// A Service port found by number or name.
#[derive(Debug, Clone)]
pub struct Found {
    pub service: Service,
    /// The chosen port.
    pub port: ServicePort,
    /// Every port of the Service (TCP and UDP).
    pub ports: Vec<ServicePort>,
}

impl Found {
    /// The protocol of the reroute `asked` for (`tcp` or `http`) with or
    /// without a header: a UDP port takes datagrams, globally only.
    pub fn protocol(&self, asked: Protocol, header: bool) -> Result<Protocol, DeployError> {
        let ns = self.service.metadata.namespace.clone().unwrap_or_default();
        let name = self.service.metadata.name.clone().unwrap_or_default();
        match self.port.protocol {
            PortProtocol::Tcp if header => Ok(Protocol::Http),
            PortProtocol::Tcp => Ok(asked),
            PortProtocol::Udp if header => Err(DeployError::new(
                burrow_api::header_udp_refusal(&ns, &name, self.port.port),
                "nothing was changed",
            )),
            PortProtocol::Udp if asked == Protocol::Http => Err(DeployError::new(
                format!(
                    "port {} of Service {ns}/{name} is UDP: --protocol http is for TCP ports",
                    self.port.port
                ),
                "leave --protocol out for a UDP port; nothing was changed",
            )),
            PortProtocol::Udp => Ok(Protocol::Udp),
        }
    }
}

fn describe_ports(svc: &Service) -> String {
    let ports: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            match &p.name {
                Some(n) if !n.is_empty() => format!("{} ({n}, {proto})", p.port),
                _ => format!("{} ({proto})", p.port),
            }
        })
        .collect();
    if ports.is_empty() {
        "none".into()
    } else {
        ports.join(", ")
    }
}

/// The Service `namespace/name` and its port `port`: a number or a name,
/// the number optionally with `/tcp` or `/udp` (needed when the Service has
/// both under that number).
pub async fn find(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    port: &str,
) -> Result<Found, DeployError> {
    check_names(namespace, name)?;
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
    let svc = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            let names: Vec<String> = api
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .filter(|s| {
                            !s.metadata
                                .labels
                                .as_ref()
                                .is_some_and(|l| l.contains_key(REROUTE_OF))
                        })
                        .filter_map(|s| s.metadata.name)
                        .collect()
                })
                .unwrap_or_default();
            let hint = if names.is_empty() {
                format!("namespace {namespace} has no Services; choose another with -n")
            } else {
                format!(
                    "Services in {namespace}: {}; choose another namespace with -n",
                    names.join(", ")
                )
            };
            return Err(DeployError::new(
                format!("Service {name} not found in namespace {namespace}"),
                hint,
            ));
        }
        Err(e) => {
            let mut err = cluster.err(e, &format!("get Service {namespace}/{name}"));
            if err.is_forbidden() {
                err.hint = format!(
                    "rerouting needs the ClusterRole `burrow-reroute` bound in namespace {namespace} \
                     (`get`, `patch`, `create`, `delete` on services and endpointslices, `get`/`delete` on endpoints); ask an \
                     admin (`burrow install` prints the binding); nothing was changed"
                );
            }
            return Err(err);
        }
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.cluster_ip.as_deref() == Some("None") {
        return Err(DeployError::new(
            format!(
                "Service {namespace}/{name} is headless: callers reach its pods directly, not through it"
            ),
            "reroute a Service with a ClusterIP",
        ));
    }
    let (chosen, ports) = choose_port(&svc, namespace, name, port)?;
    if record::saved(&svc).is_none() && spec.selector.as_ref().is_none_or(|s| s.is_empty()) {
        return Err(DeployError::new(
            format!(
                "Service {namespace}/{name} has no selector (its endpoints are managed by hand)"
            ),
            "burrow reroutes Services that select pods",
        ));
    }
    Ok(Found {
        port: chosen,
        ports,
        service: svc,
    })
}

/// The port `port` of `svc` (see [`find`]) and every port of it; refuses
/// a Service with ports of other protocols than TCP and UDP.
fn choose_port(
    svc: &Service,
    namespace: &str,
    name: &str,
    port: &str,
) -> Result<(ServicePort, Vec<ServicePort>), DeployError> {
    let spec = svc.spec.clone().unwrap_or_default();
    let all = spec.ports.clone().unwrap_or_default();
    let transport = |p: &k8s_openapi::api::core::v1::ServicePort| match p
        .protocol
        .as_deref()
        .unwrap_or("TCP")
    {
        "TCP" => Some(PortProtocol::Tcp),
        "UDP" => Some(PortProtocol::Udp),
        _ => None,
    };
    let (number, wanted) = match port.rsplit_once('/') {
        Some((n, p)) if p.eq_ignore_ascii_case("tcp") => (n, Some(PortProtocol::Tcp)),
        Some((n, p)) if p.eq_ignore_ascii_case("udp") => (n, Some(PortProtocol::Udp)),
        _ => (port, None),
    };
    let candidates: Vec<&k8s_openapi::api::core::v1::ServicePort> = all
        .iter()
        .filter(|p| match number.parse::<i32>() {
            Ok(n) => p.port == n,
            Err(_) => p.name.as_deref() == Some(number),
        })
        .filter(|p| wanted.is_none_or(|w| transport(p) == Some(w)))
        .collect();
    let chosen = match candidates.as_slice() {
        [] => {
            return Err(DeployError::new(
                format!("Service {namespace}/{name} has no port {port}"),
                format!("its ports: {}", describe_ports(svc)),
            ));
        }
        [one] => *one,
        _ => {
            return Err(DeployError::new(
                format!(
                    "Service {namespace}/{name} has port {number} for TCP and for UDP: say which"
                ),
                format!(
                    "--port {number}/udp:LOCALPORT or --port {number}/tcp:LOCALPORT, or the port's name; its ports: {}",
                    describe_ports(svc)
                ),
            ));
        }
    };
    let others: Vec<String> = all
        .iter()
        .filter(|p| transport(p).is_none())
        .map(|p| format!("{} ({})", p.port, p.protocol.clone().unwrap_or_default()))
        .collect();
    if !others.is_empty() {
        return Err(DeployError::new(
            format!(
                "Service {namespace}/{name} has ports burrow cannot pass on while it is rerouted: {} (burrow reroutes TCP and UDP)",
                others.join(", ")
            ),
            format!("its ports: {}; nothing was changed", describe_ports(svc)),
        ));
    }
    let sp = |p: &k8s_openapi::api::core::v1::ServicePort| ServicePort {
        name: p.name.clone().unwrap_or_default(),
        port: u16::try_from(p.port).unwrap_or(0),
        protocol: transport(p).unwrap_or_default(),
    };
    Ok((sp(chosen), all.iter().map(sp).collect()))
}

/// Refuses a namespace or Service name that is not a Kubernetes name (and
/// a Service name too long to give a shadow), before it reaches a URL.
pub fn check_names(namespace: &str, name: &str) -> Result<(), DeployError> {
    let hint = "nothing was changed; check the name with `kubectl get services -n NAMESPACE`";
    names::check_namespace(namespace).map_err(|e| DeployError::new(e, hint))?;
    names::check_rerouted_service(name).map_err(|e| DeployError::new(e, hint))
}

/// Writes this laptop's reroute record on `svc` with the user's
/// credentials (see `crate::service`): the gateway acts on the
/// Service for this laptop only while it carries it.
pub async fn write_record(
    cluster: &Cluster,
    svc: &Service,
    key: &burrow_api::WgKey,
    laptop: &str,
) -> Result<(), DeployError> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    check_names(&ns, &name)?;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let mut current = svc.clone();
    for _attempt in 0..5 {
        if record::record_of(&current, key).is_some() {
            return Ok(());
        }
        let patch = record::record_patch(&current, key, laptop)
            .map_err(|e| DeployError::new(format!("internal: record: {e}"), ""))?;
        let patch: kube_json_patch::Patch = serde_json::from_value(patch)
            .map_err(|e| DeployError::new(format!("internal: patch: {e}"), ""))?;
        match services
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => return Ok(()),
            // Changed under us: read it again.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                current = services
                    .get(&name)
                    .await
                    .map_err(|e| cluster.err(e, &format!("get Service {ns}/{name}")))?;
            }
            Err(e) => return Err(cluster.err(e, &format!("patch Service {ns}/{name}"))),
        }
    }
    Err(DeployError::new(
        format!("Service {ns}/{name} kept changing while burrow wrote its reroute record"),
        "try again",
    ))
}

/// Takes this laptop's reroute record off `namespace/name` (user's
/// credentials); when nobody reroutes the Service, burrow's leftovers go
/// too. For a reroute that did not come about, or that this laptop stopped
/// while others still reroute the Service.
pub async fn remove_record(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    key: &burrow_api::WgKey,
) -> Result<(), DeployError> {
    check_names(namespace, name)?;
    let doing = format!("remove this laptop's reroute record from Service {namespace}/{name}");
    service::remove_record(&cluster.client, namespace, name, key)
        .await
        .map_err(|e| cluster.err(e, &doing))?;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
    let svc = services
        .get_opt(name)
        .await
        .map_err(|e| cluster.err(e, &format!("get Service {namespace}/{name}")))?;
    if svc.as_ref().is_none_or(|s| record::saved(s).is_none()) {
        let uid = svc.and_then(|s| s.metadata.uid);
        service::remove_leftovers(&cluster.client, namespace, name, uid.as_deref())
            .await
            .map_err(|e| cluster.err(e, &doing))?;
    }
    Ok(())
}

/// Fails (403, naming what to ask for) unless the user may patch the
/// Service; changes nothing (a server-side dry run).
pub async fn check_may_patch(cluster: &Cluster, svc: &Service) -> Result<(), DeployError> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let pp = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    api.patch(&name, &pp, &Patch::Merge(json!({})))
        .await
        .map(drop)
        .map_err(|e| {
            let mut err = cluster.err(e, &format!("patch Service {ns}/{name}"));
            if err.is_forbidden() {
                err.hint = format!(
                    "rerouting changes the Service: ask a cluster admin for `patch` on `services` (and `create`/`delete` on `services` and `endpointslices.discovery.k8s.io`) (and `delete` on `endpoints`) in namespace {ns} — the ClusterRole `burrow-reroute` bound there has them; nothing was changed"
                );
            }
            err
        })
}

fn owner(svc: &Service) -> Value {
    json!([{
        "apiVersion": "v1",
        "kind": "Service",
        "name": svc.metadata.name,
        "uid": svc.metadata.uid,
    }])
}

/// The shadow Service of a rerouted Service, as [`ensure_shadow`] left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadow {
    pub cluster_ip: IpAddr,
    /// Made by this call and its slices list ready pods: kube-proxy may
    /// not route it yet (it writes a new Service's rules a second or more
    /// later), so the first connections to it may be refused or lost.
    /// Whoever hands callers to it should first see it answer
    /// ([`service::KUBE_PROXY_LAG`] is the usual lag).
    pub fresh: bool,
    /// Made by this call, but the endpoint-slice controller had not listed
    /// its pods within [`service::CONTROLLER_WAIT`] (a slow controller):
    /// `fresh` too, for it may well answer a moment later.
    pub unlisted: bool,
}

/// Creates (or finds) the shadow Service — the original selector and ports
/// — and returns its ClusterIP; a new one once the endpoint controller
/// lists its pods.
pub async fn ensure_shadow(cluster: &Cluster, svc: &Service) -> Result<Shadow, DeployError> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let shadow = record::shadow_name(&name);
    let selector = match record::saved(svc) {
        Some((_, saved)) => saved.original_selector,
        None => svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .unwrap_or_default(),
    };
    let ports: Vec<Value> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "port": p.port,
                "targetPort": p.target_port,
                "protocol": p.protocol,
            })
        })
        .collect();
    let body: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": shadow,
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, REROUTE_OF: name},
            "ownerReferences": owner(svc),
        },
        "spec": {"type": "ClusterIP", "selector": selector, "ports": ports},
    }))
    .map_err(|e| DeployError::new(format!("internal: shadow Service: {e}"), ""))?;
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let (made, fresh, unlisted) = match api.create(&PostParams::default(), &body).await {
        Ok(s) => {
            // New: routable only once kube-proxy has its rules.
            match service::await_shadow(&cluster.client, &ns, &name, s.metadata.uid.as_deref())
                .await
            {
                Some(pods) => (s, pods > 0, false),
                None => (s, true, true),
            }
        }
        Err(kube::Error::Api(s)) if s.code == 409 => (
            api.get(&shadow)
                .await
                .map_err(|e| cluster.err(e, &format!("get Service {ns}/{shadow}")))?,
            false,
            false,
        ),
        Err(e) => return Err(cluster.err(e, &format!("create Service {ns}/{shadow}"))),
    };
    let cluster_ip = made
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| {
            DeployError::new(
                format!("the shadow Service {ns}/{shadow} has no ClusterIP"),
                "look at it with `kubectl get svc -o yaml`",
            )
        })?;
    Ok(Shadow {
        cluster_ip,
        fresh,
        unlisted,
    })
}

/// Points `svc` at the gateway pod: burrow's EndpointSlice with the
/// gateway's listener for each port, then the selector off (saved in the
/// annotation, one patch), then the endpoint controllers' slices and the legacy Endpoints gone.
pub async fn point_at_gateway(
    cluster: &Cluster,
    svc: &Service,
    gateway: &GatewayPod,
    listeners: &[(ServicePort, u16)],
    by: &str,
) -> Result<(), DeployError> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let slice_name = record::slice_name(&name);
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": ns,
            "labels": {
                SERVICE_NAME_LABEL: name,
                SLICE_MANAGED_BY: SLICE_MANAGER,
                "app.kubernetes.io/managed-by": MANAGED_BY,
                REROUTE_OF: name,
            },
            "ownerReferences": owner(svc),
        },
        "addressType": if gateway.ip.contains(':') { "IPv6" } else { "IPv4" },
        "endpoints": [{
            "addresses": [gateway.ip],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": gateway.namespace, "name": gateway.name},
        }],
        "ports": listeners.iter().map(|(p, l)| json!({"name": p.name, "port": l, "protocol": p.protocol.as_k8s()})).collect::<Vec<_>>(),
    });
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), &ns);
    let apply = || async {
        slices
            .patch(
                &slice_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&slice),
            )
            .await
            .map(drop)
            .map_err(|e| cluster.err(e, &format!("apply EndpointSlice {ns}/{slice_name}")))
    };
    apply().await?;

    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &ns);
    let mut current = svc.clone();
    for _attempt in 0..3 {
        if record::saved(&current).is_some() {
            break;
        }
        let (patch, _) = record::reroute_patch(&current, by).map_err(|why| {
            DeployError::new(
                format!("cannot reroute Service {ns}/{name}: {why}"),
                "burrow reroutes Services that select pods",
            )
        })?;
        let patch: kube_json_patch::Patch = serde_json::from_value(patch)
            .map_err(|e| DeployError::new(format!("internal: patch: {e}"), ""))?;
        match services
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => break,
            // Changed under us (a concurrent reroute): look again.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                current = services
                    .get(&name)
                    .await
                    .map_err(|e| cluster.err(e, &format!("get Service {ns}/{name}")))?;
            }
            Err(e) => return Err(cluster.err(e, &format!("patch Service {ns}/{name}"))),
        }
    }
    // Without a selector the endpoint-slice controller stops managing its
    // slices but leaves them, the endpoints controller leaves its legacy
    // `Endpoints`, and the mirroring controller then mirrors that into a
    // slice of its own: remove them all (`service::remove_strays`), or
    // callers would still reach the pods. An in-flight sync of a
    // controller may still write after that: keep removing until nothing
    // comes back for a while (the gateway also watches while the reroute
    // holds), and put burrow's slice back should a restore racing with
    // this reroute have removed it. Then wait out kube-proxy's lag, so
    // that when `reroute` returns, callers reach the gateway.
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    let mut quiet = 0;
    while quiet < SETTLE_QUIET_CHECKS {
        let removed = service::remove_strays(&cluster.client, &ns, &name)
            .await
            .map_err(|e| {
                let mut err = cluster.err(e, &format!("remove the endpoint controllers' objects of {ns}/{name}"));
                if err.is_forbidden() {
                    err.hint = format!("rerouting removes the controllers' EndpointSlices and the legacy Endpoints of the Service while it is rerouted: the ClusterRole `burrow-reroute` bound in namespace {ns} has `delete` on both; run `burrow reroute --stop {name}` to give the Service back");
                }
                err
            })?;
        let ours_there = slices
            .get_opt(&slice_name)
            .await
            .map_err(|e| cluster.err(e, &format!("get EndpointSlice {ns}/{slice_name}")))?
            .is_some();
        if !ours_there {
            apply().await?;
        }
        if removed.is_empty() && ours_there {
            quiet += 1;
        } else {
            quiet = 0;
        }
        if std::time::Instant::now() > deadline {
            return Err(DeployError::new(
                format!(
                    "the endpoint controllers keep recreating EndpointSlices or Endpoints for {ns}/{name} \
                     after its selector was removed"
                ),
                "run `burrow reroute --stop` for it and try again; if it persists, look at \
                 `kubectl get endpointslices,endpoints -n NS -l kubernetes.io/service-name=NAME`",
            ));
        }
        if quiet < SETTLE_QUIET_CHECKS {
            tokio::time::sleep(SETTLE_INTERVAL).await;
        }
    }
    tokio::time::sleep(service::KUBE_PROXY_LAG).await;
    Ok(())
}

/// How long the controllers' objects must stay gone (checks × interval)
/// before a reroute counts as in place, and the most to wait.
const SETTLE_QUIET_CHECKS: u32 = 3;
const SETTLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(150);
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Restores `namespace/name` with the user's credentials; idempotent and
/// make-before-break (see `crate::service::restore`).
pub async fn restore(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<Restored, DeployError> {
    check_names(namespace, name)?;
    service::restore(&cluster.client, namespace, name)
        .await
        .map_err(|e| cluster.err(e, &format!("restore Service {namespace}/{name}")))
}

/// Restores every rerouted Service the user can see (for `uninstall`).
pub async fn restore_all(
    cluster: &Cluster,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(), DeployError> {
    let found = service::find_rerouted(&cluster.client)
        .await
        .map_err(|e| cluster.err(e, "list Services in all namespaces"))?;
    for (ns, name) in found {
        progress(&format!("restoring rerouted Service {ns}/{name}"));
        restore(cluster, &ns, &name).await?;
    }
    Ok(())
}

/// The oldest Kubernetes minor version `reroute` works with: EndpointSlices
/// `discovery.k8s.io/v1` are served from 1.21.
pub const MIN_REROUTE_VERSION: &str = "1.21";

/// Refuses, before anything is changed, a cluster that does not serve
/// what `reroute` needs (EndpointSlices `discovery.k8s.io/v1`), naming its
/// version and the minimum.
pub async fn check_cluster_supports(cluster: &Cluster) -> Result<(), DeployError> {
    match cluster
        .client
        .list_api_group_resources("discovery.k8s.io/v1")
        .await
    {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => Ok(()),
        Ok(_) | Err(kube::Error::Api(_)) => {
            let version = cluster
                .client
                .apiserver_version()
                .await
                .map(|v| v.git_version)
                .unwrap_or_else(|_| "unknown".into());
            Err(unsupported(&version))
        }
        Err(e) => Err(cluster.err(e, "read the API groups the cluster serves")),
    }
}

fn unsupported(version: &str) -> DeployError {
    DeployError::new(
        format!(
            "this cluster (Kubernetes {version}) does not serve EndpointSlices \
             (discovery.k8s.io/v1), which `burrow reroute` needs: it works on Kubernetes \
             {MIN_REROUTE_VERSION} and newer; nothing was changed"
        ),
        "`burrow connect` still works on this cluster; to reroute, use a cluster of \
         Kubernetes 1.21 or newer",
    )
}

/// A warning when `svc` is managed by a GitOps controller that would put
/// its selector back (and so end the reroute), saying what to configure.
pub fn gitops_warning(svc: &Service) -> Option<String> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let argo = annotations
        .get("argocd.argoproj.io/tracking-id")
        .and_then(|t| t.split(':').next().map(str::to_owned))
        .or_else(|| labels.get("argocd.argoproj.io/instance").cloned());
    if let Some(app) = argo {
        return Some(format!(
            "Service {ns}/{name} is managed by Argo CD (application {app}): with self-heal on, \
             Argo CD puts the selector back and so ends the reroute. Tell it to ignore the \
             selector: in the Application, `ignoreDifferences: [{{kind: Service, name: {name}, \
             jsonPointers: [/spec/selector]}}]` with `syncOptions: [RespectIgnoreDifferences=true]`, \
             or turn self-heal off while you work"
        ));
    }
    for (label, kind) in [
        ("kustomize.toolkit.fluxcd.io/name", "kustomization"),
        ("helm.toolkit.fluxcd.io/name", "helmrelease"),
    ] {
        if let Some(owner) = labels.get(label) {
            let owner_ns = labels
                .get(&label.replace("/name", "/namespace"))
                .cloned()
                .unwrap_or_else(|| ns.clone());
            return Some(format!(
                "Service {ns}/{name} is managed by Flux ({kind} {owner_ns}/{owner}): its next \
                 reconciliation puts the selector back and so ends the reroute. Annotate the \
                 Service `kustomize.toolkit.fluxcd.io/reconcile=disabled` while you work, or \
                 `flux suspend {kind} {owner} -n {owner_ns}`"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(labels: Value, annotations: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "api", "namespace": "dev", "labels": labels, "annotations": annotations},
            "spec": {"selector": {"app": "api"}}
        }))
        .expect("service")
    }

    fn svc(ports: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "dns", "namespace": "default"},
            "spec": {"selector": {"app": "dns"}, "ports": ports},
        }))
        .expect("service")
    }

    #[test]
    fn gitops_owners_are_named_with_what_to_configure() {
        let argo = owned(
            json!({}),
            json!({"argocd.argoproj.io/tracking-id": "shop:/Service:dev/api"}),
        );
        let w = gitops_warning(&argo).expect("argo");
        assert!(w.contains("Argo CD (application shop)"), "{w}");
        assert!(w.contains("ignoreDifferences"), "{w}");
        let flux = owned(
            json!({"kustomize.toolkit.fluxcd.io/name": "apps", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}),
            json!({}),
        );
        let w = gitops_warning(&flux).expect("flux");
        assert!(
            w.contains("flux suspend kustomization apps -n flux-system"),
            "{w}"
        );
        assert!(gitops_warning(&owned(json!({"app": "api"}), json!({}))).is_none());
    }

    #[test]
    fn an_old_cluster_is_refused_naming_its_version_and_the_minimum() {
        let e = unsupported("v1.20.15");
        let text = format!("{e}");
        assert!(text.contains("Kubernetes v1.20.15"), "{text}");
        assert!(text.contains("1.21 and newer"), "{text}");
    }

    fn dns() -> Service {
        svc(json!([
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "metrics", "port": 9153},
        ]))
    }

    fn pick(s: &Service, port: &str) -> Result<ServicePort, String> {
        choose_port(s, "default", "dns", port)
            .map(|(p, _)| p)
            .map_err(|e| format!("{}; {}", e.reason, e.hint))
    }

    #[test]
    fn ports_are_chosen_by_name_or_number_and_protocol() {
        let s = dns();
        let udp = pick(&s, "dns").expect("by name");
        assert_eq!((udp.port, udp.protocol), (53, PortProtocol::Udp));
        assert_eq!(pick(&s, "53/udp").expect("udp").name, "dns");
        assert_eq!(pick(&s, "53/TCP").expect("tcp").name, "dns-tcp");
        assert_eq!(
            pick(&s, "9153").expect("tcp by default").protocol,
            PortProtocol::Tcp
        );
        let err = pick(&s, "53").expect_err("ambiguous");
        assert!(
            err.contains("for TCP and for UDP") && err.contains("--port 53/udp:LOCALPORT"),
            "{err}"
        );
        assert!(pick(&s, "9153/udp").is_err());
        let (_, all) = choose_port(&s, "default", "dns", "dns").expect("ports");
        assert_eq!(all.len(), 3, "every port, TCP and UDP, gets a listener");
    }

    #[test]
    fn sctp_ports_are_refused_naming_them() {
        let s = svc(json!([
            {"name": "http", "port": 80},
            {"name": "sig", "port": 3868, "protocol": "SCTP"},
        ]));
        let err = pick(&s, "80").expect_err("SCTP");
        assert!(
            err.contains("3868 (SCTP)") && err.contains("TCP and UDP"),
            "{err}"
        );
    }

    #[test]
    fn udp_ports_are_rerouted_globally_only() {
        let found = |port: &str| {
            let s = dns();
            let (p, ports) = choose_port(&s, "default", "dns", port).expect("port");
            Found {
                service: s,
                port: p,
                ports,
            }
        };
        let udp = found("dns");
        assert_eq!(
            udp.protocol(Protocol::Tcp, false).expect("global"),
            Protocol::Udp
        );
        let err = udp.protocol(Protocol::Http, true).expect_err("header");
        assert!(
            err.reason.contains("header reroutes are HTTP-only")
                && err
                    .reason
                    .contains("a global reroute (without --header) works for UDP"),
            "{}",
            err.reason
        );
        assert!(udp.protocol(Protocol::Http, false).is_err());
        let tcp = found("dns-tcp");
        assert_eq!(
            tcp.protocol(Protocol::Tcp, true).expect("header"),
            Protocol::Http
        );
        assert_eq!(
            tcp.protocol(Protocol::Tcp, false).expect("tcp"),
            Protocol::Tcp
        );
    }
}
