//! The machinery the miniature cluster's endpoint controllers share with the
//! real ones: an informer (a local cache fed by the store's watch, each
//! event delivered after a lag), a work queue (deduplicated keys, delayed
//! adds, per-key exponential retry back-off), and writes that leave the
//! controller a while after the sync that computed them read its cache.
//!
//! The lag is what makes a controller write from an out-of-date view, as the
//! real ones do: a sync that read the cache just before a change still
//! writes what it computed, up to [`Lag::max_stale`] after the change.
//!
//! Must never: deliver one resource's events out of order, run two syncs at
//! once, or retry without back-off.
//!
//! # The lag, real and stand-in
//!
//! Real: every controller reads an informer cache that trails the
//! API server by the watch latency (ms to 100s of ms; per resource in order,
//! across resources in any order), queues keys (`--endpoint-updates-batch-
//! period`, `--endpointslice-updates-batch-period`, `--mirroring-endpointslice-
//! updates-batch-period` all default 0: Service, pod and Endpoints events are
//! handled at once; slice events: EndpointSlice controller ≥ 1 s, mirroring
//! 0), runs one sync per key at a time (5 workers each), and writes what it
//! computed from that cache with client-side throttling (`--kube-api-qps` 20,
//! burst 30). A sync in flight when a change lands still writes from the old
//! state; a write from a stale cache fails (Update with the cached
//! resourceVersion → 409; the slice trackers' `StaleSlices` and the endpoints
//! controller's `staleEndpointsTracker` refuse to sync) and is retried with
//! back-off: endpoints controller 5 ms·2ⁿ, EndpointSlice and mirroring 1 s·2ⁿ
//! (15 retries). kube-proxy: `--iptables-min-sync-period` 1 s.
//!
//! The stand-in ([`Lag::REAL`], scaled by `MINICLUSTER_LAG_SCALE`, 0
//! turns it off): each controller's cache gets every event 5–60 ms late
//! (uniform, per resource in order), a sync's writes leave 0–80 ms after it
//! read its cache, so **a write can land up to 140 ms after the change that
//! made it obsolete** ([`Lag::max_stale`]); the queue delays, the 1 s slice
//! resync, the trackers, the 409s and the back-offs are the real ones; one
//! worker per controller. kube-proxy: the informer lag, then the sync runner
//! (1 s, burst 2). Chosen so a test sees every ordering a healthy real
//! cluster produces (late writes, slices before or after the Service change,
//! 1 s resyncs) while a quiet cluster settles in well under 2 s.
//!
//! Differences: no client-side throttling (a real write can be seconds late
//! under load), one worker, no topology hints, no `last-change-trigger-time`,
//! one slice per port set (no 100-endpoint split), the garbage collector's
//! cascade is immediate.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use minicluster_apiserver::{ApiError, EventType, ResourceType, Store, WatchEvent};
use rand::Rng;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

/// The delays the controllers and kube-proxy emulate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Watch delivery: every event reaches an informer's cache after a
    /// delay drawn uniformly from this range (events of one resource stay in
    /// order; different resources' streams are independent, so a Service
    /// change and a slice change may arrive in either order).
    pub informer: (Duration, Duration),
    /// Between a sync's read of its cache and its writes reaching the API
    /// server (round trips, client-side rate limiting): uniform.
    pub in_flight: (Duration, Duration),
    /// kube-proxy's `--iptables-min-sync-period`: at most one rules write
    /// per period (the first change after a quiet period goes at once).
    pub proxy_min_sync: Duration,
}

/// The environment variable scaling every delay of [`Lag::REAL`] (a float;
/// `0` turns the lag off, `5` makes it five times as long).
pub const LAG_SCALE_ENV: &str = "MINICLUSTER_LAG_SCALE";

impl Lag {
    /// What a healthy small real cluster shows (see the module doc, "The
    /// lag, real and stand-in"): watch delivery 5–60 ms, 0–80 ms between a sync's
    /// read and its writes, kube-proxy min-sync-period 1 s (its default).
    pub const REAL: Lag = Lag {
        informer: (Duration::from_millis(5), Duration::from_millis(60)),
        in_flight: (Duration::ZERO, Duration::from_millis(80)),
        proxy_min_sync: Duration::from_secs(1),
    };

    /// No delays at all (unit tests of the control plane).
    pub const NONE: Lag = Lag {
        informer: (Duration::ZERO, Duration::ZERO),
        in_flight: (Duration::ZERO, Duration::ZERO),
        proxy_min_sync: Duration::ZERO,
    };

    /// [`Lag::REAL`] scaled by `scale` (negative or not a number: 1).
    pub fn scaled(scale: f64) -> Lag {
        let scale = if scale.is_finite() && scale >= 0.0 {
            scale
        } else {
            1.0
        };
        let s = |d: Duration| d.mul_f64(scale);
        let r = Lag::REAL;
        Lag {
            informer: (s(r.informer.0), s(r.informer.1)),
            in_flight: (s(r.in_flight.0), s(r.in_flight.1)),
            proxy_min_sync: s(r.proxy_min_sync),
        }
    }

    /// [`Lag::REAL`], scaled by [`LAG_SCALE_ENV`] if set.
    pub fn from_env() -> Lag {
        match std::env::var(LAG_SCALE_ENV) {
            Ok(v) => Lag::scaled(v.trim().parse().unwrap_or(1.0)),
            Err(_) => Lag::REAL,
        }
    }

    /// The longest a sync can still write after a change it did not see.
    pub fn max_stale(&self) -> Duration {
        self.informer.1 + self.in_flight.1
    }

    fn draw(range: (Duration, Duration)) -> Duration {
        if range.1 <= range.0 {
            return range.0;
        }
        let lo = range.0.as_micros() as u64;
        let hi = range.1.as_micros() as u64;
        Duration::from_micros(rand::rng().random_range(lo..=hi))
    }

    pub fn informer_delay(&self) -> Duration {
        Lag::draw(self.informer)
    }

    pub fn in_flight_delay(&self) -> Duration {
        Lag::draw(self.in_flight)
    }
}

type CacheKey = (String, String, String);

/// One change as an informer's handlers see it.
#[derive(Debug)]
pub struct Change {
    pub resource: &'static ResourceType,
    /// The object before (None: added).
    pub old: Option<Value>,
    /// The object after (None: deleted).
    pub new: Option<Value>,
}

/// A lagged local cache of some resources.
pub struct Informer {
    kinds: Vec<&'static ResourceType>,
    cache: BTreeMap<CacheKey, Value>,
    /// Per resource: events waiting for their delivery time.
    pending: HashMap<String, VecDeque<(Instant, WatchEvent)>>,
    lag: Lag,
}

fn obj_ns(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or("")
}
fn obj_name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

impl Informer {
    /// Lists `kinds` from the store (the initial list arrives at once, as
    /// an informer's first list does before the controller starts).
    pub fn new(
        store: &Store,
        kinds: &[&'static ResourceType],
        lag: Lag,
    ) -> Result<(Informer, tokio::sync::broadcast::Receiver<WatchEvent>)> {
        let (_, rx) = store
            .watch(None)
            .map_err(|e| anyhow::anyhow!("watch: {e}"))?;
        let mut inf = Informer {
            kinds: kinds.to_vec(),
            cache: BTreeMap::new(),
            pending: HashMap::new(),
            lag,
        };
        inf.relist(store);
        Ok((inf, rx))
    }

    /// Replaces the cache with the store's content (after missed events).
    pub fn relist(&mut self, store: &Store) {
        self.cache.clear();
        self.pending.clear();
        for rt in &self.kinds {
            for obj in store.list(rt, None).0 {
                self.cache.insert(
                    (
                        rt.key(),
                        obj_ns(&obj).to_string(),
                        obj_name(&obj).to_string(),
                    ),
                    obj,
                );
            }
        }
    }

    fn wants(&self, rt: &ResourceType) -> bool {
        let k = rt.key();
        self.kinds.iter().any(|r| r.key() == k)
    }

    /// Takes an event from the watch; it is delivered after the lag.
    pub fn push(&mut self, ev: WatchEvent) {
        if !self.wants(ev.resource) {
            return;
        }
        let q = self.pending.entry(ev.resource.key()).or_default();
        let mut due = Instant::now() + self.lag.informer_delay();
        if let Some((last, _)) = q.back() {
            due = due.max(*last);
        }
        q.push_back((due, ev));
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(|q| q.front().map(|(t, _)| *t))
            .min()
    }

    /// Applies every event due by `now`, returning the changes.
    pub fn deliver(&mut self, now: Instant) -> Vec<Change> {
        let mut due: Vec<(Instant, u64, WatchEvent)> = Vec::new();
        for q in self.pending.values_mut() {
            while q.front().is_some_and(|(t, _)| *t <= now) {
                if let Some((t, ev)) = q.pop_front() {
                    due.push((t, ev.rv, ev));
                }
            }
        }
        due.sort_by_key(|(t, rv, _)| (*t, *rv));
        let mut out = Vec::new();
        for (_, _, ev) in due {
            let key = (
                ev.resource.key(),
                ev.namespace().to_string(),
                ev.name().to_string(),
            );
            let old = match ev.kind {
                EventType::Deleted => self.cache.remove(&key),
                _ => self.cache.insert(key, ev.object.clone()),
            };
            let new = match ev.kind {
                EventType::Deleted => None,
                _ => Some(ev.object),
            };
            out.push(Change {
                resource: ev.resource,
                old,
                new,
            });
        }
        out
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> Option<&Value> {
        self.cache
            .get(&(rt.key(), ns.to_string(), name.to_string()))
    }

    /// Every cached object of `rt` (in `ns` if given), by namespace and name.
    pub fn list<'a>(
        &'a self,
        rt: &'a ResourceType,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let k = rt.key();
        self.cache
            .iter()
            .filter(move |((r, n, _), _)| *r == k && ns.is_none_or(|want| n == want))
            .map(|(_, v)| v)
    }
}

/// A work queue of `namespace/name` keys: a key is queued once (its
/// earliest due time wins), failures are retried with back-off.
pub struct Queue {
    due: HashMap<String, Instant>,
    failures: HashMap<String, u32>,
    backoff: fn(u32) -> Duration,
}

/// client-go's `DefaultControllerRateLimiter` per-item part: 5 ms · 2ⁿ⁻¹,
/// at most 1000 s (the endpoints controller).
pub fn backoff_5ms(n: u32) -> Duration {
    exp_backoff(Duration::from_millis(5), Duration::from_secs(1000), n)
}

/// 1 s · 2ⁿ⁻¹, at most 1000 s (the EndpointSlice controller) or 100 s (the
/// mirroring controller) — both use 1 s.
pub fn backoff_1s(n: u32) -> Duration {
    exp_backoff(Duration::from_secs(1), Duration::from_secs(1000), n)
}

fn exp_backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(max)
}

/// Retries before a key is dropped (all three controllers: 15).
pub const MAX_RETRIES: u32 = 15;

impl Queue {
    pub fn new(backoff: fn(u32) -> Duration) -> Queue {
        Queue {
            due: HashMap::new(),
            failures: HashMap::new(),
            backoff,
        }
    }

    pub fn add(&mut self, key: String) {
        self.add_after(key, Duration::ZERO);
    }

    pub fn add_after(&mut self, key: String, delay: Duration) {
        let at = Instant::now() + delay;
        let e = self.due.entry(key).or_insert(at);
        if at < *e {
            *e = at;
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// The key due first, if it is due by `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<String> {
        let (key, at) = self
            .due
            .iter()
            .min_by_key(|(k, t)| (**t, (*k).clone()))
            .map(|(k, t)| (k.clone(), *t))?;
        if at > now {
            return None;
        }
        self.due.remove(&key);
        Some(key)
    }

    /// A sync of `key` failed: queue it again after its back-off, unless it
    /// failed [`MAX_RETRIES`] times.
    pub fn retry(&mut self, key: &str) -> Option<Duration> {
        let n = self.failures.entry(key.to_string()).or_insert(0);
        *n += 1;
        if *n > MAX_RETRIES {
            self.failures.remove(key);
            return None;
        }
        let d = (self.backoff)(*n);
        self.add_after(key.to_string(), d);
        Some(d)
    }

    pub fn forget(&mut self, key: &str) {
        self.failures.remove(key);
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

/// One write a sync decided on.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create through admission (generateName allowed).
    Create {
        rt: &'static ResourceType,
        ns: String,
        obj: Value,
    },
    /// Replace the stored object; with `rv`, only if it is still that
    /// version (409 Conflict otherwise), as an Update of a cached object is.
    Update {
        rt: &'static ResourceType,
        ns: String,
        name: String,
        obj: Value,
        rv: Option<String>,
    },
    Delete {
        rt: &'static ResourceType,
        ns: String,
        name: String,
    },
}

impl Op {
    pub fn describe(&self) -> String {
        match self {
            Op::Create { rt, ns, obj } => format!(
                "create {} {ns}/{}{}",
                rt.plural,
                obj["metadata"]["name"].as_str().unwrap_or(""),
                obj["metadata"]["generateName"].as_str().unwrap_or("")
            ),
            Op::Update { rt, ns, name, .. } => format!("update {} {ns}/{name}", rt.plural),
            Op::Delete { rt, ns, name } => format!("delete {} {ns}/{name}", rt.plural),
        }
    }

    /// Sends the write to the store: the stored object after it (for a
    /// delete: the deleted object).
    pub fn execute(&self, store: &Store) -> Result<Value, ApiError> {
        match self {
            Op::Create { rt, ns, obj } => {
                minicluster_apiserver::admission::create(store, rt, ns, obj.clone())
            }
            Op::Update {
                rt,
                ns,
                name,
                obj,
                rv,
            } => store.update_with(rt, ns, name, |cur| {
                if let Some(want) = rv
                    && cur["metadata"]["resourceVersion"].as_str() != Some(want.as_str())
                {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
                *cur = obj.clone();
                Ok(())
            }),
            Op::Delete { rt, ns, name } => store.delete(rt, ns, name),
        }
    }
}

/// Why a sync wrote nothing and wants to be retried.
#[derive(Debug)]
pub struct SyncError(pub String);

/// A controller driven by [`run`].
pub trait Controller: Send {
    const NAME: &'static str;
    fn kinds(&self) -> Vec<&'static ResourceType>;
    /// Called once with the initial cache (and again after a relist).
    fn on_start(&mut self, inf: &Informer, q: &mut Queue);
    fn on_change(&mut self, inf: &Informer, change: &Change, q: &mut Queue);
    /// What to write for `key`, from the cache.
    fn sync(&mut self, inf: &Informer, key: &str) -> Result<Vec<Op>, SyncError>;
    /// A write of this sync succeeded (`result`: the stored object).
    fn wrote(&mut self, op: &Op, result: &Value);
    fn backoff(&self) -> fn(u32) -> Duration;
}

/// Runs a controller until the store's watch closes: one sync at a time,
/// from a cache that lags the store by [`Lag::informer`], its writes sent
/// [`Lag::in_flight`] after the cache was read.
pub async fn run<C: Controller>(store: Arc<Store>, mut c: C, lag: Lag) -> Result<()> {
    let kinds = c.kinds();
    let (mut inf, mut rx) = Informer::new(&store, &kinds, lag)?;
    let mut q = Queue::new(c.backoff());
    c.on_start(&inf, &mut q);
    let far = Duration::from_secs(3600);
    loop {
        // Take what the watch has, then deliver what is due.
        loop {
            match rx.try_recv() {
                Ok(ev) => inf.push(ev),
                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                    inf.relist(&store);
                    c.on_start(&inf, &mut q);
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Closed) => {
                    anyhow::bail!("{}: the store's watch closed", C::NAME)
                }
            }
        }
        let now = Instant::now();
        for change in inf.deliver(now) {
            c.on_change(&inf, &change, &mut q);
        }
        if let Some(key) = q.pop_due(now) {
            match c.sync(&inf, &key) {
                Ok(ops) if ops.is_empty() => q.forget(&key),
                Ok(ops) => {
                    tokio::time::sleep(lag.in_flight_delay()).await;
                    let mut failed = None;
                    for op in &ops {
                        match op.execute(&store) {
                            Ok(v) => {
                                tracing::debug!(controller = C::NAME, "{}", op.describe());
                                c.wrote(op, &v);
                            }
                            // Deleting what is gone is done.
                            Err(e) if e.code == 404 && matches!(op, Op::Delete { .. }) => {}
                            Err(e) => {
                                failed = Some(format!("{}: {e}", op.describe()));
                                break;
                            }
                        }
                    }
                    match failed {
                        None => q.forget(&key),
                        Some(why) => {
                            let again = q.retry(&key);
                            tracing::info!(
                                controller = C::NAME,
                                "sync {key}: {why}; retry in {again:?}"
                            );
                        }
                    }
                }
                Err(SyncError(why)) => {
                    let again = q.retry(&key);
                    tracing::debug!(
                        controller = C::NAME,
                        "sync {key}: {why}; retry in {again:?}"
                    );
                }
            }
            continue;
        }
        let next = [inf.next_due(), q.next_due()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + far);
        tokio::select! {
            r = rx.recv() => match r {
                Ok(ev) => inf.push(ev),
                Err(RecvError::Lagged(_)) => {
                    inf.relist(&store);
                    c.on_start(&inf, &mut q);
                }
                Err(RecvError::Closed) => anyhow::bail!("{}: the store's watch closed", C::NAME),
            },
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_follow_client_go() {
        assert_eq!(backoff_5ms(1), Duration::from_millis(5));
        assert_eq!(backoff_5ms(4), Duration::from_millis(40));
        assert_eq!(backoff_1s(1), Duration::from_secs(1));
        assert_eq!(backoff_1s(3), Duration::from_secs(4));
        assert_eq!(backoff_1s(40), Duration::from_secs(1000));
    }

    #[tokio::test]
    async fn queue_dedups_keeps_earliest_and_retries() {
        let mut q = Queue::new(backoff_1s);
        q.add_after("a/x".into(), Duration::from_secs(5));
        q.add("a/x".into());
        q.add_after("a/y".into(), Duration::from_secs(5));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_due(Instant::now()).as_deref(), Some("a/x"));
        assert_eq!(q.pop_due(Instant::now()), None, "a/y is not due");
        assert_eq!(q.retry("a/x"), Some(Duration::from_secs(1)));
        assert_eq!(q.retry("a/x"), Some(Duration::from_secs(2)));
        q.forget("a/x");
        assert_eq!(q.retry("a/x"), Some(Duration::from_secs(1)));
    }

    #[test]
    fn lag_scaling() {
        assert_eq!(Lag::scaled(0.0).max_stale(), Duration::ZERO);
        assert_eq!(Lag::scaled(1.0), Lag::REAL);
        assert_eq!(Lag::scaled(f64::NAN), Lag::REAL);
        assert_eq!(Lag::REAL.max_stale(), Duration::from_millis(140));
        let d = Lag::REAL.informer_delay();
        assert!(d >= Lag::REAL.informer.0 && d <= Lag::REAL.informer.1);
    }
}
