//! WireGuard config text into the shared parser (`burrow_netstack::wgconf`)
//! and the gateway's loader (`burrow_gateway::config`, which adds its
//! one-host AllowedIPs rule); what parses is loaded into peer tables the
//! way gateway and client do.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use boringtun::x25519::StaticSecret;
use burrow_netstack::wg::{PeerConfig, Peers};
use burrow_netstack::wgconf::{self, Endpoint};
use libfuzzer_sys::fuzz_target;

/// Peers loaded per input at most: each costs two X25519 operations.
const MAX_PEERS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.conf");

    match wgconf::parse(&text, file) {
        Ok(conf) => {
            // Every line a value claims to come from exists.
            let lines = text.lines().count();
            assert!(conf.interface.line >= 1 && conf.interface.line <= lines);
            for p in &conf.peers {
                assert!(p.line >= 1 && p.line <= lines);
                for n in &p.allowed_ips {
                    assert!(n.line >= 1 && n.line <= lines);
                    // Host bits are cleared, as `wg` does.
                    assert_eq!(n.value, n.value.trunc());
                }
                if let Some(e) = &p.endpoint {
                    let _ = e.value.to_string();
                    if let Endpoint::Name { host, .. } = &e.value {
                        assert!(!host.is_empty());
                    }
                }
            }
            let _ = format!("{conf:?}");
            let _ = conf.error(1, "x").to_string();
            // The client's table: every peer with its AllowedIPs and
            // endpoint, then some lookups.
            let mut laptop = Peers::new_laptop(conf.interface.private_key.clone());
            for p in conf.peers.iter().take(MAX_PEERS) {
                let _ = laptop.add(PeerConfig {
                    public_key: p.public_key,
                    allowed_ips: p.allowed_ips.iter().map(|n| n.value).collect(),
                    endpoint: p.endpoint.as_ref().and_then(|e| match e.value {
                        Endpoint::Addr(a) => Some(a),
                        Endpoint::Name { .. } => None,
                    }),
                    preshared_key: p.preshared_key,
                    persistent_keepalive: p.persistent_keepalive,
                });
            }
            for addr in [
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                let _ = laptop.route(addr);
            }
        }
        Err(e) => {
            assert!(e.line <= text.lines().count());
            let _ = e.to_string();
        }
    }

    match burrow_gateway::config::parse(&text, file) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
            for p in &cfg.peers {
                assert_eq!(p.allowed_ips.len(), 1);
                assert_eq!(
                    p.allowed_ips[0].prefix_len(),
                    p.allowed_ips[0].max_prefix_len()
                );
            }
            // The gateway's table, as `main` builds it.
            let mut gw = Peers::new(StaticSecret::from(cfg.private_key.to_bytes()));
            for p in cfg.peers.iter().take(MAX_PEERS) {
                let _ = gw.add(p.clone());
            }
            assert!(gw.len() <= MAX_PEERS);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    // The key codec on its own, with any text.
    if let Ok(key) = wgconf::decode_key(text.trim()) {
        assert_eq!(wgconf::decode_key(&wgconf::encode_key(&key)), Ok(key));
    }
});
