//! The queue keys a session holds, watched on one stream of its own: when
//! someone else deletes one (a forced release), the core is asked to renew
//! at once, and the renewal's read reports the key lost.
//!
//! The session's key layout (`distlock/NAME/LEASE-SLOT`) has no prefix of
//! its own to watch, so each held key gets a watch of its own on the shared
//! stream. A grant or a release only queues a message for the stream's task:
//! no round trip is added to either. A watch starts [`WATCH_AFTER`] after
//! its grant, from the revision the grant was read at (so no deletion in
//! between is missed): a hold released sooner costs etcd no watch at all.
//! The periodic renewal reads every held key in any case; the watch only
//! makes the news come sooner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::Backoff;
use etcd_client::{Client, EventType, WatchFilterType, WatchOptions, WatchStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::CALL_TIMEOUT;

/// How long a hold lasts before its watch starts: the holds a forced
/// release is for (stuck ones) last longer, and most others end sooner.
const WATCH_AFTER: Duration = Duration::from_secs(1);

/// What the session tells the stream's task.
enum Change {
    /// `key` was found held at revision `from - 1`: watch for its deletion
    /// from `from` on.
    Watch { key: String, from: i64 },
    /// The session releases `key`, or knows it lost it: its deletion is no
    /// news.
    Unwatch { key: String },
}

/// The session's side: tells the task what it holds, and is woken by it.
pub(super) struct HeldWatch {
    changes: mpsc::UnboundedSender<Change>,
    wanted: Arc<Notify>,
}

impl HeldWatch {
    /// Starts the task; it ends when this is dropped.
    pub(super) fn start(client: Client) -> Self {
        let (changes, received) = mpsc::unbounded_channel();
        let wanted = Arc::new(Notify::new());
        let task = Task {
            client,
            wanted: Arc::clone(&wanted),
            watched: HashMap::new(),
            keys: HashMap::new(),
            pending: HashMap::new(),
            next_id: 1,
        };
        tokio::spawn(task.run(received));
        HeldWatch { changes, wanted }
    }

    /// `key` is held, as read at revision `read_at`.
    pub(super) fn watch(&self, key: &str, read_at: i64) {
        // Revision 0 is "now": a header without a revision is not expected.
        let from = if read_at > 0 { read_at + 1 } else { 0 };
        let _ = self.changes.send(Change::Watch {
            key: key.to_owned(),
            from,
        });
    }

    /// `key` is no longer held by this session's own doing.
    pub(super) fn unwatch(&self, key: &str) {
        let _ = self.changes.send(Change::Unwatch {
            key: key.to_owned(),
        });
    }

    /// Resolves once a held key was deleted by someone else (or a watch was
    /// cut short): time to renew and read them all.
    pub(super) async fn wanted(&self) {
        self.wanted.notified().await;
    }
}

/// One held key's watch: its id on the stream (chosen here, so that a
/// cancel needs no answer first) and the revision it watches from.
struct Watched {
    id: i64,
    from: i64,
}

struct Task {
    client: Client,
    wanted: Arc<Notify>,
    /// By queue key.
    watched: HashMap<String, Watched>,
    /// Queue key by watch id.
    keys: HashMap<i64, String>,
    /// Holds whose watch is still to start: when, and from which revision.
    pending: HashMap<String, (Instant, i64)>,
    next_id: i64,
}

fn options(watched: &Watched) -> WatchOptions {
    WatchOptions::new()
        .with_filters([WatchFilterType::NoPut])
        .with_start_revision(watched.from)
        .with_watch_id(watched.id)
}

impl Task {
    async fn run(mut self, mut changes: mpsc::UnboundedReceiver<Change>) {
        let mut stream: Option<WatchStream> = None;
        let mut backoff = fresh_backoff();
        let mut reopen_at = Instant::now();
        loop {
            if stream.is_none() && !self.watched.is_empty() && Instant::now() >= reopen_at {
                stream = self.open().await;
                if stream.is_none() {
                    reopen_at = Instant::now() + backoff.next_delay();
                }
            }
            let closed = stream.is_none();
            let next_due = self.pending.values().map(|(due, _)| *due).min();
            tokio::select! {
                // Changes first: a release's unwatch is queued before its
                // delete is sent, so it is seen before the delete's event.
                biased;
                change = changes.recv() => match change {
                    Some(change) => {
                        if !self.apply(change, stream.as_mut()).await {
                            stream = None;
                        }
                    }
                    // The session is gone.
                    None => return,
                },
                message = next_message(stream.as_mut()) => {
                    if self.received(message, stream.as_mut()).await {
                        // Only a stream that serves resets the pause: one
                        // whose watches etcd refuses is opened less and less.
                        backoff = fresh_backoff();
                    } else {
                        stream = None;
                        reopen_at = Instant::now() + backoff.next_delay();
                    }
                }
                () = tokio::time::sleep_until(reopen_at), if closed && !self.watched.is_empty() => {}
                () = sleep_until_due(next_due) => {
                    let now = Instant::now();
                    let due: Vec<String> = self
                        .pending
                        .iter()
                        .filter(|(_, (at, _))| *at <= now)
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in due {
                        let Some((_, from)) = self.pending.remove(&key) else {
                            continue;
                        };
                        if !self.start(key, from, stream.as_mut()).await {
                            stream = None;
                        }
                    }
                }
            }
        }
    }

    /// A new stream with every held key's watch on it; `None` if etcd did
    /// not answer (a later try starts each watch from its own revision, so
    /// no deletion meanwhile is missed).
    async fn open(&self) -> Option<WatchStream> {
        let mut all = self.watched.iter();
        let (key, first) = all.next()?;
        let mut client = self.client.clone();
        let opened = tokio::time::timeout(
            CALL_TIMEOUT,
            client.watch(key.as_str(), Some(options(first))),
        );
        let mut stream = match opened.await {
            Ok(Ok(stream)) => stream,
            _ => return None,
        };
        for (key, watched) in all {
            stream
                .watch(key.as_str(), Some(options(watched)))
                .await
                .ok()?;
        }
        Some(stream)
    }

    /// Applies a change; `false` if the stream broke.
    async fn apply(&mut self, change: Change, stream: Option<&mut WatchStream>) -> bool {
        match change {
            Change::Watch { key, from } => {
                self.pending
                    .insert(key, (Instant::now() + WATCH_AFTER, from));
                true
            }
            Change::Unwatch { key } => {
                if self.pending.remove(&key).is_some() {
                    return true;
                }
                let Some(watched) = self.watched.remove(&key) else {
                    return true;
                };
                self.keys.remove(&watched.id);
                match stream {
                    Some(stream) => stream.cancel(watched.id).await.is_ok(),
                    None => true,
                }
            }
        }
    }

    /// Starts watching `key` from revision `from`; `false` if the stream
    /// broke.
    async fn start(&mut self, key: String, from: i64, stream: Option<&mut WatchStream>) -> bool {
        let id = self.next_id;
        self.next_id += 1;
        let watched = Watched { id, from };
        let request = options(&watched);
        self.keys.insert(id, key.clone());
        let old = self.watched.insert(key.clone(), watched);
        let Some(stream) = stream else {
            // Created when the stream opens.
            return true;
        };
        if let Some(old) = old {
            self.keys.remove(&old.id);
            if stream.cancel(old.id).await.is_err() {
                return false;
            }
        }
        stream.watch(key, Some(request)).await.is_ok()
    }

    /// Handles what the stream sent; `false` if it must be opened again.
    async fn received(
        &mut self,
        message: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
        stream: Option<&mut WatchStream>,
    ) -> bool {
        let Some(stream) = stream else {
            return false;
        };
        let message = match message {
            Ok(Some(message)) => message,
            // Broken (etcd restarting?): opened again after a pause.
            Ok(None) | Err(_) => return false,
        };
        let Some(key) = self.keys.get(&message.watch_id()).cloned() else {
            // A watch already given up (its cancel crossed this event).
            return true;
        };
        if message.canceled() {
            // Compacted past its start, or refused (no leader): the renewal
            // reads the key now, and the watch starts again from what etcd
            // still has, on a new stream.
            if let Some(watched) = self.watched.get_mut(&key) {
                watched.from = watched.from.max(message.compact_revision());
            }
            self.wanted.notify_one();
            return false;
        }
        let deleted = message
            .events()
            .iter()
            .any(|event| event.event_type() == EventType::Delete);
        if deleted {
            if let Some(watched) = self.watched.remove(&key) {
                self.keys.remove(&watched.id);
                tracing::debug!(key, "a held queue key was deleted by someone else");
                self.wanted.notify_one();
                return stream.cancel(watched.id).await.is_ok();
            }
        }
        true
    }
}

/// The pause before a broken stream is opened again.
fn fresh_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// The stream's next message; never, without a stream.
async fn next_message(
    stream: Option<&mut WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `due`; never, without one.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
