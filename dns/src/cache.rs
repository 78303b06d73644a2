//! The answer cache (sans-IO: the caller passes the time): positive answers
//! live for their smallest TTL, negative ones (NXDOMAIN, no data) for the
//! SOA's minimum when the answer carries one, else [`NEGATIVE_TTL`];
//! failures are never cached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Longest any answer is kept.
pub const MAX_TTL: u32 = 300;
/// How long a negative answer without an SOA is kept.
pub const NEGATIVE_TTL: u32 = 5;
/// Most negative answers are kept for.
pub const MAX_NEGATIVE_TTL: u32 = 60;
/// Entries kept at most (expired ones are swept first when full).
pub const CAPACITY: usize = 16_384;

/// What a query resolved to, before it is fitted to one client's question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    /// The name the records answer (renamed to the client's name on the
    /// way out, e.g. `web.default.svc.cluster.local.` for `web.`).
    pub ask: Name,
}

impl Resolved {
    /// A failure (SERVFAIL) for `ask`.
    pub fn failure(ask: Name) -> Self {
        Self {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
            ask,
        }
    }

    /// How long this answer may be cached; `None`: not at all.
    pub fn ttl(&self) -> Option<u32> {
        match self.rcode {
            ResponseCode::NoError if !self.answers.is_empty() => {
                let min = self.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
                (min > 0).then_some(min.min(MAX_TTL))
            }
            ResponseCode::NoError | ResponseCode::NXDomain => {
                let soa = self.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                    _ => None,
                });
                let ttl = soa.unwrap_or(NEGATIVE_TTL).min(MAX_NEGATIVE_TTL);
                (ttl > 0).then_some(ttl)
            }
            _ => None,
        }
    }
}

/// Cache key: lower-case name and type.
pub type Key = (Name, RecordType);

struct Entry {
    answer: Arc<Resolved>,
    stored: Instant,
    expires: Instant,
}

/// The cache.
#[derive(Default)]
pub struct Cache {
    entries: HashMap<Key, Entry>,
}

impl Cache {
    /// The answer for `key` and its age in whole seconds, if still fresh.
    pub fn get(&self, key: &Key, now: Instant) -> Option<(Arc<Resolved>, u32)> {
        self.get_until(key, now).map(|(a, age, _)| (a, age))
    }

    /// Like [`Cache::get`], plus until when an answer fitted now stays
    /// exact: the end of the current whole second of age, or the expiry.
    pub fn get_until(&self, key: &Key, now: Instant) -> Option<(Arc<Resolved>, u32, Instant)> {
        let e = self.entries.get(key)?;
        if now >= e.expires {
            return None;
        }
        let age = now.saturating_duration_since(e.stored).as_secs();
        let until = (e.stored + Duration::from_secs(age + 1)).min(e.expires);
        Some((
            e.answer.clone(),
            u32::try_from(age).unwrap_or(u32::MAX),
            until,
        ))
    }

    /// Keeps `answer` for its TTL (not at all when it has none).
    pub fn put(&mut self, key: Key, answer: Arc<Resolved>, now: Instant) {
        let Some(ttl) = answer.ttl() else {
            return;
        };
        if self.entries.len() >= CAPACITY {
            self.entries.retain(|_, e| e.expires > now);
            if self.entries.len() >= CAPACITY {
                // Still full of live entries: start over rather than grow.
                self.entries.clear();
            }
        }
        self.entries.insert(
            key,
            Entry {
                answer,
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("literal")
    }

    #[test]
    fn positive_and_negative_lifetimes() {
        let n = name("web.default.svc.cluster.local.");
        let pos = Resolved {
            rcode: ResponseCode::NoError,
            answers: vec![Record::from_rdata(
                n.clone(),
                5,
                RData::A(A::new(10, 96, 0, 20)),
            )],
            authorities: vec![],
            ask: n.clone(),
        };
        assert_eq!(pos.ttl(), Some(5));
        let soa = SOA::new(name("ns."), name("h."), 1, 1, 1, 1, 30);
        let neg = Resolved {
            rcode: ResponseCode::NXDomain,
            answers: vec![],
            authorities: vec![Record::from_rdata(
                name("cluster.local."),
                600,
                RData::SOA(soa),
            )],
            ask: n.clone(),
        };
        assert_eq!(neg.ttl(), Some(30));
        assert_eq!(Resolved::failure(n.clone()).ttl(), None);

        let mut c = Cache::default();
        let t0 = Instant::now();
        let key = (n.clone(), RecordType::A);
        c.put(key.clone(), Arc::new(pos), t0);
        assert_eq!(
            c.get(&key, t0 + Duration::from_secs(3)).map(|(_, age)| age),
            Some(3)
        );
        assert!(c.get(&key, t0 + Duration::from_secs(5)).is_none());
        c.put(
            (n.clone(), RecordType::AAAA),
            Arc::new(Resolved::failure(n.clone())),
            t0,
        );
        assert!(c.get(&(n, RecordType::AAAA), t0).is_none());
    }
}
