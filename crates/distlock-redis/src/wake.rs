//! Wake-ups by pub/sub: one subscriber connection per Redis instance, shared
//! by every waiter of the store, subscribed to the release channels that
//! somebody waits on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::Notify;

/// How long a subscribe or unsubscribe may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The live subscriber connection, and which one it is.
type Sink = Arc<tokio::sync::Mutex<Option<(u64, PubSubSink)>>>;

/// The subscriber of one instance.
pub(crate) struct Hub {
    client: redis::Client,
    /// `None` until connected, and again once the connection broke.
    sink: Sink,
    connections: AtomicU64,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

struct Channel {
    watchers: usize,
    subscribed: bool,
    notify: Arc<Notify>,
}

fn lock(channels: &Mutex<HashMap<String, Channel>>) -> MutexGuard<'_, HashMap<String, Channel>> {
    channels.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub(crate) fn new(client: redis::Client) -> Arc<Hub> {
        Arc::new(Hub {
            client,
            sink: Arc::new(tokio::sync::Mutex::new(None)),
            connections: AtomicU64::new(0),
            channels: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Watches `channel`: the returned [`Watch`] is notified on every
    /// message published there, and when the subscriber connection breaks
    /// (so that nobody sleeps through a lost message). An error means the
    /// subscription could not be made; the caller then relies on its timer.
    pub(crate) async fn watch(self: &Arc<Self>, channel: &str) -> redis::RedisResult<Watch> {
        let notify = {
            let mut channels = lock(&self.channels);
            let entry = channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    watchers: 0,
                    subscribed: false,
                    notify: Arc::new(Notify::new()),
                });
            entry.watchers += 1;
            Arc::clone(&entry.notify)
        };
        let watch = Watch {
            hub: Arc::clone(self),
            channel: channel.to_owned(),
            notify,
        };
        self.subscribe(channel).await?;
        Ok(watch)
    }

    /// Whether `channel` is watched but not subscribed (its connection
    /// broke).
    pub(crate) fn needs_subscribing(&self, channel: &str) -> bool {
        lock(&self.channels)
            .get(channel)
            .is_some_and(|entry| entry.watchers > 0 && !entry.subscribed)
    }

    /// Subscribes to a watched `channel` unless it is already, connecting
    /// first if needed.
    pub(crate) async fn subscribe(&self, channel: &str) -> redis::RedisResult<()> {
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            *sink = Some(self.connect().await?);
        }
        let subscribed = lock(&self.channels)
            .get(channel)
            .is_none_or(|entry| entry.subscribed);
        if subscribed {
            return Ok(());
        }
        let (_, live) = sink.as_mut().expect("connected above");
        let done = tokio::time::timeout(CALL_TIMEOUT, live.subscribe(channel)).await;
        match done {
            Ok(Ok(())) => {
                if let Some(entry) = lock(&self.channels).get_mut(channel) {
                    entry.subscribed = true;
                }
                Ok(())
            }
            Ok(Err(err)) => {
                *sink = None;
                Err(err)
            }
            Err(_) => {
                *sink = None;
                Err(
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "SUBSCRIBE went unanswered")
                        .into(),
                )
            }
        }
    }

    /// A new subscriber connection, and the task that hands its messages
    /// out. When the connection breaks, the task forgets it, marks every
    /// channel unsubscribed and wakes every watcher, which subscribes again.
    async fn connect(&self) -> redis::RedisResult<(u64, PubSubSink)> {
        let pubsub = tokio::time::timeout(CALL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no pub/sub connection in time",
                ))
            })??;
        let (sink, mut messages) = pubsub.split();
        let generation = self.connections.fetch_add(1, Ordering::Relaxed);
        for entry in lock(&self.channels).values_mut() {
            entry.subscribed = false;
        }
        let (channels, live) = (Arc::clone(&self.channels), Arc::clone(&self.sink));
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let notify = lock(&channels)
                    .get(message.get_channel_name())
                    .map(|entry| Arc::clone(&entry.notify));
                if let Some(notify) = notify {
                    notify.notify_waiters();
                }
            }
            {
                let mut sink = live.lock().await;
                if sink
                    .as_ref()
                    .is_some_and(|(current, _)| *current == generation)
                {
                    *sink = None;
                }
            }
            for entry in lock(&channels).values_mut() {
                entry.subscribed = false;
                entry.notify.notify_waiters();
            }
        });
        Ok((generation, sink))
    }
}

/// A waiter's interest in one release channel; dropping it unsubscribes
/// when nobody else watches the channel.
pub(crate) struct Watch {
    hub: Arc<Hub>,
    channel: String,
    notify: Arc<Notify>,
}

impl Watch {
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let last = {
            let mut channels = lock(&self.hub.channels);
            match channels.get_mut(&self.channel) {
                Some(entry) => {
                    entry.watchers -= 1;
                    entry.watchers == 0
                }
                None => false,
            }
        };
        if !last {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (hub, channel) = (Arc::clone(&self.hub), self.channel.clone());
        runtime.spawn(async move {
            let mut sink = hub.sink.lock().await;
            let unwatched = {
                let mut channels = lock(&hub.channels);
                let unwatched = channels.get(&channel).is_some_and(|e| e.watchers == 0);
                if unwatched {
                    channels.remove(&channel);
                }
                unwatched
            };
            if let (true, Some((_, live))) = (unwatched, sink.as_mut()) {
                let done = tokio::time::timeout(CALL_TIMEOUT, live.unsubscribe(&channel)).await;
                if !matches!(done, Ok(Ok(()))) {
                    *sink = None;
                }
            }
        });
    }
}
