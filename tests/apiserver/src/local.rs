//! A ready-to-use API server on loopback, for tests and the harness: PKI in
//! a directory, a seeded store, HTTPS on `127.0.0.1:<random>` and an admin
//! kubeconfig.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::admission;
use crate::auth::{Authenticator, bootstrap_rbac};
use crate::logs::LogSource;
use crate::pki::{Pki, write_kubeconfig};
use crate::resources::must;
use crate::server::{Dialer, ServerConfig, direct_dialer, serve};
use crate::store::Store;

/// Creates what a fresh cluster has: namespaces `default`, `kube-system`,
/// `kube-public`, `kube-node-lease`, their `default` ServiceAccounts, the
/// default ClusterRoles and bindings and the `kubernetes` Service
/// (10.96.0.1). Existing objects are left alone, so it can run again.
pub fn bootstrap(store: &Store) -> Result<(), crate::ApiError> {
    let ignore_exists = |r: Result<serde_json::Value, crate::ApiError>| match r {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        ignore_exists(admission::create(
            store,
            must("core/v1/namespaces"),
            "",
            json!({"metadata": {"name": ns}}),
        ))?;
        ignore_exists(admission::create(
            store,
            must("core/v1/serviceaccounts"),
            ns,
            json!({"metadata": {"name": "default"}}),
        ))?;
    }
    for (rt, obj) in bootstrap_rbac() {
        ignore_exists(admission::create(store, rt, "", obj))?;
    }
    ignore_exists(admission::create(
        store,
        must("core/v1/services"),
        "default",
        json!({
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
        }),
    ))?;
    Ok(())
}

/// An API server serving on loopback until dropped.
pub struct LocalServer {
    pub store: Arc<Store>,
    pub auth: Arc<Authenticator>,
    pub pki: Pki,
    pub addr: SocketAddr,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// An admin (`system:masters`) kubeconfig.
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalServer {
    /// Starts a server with a bootstrapped store; files go in `dir`. Must be
    /// called inside a Tokio runtime.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, Arc::new(Store::new()), direct_dialer()).await
    }

    /// Starts a server on the given store and dialer.
    pub async fn start_with(dir: &Path, store: Arc<Store>, dialer: Dialer) -> anyhow::Result<Self> {
        Self::start_with_logs(dir, store, dialer, None).await
    }

    /// Starts a server on the given store and dialer whose `pods/{name}/log`
    /// answers from `logs` (a stand-in kubelet).
    pub async fn start_with_logs(
        dir: &Path,
        store: Arc<Store>,
        dialer: Dialer,
        logs: Option<LogSource>,
    ) -> anyhow::Result<Self> {
        bootstrap(&store).map_err(|e| anyhow::anyhow!("bootstrapping the store: {e}"))?;
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let pki = Pki::generate(dir, &[loopback], &[])?;
        let listener = std::net::TcpListener::bind((loopback, 0)).context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let auth = Arc::new(Authenticator::new());
        let cfg = ServerConfig {
            store: store.clone(),
            auth: auth.clone(),
            tls_cert_pem: pki.server_cert_pem.clone(),
            tls_key_pem: pki.server_key_pem.clone(),
            ca_pem: pki.ca_pem.clone(),
            listeners: vec![listener],
            dialer,
            logs,
        };
        let task = tokio::spawn(serve(cfg));
        let url = format!("https://{addr}");
        let kubeconfig = dir.join("admin.kubeconfig");
        let (cert, key) = pki.client_cert("kubernetes-admin", &["system:masters"])?;
        write_kubeconfig(
            &kubeconfig,
            "minicluster",
            &url,
            &pki.ca_pem,
            "kubernetes-admin",
            &cert,
            &key,
        )?;
        Ok(LocalServer {
            store,
            auth,
            pki,
            addr,
            url,
            kubeconfig,
            dir: dir.to_path_buf(),
            task,
        })
    }

    /// Writes a kubeconfig for another user (client certificate).
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{}.kubeconfig", user.replace(':', "_")));
        let (cert, key) = self.pki.client_cert(user, groups)?;
        write_kubeconfig(
            &path,
            "minicluster",
            &self.url,
            &self.pki.ca_pem,
            user,
            &cert,
            &key,
        )?;
        Ok(path)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
