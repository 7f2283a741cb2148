//! Waiting for a pushed grant, cancel-safely.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};

use super::{LockTable, SessionId, WaiterId};

/// A table behind the one mutex that guards it.
pub type SharedTable = Arc<Mutex<LockTable>>;

/// Locks the table. Every step of the table finishes without awaiting or
/// panicking half-way, so a poisoned lock still guards a consistent table.
pub fn lock_table(table: &Mutex<LockTable>) -> MutexGuard<'_, LockTable> {
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// A queued waiter; dropping it before the grant arrives leaves the queue
/// (or gives back a grant that raced with the drop).
struct Ticket<'a> {
    table: &'a Mutex<LockTable>,
    session: SessionId,
    key: &'a str,
    id: WaiterId,
    grant: oneshot::Receiver<u64>,
    done: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut table = lock_table(self.table);
        let granted = self.grant.try_recv().is_ok();
        table.abandon(self.session, self.key, self.id, granted);
    }
}

/// Waits for the grant of a request that [`LockTable::acquire`] queued,
/// until `until`. Cancel safe: dropping the future leaves no waiter and no
/// holder behind.
pub async fn wait_for_grant(
    table: &Mutex<LockTable>,
    session: SessionId,
    key: &str,
    id: WaiterId,
    grant: oneshot::Receiver<u64>,
    until: Instant,
) -> Waited {
    let mut ticket = Ticket {
        table,
        session,
        key,
        id,
        grant,
        done: false,
    };
    loop {
        let next = lock_table(table).next_event(session, key);
        let wake = next.map_or(until, |next| next.min(until));
        tokio::select! {
            granted = &mut ticket.grant => {
                ticket.done = true;
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
