//! The notices of the session's own entries, watched by one consumer per
//! session: when someone else deletes a held entry (a forced
//! release), the core is asked to renew at once, and the renewal reports
//! the key lost. The periodic renewal checks every held entry in any case;
//! the watch only makes the news come sooner.
//!
//! The session's own expiry is not watched: the client gives its locks up
//! at its own lease deadline, before the server can expire the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy};
use distlock_core::store::{lock, spawn_cleanup, Backoff};
use futures::StreamExt;
use tokio::sync::Notify;

use super::HeldEntry;
use crate::client::Nats;
use crate::wire::{self, STREAM};

/// The session's side: woken by the task, which ends when this is dropped.
pub(super) struct HoldsWatch {
    wanted: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldsWatch {
    /// Watches the notices of `session`'s entries from sequence `from` on;
    /// wakes when one names an entry in `held`.
    pub(super) fn start(
        nats: Arc<Nats>,
        session: &str,
        from: u64,
        held: Arc<Mutex<HashMap<String, HeldEntry>>>,
    ) -> Self {
        let wanted = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            nats,
            format!("distlock.g.*.{session}.*"),
            from,
            held,
            Arc::clone(&wanted),
        ));
        HoldsWatch { wanted, task }
    }

    /// Resolves once a held entry was deleted by someone else.
    pub(super) async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Stops watching: the session is over.
    pub(super) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for HoldsWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often the consumer says it is there when it has nothing to say;
/// missing three in a row, it is made again.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// A consumer deleted when its watch ends (the task's future dropped).
struct Consumer {
    js: async_nats::jetstream::Context,
    name: String,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), std::mem::take(&mut self.name));
        spawn_cleanup(async move {
            if let Err(err) = js.delete_consumer_from_stream(&name, STREAM).await {
                tracing::debug!(name, "deleting a holds watch: {err}");
            }
        });
    }
}

/// Reads the notices for ever, making the consumer again (from the first
/// notice not yet read) when it is lost, as with a restart of the server.
async fn run(
    nats: Arc<Nats>,
    filter: String,
    mut from: u64,
    held: Arc<Mutex<HashMap<String, HeldEntry>>>,
    wanted: Arc<Notify>,
) {
    let fresh = || Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut backoff = fresh();
    let mut disconnects = nats.disconnects.subscribe();
    loop {
        disconnects.mark_unchanged();
        match watch(&nats, &filter, from).await {
            Ok((mut messages, _consumer)) => {
                // Until the heartbeats stop, or the connection is lost (the
                // server may come back without the consumer).
                while let Some(Ok(Some(message))) = tokio::select! {
                    message = tokio::time::timeout(HEARTBEAT * 3, messages.next()) => Some(message),
                    _ = disconnects.changed() => None,
                } {
                    backoff = fresh();
                    if message.status.is_some() {
                        // A heartbeat.
                        continue;
                    }
                    if let Some(seq) = stream_sequence(&message) {
                        from = seq + 1;
                    }
                    let noticed = message.headers.as_ref().and_then(wire::noticed);
                    let mine = noticed
                        .is_some_and(|seq| lock(&held).values().any(|entry| entry.seq == seq));
                    if mine {
                        tracing::debug!(seq = noticed, "a held entry was deleted by someone else");
                        wanted.notify_one();
                    }
                }
            }
            Err(err) => tracing::debug!("the holds watch: {err}"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// A consumer of the notices on `filter` from sequence `from` on, and its
/// messages.
async fn watch(
    nats: &Nats,
    filter: &str,
    from: u64,
) -> distlock_core::Result<(async_nats::Subscriber, Consumer)> {
    let inbox = nats.client.new_inbox();
    // Subscribed before the consumer exists, so nothing it pushes is lost.
    let messages = nats
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|err| nats.failed("a subscribe", err))?;
    let name = format!("distlock-holds-{:016x}", rand::random::<u64>());
    let config = push::Config {
        deliver_subject: inbox,
        name: Some(name.clone()),
        filter_subject: filter.to_owned(),
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
        ack_policy: AckPolicy::None,
        headers_only: true,
        memory_storage: true,
        num_replicas: 1,
        idle_heartbeat: HEARTBEAT,
        inactive_threshold: Duration::from_secs(10),
        ..Default::default()
    };
    let made = nats.create_consumer("a holds watch", config).await?;
    let consumer = Consumer {
        js: nats.js.clone(),
        name,
    };
    if !made {
        return Err(distlock_core::Error::unavailable(
            "the connection was lost while the holds watch was made",
        ));
    }
    Ok((messages, consumer))
}

/// The stream sequence of a pushed message, from its reply subject:
/// `$JS.ACK.STREAM.CONSUMER.DELIVERED.SEQ.…`, or with a domain and an
/// account first, `$JS.ACK.DOMAIN.ACCOUNT.STREAM.CONSUMER.DELIVERED.SEQ.…`.
fn stream_sequence(message: &async_nats::Message) -> Option<u64> {
    let reply = message.reply.as_ref()?;
    let tokens: Vec<&str> = reply.as_str().split('.').collect();
    let at = if tokens.len() == 9 { 5 } else { 7 };
    tokens.get(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(reply: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "inbox".into(),
            reply: Some(reply.into()),
            payload: bytes::Bytes::new(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn the_stream_sequence_comes_from_either_form_of_reply() {
        let short = pushed("$JS.ACK.DISTLOCK.holds.1.42.1.1733450000000000000.0");
        assert_eq!(stream_sequence(&short), Some(42));
        let long = pushed("$JS.ACK.hub.ACCHASH.DISTLOCK.holds.1.43.1.1733450000000000000.0.x");
        assert_eq!(stream_sequence(&long), Some(43));
        assert_eq!(stream_sequence(&pushed("_INBOX.x")), None);
    }
}
