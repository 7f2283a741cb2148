//! An attempt's entry taken out of its queue, in the background, when the
//! attempt is dropped or fails before it is done.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distlock_core::store::spawn_cleanup;
use distlock_core::Result;

use crate::wire::{expecting, Nats, Published};

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

/// Takes the entry on `subject` out. When its sequence is not known (its
/// publish was never answered) the publish may still land: a tombstone
/// takes the subject first, and the publish, which expects an empty
/// subject, is then refused; or the entry is found there and deleted.
async fn take_out(nats: &Nats, subject: &str, seq: Option<u64>) -> Result<()> {
    let seq = match seq {
        Some(seq) => seq,
        None => {
            let tombstone = expecting(0, Some(TOMBSTONE_TTL_SECS));
            match nats
                .publish(subject.to_owned(), tombstone, Bytes::new())
                .await?
            {
                Published::At(_) => return Ok(()),
                Published::WrongLast => match nats.leader_last(subject).await? {
                    Some(there) => there.sequence,
                    None => return Ok(()),
                },
            }
        }
    };
    nats.remove_entry(subject, seq).await?;
    Ok(())
}
