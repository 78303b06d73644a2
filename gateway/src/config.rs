//! The gateway's WireGuard configuration, in WireGuard's own file format
//! (parsed by [`burrow_netstack::wgconf`], shared with the client).
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! ListenPort = 51820
//!
//! [Peer]            # one per laptop
//! PublicKey = <base64>
//! AllowedIPs = 100.64.0.2/32   # the laptop's tunnel address, exactly one host
//! PresharedKey = <base64>      # optional
//! PersistentKeepalive = 25     # optional
//! ```
//!
//! What the gateway adds to the shared syntax: each peer's AllowedIPs is
//! exactly one host (the laptop's tunnel address), since the gateway never
//! routes subnets to a laptop. Keys it has no use for (Address, DNS, MTU,
//! Endpoint and wg-quick's hooks) are accepted and ignored. Errors name the
//! file and line.

use std::fmt;
use std::path::Path;

use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_netstack::wg::PeerConfig;
use burrow_netstack::wgconf::{self, WgConf};

pub use burrow_netstack::wgconf::{ConfigError, encode_key, short_key};

/// A parsed gateway configuration.
#[derive(Clone)]
pub struct WgConfig {
    pub private_key: StaticSecret,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerConfig>,
}

impl fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgConfig")
            .field(
                "public_key",
                &short_key(&PublicKey::from(&self.private_key)),
            )
            .field("listen_port", &self.listen_port)
            .field("peers", &self.peers.len())
            .finish()
    }
}

/// Read and parse a configuration file.
pub fn load(path: &Path) -> Result<WgConfig, ConfigError> {
    from_conf(wgconf::load(path)?)
}

/// Parse configuration text; `file` only names it in errors.
pub fn parse(text: &str, file: &Path) -> Result<WgConfig, ConfigError> {
    from_conf(wgconf::parse(text, file)?)
}

fn from_conf(conf: WgConf) -> Result<WgConfig, ConfigError> {
    let mut peers = Vec::with_capacity(conf.peers.len());
    for p in &conf.peers {
        let (first, rest) = match p.allowed_ips.as_slice() {
            [] => return Err(conf.error(p.line, "[Peer] without AllowedIPs")),
            [first, rest @ ..] => (first, rest),
        };
        if let Some(second) = rest.first() {
            return Err(conf.error(
                second.line,
                "AllowedIPs must be exactly the peer's tunnel address (one /32 or /128): \
                 the gateway never routes subnets to a laptop",
            ));
        }
        let net = first.value;
        if net.prefix_len() != net.max_prefix_len() {
            return Err(conf.error(
                first.line,
                format!(
                    "AllowedIPs `{net}` is a subnet; the peer's tunnel address is one host (/{})",
                    net.max_prefix_len()
                ),
            ));
        }
        peers.push(PeerConfig {
            preshared_key: p.preshared_key,
            persistent_keepalive: p.persistent_keepalive,
            ..PeerConfig::host(p.public_key, net.addr())
        });
    }
    Ok(WgConfig {
        private_key: conf.interface.private_key,
        listen_port: conf.interface.listen_port,
        peers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn p(text: &str) -> Result<WgConfig, ConfigError> {
        parse(text, Path::new("gw.conf"))
    }

    fn tunnel_addr(c: &PeerConfig) -> IpAddr {
        assert_eq!(c.allowed_ips.len(), 1);
        c.allowed_ips[0].addr()
    }

    #[test]
    fn parses_interface_and_peers() {
        let c = p(&format!(
            "# gateway\n[Interface]\nPrivateKey = {KEY_A}\nListenPort=51820\nAddress = 100.64.0.1/24\n\n\
             [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 100.64.0.2/32\nPersistentKeepalive = 25\n\
             Endpoint = 192.0.2.1:4000\n\
             [peer]\npublickey = {KEY_A}\nallowedips = fd00::3\n"
        ))
        .expect("valid");
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            tunnel_addr(&c.peers[0]),
            "100.64.0.2".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        // The gateway waits for laptops; their Endpoint is not used.
        assert_eq!(c.peers[0].endpoint, None);
        assert_eq!(
            tunnel_addr(&c.peers[1]),
            "fd00::3".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(encode_key(c.peers[0].public_key.as_bytes()), KEY_B);
        assert!(format!("{c:?}").contains("peers: 2"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = nope\n"
        ))
        .expect_err("bad key");
        assert_eq!(e.line, 4);
        assert!(e.to_string().starts_with("gw.conf:4: PublicKey"), "{e}");

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.0.0.0/8\n"
        ))
        .expect_err("subnet");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("is a subnet"), "{e}");

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 100.64.0.2/32, 100.64.0.3/32\n"
        ))
        .expect_err("two addresses");
        assert_eq!(e.line, 5);

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 100.64.0.2/32\nAllowedIPs = 100.64.0.3/32\n"
        ))
        .expect_err("two lines");
        assert_eq!(e.line, 6, "points at the second address");

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n\n[Peer]\nPublicKey = {KEY_B}\n"
        ))
        .expect_err("no AllowedIPs");
        assert_eq!(e.line, 4, "points at the [Peer] header");

        let e = p("[Interface]\nListenPort = 1\n").expect_err("no key");
        assert_eq!(e.to_string(), "gw.conf:1: [Interface] without PrivateKey");

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPrt = 5\n"
        ))
        .expect_err("typo");
        assert_eq!(
            e.to_string(),
            "gw.conf:3: unknown key `ListenPrt` in [Interface]"
        );
    }
}
