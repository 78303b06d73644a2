//! resolv.conf, parsed once for both ends: the gateway reads its pod's to
//! learn the cluster's DNS ([`ClusterFacts::from_resolv_conf`]), the
//! laptop's DNS stub reads the laptop's to find its upstreams.

use std::net::{IpAddr, SocketAddr};

use crate::ClusterFacts;

/// The parts of a resolv.conf burrow uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text as glibc does (last `search`/`domain` wins;
    /// `#` and `;` comments).
    pub fn parse(text: &str) -> Self {
        let mut rc = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| {
                        // `fe80::1%eth0`: the scope is dropped.
                        w.split('%').next().and_then(|a| a.parse().ok())
                    }) {
                        rc.nameservers.push(ip);
                    }
                }
                Some("search") | Some("domain") => {
                    rc.search = words.map(|w| w.trim_end_matches('.').to_owned()).collect();
                }
                Some("options") => rc.options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
        rc
    }

    /// The servers as socket addresses (port 53); glibc's default
    /// (127.0.0.1) when there are none.
    pub fn upstreams(&self, except: IpAddr) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .nameservers
            .iter()
            .filter(|ip| **ip != except)
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        if self.nameservers.is_empty() {
            v.push(SocketAddr::from(([127, 0, 0, 1], 53)));
        }
        v
    }
}

impl ClusterFacts {
    /// Cluster facts from a pod's resolv.conf: its servers, search list and
    /// options; the cluster domain is what follows `svc.` in the search
    /// list (`<ns>.svc.<domain> svc.<domain> <domain>`), else
    /// `cluster.local`.
    pub fn from_resolv_conf(text: &str, pod_ip: Option<IpAddr>) -> Self {
        let rc = ResolvConf::parse(text);
        let domain = rc
            .search
            .iter()
            .find_map(|s| s.strip_prefix("svc.").map(str::to_string))
            .unwrap_or_else(|| "cluster.local".to_string());
        Self {
            domain,
            dns_servers: rc.nameservers,
            search: rc.search,
            options: rc.options,
            pod_ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_resolv_conf_gives_domain_dns_and_search() {
        let text = "# generated\nsearch burrow-system.svc.corp.internal svc.corp.internal corp.internal\nnameserver 10.96.0.10\noptions ndots:5 timeout:1\n";
        let f = ClusterFacts::from_resolv_conf(text, None);
        assert_eq!(f.domain, "corp.internal");
        assert_eq!(
            f.dns_servers,
            vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(f.search.len(), 3);
        assert_eq!(f.options, vec!["ndots:5", "timeout:1"]);
        assert_eq!(
            ClusterFacts::from_resolv_conf("", None).domain,
            "cluster.local"
        );
    }
}
