//! Noticing that the laptop slept or that its network changed, so the
//! supervisor can bring the tunnel back at once instead of waiting for a
//! timer: once a second it looks at which source address the kernel would
//! use towards the gateway's endpoint (the NodePort, or the API server for
//! port-forward) and at both clocks.
//!
//! - Source address gone (link down, no route): [`Change::Lost`]; nothing
//!   to do but wait (and say so).
//! - Back, or a different one (a new network, DHCP, roaming between
//!   access points): [`Change::Returned`] / [`Change::Moved`]: the
//!   supervisor reopens the transport, restarts the WireGuard session from
//!   the new address and re-registers at once (which also tells whether
//!   the gateway forgot the laptop meanwhile).
//! - A tick that came much later than asked for (the process was stopped,
//!   the machine suspended: the wall clock jumps too):
//!   [`Change::Woke`]: re-register at once.
//!
//! Pure ([`Underlay::observe`] is fed the observations), so it is tested
//! without a network; [`source_towards`] makes the one observation that
//! needs the kernel.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

/// How often the supervisor looks.
pub(super) const TICK: Duration = Duration::from_secs(1);
/// A tick later than this past its time means the daemon did not run
/// meanwhile (stopped, suspended).
const LATE: Duration = Duration::from_secs(5);

/// What changed since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// No source address towards the gateway any more (link down).
    Lost { from: IpAddr },
    /// A source address again, after `after` without one.
    Returned { to: IpAddr, after: Duration },
    /// A different source address (a new network).
    Moved { from: IpAddr, to: IpAddr },
    /// The daemon did not run for about `after` (stopped or suspended).
    Woke { after: Duration },
}

impl Change {
    /// Whether the tunnel should be brought back at once (transport
    /// reopened, session restarted, registration renewed).
    pub(super) fn needs_recovery(&self) -> bool {
        !matches!(self, Change::Lost { .. })
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Lost { from } => write!(f, "network lost (no route from {from} any more)"),
            Change::Returned { to, after } => {
                write!(f, "network back after {}s (from {to})", after.as_secs())
            }
            Change::Moved { from, to } => write!(f, "network changed: address {from} → {to}"),
            Change::Woke { after } => {
                write!(
                    f,
                    "woke up: the daemon did not run for {}s",
                    after.as_secs()
                )
            }
        }
    }
}

/// The last look.
#[derive(Debug)]
pub(super) struct Underlay {
    source: Option<IpAddr>,
    lost_at: Option<Instant>,
    last: Option<(Instant, SystemTime)>,
}

impl Underlay {
    pub(super) fn new(source: Option<IpAddr>, now: Instant) -> Self {
        Self {
            source,
            lost_at: source.is_none().then_some(now),
            last: None,
        }
    }

    /// One look: the source address the kernel picks now, the monotonic
    /// and the wall clock. What changed, if anything: a move, a return or
    /// a loss before a wake-up (a sleep often changes the network too, and
    /// recovery from either covers both); a wake-up with no network is
    /// nothing yet.
    pub(super) fn observe(
        &mut self,
        source: Option<IpAddr>,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Change> {
        let woke = self.last.and_then(|(then, then_wall)| {
            // Monotonic time may or may not count a suspend; the wall
            // clock does (a stopped process sees both move on).
            let mono = now.saturating_duration_since(then);
            let wall = wall.duration_since(then_wall).unwrap_or(Duration::ZERO);
            let gap = mono.max(wall);
            (gap > TICK + LATE).then_some(gap)
        });
        self.last = Some((now, wall));
        let before = self.source;
        self.source = source;
        let changed = match (before, source) {
            (Some(from), None) => {
                self.lost_at = Some(now);
                Some(Change::Lost { from })
            }
            (None, Some(to)) => {
                let after = self
                    .lost_at
                    .take()
                    .map(|t| now.saturating_duration_since(t))
                    .unwrap_or_default();
                Some(Change::Returned { to, after })
            }
            (Some(from), Some(to)) if from != to => Some(Change::Moved { from, to }),
            _ => None,
        };
        match (woke, changed) {
            // Moved, returned or lost say more than the wake-up.
            (_, Some(c)) => Some(c),
            // Woke with no network: nothing to do until it returns.
            (Some(after), None) if source.is_some() => Some(Change::Woke { after }),
            _ => None,
        }
    }
}

/// The source address the kernel would use towards `to` (`Ok(None)`: no
/// route, e.g. the link is down). A connected UDP socket sends nothing.
/// `Err`: this look could not tell (no socket to ask with, e.g. out of
/// file descriptors): not a network change.
pub(super) fn source_towards(to: SocketAddr) -> std::io::Result<Option<IpAddr>> {
    use std::io::ErrorKind;
    let any: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let sock = std::net::UdpSocket::bind(any)?;
    match sock.connect(to) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NetworkUnreachable
                    | ErrorKind::HostUnreachable
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NetworkDown
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let ip = sock.local_addr()?.ip();
    Ok((!ip.is_unspecified()).then_some(ip))
}

/// Where the laptop's tunnel traffic leaves for: the UDP endpoint, or the
/// API server (`https://HOST[:PORT]`) for port-forward, resolved.
pub(super) async fn api_server_address(server: &str) -> Option<SocketAddr> {
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let authority = rest.split('/').next().unwrap_or(rest);
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:443")
    } else {
        authority.to_owned()
    };
    tokio::net::lookup_host(with_port.as_str())
        .await
        .ok()?
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("literal"))
    }

    #[test]
    fn link_down_then_back() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut u = Underlay::new(ip("192.168.240.2"), t0);
        let s = |n: u64| (t0 + Duration::from_secs(n), w0 + Duration::from_secs(n));
        let (t, w) = s(1);
        assert_eq!(u.observe(ip("192.168.240.2"), t, w), None);
        let (t, w) = s(2);
        assert_eq!(
            u.observe(None, t, w),
            Some(Change::Lost {
                from: "192.168.240.2".parse().expect("literal")
            })
        );
        for n in 3..240 {
            let (t, w) = s(n);
            assert_eq!(u.observe(None, t, w), None);
        }
        let (t, w) = s(240);
        let back = u.observe(ip("192.168.240.2"), t, w).expect("a change");
        assert_eq!(
            back,
            Change::Returned {
                to: "192.168.240.2".parse().expect("literal"),
                after: Duration::from_secs(238)
            }
        );
        assert!(back.needs_recovery());
        assert!(!Change::Lost { from: back_ip() }.needs_recovery());
    }

    fn back_ip() -> IpAddr {
        "10.0.0.1".parse().expect("literal")
    }

    #[test]
    fn a_new_address_is_a_move() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut u = Underlay::new(ip("192.168.240.2"), t0);
        let c = u.observe(
            ip("192.168.240.130"),
            t0 + Duration::from_secs(1),
            w0 + Duration::from_secs(1),
        );
        assert_eq!(
            c,
            Some(Change::Moved {
                from: "192.168.240.2".parse().expect("literal"),
                to: "192.168.240.130".parse().expect("literal"),
            })
        );
    }

    #[test]
    fn a_late_tick_is_a_wake_up() {
        let t0 = Instant::now();
        let w0 = SystemTime::now();
        let mut u = Underlay::new(ip("192.168.240.2"), t0);
        assert_eq!(u.observe(ip("192.168.240.2"), t0, w0), None);
        // Stopped for 4 minutes: both clocks moved on.
        let later = Duration::from_secs(240);
        assert_eq!(
            u.observe(ip("192.168.240.2"), t0 + later, w0 + later),
            Some(Change::Woke { after: later })
        );
        // Suspended: only the wall clock moved on.
        let t1 = t0 + later + Duration::from_secs(1);
        let w1 = w0 + later + Duration::from_secs(3600);
        assert_eq!(
            u.observe(ip("192.168.240.2"), t1, w1),
            Some(Change::Woke {
                after: Duration::from_secs(3600)
            })
        );
        // Woke on another network: a wake-up (recovery covers the move).
        let t2 = t1 + later;
        let w2 = w1 + later;
        assert_eq!(
            u.observe(ip("192.168.240.9"), t2, w2),
            Some(Change::Moved {
                from: "192.168.240.2".parse().expect("literal"),
                to: "192.168.240.9".parse().expect("literal"),
            })
        );
        // A tick on time is nothing.
        let t3 = t2 + TICK;
        let w3 = w2 + TICK;
        assert_eq!(u.observe(ip("192.168.240.9"), t3, w3), None);
    }
}
