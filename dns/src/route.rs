//! Which names are the cluster's (sans-IO): decides, for one query name,
//! whether cluster DNS (through the tunnel) or the laptop's own resolvers
//! answer it, deciding like a pod's resolver would with the search list
//! `<ns>.svc.<domain> svc.<domain> <domain>`.
//!
//! | name | asked of cluster DNS | if the cluster has no such name |
//! | --- | --- | --- |
//! | `…<domain>` | as is | NXDOMAIN |
//! | `x.svc`, `x.ns.svc` | `….<domain>` | NXDOMAIN |
//! | `a-b-c-d.ns.pod` | `….<domain>` | NXDOMAIN |
//! | `x.ns`, `h.x.ns` (`ns` a namespace) | `….svc.<domain>` | NXDOMAIN |
//! | `x` (one label) | `x.<connect ns>.svc.<domain>` | the laptop's resolvers |
//! | `x.y` (namespaces unknown) | `x.y.svc.<domain>` | the laptop's resolvers |
//! | reverse name of an address in a cluster range | as is | NXDOMAIN |
//! | anything else | — | the laptop's resolvers |
//!
//! A namespace shadows a top-level domain of the same name, as it does in a
//! pod for names that exist in the cluster.

use std::collections::HashSet;
use std::net::IpAddr;

use hickory_proto::rr::Name;
use ipnet::IpNet;

/// What the stub knows of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// The cluster domain, e.g. `cluster.local.` (learnt from the gateway).
    pub domain: Name,
    /// The namespace `burrow connect` works in (short names resolve there).
    pub namespace: String,
    /// The cluster's namespaces; `None` when they cannot be listed (then a
    /// two-label name is tried in the cluster first and falls through).
    pub namespaces: Option<HashSet<String>>,
    /// The cluster's address ranges (Services, pods): reverse names of
    /// addresses inside them are the cluster's.
    pub networks: Vec<IpNet>,
}

/// Where a query goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Cluster DNS answers `ask`, whatever it says.
    Cluster(Name),
    /// Cluster DNS is asked for `ask`; when it has no such name (or does
    /// not answer), the laptop's resolvers answer the name as asked.
    ClusterThenUpstream(Name),
    /// The laptop's resolvers answer.
    Upstream,
}

impl Route {
    /// Where the query went, in a word or two (for logs).
    pub fn label(&self) -> &'static str {
        match self {
            Route::Cluster(_) => "cluster",
            Route::ClusterThenUpstream(_) => "cluster, then upstream",
            Route::Upstream => "upstream",
        }
    }
}

impl ClusterView {
    /// Decides where `qname` (fully qualified, any case) goes.
    pub fn route(&self, qname: &Name) -> Route {
        let lower = qname.to_lowercase();
        if self.domain.zone_of(&lower) {
            return Route::Cluster(lower);
        }
        let labels: Vec<String> = lower
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let Some(last) = labels.last() else {
            return Route::Upstream;
        };
        if last == "arpa" {
            return match lower.parse_arpa_name() {
                Ok(net) if self.is_cluster_address(net) => Route::Cluster(lower),
                _ => Route::Upstream,
            };
        }
        let n = labels.len();
        let under_domain = |suffix: &[&str]| -> Option<Name> {
            let mut name = lower.clone();
            for l in suffix {
                name = name.append_label(*l).ok()?;
            }
            let mut name = name.append_domain(&self.domain).ok()?;
            name.set_fqdn(true);
            Some(name)
        };
        let cluster = |suffix: &[&str], fall: bool| match under_domain(suffix) {
            Some(ask) if fall => Route::ClusterThenUpstream(ask),
            Some(ask) => Route::Cluster(ask),
            // Too long once the domain is appended: no such cluster name.
            None => Route::Upstream,
        };
        if n == 1 {
            if last == "localhost" || self.namespace.is_empty() {
                return Route::Upstream;
            }
            let Ok(short) = Name::from_labels([last.as_str()]) else {
                return Route::Upstream;
            };
            return match short
                .append_label(self.namespace.as_str())
                .and_then(|n| n.append_label("svc"))
                .and_then(|n| n.append_domain(&self.domain))
            {
                Ok(mut ask) => {
                    ask.set_fqdn(true);
                    Route::ClusterThenUpstream(ask)
                }
                Err(_) => Route::Upstream,
            };
        }
        if last == "svc" {
            return cluster(&[], false);
        }
        if last == "pod" && n >= 3 {
            return cluster(&[], false);
        }
        match &self.namespaces {
            Some(known) if known.contains(last.as_str()) => cluster(&["svc"], false),
            Some(_) => Route::Upstream,
            None => cluster(&["svc"], true),
        }
    }

    fn is_cluster_address(&self, net: IpNet) -> bool {
        let full = match net.addr() {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        net.prefix_len() == full && self.networks.iter().any(|n| n.contains(&net.addr()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(namespaces: Option<&[&str]>) -> ClusterView {
        ClusterView {
            domain: Name::from_ascii("cluster.local.").expect("literal"),
            namespace: "default".into(),
            namespaces: namespaces.map(|l| l.iter().map(|s| s.to_string()).collect()),
            networks: vec![
                "10.96.0.0/12".parse().expect("literal"),
                "10.244.0.0/16".parse().expect("literal"),
            ],
        }
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("literal")
    }

    #[test]
    fn cluster_names_like_a_pod() {
        let v = view(Some(&["default", "data"]));
        let c = |s: &str| Route::Cluster(name(s));
        assert_eq!(
            v.route(&name("web.default.svc.cluster.local.")),
            c("web.default.svc.cluster.local.")
        );
        assert_eq!(
            v.route(&name("WEB.Default.svc.Cluster.Local.")),
            c("web.default.svc.cluster.local.")
        );
        assert_eq!(
            v.route(&name("echo.default.")),
            c("echo.default.svc.cluster.local.")
        );
        assert_eq!(
            v.route(&name("echo.default.svc.")),
            c("echo.default.svc.cluster.local.")
        );
        assert_eq!(
            v.route(&name("db-0.db.data.")),
            c("db-0.db.data.svc.cluster.local.")
        );
        assert_eq!(
            v.route(&name("10-244-0-5.default.pod.")),
            c("10-244-0-5.default.pod.cluster.local.")
        );
        assert_eq!(
            v.route(&name("web.")),
            Route::ClusterThenUpstream(name("web.default.svc.cluster.local."))
        );
        assert_eq!(
            v.route(&name("5.0.244.10.in-addr.arpa.")),
            c("5.0.244.10.in-addr.arpa.")
        );
    }

    #[test]
    fn other_names_stay_with_the_laptop() {
        let v = view(Some(&["default", "data"]));
        for s in [
            "intranet.example.",
            "wiki.corp.example.",
            "example.com.",
            "localhost.",
            ".",
            "1.1.168.192.in-addr.arpa.",
            "0.244.10.in-addr.arpa.",
            "x.nosuchns.",
        ] {
            assert_eq!(v.route(&name(s)), Route::Upstream, "{s}");
        }
    }

    #[test]
    fn unknown_namespaces_fall_through() {
        let v = view(None);
        assert_eq!(
            v.route(&name("intranet.example.")),
            Route::ClusterThenUpstream(name("intranet.example.svc.cluster.local."))
        );
        assert_eq!(
            v.route(&name("echo.default.svc.")),
            Route::Cluster(name("echo.default.svc.cluster.local."))
        );
    }

    #[test]
    fn too_long_names_are_not_the_cluster_s() {
        let v = view(Some(&["default"]));
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.{}.default.", "b".repeat(40));
        assert_eq!(v.route(&name(&long)), Route::Upstream);
    }
}
