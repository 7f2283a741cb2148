//! What the table can say about itself: `check`, `status`, counters.

use std::time::Duration;

use tokio::time::Instant;

use super::{LockTable, SessionId};
use crate::store::Mode;

/// One holder of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderStatus {
    /// The holding session.
    pub session: SessionId,
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
    pub session: SessionId,
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

impl LockTable {
    /// Whether `token` is the token of a current holder of `key` (Chubby's
    /// CheckSequencer): a resource can ask before it accepts a write.
    pub fn check(&mut self, key: &str, token: u64) -> bool {
        self.purge(Instant::now());
        self.keys
            .get(key)
            .is_some_and(|state| state.holders.iter().any(|h| h.token == token))
    }

    /// The keys that are held or waited for and start with `prefix` (all of
    /// them for `""`), sorted by key.
    pub fn status(&mut self, prefix: &str) -> Vec<KeyStatus> {
        let now = Instant::now();
        self.purge(now);
        let mut keys: Vec<KeyStatus> = self
            .keys
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, state)| KeyStatus {
                key: key.clone(),
                holders: state
                    .holders
                    .iter()
                    .map(|h| {
                        let lease = self.sessions.get(&h.session).map(|s| s.expires_at);
                        let ends = lease.into_iter().chain(h.until).min().unwrap_or(now);
                        HolderStatus {
                            session: h.session,
                            mode: h.mode,
                            token: h.token,
                            held_for: now - h.acquired_at,
                            lease_left: ends.saturating_duration_since(now),
                        }
                    })
                    .collect(),
                waiters: state
                    .queue
                    .iter()
                    .map(|w| WaiterStatus {
                        session: w.session,
                        mode: w.mode,
                        waiting_for: now - w.since,
                    })
                    .collect(),
                last_token: state.last_token,
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        keys
    }

    /// The counters, with the sizes counted now.
    pub fn counters(&mut self) -> Counters {
        self.purge(Instant::now());
        let (held, waiters) = self.keys.values().fold((0, 0), |(held, waiters), state| {
            (
                held + state.holders.len() as u64,
                waiters + state.queue.len() as u64,
            )
        });
        Counters {
            sessions: self.sessions.len() as u64,
            held,
            waiters,
            ..self.counters.clone()
        }
    }
}
