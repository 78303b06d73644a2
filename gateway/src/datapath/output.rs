//! The sink encrypted datagrams leave by: the WireGuard UDP socket,
//! batched for `sendmmsg`, or a framed connection's output buffer; flushed
//! once per loop iteration.

use std::collections::HashMap;
use std::net::SocketAddr;

use burrow_netstack::udp_batch::SendBatch;
use burrow_netstack::wg::{Encapsulated, Peers};
use tokio::net::UdpSocket;

use super::metrics::Stats;
use crate::framed::{self, ConnId, FramedConn};

/// Where encrypted datagrams go: the UDP socket (batched) or a framed
/// connection's output buffer.
pub(super) struct Output {
    pub(super) udp: UdpSocket,
    pub(super) batch: SendBatch,
    pub(super) conns: HashMap<ConnId, FramedConn>,
    /// Connections written to since the last flush.
    pub(super) dirty: Vec<ConnId>,
}

impl Output {
    /// Send a datagram that already sits in some buffer.
    pub(super) fn send(&mut self, to: SocketAddr, datagram: &[u8], stats: &mut Stats) {
        if let Some(conn) = framed::addr_conn(to) {
            Self::push_framed(&mut self.conns, &mut self.dirty, conn, datagram, stats);
            return;
        }
        if self.batch.is_full() {
            self.flush_udp(stats);
        }
        let slot = self.batch.slot();
        let Some(dst) = slot.get_mut(..datagram.len()) else {
            stats.drop_too_large += 1;
            return;
        };
        dst.copy_from_slice(datagram);
        self.batch.commit(datagram.len(), to);
        stats.udp_tx += 1;
    }

    /// Encrypt an IP packet for the laptop it is addressed to and send it;
    /// UDP datagrams are encrypted straight into the send batch.
    pub(super) fn encapsulate(&mut self, peers: &mut Peers, packet: &[u8], stats: &mut Stats) {
        if self.batch.is_full() {
            self.flush_udp(stats);
        }
        let Output {
            batch,
            conns,
            dirty,
            ..
        } = self;
        let slot = batch.slot();
        let slot_start = slot.as_ptr();
        if let Encapsulated::Send { to, datagram, .. } = peers.encapsulate(packet, slot) {
            if let Some(conn) = framed::addr_conn(to) {
                Self::push_framed(conns, dirty, conn, datagram, stats);
            } else if datagram.as_ptr() == slot_start {
                let len = datagram.len();
                batch.commit(len, to);
                stats.udp_tx += 1;
            }
        }
        // Drops are counted by the peer table.
    }

    pub(super) fn push_framed(
        conns: &mut HashMap<ConnId, FramedConn>,
        dirty: &mut Vec<ConnId>,
        conn: ConnId,
        datagram: &[u8],
        stats: &mut Stats,
    ) {
        let Some(c) = conns.get(&conn) else {
            stats.drop_framed_backlog += 1;
            return;
        };
        if c.out.push(datagram) {
            stats.framed_tx += 1;
            if !dirty.contains(&conn) {
                dirty.push(conn);
            }
        } else {
            stats.drop_framed_backlog += 1;
        }
    }

    pub(super) fn flush_udp(&mut self, stats: &mut Stats) {
        if self.batch.is_empty() {
            return;
        }
        // Counted before: flush reports the ones the kernel refused.
        let dropped = self.batch.flush(&self.udp);
        stats.drop_udp_send_full += dropped as u64;
    }

    pub(super) fn flush(&mut self, stats: &mut Stats) {
        self.flush_udp(stats);
        for conn in self.dirty.drain(..) {
            if let Some(c) = self.conns.get(&conn) {
                c.out.flush();
            }
        }
    }
}
