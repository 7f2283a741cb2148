//! Pushed changes of a key of the lease table, for observers
//! (`LockStore::watch_key`): the observer's record in `distlock_waiters`
//! makes each release notify `distlock_released` and each grant
//! `distlock_changed`; the store's listening connection signals the watch.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::{KeyWatch, KeyWatcher};
use distlock_core::{Error, Result};

use crate::connect::query_error;
use crate::lease::{forget_waiter, Leases};

/// How long an observer's record lasts unless made again: how long a
/// killed observer makes releases and grants of its key notify.
const RECORD_FOR: Duration = Duration::from_secs(10);

/// How often a live observer makes its record again.
const RECORD_EVERY: Duration = Duration::from_secs(3);

const OBSERVE: &str = "SELECT distlock_observe_v1($1, $2, $3)";

/// A watch of `key`: signalled after each grant and release of it (not an
/// expiry, which no statement makes). Its record is made before this
/// answers, so a change committed after is signalled; kept until the
/// watch is dropped, then removed. The watch ends (the observer then asks
/// for a new one) when the store's listening connection breaks, or the
/// record cannot be made again; an error while that connection is down.
pub(crate) async fn watch_key(leases: &Arc<Leases>, key: &str) -> Result<KeyWatch> {
    let (signals, watch) = KeyWatcher::new();
    let observer = format!("observe|{:016x}", rand::random::<u64>());
    let mut listening = leases.listeners().listening();
    // Listed before the record is made: nothing its making shows is missed.
    if !leases.listeners().observe(key, &observer, signals.clone()) {
        return Err(Error::unavailable(format!(
            "PostgreSQL at {}: the store's listening connection is down, so changes \
             cannot be pushed now; polling",
            leases.target()
        )));
    }
    let observing = Observing {
        leases: Arc::clone(leases),
        key: key.to_owned(),
        observer,
    };
    observing.record().await?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = signals.closed() => return,
                () = async { drop(listening.wait_for(|up| !up).await) } => return,
                () = tokio::time::sleep(RECORD_EVERY) => match observing.record().await {
                    Ok(true) => {}
                    // It had lapsed (this task was late): a change since
                    // may not have been notified.
                    Ok(false) => {
                        signals.signal();
                    }
                    Err(err) => {
                        tracing::debug!(key = %observing.key, "observing ends: {err}");
                        return;
                    }
                },
            }
        }
    });
    Ok(watch)
}

/// An observer's record and listing, removed when dropped.
struct Observing {
    leases: Arc<Leases>,
    key: String,
    observer: String,
}

impl Observing {
    /// Makes the record (again); whether it was there, unlapsed.
    async fn record(&self) -> Result<bool> {
        let client = self.leases.client().await?;
        let ttl = i64::try_from(RECORD_FOR.as_millis()).unwrap_or(i64::MAX);
        let row = client
            .query_one(OBSERVE, &[&self.key, &self.observer, &ttl])
            .await
            .map_err(|err| query_error(self.leases.target(), err))?;
        Ok(row.get(0))
    }
}

impl Drop for Observing {
    fn drop(&mut self) {
        // Unlisted at once: the watch's channel closes with its last sender.
        self.leases.listeners().unobserve(&self.key, &self.observer);
        let (key, observer) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.observer),
        );
        forget_waiter(&self.leases, key, observer);
    }
}
