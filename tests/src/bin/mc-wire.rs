//! mc-wire: a userspace link emulator between two interfaces, for the
//! benchmark's delayed underlay on kernels without `sch_netem`
//! (`bench/e2e.sh` with `DELAY_MS`).
//!
//! `mc-wire --a IF_A --b IF_B --delay-ms D [--loss PCT] [--queue-bytes N]`
//! opens an `AF_PACKET` raw socket on each interface (all protocols,
//! outgoing frames ignored, promiscuous), and per direction one thread reads
//! every frame arriving on one interface, stamps it, and writes it out of the
//! other one D ms later, in arrival order. A direction holds at most N bytes
//! of frames in flight (default 64 MiB: above the bandwidth-delay product of
//! 10 Gbit/s over 50 ms); a frame arriving when its direction is full is
//! dropped, like a router's full queue. `--loss PCT` drops that share of
//! frames at random on arrival (each direction).
//!
//! It moves frames whole, one by one: the interfaces must not hand it frames
//! above their MTU (segmentation and checksum offloads off on both the
//! senders and the wire's interfaces: `ethtool -K IF tx off tso off gso off
//! gro off`); a frame larger than `--max-frame` is counted and dropped. The
//! namespace holding the two interfaces must neither route nor bridge them
//! (no addresses, no bridge, ip_forward 0): frames cross only through here.
//!
//! Runs until SIGTERM or SIGINT, then prints one line per direction:
//! frames and bytes forwarded, dropped (queue full, loss, oversize, send
//! errors), the kernel's own drops on the receiving socket (its buffer was
//! full: the wire did not keep up), the largest queue seen, and how many
//! frames left late (more than 1 ms, 10 ms after their time: the wire was
//! not scheduled; give it a real-time priority on a busy machine).
//!
//! Must never: forward anything that did not arrive on one of its two
//! interfaces, or write to any interface but the other one.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{MsgFlags, recv, send};
use nix::sys::time::TimeSpec;
use rand::Rng;
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

#[derive(Parser, Debug)]
#[command(about = "Join two interfaces with a fixed one-way delay each direction")]
struct Args {
    /// First interface.
    #[arg(long)]
    a: String,
    /// Second interface.
    #[arg(long)]
    b: String,
    /// One-way delay, each direction, in milliseconds (0: forward at once).
    #[arg(long)]
    delay_ms: f64,
    /// Random loss on arrival, each direction, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bytes of frames one direction holds at most (the queue).
    #[arg(long, default_value_t = 64 << 20)]
    queue_bytes: usize,
    /// Largest frame accepted (bytes, Ethernet header included).
    #[arg(long, default_value_t = 9216)]
    max_frame: usize,
    /// Kernel receive buffer of each socket (bytes, SO_RCVBUFFORCE).
    #[arg(long, default_value_t = 32 << 20)]
    rcvbuf: usize,
}

/// How long a thread waits at most before looking at the stop flag.
const TICK: Duration = Duration::from_millis(50);
/// Frames read in a row before the due ones are sent.
const BATCH: usize = 256;

fn set_int_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An `AF_PACKET` socket bound to `ifname`, receiving every protocol,
/// ignoring the frames it (or anyone) sends out of that interface,
/// promiscuous.
fn open_packet_socket(ifname: &str, rcvbuf: usize) -> Result<Socket> {
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let sock = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(eth_p_all))),
    )
    .with_context(|| format!("AF_PACKET socket for {ifname} (needs CAP_NET_RAW)"))?;
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: the storage is large enough and aligned for any address;
    // sockaddr_ll is plain data.
    let ll: &mut libc::sockaddr_ll = unsafe { storage.view_as() };
    ll.sll_family = libc::AF_PACKET as libc::sa_family_t;
    ll.sll_protocol = eth_p_all;
    ll.sll_ifindex = ll_index(ifindex)?;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the storage holds an initialised sockaddr_ll of `len` bytes.
    let addr = unsafe { SockAddr::new(storage, len) };
    sock.bind(&addr)
        .with_context(|| format!("bind AF_PACKET socket to {ifname}"))?;
    set_int_opt(
        sock.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        1,
    )
    .with_context(|| format!("PACKET_IGNORE_OUTGOING on {ifname}"))?;
    let mreq = libc::packet_mreq {
        mr_ifindex: ll_index(ifindex)?,
        mr_type: libc::PACKET_MR_PROMISC as u16,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    // SAFETY: `mreq` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&raw const mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("promiscuous mode on {ifname}"));
    }
    let rcvbuf = libc::c_int::try_from(rcvbuf).context("--rcvbuf too large")?;
    set_int_opt(sock.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcvbuf)
        .with_context(|| format!("SO_RCVBUFFORCE on {ifname} (needs CAP_NET_ADMIN)"))?;
    // Frames waiting to be read before the socket was bound to the interface
    // may come from anywhere: drop them.
    let mut scratch = [0u8; 64];
    while recv(sock.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT).is_ok() {}
    Ok(sock)
}

fn ll_index(ifindex: u32) -> Result<libc::c_int> {
    libc::c_int::try_from(ifindex).context("interface index out of range")
}

/// The kernel's drops on a packet socket since the last call (its receive
/// buffer was full).
fn kernel_drops(sock: &Socket) -> u64 {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `stats` and `len` live across the call; `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&raw mut stats).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        u64::from(stats.tp_drops)
    } else {
        0
    }
}

#[derive(Default, Debug)]
struct Stats {
    frames: u64,
    bytes: u64,
    queue_full: u64,
    lost: u64,
    oversize: u64,
    send_errors: u64,
    kernel_drops: u64,
    max_queue_bytes: usize,
    max_late_us: u64,
    late_1ms: u64,
    late_10ms: u64,
}

struct Frame {
    due: Instant,
    data: Box<[u8]>,
}

/// One direction: frames read from `src` leave by `dst` `delay` later.
fn run_direction(
    src: &Socket,
    dst: &Socket,
    args: &Args,
    delay: Duration,
    stop: &AtomicBool,
) -> Result<Stats> {
    let mut st = Stats::default();
    let mut queue: VecDeque<Frame> = VecDeque::new();
    let mut queued = 0usize;
    let mut buf = vec![0u8; args.max_frame + 1];
    let mut rng = rand::rng();
    let loss = args.loss / 100.0;
    kernel_drops(src); // reset the counter
    while !stop.load(Ordering::Relaxed) {
        let wait = match queue.front() {
            Some(f) => f.due.saturating_duration_since(Instant::now()).min(TICK),
            None => TICK,
        };
        if !wait.is_zero() {
            let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
            match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
        }
        for _ in 0..BATCH {
            let n = match recv(
                src.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
            ) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("read a frame"),
            };
            let now = Instant::now();
            if n > args.max_frame {
                st.oversize += 1;
                continue;
            }
            if loss > 0.0 && rng.random::<f64>() < loss {
                st.lost += 1;
                continue;
            }
            if queued + n > args.queue_bytes {
                st.queue_full += 1;
                continue;
            }
            queued += n;
            st.max_queue_bytes = st.max_queue_bytes.max(queued);
            queue.push_back(Frame {
                due: now + delay,
                data: buf[..n].into(),
            });
        }
        let now = Instant::now();
        while let Some(f) = queue.front() {
            if f.due > now {
                break;
            }
            let late = now.duration_since(f.due);
            let late_us = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
            st.max_late_us = st.max_late_us.max(late_us);
            st.late_1ms += u64::from(late_us > 1_000);
            st.late_10ms += u64::from(late_us > 10_000);
            match send(dst.as_raw_fd(), &f.data, MsgFlags::empty()) {
                Ok(_) => {
                    st.frames += 1;
                    st.bytes += f.data.len() as u64;
                }
                Err(Errno::EINTR) => continue,
                // a full device queue or the like: the frame is lost, as on a wire
                Err(_) => st.send_errors += 1,
            }
            queued -= f.data.len();
            queue.pop_front();
        }
    }
    st.kernel_drops = kernel_drops(src);
    Ok(st)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.delay_ms >= 0.0 && args.delay_ms < 10_000.0) {
        bail!("--delay-ms must be in [0, 10000)");
    }
    if !(0.0..=100.0).contains(&args.loss) {
        bail!("--loss must be a percentage");
    }
    if args.max_frame < 64 || args.max_frame > 65_536 {
        bail!("--max-frame must be in [64, 65536]");
    }
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    // SIGTERM/SIGINT are taken by the main thread alone (sigwait); the
    // direction threads inherit the blocked mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block().context("block SIGTERM/SIGINT")?;

    let a = Arc::new(open_packet_socket(&args.a, args.rcvbuf)?);
    let b = Arc::new(open_packet_socket(&args.b, args.rcvbuf)?);
    let args = Arc::new(args);
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |src: Arc<Socket>, dst: Arc<Socket>, name: String| {
        let args = Arc::clone(&args);
        let stop = Arc::clone(&stop);
        thread::Builder::new().name(name).spawn(move || {
            let r = run_direction(&src, &dst, &args, delay, &stop);
            if r.is_err() {
                // wake the main thread's sigwait: the wire is broken
                let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
            }
            r
        })
    };
    let ab = spawn(
        Arc::clone(&a),
        Arc::clone(&b),
        format!("{}>{}", args.a, args.b),
    )
    .context("start a thread")?;
    let ba = spawn(
        Arc::clone(&b),
        Arc::clone(&a),
        format!("{}>{}", args.b, args.a),
    )
    .context("start a thread")?;
    eprintln!(
        "mc-wire: {} <-> {}, {} ms each way, {} % loss, queue {} bytes each way",
        args.a, args.b, args.delay_ms, args.loss, args.queue_bytes
    );
    // Wait for a signal (a failing direction sends one too).
    loop {
        match sigs.wait() {
            Ok(_) => break,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("wait for a signal"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failed = false;
    for (name, h) in [
        (format!("{}>{}", args.a, args.b), ab),
        (format!("{}>{}", args.b, args.a), ba),
    ] {
        match h.join() {
            Ok(Ok(st)) => println!(
                "mc-wire {name}: frames={} bytes={} dropped: queue-full={} loss={} oversize={} send-errors={} kernel(rcvbuf)={}; max queue {} bytes; sent late by >1 ms {}, >10 ms {}, at most {} us",
                st.frames,
                st.bytes,
                st.queue_full,
                st.lost,
                st.oversize,
                st.send_errors,
                st.kernel_drops,
                st.max_queue_bytes,
                st.late_1ms,
                st.late_10ms,
                st.max_late_us
            ),
            Ok(Err(e)) => {
                eprintln!("mc-wire {name}: {e:#}");
                failed = true;
            }
            Err(_) => {
                eprintln!("mc-wire {name}: thread panicked");
                failed = true;
            }
        }
    }
    if failed {
        bail!("a direction failed");
    }
    Ok(())
}
