//! The HTTPS REST layer: TLS with optional client certificates,
//! authentication and RBAC, discovery, OpenAPI, list/get/watch, create,
//! replace, patch (four types), delete, Tables, Status errors,
//! `pods/portforward` and `pods/log` (streamed from the node's log source).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::admission::{self, WriteOptions};
use crate::auth::{Attributes, Authenticator, UserInfo};
use crate::error::ApiError;
use crate::logs::{self, LogSource};
use crate::patch::PatchType;
use crate::resources::{self, ResourceType};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{EventType, Store, WatchEvent};
use crate::table::{self, IncludeObject};
use crate::{discovery, portforward};

/// The response body type.
pub type Body = BoxBody<Bytes, Infallible>;

/// A pod port to connect to for `pods/portforward`.
#[derive(Debug, Clone)]
pub struct PodTarget {
    pub uid: String,
    pub ip: std::net::IpAddr,
    pub port: u16,
}

/// How the server reaches a pod's port for `pods/portforward`. The real
/// kubelet (its container runtime) connects to `localhost:PORT` inside the
/// pod's network namespace, so only a pod's loopback listeners are what a
/// port-forward must reach; a dialer given the pod's uid can do the same.
pub type Dialer = Arc<
    dyn Fn(PodTarget) -> BoxFuture<'static, std::io::Result<tokio::net::TcpStream>> + Send + Sync,
>;

/// What [`serve`] needs.
pub struct ServerConfig {
    pub store: Arc<Store>,
    pub auth: Arc<Authenticator>,
    pub tls_cert_pem: String,
    pub tls_key_pem: String,
    /// The CA that signs client certificates.
    pub ca_pem: String,
    /// Already-bound listeners (possibly in other network namespaces).
    pub listeners: Vec<std::net::TcpListener>,
    pub dialer: Dialer,
    /// The node's container logs (`pods/{name}/log`); `None`: no node
    /// serves logs, log requests fail as with an unreachable kubelet.
    pub logs: Option<LogSource>,
}

/// A dialer that connects to the pod IP from the current network
/// namespace (for servers whose "pods" listen on this machine).
pub fn direct_dialer() -> Dialer {
    Arc::new(|t: PodTarget| {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(SocketAddr::new(t.ip, t.port)).await?;
            // Go's dialer leaves every TCP connection with Nagle off.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })
    })
}

struct State {
    store: Arc<Store>,
    auth: Arc<Authenticator>,
    dialer: Dialer,
    logs: Option<LogSource>,
}

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

fn tls_config(cfg: &ServerConfig) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<_> = rustls_pemfile::certs(&mut cfg.tls_cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the serving certificate")?;
    let key = rustls_pemfile::private_key(&mut cfg.tls_key_pem.as_bytes())
        .context("parsing the serving key")?
        .context("no private key in the serving key PEM")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut cfg.ca_pem.as_bytes()) {
        roots
            .add(ca.context("parsing the CA")?)
            .context("adding the CA")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("serving certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the API on every listener until one of them fails.
pub async fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&cfg)?));
    let state = Arc::new(State {
        store: cfg.store,
        auth: cfg.auth,
        dialer: cfg.dialer,
        logs: cfg.logs,
    });
    let mut tasks = Vec::new();
    for l in cfg.listeners {
        l.set_nonblocking(true).context("set_nonblocking")?;
        let listener = tokio::net::TcpListener::from_std(l).context("registering a listener")?;
        tasks.push(tokio::spawn(accept_loop(
            listener,
            acceptor.clone(),
            state.clone(),
        )));
    }
    for t in tasks {
        t.await.context("accept loop panicked")??;
    }
    Ok(())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let cert: Option<Arc<Vec<u8>>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let cert = cert.clone();
                async move { Ok::<_, Infallible>(handle(state, cert, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

pub(crate) fn empty_body() -> Body {
    Full::new(Bytes::new()).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}

fn text_response(code: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn not_found_path() -> ApiError {
    ApiError {
        details: Some(json!({})),
        ..ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }
}

async fn handle(
    state: Arc<State>,
    cert: Option<Arc<Vec<u8>>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let authz = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let user = match state
        .auth
        .authenticate(cert.as_deref().map(Vec::as_slice), authz.as_deref())
    {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%method, path = %uri, user = "", status = e.code, "request");
            return error_response(&e);
        }
    };
    // A bug must cost one request, not the connection or the server.
    let routed = std::panic::AssertUnwindSafe(route(&state, &user, req));
    let resp = match futures::FutureExt::catch_unwind(routed).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => error_response(&e),
        Err(_) => {
            tracing::error!(%method, path = %uri, "request handler panicked");
            error_response(&ApiError::new(
                500,
                "InternalError",
                "an error on the server has prevented the request from succeeding",
            ))
        }
    };
    tracing::debug!(%method, path = %uri, user = %user.name, status = resp.status().as_u16(), "request");
    resp
}

/// Query parameters (repeated keys keep every value).
struct Query(HashMap<String, Vec<String>>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            m.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Query(m)
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(|v| v.first()).map(String::as_str)
    }
    fn all(&self, k: &str) -> &[String] {
        self.0.get(k).map(Vec::as_slice).unwrap_or_default()
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | "True"))
    }
}

async fn route(
    state: &Arc<State>,
    user: &UserInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let is_get = req.method() == Method::GET || req.method() == Method::HEAD;
    let only_get = || -> Result<(), ApiError> {
        if is_get {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource".to_string(),
            ))
        }
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    match segs.as_slice() {
        ["version"] => {
            only_get()?;
            Ok(json_response(StatusCode::OK, &discovery::version()))
        }
        [h, ..] if matches!(*h, "healthz" | "readyz" | "livez") => {
            only_get()?;
            Ok(text_response(StatusCode::OK, "ok"))
        }
        ["api"] => {
            only_get()?;
            Ok(json_response(
                StatusCode::OK,
                &discovery::api_versions(&host),
            ))
        }
        ["apis"] => {
            only_get()?;
            Ok(json_response(StatusCode::OK, &discovery::api_group_list()))
        }
        ["api", v] => {
            only_get()?;
            discovery::resource_list("", v)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path)
        }
        ["apis", g] => {
            only_get()?;
            discovery::api_group(g)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path)
        }
        ["apis", g, v] => {
            only_get()?;
            discovery::resource_list(g, v)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path)
        }
        ["openapi", "v2"] => {
            only_get()?;
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if accept.contains("protobuf") {
                let mut r =
                    Response::new(Full::new(Bytes::from(discovery::openapi_v2_protobuf())).boxed());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(discovery::OPENAPI_V2_PROTOBUF),
                );
                Ok(r)
            } else {
                Ok(json_response(StatusCode::OK, &discovery::openapi_v2()))
            }
        }
        ["openapi", "v3"] => {
            only_get()?;
            Ok(json_response(StatusCode::OK, &discovery::openapi_v3_root()))
        }
        ["openapi", "v3", "api", v] => {
            only_get()?;
            discovery::openapi_v3_gv("", v)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path)
        }
        ["openapi", "v3", "apis", g, v] => {
            only_get()?;
            discovery::openapi_v3_gv(g, v)
                .map(|d| json_response(StatusCode::OK, &d))
                .ok_or_else(not_found_path)
        }
        ["api", v, rest @ ..] => {
            let (v, rest) = (
                v.to_string(),
                rest.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            );
            resource_request(state, user, req, "", &v, &rest).await
        }
        ["apis", g, v, rest @ ..] => {
            let (g, v) = (g.to_string(), v.to_string());
            let rest = rest.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            resource_request(state, user, req, &g, &v, &rest).await
        }
        _ => Err(not_found_path()),
    }
}

/// A parsed resource URL.
struct Target {
    rt: &'static ResourceType,
    /// Empty: cluster-scoped, or all namespaces.
    ns: String,
    name: String,
    sub: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[String]) -> Result<Target, ApiError> {
    let r: Vec<&str> = rest.iter().map(String::as_str).collect();
    if let ["namespaces", ns, plural, tail @ ..] = r.as_slice()
        && let Some(rt) = resources::find(group, version, plural).filter(|rt| rt.namespaced)
    {
        let (name, sub) = match tail {
            [] => ("", None),
            [name] => (*name, None),
            [name, sub] => (*name, Some(sub.to_string())),
            _ => return Err(not_found_path()),
        };
        return Ok(Target {
            rt,
            ns: ns.to_string(),
            name: name.to_string(),
            sub,
        });
    }
    let (plural, name, sub) = match r.as_slice() {
        [plural] => (*plural, "", None),
        [plural, name] => (*plural, *name, None),
        [plural, name, sub] => (*plural, *name, Some(sub.to_string())),
        _ => return Err(not_found_path()),
    };
    let rt = resources::find(group, version, plural).ok_or_else(not_found_path)?;
    if rt.namespaced && !name.is_empty() {
        return Err(not_found_path());
    }
    if let Some(s) = &sub
        && !rt.subresources.contains(&s.as_str())
    {
        return Err(not_found_path());
    }
    Ok(Target {
        rt,
        ns: String::new(),
        name: name.to_string(),
        sub,
    })
}

/// How the response body should look.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Object,
    Table(IncludeObject),
    Metadata,
}

fn shape(req_accept: &str, q: &Query) -> Shape {
    // The first acceptable media type wins; JSON forms only.
    for part in req_accept.split(',') {
        let p = part.replace(' ', "");
        if p.contains("as=Table")
            && p.contains("g=meta.k8s.io")
            && (p.contains("v=v1;") || p.ends_with("v=v1"))
        {
            return Shape::Table(IncludeObject::parse(q.get("includeObject")));
        }
        if p.contains("as=PartialObjectMetadata")
            && p.contains("g=meta.k8s.io")
            && (p.contains("v=v1;") || p.ends_with("v=v1"))
        {
            return Shape::Metadata;
        }
        if p.starts_with("application/json") && !p.contains("as=") {
            return Shape::Object;
        }
    }
    Shape::Object
}

fn partial_metadata(o: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("reading the request body: {e}"),
        )),
    }
}

fn parse_object(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" {
        return crate::protobuf::decode_object(body);
    }
    if !matches!(
        media,
        "application/json" | "application/yaml" | "" | "*/*" | "text/plain"
    ) {
        return Err(ApiError::unsupported_media_type(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf",
        ));
    }
    let v: Value = if content_type.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the object provided is unrecognized: couldn't get version/kind; json parse error: {e}"
            ))
        })?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be an object",
        ));
    }
    Ok(v)
}

fn write_opts(q: &Query) -> Result<WriteOptions, ApiError> {
    let dry = q.all("dryRun");
    for d in dry {
        if d != "All" {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {d:?}: supported values: \"All\""
            )));
        }
    }
    Ok(WriteOptions {
        dry_run: !dry.is_empty(),
    })
}

fn strict(q: &Query) -> bool {
    q.get("fieldValidation") == Some("Strict")
}

fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let ls = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let fs = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""))?;
    Ok((ls, fs))
}

fn list_kind(rt: &ResourceType) -> String {
    format!("{}List", rt.kind)
}

async fn resource_request(
    state: &Arc<State>,
    user: &UserInfo,
    req: Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[String],
) -> Result<Response<Body>, ApiError> {
    let t = parse_target(group, version, rest)?;
    let q = Query::parse(req.uri().query());
    let method = req.method().clone();
    let collection = t.name.is_empty();
    let sub = t.sub.as_deref();
    let watch = q.flag("watch");
    let streaming = matches!(sub, Some("portforward" | "exec" | "attach"));
    let verb = match (&method, collection) {
        (&Method::GET | &Method::HEAD, true) => {
            if watch {
                "watch"
            } else {
                "list"
            }
        }
        (&Method::GET | &Method::HEAD, false) => {
            if streaming {
                "create"
            } else {
                "get"
            }
        }
        (&Method::POST, _) => "create",
        (&Method::PUT, false) => "update",
        (&Method::PATCH, false) => "patch",
        (&Method::DELETE, false) => "delete",
        (&Method::DELETE, true) => "deletecollection",
        _ => {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
    };
    // A list or watch pinned to one name (`fieldSelector=metadata.name=x`)
    // is authorized for that name, so `resourceNames` rules apply to it,
    // as the real server's request info does.
    let pinned = if collection && matches!(verb, "list" | "watch") {
        FieldSelector::parse(q.get("fieldSelector").unwrap_or(""))
            .ok()
            .and_then(|f| f.name().map(str::to_string))
    } else {
        None
    };
    let attrs = Attributes {
        verb,
        resource: t.rt,
        subresource: sub,
        namespace: &t.ns,
        name: pinned.as_deref().unwrap_or(&t.name),
    };
    if streaming && matches!(method, Method::GET | Method::HEAD) {
        // A WebSocket upgrade is a GET, authorized as `get` like any GET;
        // since Kubernetes 1.35 (AuthorizePodWebsocketUpgradeCreatePermission,
        // on by default) also as `create`, which SPDY's POST always needed.
        // Both are required here, the strictest real server: a role that
        // works here works on every version.
        let get = Attributes {
            verb: "get",
            ..attrs.clone()
        };
        state.auth.authorize(&state.store, user, &get)?;
    }
    state.auth.authorize(&state.store, user, &attrs)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let shape = shape(&accept, &q);
    let store = &state.store;
    let rt = t.rt;
    let ns = t.ns.as_str();
    let name = t.name.as_str();
    let ns_opt = (!ns.is_empty()).then_some(ns);
    if rt.namespaced && ns.is_empty() && !(collection && matches!(verb, "list" | "watch")) {
        return Err(not_found_path());
    }

    if rt.is_virtual() {
        if verb != "create" || !collection {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the requested resource",
            ));
        }
        let body = read_body(req).await?;
        let obj = parse_object(&body, &content_type)?;
        return Ok(json_response(
            StatusCode::CREATED,
            &review(store, user, rt, obj)?,
        ));
    }

    match verb {
        "list" => {
            let (ls, fs) = selectors(&q)?;
            let (items, rv) = store.list(rt, ns_opt);
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| ls.matches(o) && fs.matches(o))
                .collect();
            let rv = rv.to_string();
            let body = match shape {
                Shape::Table(inc) => table::table(rt, &items, &rv, inc, true),
                Shape::Metadata => json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": rv},
                    "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
                }),
                Shape::Object => json!({
                    "kind": list_kind(rt),
                    "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }),
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        "watch" => {
            let (ls, fs) = selectors(&q)?;
            watch_response(
                state.clone(),
                rt,
                ns_opt.map(String::from),
                ls,
                fs,
                &q,
                shape,
            )
        }
        "get" => {
            let obj = store.get(rt, ns, name)?;
            match sub {
                Some("log") => return pod_log(state, obj, &q).await,
                Some("scale") => return Ok(json_response(StatusCode::OK, &scale_of(&obj))),
                _ => {}
            }
            let body = match shape {
                Shape::Table(inc) => {
                    let rv = obj["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    table::table(rt, std::slice::from_ref(&obj), &rv, inc, true)
                }
                Shape::Metadata => partial_metadata(&obj),
                Shape::Object => obj,
            };
            Ok(json_response(StatusCode::OK, &body))
        }
        "create" if sub == Some("portforward") => {
            let Some(mode) = portforward::mode(&req) else {
                return Err(ApiError::bad_request("Upgrade request required"));
            };
            let pod = store.get(rt, ns, name)?;
            let uid = pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let ip: IpAddr = pod["status"]["podIP"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!("pod {name} does not have a host assigned"))
                })?;
            if mode != portforward::Mode::WebSocket {
                // SPDY names the port on each stream.
                return portforward::handle_spdy(
                    req,
                    mode,
                    name,
                    ns,
                    uid,
                    ip,
                    state.dialer.clone(),
                );
            }
            let mut ports = Vec::new();
            for p in q.all("ports").iter().chain(q.all("port")) {
                for part in p.split(',').filter(|s| !s.trim().is_empty()) {
                    let port: u16 = part
                        .trim()
                        .parse()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| ApiError::bad_request(format!("invalid port {part:?}")))?;
                    ports.push(port);
                }
            }
            if ports.is_empty() {
                return Err(ApiError::bad_request(
                    "query parameter \"port\" is required",
                ));
            }
            portforward::handle(req, name, ns, uid, ip, ports, state.dialer.clone())
        }
        "create" => {
            if !collection || sub.is_some() {
                return Err(ApiError::method_not_allowed(
                    "the server does not allow this method on the requested resource",
                ));
            }
            let opts = write_opts(&q)?;
            let strict = strict(&q);
            let body = read_body(req).await?;
            let mut obj = parse_object(&body, &content_type)?;
            if strict {
                admission::check_strict_fields(rt, &obj)?;
            }
            if rt.has_status()
                && rt.kind != "Node"
                && let Some(m) = obj.as_object_mut()
            {
                m.remove("status");
            }
            let created = admission::create_with(store, rt, ns, obj, opts)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        "update" => {
            let opts = write_opts(&q)?;
            let body = read_body(req).await?;
            let obj = parse_object(&body, &content_type)?;
            if strict(&q) {
                admission::check_strict_fields(rt, &obj)?;
            }
            if sub == Some("scale") {
                let replicas = obj["spec"]["replicas"].clone();
                let out = admission::patch(
                    store,
                    rt,
                    ns,
                    name,
                    PatchType::Merge,
                    json!({"spec": {"replicas": replicas}})
                        .to_string()
                        .as_bytes(),
                    false,
                    None,
                    opts,
                )?;
                return Ok(json_response(StatusCode::OK, &scale_of(&out.0)));
            }
            match admission::update_with(
                store,
                rt,
                ns,
                name,
                obj.clone(),
                sub == Some("status"),
                opts,
            ) {
                Ok(o) => Ok(json_response(StatusCode::OK, &o)),
                Err(e)
                    if e.code == 404
                        && matches!(rt.kind, "Endpoints" | "Lease" | "Event" | "ConfigMap") =>
                {
                    // An update that creates needs `create` too.
                    authorize_create(state, user, &attrs)?;
                    let mut obj = obj;
                    obj["metadata"]["name"] = json!(name);
                    let o = admission::create_with(store, rt, ns, obj, opts)?;
                    Ok(json_response(StatusCode::CREATED, &o))
                }
                Err(e) => Err(e),
            }
        }
        "patch" => {
            let Some(kind) = PatchType::from_content_type(&content_type) else {
                return Err(ApiError::unsupported_media_type("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json".to_string()));
            };
            let opts = write_opts(&q)?;
            let strict = strict(&q);
            let body = read_body(req).await?;
            if strict
                && matches!(kind, PatchType::Merge | PatchType::Strategic)
                && let Ok(p) = serde_json::from_slice::<Value>(&body)
            {
                admission::check_strict_fields(rt, &p)?;
            }
            if sub == Some("scale") {
                let current = store.get(rt, ns, name)?;
                let scale = crate::patch::apply_patch(&scale_of(&current), kind, &body)?;
                let patch = json!({"spec": {"replicas": scale["spec"]["replicas"]}});
                let (out, _) = admission::patch(
                    store,
                    rt,
                    ns,
                    name,
                    PatchType::Merge,
                    patch.to_string().as_bytes(),
                    false,
                    None,
                    opts,
                )?;
                return Ok(json_response(StatusCode::OK, &scale_of(&out)));
            }
            if kind == PatchType::Apply && sub.is_none() && store.get(rt, ns, name).is_err() {
                // Server-side apply of a missing object creates it, which
                // needs `create` as well as `patch`.
                authorize_create(state, user, &attrs)?;
            }
            let (out, created) = admission::patch(
                store,
                rt,
                ns,
                name,
                kind,
                &body,
                sub == Some("status"),
                q.get("fieldManager"),
                opts,
            )?;
            Ok(json_response(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &out,
            ))
        }
        "delete" => {
            let opts = write_opts(&q)?;
            let body = read_body(req).await?;
            if let Ok(delopts) = serde_json::from_slice::<Value>(&body) {
                let current = store.get(rt, ns, name)?;
                if let Some(uid) = delopts["preconditions"]["uid"].as_str()
                    && current["metadata"]["uid"].as_str() != Some(uid)
                {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        &format!(
                            "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                            current["metadata"]["uid"].as_str().unwrap_or("")
                        ),
                    ));
                }
                if let Some(rv) = delopts["preconditions"]["resourceVersion"].as_str()
                    && current["metadata"]["resourceVersion"].as_str() != Some(rv)
                {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
            }
            let out = if opts.dry_run {
                store.get(rt, ns, name)?
            } else {
                store.delete(rt, ns, name)?
            };
            Ok(json_response(StatusCode::OK, &out))
        }
        "deletecollection" => {
            let opts = write_opts(&q)?;
            let (ls, fs) = selectors(&q)?;
            let (items, _) = store.list(rt, ns_opt);
            let mut deleted = Vec::new();
            for o in items.into_iter().filter(|o| ls.matches(o) && fs.matches(o)) {
                let n = o["metadata"]["name"].as_str().unwrap_or("").to_string();
                let ons = o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if opts.dry_run {
                    deleted.push(o);
                } else if let Ok(d) = store.delete(rt, &ons, &n) {
                    deleted.push(d);
                }
            }
            let rv = store.resource_version().to_string();
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": list_kind(rt), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(
            "the server does not allow this method on the requested resource",
        )),
    }
}

/// `attrs` as a `create` (a write that creates the object it names).
fn authorize_create(
    state: &Arc<State>,
    user: &UserInfo,
    attrs: &Attributes<'_>,
) -> Result<(), ApiError> {
    let create = Attributes {
        verb: "create",
        ..attrs.clone()
    };
    state.auth.authorize(&state.store, user, &create)
}

/// `GET pods/{name}/log`: validated here, streamed by the node.
async fn pod_log(state: &Arc<State>, pod: Value, q: &Query) -> Result<Response<Body>, ApiError> {
    let get = |k: &str| q.get(k).map(str::to_string);
    let opts = logs::parse_options(&pod, &get)?;
    let Some(source) = state.logs.clone() else {
        return Err(ApiError::new(
            500,
            "InternalError",
            format!(
                "Get \"https://{}:10250/containerLogs/{}/{}/{}\": no kubelet serves container logs",
                pod["spec"]["nodeName"].as_str().unwrap_or(""),
                pod["metadata"]["namespace"].as_str().unwrap_or(""),
                pod["metadata"]["name"].as_str().unwrap_or(""),
                opts.container
            ),
        ));
    };
    let limit = opts.limit_bytes;
    let mut stream = logs::limit_bytes(source(pod, opts).await?, limit);
    // Through a channel (the body must be Sync); the stream is dropped as
    // soon as the client goes away, which ends a follow on the node.
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                chunk = futures::StreamExt::next(&mut stream) => match chunk {
                    Some(b) => {
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(body).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

/// Answers an access review or who-am-i.
fn review(
    store: &Store,
    user: &UserInfo,
    rt: &'static ResourceType,
    mut obj: Value,
) -> Result<Value, ApiError> {
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    if rt.kind == "SelfSubjectReview" {
        obj["status"] = json!({"userInfo": {"username": user.name, "groups": user.groups}});
        return Ok(obj);
    }
    let subject = if rt.kind == "SubjectAccessReview" {
        let name = obj["spec"]["user"].as_str().unwrap_or("");
        let groups: Vec<&str> = obj["spec"]["groups"]
            .as_array()
            .map(|g| g.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        UserInfo::new(name, &groups)
    } else {
        user.clone()
    };
    let ra = &obj["spec"]["resourceAttributes"];
    let allowed = if ra.is_object() {
        let group = ra["group"].as_str().unwrap_or("");
        let plural = ra["resource"].as_str().unwrap_or("");
        let found = resources::RESOURCES.iter().find(|r| {
            r.group == group
                && r.plural == plural
                && ra["version"]
                    .as_str()
                    .is_none_or(|v| v.is_empty() || v == r.version)
        });
        match found {
            Some(found) => {
                let attrs = Attributes {
                    verb: ra["verb"].as_str().unwrap_or(""),
                    resource: found,
                    subresource: ra["subresource"].as_str().filter(|s| !s.is_empty()),
                    namespace: ra["namespace"].as_str().unwrap_or(""),
                    name: ra["name"].as_str().unwrap_or(""),
                };
                crate::auth::allowed(store, &subject, &attrs)
            }
            None => subject.is_master(),
        }
    } else {
        // Non-resource URLs (discovery, health, version) are open to every
        // authenticated user here.
        true
    };
    obj["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed"})
    } else {
        json!({"allowed": false})
    };
    Ok(obj)
}

/// The `autoscaling/v1 Scale` of a Deployment or ReplicaSet.
fn scale_of(o: &Value) -> Value {
    let m = &o["metadata"];
    let sel: Vec<String> = o["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"],
        },
        "spec": {"replicas": o["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": sel.join(",")},
    })
}

/// Default watch length when the client sets none (the real server picks
/// 30-60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);

fn watch_response(
    state: Arc<State>,
    rt: &'static ResourceType,
    ns: Option<String>,
    ls: LabelSelector,
    fs: FieldSelector,
    q: &Query,
    shape: Shape,
) -> Result<Response<Body>, ApiError> {
    let rv = q.get("resourceVersion").unwrap_or("").to_string();
    let bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.flag("sendInitialEvents");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let since: Option<u64> = match rv.as_str() {
        "" | "0" => None,
        s => Some(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))?,
        ),
    };
    let store = state.store.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    // Subscribe before listing so nothing falls between.
    let start = if send_initial || since.is_none() {
        let (_, live) = store.watch(None)?;
        let (items, list_rv) = store.list(rt, ns.as_deref());
        Ok((items, Vec::new(), live, list_rv))
    } else {
        match store.watch(since) {
            Ok((backlog, live)) => {
                let (items, _) = store.list(rt, ns.as_deref());
                let last = backlog.last().map(|e| e.rv).or(since).unwrap_or(0);
                Ok((items, backlog, live, last))
            }
            Err(e) => Err(e),
        }
    };
    let initial_synthetic = send_initial || since.is_none();
    tokio::spawn(async move {
        let mut w = Watcher {
            rt,
            ns,
            ls,
            fs,
            shape,
            tx,
            known: HashSet::new(),
            first_table: true,
        };
        let (items, backlog, mut live, mut seen_rv) = match start {
            Ok(s) => s,
            Err(e) => {
                let _ = w.send_raw("ERROR", e.status()).await;
                return;
            }
        };
        for o in &items {
            if w.matches(o) {
                w.known.insert(obj_key(o));
            }
        }
        if initial_synthetic {
            w.known.clear();
            for o in items {
                if w.matches(&o) {
                    w.known.insert(obj_key(&o));
                    if !w.send("ADDED", &o).await {
                        return;
                    }
                }
            }
            if send_initial && !w.send_raw("BOOKMARK", w.bookmark(seen_rv, true)).await {
                return;
            }
        } else {
            for ev in backlog {
                seen_rv = seen_rv.max(ev.rv);
                if !w.event(&ev).await {
                    return;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = w.tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let b = w.bookmark(seen_rv, false);
                    if !w.send_raw("BOOKMARK", b).await {
                        return;
                    }
                }
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= seen_rv {
                            continue;
                        }
                        seen_rv = ev.rv;
                        if !w.event(&ev).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = w.send_raw("ERROR", ApiError::gone(seen_rv).status()).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

fn obj_key(o: &Value) -> (String, String) {
    (
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        o["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

struct Watcher {
    rt: &'static ResourceType,
    ns: Option<String>,
    ls: LabelSelector,
    fs: FieldSelector,
    shape: Shape,
    tx: mpsc::Sender<Bytes>,
    /// Objects the client currently knows (matching the selectors).
    known: HashSet<(String, String)>,
    first_table: bool,
}

impl Watcher {
    fn matches(&self, o: &Value) -> bool {
        self.ls.matches(o) && self.fs.matches(o)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        match self.shape {
            Shape::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
            }
            _ => {
                json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(), "metadata": meta})
            }
        }
    }

    /// Sends one store event if it concerns this watch; false when the
    /// client is gone.
    async fn event(&mut self, ev: &WatchEvent) -> bool {
        if ev.resource.key() != self.rt.key() {
            return true;
        }
        if let Some(ns) = &self.ns
            && self.rt.namespaced
            && ev.namespace() != ns
        {
            return true;
        }
        let key = obj_key(&ev.object);
        let matches = self.matches(&ev.object);
        let ty = match ev.kind {
            EventType::Added if matches => "ADDED",
            EventType::Deleted if matches || self.known.contains(&key) => "DELETED",
            EventType::Modified if matches => {
                if self.known.contains(&key) {
                    "MODIFIED"
                } else {
                    "ADDED"
                }
            }
            EventType::Modified if self.known.contains(&key) => "DELETED",
            _ => return true,
        };
        if ty == "DELETED" {
            self.known.remove(&key);
        } else {
            self.known.insert(key);
        }
        self.send(ty, &ev.object).await
    }

    async fn send(&mut self, ty: &str, o: &Value) -> bool {
        let obj = match self.shape {
            Shape::Object => o.clone(),
            Shape::Metadata => partial_metadata(o),
            Shape::Table(inc) => {
                let rv = o["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let t = table::table(self.rt, std::slice::from_ref(o), &rv, inc, self.first_table);
                self.first_table = false;
                t
            }
        };
        self.send_raw(ty, obj).await
    }

    async fn send_raw(&self, ty: &str, object: Value) -> bool {
        let mut line =
            serde_json::to_vec(&json!({"type": ty, "object": object})).unwrap_or_default();
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }
}
