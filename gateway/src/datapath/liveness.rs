//! Laptops that stop answering (issue 14, fail-open): a connection the
//! gateway opened to a laptop waiting [`LAPTOP_PATIENCE`] with nothing
//! heard from the laptop since marks it down (checked on every WireGuard
//! timer tick); so does the close of the framed connection that was its
//! endpoint, when it was the laptop's last stream (`mod.rs`). What "down"
//! means is [`LAPTOP_PATIENCE`]'s doc; the transition is logged once.
//! Passive silence alone could not be judged this fast: a laptop's
//! keepalive is 25 s, its lease renewal 5 s.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burrow_netstack::flow::FlowId;

use super::Datapath;
use super::tcp::End;
use crate::laptop::LAPTOP_PATIENCE;

impl Datapath {
    /// Finds laptops that leave a connection waiting (a SYN, or bytes not
    /// acknowledged) for [`LAPTOP_PATIENCE`] without the gateway hearing
    /// anything from them since, and marks them down.
    pub(super) fn check_laptops(&mut self, now: Instant) {
        let Self {
            laptop_streams,
            tcp,
            flows,
            peers,
            ..
        } = self;
        let mut silent: Vec<IpAddr> = Vec::new();
        laptop_streams.retain(|id, waiting| {
            let Some(flow) = tcp.get(id) else {
                return false;
            };
            let since = match &flow.connecting {
                Some(c) => c.started,
                None => {
                    if flows.tcp_send_queue(*id).unwrap_or(0) == 0 {
                        *waiting = None;
                        return true;
                    }
                    *waiting.get_or_insert(now)
                }
            };
            if now.saturating_duration_since(since) < LAPTOP_PATIENCE {
                return true;
            }
            let laptop = flow.src.ip();
            let heard = peers
                .route(laptop)
                .and_then(|p| peers.get(p))
                .and_then(|p| p.last_received());
            if heard.is_none_or(|h| h < since) && !silent.contains(&laptop) {
                silent.push(laptop);
            }
            true
        });
        for laptop in silent {
            self.mark_down(laptop, now, "it did not answer for 1.5 s");
        }
    }

    /// The laptop at `laptop` is not reachable: its pending dials fail and
    /// its streams fail with `HostUnreachable` (the reroute listeners then
    /// send their callers to the cluster's pods), and so do further dials
    /// until it is heard from again.
    pub(super) fn mark_down(&mut self, laptop: IpAddr, now: Instant, why: &str) {
        if self.down.insert(laptop, now).is_none() {
            tracing::info!(parent: &self.laptop_span(laptop), %laptop, "laptop not answering ({why}): rerouted connections go to the cluster's pods until it is heard from again");
        }
        let ids: Vec<FlowId> = self
            .laptop_streams
            .keys()
            .filter(|id| self.tcp.get(id).is_some_and(|f| f.src.ip() == laptop))
            .copied()
            .collect();
        for id in ids {
            self.laptop_streams.remove(&id);
            let Some(flow) = self.tcp.get_mut(&id) else {
                continue;
            };
            if let Some(connecting) = flow.connecting.take() {
                self.stats.laptop_dials[2] += 1;
                let _ = connecting.reply.send(Err(unreachable(laptop)));
            } else if let End::Stream(end) = &flow.end {
                end.shared.unreachable.store(true, Ordering::Release);
            }
            self.abort_tcp(id);
        }
    }
}

/// A dial to, or a stream of, a laptop that is not answering.
pub(super) fn unreachable(laptop: IpAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::HostUnreachable,
        format!("the laptop at {laptop} is not answering"),
    )
}
