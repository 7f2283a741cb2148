//! [`Client`] and the session builder.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::session::{Session, SessionConfig};
use crate::status::{HolderStatus, Status, StatusQuery};
use crate::store::{default_owner, validate_owner, Capabilities, LockStore};

/// The shortest session lease: renewal runs at a third of it.
pub const MIN_TTL: Duration = Duration::from_millis(50);
/// The longest session lease.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The lease a session gets unless told otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);
/// The lock-delay a session gets unless told otherwise.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(1);

/// A handle on one lock store. Cheap to clone; opens [`Session`]s.
///
/// Get one with `distlock::connect(url)`, or from any [`LockStore`] with
/// [`Client::new`].
#[derive(Debug, Clone)]
pub struct Client {
    store: Arc<dyn LockStore>,
}

impl Client {
    /// A client over a store.
    pub fn new(store: Arc<dyn LockStore>) -> Self {
        Client { store }
    }

    /// What the store supports.
    pub fn capabilities(&self) -> Capabilities {
        self.store.capabilities()
    }

    /// The store itself.
    pub fn store(&self) -> &Arc<dyn LockStore> {
        &self.store
    }

    /// Starts building a session: `client.session().ttl(d).open().await`.
    pub fn session(&self) -> SessionBuilder {
        SessionBuilder {
            store: Arc::clone(&self.store),
            config: SessionConfig {
                ttl: DEFAULT_TTL,
                lock_delay: DEFAULT_LOCK_DELAY,
                max_hold: None,
                owner: None,
                max_keys: crate::session::DEFAULT_MAX_KEYS,
            },
        }
    }

    /// Who holds and who waits for the keys `query` names, with each
    /// holder's owner, token, time held and lease left, where the store can
    /// tell; [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) from
    /// a store that cannot list its holders.
    pub async fn status(&self, query: &StatusQuery) -> Result<Status> {
        if let StatusQuery::Key(key) = query {
            crate::key::validate_key(key)?;
        }
        self.store.status(query).await
    }

    /// Ends every hold on `key`, whoever holds it: the next grant carries a
    /// higher token, so the old holders' fenced writes are refused, and
    /// their `lost()` fires (at their next renewal). For an operator taking
    /// a lock away from a stuck holder; answers what was held.
    pub async fn force_release(&self, key: &str) -> Result<Vec<HolderStatus>> {
        crate::key::validate_key(key)?;
        self.store.force_release(key, &default_owner()).await
    }
}

/// Options of a new session; [`open`](SessionBuilder::open) starts it.
#[derive(Debug)]
#[must_use = "a session builder does nothing until .open().await"]
pub struct SessionBuilder {
    store: Arc<dyn LockStore>,
    config: SessionConfig,
}

impl SessionBuilder {
    /// The session's lease (default 15 s, between 50 ms and 24 h). The core
    /// renews it every third of this; if renewals fail for this long the
    /// session and every lock it holds are lost.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// How long a key stays blocked after this session expires while holding
    /// it (default 1 s), so that a paused holder has time to see `lost()`
    /// before anyone else gets the key. Stores without lock-delay ignore it.
    pub fn lock_delay(mut self, lock_delay: Duration) -> Self {
        self.config.lock_delay = lock_delay;
        self
    }

    /// The longest time renewal keeps any one lock: past it the guard reports
    /// `lost()` and the lock is released, so that no orphaned lock is renewed
    /// forever. Default: no limit.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.config.max_hold = Some(max_hold);
        self
    }

    /// Who this session says it is, shown beside its holds by `status`
    /// (default `user@host pid N (program)`). At most 256 bytes, on one
    /// line.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.config.owner = Some(owner.into());
        self
    }

    /// The most keys one [`Session::lock_all`](crate::Session::lock_all)
    /// may name (default 64): a bound on what one request can tie up.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.config.max_keys = max_keys;
        self
    }

    /// Opens the session at the store and starts its renewal task.
    ///
    /// Needs a tokio runtime with the time driver.
    pub async fn open(self) -> Result<Session> {
        let ttl = self.config.ttl;
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(Error::config(format!(
                "session ttl {ttl:?} is out of range; use between {MIN_TTL:?} and {MAX_TTL:?}"
            )));
        }
        if let Some(owner) = &self.config.owner {
            validate_owner(owner)?;
        }
        if self.config.max_hold == Some(Duration::ZERO) {
            return Err(Error::config(
                "max_hold of 0 would lose every lock at once; leave it unset for no limit",
            ));
        }
        Session::open(self.store, self.config).await
    }
}
