//! The session's background work: renewal every third of the TTL, and the
//! end of holds at `max_hold`.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::{HeldEntry, SessionInner};
use crate::backoff::Backoff;
use crate::error::ErrorKind;
use crate::store::lock;
use crate::store::HeldLock;

pub(super) async fn expire_at_max_hold(
    session: Weak<SessionInner>,
    entry: Arc<HeldEntry>,
    until: Instant,
) {
    tokio::select! {
        () = sleep_until(until) => {}
        () = entry.lost.cancelled() => return,
    }
    if let Some(session) = session.upgrade() {
        tracing::info!(key = %entry.lock.key, "max_hold reached: releasing the lock");
        session.drop_lost(&entry).await;
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Renews the session every third of its TTL. The lease deadline only moves
/// forward to `send time + TTL − drift` of a renewal that succeeded, so the
/// client always gives up a lock before the store can.
pub(super) async fn renew_loop(session: Weak<SessionInner>, ended: CancellationToken) {
    let Some(ttl) = session.upgrade().map(|s| s.config.ttl) else {
        return;
    };
    let every = ttl / 3;
    let retry_after = (ttl / 10).max(Duration::from_millis(10));
    let mut next = Instant::now() + every;
    loop {
        let (deadline, store) = match session.upgrade() {
            Some(session) => (*session.lease.borrow(), Arc::clone(&session.store)),
            None => return,
        };
        tokio::select! {
            () = ended.cancelled() => return,
            () = sleep_until(next) => {}
            // The store says a hold ended: the renewal finds which.
            () = store.renewal_wanted() => {}
            () = sleep_until_some(deadline) => {
                if let Some(session) = session.upgrade() {
                    session.lose(format!("no renewal succeeded within the {ttl:?} lease"));
                }
                return;
            }
        }
        let Some(session) = session.upgrade() else {
            return;
        };
        #[cfg(feature = "test-hooks")]
        if session.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            next = Instant::now() + every;
            continue;
        }
        let held: Vec<HeldLock> = lock(&session.held)
            .values()
            .map(|entry| entry.lock.clone())
            .collect();
        let sent = Instant::now();
        let renewed = tokio::select! {
            renewed = session.store.renew(&held) => renewed,
            () = ended.cancelled() => return,
            () = sleep_until_some(deadline) => {
                session.lose(format!("renewal did not answer within the {ttl:?} lease"));
                return;
            }
        };
        match renewed {
            Ok(report) => {
                if let Some(until) = session.lease_from(sent) {
                    // Each lock this renewal covered first, then the session,
                    // whose watchers then see both.
                    let current = lock(&session.held);
                    for renewed in &held {
                        let entry = current.get(&renewed.key);
                        if let Some(entry) = entry.filter(|e| e.lock.token == renewed.token) {
                            entry.set_renewed_until(until);
                        }
                    }
                    drop(current);
                    session.lease.send_replace(Some(until));
                }
                next = sent + every;
                for key in report.lost_keys {
                    // Only the grant the renewal was about: the key may have
                    // been released and taken again since the snapshot.
                    let renewed_token = held.iter().find(|l| l.key == key).map(|l| l.token);
                    let entry = lock(&session.held)
                        .get(&key)
                        .filter(|entry| Some(entry.lock.token) == renewed_token)
                        .cloned();
                    if let Some(entry) = entry {
                        tracing::warn!(%key, "the store says this lock is gone");
                        // In a task: giving it back waits for the key's gate,
                        // and renewal must never wait behind an acquire.
                        entry.lost.cancel();
                        let session = Arc::clone(&session);
                        tokio::spawn(async move { session.drop_lost(&entry).await });
                    }
                }
            }
            Err(err) if err.kind() == ErrorKind::Lost => {
                session.lose(err.to_string());
                return;
            }
            Err(err) => {
                tracing::warn!(store = session.caps.name, "renewal failed, retrying: {err}");
                next = Instant::now() + retry_after;
            }
        }
    }
}

/// Asks the store again and again to release a lock whose release failed,
/// until it answers or the session ends. Holds the key's gate meanwhile.
pub(super) async fn retry_release(
    session: Weak<SessionInner>,
    lock: HeldLock,
    gate: tokio::sync::OwnedMutexGuard<Option<super::Hold>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(backoff.next_delay()).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        if session.ended.is_cancelled() {
            return;
        }
        match session.store.release(&lock).await {
            Ok(()) => break,
            Err(err) if err.kind() == ErrorKind::NotHeld => break,
            Err(err) => tracing::debug!(key = %lock.key, "release retry: {err}"),
        }
    }
    let mutex = Arc::clone(tokio::sync::OwnedMutexGuard::mutex(&gate));
    drop(gate);
    if let Some(session) = session.upgrade() {
        session.tidy_gate(&lock.key, &mutex);
    }
}
