//! mc-delay: a delay line for benchmarks on kernels without `sch_netem`.
//!
//! `mc-delay --queue 0 --delay-ms 25` takes the packets an iptables rule
//! sends to netfilter queue 0 (`-j NFQUEUE --queue-num 0`), holds each for
//! the delay and lets it go on, in order. Only packet metadata is copied to
//! userspace (the kernel keeps the packet). Runs until killed; if it dies,
//! the queue fails open (packets pass undelayed) rather than dropping all.
//!
//! Must never: change, drop or reorder a packet; touch any queue but its own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    /// Netfilter queue number to serve.
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// How long each packet is held.
    #[arg(long)]
    delay_ms: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let delay = Duration::from_millis(cli.delay_ms);
    let mut q = nfq::Queue::open().context("open a netfilter queue socket")?;
    q.bind(cli.queue).context("bind the queue")?;
    q.set_copy_range(cli.queue, 0).context("copy range")?;
    // Room for a delay's worth of packets at several Gbit/s.
    q.set_queue_max_len(cli.queue, 1 << 20)
        .context("queue length")?;
    q.set_fail_open(cli.queue, true).context("fail open")?;
    q.set_nonblocking(true);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        let mut got = false;
        loop {
            match q.recv() {
                Ok(mut m) => {
                    m.set_verdict(nfq::Verdict::Accept);
                    held.push_back((Instant::now() + delay, m));
                    got = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("receive from the queue"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, m)) = held.pop_front() {
                q.verdict(m).context("verdict")?;
            }
        }
        if !got {
            let wait = held
                .front()
                .map_or(Duration::from_millis(1), |(due, _)| {
                    due.saturating_duration_since(now)
                })
                .min(Duration::from_millis(1));
            std::thread::sleep(wait);
        }
    }
}
