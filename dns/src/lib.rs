//! burrow-dns: the laptop's DNS stub.
//!
//! Owns answering cluster names (short names, search domains, `svc`, `pod`,
//! headless/StatefulSet names, SRV, PTR) by querying cluster DNS through the
//! tunnel, passing every other name to the resolvers the laptop had before,
//! caching; and the system integration (resolv.conf, systemd-resolved split
//! DNS) with exact restore.
//!
//! Must never: leave the laptop's resolver configuration changed after
//! disconnect or a crash-and-restart, answer queries from beyond the laptop,
//! or panic on a malformed query.
//!
//! Layers: [`route`] decides which names are the cluster's (pure),
//! [`cache`] keeps answers for their TTL (pure, the caller passes the
//! time), [`stub`] turns datagrams into answers ([`stub::Stub::step`] is
//! synchronous up to a cache miss; misses go through [`upstream`]) and runs
//! the UDP/TCP servers, [`system`] changes and restores the laptop's
//! resolver configuration.

pub mod cache;
pub mod route;
pub mod stub;
pub mod system;
pub mod upstream;

pub use route::{ClusterView, Route};
pub use stub::{Config, Server, Stats, Stub};
pub use upstream::{Exchange, Network};
