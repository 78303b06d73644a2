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
