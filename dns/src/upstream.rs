//! Asking another DNS server: one question over UDP (EDNS, 1232 bytes),
//! again over TCP when the answer comes back truncated. Each attempt uses
//! a fresh socket (random source port) and a random ID, and only an answer
//! to the very question counts.
//!
//! Hand-written on hickory-proto rather than hickory-resolver: the stub
//! forwards whole answers (rcode, SOA, SRV targets, CNAME chains), which a
//! resolver API reshapes, and keeps its own cache.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// How long one server gets per attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// EDNS payload size advertised (the DNS flag day's value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// Why a server gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no DNS servers configured")]
    NoServers,
    #[error("{server}: no answer within {timeout:?}")]
    Timeout {
        server: SocketAddr,
        timeout: Duration,
    },
    #[error("{server}: {source}")]
    Io {
        server: SocketAddr,
        source: std::io::Error,
    },
    #[error("{server}: malformed answer: {why}")]
    Malformed { server: SocketAddr, why: String },
}

/// A future returned by [`Exchange::exchange`].
pub type ExchangeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Message, ExchangeError>> + Send + 'a>>;

/// Something that answers one question from a list of servers (the
/// network; tests substitute an in-memory zone).
pub trait Exchange: Send + Sync + 'static {
    fn exchange<'a>(
        &'a self,
        servers: &'a [SocketAddr],
        name: &'a Name,
        qtype: RecordType,
    ) -> ExchangeFuture<'a>;
}

/// The real thing: UDP, then TCP on truncation; servers in order, two
/// rounds (a datagram lost in the tunnel costs one attempt, not the
/// answer).
#[derive(Debug, Default, Clone, Copy)]
pub struct Network;

impl Exchange for Network {
    fn exchange<'a>(
        &'a self,
        servers: &'a [SocketAddr],
        name: &'a Name,
        qtype: RecordType,
    ) -> ExchangeFuture<'a> {
        Box::pin(async move {
            let mut last = ExchangeError::NoServers;
            for _round in 0..2 {
                for server in servers {
                    match exchange_one(*server, name, qtype).await {
                        Ok(m) => return Ok(m),
                        Err(e) => {
                            tracing::debug!("DNS query {name} {qtype}: {e}");
                            last = e;
                        }
                    }
                }
            }
            Err(last)
        })
    }
}

fn question(name: &Name, qtype: RecordType) -> Message {
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(edns);
    m
}

/// Whether `answer` answers `asked`.
fn answers(asked: &Message, answer: &Message) -> bool {
    answer.metadata.id == asked.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && match (asked.queries.first(), answer.queries.first()) {
            (Some(a), Some(b)) => {
                a.query_type() == b.query_type() && a.name().eq_ignore_root(b.name())
            }
            // Some servers leave the question out of errors.
            (Some(_), None) => {
                answer.metadata.response_code != hickory_proto::op::ResponseCode::NoError
            }
            _ => false,
        }
}

/// One question to one server.
pub async fn exchange_one(
    server: SocketAddr,
    name: &Name,
    qtype: RecordType,
) -> Result<Message, ExchangeError> {
    let io = |source| ExchangeError::Io { server, source };
    let q = question(name, qtype);
    let bytes = q.to_vec().map_err(|e| ExchangeError::Malformed {
        server,
        why: format!("cannot encode the question: {e}"),
    })?;
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    sock.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 65535];
    let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            if let Ok(m) = Message::from_vec(&buf[..n])
                && answers(&q, &m)
            {
                return Ok(m);
            }
        }
    })
    .await
    .map_err(|_| ExchangeError::Timeout {
        server,
        timeout: ATTEMPT_TIMEOUT,
    })??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    tokio::time::timeout(ATTEMPT_TIMEOUT, exchange_tcp(server, &q, &bytes))
        .await
        .map_err(|_| ExchangeError::Timeout {
            server,
            timeout: ATTEMPT_TIMEOUT,
        })?
}

async fn exchange_tcp(
    server: SocketAddr,
    q: &Message,
    bytes: &[u8],
) -> Result<Message, ExchangeError> {
    let io = |source| ExchangeError::Io { server, source };
    let mut s = TcpStream::connect(server).await.map_err(io)?;
    let len = u16::try_from(bytes.len()).map_err(|_| ExchangeError::Malformed {
        server,
        why: "question longer than 65535 bytes".into(),
    })?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.map_err(io)?;
    loop {
        let n = s.read_u16().await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(n)];
        s.read_exact(&mut buf).await.map_err(io)?;
        let m = Message::from_vec(&buf).map_err(|e| ExchangeError::Malformed {
            server,
            why: e.to_string(),
        })?;
        if answers(q, &m) {
            return Ok(m);
        }
    }
}
