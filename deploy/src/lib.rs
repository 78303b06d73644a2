//! burrow-deploy: everything that talks to the Kubernetes API (the only
//! crate that does; the client and the gateway call it).
//!
//! Owns installing / upgrading / uninstalling the gateway (ServiceAccount,
//! RBAC, Deployment, Service), discovering cluster facts (service CIDR, pod
//! CIDRs, cluster domain, DNS IP), the port-forward transport to the gateway,
//! Service patches for reroutes and their restore (`service`: every call
//! on a rerouted Service, shared by client and gateway; what is written is
//! `burrow_api::record`), and a workload's
//! environment and files (`workload` reads, `podenv` computes). The
//! plain manifests live in `deploy/manifests/`, the gateway image build in
//! `deploy/Dockerfile`.
//!
//! Must never: touch the laptop's network (that is the client's), or change a
//! Service without first recording its original spec so it can be restored.

pub mod error;
pub mod facts;
pub mod install;
pub mod podenv;
pub mod portforward;
pub mod reroute;
pub mod service;
pub mod target;
pub mod workload;

pub use error::DeployError;
pub use target::{Cluster, Target};
