//! One miniature cluster for every test of a test binary, so that each
//! acceptance point can be its own `#[test]` (`cargo test --test X point`
//! runs it alone) without paying a cluster per point.
//!
//! The first test that asks starts the cluster; it is taken down when the
//! test binary exits (a `libc::atexit` hook: the test harness has no
//! teardown of its own and never drops statics). A point that changes the
//! cluster for a while (deletes a pod, patches a Service others use) takes
//! it [`alone`](shared_cluster_alone): no other test of the binary uses the
//! cluster meanwhile, whatever `--test-threads` says.

use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use burrow_tests::cluster::{Cluster, ClusterOptions};

enum State {
    Idle,
    Up(Arc<Cluster>),
    /// Started once and failed: every later test fails with the same
    /// message instead of starting another cluster.
    Failed(String),
    /// Taken down at exit.
    Down,
}

static STATE: Mutex<State> = Mutex::new(State::Idle);
/// Readers: points that leave the cluster as they found it; the writer: a
/// point that changes it for a while.
static TURNS: RwLock<()> = RwLock::new(());

/// A test's use of the shared cluster; derefs to it.
pub struct SharedCluster {
    cluster: Arc<Cluster>,
    _shared: Option<RwLockReadGuard<'static, ()>>,
    _alone: Option<RwLockWriteGuard<'static, ()>>,
}

impl Deref for SharedCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

/// The binary's cluster (`<name><pid>` with `laptops` laptops), started on
/// first use; None (skip) when the end-to-end gate says so. Other tests may
/// use it at the same time.
pub fn shared_cluster(name: &str, laptops: usize) -> Option<SharedCluster> {
    take(name, laptops, false)
}

/// As [`shared_cluster`], for a point that changes the cluster for a while:
/// it waits until no other test uses the cluster, and none starts until it
/// is done.
pub fn shared_cluster_alone(name: &str, laptops: usize) -> Option<SharedCluster> {
    take(name, laptops, true)
}

fn take(name: &str, laptops: usize, alone: bool) -> Option<SharedCluster> {
    let cluster = started(name, laptops)?;
    // A point that panicked while holding its turn poisons the lock; the
    // others still run.
    let (shared, alone) = if alone {
        (None, Some(TURNS.write().unwrap_or_else(|p| p.into_inner())))
    } else {
        (Some(TURNS.read().unwrap_or_else(|p| p.into_inner())), None)
    };
    Some(SharedCluster {
        cluster,
        _shared: shared,
        _alone: alone,
    })
}

fn started(name: &str, laptops: usize) -> Option<Arc<Cluster>> {
    if !burrow_tests::net::root_or_skip(name) {
        return None;
    }
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match &*state {
        State::Up(c) => return Some(c.clone()),
        State::Failed(e) => panic!("the shared cluster did not start: {e}"),
        State::Down => panic!("the shared cluster is already down (test binary exiting)"),
        State::Idle => {}
    }
    let opts = ClusterOptions {
        name: format!("{name}{}", std::process::id() % 10_000),
        workloads: None,
        laptops,
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_minicluster"));
    // SAFETY: registers a plain function; it runs once, at exit.
    unsafe {
        libc::atexit(take_down);
    }
    match Cluster::up(bin, &opts) {
        Ok(c) => {
            let c = Arc::new(c);
            *state = State::Up(c.clone());
            settle(&c);
            Some(c)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            *state = State::Failed(msg.clone());
            panic!("minicluster up: {msg}");
        }
    }
}

/// Waits until the default workloads answer through their Services from
/// the caller pod. `minicluster up` is done when the pods are ready, but
/// kube-proxy writes their rules up to a sync period (1 s) and the informer
/// lag later, as a real one does: until then `curl http://web/` is refused.
/// A point run alone right after the start must not see that window (run
/// one after another, the points before it used to hide it).
fn settle(c: &Cluster) {
    let curl = |url| vec!["curl", "-sSf", "--max-time", "2", "-o", "/dev/null", url];
    let checks = [
        curl("http://web/"),
        curl("http://echo.default:8080/"),
        vec!["redis-cli", "-h", "redis.data", "ping"],
        vec!["getent", "hosts", "db-0.db.data.svc.cluster.local"],
    ];
    for args in checks {
        super::eventually(
            std::time::Duration::from_secs(30),
            &format!("{args:?} from the caller pod after minicluster up"),
            || {
                super::run(super::in_caller(c, &args))
                    .status
                    .success()
                    .then_some(())
            },
        );
    }
}

/// At exit: takes the shared cluster down (every test is over, so the
/// state holds its last reference).
extern "C" fn take_down() {
    let _ = std::panic::catch_unwind(|| {
        let up = {
            let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *state, State::Down)
        };
        if let State::Up(c) = up {
            match Arc::try_unwrap(c) {
                // Drop runs `minicluster down`.
                Ok(c) => drop(c),
                Err(c) => {
                    // A reference left in a thread that outlived its test.
                    if let Err(e) =
                        burrow_tests::cluster::down(c.name(), std::time::Duration::from_secs(5))
                    {
                        eprintln!("taking the shared cluster {} down: {e:#}", c.name());
                    }
                }
            }
        }
    });
}
