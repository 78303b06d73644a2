//! Pod IPs: 10.244.0.2–10.244.255.254, handed out walking forward so that
//! a freed address is not reused at once.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use minicluster_apiserver::Store;
use minicluster_apiserver::resources::must;

use super::PODS;

const FIRST_POD_IP: u32 = u32::from_be_bytes([10, 244, 0, 2]);
const LAST_POD_IP: u32 = u32::from_be_bytes([10, 244, 255, 254]);

/// The first address at or after `cursor` (wrapping) in
/// 10.244.0.2–10.244.255.254 that is not in `in_use`.
pub fn pick_ip(in_use: &HashSet<Ipv4Addr>, cursor: u32) -> Option<Ipv4Addr> {
    let span = LAST_POD_IP - FIRST_POD_IP + 1;
    let start = cursor.clamp(FIRST_POD_IP, LAST_POD_IP) - FIRST_POD_IP;
    (0..span)
        .map(|i| Ipv4Addr::from(FIRST_POD_IP + (start + i) % span))
        .find(|ip| !in_use.contains(ip))
}

#[derive(Default)]
pub(super) struct IpPool {
    pub(super) held: HashSet<Ipv4Addr>,
    pub(super) cursor: u32,
}

impl IpPool {
    /// Allocates an address not held here nor used by any pod in the store.
    /// Walks forward so that a freed address is not reused at once (stale
    /// conntrack entries, clients with old answers).
    pub(super) fn allocate(&mut self, store: &Store) -> Option<Ipv4Addr> {
        let mut in_use = self.held.clone();
        for p in store.list(must(PODS), None).0 {
            if let Some(ip) = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()) {
                in_use.insert(ip);
            }
        }
        let ip = pick_ip(&in_use, self.cursor.max(FIRST_POD_IP))?;
        self.cursor = u32::from(ip) + 1;
        self.held.insert(ip);
        Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_allocation_skips_used_and_wraps() {
        let mut used = HashSet::new();
        assert_eq!(pick_ip(&used, 0), Some(Ipv4Addr::new(10, 244, 0, 2)));
        used.insert(Ipv4Addr::new(10, 244, 0, 2));
        used.insert(Ipv4Addr::new(10, 244, 0, 3));
        assert_eq!(pick_ip(&used, 0), Some(Ipv4Addr::new(10, 244, 0, 4)));
        assert_eq!(
            pick_ip(&used, LAST_POD_IP + 5),
            Some(Ipv4Addr::new(10, 244, 255, 254))
        );
        used.insert(Ipv4Addr::new(10, 244, 255, 254));
        assert_eq!(
            pick_ip(&used, LAST_POD_IP),
            Some(Ipv4Addr::new(10, 244, 0, 4))
        );
        assert_eq!(
            pick_ip(&used, u32::from(Ipv4Addr::new(10, 244, 1, 0))),
            Some(Ipv4Addr::new(10, 244, 1, 0))
        );
    }
}
