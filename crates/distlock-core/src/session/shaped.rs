//! A test store: the memory store with capabilities taken away and failures
//! scripted, so that unit tests reach the session paths the memory store
//! never takes (polled waits, one key at a time, failed releases and
//! renewals, late grants, per-lock leases, a restart).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::status::{HolderStatus, Status, StatusQuery};
use crate::store::{
    lock, AcquireRequest, Capabilities, Grant, HeldLock, KeyWatch, LockStore, RenewReport,
    SessionOptions, StoreSession,
};
use crate::MemoryStore;

/// What the store does besides the memory store's work. Each field is read
/// as a request comes.
#[derive(Debug, Default)]
pub(super) struct Script {
    /// Acquires are sent to the memory store this late (so their answers
    /// come late; a grant's lease, if it has one, counts from before).
    pub(super) late: Duration,
    /// Grants carry a lease of their own, counted from this long before
    /// their request was sent (zero: from the send).
    pub(super) lease_from_ago: Option<Duration>,
    /// `acquire_all` fails with this.
    pub(super) acquire_all_fails: Option<ErrorKind>,
    /// The next releases fail with these, one each, releasing nothing.
    pub(super) release_fails: VecDeque<ErrorKind>,
    /// Releases answer this late.
    pub(super) release_delay: Duration,
    /// Renewals fail with this, renewing nothing.
    pub(super) renew_fails: Option<ErrorKind>,
    /// `watch_key` fails.
    pub(super) watch_fails: bool,
    /// Requests made so far.
    pub(super) calls: Calls,
}

/// Requests the store has had, by kind.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Calls {
    pub(super) acquire_all: usize,
    pub(super) release: usize,
    pub(super) renew: usize,
    pub(super) close: usize,
    pub(super) watch: usize,
}

type Shared = Arc<Mutex<Script>>;

#[derive(Debug)]
pub(super) struct Shaped {
    memory: Mutex<Arc<MemoryStore>>,
    caps: Capabilities,
    script: Shared,
}

impl Shaped {
    /// The memory store, its capabilities as `shape` leaves them.
    pub(super) fn new(shape: impl FnOnce(&mut Capabilities)) -> Arc<Self> {
        let mut caps = MemoryStore::capabilities();
        shape(&mut caps);
        Arc::new(Shaped {
            memory: Mutex::new(Arc::new(MemoryStore::new())),
            caps,
            script: Shared::default(),
        })
    }

    pub(super) fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.script)
    }

    pub(super) fn calls(&self) -> Calls {
        self.script().calls
    }

    /// A restart that loses everything: new sessions go to an empty memory
    /// store, whose tokens start again; open sessions stay on the old one.
    pub(super) fn restart(&self) {
        *lock(&self.memory) = Arc::new(MemoryStore::new());
    }

    fn memory(&self) -> Arc<MemoryStore> {
        Arc::clone(&lock(&self.memory))
    }
}

/// The failure the script asks for, if any.
fn scripted(fails: Option<ErrorKind>) -> Result<()> {
    match fails {
        Some(kind) => Err(Error::new(kind, "a scripted failure")),
        None => Ok(()),
    }
}

#[async_trait]
impl LockStore for Shaped {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        let inner = self.memory().open_session(options).await?;
        Ok(Box::new(ShapedSession {
            inner,
            script: Arc::clone(&self.script),
        }))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        self.memory().status(query).await
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        self.memory().force_release(key, requested_by).await
    }

    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let fails = {
            let mut script = self.script();
            script.calls.watch += 1;
            script.watch_fails
        };
        scripted(fails.then_some(ErrorKind::Unavailable))?;
        self.memory().watch_key(key).await
    }
}

struct ShapedSession {
    inner: Box<dyn StoreSession>,
    script: Shared,
}

impl ShapedSession {
    fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.script)
    }
}

#[async_trait]
impl StoreSession for ShapedSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let sent = Instant::now();
        let (late, ago) = {
            let script = self.script();
            (script.late, script.lease_from_ago)
        };
        // Before the memory store's grant, which a drop must not leave held.
        tokio::time::sleep(late).await;
        let granted = self.inner.acquire(request).await?;
        Ok(granted.map(|grant| match ago {
            Some(ago) => grant.with_lease_from(sent - ago),
            None => grant,
        }))
    }

    async fn acquire_all(&self, requests: &[AcquireRequest]) -> Result<Option<Vec<Grant>>> {
        let fails = {
            let mut script = self.script();
            script.calls.acquire_all += 1;
            script.acquire_all_fails
        };
        scripted(fails)?;
        self.inner.acquire_all(requests).await
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let (delay, fails) = {
            let mut script = self.script();
            script.calls.release += 1;
            (script.release_delay, script.release_fails.pop_front())
        };
        tokio::time::sleep(delay).await;
        scripted(fails)?;
        self.inner.release(held).await
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let fails = {
            let mut script = self.script();
            script.calls.renew += 1;
            script.renew_fails
        };
        scripted(fails)?;
        self.inner.renew(held).await
    }

    async fn close(&self) -> Result<()> {
        self.script().calls.close += 1;
        self.inner.close().await
    }

    async fn renewal_wanted(&self) {
        self.inner.renewal_wanted().await;
    }
}
