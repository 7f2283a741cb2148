//! The memory store (`memory://`): locks inside one process.
//!
//! It has every capability — exclusive, shared (writer-preferring) and
//! semaphore modes, FIFO queues with pushed grants, leases, lock-delay and
//! fencing — and is the reference the conformance suite is tuned against.
//! Use it in the unit tests of applications: `memory://NAME` names a store
//! shared by every client of the process that uses the same name.
//!
//! It does not protect anything across processes, and its tokens start again
//! from 1 when the process restarts.

mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::store::{
    AcquireRequest, Capabilities, Fencing, Grant, HeldLock, LockStore, RenewReport, SessionModel,
    SessionOptions, StoreSession,
};
use table::{Attempt, SessionId, Table, WaiterId};

type SharedTable = Arc<Mutex<Table>>;

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Every step of the table finishes without awaiting or panicking
    // half-way, so a poisoned lock still guards a consistent table.
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An in-process lock store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    name: String,
    table: SharedTable,
}

impl MemoryStore {
    /// A new store of its own, shared with nobody.
    pub fn new() -> Self {
        MemoryStore {
            name: String::new(),
            table: SharedTable::default(),
        }
    }

    /// The store called `name` in this process (the host of
    /// `memory://NAME`; `memory://` is the one called ""). Every call with the
    /// same name shares one lock table for the life of the process.
    pub fn named(name: &str) -> Self {
        static NAMED: OnceLock<Mutex<HashMap<String, SharedTable>>> = OnceLock::new();
        let mut named = NAMED
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let table = Arc::clone(named.entry(name.to_owned()).or_default());
        MemoryStore {
            name: name.to_owned(),
            table,
        }
    }

    /// The name this store was opened with (`""` for a private store).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the memory store supports: everything.
    pub fn capabilities() -> Capabilities {
        let mut caps = Capabilities::minimal("memory");
        caps.fair = true;
        caps.shared = true;
        caps.writer_preferring = true;
        caps.semaphore = true;
        caps.push_wakeup = true;
        caps.fencing = Fencing::InProcess;
        caps.lease_expiry = true;
        caps.lock_delay = true;
        caps.survives_restart = false;
        caps.session = SessionModel::Lease;
        caps
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

#[async_trait]
impl LockStore for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        MemoryStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        let id = lock(&self.table).open_session(options.ttl, options.lock_delay);
        Ok(Box::new(MemorySession {
            table: Arc::clone(&self.table),
            id,
        }))
    }
}

struct MemorySession {
    table: SharedTable,
    id: SessionId,
}

fn session_gone() -> Error {
    Error::new(
        ErrorKind::Lost,
        "the memory store ended this session (its lease ran out)",
    )
}

/// A queued waiter; dropping it before the grant arrives leaves the queue
/// (or gives back a grant that raced with the drop).
struct Ticket<'a> {
    session: &'a MemorySession,
    key: &'a str,
    id: WaiterId,
    grant: oneshot::Receiver<u64>,
    done: bool,
}

impl Ticket<'_> {
    async fn wait(mut self, until: Instant) -> Result<Option<Grant>> {
        loop {
            let next = lock(&self.session.table).next_event(self.session.id, self.key);
            let wake = next.map_or(until, |next| next.min(until));
            tokio::select! {
                granted = &mut self.grant => {
                    self.done = true;
                    return granted.map(|token| Some(Grant::new(token))).map_err(|_| session_gone());
                }
                () = sleep_until(wake) => {
                    if Instant::now() >= until {
                        // Leaving through Drop gives back a grant that raced in.
                        return Ok(None);
                    }
                }
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut table = lock(&self.session.table);
        let granted = self.grant.try_recv().is_ok();
        table.abandon(self.session.id, self.key, self.id, granted);
    }
}

#[async_trait]
impl StoreSession for MemorySession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let queue = request.wait_until.is_some();
        let attempt = lock(&self.table).acquire(self.id, &request.key, request.mode, queue);
        match attempt {
            Attempt::Granted(token) => Ok(Some(Grant::new(token))),
            Attempt::Busy => Ok(None),
            Attempt::SessionGone => Err(session_gone()),
            Attempt::Queued(id, grant) => {
                let ticket = Ticket {
                    session: self,
                    key: &request.key,
                    id,
                    grant,
                    done: false,
                };
                let until = request.wait_until.expect("queued only when waiting");
                ticket.wait(until).await
            }
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        if lock(&self.table).release(self.id, &held.key) {
            Ok(())
        } else {
            Err(Error::not_held(&held.key))
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let mut table = lock(&self.table);
        if !table.renew(self.id) {
            return Err(session_gone());
        }
        let lost = held
            .iter()
            .filter(|lock| !table.holds(self.id, &lock.key))
            .map(|lock| lock.key.clone())
            .collect();
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        lock(&self.table).end_session(self.id, None);
        Ok(())
    }
}

impl Drop for MemorySession {
    fn drop(&mut self) {
        lock(&self.table).end_session(self.id, None);
    }
}
