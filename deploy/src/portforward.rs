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
    let api: Api<Pod> = Api::namespaced(cluster.stream_client.clone(), namespace);
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

/// A port-forward spoken directly: the `v4.channel.k8s.io` WebSocket to one
/// pod port, without kube-rs's forwarder task in between (its 4 KiB reads
/// and one loop for both directions capped the framed transport's
/// throughput). Each message
/// carries its channel in its first byte; data for the port on channel 0,
/// the kubelet's error report on channel 1; each channel first carries the
/// port number (2 bytes, little-endian), which is checked and not
/// returned as data.
///
/// For a data path that batches: [`ChannelSender::send`] takes a buffer that
/// already starts with the channel byte ([`DATA_CHANNEL`]), so a batch of
/// bytes becomes one WebSocket message without a copy; the receiver hands
/// back whole messages' payloads as [`bytes::Bytes`].
pub async fn open_channel(
    cluster: &Cluster,
    namespace: &str,
    pod: &str,
    port: u16,
) -> Result<(ChannelSender, ChannelReceiver), DeployError> {
    use futures::StreamExt as _;
    let doing = format!("port-forward to pod {namespace}/{pod}:{port}");
    if burrow_api::names::check_namespace(namespace).is_err()
        || !burrow_api::names::is_dns1123_subdomain(pod)
    {
        return Err(DeployError::new(
            format!("{doing}: not a valid pod name"),
            "",
        ));
    }
    let req = kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/pods"))
        .portforward(pod, &[port])
        .map_err(|e| DeployError::new(format!("{doing}: {e}"), ""))?;
    let conn = cluster
        .stream_client
        .connect(req)
        .await
        .map_err(|e| cluster.err(e, &doing))?;
    let (sink, stream) = conn.into_stream().split();
    Ok((
        ChannelSender { sink },
        ChannelReceiver {
            stream,
            port,
            data_started: false,
            error_started: false,
        },
    ))
}

/// The first byte of a data message (channel 0: the first port's data).
pub const DATA_CHANNEL: u8 = 0;

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// The sending half of [`open_channel`].
pub struct ChannelSender {
    sink: futures::stream::SplitSink<Ws, tokio_tungstenite::tungstenite::Message>,
}

impl ChannelSender {
    /// Send `message` (its first byte is [`DATA_CHANNEL`], the rest data
    /// for the port) as one WebSocket message, and flush it.
    pub async fn send(&mut self, message: bytes::Bytes) -> std::io::Result<()> {
        use futures::SinkExt as _;
        self.sink
            .send(tokio_tungstenite::tungstenite::Message::Binary(message))
            .await
            .map_err(std::io::Error::other)
    }

    /// Close the WebSocket (best effort).
    pub async fn close(mut self) {
        use futures::SinkExt as _;
        let _ = self.sink.close().await;
    }
}

/// The receiving half of [`open_channel`].
pub struct ChannelReceiver {
    stream: futures::stream::SplitStream<Ws>,
    port: u16,
    data_started: bool,
    error_started: bool,
}

/// What [`ChannelReceiver::recv`] got.
#[derive(Debug)]
pub enum Received {
    /// Bytes from the pod's port (never empty).
    Data(bytes::Bytes),
    /// The stream ended: `None` when closed cleanly, else why (the
    /// kubelet's error report, a protocol error or the WebSocket's error).
    End(Option<String>),
}

impl ChannelReceiver {
    /// The next bytes from the pod's port, or the end of the stream.
    pub async fn recv(&mut self) -> Received {
        use futures::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = match self.stream.next().await {
                None => return Received::End(None),
                Some(Err(e)) => return Received::End(Some(e.to_string())),
                Some(Ok(m)) => m,
            };
            let mut bytes = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => return Received::End(None),
                _ => continue,
            };
            if bytes.is_empty() {
                continue;
            }
            let channel = bytes[0];
            let _ = bytes.split_to(1);
            let started = match channel {
                0 => &mut self.data_started,
                1 => &mut self.error_started,
                other => return Received::End(Some(format!("message on unknown channel {other}"))),
            };
            if !*started {
                // The channel's first message is the port number.
                if bytes.len() < 2 || u16::from_le_bytes([bytes[0], bytes[1]]) != self.port {
                    return Received::End(Some(format!(
                        "the port-forward did not open port {}",
                        self.port
                    )));
                }
                *started = true;
                let _ = bytes.split_to(2);
            }
            if bytes.is_empty() {
                continue;
            }
            if channel == 1 {
                return Received::End(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            // A copy, and the message dropped here: while a message's bytes
            // are held, they pin tungstenite's read buffer, and its next
            // `reserve` moves the rest to a fresh allocation (zeroed,
            // faulted in) per message. The daemon spent 0.25–0.27 CPU-s per
            // 100 MiB downloaded over port-forward, 0.20–0.23 with the copy.
            return Received::Data(bytes::Bytes::copy_from_slice(&bytes));
        }
    }
}
