//! UDP flows (one connected socket per 5-tuple, a task receiving its
//! replies), UDP flows the gateway opens to laptops (rerouted UDP ports),
//! and ICMP echo (unprivileged ping sockets, else dropped).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_netstack::flow::FlowId;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Span;

use super::Datapath;
use super::inbox::{DialError, FlowEvent, IcmpKey};
use super::metrics::dial_index;
use crate::laptop::LaptopDatagrams;

pub(super) const ICMP_IDLE: Duration = Duration::from_secs(30);

/// Datagrams for laptops on the UDP flows the gateway opened, queued in
/// the flow event channel and not yet sent, at most (beyond: dropped, as a
/// full socket buffer would).
pub(super) const LAPTOP_UDP_QUEUED: usize = 4096;
/// Datagrams from a laptop waiting for the reader of a UDP flow the
/// gateway opened, at most per flow (beyond: dropped).
pub(super) const LAPTOP_UDP_QUEUE: usize = 64;

/// The data path's end of a UDP flow the gateway opened to a laptop.
pub(super) struct LaptopUdpEnd {
    /// The laptop's tunnel address and port.
    pub(super) laptop: SocketAddr,
    /// Datagrams from the laptop, to the flow's [`LaptopDatagrams`].
    pub(super) tx: mpsc::Sender<Vec<u8>>,
}

/// A UDP or ICMP flow's socket and its receive task.
pub(super) struct DatagramFlow {
    pub(super) socket: Arc<UdpSocket>,
    pub(super) task: JoinHandle<()>,
    pub(super) last_active: Instant,
    /// The flow's span, inside its laptop's.
    pub(super) span: Span,
}

impl Drop for DatagramFlow {
    fn drop(&mut self) {
        self.task.abort();
        tracing::debug!(parent: &self.span, "datagram flow closed");
    }
}

impl Datapath {
    pub(super) fn udp_to_cluster(
        &mut self,
        id: FlowId,
        new: bool,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) {
        if new || !self.udp.contains_key(&id) {
            let span = self.flow_span(src.ip(), dst, src.port());
            match self.open_udp(id, dst, span.clone()) {
                Ok(flow) => {
                    tracing::debug!(parent: &span, "UDP flow opened");
                    self.stats.udp_opened += 1;
                    self.udp.insert(id, flow);
                }
                Err(e) => {
                    tracing::debug!(parent: &span, error = %e, "UDP flow socket failed");
                    self.stats.dial_errors[dial_index(DialError::Other)] += 1;
                    self.flows.release(id);
                    return;
                }
            }
        }
        let Some(flow) = self.udp.get_mut(&id) else {
            return;
        };
        flow.last_active = now;
        match send_now(&flow.socket, payload) {
            Ok(n) => self.stats.udp_bytes_to_cluster += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stats.drop_udp_send_full += 1,
            Err(e) => tracing::debug!(parent: &flow.span, error = %e, "UDP send failed"),
        }
    }

    pub(super) fn open_udp(
        &mut self,
        id: FlowId,
        dst: SocketAddr,
        span: Span,
    ) -> io::Result<DatagramFlow> {
        let bind = match dst {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = std::net::UdpSocket::bind(bind)?;
        socket.connect(dst)?;
        socket.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        // Anything IP can carry: replies beyond the tunnel MTU reach the
        // laptop in fragments.
        let max_payload = usize::from(u16::MAX) - ip_udp_header(dst.ip());
        let task = tokio::spawn(udp_flow(
            id,
            socket.clone(),
            max_payload,
            self.events_tx.clone(),
        ));
        Ok(DatagramFlow {
            socket,
            task,
            last_active: Instant::now(),
            span,
        })
    }

    /// ICMP echo requests go out on an unprivileged ping socket, if the
    /// pod's `net.ipv4.ping_group_range` allows one; anything else ICMP is
    /// dropped.
    pub(super) fn icmp_to_cluster(&mut self, key: IcmpKey, message: &[u8], now: Instant) {
        if !self.icmp.contains_key(&key) {
            if self.icmp_permitted == Some(false) {
                self.stats.drop_icmp_not_permitted += 1;
                return;
            }
            match open_ping_socket(key.remote) {
                Ok(socket) => {
                    self.icmp_permitted = Some(true);
                    self.stats.icmp_opened += 1;
                    let task = tokio::spawn(icmp_flow(
                        key,
                        socket.clone(),
                        // An ICMP message in one IPv4 packet, fragmented.
                        usize::from(u16::MAX) - 20,
                        self.events_tx.clone(),
                    ));
                    let span = self.laptop_span(key.laptop);
                    let span = match tracing::debug_span!(parent: &span, "echo", remote = %key.remote, ident = key.ident)
                    {
                        s if s.is_disabled() => span,
                        s => s,
                    };
                    tracing::debug!(parent: &span, "ICMP echo flow opened");
                    self.icmp.insert(
                        key,
                        DatagramFlow {
                            socket,
                            task,
                            last_active: now,
                            span,
                        },
                    );
                }
                // Only the pod's ping permission turns ICMP echo off for
                // everyone; what one packet asks for (an IPv6 echo, an
                // address the kernel will not connect to) drops that
                // packet alone, so no laptop can switch ping off for the
                // others.
                Err(e) if ping_refused(&e) => {
                    if self.icmp_permitted.is_none() {
                        tracing::warn!(error = %e,
                            "ICMP echo disabled: the pod may not open ping sockets \
                             (net.ipv4.ping_group_range); pings through the tunnel are dropped");
                    }
                    self.icmp_permitted = Some(false);
                    self.stats.drop_icmp_not_permitted += 1;
                    return;
                }
                Err(e) => {
                    tracing::debug!(parent: &self.laptop_span(key.laptop), error = %e, remote = %key.remote, "ICMP echo not forwarded");
                    self.stats.drop_unsupported += 1;
                    return;
                }
            }
        }
        if let Some(flow) = self.icmp.get_mut(&key) {
            flow.last_active = now;
            // The kernel sets the identifier and checksum itself.
            let _ = send_now(&flow.socket, message);
        }
    }

    /// A UDP flow to a laptop (a rerouted UDP port's caller): from the
    /// gateway's tunnel address and an ephemeral port to `to`, which some
    /// peer must own.
    pub(super) fn open_laptop_udp(
        &mut self,
        to: SocketAddr,
        now: Instant,
    ) -> io::Result<LaptopDatagrams> {
        let local_ip = match self.cfg.tunnel_address {
            Some(ip) if ip.is_ipv4() == to.is_ipv4() => ip,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("the gateway has no tunnel address to send to {to} from"),
                ));
            }
        };
        if self.peers.route(to.ip()).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("no registered laptop has the tunnel address {}", to.ip()),
            ));
        }
        let (id, local) = self.flows.udp_open(local_ip, to, now).map_err(|e| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("cannot open a UDP flow to {to}: {e}"),
            )
        })?;
        let (tx, rx) = mpsc::channel(LAPTOP_UDP_QUEUE);
        self.laptop_udp.insert(id, LaptopUdpEnd { laptop: to, tx });
        tracing::debug!(parent: &self.laptop_span(to.ip()), dst = %to, sport = local.port(), "UDP flow to the laptop opened");
        Ok(LaptopDatagrams::new(
            id,
            local,
            to,
            rx,
            self.events_tx.clone(),
            self.laptop_udp_queued.clone(),
            LAPTOP_UDP_QUEUED,
        ))
    }
}

thread_local! {
    /// Where datagrams from the cluster land before they are copied out:
    /// one per thread, not one per flow (a flow's task would otherwise
    /// hold 64 KiB for as long as it lives).
    static RECV_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 1 << 16]);
}

/// One datagram of at most `max` bytes from `socket`, once readable: Ok(None)
/// for one larger than that (dropped, not truncated).
async fn recv_datagram(socket: &UdpSocket, max: usize) -> io::Result<Option<Vec<u8>>> {
    loop {
        socket.readable().await?;
        let got = RECV_BUF.with(|b| {
            let mut b = b.borrow_mut();
            // One more byte than fits, to recognise what is too large.
            let len = (max + 1).min(b.len());
            socket
                .try_recv(&mut b[..len])
                .map(|n| (n <= max).then(|| b[..n].to_vec()))
        });
        match got {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Receive a UDP flow's replies and hand them to the data path.
async fn udp_flow(
    id: FlowId,
    socket: Arc<UdpSocket>,
    max_payload: usize,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    loop {
        match recv_datagram(&socket, max_payload).await {
            Ok(Some(data)) => {
                if events.send(FlowEvent::UdpReply { id, data }).is_err() {
                    return;
                }
            }
            Ok(None) => tracing::debug!(?id, "UDP reply larger than IP carries dropped"),
            // A connected UDP socket reports ICMP port unreachable as
            // ECONNREFUSED on the next call; the flow stays usable.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(?id, error = %e, "UDP flow socket failed");
                return;
            }
        }
    }
}

/// Receive echo replies on a ping socket.
async fn icmp_flow(
    key: IcmpKey,
    socket: Arc<UdpSocket>,
    max_len: usize,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    loop {
        match recv_datagram(&socket, max_len).await {
            Ok(Some(data)) => {
                if events.send(FlowEvent::IcmpReply { key, data }).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => {
                tracing::debug!(?key, error = %e, "ICMP socket failed");
                return;
            }
        }
    }
}

/// Send on a connected datagram socket without waiting. Not tokio's
/// `try_send`: that reports a fresh socket as not writable until the reactor
/// has polled it once, which would drop every flow's first datagram.
pub(super) fn send_now(socket: &UdpSocket, payload: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send(payload)
}

pub(super) fn ip_udp_header(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 20 + 8,
        IpAddr::V6(_) => 40 + 8,
    }
}

/// Whether opening a ping socket failed because the pod may not open one
/// at all (`net.ipv4.ping_group_range`: EACCES; EPERM under some seccomp
/// profiles), as opposed to something about this one echo.
fn ping_refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
}

pub(super) fn open_ping_socket(remote: IpAddr) -> io::Result<Arc<UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let IpAddr::V4(_) = remote else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "ICMPv6 echo is not forwarded yet",
        ));
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(remote, 0).into())?;
    let std_socket: std::net::UdpSocket = socket.into();
    Ok(Arc::new(UdpSocket::from_std(std_socket)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one packet can cause (an IPv6 echo, which is not forwarded)
    /// is not the pod's ping permission: it must not switch ICMP echo off
    /// for every laptop.
    #[test]
    fn only_the_pods_permission_turns_ping_off() {
        let v6 = open_ping_socket("fd00::1".parse().expect("literal")).map(drop);
        let e = v6.expect_err("IPv6 echo is not forwarded");
        assert!(!ping_refused(&e), "{e}");
        assert!(ping_refused(&io::Error::from_raw_os_error(libc::EACCES)));
        assert!(ping_refused(&io::Error::from_raw_os_error(libc::EPERM)));
        assert!(!ping_refused(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!ping_refused(&io::Error::from_raw_os_error(
            libc::ENETUNREACH
        )));
    }
}
