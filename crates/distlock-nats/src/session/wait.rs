//! A waiter's wait: an ephemeral consumer on the notices of what blocks it
//! and on the subjects of those entries' sessions, which the server pushes
//! to; no polling.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
use distlock_core::store::queue::{Blocker, WATCH_SLICE};
use distlock_core::store::spawn_cleanup;
use distlock_core::Result;
use futures::StreamExt;
use tokio::time::Instant;

use crate::client::Nats;
use crate::wire::{self, notice_filter, notice_subject, session_subject, Entry, STREAM};

/// How often a waiter's consumer says it lives while it has nothing to
/// push.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What a waiter waits for: the end of an entry it names, or of one of the
/// sessions.
pub(super) struct Watch {
    filters: Vec<String>,
    entries: HashSet<u64>,
    sessions: HashSet<String>,
}

impl Watch {
    /// For a request in lock `hash` blocked by `blocking` (the entry that
    /// blocks it, or every entry ahead of a semaphore that does not fit).
    pub(super) fn of(hash: &str, blocker: Blocker, blocking: &[&Entry]) -> Watch {
        let notices = match (blocker, blocking) {
            (Blocker::Entry(_), [entry]) => notice_subject(&entry.subject),
            _ => notice_filter(hash),
        };
        let sessions: BTreeSet<String> = blocking
            .iter()
            .map(|entry| session_subject(&entry.session))
            .collect();
        let mut filters = vec![notices];
        filters.extend(sessions.iter().cloned());
        Watch {
            filters,
            entries: blocking.iter().map(|entry| entry.seq).collect(),
            sessions: sessions.into_iter().collect(),
        }
    }

    /// Whether a message the consumer delivers means the wait is over.
    fn wakes(&self, message: &async_nats::Message) -> bool {
        let subject = message.subject.as_str();
        let Some(headers) = message.headers.as_ref() else {
            return false;
        };
        if self.sessions.contains(subject) {
            return !wire::session_is_live(headers);
        }
        wire::noticed(headers).is_some_and(|seq| self.entries.contains(&seq))
    }
}

/// Deletes a consumer once its wait is over, however it ended; the server
/// would in any case, once it has had no subscriber for a while.
struct Consumer {
    js: async_nats::jetstream::Context,
    name: String,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), std::mem::take(&mut self.name));
        spawn_cleanup(async move {
            if let Err(err) = js.delete_consumer_from_stream(&name, STREAM).await {
                tracing::debug!(name, "deleting a waiter's consumer: {err}");
            }
        });
    }
}

/// Waits until what `watch` names may have ended, or `until`, or the
/// connection was lost, or the consumer went silent (3 heartbeats missed:
/// its server stalled or died), or a slice of [`WATCH_SLICE`] (a notice can
/// be lost with its publisher). Messages from
/// sequence `after` on count: the queue was read after it was joined there,
/// so anything since may be news.
pub(super) async fn wait(nats: &Nats, watch: &Watch, after: u64, until: Instant) -> Result<()> {
    // A lost connection may mean a server that restarts without the
    // consumer.
    let mut disconnects = nats.disconnects.subscribe();
    let inbox = nats.client.new_inbox();
    // Subscribed before the consumer exists, so nothing it pushes is lost.
    let mut messages = nats
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|err| nats.failed("a subscribe", err))?;
    let name = format!("distlock-wait-{:016x}", rand::random::<u64>());
    let config = push::Config {
        deliver_subject: inbox,
        name: Some(name.clone()),
        filter_subjects: watch.filters.clone(),
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        },
        ack_policy: AckPolicy::None,
        headers_only: true,
        memory_storage: true,
        num_replicas: 1,
        inactive_threshold: Duration::from_secs(10),
        // A consumer whose server stalls or dies goes silent: its heartbeats
        // stop, and the waiter reads the queue again (with a new consumer)
        // instead of waiting out the slice.
        idle_heartbeat: HEARTBEAT,
        ..Default::default()
    };
    let made = nats.create_consumer("a watch", config).await?;
    let _consumer = Consumer {
        js: nats.js.clone(),
        name,
    };
    if !made {
        // The connection was lost: the queue is read again, and a new
        // consumer made, once it is back.
        return Ok(());
    }
    let ended = async {
        loop {
            tokio::select! {
                message = tokio::time::timeout(HEARTBEAT * 3, messages.next()) => match message {
                    Ok(Some(message)) if watch.wakes(&message) => return,
                    // A heartbeat, or news of something else.
                    Ok(Some(_)) => {}
                    // Closed, or three heartbeats missed.
                    Ok(None) | Err(_) => return,
                },
                _ = disconnects.changed() => return,
            }
        }
    };
    let slice_end = until.min(Instant::now() + WATCH_SLICE);
    let _ = tokio::time::timeout_at(slice_end, ended).await;
    Ok(())
}
