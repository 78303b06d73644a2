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
//! - [`wg`]: the gateway's peer table over boringtun sessions: which peer a
//!   datagram is from, roaming, the source-address and no-peer-to-peer rules.
//! - [`flow`]: the smoltcp flow engine: inbound IP packets become TCP/UDP
//!   flows the driver accepts or refuses, flow bytes become IP packets.
//!
//! Data path on the gateway: datagram → [`wg::Peers::decapsulate`] →
//! [`flow::FlowEngine::ingress`] → driver dials → flow bytes →
//! [`flow::FlowEngine::egress`] → [`wg::Peers::encapsulate`] → datagram.

pub mod flow;
pub mod framing;
pub mod wg;
pub mod wire;
