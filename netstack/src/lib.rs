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
