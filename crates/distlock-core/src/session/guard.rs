//! [`Guard`]: proof that a session holds a lock.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::time::{sleep_until, Instant};

use super::{HeldEntry, SessionInner};
use crate::error::Result;
use crate::store::Mode;

/// Proof of holding a lock.
///
/// Write [`token`](Guard::token) alongside every change the lock protects,
/// and race your work against [`lost`](Guard::lost).
///
/// # Drop
///
/// Dropping a guard without [`release`](Guard::release) gives up its hold in
/// the background (on the current tokio runtime); the lock is released when
/// the last reentrant guard of the key goes. Prefer `release().await`, which
/// reports whether the lock was still held.
#[must_use = "dropping a guard releases the lock"]
pub struct Guard {
    session: Arc<SessionInner>,
    entry: Arc<HeldEntry>,
    released: bool,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("key", &self.entry.lock.key)
            .field("mode", &self.entry.lock.mode)
            .field("token", &self.entry.lock.token)
            .field("held", &self.is_held())
            .finish()
    }
}

impl Guard {
    pub(crate) fn new(session: Arc<SessionInner>, entry: Arc<HeldEntry>) -> Self {
        Guard {
            session,
            entry,
            released: false,
        }
    }

    /// The fencing token: strictly greater than the token of every earlier
    /// grant of this key, in every mode. Reentrant guards share it.
    pub fn token(&self) -> u64 {
        self.entry.lock.token
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.entry.lock.key
    }

    /// The mode it is held in.
    pub fn mode(&self) -> Mode {
        self.entry.lock.mode
    }

    /// Whether the lock is still held: not lost, not past its lease (as
    /// measured from the send time of the last renewal that succeeded) and
    /// not past `max_hold`.
    pub fn is_held(&self) -> bool {
        self.session.is_held(&self.entry)
    }

    /// Until when the lock is certainly held unless renewed, by this
    /// process's monotonic clock; `None` where the store has no lease.
    pub fn expires_at(&self) -> Option<Instant> {
        self.session.deadline_of(&self.entry)
    }

    /// Resolves when the lock is lost: its lease ran out without a renewal,
    /// the store said it is gone, `max_hold` passed, or the session ended.
    /// It resolves before the store could grant the key to anyone else.
    /// Cancel safe; resolves at once if the lock is already lost.
    pub async fn lost(&self) {
        wait_lost(&self.session, &self.entry).await;
    }

    /// [`lost`](Guard::lost) as a future that owns what it needs, for a
    /// task or thread of its own while the guard stays where it is (to be
    /// released there). It keeps the session alive until it resolves; a
    /// release resolves it.
    pub fn lost_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        let session = Arc::clone(&self.session);
        let entry = Arc::clone(&self.entry);
        async move { wait_lost(&session, &entry).await }
    }

    /// Gives up this hold; the last hold of the key releases it at the store.
    /// `NotHeld` if the lock was lost first (it was then never released on
    /// anyone else's behalf: releases are owner-checked).
    ///
    /// Cancel safe: if this future is dropped before it finishes, the guard's
    /// `Drop` finishes the release in the background.
    pub async fn release(mut self) -> Result<()> {
        let result = self.session.release_hold(&self.entry).await;
        self.released = true;
        result
    }
}

/// Resolves when `entry` is no longer held by `session`: see [`Guard::lost`].
async fn wait_lost(session: &SessionInner, entry: &HeldEntry) {
    let mut lease = session.subscribe_lease();
    loop {
        if !session.is_held(entry) {
            return;
        }
        let deadline = session.deadline_of(entry);
        tokio::select! {
            () = entry.lost.cancelled() => return,
            () = async {
                match deadline {
                    Some(deadline) => sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {}
            // The sender lives in the session, which the caller keeps
            // alive, so this only ever reports a new deadline.
            _ = lease.changed() => {}
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.released || self.session.ended.is_cancelled() {
            return;
        }
        let session = Arc::clone(&self.session);
        let entry = Arc::clone(&self.entry);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = session.release_hold(&entry).await {
                        tracing::debug!(key = %entry.lock.key, "background release: {err}");
                    }
                });
            }
            Err(_) => tracing::warn!(
                key = %self.entry.lock.key,
                "guard dropped outside a tokio runtime; the lock is held until the session ends"
            ),
        }
    }
}
