//! Who holds and who waits, in the same shape on every store that can tell
//! ([`LockStore::status`](crate::store::LockStore::status)). A field a store
//! cannot know is `None` or empty, never made up.

use std::time::Duration;

use crate::store::Mode;

/// Which keys a status asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusQuery {
    /// This key exactly.
    Key(String),
    /// Every key that starts with this (every key for `""`).
    Prefix(String),
}

impl StatusQuery {
    /// Whether `key` is asked about.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            StatusQuery::Key(wanted) => key == wanted,
            StatusQuery::Prefix(prefix) => key.starts_with(prefix.as_str()),
        }
    }
}

/// One holder of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderStatus {
    /// The holding session, as the store names it (empty if it does not).
    pub session: String,
    /// Who the session says it is (`SessionBuilder::owner`); empty where
    /// the store keeps no value with a hold.
    pub owner: String,
    /// The mode it holds.
    pub mode: Mode,
    /// Its fencing token, where the store keeps it.
    pub token: Option<u64>,
    /// How long it has held the key, where the store knows.
    pub held_for: Option<Duration>,
    /// How long until its lease (or `max_hold`) ends unless renewed; `None`
    /// where a hold has no lease (it lasts as long as its connection or
    /// process).
    pub lease_left: Option<Duration>,
}

/// One waiter of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterStatus {
    /// The waiting session, as the store names it (empty if it does not).
    pub session: String,
    /// Who the session says it is; empty where the store keeps none.
    pub owner: String,
    /// The mode it wants.
    pub mode: Mode,
    /// How long it has waited, where the store knows.
    pub waiting_for: Option<Duration>,
}

/// A key's holders and waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The key.
    pub key: String,
    /// Its holders.
    pub holders: Vec<HolderStatus>,
    /// Its waiters: in queue order where the store queues them
    /// ([`Capabilities::fair`](crate::store::Capabilities::fair)).
    pub waiters: Vec<WaiterStatus>,
    /// The last token granted for it, where the store keeps one per key.
    pub last_token: Option<u64>,
}

/// Totals since the table was made, and sizes now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Sessions open now.
    pub sessions: u64,
    /// Holds now (a semaphore or shared key counts each holder).
    pub held: u64,
    /// Queued requests now.
    pub waiters: u64,
    /// Sessions ever opened.
    pub sessions_opened: u64,
    /// Sessions ended by an expired lease.
    pub sessions_expired: u64,
    /// Holds ended by `max_hold`.
    pub holds_expired: u64,
    /// Grants ever made.
    pub grants: u64,
    /// Releases ever made.
    pub releases: u64,
    /// Forced releases that ended at least one hold.
    pub forced_releases: u64,
}

/// The keys asked about, and the counters of a store that keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The keys held or waited for, sorted by key.
    pub keys: Vec<KeyStatus>,
    /// Totals and sizes of the whole store (the distlock server, the
    /// memory store); `None` elsewhere.
    pub counters: Option<Counters>,
}
