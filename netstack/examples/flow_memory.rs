//! Memory of idle TCP flows in the flow engine alone (no sockets, no
//! tasks): accepts N flows from fake laptops, moves one byte each way on
//! every flow, then closes and releases them all, printing the process's
//! RSS after each step. A load-independent figure for BENCHMARKS.md:
//!
//! ```sh
//! cargo run --release -p burrow-netstack --example flow_memory -- 10000
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use burrow_netstack::flow::{FlowConfig, FlowEngine, FlowId, Ingress, TcpRead};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, IpRepr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber as Seq,
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn packet(src: SocketAddr, dst: SocketAddr, tcp: &TcpRepr) -> Vec<u8> {
    let (s, d) = (IpAddress::from(src.ip()), IpAddress::from(dst.ip()));
    let ip = IpRepr::new(s, d, IpProtocol::Tcp, tcp.buffer_len(), 64);
    let mut buf = vec![0; ip.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut buf[..], &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[ip.header_len()..]),
        &s,
        &d,
        &caps,
    );
    buf
}

fn segment(src: SocketAddr, dst: SocketAddr, control: TcpControl, seq: i32) -> TcpRepr<'static> {
    TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: Seq(seq),
        ack_number: None,
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1380),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    }
}

/// The engine's reply segments: (seq, ack) of the last one to each laptop.
fn egress(e: &mut FlowEngine, now: Instant) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    e.egress(now, &mut |p: &[u8]| {
        let Ok(ip) = burrow_netstack::wire::parse_ip(p) else {
            return;
        };
        let Ok(seg) = TcpPacket::new_checked(ip.payload(p)) else {
            return;
        };
        out.push((
            SocketAddr::new(ip.dst, seg.dst_port()),
            seg.seq_number().0 as u32,
        ));
    });
    out
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let t0 = Instant::now();
    let mut e = FlowEngine::new(FlowConfig::default(), t0);
    let service = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 80);
    let laptop = |i: usize| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(100, 64, (i >> 16) as u8, 2)),
            (10_000 + (i & 0xffff)) as u16,
        )
    };
    println!("start: RSS {} KiB", rss_kib());
    let mut flows: Vec<(FlowId, SocketAddr, u32)> = Vec::with_capacity(n);
    for i in 0..n {
        let src = laptop(i);
        let syn = packet(src, service, &segment(src, service, TcpControl::Syn, 1000));
        let Ingress::NewTcp { id, .. } = e.ingress(&syn, t0) else {
            panic!("SYN {i} not a new flow")
        };
        e.accept(id, t0).expect("accept");
        let synack = egress(&mut e, t0);
        let server_seq = synack.last().map(|x| x.1).expect("SYN-ACK");
        let mut ack = segment(src, service, TcpControl::Psh, 1001);
        ack.ack_number = Some(Seq(server_seq.wrapping_add(1) as i32));
        ack.window_scale = None;
        ack.max_seg_size = None;
        ack.payload = b"x";
        e.ingress(&packet(src, service, &ack), t0);
        flows.push((id, src, server_seq.wrapping_add(1)));
    }
    let _ = egress(&mut e, t0);
    println!(
        "{n} flows accepted, 1 byte received on each: RSS {} KiB ({:.1} KiB per flow)",
        rss_kib(),
        rss_kib() as f64 / n as f64
    );
    let mut buf = [0u8; 16];
    for &(id, _, _) in &flows {
        assert_eq!(e.tcp_recv(id, &mut buf), Ok(TcpRead::Data(1)));
        assert_eq!(e.tcp_send(id, b"y"), Ok(1));
    }
    let _ = egress(&mut e, t0);
    println!("1 byte echoed on each: RSS {} KiB", rss_kib());
    for &(id, _, _) in &flows {
        e.tcp_abort(id).expect("abort");
    }
    let _ = egress(&mut e, t0);
    for &(id, _, _) in &flows {
        e.release(id);
    }
    println!("all reset and released: RSS {} KiB", rss_kib());
    drop(e);
    println!("engine dropped: RSS {} KiB", rss_kib());
}
