//! The data path's counters and their Prometheus text exposition.
//!
//! The numbers live in the data path task (the single owner of the state);
//! each scrape asks it for a rendering over a channel, so a scrape always
//! sees current values and the hot path keeps plain counters, no atomics.
//! The HTTP side is axum over a [`DatapathHandle`]: `GET /metrics`, one
//! request per connection, nothing else served.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use burrow_netstack::flow::{Limit, TcpState};
use tokio::net::TcpListener;

use super::Datapath;
use super::inbox::{DatapathHandle, DialError};
use super::output::Sink;

/// Counters the data path keeps beyond the peer table's own.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) tcp_opened: u64,
    pub(super) udp_opened: u64,
    pub(super) icmp_opened: u64,
    pub(super) tcp_bytes_to_cluster: u64,
    pub(super) tcp_bytes_to_laptop: u64,
    pub(super) udp_bytes_to_cluster: u64,
    pub(super) udp_bytes_to_laptop: u64,
    pub(super) dial_errors: [u64; 4],
    pub(super) udp_rx: u64,
    pub(super) udp_tx: u64,
    pub(super) framed_rx: u64,
    pub(super) framed_tx: u64,
    pub(super) framed_opened: u64,
    pub(super) drop_malformed: u64,
    pub(super) drop_fragment: u64,
    pub(super) drop_unsupported: u64,
    pub(super) drop_pending_syns: u64,
    pub(super) drop_icmp_not_permitted: u64,
    pub(super) drop_udp_send_full: u64,
    pub(super) drop_framed_backlog: u64,
    pub(super) drop_too_large: u64,
    /// Connections to laptops: established, refused, timed out, no such
    /// laptop.
    pub(super) laptop_dials: [u64; 4],
    /// New flows refused by a laptop's caps, by [`Limit::ALL`] order.
    pub(super) refused: [u64; 3],
}

impl Datapath {
    pub(super) fn render_metrics(&self, out: &Sink) -> String {
        let s = &self.stats;
        let c = self.peers.counters();
        let accepted = self.tcp.values().filter(|f| f.accepted).count();
        let dialing = self.tcp.len() - accepted;
        let mut e = Exposition::default();
        e.family(
            "burrow_gateway_flows_open",
            "gauge",
            "Flows currently open.",
        );
        e.sample("proto=\"tcp\"", accepted as f64);
        e.sample("proto=\"udp\"", self.udp.len() as f64);
        e.sample("proto=\"icmp\"", self.icmp.len() as f64);
        // Where open TCP flows are in their lives: flows piling up in
        // LAST-ACK or FIN-WAIT mean closes whose last segments were lost
        // and wait for smoltcp's retransmission (its RTO backs off to 60 s).
        e.family(
            "burrow_gateway_tcp_flows",
            "gauge",
            "Accepted TCP flows, by the gateway stack's TCP state.",
        );
        let mut by_state: Vec<(TcpState, usize)> = Vec::new();
        for (id, _) in self.tcp.iter().filter(|(_, f)| f.accepted) {
            let Some(state) = self.flows.tcp_state(*id) else {
                continue;
            };
            match by_state.iter_mut().find(|(s, _)| *s == state) {
                Some((_, n)) => *n += 1,
                None => by_state.push((state, 1)),
            }
        }
        by_state.sort_by_key(|(s, _)| *s as u8);
        for (state, n) in by_state {
            let label = state.to_string().to_lowercase().replace('-', "_");
            e.sample(&format!("state=\"{label}\""), n as f64);
        }
        e.family(
            "burrow_gateway_dials_pending",
            "gauge",
            "TCP dials in progress.",
        );
        e.sample("", dialing as f64);
        e.family(
            "burrow_gateway_flows_opened_total",
            "counter",
            "Flows opened.",
        );
        e.sample("proto=\"tcp\"", s.tcp_opened as f64);
        e.sample("proto=\"udp\"", s.udp_opened as f64);
        e.sample("proto=\"icmp\"", s.icmp_opened as f64);
        e.family(
            "burrow_gateway_flow_bytes_total",
            "counter",
            "Flow payload bytes, by direction.",
        );
        for (labels, v) in [
            (
                "proto=\"tcp\",direction=\"to_cluster\"",
                s.tcp_bytes_to_cluster,
            ),
            (
                "proto=\"tcp\",direction=\"to_laptop\"",
                s.tcp_bytes_to_laptop,
            ),
            (
                "proto=\"udp\",direction=\"to_cluster\"",
                s.udp_bytes_to_cluster,
            ),
            (
                "proto=\"udp\",direction=\"to_laptop\"",
                s.udp_bytes_to_laptop,
            ),
        ] {
            e.sample(labels, v as f64);
        }
        e.family(
            "burrow_gateway_dial_errors_total",
            "counter",
            "Failed dials into the cluster, by kind.",
        );
        for kind in [
            DialError::Refused,
            DialError::Timeout,
            DialError::Unreachable,
            DialError::Other,
        ] {
            e.sample(
                &format!("kind=\"{}\"", kind.label()),
                s.dial_errors[dial_index(kind)] as f64,
            );
        }
        e.family(
            "burrow_gateway_laptop_connections_total",
            "counter",
            "TCP connections the gateway opened to laptops, by outcome.",
        );
        for (i, outcome) in ["established", "refused", "timeout", "no_such_laptop"]
            .iter()
            .enumerate()
        {
            e.sample(&format!("outcome=\"{outcome}\""), s.laptop_dials[i] as f64);
        }
        e.family(
            "burrow_gateway_flows_refused_total",
            "counter",
            "New flows refused because their laptop was at a cap, by cap (each refused SYN or datagram).",
        );
        for limit in Limit::ALL {
            e.sample(
                &format!("limit=\"{}\"", limit.label()),
                s.refused[limit_index(limit)] as f64,
            );
        }
        e.family(
            "burrow_gateway_laptop_flow_limit",
            "gauge",
            "The caps on what one laptop may hold.",
        );
        let caps = self.cfg.per_laptop;
        for (limit, cap) in [
            (Limit::TcpFlows, caps.tcp_flows),
            (Limit::PendingDials, caps.pending_dials),
            (Limit::UdpFlows, caps.udp_flows),
        ] {
            e.sample(&format!("limit=\"{}\"", limit.label()), cap as f64);
        }
        e.family(
            "burrow_gateway_packets_dropped_total",
            "counter",
            "Packets and datagrams dropped, by reason.",
        );
        for (reason, v) in [
            ("forged_source", c.forged_source),
            ("peer_to_peer", c.peer_to_peer),
            ("unknown_peer", c.unknown_peer),
            ("malformed", c.malformed + s.drop_malformed),
            ("unknown_destination", c.unknown_destination),
            ("no_endpoint", c.no_endpoint),
            ("wireguard", c.wireguard_errors),
            ("buffer_too_small", c.buffer_too_small),
            ("fragment", s.drop_fragment),
            ("unsupported_protocol", s.drop_unsupported),
            ("too_many_pending_syns", s.drop_pending_syns),
            ("icmp_not_permitted", s.drop_icmp_not_permitted),
            ("udp_send_buffer_full", s.drop_udp_send_full),
            ("framed_backlog_full", s.drop_framed_backlog),
            ("too_large", s.drop_too_large),
        ] {
            e.sample(&format!("reason=\"{reason}\""), v as f64);
        }
        e.family(
            "burrow_gateway_wireguard_datagrams_total",
            "counter",
            "WireGuard datagrams, by transport and direction.",
        );
        e.sample("transport=\"udp\",direction=\"rx\"", s.udp_rx as f64);
        e.sample("transport=\"udp\",direction=\"tx\"", s.udp_tx as f64);
        e.sample("transport=\"framed\",direction=\"rx\"", s.framed_rx as f64);
        e.sample("transport=\"framed\",direction=\"tx\"", s.framed_tx as f64);
        e.family(
            "burrow_gateway_framed_connections_opened_total",
            "counter",
            "Framed-TCP transport connections accepted.",
        );
        e.sample("", s.framed_opened as f64);
        e.family(
            "burrow_gateway_framed_connections",
            "gauge",
            "Framed-TCP transport connections open.",
        );
        e.sample("", out.conns.len() as f64);
        let f = &self.framed_counters;
        e.family(
            "burrow_gateway_framed_connections_refused_total",
            "counter",
            "Framed-TCP connections reset at once because a cap was full, by cap.",
        );
        e.sample(
            "reason=\"total_limit\"",
            f.refused_total_limit.load(Ordering::Relaxed) as f64,
        );
        e.sample(
            "reason=\"source_limit\"",
            f.refused_source_limit.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "burrow_gateway_framed_connections_timed_out_total",
            "counter",
            "Framed-TCP connections closed by the gateway, by timeout.",
        );
        e.sample(
            "reason=\"handshake\"",
            f.closed_handshake_timeout.load(Ordering::Relaxed) as f64,
        );
        e.sample(
            "reason=\"idle\"",
            f.closed_idle_timeout.load(Ordering::Relaxed) as f64,
        );
        e.family(
            "burrow_gateway_peers",
            "gauge",
            "Configured WireGuard peers.",
        );
        e.sample("", self.peers.len() as f64);
        // Counts only: nothing on the metrics port names a laptop or a key.
        e.family(
            "burrow_gateway_peers_handshaken",
            "gauge",
            "Peers whose last handshake completed within the window.",
        );
        let now_ages: Vec<Duration> = self
            .peers
            .ids()
            .filter_map(|id| self.peers.get(id)?.stats().since_handshake)
            .collect();
        for (window, secs) in [("180s", 180u64), ("600s", 600)] {
            let n = now_ages.iter().filter(|a| a.as_secs() < secs).count();
            e.sample(&format!("within=\"{window}\""), n as f64);
        }
        if let Some(mem) = allocator_bytes() {
            e.family(
                "burrow_gateway_allocator_bytes",
                "gauge",
                "The allocator's view of the heap: bytes the gateway holds (allocated) and bytes in pages it keeps in memory (resident). Resident growing while allocated stays is the allocator's caching, not the gateway's.",
            );
            e.sample("kind=\"allocated\"", mem.allocated as f64);
            e.sample("kind=\"resident\"", mem.resident as f64);
        }
        e.finish()
    }
}

struct AllocatorBytes {
    allocated: usize,
    resident: usize,
}

/// jemalloc's heap statistics (refreshed by advancing its epoch); none
/// when the gateway is built without jemalloc.
fn allocator_bytes() -> Option<AllocatorBytes> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        epoch::advance().ok()?;
        Some(AllocatorBytes {
            allocated: stats::allocated::read().ok()?,
            resident: stats::resident::read().ok()?,
        })
    }
    #[cfg(not(feature = "jemalloc"))]
    None
}

pub(super) fn dial_index(e: DialError) -> usize {
    match e {
        DialError::Refused => 0,
        DialError::Timeout => 1,
        DialError::Unreachable => 2,
        DialError::Other => 3,
    }
}

pub(super) fn limit_index(l: Limit) -> usize {
    match l {
        Limit::TcpFlows => 0,
        Limit::PendingDials => 1,
        Limit::UdpFlows => 2,
    }
}

/// Builder of the text format, version 0.0.4.
#[derive(Default)]
pub struct Exposition {
    text: String,
    family: &'static str,
}

impl Exposition {
    pub fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        self.family = name;
    }

    /// A sample of the current family; `labels` without braces, "" for none.
    pub fn sample(&mut self, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{} {value}", self.family);
        } else {
            let _ = writeln!(self.text, "{}{{{labels}}} {value}", self.family);
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Serve scrapes until the data path goes away: `GET /metrics` only, one
/// request per connection, each connection closed after
/// [`SCRAPE_LIFETIME`] at the latest.
pub async fn serve(listener: TcpListener, datapath: DatapathHandle) {
    let app = axum::Router::new()
        // axum answers HEAD with the GET handler unless told otherwise.
        .route("/metrics", get(scrape).head(only_get).fallback(only_get))
        .fallback(not_found)
        .with_state(datapath.clone());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if datapath.tx.is_closed() {
            return;
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(SCRAPE_LIFETIME, served).await;
        });
    }
}

/// How long one scrape's connection may stay open.
const SCRAPE_LIFETIME: Duration = Duration::from_secs(10);

async fn scrape(State(datapath): State<DatapathHandle>) -> Response {
    match datapath.metrics().await {
        Some(text) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}

async fn only_get() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, "only GET\n").into_response()
}

/// Any method but GET is refused first, whatever the path.
async fn not_found(method: Method) -> Response {
    if method != Method::GET {
        return only_get().await;
    }
    (StatusCode::NOT_FOUND, "metrics are at /metrics\n").into_response()
}
