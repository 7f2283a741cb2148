//! Waiting for a pushed grant, cancel-safely.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};

use super::{LockTable, SessionId, WaiterId};

use crate::store::{lock, Mode};

/// A table behind the one mutex that guards it.
pub type SharedTable = Arc<Mutex<LockTable>>;

/// Locks the table. Every step of the table finishes without awaiting or
/// panicking half-way, so a poisoned lock still guards a consistent table.
pub fn lock_table(table: &Mutex<LockTable>) -> MutexGuard<'_, LockTable> {
    lock(table)
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// Granted, with this token.
    Granted(u64),
    /// `until` came first; the waiter has left the queue.
    TimedOut,
    /// The waiting session ended.
    SessionGone,
}

/// A request [`LockTable::acquire`] queued. Make it as soon as the request is
/// queued: dropping it at any point before [`Ticket::wait`] finishes — even
/// unpolled, inside a task aborted before it ran — takes the waiter out of
/// the queue, or gives back a grant that already came.
#[derive(Debug)]
pub struct Ticket {
    table: SharedTable,
    session: SessionId,
    key: String,
    id: WaiterId,
    grant: oneshot::Receiver<u64>,
    done: bool,
}

impl Ticket {
    /// The ticket of waiter `id` of `session` on `key`.
    pub fn new(
        table: SharedTable,
        session: SessionId,
        key: String,
        id: WaiterId,
        grant: oneshot::Receiver<u64>,
    ) -> Self {
        Ticket {
            table,
            session,
            key,
            id,
            grant,
            done: false,
        }
    }

    /// The key waited for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Waits for the grant until `until`. Cancel safe.
    pub async fn wait(mut self, until: Instant) -> Waited {
        loop {
            let next = lock_table(&self.table).next_event(self.session, &self.key);
            let wake = next.map_or(until, |next| next.min(until));
            tokio::select! {
                granted = &mut self.grant => {
                    self.done = true;
                    return match granted {
                        Ok(token) => Waited::Granted(token),
                        Err(_) => Waited::SessionGone,
                    };
                }
                () = sleep_until(wake) => {
                    if Instant::now() >= until {
                        // Leaving through Drop gives back a grant that raced in.
                        return Waited::TimedOut;
                    }
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut table = lock_table(&self.table);
        let granted = self.grant.try_recv().ok();
        table.abandon(self.session, &self.key, self.id, granted);
    }
}

/// How a multi-key wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitedAll {
    /// Every key granted: the tokens, in the order asked.
    Granted(Vec<u64>),
    /// `until` came first; the waiter has left every queue.
    TimedOut,
    /// The waiting session ended.
    SessionGone,
}

/// A multi-key request [`LockTable::acquire_all`] queued; as [`Ticket`]:
/// dropping it before [`GroupTicket::wait`] finishes takes the waiter out
/// of every queue, or gives back grants that already came.
#[derive(Debug)]
pub struct GroupTicket {
    table: SharedTable,
    session: SessionId,
    keys: Vec<(String, Mode)>,
    id: WaiterId,
    grant: oneshot::Receiver<Vec<u64>>,
    done: bool,
}

impl GroupTicket {
    /// The ticket of multi-key waiter `id` of `session` on `keys`.
    pub fn new(
        table: SharedTable,
        session: SessionId,
        keys: Vec<(String, Mode)>,
        id: WaiterId,
        grant: oneshot::Receiver<Vec<u64>>,
    ) -> Self {
        GroupTicket {
            table,
            session,
            keys,
            id,
            grant,
            done: false,
        }
    }

    /// Waits for the grants until `until`. Cancel safe.
    pub async fn wait(mut self, until: Instant) -> WaitedAll {
        loop {
            let next = lock_table(&self.table).next_event_all(self.session, &self.keys);
            let wake = next.map_or(until, |next| next.min(until));
            tokio::select! {
                granted = &mut self.grant => {
                    self.done = true;
                    return match granted {
                        Ok(tokens) => WaitedAll::Granted(tokens),
                        Err(_) => WaitedAll::SessionGone,
                    };
                }
                () = sleep_until(wake) => {
                    if Instant::now() >= until {
                        return WaitedAll::TimedOut;
                    }
                }
            }
        }
    }
}

impl Drop for GroupTicket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut table = lock_table(&self.table);
        let granted = self.grant.try_recv().ok();
        table.abandon_all(self.session, &self.keys, self.id, granted);
    }
}

impl LockTable {
    /// A waiter gave up (timeout or dropped future): it leaves the queue, or
    /// gives back the grant that raced with its leaving.
    pub fn abandon(&mut self, id: SessionId, key: &str, waiter: WaiterId, granted: Option<u64>) {
        let now = Instant::now();
        self.purge(now);
        if let Some(token) = granted {
            self.remove_holder(id, key, Some(token));
        } else if let Some(state) = self.keys.get_mut(key) {
            let queued = state.queue.len();
            state.queue.retain(|w| w.id != waiter);
            // Only if it was still queued: a resume may have withdrawn it,
            // and the session may wait for the key again since.
            if state.queue.len() < queued {
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.waiting.remove(key);
                }
            }
        }
        self.pump(key, now);
    }

    /// Runs expiries due now, grants what they free, and says when the
    /// waiter of `id` on `key` should look again: the earliest of the
    /// restart wait-out, the key's lock-delay, its holders' lease and
    /// `max_hold` ends, and the waiter's own lease end.
    pub fn next_event(&mut self, id: SessionId, key: &str) -> Option<Instant> {
        let now = Instant::now();
        self.purge(now);
        self.pump(key, now);
        let own = self.sessions.get(&id).map(|s| s.expires_at);
        let state = self.keys.get(key)?;
        let holders = state.holders.iter().flat_map(|h| {
            let lease = self.sessions.get(&h.session).map(|s| s.expires_at);
            lease.into_iter().chain(h.until)
        });
        let future = |until: Option<Instant>| until.filter(|until| *until > now);
        future(self.grants_blocked_until)
            .into_iter()
            .chain(future(state.blocked_until))
            .chain(holders)
            .chain(own)
            .min()
    }
}
