//! minicluster-apiserver: the miniature cluster's stand-in Kubernetes API
//! server.
//!
//! Owns the one generic object store (`store`: JSON objects keyed by
//! resource, namespace and name, one resourceVersion counter, watch), the
//! resource table (`resources`: new kinds are data), and the REST layer that
//! kubectl and kube-rs talk to over HTTPS (discovery, list/get/watch, create,
//! replace, patch in all four types, delete, Status errors, selectors,
//! authentication, RBAC, `pods/portforward` (WebSocket v4, SPDY/3.1 plain
//! and tunneled in a WebSocket), `pods/log`
//! streamed from the node's log source).
//!
//! Must never: run workloads or touch the network beyond its own listeners
//! (the controllers in `burrow-tests` do that by watching the store), or
//! answer differently from a real API server where kubectl or kube-rs can
//! tell.

pub mod admission;
pub mod auth;
pub mod discovery;
pub mod error;
pub mod local;
pub mod logs;
pub mod networkpolicy;
pub mod patch;
pub mod pki;
pub mod portforward;
pub mod protobuf;
pub mod quantity;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod spdy;
pub mod store;
pub mod table;

pub use error::ApiError;
pub use resources::ResourceType;
pub use store::{EventType, Store, WatchEvent};
