//! Batched UDP I/O for a WireGuard socket (the gateway's listener, the
//! laptop's socket): `recvmmsg`/`sendmmsg` move up to [`BATCH`] datagrams per
//! system call, into and out of buffers allocated once. A thin driver beside
//! the sans-IO core: it only moves bytes.
//!
//! With Linux UDP segmentation offload, runs of equal-sized datagrams to one
//! address leave as one message (`UDP_SEGMENT`, up to [`GSO_SEGMENTS`]) and
//! the kernel handles them as one buffer until the wire (or, on a veth or
//! loopback, all the way to the receiving socket); a receiving socket with
//! `UDP_GRO` gets such runs back as one buffer with their segment size. Both
//! are used when the kernel accepts them and fall back to one datagram per
//! message when it does not.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// Most datagrams in one segmented message (the kernel's limit is 64 on
/// older kernels).
pub const GSO_SEGMENTS: usize = 64;

/// Most bytes in one segmented message (a UDP datagram's length field is
/// 16 bits; this leaves room for the headers).
const GSO_BYTES: usize = 65_000;

/// A receive slot that can hold a whole coalesced (GRO) buffer.
const GRO_SLOT: usize = 65_536;

/// Messages per `recvmmsg` with GRO (each slot holds up to 64 datagrams).
const GRO_BATCH: usize = 32;

/// Room for one control message carrying an `int` or a `u16`.
type Control = [u64; 4];

/// Whether `BURROW_UDP_OFFLOAD=off` turns segmentation offload off (for
/// comparisons and for kernels or devices that misbehave with it).
pub fn offload_wanted() -> bool {
    !matches!(
        std::env::var("BURROW_UDP_OFFLOAD").as_deref(),
        Ok("off" | "0" | "false")
    )
}

/// Receive side: slots of `slot` bytes each, allocated once.
pub struct RecvBatch {
    slot: usize,
    count: usize,
    gro: bool,
    storage: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<Control>,
    received: usize,
}

// The raw pointers inside point into the batch's own heap buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// [`BATCH`] slots of `slot` bytes, no GRO.
    pub fn new(slot: usize) -> Self {
        Self::with(slot, BATCH, false)
    }

    /// For `socket`: turns on `UDP_GRO` when the kernel has it (and
    /// [`offload_wanted`]), with slots that hold a whole coalesced buffer;
    /// otherwise as [`RecvBatch::new`].
    pub fn for_socket(socket: &UdpSocket, slot: usize) -> Self {
        if offload_wanted() && set_gro(socket).is_ok() {
            Self::with(GRO_SLOT.max(slot), GRO_BATCH, true)
        } else {
            Self::new(slot)
        }
    }

    fn with(slot: usize, count: usize, gro: bool) -> Self {
        Self {
            slot,
            count,
            gro,
            storage: vec![0; slot * count],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: vec![unsafe { zeroed() }; count],
            iovecs: vec![unsafe { zeroed() }; count],
            headers: vec![unsafe { zeroed() }; count],
            controls: vec![[0; 4]; count],
            received: 0,
        }
    }

    /// Messages one `recv` can return (a full batch means more may wait).
    pub fn capacity(&self) -> usize {
        self.count
    }

    /// Whether the socket coalesces datagrams (`UDP_GRO` is on).
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Receive whatever is queued (up to [`RecvBatch::capacity`] messages)
    /// without waiting. `Err(WouldBlock)` when nothing is; tokio's readiness
    /// is cleared then.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received = 0;
        let fd = socket.as_raw_fd();
        let n = socket.try_io(Interest::READABLE, || {
            for i in 0..self.count {
                self.iovecs[i] = libc::iovec {
                    iov_base: self.storage[i * self.slot..].as_mut_ptr().cast(),
                    iov_len: self.slot,
                };
                let h = &mut self.headers[i];
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut self.iovecs[i];
                h.msg_hdr.msg_iovlen = 1;
                if self.gro {
                    h.msg_hdr.msg_control = self.controls[i].as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = size_of::<Control>() as _;
                } else {
                    h.msg_hdr.msg_control = std::ptr::null_mut();
                    h.msg_hdr.msg_controllen = 0;
                }
                h.msg_hdr.msg_flags = 0;
                h.msg_len = 0;
            }
            // SAFETY: every header points at live buffers of the stated sizes
            // owned by `self`, which outlives the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.as_mut_ptr(),
                    self.count as libc::c_uint,
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

    /// The `i`th message of the last `recv` as its sender and its datagrams
    /// (several when the kernel coalesced a run from one sender), unless it
    /// was truncated (larger than a slot) or came from an address family we
    /// do not know.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, std::slice::Chunks<'_, u8>)> {
        if i >= self.received {
            return None;
        }
        let h = &self.headers[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let from = sockaddr_to_std(&self.addrs[i])?;
        let len = (h.msg_len as usize).min(self.slot);
        let data = &self.storage[i * self.slot..i * self.slot + len];
        let segment = if self.gro {
            gro_segment(&h.msg_hdr)
        } else {
            None
        };
        Some((from, data.chunks(segment.unwrap_or(len).max(1))))
    }
}

fn set_gro(socket: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with an int option on an open socket.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The segment size a `UDP_GRO` control message reports, if any.
fn gro_segment(m: &libc::msghdr) -> Option<usize> {
    // SAFETY: `m` was filled by recvmmsg; its control pointer and length
    // describe a buffer we own, and the CMSG macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

/// Send side: datagrams are written straight into slots (see
/// [`SendBatch::slot`]) and leave in one `sendmmsg`, runs of them as
/// segmented messages when the kernel takes those.
pub struct SendBatch {
    slot: usize,
    storage: Vec<u8>,
    lens: Vec<usize>,
    dests: Vec<SocketAddr>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<Control>,
    /// Datagrams in each message of the `sendmmsg` being built.
    counts: Vec<usize>,
    queued: usize,
    gso: bool,
}

// The raw pointers inside point into the batch's own heap buffers.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slot: usize) -> Self {
        Self {
            slot,
            storage: vec![0; slot * BATCH],
            lens: vec![0; BATCH],
            dests: vec![SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: vec![unsafe { zeroed() }; BATCH],
            addr_lens: vec![0; BATCH],
            iovecs: vec![unsafe { zeroed() }; BATCH],
            headers: vec![unsafe { zeroed() }; BATCH],
            controls: vec![[0; 4]; BATCH],
            counts: vec![0; BATCH],
            queued: 0,
            gso: offload_wanted(),
        }
    }

    /// Whether runs of datagrams leave as segmented messages. Turned off for
    /// good when the kernel refuses one.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Turn segmentation offload on or off.
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
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
        if i == 0 || self.dests[i - 1] != to {
            self.addr_lens[i] = std_to_sockaddr(to, &mut self.addrs[i]);
        } else {
            self.addrs[i] = self.addrs[i - 1];
            self.addr_lens[i] = self.addr_lens[i - 1];
        }
        self.dests[i] = to;
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
                // The kernel or the outgoing device cannot segment: send one
                // datagram per message from now on.
                Err(e) if self.gso && self.counts[0] > 1 && gso_refused(&e) => {
                    tracing::info!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                    self.gso = false;
                }
                // One bad destination (e.g. unreachable) must not hold up the
                // rest: skip it.
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                    sent += self.counts[0];
                    failed += self.counts[0];
                }
                Err(_) => break,
            }
        }
        let dropped = self.queued - sent.min(self.queued) + failed;
        self.queued = 0;
        dropped
    }

    /// One `sendmmsg` of the queued datagrams from index `from` on; returns
    /// how many datagrams the kernel took.
    fn sendmmsg(&mut self, fd: std::os::fd::RawFd, from: usize) -> io::Result<usize> {
        let mut i = from;
        let mut m = 0;
        while i < self.queued {
            let count = self.run_at(i);
            for k in 0..count {
                self.iovecs[i - from + k] = libc::iovec {
                    iov_base: self.storage[(i + k) * self.slot..].as_mut_ptr().cast(),
                    iov_len: self.lens[i + k],
                };
            }
            let h = &mut self.headers[m];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = self.addr_lens[i];
            h.msg_hdr.msg_iov = &mut self.iovecs[i - from];
            h.msg_hdr.msg_iovlen = count as _;
            if count > 1 {
                let c = &mut self.controls[m];
                let size = u16::try_from(self.lens[i]).unwrap_or(u16::MAX);
                h.msg_hdr.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE/LEN are pure arithmetic.
                h.msg_hdr.msg_controllen =
                    unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
                // SAFETY: the control buffer is ours, aligned for cmsghdr and
                // larger than CMSG_SPACE(2); FIRSTHDR is non-null for it.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), size);
                }
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            self.counts[m] = count;
            m += 1;
            i += count;
        }
        // SAFETY: the first `m` headers point at live buffers owned by
        // `self`.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                m as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(self.counts[..n as usize].iter().sum())
        }
    }

    /// How many datagrams from `i` on can leave as one segmented message:
    /// same destination, each as long as the first except a shorter last.
    fn run_at(&self, i: usize) -> usize {
        if !self.gso {
            return 1;
        }
        let size = self.lens[i];
        let mut total = size;
        let mut j = i + 1;
        while j < self.queued
            && j - i < GSO_SEGMENTS
            && self.dests[j] == self.dests[i]
            && self.lens[j] <= size
            && self.lens[j] > 0
            && total + self.lens[j] <= GSO_BYTES
        {
            total += self.lens[j];
            j += 1;
            if self.lens[j - 1] < size {
                break;
            }
        }
        j - i
    }
}

/// Errors with which a kernel or device refuses a segmented message.
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
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

    /// Receive until `want` datagrams arrived; returns them and the number
    /// of messages they came in.
    async fn receive(
        b: &UdpSocket,
        batch: &mut RecvBatch,
        from: SocketAddr,
        want: usize,
    ) -> (Vec<Vec<u8>>, usize) {
        let mut got = Vec::new();
        let mut messages = 0;
        while got.len() < want {
            tokio::time::timeout(std::time::Duration::from_secs(5), b.readable())
                .await
                .unwrap_or_else(|_| panic!("{} of {want} datagrams arrived", got.len()))
                .expect("readable");
            let Ok(n) = batch.recv(b) else { continue };
            for i in 0..n {
                let (sender, datagrams) = batch.get(i).expect("datagram");
                assert_eq!(sender, from);
                messages += 1;
                got.extend(datagrams.map(<[u8]>::to_vec));
            }
        }
        (got, messages)
    }

    #[tokio::test]
    async fn batch_round_trip_on_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind b");
        let to = b.local_addr().expect("addr");
        let mut out = SendBatch::new(2048);
        out.set_gso(false);
        for i in 0..10u8 {
            let slot = out.slot();
            slot[..3].copy_from_slice(&[i, i, i]);
            out.commit(3, to);
        }
        assert_eq!(out.flush(&a), 0);
        let mut batch = RecvBatch::new(2048);
        let from = a.local_addr().expect("addr");
        let (got, messages) = receive(&b, &mut batch, from, 10).await;
        let want: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i, i, i]).collect();
        assert_eq!(got, want);
        assert_eq!(messages, 10);
    }

    /// What a run of datagrams looks like: sizes chosen so that runs break
    /// on a shorter datagram, a longer one, and a change of destination.
    fn pattern() -> Vec<(usize, u8)> {
        let mut v = Vec::new();
        for i in 0..30u8 {
            v.push((1200, i));
        }
        v.push((700, 30)); // ends the run
        v.push((1200, 31));
        v.push((1300, 32)); // longer: a new run
        v.push((1300, 33));
        v.push((1, 34));
        v
    }

    fn queue(out: &mut SendBatch, to: SocketAddr, items: &[(usize, u8)]) {
        for &(len, tag) in items {
            let slot = out.slot();
            slot[..len].fill(tag);
            slot[0] = tag;
            out.commit(len, to);
        }
    }

    #[tokio::test]
    async fn segmented_runs_arrive_whole_with_and_without_gro() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind a");
        let gro = UdpSocket::bind("127.0.0.1:0").await.expect("bind gro");
        let plain = UdpSocket::bind("127.0.0.1:0").await.expect("bind plain");
        let from = a.local_addr().expect("addr");
        let mut with_gro = RecvBatch::for_socket(&gro, 2048);
        assert!(with_gro.gro(), "this kernel has UDP_GRO");
        let mut out = SendBatch::new(2048);
        out.set_gso(true);
        let items = pattern();
        // Interleave destinations: the runs must split where the address
        // changes. (A socket without GRO pays a full buffer's worth of
        // receive-buffer charge per datagram split off a run: keep its share
        // small, as the default receive buffer is.)
        let few = &items[..8];
        queue(&mut out, gro.local_addr().expect("addr"), &items[..20]);
        queue(&mut out, plain.local_addr().expect("addr"), few);
        queue(&mut out, gro.local_addr().expect("addr"), &items[20..]);
        assert_eq!(out.flush(&a), 0);
        assert!(out.gso(), "loopback takes segmented messages");

        let want: Vec<Vec<u8>> = items.iter().map(|&(len, tag)| vec![tag; len]).collect();
        let (got, messages) = receive(&gro, &mut with_gro, from, items.len()).await;
        assert_eq!(got, want);
        assert!(
            messages < items.len() / 4,
            "GRO coalesced the runs: {messages} messages for {} datagrams",
            items.len()
        );
        let mut without = RecvBatch::new(2048);
        let (got, messages) = receive(&plain, &mut without, from, few.len()).await;
        assert_eq!(
            got,
            want[..few.len()],
            "a socket without GRO gets every datagram alone"
        );
        assert_eq!(messages, few.len());
    }

    #[test]
    fn runs_split_on_size_destination_and_limits() {
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        let mut out = SendBatch::new(1500);
        out.set_gso(true);
        queue(&mut out, a, &pattern());
        let runs = |out: &SendBatch| {
            let mut v = Vec::new();
            let mut i = 0;
            while i < out.queued {
                let n = out.run_at(i);
                v.push(n);
                i += n;
            }
            v
        };
        // 30 x 1200 then the shorter 700 closes the run; 1200 alone (the
        // next is longer); 1300, 1300, 1.
        assert_eq!(runs(&out), vec![31, 1, 3]);
        out.queued = 0;
        queue(&mut out, a, &[(1400, 0); 50]);
        queue(&mut out, b, &[(1400, 1); 3]);
        // 46 x 1400 = 64,400 bytes fit under the 65,000 limit, 47 do not.
        assert_eq!(runs(&out), vec![46, 4, 3]);
        out.set_gso(false);
        assert_eq!(runs(&out).len(), 53);
    }
}
