//! Sessions: the identity that owns locks, its renewal task, and the
//! reentrancy table every store shares.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod acquire;
mod elect;
mod guard;
mod multi;
mod renewal;
mod request;
#[cfg(test)]
mod shaped;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_shaped;

use crate::error::{Error, ErrorKind, Result};
use crate::store::{
    lock, Capabilities, HeldLock, LockStore, Mode, SessionModel, SessionOptions, StoreSession,
};
pub use elect::{Campaign, Leader, Leadership, Observer, DEFAULT_OBSERVE_EVERY};
pub use guard::Guard;
pub use multi::{KeyMode, MultiGuard, MultiLockRequest, DEFAULT_MAX_KEYS};
pub use request::LockRequest;

/// What a session was opened with.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) ttl: Duration,
    pub(crate) lock_delay: Duration,
    pub(crate) max_hold: Option<Duration>,
    /// `None`: [`default_owner`](crate::store::default_owner).
    pub(crate) owner: Option<String>,
    /// The most keys one `lock_all` may name.
    pub(crate) max_keys: usize,
}

/// How long an acquire may wait.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    TryOnce,
    Until(Instant),
    Forever,
}

/// The margin taken off every lease so that the client gives a lock up
/// before the store can: 1 % of the TTL for clock rate drift, plus 2 ms.
pub(crate) fn drift_margin(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// When the lease of something sent to the store at `sent` runs out, by
/// this process's clock; `None` for stores whose sessions have no lease.
fn lease_deadline(caps: &Capabilities, ttl: Duration, sent: Instant) -> Option<Instant> {
    (caps.session != SessionModel::Process).then(|| sent + ttl - drift_margin(ttl))
}

/// Far enough ahead to mean "no deadline" without overflowing `Instant`.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 24 * 60 * 60)
}

/// A lock this session holds, shared by all its reentrant guards.
#[derive(Debug)]
pub(crate) struct HeldEntry {
    pub(crate) lock: HeldLock,
    /// Cancelled when this lock is lost, released, or its session ends.
    pub(crate) lost: CancellationToken,
    pub(crate) max_hold_until: Option<Instant>,
    /// This lock's own lease: from the send time of its acquire, then of
    /// each renewal that included it. A store with a TTL per key (Redis)
    /// can let a lock granted after a renewal's snapshot expire before the
    /// session's lease says.
    renewed_until: Mutex<Option<Instant>>,
}

impl HeldEntry {
    pub(crate) fn renewed_until(&self) -> Option<Instant> {
        *lock(&self.renewed_until)
    }

    pub(crate) fn set_renewed_until(&self, until: Instant) {
        *lock(&self.renewed_until) = Some(until);
    }
}

/// The reentrant holds of one key.
#[derive(Debug)]
struct Hold {
    entry: Arc<HeldEntry>,
    count: usize,
}

/// Serializes this session's acquires and releases of one key, and counts
/// its reentrant holds.
type Gate = Arc<tokio::sync::Mutex<Option<Hold>>>;

#[derive(Debug, Clone)]
enum Ended {
    Open,
    Lost(String),
    Closed,
}

pub(crate) struct SessionInner {
    store: Arc<dyn StoreSession>,
    /// The store it was opened on, to open an election's own session.
    opener: Arc<dyn LockStore>,
    pub(crate) caps: Capabilities,
    config: SessionConfig,
    gates: Mutex<HashMap<String, Gate>>,
    /// The locks held now, for renewal and close.
    held: Mutex<HashMap<String, Arc<HeldEntry>>>,
    /// The sessions of this one's campaigns and leaderships, closed by
    /// [`Session::close`] before it returns.
    elections: Mutex<Vec<std::sync::Weak<SessionInner>>>,
    /// When the lease runs out unless renewed (`None`: the store's sessions
    /// have no lease, e.g. a process).
    lease: watch::Sender<Option<Instant>>,
    /// Cancelled when the session is lost or closed.
    pub(crate) ended: CancellationToken,
    state: Mutex<Ended>,
    /// Set by the freezing test hook: renewals stop.
    #[cfg(feature = "test-hooks")]
    pub(crate) frozen: std::sync::atomic::AtomicBool,
}

/// A session: the identity that owns locks, kept alive by a lease that a
/// background task renews every third of the TTL.
///
/// Cheap to clone and to share between tasks; all clones are one session, so
/// locks taken through any of them are reentrant for all. When renewal fails
/// for a whole lease, the session is lost and every guard reports
/// [`Guard::lost`]. [`close`](Session::close) releases everything; dropping
/// the last clone (and every guard) closes it in the background.
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("store", &self.inner.caps.name)
            .field("ttl", &self.inner.config.ttl)
            .field("state", &*lock(&self.inner.state))
            .finish()
    }
}

impl Session {
    pub(crate) async fn open(store: Arc<dyn LockStore>, config: SessionConfig) -> Result<Session> {
        let caps = store.capabilities();
        let sent = Instant::now();
        // max_hold is the core's alone: it counts from when a grant arrives,
        // which no store sees.
        let mut options = SessionOptions::new(config.ttl, config.lock_delay);
        if let Some(owner) = &config.owner {
            options.owner.clone_from(owner);
        }
        let store_session: Arc<dyn StoreSession> = Arc::from(store.open_session(&options).await?);
        let lease = lease_deadline(&caps, config.ttl, sent);
        let inner = Arc::new(SessionInner {
            store: store_session,
            opener: store,
            caps,
            config,
            gates: Mutex::default(),
            held: Mutex::default(),
            elections: Mutex::default(),
            lease: watch::Sender::new(lease),
            ended: CancellationToken::new(),
            state: Mutex::new(Ended::Open),
            #[cfg(feature = "test-hooks")]
            frozen: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(renewal::renew_loop(
            Arc::downgrade(&inner),
            inner.ended.clone(),
        ));
        Ok(Session { inner })
    }

    /// Every key of `keys` at once, each with its own token, or none:
    /// `lock_all(["a", "b"])` takes them exclusively, `lock_all([("a",
    /// Mode::Shared), ("b", Mode::Exclusive)])` in the modes given. Keys
    /// are taken in one order (by their bytes) whatever order they are
    /// named in, so no two such requests deadlock, as long as neither
    /// session already holds one of the keys (a key held before the
    /// request was not taken in that order); a request that cannot have
    /// them all gives back those it took, and one whose early key was lost
    /// while it waited for a later one (`max_hold`, a forced release)
    /// gives them all back and asks again. Each key's `max_hold` counts
    /// from its own grant. An empty list, a key named twice, or more keys
    /// than [`max_keys`](crate::SessionBuilder::max_keys) is an error.
    pub fn lock_all<I>(&self, keys: I) -> MultiLockRequest
    where
        I: IntoIterator,
        I::Item: KeyMode,
    {
        let keys = keys.into_iter().map(KeyMode::key_mode).collect();
        MultiLockRequest::new(self.clone(), keys)
    }

    /// A candidacy in election `name`: `session.elect("jobs/leader")
    /// .value("10.0.0.7:8080").campaign().await` waits to lead. The leader
    /// holds `name` as a lock (in a session of its own with this one's
    /// lease, ended with this one), publishes its value as that session's
    /// owner, and its token is the term; see [`Client::leader`] and
    /// [`Client::observe`](crate::Client::observe).
    ///
    /// [`Client::leader`]: crate::Client::leader
    pub fn elect(&self, name: impl Into<String>) -> Campaign {
        Campaign::new(self.clone(), name.into())
    }

    /// An exclusive lock on `key`.
    pub fn lock(&self, key: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), key.into(), Mode::Exclusive)
    }

    /// A shared (read) lock on `key`: many readers together, never with a
    /// writer. Writers are preferred where the store says
    /// `writer_preferring`: a reader arriving after a waiting writer waits.
    pub fn read(&self, key: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), key.into(), Mode::Shared)
    }

    /// An exclusive (write) lock on `key`, excluding readers and writers.
    pub fn write(&self, key: impl Into<String>) -> LockRequest {
        LockRequest::new(self.clone(), key.into(), Mode::Exclusive)
    }

    /// One permit of a counting semaphore on `key` that admits `permits`
    /// holders at once. A session holds at most one permit of a key; a
    /// second request from the same session is reentrant. Use one session per
    /// worker for separate permits.
    pub fn semaphore(&self, key: impl Into<String>, permits: u32) -> LockRequest {
        LockRequest::new(self.clone(), key.into(), Mode::Semaphore { permits })
    }

    /// What the store supports.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// The session's lease.
    pub fn ttl(&self) -> Duration {
        self.inner.config.ttl
    }

    /// Until when the lease certainly holds, by this process's monotonic
    /// clock; `None` for stores whose sessions have no lease.
    pub fn lease_deadline(&self) -> Option<Instant> {
        *self.inner.lease.borrow()
    }

    /// Whether the session was lost (lease ran out or the store ended it).
    pub fn is_lost(&self) -> bool {
        matches!(*lock(&self.inner.state), Ended::Lost(_))
    }

    /// Releases every lock of the session and ends it at the store. Guards
    /// still alive report `lost()`; releasing them afterwards is `NotHeld`.
    /// Its campaigns and leaderships end first (their own sessions' later
    /// campaigns end with those sessions, in the background).
    pub async fn close(&self) -> Result<()> {
        if !self.inner.end_as_closed() {
            return Ok(());
        }
        let elections: Vec<_> = std::mem::take(&mut *lock(&self.inner.elections));
        for inner in elections.iter().filter_map(std::sync::Weak::upgrade) {
            if inner.end_as_closed() {
                if let Err(err) = inner.store.close().await {
                    tracing::debug!("closing an election's session: {err}");
                }
            }
        }
        self.inner.store.close().await
    }

    /// Test hook: stop renewing, as if the process froze, so the lease runs
    /// out at the store while the guards still exist.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn freeze_for_test(&self) {
        self.inner
            .frozen
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.store.freeze_for_test();
    }

    /// Test hook: ask the store to release `key` for this session without
    /// holding it, to check that stores refuse foreign releases.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn release_unheld_for_test(&self, key: &str, mode: Mode) -> Result<()> {
        let lock = HeldLock {
            key: key.to_owned(),
            mode,
            token: 0,
        };
        self.inner.store.release(&lock).await
    }
}

impl SessionInner {
    /// Marks the session closed and its guards lost; false if it had
    /// already ended.
    fn end_as_closed(&self) -> bool {
        {
            let mut state = lock(&self.state);
            if !matches!(*state, Ended::Open) {
                return false;
            }
            *state = Ended::Closed;
        }
        self.ended.cancel();
        lock(&self.held).clear();
        true
    }

    fn ended_error(&self) -> Error {
        match &*lock(&self.state) {
            Ended::Open => Error::new(ErrorKind::Closed, "session is ending"),
            Ended::Lost(why) => Error::lost(format!("session lost: {why}; open a new session")),
            Ended::Closed => Error::new(
                ErrorKind::Closed,
                "session was closed; open a new session to lock again",
            ),
        }
    }

    /// Ends the session as lost: every guard's `lost()` fires.
    fn lose(&self, why: String) {
        {
            let mut state = lock(&self.state);
            if !matches!(*state, Ended::Open) {
                return;
            }
            tracing::warn!(store = self.caps.name, "session lost: {why}");
            *state = Ended::Lost(why);
        }
        self.ended.cancel();
        // A store whose locks live as long as a connection (or a session
        // the store keeps alive itself, as ZooKeeper's client does) would
        // keep them until the application drops the session: they go now.
        // Stores with lock-delay keep theirs until the lease ends, so that
        // the delay applies; a process's locks go with the process.
        let keep = match self.caps.session {
            SessionModel::Connection => false,
            SessionModel::Lease => self.caps.lock_delay,
            SessionModel::Process => true,
        };
        if keep {
            return;
        }
        let store = Arc::clone(&self.store);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = store.close().await {
                    tracing::debug!("closing a lost session: {err}");
                }
            });
        }
    }

    /// The instant past which `entry` is not held, if any.
    pub(crate) fn deadline_of(&self, entry: &HeldEntry) -> Option<Instant> {
        let session_lease = *self.lease.borrow();
        [session_lease, entry.renewed_until(), entry.max_hold_until]
            .into_iter()
            .flatten()
            .min()
    }

    pub(crate) fn is_held(&self, entry: &HeldEntry) -> bool {
        !entry.lost.is_cancelled()
            && self
                .deadline_of(entry)
                .is_none_or(|deadline| Instant::now() < deadline)
    }

    pub(crate) fn subscribe_lease(&self) -> watch::Receiver<Option<Instant>> {
        self.lease.subscribe()
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        if !matches!(*lock(&self.state), Ended::Open) {
            return;
        }
        self.ended.cancel();
        let store = Arc::clone(&self.store);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = store.close().await {
                    tracing::debug!("closing a dropped session: {err}");
                }
            });
        }
    }
}
