//! Sessions: the identity that owns locks, its renewal task, and the
//! reentrancy table every store shares.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, OwnedMutexGuard};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod guard;
mod renewal;
mod request;

use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind, Result};
use crate::key::validate_key;
use crate::store::{
    lock, AcquireRequest, Capabilities, Grant, HeldLock, LockStore, Mode, SessionModel,
    SessionOptions, StoreSession,
};
pub use guard::Guard;
pub use request::LockRequest;

/// What a session was opened with.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub(crate) ttl: Duration,
    pub(crate) lock_delay: Duration,
    pub(crate) max_hold: Option<Duration>,
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

/// A use of a key's gate. Dropping it removes the gate from the session's
/// map if nobody else uses it, however the use ended (cancellation too), so
/// declare it before any guard of the gate's mutex.
struct GateRef<'a> {
    session: &'a SessionInner,
    key: &'a str,
    gate: Gate,
}

impl Drop for GateRef<'_> {
    fn drop(&mut self) {
        self.session.tidy_gate(self.key, &self.gate);
    }
}

#[derive(Debug, Clone)]
enum Ended {
    Open,
    Lost(String),
    Closed,
}

pub(crate) struct SessionInner {
    store: Arc<dyn StoreSession>,
    pub(crate) caps: Capabilities,
    config: SessionConfig,
    gates: Mutex<HashMap<String, Gate>>,
    /// The locks held now, for renewal and close.
    held: Mutex<HashMap<String, Arc<HeldEntry>>>,
    /// When the lease runs out unless renewed (`None`: the store's sessions
    /// have no lease, e.g. a process).
    lease: watch::Sender<Option<Instant>>,
    /// Cancelled when the session is lost or closed.
    pub(crate) ended: CancellationToken,
    state: Mutex<Ended>,
    frozen: AtomicBool,
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
        let options = SessionOptions::new(config.ttl, config.lock_delay);
        let store_session: Arc<dyn StoreSession> = Arc::from(store.open_session(&options).await?);
        let lease = lease_deadline(&caps, config.ttl, sent);
        let inner = Arc::new(SessionInner {
            store: store_session,
            caps,
            config,
            gates: Mutex::default(),
            held: Mutex::default(),
            lease: watch::Sender::new(lease),
            ended: CancellationToken::new(),
            state: Mutex::new(Ended::Open),
            frozen: AtomicBool::new(false),
        });
        tokio::spawn(renewal::renew_loop(
            Arc::downgrade(&inner),
            inner.ended.clone(),
        ));
        Ok(Session { inner })
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
    pub async fn close(&self) -> Result<()> {
        {
            let mut state = lock(&self.inner.state);
            if !matches!(*state, Ended::Open) {
                return Ok(());
            }
            *state = Ended::Closed;
        }
        self.inner.ended.cancel();
        lock(&self.inner.held).clear();
        self.inner.store.close().await
    }

    /// Test hook: stop renewing, as if the process froze, so the lease runs
    /// out at the store while the guards still exist.
    #[doc(hidden)]
    pub fn freeze_for_test(&self) {
        self.inner.frozen.store(true, Ordering::SeqCst);
        self.inner.store.freeze_for_test();
    }

    /// Test hook: ask the store to release `key` for this session without
    /// holding it, to check that stores refuse foreign releases.
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

    /// Removes `key`'s gate from the map if only the map and the caller
    /// still use it and it holds nothing.
    fn tidy_gate(&self, key: &str, gate: &Gate) {
        let mut gates = lock(&self.gates);
        let idle = Arc::strong_count(gate) == 2
            && gate.try_lock().map(|slot| slot.is_none()).unwrap_or(false);
        if idle {
            gates.remove(key);
        }
    }

    fn gate<'a>(&'a self, key: &'a str) -> GateRef<'a> {
        let mut gates = lock(&self.gates);
        // Looked up before inserting: a key held or used again needs no
        // copy of its name.
        let gate = match gates.get(key) {
            Some(gate) => Arc::clone(gate),
            None => Arc::clone(gates.entry(key.to_owned()).or_default()),
        };
        drop(gates);
        GateRef {
            session: self,
            key,
            gate,
        }
    }

    fn forget_held(&self, entry: &Arc<HeldEntry>) {
        let mut held = lock(&self.held);
        if held
            .get(&entry.lock.key)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            held.remove(&entry.lock.key);
        }
    }

    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: String,
        mode: Mode,
        wait: Wait,
    ) -> Result<Option<Guard>> {
        validate_key(&key)?;
        self.check_mode(mode)?;
        if self.ended.is_cancelled() {
            return Err(self.ended_error());
        }
        let gate = self.gate(&key);
        // The gate is nearly always free: take it without arming a timer.
        let slot = match Arc::clone(&gate.gate).try_lock_owned() {
            Ok(slot) => Some(slot),
            // Another task of this session is acquiring or releasing the key
            // right now; for a non-blocking attempt that counts as busy.
            Err(_) => {
                let gate_mutex = Arc::clone(&gate.gate);
                match wait {
                    Wait::TryOnce => None,
                    Wait::Until(deadline) => {
                        tokio::time::timeout_at(deadline, gate_mutex.lock_owned())
                            .await
                            .ok()
                    }
                    Wait::Forever => Some(gate_mutex.lock_owned().await),
                }
            }
        };
        let result = match slot {
            Some(slot) => self.acquire_in_gate(slot, &key, mode, wait).await,
            None => Ok(None),
        };
        drop(gate);
        match (result, wait) {
            (Ok(None), Wait::Until(_)) => Err(Error::new(
                ErrorKind::Timeout,
                format!("timed out waiting for '{key}': another session still holds it"),
            )),
            (result, _) => result,
        }
    }

    async fn acquire_in_gate(
        self: &Arc<Self>,
        mut slot: OwnedMutexGuard<Option<Hold>>,
        key: &str,
        mode: Mode,
        wait: Wait,
    ) -> Result<Option<Guard>> {
        if let Some(hold) = slot.as_mut() {
            if self.is_held(&hold.entry) {
                if !hold.entry.lock.mode.covers(mode) {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!(
                            "this session holds '{key}' as {} and asked for it as {mode}; \
                             release it first (upgrading in place would wait forever)",
                            hold.entry.lock.mode
                        ),
                    ));
                }
                hold.count += 1;
                return Ok(Some(Guard::new(Arc::clone(self), Arc::clone(&hold.entry))));
            }
            // The old hold was lost: give it back to the store (which may
            // not know yet) and start afresh. Its guards will say NotHeld.
            let stale = slot.take().expect("checked above").entry;
            stale.lost.cancel();
            self.forget_held(&stale);
            if let Err(err) = self.store.release(&stale.lock).await {
                tracing::debug!(key, "release of a lost hold: {err}");
            }
        }
        let Some(grant) = self.acquire_at_store(key, mode, wait).await? else {
            return Ok(None);
        };
        let arrived = Instant::now();
        let entry = Arc::new(HeldEntry {
            lock: HeldLock {
                key: key.to_owned(),
                mode,
                token: grant.token,
            },
            lost: self.ended.child_token(),
            max_hold_until: self.config.max_hold.map(|max| arrived + max),
            // Not from when this acquire began: a wait may have been long.
            renewed_until: Mutex::new(grant.lease_from.and_then(|sent| self.lease_from(sent))),
        });
        if self.ended.is_cancelled() {
            // Lost or closed while the grant was on its way: give it back.
            let _ = self.store.release(&entry.lock).await;
            return Err(self.ended_error());
        }
        if self
            .deadline_of(&entry)
            .is_some_and(|deadline| deadline <= arrived)
        {
            // The store's answer came after the lease it started had run
            // out (a connection that stalled): the store may have granted
            // the key on already. Never hand out a guard dead on arrival.
            let _ = self.store.release(&entry.lock).await;
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the grant of '{key}' arrived after its lease had run out (the store \
                     answered late); ask again"
                ),
            ));
        }
        lock(&self.held).insert(key.to_owned(), Arc::clone(&entry));
        *slot = Some(Hold {
            entry: Arc::clone(&entry),
            count: 1,
        });
        if let Some(until) = entry.max_hold_until {
            tokio::spawn(renewal::expire_at_max_hold(
                Arc::downgrade(self),
                Arc::clone(&entry),
                until,
            ));
        }
        Ok(Some(Guard::new(Arc::clone(self), entry)))
    }

    fn check_mode(&self, mode: Mode) -> Result<()> {
        let unsupported = |what: &str| {
            Error::new(
                ErrorKind::Unsupported,
                format!("the {} store does not support {what}", self.caps.name),
            )
        };
        match mode {
            Mode::Exclusive => Ok(()),
            Mode::Shared if !self.caps.shared => Err(unsupported("shared (read) locks")),
            Mode::Shared => Ok(()),
            Mode::Semaphore { .. } if !self.caps.semaphore => Err(unsupported("semaphores")),
            Mode::Semaphore { permits: 0 } => Err(Error::config(
                "a semaphore needs at least 1 permit; semaphore(key, 0) would never admit anyone",
            )),
            Mode::Semaphore { .. } => Ok(()),
        }
    }

    /// Asks the store, waiting by push where it can and by jittered backoff
    /// where it cannot. Ends early if the session ends.
    async fn acquire_at_store(&self, key: &str, mode: Mode, wait: Wait) -> Result<Option<Grant>> {
        let deadline = match wait {
            Wait::TryOnce => None,
            Wait::Until(deadline) => Some(deadline),
            Wait::Forever => Some(far_future()),
        };
        let mut request = AcquireRequest::new(key, mode);
        // A push store waits itself and answers `None` at the deadline — or
        // earlier if it gave up early (a server caps waits; a stale grant is
        // on its way back): then it is asked again. A polling store answers
        // at once and is asked again after a backoff.
        if self.caps.push_wakeup {
            request.wait_until = deadline;
        }
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        loop {
            let granted = tokio::select! {
                granted = self.store.acquire(&request) => granted?,
                () = self.ended.cancelled() => return Err(self.ended_error()),
            };
            let now = Instant::now();
            match (granted, deadline) {
                (Some(grant), _) => return Ok(Some(grant)),
                (None, Some(deadline)) if now < deadline => {
                    let pause = backoff.next_delay().min(deadline - now);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.ended.cancelled() => return Err(self.ended_error()),
                    }
                }
                (None, _) => return Ok(None),
            }
        }
    }

    /// The lease deadline of something sent to the store at `sent`, if
    /// this store's sessions have leases.
    pub(crate) fn lease_from(&self, sent: Instant) -> Option<Instant> {
        lease_deadline(&self.caps, self.config.ttl, sent)
    }

    /// Gives up one reentrant hold; the last one releases at the store. If
    /// the store's answer is unknown (it failed), the hold is over all the
    /// same — it is never handed out again, as the store may have released
    /// it — and a task keeps asking the store to release it, holding the
    /// key's gate so that this session cannot take the key meanwhile.
    pub(crate) async fn release_hold(self: &Arc<Self>, entry: &Arc<HeldEntry>) -> Result<()> {
        let key = &entry.lock.key;
        let gate = self.gate(key);
        let mut slot = Arc::clone(&gate.gate).lock_owned().await;
        let Some(hold) = slot.as_mut().filter(|hold| Arc::ptr_eq(&hold.entry, entry)) else {
            return Err(Error::not_held(key));
        };
        if self.ended.is_cancelled() {
            // Closing or losing the session took every lock with it.
            *slot = None;
            self.forget_held(entry);
            return Err(Error::new(
                ErrorKind::NotHeld,
                format!(
                    "the lock on '{key}' ended with its session ({})",
                    self.ended_error()
                ),
            ));
        }
        let was_held = self.is_held(entry);
        hold.count = hold.count.saturating_sub(1);
        if hold.count == 0 {
            // Out of the renewal set first: a renewal overtaking the release
            // would otherwise report the key lost.
            self.forget_held(entry);
            // Cancel safe: until the store answers, the hold stays (with a
            // count of 0), and the guard's Drop asks again.
            let released = self.store.release(&entry.lock).await;
            *slot = None;
            entry.lost.cancel();
            match released {
                Ok(()) => {}
                Err(err) if err.kind() == ErrorKind::NotHeld => return Err(err),
                Err(err) => {
                    tokio::spawn(renewal::retry_release(
                        Arc::downgrade(self),
                        entry.lock.clone(),
                        slot,
                    ));
                    return Err(err);
                }
            }
        }
        if was_held {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotHeld,
                format!("the lock on '{key}' was lost before it was released"),
            ))
        }
    }

    /// Marks `entry` lost and gives it back to the store: used when the
    /// store reports a lock gone and when `max_hold` runs out.
    pub(crate) async fn drop_lost(&self, entry: &Arc<HeldEntry>) {
        entry.lost.cancel();
        self.forget_held(entry);
        let gate = self.gate(&entry.lock.key);
        let mut slot = gate.gate.lock().await;
        if slot
            .as_ref()
            .is_some_and(|hold| Arc::ptr_eq(&hold.entry, entry))
        {
            *slot = None;
            if let Err(err) = self.store.release(&entry.lock).await {
                tracing::debug!(key = %entry.lock.key, "release after loss: {err}");
            }
        }
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

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{Client, MemoryStore};

    #[tokio::test]
    async fn cancelled_acquires_leave_no_gates_behind() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        let (owner, waiter) = (
            client.session().open().await.expect("open"),
            client.session().open().await.expect("open"),
        );
        let mut held = Vec::new();
        for i in 0..10 {
            held.push(owner.lock(format!("k{i}")).await.expect("hold"));
            let attempt = waiter.lock(format!("k{i}")).wait(Duration::from_secs(60));
            let gave_up = tokio::time::timeout(Duration::from_millis(10), attempt).await;
            assert!(gave_up.is_err(), "key {i} should have been busy");
        }
        assert!(
            lock(&waiter.inner.gates).is_empty(),
            "gates of cancelled acquires remain"
        );
        for guard in held {
            guard.release().await.expect("release");
        }
        assert!(
            lock(&owner.inner.gates).is_empty(),
            "gates of released keys remain"
        );
    }

    #[tokio::test]
    async fn busy_and_timed_out_acquires_leave_no_gates_behind() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        let owner = client.session().open().await.expect("open");
        let other = client.session().open().await.expect("open");
        let _held = owner.lock("k").await.expect("hold");
        assert!(other.lock("k").try_lock().await.expect("try").is_none());
        let timed_out = other.lock("k").wait(Duration::from_millis(10)).await;
        assert_eq!(timed_out.expect_err("busy").kind(), ErrorKind::Timeout);
        assert!(
            lock(&other.inner.gates).is_empty(),
            "gates of failed acquires remain"
        );
    }
}
