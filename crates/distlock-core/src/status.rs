//! Who holds and who waits, as a store that can tell reports it (today the
//! distlock server, through `RemoteStore::status`).

use std::time::Duration;

use crate::store::Mode;

/// One holder of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderStatus {
    /// The holding session.
    pub session: u64,
    /// The mode it holds.
    pub mode: Mode,
    /// Its fencing token.
    pub token: u64,
    /// How long it has held the key.
    pub held_for: Duration,
    /// How long until its lease (or `max_hold`) ends unless renewed.
    pub lease_left: Duration,
}

/// One waiter of a key, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterStatus {
    /// The waiting session.
    pub session: u64,
    /// The mode it wants.
    pub mode: Mode,
    /// How long it has waited.
    pub waiting_for: Duration,
}

/// A key's holders and waiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The key.
    pub key: String,
    /// Its holders.
    pub holders: Vec<HolderStatus>,
    /// Its waiters, first first.
    pub waiters: Vec<WaiterStatus>,
    /// The last token granted for it.
    pub last_token: u64,
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
}

/// The keys asked about, and the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The keys held or waited for, sorted by key.
    pub keys: Vec<KeyStatus>,
    /// Totals and sizes of the whole server.
    pub counters: Counters,
}
