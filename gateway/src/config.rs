//! The gateway's WireGuard configuration, in WireGuard's own file format.
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
//! Keys `wg-quick` adds for its own use (Address, DNS, MTU, Table, Pre/PostUp,
//! Pre/PostDown, SaveConfig, FwMark, Endpoint) are accepted and ignored; any
//! other key is an error, so a typo is not silently dropped. Errors name the
//! file and line.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use burrow_netstack::wg::PeerConfig;

/// A parsed configuration.
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

/// Why a configuration file was rejected: the file, the line (0 for the
/// file as a whole) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

/// First 8 characters of a key's base64 form: enough to tell laptops apart
/// in logs and metric labels, as `wg show` users are used to.
pub fn short_key(key: &PublicKey) -> String {
    let mut s = base64::engine::general_purpose::STANDARD.encode(key.as_bytes());
    s.truncate(8);
    s
}

/// A key in WireGuard's base64 form.
pub fn encode_key(bytes: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_key(value: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| format!("not a base64 key: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("a key is 32 bytes, this one is {}", bytes.len()))
}

/// Keys wg-quick reads for itself; meaningless to the gateway.
const IGNORED: &[&str] = &[
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
    "endpoint",
];

#[derive(Default)]
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    tunnel_addr: Option<IpAddr>,
    preshared_key: Option<[u8; 32]>,
    persistent_keepalive: Option<u16>,
}

enum Section {
    None,
    Interface,
    Peer(PeerDraft),
}

/// Read and parse a configuration file.
pub fn load(path: &Path) -> Result<WgConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parse configuration text; `file` only names it in errors.
pub fn parse(text: &str, file: &Path) -> Result<WgConfig, ConfigError> {
    let err = |line: usize, message: String| ConfigError {
        file: file.to_owned(),
        line,
        message,
    };
    let mut private_key = None;
    let mut listen_port = None;
    let mut seen_interface = false;
    let mut drafts = Vec::new();
    let mut section = Section::None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            if let Section::Peer(d) = std::mem::replace(&mut section, Section::None) {
                drafts.push(d);
            }
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" if seen_interface => {
                    return Err(err(n, "a second [Interface] section".into()));
                }
                "[interface]" => {
                    seen_interface = true;
                    Section::Interface
                }
                "[peer]" => Section::Peer(PeerDraft {
                    line: n,
                    ..PeerDraft::default()
                }),
                _ => return Err(err(n, format!("unknown section {line}"))),
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(n, format!("expected `Key = Value`, got `{line}`")));
        };
        let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
        match (&mut section, key.as_str()) {
            (Section::None, _) => {
                return Err(err(n, "a key outside [Interface] or [Peer]".into()));
            }
            (Section::Interface, "privatekey") => {
                private_key = Some(StaticSecret::from(
                    decode_key(value).map_err(|m| err(n, format!("PrivateKey: {m}")))?,
                ));
            }
            (Section::Interface, "listenport") => {
                listen_port = Some(
                    value
                        .parse::<u16>()
                        .map_err(|e| err(n, format!("ListenPort `{value}`: {e}")))?,
                );
            }
            (Section::Peer(d), "publickey") => {
                d.public_key = Some(PublicKey::from(
                    decode_key(value).map_err(|m| err(n, format!("PublicKey: {m}")))?,
                ));
            }
            (Section::Peer(d), "presharedkey") => {
                d.preshared_key =
                    Some(decode_key(value).map_err(|m| err(n, format!("PresharedKey: {m}")))?);
            }
            (Section::Peer(d), "persistentkeepalive") => {
                d.persistent_keepalive = match value {
                    "off" | "0" => None,
                    v => Some(
                        v.parse::<u16>()
                            .map_err(|e| err(n, format!("PersistentKeepalive `{v}`: {e}")))?,
                    ),
                };
            }
            (Section::Peer(d), "allowedips") => {
                let mut addrs = value.split(',').map(str::trim).filter(|s| !s.is_empty());
                let (Some(first), None) = (addrs.next(), addrs.next()) else {
                    return Err(err(
                        n,
                        "AllowedIPs must be exactly the peer's tunnel address (one /32 or /128): \
                         the gateway never routes subnets to a laptop"
                            .into(),
                    ));
                };
                d.tunnel_addr = Some(parse_host(first).map_err(|m| err(n, m))?);
            }
            (_, k) if IGNORED.contains(&k) => {}
            (_, _) => {
                let name = line.split('=').next().unwrap_or(line).trim();
                return Err(err(n, format!("unknown key `{name}`")));
            }
        }
    }
    if let Section::Peer(d) = section {
        drafts.push(d);
    }
    let private_key = private_key.ok_or_else(|| err(0, "no PrivateKey in [Interface]".into()))?;
    let mut peers = Vec::with_capacity(drafts.len());
    for d in drafts {
        let public_key = d
            .public_key
            .ok_or_else(|| err(d.line, "[Peer] without PublicKey".into()))?;
        let tunnel_addr = d
            .tunnel_addr
            .ok_or_else(|| err(d.line, "[Peer] without AllowedIPs".into()))?;
        peers.push(PeerConfig {
            public_key,
            tunnel_addr,
            preshared_key: d.preshared_key,
            persistent_keepalive: d.persistent_keepalive,
        });
    }
    Ok(WgConfig {
        private_key,
        listen_port,
        peers,
    })
}

/// `100.64.0.2`, `100.64.0.2/32` or `fd00::2/128`.
fn parse_host(s: &str) -> Result<IpAddr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|e| format!("AllowedIPs `{s}`: {e}"))?;
    let host_prefix = if addr.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => Ok(addr),
        Some(p) if p == host_prefix => Ok(addr),
        Some(p) => Err(format!(
            "AllowedIPs `{s}`: /{p} is a subnet; the peer's tunnel address is one host \
             (/{host_prefix})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn p(text: &str) -> Result<WgConfig, ConfigError> {
        parse(text, Path::new("gw.conf"))
    }

    #[test]
    fn parses_interface_and_peers() {
        let c = p(&format!(
            "# gateway\n[Interface]\nPrivateKey = {KEY_A}\nListenPort=51820\nAddress = 100.64.0.1/24\n\n\
             [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 100.64.0.2/32\nPersistentKeepalive = 25\n\
             [peer]\npublickey = {KEY_A}\nallowedips = fd00::3\n"
        ))
        .expect("valid");
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            c.peers[0].tunnel_addr,
            "100.64.0.2".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            c.peers[1].tunnel_addr,
            "fd00::3".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(encode_key(c.peers[0].public_key.as_bytes()), KEY_B);
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

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 100.64.0.2/32, 100.64.0.3/32\n"
        ))
        .expect_err("two addresses");
        assert_eq!(e.line, 5);

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n\n[Peer]\nPublicKey = {KEY_B}\n"
        ))
        .expect_err("no AllowedIPs");
        assert_eq!(e.line, 4, "points at the [Peer] header");

        let e = p("[Interface]\nListenPort = 1\n").expect_err("no key");
        assert_eq!(e.to_string(), "gw.conf: no PrivateKey in [Interface]");

        let e = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPrt = 5\n"
        ))
        .expect_err("typo");
        assert_eq!(e.to_string(), "gw.conf:3: unknown key `ListenPrt`");
    }
}
