//! Links, addresses and routes through rtnetlink (no `ip` processes): the
//! few operations `burrow up`/`down` need, with errors that name the device
//! and the route.
//!
//! Also the route overlap rule ([`find_conflict`]), kept pure so it is
//! tested without a kernel.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The main routing table, the one `ip route` shows.
const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// A route in the kernel's main table, described as `ip route` would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub via: Option<IpAddr>,
    pub dev: Option<u32>,
    pub dev_name: Option<String>,
    /// `blackhole`, `unreachable`, ... for non-unicast routes.
    pub kind: Option<String>,
}

impl fmt::Display for KernelRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(kind) = &self.kind {
            write!(f, "{kind} ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        match (&self.dev_name, self.dev) {
            (Some(name), _) => write!(f, " dev {name}")?,
            (None, Some(index)) => write!(f, " dev #{index}")?,
            (None, None) => {}
        }
        Ok(())
    }
}

/// The first existing route that one of `ours` would duplicate or overlap:
/// a more specific route would take part of our traffic, a less specific one
/// would lose part of its own to us. Default routes (`/0`) are everyone's
/// fallback and overlap nothing; routes already on our device `own_dev` are
/// ours (e.g. the kernel's route for a `10.8.0.2/24` address).
pub fn find_conflict<'a>(
    ours: &[IpNet],
    existing: &'a [KernelRoute],
    own_dev: Option<u32>,
) -> Option<(IpNet, &'a KernelRoute)> {
    ours.iter().find_map(|net| {
        existing
            .iter()
            .filter(|r| r.dst.prefix_len() > 0 && (own_dev.is_none() || r.dev != own_dev))
            .find(|r| r.dst.contains(net) || net.contains(&r.dst))
            .map(|r| (*net, r))
    })
}

/// A connection to the kernel's routing netlink socket.
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The errno of a failed netlink request, if it was one.
/// Packets the kernel queues for the TUN device before dropping (a TUN
/// device's default is 500). Bursts of small packets, e.g. a program
/// closing thousands of connections at once, overflowed 500: 57,771 drops
/// when 10,000 connections closed, and the lost ACKs of the gateway's FINs
/// kept thousands of its flows in LAST-ACK for minutes. Bulk TCP does not
/// fill the queue (TCP small queues bound each socket's share), but many
/// flows starting at once do: 1,000 connections each sending 64 KiB
/// (their first windows, ~10 segments each) overflowed 4,096 by
/// 3,000-6,600 packets (lost SYNs and segments, connects done after 5-6 s
/// instead of 1 s). The ring holds pointers (8 bytes a slot); what waits
/// in it is the sockets' own memory.
const TUN_TX_QUEUE: u32 = 16384;

/// Packets the kernel dropped on their way to `device` (its queue to the
/// daemon was full), from the text of `/proc/net/dev` (the reader's own
/// network namespace). None when the device is not listed.
pub fn tx_dropped(proc_net_dev: &str, device: &str) -> Option<u64> {
    proc_net_dev.lines().skip(2).find_map(|line| {
        let (name, fields) = line.split_once(':')?;
        if name.trim() != device {
            return None;
        }
        // 8 receive fields, then transmit: bytes, packets, errs, drop.
        fields.split_whitespace().nth(11)?.parse().ok()
    })
}

/// [`tx_dropped`] of `device` now.
pub fn tun_queue_dropped(device: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    tx_dropped(&text, device)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl Netlink {
    /// Open the socket; call inside a tokio runtime.
    pub fn connect() -> anyhow::Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        let task = tokio::spawn(connection);
        Ok(Self { handle, task })
    }

    /// The index of the link called `name`, if there is one.
    pub async fn link_index(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up device {name}")),
        }
    }

    /// The name of link `index`, if it exists.
    pub async fn link_name(&self, index: u32) -> anyhow::Result<Option<String>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot look up device #{index}")),
        }
    }

    async fn link_names(&self) -> anyhow::Result<HashMap<u32, String>> {
        let mut names = HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.context("cannot list devices")? {
            if let Some(name) = link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            }) {
                names.insert(link.header.index, name);
            }
        }
        Ok(names)
    }

    /// Set the MTU and the transmit queue length and bring the link up.
    pub async fn set_up(&self, index: u32, name: &str, mtu: u16) -> anyhow::Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .txqueuelen(TUN_TX_QUEUE)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("cannot set MTU {mtu} and bring {name} up"))
    }

    pub async fn add_address(&self, index: u32, name: &str, net: IpNet) -> anyhow::Result<()> {
        self.handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await
            .with_context(|| format!("cannot add address {net} to {name}"))
    }

    /// Every route of the main table, both families.
    pub async fn routes(&self) -> anyhow::Result<Vec<KernelRoute>> {
        let names = self.link_names().await?;
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(query).execute();
            while let Some(msg) = routes.try_next().await.context("cannot list routes")? {
                if let Some(route) = kernel_route(&msg, &names) {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    fn route_message(index: u32, net: IpNet) -> anyhow::Result<RouteMessageBuilder<IpAddr>> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .with_context(|| format!("invalid route {net}"))?
            .output_interface(index))
    }

    /// Add `net` through link `index`, as `ip route add NET dev NAME` does
    /// (scope link: no gateway, the peer is on the other end of the device).
    pub async fn add_route(&self, index: u32, name: &str, net: IpNet) -> anyhow::Result<()> {
        let route = Self::route_message(index, net)?
            .protocol(RouteProtocol::Static)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(route)
            .execute()
            .await
            .with_context(|| format!("cannot add route {net} dev {name}"))
    }

    /// Whether the main table has a route for exactly `net` through link
    /// `index`.
    pub async fn has_route(&self, index: u32, net: IpNet) -> anyhow::Result<bool> {
        Ok(self
            .routes()
            .await?
            .iter()
            .any(|r| r.dst == net && r.dev == Some(index)))
    }

    /// Delete the route `net` through link `index`, whoever added it;
    /// `false` if there was none (or the link is gone, and the route with
    /// it).
    pub async fn del_route(&self, index: u32, net: IpNet) -> anyhow::Result<bool> {
        // Unspecified protocol and type, scope "nowhere": the kernel then
        // matches on destination and device alone.
        let route = Self::route_message(index, net)?
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .kind(RouteType::Unspec)
            .build();
        match self.handle.route().del(route).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("cannot delete route {net}")),
        }
    }

    /// Delete link `index`; `false` if it is already gone.
    pub async fn del_link(&self, index: u32) -> anyhow::Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot delete device #{index}")),
        }
    }
}

/// A main-table route from a netlink message; `None` for other tables.
fn kernel_route(msg: &RouteMessage, names: &HashMap<u32, String>) -> Option<KernelRoute> {
    let mut table = u32::from(msg.header.table);
    let (mut dst, mut via, mut dev) = (None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = ip(a),
            RouteAttribute::Gateway(a) => via = ip(a),
            RouteAttribute::Oif(i) => dev = Some(*i),
            _ => {}
        }
    }
    if table != MAIN_TABLE {
        return None;
    }
    let len = msg.header.destination_prefix_length;
    let dst = match dst {
        Some(addr) => IpNet::new(addr, len).ok()?,
        // No destination attribute: the default route of its family.
        None => match msg.header.address_family {
            rtnetlink::packet_route::AddressFamily::Inet => {
                IpNet::new(IpAddr::from([0u8; 4]), 0).ok()?
            }
            rtnetlink::packet_route::AddressFamily::Inet6 => {
                IpNet::new(IpAddr::from([0u16; 8]), 0).ok()?
            }
            _ => return None,
        },
    };
    let kind = match msg.header.kind {
        RouteType::Unicast => None,
        other => Some(format!("{other:?}").to_ascii_lowercase()),
    };
    Some(KernelRoute {
        dst,
        via,
        dev,
        dev_name: dev.and_then(|i| names.get(&i).cloned()),
        kind,
    })
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_drops_of_one_device() {
        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    9000  453    0    0    0     0          0         0     9000   453    0    0    0     0       0          0
bw1-dp4053: 68643394 70722 0 5 0 0 0 0 68557368 49114 0 6629 0 0 0 0
  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
";
        assert_eq!(tx_dropped(dev, "bw1-dp4053"), Some(6629));
        assert_eq!(tx_dropped(dev, "lo"), Some(0));
        assert_eq!(tx_dropped(dev, "eth0"), Some(12));
        assert_eq!(tx_dropped(dev, "bw1"), None);
        assert_eq!(tx_dropped("", "lo"), None);
        assert_eq!(tx_dropped("a\nb\n  x: 1 2\n", "x"), None);
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn route(dst: &str, dev: u32, name: &str) -> KernelRoute {
        KernelRoute {
            dst: net(dst),
            via: None,
            dev: Some(dev),
            dev_name: Some(name.into()),
            kind: None,
        }
    }

    #[test]
    fn overlap_rule() {
        let existing = vec![
            KernelRoute {
                via: Some("192.168.1.1".parse().expect("ip")),
                ..route("0.0.0.0/0", 2, "eth0")
            },
            route("192.168.1.0/24", 2, "eth0"),
            route("10.8.0.0/24", 7, "burrow0"),
            route("fd00::/64", 2, "eth0"),
        ];
        // Disjoint, or only under the default route: fine.
        assert_eq!(find_conflict(&[net("10.96.0.0/12")], &existing, None), None);
        // Identical, more specific, less specific: refused.
        for ours in ["192.168.1.0/24", "192.168.1.128/25", "192.168.0.0/16"] {
            let (n, r) = find_conflict(&[net(ours)], &existing, None).expect("conflict");
            assert_eq!(n, net(ours));
            assert_eq!(r.to_string(), "192.168.1.0/24 dev eth0");
        }
        let (_, r) = find_conflict(&[net("fd00::1/128")], &existing, None).expect("v6");
        assert_eq!(r.dst, net("fd00::/64"));
        // A route already on our own device is ours.
        assert_eq!(
            find_conflict(&[net("10.8.0.0/24")], &existing, Some(7)),
            None
        );
        assert!(find_conflict(&[net("10.8.0.0/24")], &existing, Some(8)).is_some());
        assert_eq!(
            existing[0].to_string(),
            "0.0.0.0/0 via 192.168.1.1 dev eth0"
        );
        let blackhole = KernelRoute {
            dst: net("10.0.0.0/8"),
            via: None,
            dev: None,
            dev_name: None,
            kind: Some("blackhole".into()),
        };
        assert_eq!(blackhole.to_string(), "blackhole 10.0.0.0/8");
    }
}
