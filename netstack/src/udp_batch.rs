//! Batched UDP I/O for a WireGuard socket (the gateway's listener, the
//! laptop's socket): `recvmmsg`/`sendmmsg` move up to [`BATCH`] datagrams per
//! system call, into and out of buffers allocated once. A thin driver beside
//! the sans-IO core: it only moves bytes.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// Receive side: `BATCH` slots of `slot` bytes each.
pub struct RecvBatch {
    slot: usize,
    storage: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

// The raw pointers inside point into the batch's own heap buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(slot: usize) -> Self {
        Self {
            slot,
            storage: vec![0; slot * BATCH],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
            received: 0,
        }
    }

    /// Receive whatever is queued (up to `BATCH` datagrams) without waiting.
    /// `Err(WouldBlock)` when nothing is; tokio's readiness is cleared then.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received = 0;
        let fd = socket.as_raw_fd();
        let n = socket.try_io(Interest::READABLE, || {
            for i in 0..BATCH {
                self.iovecs[i] = libc::iovec {
                    iov_base: self.storage[i * self.slot..].as_mut_ptr().cast(),
                    iov_len: self.slot,
                };
                let h = &mut self.headers[i];
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut self.iovecs[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
                h.msg_hdr.msg_flags = 0;
                h.msg_len = 0;
            }
            // SAFETY: every header points at live buffers of the stated sizes
            // owned by `self`, which outlives the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })?;
        self.received = n;
        Ok(n)
    }

    /// The `i`th datagram of the last `recv`, unless it was truncated (larger
    /// than a slot) or came from an address family we do not know.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.received {
            return None;
        }
        let h = &self.headers[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let from = sockaddr_to_std(&self.addrs[i])?;
        let len = (h.msg_len as usize).min(self.slot);
        Some((from, &self.storage[i * self.slot..i * self.slot + len]))
    }
}

/// Send side: datagrams are written straight into slots (see
/// [`SendBatch::slot`]) and leave in one `sendmmsg`.
pub struct SendBatch {
    slot: usize,
    storage: Vec<u8>,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    queued: usize,
}

// The raw pointers inside point into the batch's own heap buffers.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slot: usize) -> Self {
        Self {
            slot,
            storage: vec![0; slot * BATCH],
            lens: vec![0; BATCH],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: vec![unsafe { zeroed() }; BATCH],
            addr_lens: vec![0; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
            queued: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.queued == BATCH
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// The next free slot, to encrypt a datagram into. Call only when not
    /// full; commit it with [`SendBatch::commit`].
    pub fn slot(&mut self) -> &mut [u8] {
        let start = self.queued.min(BATCH - 1) * self.slot;
        &mut self.storage[start..start + self.slot]
    }

    /// Queue the first `len` bytes of the slot last handed out, for `to`.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        if self.queued == BATCH {
            return;
        }
        let i = self.queued;
        self.lens[i] = len.min(self.slot);
        self.addr_lens[i] = std_to_sockaddr(to, &mut self.addrs[i]);
        self.queued += 1;
    }

    /// Send everything queued. Datagrams the kernel will not take now (its
    /// buffer is full) are dropped, as a router would; returns how many were.
    pub fn flush(&mut self, socket: &UdpSocket) -> usize {
        let mut sent = 0;
        let mut failed = 0;
        let fd = socket.as_raw_fd();
        while sent < self.queued {
            // Called directly rather than through tokio's `try_io`: the data
            // path never waits for writability (a full buffer drops, as a
            // router would), and tokio reports a fresh socket not yet
            // writable until its reactor has polled it once.
            match self.sendmmsg(fd, sent) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // One bad destination (e.g. unreachable) must not hold up the
                // rest: skip it.
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                    sent += 1;
                    failed += 1;
                }
                Err(_) => break,
            }
        }
        let dropped = self.queued - sent.min(self.queued) + failed;
        self.queued = 0;
        dropped
    }

    /// One `sendmmsg` of the queued datagrams from index `from` on.
    fn sendmmsg(&mut self, fd: std::os::fd::RawFd, from: usize) -> io::Result<usize> {
        let pending = self.queued - from;
        for j in 0..pending {
            let i = from + j;
            self.iovecs[j] = libc::iovec {
                iov_base: self.storage[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let h = &mut self.headers[j];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = self.addr_lens[i];
            h.msg_hdr.msg_iov = &mut self.iovecs[j];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: the first `pending` headers point at live buffers owned by
        // `self`.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                pending as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const _) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const _) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr type.
            let sin: &mut libc::sockaddr_in = unsafe { &mut *(ss as *mut _ as *mut _) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            sin.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6: &mut libc::sockaddr_in6 = unsafe { &mut *(ss as *mut _ as *mut _) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batch_round_trip_on_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind b");
        let to = b.local_addr().expect("addr");
        let mut out = SendBatch::new(2048);
        for i in 0..10u8 {
            let slot = out.slot();
            slot[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to);
        }
        assert_eq!(out.flush(&a), 0);
        let mut got = Vec::new();
        let mut batch = RecvBatch::new(2048);
        while got.len() < 10 {
            b.readable().await.expect("readable");
            let Ok(n) = batch.recv(&b) else { continue };
            for i in 0..n {
                let (from, d) = batch.get(i).expect("datagram");
                assert_eq!(from, a.local_addr().expect("addr"));
                got.push(d.to_vec());
            }
        }
        let want: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i, i, i]).collect();
        assert_eq!(got, want);
    }
}
