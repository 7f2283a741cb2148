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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::status::{HolderStatus, Status, StatusQuery};
use crate::store::{
    release_outcome, AcquireRequest, Capabilities, Fencing, Grant, HeldLock, KeyWatch, LockStore,
    RenewReport, SessionOptions, StoreSession,
};
use crate::table::{
    lock_table as lock, Attempt, AttemptAll, GroupTicket, SessionId, SessionSpec, SharedTable,
    Ticket, Waited, WaitedAll,
};

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
        let mut named = crate::store::lock(NAMED.get_or_init(Mutex::default));
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

    /// What the memory store supports: everything the lock table does, with
    /// tokens that start again when the process does.
    pub fn capabilities() -> Capabilities {
        crate::table::capabilities("memory", Fencing::InProcess)
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
        let spec = SessionSpec {
            owner: options.owner.clone(),
            ttl: options.ttl,
            lock_delay: options.lock_delay,
            max_hold: None,
        };
        let id = lock(&self.table)
            .open_session(spec)
            .expect("the memory store has no session limit");
        Ok(Box::new(MemorySession {
            table: Arc::clone(&self.table),
            id,
        }))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        let mut table = lock(&self.table);
        Ok(Status {
            keys: table.status(query),
            counters: Some(table.counters()),
        })
    }

    async fn force_release(&self, key: &str, _requested_by: &str) -> Result<Vec<HolderStatus>> {
        Ok(lock(&self.table).force_release(key))
    }

    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        Ok(Some(lock(&self.table).watch_key(key)))
    }
}

struct MemorySession {
    table: SharedTable,
    id: SessionId,
}

fn session_gone() -> Error {
    Error::lost("the memory store ended this session (its lease ran out)")
}

#[async_trait]
impl StoreSession for MemorySession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let queue = request.wait_until.is_some();
        let attempt = lock(&self.table).acquire(self.id, &request.key, request.mode, queue);
        match attempt {
            Attempt::Granted(token) => Ok(Some(Grant::new(token))),
            Attempt::Busy => Ok(None),
            Attempt::Queued(waiter, grant) => {
                let until = request.wait_until.expect("queued only when waiting");
                let table = Arc::clone(&self.table);
                let ticket = Ticket::new(table, self.id, request.key.clone(), waiter, grant);
                match ticket.wait(until).await {
                    Waited::Granted(token) => Ok(Some(Grant::new(token))),
                    Waited::TimedOut => Ok(None),
                    Waited::SessionGone => Err(session_gone()),
                }
            }
            Attempt::SessionGone => Err(session_gone()),
            Attempt::AlreadyHeld | Attempt::QueueFull | Attempt::NoTokens => Err(Error::store(
                "the memory store refused a request the core never makes; this is a bug",
            )),
        }
    }

    async fn acquire_all(&self, requests: &[AcquireRequest]) -> Result<Option<Vec<Grant>>> {
        let until = requests.first().and_then(|request| request.wait_until);
        let keys: Vec<_> = requests.iter().map(|r| (r.key.clone(), r.mode)).collect();
        let grants = |tokens: Vec<u64>| Some(tokens.into_iter().map(Grant::new).collect());
        let attempt = lock(&self.table).acquire_all(self.id, &keys, until.is_some());
        match attempt {
            AttemptAll::Granted(tokens) => Ok(grants(tokens)),
            AttemptAll::Busy => Ok(None),
            AttemptAll::Queued(waiter, grant) => {
                let until = until.expect("queued only when waiting");
                let table = Arc::clone(&self.table);
                let ticket = GroupTicket::new(table, self.id, keys, waiter, grant);
                match ticket.wait(until).await {
                    WaitedAll::Granted(tokens) => Ok(grants(tokens)),
                    WaitedAll::TimedOut => Ok(None),
                    WaitedAll::SessionGone => Err(session_gone()),
                }
            }
            AttemptAll::SessionGone => Err(session_gone()),
            AttemptAll::AlreadyHeld | AttemptAll::QueueFull | AttemptAll::NoTokens => {
                Err(Error::store(
                    "the memory store refused a request the core never makes; this is a bug",
                ))
            }
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let released = lock(&self.table).release(self.id, &held.key, Some(held.token));
        release_outcome(released, &held.key)
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
