//! burrow-netstack: packets.
//!
//! Owns WireGuard sessions (boringtun) and their transports (UDP, and
//! length-framed datagrams over a byte stream for the Kubernetes port-forward),
//! IP packet parsing, and the smoltcp flow engine that turns inbound IP
//! packets into accepted TCP/UDP flows and outbound byte streams back into
//! packets.
//!
//! Must never: open sockets or depend on tokio inside the state machines (the
//! core is sans-IO, fed bytes and time; thin async drivers live beside it),
//! know about Kubernetes, or allocate per packet on the hot path.
//!
//! Layers, each usable on its own:
//!
//! - [`wire`]: validated IP header views and in-place rewrites (MSS clamping).
//!   Total over arbitrary input: every slice parses or yields a typed error.
//! - [`framing`]: WireGuard datagrams as `u16` length + payload over a byte
//!   stream.
//! - [`wg`]: the peer table over boringtun sessions, for the gateway and the
//!   laptop: cryptokey routing by AllowedIPs, which peer a datagram is from,
//!   roaming, the source-address and (gateway) no-peer-to-peer rules.
//! - [`wgconf`]: WireGuard's configuration file format (`wg`/`wg-quick`),
//!   parsed with file and line in every error.
//! - [`flow`]: the smoltcp flow engine: inbound IP packets become TCP/UDP
//!   flows the driver accepts or refuses, flow bytes become IP packets.
//!   Its socket buffers live in page slots (`slots`) that cost memory only
//!   where bytes touched them and go back to the kernel on release.
//!
//! Thin drivers beside the core: [`udp_batch`], `recvmmsg`/`sendmmsg` on a
//! tokio UDP socket into buffers allocated once (the WireGuard socket of both
//! the gateway and the laptop).
//!
//! Time: the core never reads a clock; `now` comes with every call that
//! needs it ([`flow::FlowEngine`], [`wg::Peers::decapsulate`]). The one
//! exception is inside boringtun, whose sessions keep their own clock for
//! handshakes, rekeys and keepalives ([`wg::Peers::update_timers`]); the
//! `mock-instant` feature swaps it for mock_instant's thread-local clock,
//! which `tests/pair.rs` (the laptop's `Peers` ⇄ a lossy, reordering
//! underlay ⇄ the gateway's `Peers` and `FlowEngine`, in virtual time)
//! moves along with its own `now`.
//!
//! Data path on the gateway: datagram → [`wg::Peers::decapsulate`] →
//! [`flow::FlowEngine::ingress`] → driver dials → flow bytes →
//! [`flow::FlowEngine::egress`] → [`wg::Peers::encapsulate`] → datagram.
//! On the laptop: TUN packet → [`wg::Peers::encapsulate`] → datagram, and
//! datagram → [`wg::Peers::decapsulate`] → TUN.

pub mod flow;
pub mod framing;
pub mod reassembly;
mod slots;
pub mod udp_batch;
pub mod wg;
pub mod wgconf;
pub mod wire;
