//! The port-forward transport: a byte stream to a port of the gateway pod,
//! through the API server (`pods/portforward`), as `kubectl port-forward`
//! opens it. Being allowed to port-forward to the gateway pod is the
//! authorisation to use it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::DeployError;
use crate::target::Cluster;

/// One forwarded connection. Reading and writing go to the pod's port; the
/// forwarder task ends when the stream is dropped or the API server closes
/// it.
pub struct Forwarded {
    pub stream: Box<dyn Stream>,
    /// Resolves with the error the kubelet reported for this port (e.g.
    /// nothing listening), if any.
    pub error: Option<tokio::task::JoinHandle<Option<String>>>,
}

/// A bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Opens a port-forward to `namespace/pod:port`.
pub async fn open(
    cluster: &Cluster,
    namespace: &str,
    pod: &str,
    port: u16,
) -> Result<Forwarded, DeployError> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let mut pf = api
        .portforward(pod, &[port])
        .await
        .map_err(|e| cluster.err(e, &format!("port-forward to pod {namespace}/{pod}:{port}")))?;
    let stream = pf.take_stream(port).ok_or_else(|| {
        DeployError::new(
            format!("port-forward to {namespace}/{pod}:{port} opened no stream"),
            "",
        )
    })?;
    let error = pf.take_error(port).map(tokio::spawn);
    // The forwarder drives the WebSocket until the stream is dropped.
    tokio::spawn(async move {
        if let Err(e) = pf.join().await {
            tracing::debug!("port-forward ended: {e}");
        }
    });
    Ok(Forwarded {
        stream: Box::new(stream),
        error,
    })
}
