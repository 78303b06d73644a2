//! burrow-tests: the miniature cluster and burrow's end-to-end tests.
//!
//! Owns the Linux network namespaces that stand in for a node, its pods and
//! laptops; the controllers that make the stand-in API server's objects real
//! (scheduler, deployment/replicaset, kubelet, the endpoints, EndpointSlice
//! and mirroring controllers with their lag, kube-proxy with
//! iptables, cluster DNS with dnsmasq); the `minicluster` harness binary; and
//! the end-to-end tests that drive the real `burrow` and `burrow-gateway`
//! binaries through it.
//!
//! Must never: touch the machine's own network configuration (routes,
//! firewall, `/etc/resolv.conf`) outside the namespaces it created, send
//! traffic anywhere but loopback and its own namespaces, or leave a
//! namespace, process, veth, rule or temp file behind after `down`/`gc`.

pub mod cluster;
pub mod controllers;
pub mod ctx;
pub mod dns;
pub mod endpoints;
pub mod gateway;
pub mod images;
pub mod informer;
pub mod kubelet;
pub mod net;
pub mod proxy;
pub mod tunnel;
