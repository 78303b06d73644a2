//! burrow-gateway: the in-cluster side.
//!
//! Owns the WireGuard endpoint with many peers, the flow dialer (real sockets
//! into the cluster), the control API (peer registration, cluster facts,
//! heartbeats, reroute listeners), HTTP header routing for personal
//! reroutes, the lease reaper that restores rerouted Services when a laptop
//! disappears, and metrics. The control API types (`api`) are shared with the
//! client.
//!
//! Must never: need privileges (no root, no capabilities, read-only root
//! filesystem), forward packets between peers, or accept a packet whose
//! source is not the sending peer's tunnel address.

/// Control API types shared with the client.
pub mod api {}
