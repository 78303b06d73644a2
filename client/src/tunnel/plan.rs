//! From a WireGuard configuration to what `burrow up` will do: device
//! addresses and MTU, the routes to add, the peers for the data path, and
//! what it will not do (with the reason). Pure: endpoints arrive resolved,
//! nothing touches the system, so every rule is unit-tested.

use std::net::SocketAddr;

use burrow_netstack::wg::PeerConfig;
use burrow_netstack::wgconf::{ConfigError, WgConf, short_key};
use ipnet::IpNet;

/// The tunnel MTU when the configuration names none (wg-quick's default).
pub const DEFAULT_MTU: u16 = 1420;

/// What `burrow up` sets up for one configuration.
pub struct Plan {
    pub mtu: u16,
    pub addresses: Vec<IpNet>,
    /// Routes to add through the device, in order, without duplicates.
    pub routes: Vec<IpNet>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerConfig>,
    /// Things in the configuration burrow does not act on, one line each,
    /// for the log.
    pub notes: Vec<String>,
}

impl std::fmt::Debug for Plan {
    // Peers carry keys: show only who they are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("mtu", &self.mtu)
            .field("addresses", &self.addresses)
            .field("routes", &self.routes)
            .field("listen_port", &self.listen_port)
            .field(
                "peers",
                &self
                    .peers
                    .iter()
                    .map(|p| short_key(&p.public_key))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Plan {
    /// `endpoints[i]` is peer `i`'s `Endpoint`, resolved.
    pub fn new(conf: &WgConf, endpoints: &[Option<SocketAddr>]) -> Result<Self, ConfigError> {
        let iface = &conf.interface;
        if conf.peers.is_empty() {
            return Err(conf.error(0, "no [Peer] section: nothing to connect to"));
        }
        if iface.addresses.is_empty() {
            return Err(conf.error(
                iface.line,
                "[Interface] without Address: the tunnel needs this machine's tunnel address, \
                 e.g. `Address = 100.64.0.2/32`",
            ));
        }
        let mut notes = Vec::new();
        for dns in &iface.dns {
            notes.push(format!(
                "{}:{}: DNS = {} is ignored: `burrow up --wg-config` does not change the \
                 system's resolver",
                conf.file.display(),
                dns.line,
                dns.value
            ));
        }
        for key in &iface.ignored {
            notes.push(format!(
                "{}:{}: {} is ignored: burrow does not run wg-quick's hooks or policy routing",
                conf.file.display(),
                key.line,
                key.value
            ));
        }
        let all_endpoints: Vec<SocketAddr> = endpoints.iter().flatten().copied().collect();
        let mut routes: Vec<IpNet> = Vec::new();
        let mut peers = Vec::with_capacity(conf.peers.len());
        // Prefix, peer index, line.
        let mut seen: Vec<(IpNet, usize, usize)> = Vec::new();
        for (i, p) in conf.peers.iter().enumerate() {
            let mut allowed = Vec::with_capacity(p.allowed_ips.len());
            for ip in &p.allowed_ips {
                let net = ip.value;
                if net.prefix_len() == 0 {
                    return Err(conf.error(
                        ip.line,
                        format!(
                            "AllowedIPs {net} would send all traffic through the tunnel \
                             (full tunnel), which burrow does not support; list the ranges to \
                             reach instead (e.g. the cluster's service and pod CIDRs)"
                        ),
                    ));
                }
                if let Some((_, peer, line)) = seen.iter().find(|(n, _, _)| *n == net) {
                    if *peer == i {
                        continue;
                    }
                    return Err(conf.error(
                        ip.line,
                        format!("AllowedIPs {net} is already given to another peer on line {line}"),
                    ));
                }
                seen.push((net, i, ip.line));
                allowed.push(net);
                // A route covering a peer's own endpoint would send the
                // tunnel's datagrams into the tunnel: route the rest of the
                // prefix, around every endpoint inside it.
                let inside: Vec<&SocketAddr> = all_endpoints
                    .iter()
                    .filter(|e| net.contains(&e.ip()))
                    .collect();
                if inside.is_empty() {
                    routes.push(net);
                    continue;
                }
                let mut rest = vec![net];
                for endpoint in &inside {
                    let host = IpNet::from(endpoint.ip());
                    rest = rest.into_iter().flat_map(|n| subtract(n, host)).collect();
                }
                let shown: Vec<String> = inside.iter().map(ToString::to_string).collect();
                notes.push(format!(
                    "{}:{}: {net} covers the endpoint {}: routing {} prefixes around it \
                     so the tunnel's own datagrams do not loop",
                    conf.file.display(),
                    ip.line,
                    shown.join(", "),
                    rest.len()
                ));
                routes.extend(rest);
            }
            if allowed.is_empty() {
                notes.push(format!(
                    "{}:{}: peer {} has no AllowedIPs: nothing is sent to it or accepted from it",
                    conf.file.display(),
                    p.line,
                    short_key(&p.public_key)
                ));
            }
            peers.push(PeerConfig {
                public_key: p.public_key,
                allowed_ips: allowed,
                endpoint: endpoints.get(i).copied().flatten(),
                preshared_key: p.preshared_key,
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        match iface
            .table
            .as_ref()
            .map(|t| (t.value.to_ascii_lowercase(), t.line))
        {
            None => {}
            Some((t, _)) if t == "auto" || t == "main" => {}
            Some((t, line)) if t == "off" => {
                notes.push(format!(
                    "{}:{line}: Table = off: no routes are added (AllowedIPs still decide \
                     what the tunnel accepts)",
                    conf.file.display()
                ));
                routes.clear();
            }
            Some((t, line)) => {
                return Err(conf.error(
                    line,
                    format!(
                        "Table = {t}: burrow adds routes to the main table only; use \
                         `Table = auto` (or leave it out), or `Table = off` to add none"
                    ),
                ));
            }
        }
        Ok(Self {
            mtu: iface.mtu.map_or(DEFAULT_MTU, |m| m.value),
            addresses: iface.addresses.iter().map(|a| a.value).collect(),
            routes,
            listen_port: iface.listen_port,
            peers,
            notes,
        })
    }
}

/// `net` less `x`: `net` itself when they are disjoint, nothing when `x`
/// covers it, else the halves of `net` less `x`, recursively (at most one
/// prefix per bit of the difference in length).
pub fn subtract(net: IpNet, x: IpNet) -> Vec<IpNet> {
    if x.contains(&net) {
        return Vec::new();
    }
    if !net.contains(&x) {
        return vec![net];
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|h| subtract(h, x)).collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use burrow_netstack::wgconf::parse;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn conf(body: &str) -> WgConf {
        let text = body
            .replace("{A}", KEY_A)
            .replace("{B}", KEY_B)
            .replace("{C}", KEY_C);
        parse(&text, Path::new("wg0.conf")).expect("valid syntax")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn ep(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("endpoint"))
    }

    #[test]
    fn two_peers_routes_and_defaults() {
        let c = conf(
            "[Interface]\nPrivateKey = {A}\nAddress = 100.64.0.2/32, fd00:64::2/128\n\
             DNS = 10.96.0.10\nPostUp = echo hi\n\
             [Peer]\nPublicKey = {B}\nEndpoint = 192.0.2.1:51820\n\
             AllowedIPs = 10.96.0.0/12, 10.244.0.0/16, fd00:96::/112\nPersistentKeepalive = 25\n\
             [Peer]\nPublicKey = {C}\nAllowedIPs = 172.20.0.0/16\n",
        );
        let plan = Plan::new(&c, &[ep("192.0.2.1:51820"), None]).expect("plan");
        assert_eq!(plan.mtu, DEFAULT_MTU);
        assert_eq!(
            plan.addresses,
            vec![net("100.64.0.2/32"), net("fd00:64::2/128")]
        );
        assert_eq!(
            plan.routes,
            vec![
                net("10.96.0.0/12"),
                net("10.244.0.0/16"),
                net("fd00:96::/112"),
                net("172.20.0.0/16")
            ]
        );
        assert_eq!(plan.peers.len(), 2);
        assert_eq!(plan.peers[0].endpoint, ep("192.0.2.1:51820"));
        assert_eq!(plan.peers[0].persistent_keepalive, Some(25));
        assert_eq!(plan.peers[1].endpoint, None);
        assert_eq!(plan.peers[1].allowed_ips, vec![net("172.20.0.0/16")]);
        assert_eq!(plan.notes.len(), 2, "{:?}", plan.notes);
        assert!(plan.notes[0].starts_with("wg0.conf:4: DNS = 10.96.0.10 is ignored"));
        assert!(plan.notes[1].starts_with("wg0.conf:5: PostUp is ignored"));
    }

    #[test]
    fn routes_go_around_an_endpoint() {
        let c = conf(
            "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/24\nMTU = 1380\n\
             [Peer]\nPublicKey = {B}\nEndpoint = 10.1.2.3:51820\n\
             AllowedIPs = 10.0.0.0/8, 10.96.0.0/12\n\
             [Peer]\nPublicKey = {C}\nEndpoint = [fd00::1]:51820\nAllowedIPs = fd00::/64\n",
        );
        let plan = Plan::new(&c, &[ep("10.1.2.3:51820"), ep("[fd00::1]:51820")]).expect("plan");
        assert_eq!(plan.mtu, 1380);
        let endpoint: std::net::IpAddr = "10.1.2.3".parse().expect("literal");
        let v6: std::net::IpAddr = "fd00::1".parse().expect("literal");
        // No route holds an endpoint; every other address of the prefix is
        // still routed.
        assert!(
            !plan
                .routes
                .iter()
                .any(|r| r.contains(&endpoint) || r.contains(&v6))
        );
        for near in [
            "10.1.2.2",
            "10.1.2.4",
            "10.0.0.1",
            "10.255.255.255",
            "fd00::2",
            "fd00::ffff",
        ] {
            let ip: std::net::IpAddr = near.parse().expect("literal");
            assert!(
                plan.routes.iter().any(|r| r.contains(&ip)),
                "{near} not routed"
            );
        }
        assert!(plan.routes.contains(&net("10.96.0.0/12")));
        // 10/8 less one address is 24 prefixes; fd00::/64 less one, 64.
        assert_eq!(plan.routes.len(), 1 + 24 + 64, "{:?}", plan.routes);
        // Cryptokey routing is unchanged: only kernel routes are split.
        assert_eq!(
            plan.peers[0].allowed_ips,
            vec![net("10.0.0.0/8"), net("10.96.0.0/12")]
        );
        assert_eq!(plan.notes.len(), 2);
        assert_eq!(
            plan.notes[0],
            "wg0.conf:8: 10.0.0.0/8 covers the endpoint 10.1.2.3:51820: routing 24 prefixes \
             around it so the tunnel's own datagrams do not loop"
        );
        assert!(plan.notes[1].contains("[fd00::1]:51820"));
    }

    #[test]
    fn table_off_adds_no_routes_and_a_number_is_refused() {
        let text = |table: &str| {
            format!(
                "[Interface]\nPrivateKey = {{A}}\nAddress = 10.8.0.2/32\nTable = {table}\n\
                 [Peer]\nPublicKey = {{B}}\nAllowedIPs = 10.96.0.0/12\n"
            )
        };
        let plan = Plan::new(&conf(&text("off")), &[None]).expect("plan");
        assert!(plan.routes.is_empty());
        assert_eq!(plan.peers[0].allowed_ips, vec![net("10.96.0.0/12")]);
        assert!(
            plan.notes
                .iter()
                .any(|n| n.starts_with("wg0.conf:4: Table = off"))
        );
        let plan = Plan::new(&conf(&text("auto")), &[None]).expect("plan");
        assert_eq!(plan.routes, vec![net("10.96.0.0/12")]);
        let err = Plan::new(&conf(&text("1234")), &[None])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("wg0.conf:4: Table = 1234"), "{err}");
    }

    #[test]
    fn refusals_name_file_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/32\n[Peer]\nPublicKey = {B}\n\
                 AllowedIPs = 10.96.0.0/12, 0.0.0.0/0\n",
                "wg0.conf:6: AllowedIPs 0.0.0.0/0 would send all traffic through the tunnel (full tunnel)",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/32\n[Peer]\nPublicKey = {B}\n\
                 AllowedIPs = ::/0\n",
                "wg0.conf:6: AllowedIPs ::/0 would send all traffic",
            ),
            (
                "[Interface]\nPrivateKey = {A}\n[Peer]\nPublicKey = {B}\nAllowedIPs = 10.0.0.0/8\n",
                "wg0.conf:1: [Interface] without Address",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/32\n",
                "wg0.conf: no [Peer] section",
            ),
            (
                "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/32\n[Peer]\nPublicKey = {B}\n\
                 AllowedIPs = 10.0.0.0/8\n[Peer]\nPublicKey = {C}\nAllowedIPs = 10.1.0.0/8\n",
                "wg0.conf:9: AllowedIPs 10.0.0.0/8 is already given to another peer on line 6",
            ),
        ];
        for (text, want) in cases {
            let c = conf(text);
            let endpoints = vec![None; c.peers.len()];
            let e = Plan::new(&c, &endpoints).expect_err(want);
            assert!(e.to_string().starts_with(want), "{e}\nwanted {want}");
        }
    }

    #[test]
    fn a_prefix_repeated_within_a_peer_is_one_route() {
        let c = conf(
            "[Interface]\nPrivateKey = {A}\nAddress = 10.8.0.2/32\n[Peer]\nPublicKey = {B}\n\
             AllowedIPs = 10.96.0.0/12, 10.96.0.1/12\nAllowedIPs = 10.96.0.0/12\n",
        );
        let plan = Plan::new(&c, &[None]).expect("plan");
        assert_eq!(plan.routes, vec![net("10.96.0.0/12")]);
    }
}
