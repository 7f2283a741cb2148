//! Wake-ups by pub/sub: one subscriber connection per Redis instance, shared
//! by every waiter of the store, subscribed to the release channels that
//! somebody waits on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::Notify;

/// The subscriber of one instance.
pub(crate) struct Hub {
    client: redis::Client,
    /// `None` until connected, and again after the connection broke.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
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
            sink: tokio::sync::Mutex::new(None),
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
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            *sink = Some(self.connect().await?);
        }
        let subscribed = lock(&self.channels)
            .get(channel)
            .is_some_and(|entry| entry.subscribed);
        if !subscribed {
            let live = sink.as_mut().expect("connected above");
            if let Err(err) = live.subscribe(channel).await {
                *sink = None;
                return Err(err);
            }
            if let Some(entry) = lock(&self.channels).get_mut(channel) {
                entry.subscribed = true;
            }
        }
        Ok(watch)
    }

    /// A new subscriber connection, and the task that hands its messages
    /// out; when the connection breaks, every channel is to be subscribed
    /// again and every watcher is woken.
    async fn connect(&self) -> redis::RedisResult<PubSubSink> {
        let pubsub = self.client.get_async_pubsub().await?;
        let (sink, mut messages) = pubsub.split();
        for entry in lock(&self.channels).values_mut() {
            entry.subscribed = false;
        }
        let channels = Arc::clone(&self.channels);
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let notify = lock(&channels)
                    .get(message.get_channel_name())
                    .map(|entry| Arc::clone(&entry.notify));
                if let Some(notify) = notify {
                    notify.notify_waiters();
                }
            }
            for entry in lock(&channels).values_mut() {
                entry.subscribed = false;
                entry.notify.notify_waiters();
            }
        });
        Ok(sink)
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
            if let (true, Some(live)) = (unwatched, sink.as_mut()) {
                if live.unsubscribe(&channel).await.is_err() {
                    *sink = None;
                }
            }
        });
    }
}
