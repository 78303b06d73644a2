//! Bodies into the control API: `serde_json::from_slice` of every type in
//! `burrow_api` (the request bodies the gateway takes, and the
//! answers the client reads), then what the handlers do with a request
//! before acting on it: `RerouteRequest::validate`, `StopRequest::
//! validate`, the registration's nonce check and proof of possession
//! (`burrow_api::proof`). The Kubernetes name checks (`burrow_api::names`) also get the
//! raw text, as do the reroute annotations' records (`record::Record`,
//! `record::Saved`), which anyone allowed to edit a Service can write.
//!
//! Checked: what validates has names the API server would accept and that
//! stay valid with burrow's suffixes; requests survive a serialisation
//! round trip; a freshly made nonce checks.
#![no_main]

use boringtun::x25519::StaticSecret;
use burrow_api::{
    self, ApiError, ClusterFacts, Info, PeerInfo, Protocol, RegisterRequest, Registration, Reroute,
    RerouteGrant, RerouteRequest, ServicePort, StopRequest, Stopped, names, proof,
};
use burrow_api::record;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

const NONCE_KEY: [u8; 32] = [9; 32];
/// Unix seconds the handlers would read from the clock.
const NOW: u64 = 1_800_000_000;

fn parse<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

/// Serialising and parsing again gives the same value.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(v: &T) {
    let text = serde_json::to_vec(v).expect("serialises");
    let again: T = serde_json::from_slice(&text).expect("parses its own output");
    assert_eq!(&again, v);
}

fn check_name_rules(s: &str) {
    let ns = names::check_namespace(s);
    let svc = names::check_service(s);
    let rerouted = names::check_rerouted_service(s);
    assert_eq!(ns.is_ok(), names::is_dns1123_label(s));
    assert_eq!(svc.is_ok(), names::is_dns1035_label(s));
    if svc.is_ok() {
        assert!(ns.is_ok(), "a Service name is a valid label");
    }
    if rerouted.is_ok() {
        assert!(svc.is_ok());
        // burrow's own objects for it are valid names too.
        names::check_service(&names::shadow_name(s)).expect("shadow name valid");
        names::check_service(&names::slice_name(s)).expect("slice name valid");
    }
    if names::check_port_name(s).is_ok() {
        assert!(s.len() <= 63 && !s.starts_with('-') && !s.ends_with('-'));
    }
    if let Some((name, value)) = s.split_once(':') {
        let _ = names::check_header(name, value);
    }
    // Error messages quote at most 80 characters of the input (each at
    // most 10 bytes once escaped), however long it is.
    if let Err(e) = ns {
        assert!(e.len() < 1000, "{} byte message", e.len());
    }
}

fn register(req: &RegisterRequest, gateway: &StaticSecret) {
    round_trip(req);
    let _ = proof::check_nonce(&NONCE_KEY, &req.nonce, NOW);
    // Whatever the body says, only the key's holder could have signed.
    let _ = proof::verify(gateway, &req.public_key.public_key(), &req.nonce, &req.proof);
}

fn reroute(req: &RerouteRequest) {
    round_trip(req);
    if req.validate().is_ok() {
        names::check_namespace(&req.namespace).expect("namespace checked");
        names::check_rerouted_service(&req.service).expect("service checked");
        assert!(!req.ports.is_empty() && req.ports.len() <= burrow_api::MAX_SERVICE_PORTS);
        assert!(req.ports.iter().any(|p| p.port == req.port) && req.port != 0);
        assert_ne!(req.laptop_port, 0);
        if let Some((name, value)) = &req.header {
            names::check_header(name, value).expect("header checked");
        }
    }
}

fn stop(req: &StopRequest) {
    round_trip(req);
    if req.validate().is_ok() {
        if let Some(ns) = &req.namespace {
            assert!(names::is_dns1123_label(ns));
        }
        if let Some(svc) = &req.service {
            assert!(names::is_dns1035_label(svc));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static GATEWAY: StaticSecret = StaticSecret::from([1; 32]);
    }

    // The bodies the gateway takes.
    if let Some(req) = parse::<RegisterRequest>(data) {
        GATEWAY.with(|g| register(&req, g));
    }
    if let Some(req) = parse::<RerouteRequest>(data) {
        reroute(&req);
    }
    if let Some(req) = parse::<StopRequest>(data) {
        stop(&req);
    }
    // The answers the client reads.
    let _ = parse::<Info>(data);
    let _ = parse::<ClusterFacts>(data);
    let _ = parse::<Registration>(data);
    let _ = parse::<PeerInfo>(data);
    let _ = parse::<ApiError>(data);
    let _ = parse::<Protocol>(data);
    let _ = parse::<ServicePort>(data);
    let _ = parse::<RerouteGrant>(data);
    let _ = parse::<Vec<Reroute>>(data);
    let _ = parse::<Stopped>(data);
    // The annotations burrow writes on a Service.
    if let Some(r) = parse::<record::Record>(data) {
        round_trip(&r);
    }
    let _ = parse::<record::Saved>(data);

    // The raw text through the name rules and the nonce check.
    if let Ok(s) = std::str::from_utf8(data) {
        check_name_rules(s);
        let _ = proof::check_nonce(&NONCE_KEY, s, NOW);
    }
    // A nonce made for any time checks at that time.
    if data.len() >= 4 {
        let t = u64::from(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
        let n = proof::nonce(&NONCE_KEY, t);
        assert_eq!(proof::check_nonce(&NONCE_KEY, &n, t), Ok(()));
        assert!(proof::check_nonce(&[0; 32], &n, t).is_err());
    }
});
