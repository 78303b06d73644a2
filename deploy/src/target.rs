//! Which cluster to talk to: the kubeconfig, context and namespace, resolved
//! the way kubectl resolves them (`--kubeconfig`, else `KUBECONFIG` — a list
//! of files, merged — else `~/.kube/config`), plus one thing kubectl cannot
//! know: under `sudo`, the invoking user's `~/.kube/config` when root has
//! none.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{DeployError, error_chain};

/// How long to wait for the API server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client like kube's own for `config`, whose connections have
/// `TCP_NODELAY` set (kube's builder leaves Nagle on and offers no switch);
/// `None` when the kubeconfig names a proxy, which only kube's builder
/// speaks.
fn stream_client(config: &kube::Config) -> Result<Option<kube::Client>, kube::Error> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt as _;
    if config.proxy_url.is_some() {
        return Ok(None);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(Some(kube::Client::new(
        service,
        config.default_namespace.clone(),
    )))
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub kubeconfig: Option<PathBuf>,
    /// Files to merge as `KUBECONFIG` lists them, when `kubeconfig` is not
    /// given; empty: read `KUBECONFIG` from this process's environment.
    /// (The daemon gets the CLI's list here, its own environment differs.)
    pub kubeconfig_list: Vec<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A cluster we can talk to.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    /// For port-forwards (the framed transport's streams and the control
    /// API's): the same credentials and API server as `client`, over
    /// sockets with Nagle's algorithm off, as kubectl's (Go's) are. With
    /// it on, a small write (an inner TCP flow's ACK, a request) waits for
    /// the API server's delayed ACK whenever an earlier one is still
    /// unacknowledged: up to 40 ms per stall. `client` itself when the
    /// kubeconfig names a proxy (kube's own builder handles those).
    pub stream_client: kube::Client,
    /// The context in use.
    pub context: String,
    /// The cluster's name in the kubeconfig.
    pub cluster_name: String,
    /// The API server's URL.
    pub server: String,
    /// The namespace in effect: `--namespace`, else the context's, else
    /// `default`.
    pub namespace: String,
    /// The kubeconfig file(s) the settings came from.
    pub source: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("context", &self.context)
            .field("server", &self.server)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Cluster {
    /// Phrases a kube-rs error for this cluster.
    pub fn err(&self, err: kube::Error, doing: &str) -> DeployError {
        DeployError::from_kube(err, doing, &self.server)
    }
}

impl Target {
    /// Reads the kubeconfig and builds a client. Does not contact the API
    /// server; see [`Cluster::check_reachable`].
    pub async fn resolve(&self) -> Result<Cluster, DeployError> {
        let (kubeconfig, source) = self.read_kubeconfig()?;
        let context = match self.context.clone().or(kubeconfig.current_context.clone()) {
            Some(c) => c,
            None => {
                return Err(DeployError::new(
                    format!("{source} has no current context"),
                    format!("choose one with --context ({})", context_list(&kubeconfig)),
                ));
            }
        };
        let Some(named) = kubeconfig.contexts.iter().find(|c| c.name == context) else {
            return Err(DeployError::new(
                format!("context {context:?} is not in {source}"),
                format!("available contexts: {}", context_list(&kubeconfig)),
            ));
        };
        let ctx = named.context.clone().unwrap_or_default();
        let options = KubeConfigOptions {
            context: Some(context.clone()),
            ..Default::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| {
                DeployError::new(
                    format!("cannot use context {context:?} from {source}: {}", error_chain(&e)),
                    "fix the kubeconfig (kubectl config view) or pick another context with --context",
                )
            })?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let namespace = self
            .namespace
            .clone()
            .or(ctx.namespace.clone())
            .unwrap_or_else(|| "default".to_string());
        config.default_namespace = namespace.clone();
        let server = config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_string();
        let stream_client = stream_client(&config).map_err(|e| {
            DeployError::new(
                format!("cannot build a client for {server}: {}", error_chain(&e)),
                "check the kubeconfig's certificates and credentials",
            )
        })?;
        let client = kube::Client::try_from(config).map_err(|e| {
            DeployError::new(
                format!("cannot build a client for {server}: {}", error_chain(&e)),
                "check the kubeconfig's certificates and proxy settings",
            )
        })?;
        Ok(Cluster {
            stream_client: stream_client.unwrap_or_else(|| client.clone()),
            client,
            context,
            cluster_name: ctx.cluster,
            server,
            namespace,
            source,
        })
    }

    /// The kubeconfig (merged if several files) and a description of where
    /// it came from.
    fn read_kubeconfig(&self) -> Result<(Kubeconfig, String), DeployError> {
        if let Some(path) = &self.kubeconfig {
            return read_file(path).map(|k| (k, path.display().to_string()));
        }
        let from_env = || {
            std::env::var_os("KUBECONFIG")
                .filter(|v| !v.is_empty())
                .map(|list| {
                    std::env::split_paths(&list)
                        .filter(|p| !p.as_os_str().is_empty())
                        .collect::<Vec<PathBuf>>()
                })
        };
        let list = if self.kubeconfig_list.is_empty() {
            from_env()
        } else {
            Some(self.kubeconfig_list.clone())
        };
        if let Some(paths) = list {
            let existing: Vec<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
            if existing.is_empty() {
                return Err(DeployError::new(
                    format!(
                        "KUBECONFIG names {} but none of it exists",
                        paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "fix KUBECONFIG or pass --kubeconfig FILE",
                ));
            }
            let mut merged = Kubeconfig::default();
            for p in &existing {
                merged = merged.merge(read_file(p)?).map_err(|e| {
                    DeployError::new(
                        format!("cannot merge {}: {}", p.display(), error_chain(&e)),
                        "fix KUBECONFIG or pass --kubeconfig FILE",
                    )
                })?;
            }
            let source = existing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":");
            return Ok((merged, source));
        }
        let candidates = default_paths();
        for p in &candidates {
            if p.exists() {
                return read_file(p).map(|k| (k, p.display().to_string()));
            }
        }
        Err(DeployError::new(
            format!(
                "no kubeconfig found (looked at {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "pass --kubeconfig FILE or set KUBECONFIG (under sudo, `sudo -E` keeps it)",
        ))
    }
}

impl Cluster {
    /// Asks the API server for its version: proves it is reachable and
    /// that the credentials are accepted.
    pub async fn check_reachable(&self) -> Result<String, DeployError> {
        let asked =
            tokio::time::timeout(CONNECT_TIMEOUT * 2, self.client.apiserver_version()).await;
        match asked {
            Ok(Ok(info)) => Ok(info.git_version),
            Ok(Err(e)) => Err(self.err(e, "reach the API server")),
            Err(_) => Err(DeployError::new(
                format!(
                    "the API server at {} did not answer within {}s",
                    self.server,
                    (CONNECT_TIMEOUT * 2).as_secs()
                ),
                "check that it is reachable from here (VPN? right context?)",
            )),
        }
    }
}

fn read_file(path: &Path) -> Result<Kubeconfig, DeployError> {
    if !path.exists() {
        return Err(DeployError::new(
            format!("kubeconfig {} does not exist", path.display()),
            "pass the path of an existing kubeconfig with --kubeconfig",
        ));
    }
    Kubeconfig::read_from(path).map_err(|e| {
        DeployError::new(
            format!(
                "cannot read kubeconfig {}: {}",
                path.display(),
                error_chain(&e)
            ),
            "check that the file is a kubeconfig (kubectl config view --kubeconfig FILE)",
        )
    })
}

/// `~/.kube/config` of the current user, then (under sudo) of the user who
/// ran sudo.
fn default_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        out.push(PathBuf::from(home).join(".kube/config"));
    }
    if let Ok(user) = std::env::var("SUDO_USER")
        && !user.is_empty()
        && user != "root"
        && let Some(home) = home_of(&user)
    {
        let p = home.join(".kube/config");
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// A user's home directory from /etc/passwd.
fn home_of(user: &str) -> Option<PathBuf> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[0] == user).then(|| PathBuf::from(fields[5]))
    })
}

fn context_list(k: &Kubeconfig) -> String {
    if k.contexts.is_empty() {
        return "the file has none".to_string();
    }
    k.contexts
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = r#"apiVersion: v1
kind: Config
current-context: one
clusters:
- name: c1
  cluster:
    server: https://127.0.0.1:1
contexts:
- name: one
  context: {cluster: c1, user: u1, namespace: shop}
- name: two
  context: {cluster: c1, user: u1}
users:
- name: u1
  user: {token: abc}
"#;

    fn write(dir: &Path) -> PathBuf {
        let p = dir.join("config");
        std::fs::write(&p, KUBECONFIG).expect("write kubeconfig");
        p
    }

    #[tokio::test]
    async fn context_namespace_and_overrides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path());
        let t = Target {
            kubeconfig: Some(path.clone()),
            ..Default::default()
        };
        let c = t.resolve().await.expect("resolve");
        assert_eq!(c.context, "one");
        assert_eq!(c.namespace, "shop");
        assert_eq!(c.server, "https://127.0.0.1:1");

        let t = Target {
            kubeconfig: Some(path.clone()),
            context: Some("two".into()),
            ..Default::default()
        };
        assert_eq!(t.resolve().await.expect("resolve").namespace, "default");

        let t = Target {
            kubeconfig: Some(path),
            context: Some("three".into()),
            ..Default::default()
        };
        let e = t.resolve().await.expect_err("unknown context");
        assert!(e.reason.contains("context \"three\" is not in"), "{e}");
        assert!(e.hint.contains("one, two"), "{e}");
    }

    #[tokio::test]
    async fn a_list_of_files_is_merged_like_kubectl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = write(dir.path());
        let second = dir.path().join("second");
        std::fs::write(
            &second,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c2\n  cluster: {server: 'https://127.0.0.1:2'}\ncontexts:\n- name: other\n  context: {cluster: c2, user: u1}\n",
        )
        .expect("write");
        let t = Target {
            kubeconfig_list: vec![first, dir.path().join("missing"), second],
            context: Some("other".into()),
            ..Default::default()
        };
        let c = t.resolve().await.expect("resolve");
        assert_eq!(c.server, "https://127.0.0.1:2");
        assert!(c.source.ends_with("second"), "{}", c.source);
    }

    #[tokio::test]
    async fn missing_file_says_so() {
        let t = Target {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            ..Default::default()
        };
        let e = t.resolve().await.expect_err("missing");
        assert!(e.reason.contains("does not exist"), "{e}");
    }

    #[tokio::test]
    async fn unreachable_server_is_one_line_with_a_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Target {
            kubeconfig: Some(write(dir.path())),
            ..Default::default()
        };
        let c = t.resolve().await.expect("resolve");
        let e = c
            .check_reachable()
            .await
            .expect_err("nothing listens on port 1");
        assert!(e.reason.contains("https://127.0.0.1:1"), "{e}");
        assert!(!e.hint.is_empty());
    }
}
