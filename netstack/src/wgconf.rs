//! WireGuard's own configuration file format, as `wg` and `wg-quick` read
//! it, shared by the gateway and the laptop client.
//!
//! ```text
//! [Interface]
//! PrivateKey = <base64>
//! Address = 100.64.0.2/32, fd00:64::2/128   # wg-quick; one or more, repeatable
//! MTU = 1420                                # wg-quick
//! ListenPort = 51820                        # optional
//! DNS = 10.96.0.10                          # wg-quick; parsed, left to the caller
//!
//! [Peer]                                    # one or more
//! PublicKey = <base64>
//! PresharedKey = <base64>                   # optional
//! Endpoint = gateway.example:51820          # host:port, a.b.c.d:port or [v6]:port
//! AllowedIPs = 10.96.0.0/12, 10.244.0.0/16  # repeatable
//! PersistentKeepalive = 25                  # optional, `off` or 0 for none
//! ```
//!
//! Sans-IO: [`parse`] reads text, [`load`] only adds reading the file; host
//! names in `Endpoint` are kept as names for the caller to resolve. Keys
//! `wg-quick` reads for its own hooks (Pre/PostUp, Pre/PostDown,
//! SaveConfig, FwMark) are accepted and listed in [`Interface::ignored`] so
//! the caller can say it does not act on them; `Table` is kept in
//! [`Interface::table`]; any other unknown key is an
//! error, so a typo is not silently dropped. Every error names the file and
//! the line, and so can the caller's own checks, through the line numbers
//! kept in [`Located`] values and [`WgConf::error`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

/// Smallest MTU accepted (IPv4's minimum datagram size every link carries).
pub const MIN_MTU: u16 = 576;

/// A value and the line it was read from (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
}

impl<T> Located<T> {
    fn at(value: T, line: usize) -> Self {
        Self { value, line }
    }
}

/// Where a peer listens, as written: an address, or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// The `[Interface]` section.
#[derive(Clone)]
pub struct Interface {
    /// Line of the `[Interface]` header.
    pub line: usize,
    pub private_key: StaticSecret,
    pub listen_port: Option<u16>,
    /// Local tunnel addresses with their prefix (`10.8.0.2/24`); a bare
    /// address is a host prefix.
    pub addresses: Vec<Located<IpNet>>,
    pub mtu: Option<Located<u16>>,
    /// The raw `DNS` value(s), if any.
    pub dns: Vec<Located<String>>,
    /// wg-quick's `Table` (`off`, `auto`, `main` or a table number), as
    /// written.
    pub table: Option<Located<String>>,
    /// wg-quick hook keys present in the file (as written), which no burrow
    /// program acts on.
    pub ignored: Vec<Located<String>>,
}

/// One `[Peer]` section.
#[derive(Clone)]
pub struct Peer {
    /// Line of the `[Peer]` header.
    pub line: usize,
    pub public_key: PublicKey,
    pub preshared_key: Option<[u8; 32]>,
    /// Prefixes with their host bits cleared, as `wg` does.
    pub allowed_ips: Vec<Located<IpNet>>,
    pub endpoint: Option<Located<Endpoint>>,
    pub persistent_keepalive: Option<u16>,
}

/// A parsed configuration file.
#[derive(Clone)]
pub struct WgConf {
    /// The file it came from, for error messages.
    pub file: PathBuf,
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

impl WgConf {
    /// An error about this file at `line` (0: the file as a whole).
    pub fn error(&self, line: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Debug for WgConf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgConf")
            .field("file", &self.file)
            .field(
                "public_key",
                &short_key(&PublicKey::from(&self.interface.private_key)),
            )
            .field("peers", &self.peers.len())
            .finish()
    }
}

/// Why a configuration file was rejected: the file, the line (0 for the
/// file as a whole) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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

/// First 8 characters of a key's base64 form: enough to tell peers apart in
/// logs and metric labels, as `wg show` users are used to.
pub fn short_key(key: &PublicKey) -> String {
    let mut s = encode_key(key.as_bytes());
    s.truncate(8);
    s
}

/// A key in WireGuard's base64 form.
pub fn encode_key(bytes: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A key from WireGuard's base64 form.
pub fn decode_key(value: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| format!("not a base64 key: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("a key is 32 bytes, this one is {}", bytes.len()))
}

/// wg-quick's own keys: they configure its shell hooks and policy routing.
const IGNORED: &[&str] = &[
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

#[derive(Default)]
struct InterfaceDraft {
    line: usize,
    private_key: Option<StaticSecret>,
    listen_port: Option<u16>,
    addresses: Vec<Located<IpNet>>,
    mtu: Option<Located<u16>>,
    dns: Vec<Located<String>>,
    table: Option<Located<String>>,
    ignored: Vec<Located<String>>,
}

#[derive(Default)]
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<[u8; 32]>,
    allowed_ips: Vec<Located<IpNet>>,
    endpoint: Option<Located<Endpoint>>,
    persistent_keepalive: Option<u16>,
}

enum Section {
    None,
    Interface,
    Peer(PeerDraft),
}

/// Read and parse a configuration file.
pub fn load(path: &Path) -> Result<WgConf, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path)
}

/// Parse configuration text; `file` only names it in errors.
pub fn parse(text: &str, file: &Path) -> Result<WgConf, ConfigError> {
    let err = |line: usize, message: String| ConfigError {
        file: file.to_owned(),
        line,
        message,
    };
    let mut iface: Option<InterfaceDraft> = None;
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
                "[interface]" if iface.is_some() => {
                    return Err(err(n, "a second [Interface] section".into()));
                }
                "[interface]" => {
                    iface = Some(InterfaceDraft {
                        line: n,
                        ..InterfaceDraft::default()
                    });
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
        let name = key.trim();
        let (key, value) = (name.to_ascii_lowercase(), value.trim());
        match (&mut section, key.as_str()) {
            (Section::None, _) => {
                return Err(err(n, "a key outside [Interface] or [Peer]".into()));
            }
            (Section::Interface, k) => {
                // `iface` is set whenever the section is Interface.
                let Some(d) = iface.as_mut() else {
                    return Err(err(n, "a key outside [Interface] or [Peer]".into()));
                };
                match k {
                    "privatekey" => {
                        d.private_key = Some(StaticSecret::from(
                            decode_key(value).map_err(|m| err(n, format!("PrivateKey: {m}")))?,
                        ));
                    }
                    "listenport" => {
                        d.listen_port = Some(
                            value
                                .parse::<u16>()
                                .map_err(|e| err(n, format!("ListenPort `{value}`: {e}")))?,
                        );
                    }
                    "address" => {
                        for item in list(value) {
                            let net = parse_address(item)
                                .map_err(|m| err(n, format!("Address `{item}`: {m}")))?;
                            d.addresses.push(Located::at(net, n));
                        }
                    }
                    "mtu" => {
                        let mtu = value
                            .parse::<u16>()
                            .map_err(|e| err(n, format!("MTU `{value}`: {e}")))?;
                        if mtu < MIN_MTU {
                            return Err(err(
                                n,
                                format!("MTU {mtu} is below the minimum of {MIN_MTU}"),
                            ));
                        }
                        d.mtu = Some(Located::at(mtu, n));
                    }
                    "dns" => d.dns.push(Located::at(value.to_owned(), n)),
                    "table" => d.table = Some(Located::at(value.to_owned(), n)),
                    k if IGNORED.contains(&k) => d.ignored.push(Located::at(name.to_owned(), n)),
                    _ => return Err(err(n, format!("unknown key `{name}` in [Interface]"))),
                }
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
                for item in list(value) {
                    let net = parse_prefix(item)
                        .map_err(|m| err(n, format!("AllowedIPs `{item}`: {m}")))?;
                    d.allowed_ips.push(Located::at(net, n));
                }
            }
            (Section::Peer(d), "endpoint") => {
                let endpoint = parse_endpoint(value)
                    .map_err(|m| err(n, format!("Endpoint `{value}`: {m}")))?;
                d.endpoint = Some(Located::at(endpoint, n));
            }
            (Section::Peer(_), _) => {
                return Err(err(n, format!("unknown key `{name}` in [Peer]")));
            }
        }
    }
    if let Section::Peer(d) = section {
        drafts.push(d);
    }
    let Some(iface) = iface else {
        return Err(err(0, "no [Interface] section".into()));
    };
    let private_key = iface
        .private_key
        .ok_or_else(|| err(iface.line, "[Interface] without PrivateKey".into()))?;
    let own_key = PublicKey::from(&private_key);
    let mut peers: Vec<Peer> = Vec::with_capacity(drafts.len());
    for d in drafts {
        let public_key = d
            .public_key
            .ok_or_else(|| err(d.line, "[Peer] without PublicKey".into()))?;
        if let Some(first) = peers.iter().find(|p| p.public_key == public_key) {
            return Err(err(
                d.line,
                format!(
                    "a second [Peer] with PublicKey {} (first on line {})",
                    short_key(&public_key),
                    first.line
                ),
            ));
        }
        if public_key == own_key {
            return Err(err(
                d.line,
                "[Peer] has this interface's own public key".into(),
            ));
        }
        peers.push(Peer {
            line: d.line,
            public_key,
            preshared_key: d.preshared_key,
            allowed_ips: d.allowed_ips,
            endpoint: d.endpoint,
            persistent_keepalive: d.persistent_keepalive,
        });
    }
    Ok(WgConf {
        file: file.to_owned(),
        interface: Interface {
            line: iface.line,
            private_key,
            listen_port: iface.listen_port,
            addresses: iface.addresses,
            mtu: iface.mtu,
            dns: iface.dns,
            table: iface.table,
            ignored: iface.ignored,
        },
        peers,
    })
}

/// The items of a comma-separated value.
fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `10.0.0.0/8`, `10.1.2.3` (a host) or `fd00::/64`; host bits are cleared.
fn parse_prefix(s: &str) -> Result<IpNet, String> {
    Ok(parse_address(s)?.trunc())
}

/// `10.8.0.2/24` (kept as written), or a bare address (a host prefix).
fn parse_address(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        return s.parse::<IpNet>().map_err(|e| e.to_string());
    }
    let addr: IpAddr = s.parse().map_err(|e| format!("{e}"))?;
    Ok(IpNet::from(addr))
}

/// `192.0.2.1:51820`, `[2001:db8::1]:51820` or `gateway.example:51820`.
fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Endpoint::Addr(addr));
    }
    if s.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6()) {
        return Err("an IPv6 endpoint is written [address]:port".into());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("`{port}` is not a port number"))?;
    if host.starts_with('[') || host.contains(':') {
        return Err("an IPv6 endpoint is written [address]:port".into());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid_name {
        return Err(format!("`{host}` is neither an IP address nor a host name"));
    }
    Ok(Endpoint::Name {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn p(text: &str) -> Result<WgConf, ConfigError> {
        parse(text, Path::new("wg0.conf"))
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn parses_a_laptop_config_with_several_peers() {
        let c = p(&format!(
            "# laptop\n[Interface]\nPrivateKey = {KEY_A}\nAddress = 10.8.0.2/24, fd00:8::2\n\
             Address=100.64.0.2\nMTU = 1380\nDNS = 10.96.0.10\nPostUp = iptables -A x\n\n\
             [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.1:51820\n\
             AllowedIPs = 10.96.0.0/12, 10.244.1.7/16\nAllowedIPs = fd00:96::/64\n\
             PersistentKeepalive = 25\nPresharedKey = {KEY_C}\n\
             [peer]\npublickey = {KEY_C}\nendpoint = [2001:db8::1]:443\nallowedips = 172.16.0.0/12\n\
             persistentkeepalive = off\n\
             [Peer]\nPublicKey = yNDVWgYLUJpJSQ4CjB3oKlQdD7/iLS+qyR+OGDzkFVI=\n\
             Endpoint = gw-1.example.com:51820\n"
        ))
        .expect("valid");
        let i = &c.interface;
        assert_eq!(i.line, 2);
        assert_eq!(
            i.addresses
                .iter()
                .map(|a| (a.value, a.line))
                .collect::<Vec<_>>(),
            vec![
                (net("10.8.0.2/24"), 4),
                (net("fd00:8::2/128"), 4),
                (net("100.64.0.2/32"), 5)
            ]
        );
        assert_eq!(
            i.mtu,
            Some(Located {
                value: 1380,
                line: 6
            })
        );
        assert_eq!(i.dns[0].value, "10.96.0.10");
        assert_eq!(i.ignored[0].value, "PostUp");
        assert_eq!(c.peers.len(), 3);
        let a = &c.peers[0];
        assert_eq!(a.line, 10);
        assert_eq!(
            a.allowed_ips.iter().map(|n| n.value).collect::<Vec<_>>(),
            // Host bits cleared, as wg does.
            vec![
                net("10.96.0.0/12"),
                net("10.244.0.0/16"),
                net("fd00:96::/64")
            ]
        );
        assert_eq!(a.allowed_ips[2].line, 14);
        assert_eq!(
            a.endpoint.as_ref().map(|e| e.value.clone()),
            Some(Endpoint::Addr("192.0.2.1:51820".parse().expect("addr")))
        );
        assert_eq!(a.persistent_keepalive, Some(25));
        assert_eq!(a.preshared_key.map(|k| encode_key(&k)), Some(KEY_C.into()));
        assert_eq!(encode_key(a.public_key.as_bytes()), KEY_B);
        assert_eq!(
            c.peers[1].endpoint.as_ref().map(|e| e.value.to_string()),
            Some("[2001:db8::1]:443".into())
        );
        assert_eq!(c.peers[1].persistent_keepalive, None);
        assert_eq!(
            c.peers[2].endpoint.as_ref().map(|e| e.value.clone()),
            Some(Endpoint::Name {
                host: "gw-1.example.com".into(),
                port: 51820
            })
        );
        assert!(c.peers[2].allowed_ips.is_empty());
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = nope\n",
                4,
                "PublicKey: a key is 32 bytes",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nAddress = 10.0.0.300/24\n",
                3,
                "Address `10.0.0.300/24`",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nAllowedIPs = 10.0.0.0/33\n",
                5,
                "AllowedIPs `10.0.0.0/33`",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nEndpoint = fd00::1\n",
                5,
                "[address]:port",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nEndpoint = 192.0.2.1\n",
                5,
                "expected host:port",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nEndpoint = bad host:1\n",
                5,
                "neither an IP address nor a host name",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nEndpoint = h:99999\n",
                5,
                "not a port number",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nMTU = 100\n",
                3,
                "below the minimum",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nListenPrt = 5\n",
                3,
                "unknown key `ListenPrt`",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nAllowedIPs = 10.0.0.0/8\n",
                3,
                "without PublicKey",
            ),
            (
                "[Interface]\nListenPort = 1\n",
                1,
                "[Interface] without PrivateKey",
            ),
            ("[Interface]\n[Interface]\n", 2, "a second [Interface]"),
            ("PrivateKey = {A}\n", 1, "outside [Interface] or [Peer]"),
            (
                "[Interface]\nPrivateKey = {A}\n[Wat]\n",
                3,
                "unknown section",
            ),
            ("[Interface]\nPrivateKey\n", 2, "expected `Key = Value`"),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\n[Peer]\nPublicKey = {B}\n",
                5,
                "a second [Peer] with PublicKey",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {A_PUB}\n",
                3,
                "own public key",
            ),
        ];
        let a_pub = encode_key(
            PublicKey::from(&StaticSecret::from(decode_key(KEY_A).expect("key"))).as_bytes(),
        );
        for (text, line, needle) in cases {
            let text = text
                .replace("{A_PUB}", &a_pub)
                .replace("{A}", KEY_A)
                .replace("{B}", KEY_B);
            let e = p(&text).expect_err(needle);
            assert_eq!(e.line, *line, "{e}");
            assert!(
                e.to_string().starts_with(&format!("wg0.conf:{line}: ")),
                "{e}"
            );
            assert!(e.message.contains(needle), "{e} lacks {needle}");
        }
        let e = p("# nothing\n").expect_err("empty");
        assert_eq!(e.to_string(), "wg0.conf: no [Interface] section");
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = load(Path::new("/nonexistent/burrow/wg0.conf")).expect_err("missing");
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/burrow/wg0.conf: cannot read:"),
            "{e}"
        );
    }

    #[test]
    fn callers_report_their_own_checks_with_the_line() {
        let c = p(&format!(
            "[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 0.0.0.0/0\n"
        ))
        .expect("valid syntax");
        let ip = c.peers[0].allowed_ips[0];
        let e = c.error(ip.line, format!("{} is not supported", ip.value));
        assert_eq!(e.to_string(), "wg0.conf:5: 0.0.0.0/0 is not supported");
        assert!(format!("{c:?}").contains("peers: 1"));
    }
}
