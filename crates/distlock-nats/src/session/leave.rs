//! An attempt's entry taken out of its queue, in the background, when the
//! attempt is dropped or fails before it is done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distlock_core::store::spawn_cleanup;
use distlock_core::{Error, Result};

use crate::client::{Nats, Published};
use crate::wire::{expecting, MODE};

/// How long the tombstone of an attempt whose publish was never answered
/// keeps its subject: longer than that publish can still be on its way (a
/// client holds what it publishes while it reconnects).
const TOMBSTONE_TTL_SECS: u64 = 600;

/// Takes an attempt's entry out of its queue when dropped armed. Only that
/// entry: its subject is the attempt's own, and it is deleted by sequence.
/// A failed call is tried again for a while (NATS may be restarting); an
/// entry left behind counts no more once its session ends.
pub(super) struct Leave {
    pub(super) nats: Arc<Nats>,
    pub(super) subject: String,
    /// The entry's sequence, once known.
    pub(super) seq: Option<u64>,
    pub(super) frozen: Arc<AtomicBool>,
    pub(super) armed: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed || self.frozen.load(Ordering::SeqCst) {
            return;
        }
        let (nats, subject, seq) = (
            Arc::clone(&self.nats),
            std::mem::take(&mut self.subject),
            self.seq,
        );
        spawn_cleanup(async move {
            for attempt in 0..30u64 {
                match take_out(&nats, &subject, seq).await {
                    Ok(()) => return,
                    Err(err) => tracing::debug!(subject, "taking out an entry: {err}"),
                }
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        });
    }
}

/// Takes the entry on `subject` out, once it is known where its publish
/// went.
async fn take_out(nats: &Nats, subject: &str, seq: Option<u64>) -> Result<()> {
    let seq = match seq {
        Some(seq) => Some(seq),
        None => settle(nats, subject).await?,
    };
    if let Some(seq) = seq {
        nats.remove_entry(subject, seq).await?;
    }
    Ok(())
}

/// Where a publish of an entry on `subject` whose answer never came went:
/// its sequence if it was stored; `None` if it was not, and now never will
/// be. A tombstone takes the subject first, and the publish, which expects
/// the subject empty, is then refused should it still land.
pub(super) async fn settle(nats: &Nats, subject: &str) -> Result<Option<u64>> {
    for _ in 0..3 {
        let tombstone = expecting(0, Some(TOMBSTONE_TTL_SECS));
        match nats
            .publish(subject.to_owned(), tombstone, Bytes::new())
            .await?
        {
            Published::At(_) => return Ok(None),
            // The entry (or an earlier tombstone) is there, or was.
            Published::WrongLast => {
                let there = nats.leader_last(subject).await?;
                return Ok(there
                    .filter(|message| message.headers.get(MODE).is_some())
                    .map(|message| message.sequence));
            }
            Published::Unknown => continue,
        }
    }
    Err(Error::unavailable(format!(
        "NATS at {}: the connection kept dropping while an entry was taken out",
        nats.servers
    )))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use distlock_testkit::servers;

    use super::*;
    use crate::wire::entry_subject;
    use crate::NatsStore;

    /// A retried take-out whose first tombstone was stored (its answer
    /// lost) finds that tombstone, and keeps it: it is not an entry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_take_out_keeps_its_own_tombstone() {
        let server = servers::Nats::start();
        let store = NatsStore::connect(&server.url()).await.expect("connect");
        let nats = &store.nats;
        let subject = entry_subject("h", "s", 1);
        let tombstone = expecting(0, Some(TOMBSTONE_TTL_SECS));
        let Published::At(seq) = nats
            .publish(subject.clone(), tombstone, Bytes::new())
            .await
            .expect("publish")
        else {
            panic!("not stored");
        };
        take_out(nats, &subject, None).await.expect("take out");
        assert!(nats.stored(seq, &subject).await.expect("read"), "deleted");
        // The late join publish, which expects the subject empty, is refused.
        let late = crate::wire::entry_headers("x", "");
        assert!(matches!(
            nats.publish(subject, late, Bytes::from("k")).await,
            Ok(Published::WrongLast)
        ));
    }
}
