//! The framed-TCP WireGuard transport: each TCP connection carries
//! length-framed WireGuard datagrams ([`burrow_netstack::framing`]), the
//! form WireGuard takes through a Kubernetes port-forward.
//!
//! A laptop may open several connections; each is its own underlay
//! "endpoint" to the peer table, so replies follow WireGuard's roaming rule
//! and go back on the connection the peer authenticated on most recently.
//! Connections are named by synthetic addresses in `100::/64` (RFC 6666,
//! discard-only), which no UDP datagram can legitimately come from.
//!
//! Per connection a reader task passes raw stream chunks to the data path
//! (decoding happens there, without copying whole frames), and a writer task
//! drains an output buffer the data path appends frames to.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use burrow_netstack::framing::{self, FrameError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// Bytes read from a connection per chunk.
const READ_CHUNK: usize = 64 * 1024;
/// Unsent bytes a connection may hold before further frames are dropped
/// (as a full UDP socket buffer would drop them).
pub const MAX_BACKLOG: usize = 4 * 1024 * 1024;

/// Identity of one framed connection.
pub type ConnId = u64;

/// The synthetic underlay address standing for connection `id`.
pub fn conn_addr(id: ConnId) -> SocketAddr {
    let o = id.to_be_bytes();
    let seg = |i: usize| u16::from_be_bytes([o[i], o[i + 1]]);
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(
            0x0100,
            0,
            0,
            0,
            seg(0),
            seg(2),
            seg(4),
            seg(6),
        )),
        0,
    )
}

/// The connection a synthetic address stands for, if it is one.
pub fn addr_conn(addr: SocketAddr) -> Option<ConnId> {
    let IpAddr::V6(ip) = addr.ip() else {
        return None;
    };
    let s = ip.segments();
    if s[..4] != [0x0100, 0, 0, 0] {
        return None;
    }
    let o = ip.octets();
    let mut id = [0u8; 8];
    id.copy_from_slice(&o[8..]);
    Some(u64::from_be_bytes(id))
}

/// Output side of a connection, shared with its writer task.
#[derive(Default)]
pub struct FramedOut {
    buf: Mutex<Vec<u8>>,
    wake: Notify,
    closed: AtomicBool,
}

impl FramedOut {
    /// Append one datagram as a frame; false when it was dropped (backlog
    /// full, connection closed, or not frameable).
    pub fn push(&self, datagram: &[u8]) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(header) = framing::frame_header(datagram.len()) else {
            return false;
        };
        let Ok(mut buf) = self.buf.lock() else {
            return false;
        };
        if buf.len() + header.len() + datagram.len() > MAX_BACKLOG {
            return false;
        }
        buf.extend_from_slice(&header);
        buf.extend_from_slice(datagram);
        true
    }

    /// Tell the writer there is output (once per batch, not per frame).
    pub fn flush(&self) {
        self.wake.notify_one();
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// What connections tell the data path.
pub enum FramedEvent {
    Opened {
        id: ConnId,
        remote: SocketAddr,
        out: Arc<FramedOut>,
    },
    /// Raw stream bytes, to be decoded in order.
    Data {
        id: ConnId,
        chunk: Vec<u8>,
    },
    Closed {
        id: ConnId,
    },
}

/// A connection as the data path holds it.
pub struct FramedConn {
    pub remote: SocketAddr,
    pub out: Arc<FramedOut>,
    pub decoder: framing::FrameDecoder,
}

impl FramedConn {
    pub fn new(remote: SocketAddr, out: Arc<FramedOut>, max_frame: usize) -> Self {
        Self {
            remote,
            out,
            decoder: framing::FrameDecoder::with_max_frame(max_frame),
        }
    }
}

/// Accept connections until the listener fails.
pub async fn accept_loop(listener: TcpListener, events: mpsc::Sender<FramedEvent>) {
    let mut next_id: ConnId = 0;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "framed listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let _ = stream.set_nodelay(true);
        let out = Arc::new(FramedOut::default());
        if events
            .send(FramedEvent::Opened {
                id,
                remote,
                out: out.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        tracing::info!(conn = id, %remote, "framed connection opened");
        let (mut rd, mut wr) = stream.into_split();
        let reader_events = events.clone();
        let reader_out = out.clone();
        tokio::spawn(async move {
            loop {
                let mut chunk = Vec::with_capacity(READ_CHUNK);
                match rd.read_buf(&mut chunk).await {
                    Ok(0) => break,
                    Ok(_) => {
                        // A bounded channel: a laptop sending faster than
                        // the data path processes is slowed by TCP.
                        if reader_events
                            .send(FramedEvent::Data { id, chunk })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(conn = id, error = %e, "framed connection read failed");
                        break;
                    }
                }
            }
            reader_out.close();
            let _ = reader_events.send(FramedEvent::Closed { id }).await;
            tracing::info!(conn = id, %remote, "framed connection closed");
        });
        tokio::spawn(async move {
            // Double buffering: swap the shared buffer for this one, write
            // it out, keep its capacity.
            let mut pending = Vec::new();
            loop {
                let notified = out.wake.notified();
                {
                    let Ok(mut buf) = out.buf.lock() else { return };
                    std::mem::swap(&mut *buf, &mut pending);
                }
                if pending.is_empty() {
                    if out.closed.load(Ordering::Acquire) {
                        let _ = wr.shutdown().await;
                        return;
                    }
                    notified.await;
                    continue;
                }
                if let Err(e) = wr.write_all(&pending).await {
                    tracing::debug!(conn = id, error = %e, "framed connection write failed");
                    out.close();
                    return;
                }
                pending.clear();
            }
        });
    }
}

/// Decode every frame in `chunk`, handing each to `datagram`. An error means
/// the stream is out of step and the connection must be dropped.
pub fn decode_chunk(
    decoder: &mut framing::FrameDecoder,
    chunk: &[u8],
    mut datagram: impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    let mut input = chunk;
    while let Some(frame) = decoder.decode(&mut input)? {
        datagram(frame);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_round_trip_and_never_clash_with_udp() {
        for id in [1u64, 2, 0xdead_beef, u64::MAX] {
            assert_eq!(addr_conn(conn_addr(id)), Some(id));
        }
        assert_eq!(addr_conn("127.0.0.1:5".parse().expect("addr")), None);
        assert_eq!(addr_conn("[::1]:5".parse().expect("addr")), None);
    }
}
