//! Hand-over messages: one subscriber connection per Redis instance and
//! store, subscribed to the store's own channel, on which a release that
//! hands a key to one of this store's waiters publishes `TOKEN GEN MEMBER`.
//! The message goes to the waiting acquire of that member only: no waiter
//! is woken by a hand-over to another.

use distlock_core::store::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::Notify;

/// How long a connection and its subscribe may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long after a failed subscribe the next is tried: until then,
/// waiters rely on refreshing their places.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The waiting acquires, by member.
type Routes = Arc<Mutex<HashMap<String, Arc<Route>>>>;

/// The subscriber of one instance.
pub(crate) struct Hub {
    client: redis::Client,
    channel: String,
    /// The live, subscribed connection and which one it is; `None` until
    /// subscribed, and again once the connection broke.
    sink: Arc<tokio::sync::Mutex<Option<(u64, PubSubSink)>>>,
    /// Whether `sink` is `Some`, readable without waiting for its lock.
    subscribed: Arc<AtomicBool>,
    /// Until when subscribing is not tried again, after a failure.
    failed_until: Mutex<Option<tokio::time::Instant>>,
    connections: AtomicU64,
    routes: Routes,
}

/// Where a hand-over to one waiting acquire lands.
#[derive(Default)]
struct Route {
    notify: Notify,
    /// The token and generation of the hand-over, once it came.
    grant: Mutex<Option<(u64, u64)>>,
}

impl Hub {
    pub(crate) fn new(client: redis::Client, channel: String) -> Arc<Hub> {
        Arc::new(Hub {
            client,
            channel,
            sink: Arc::new(tokio::sync::Mutex::new(None)),
            subscribed: Arc::new(AtomicBool::new(false)),
            failed_until: Mutex::new(None),
            connections: AtomicU64::new(0),
            routes: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The store's channel, which waiters give the scripts.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Expects a hand-over to the acquire of `member`, until the returned
    /// [`Arrival`] is dropped. Register before joining the queue, so that
    /// no message can come before it.
    pub(crate) fn expect(self: &Arc<Self>, member: &str) -> Arrival {
        let route = Arc::new(Route::default());
        lock(&self.routes).insert(member.to_owned(), Arc::clone(&route));
        Arrival {
            hub: Arc::clone(self),
            member: member.to_owned(),
            route,
        }
    }

    /// Subscribes to the store's channel unless it is already, connecting
    /// first. Once this returns `Ok`, every message published on the
    /// channel reaches its route, or the connection broke and every route
    /// is woken to ask the store itself.
    pub(crate) async fn subscribe(&self) -> redis::RedisResult<()> {
        if self.subscribed.load(Ordering::Acquire) {
            return Ok(());
        }
        let failing = || {
            let until = *lock(&self.failed_until);
            until.is_some_and(|until| tokio::time::Instant::now() < until)
        };
        let not_now = || {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "subscribing failed a moment ago; not tried again yet",
            ))
        };
        if failing() {
            return Err(not_now());
        }
        let mut sink = self.sink.lock().await;
        if sink.is_some() {
            return Ok(());
        }
        if failing() {
            return Err(not_now());
        }
        let result = self.connect(&mut sink).await;
        if result.is_err() {
            *lock(&self.failed_until) = Some(tokio::time::Instant::now() + RETRY_AFTER);
        }
        result
    }

    /// Makes the subscriber connection and subscribes, into `sink`.
    async fn connect(&self, sink: &mut Option<(u64, PubSubSink)>) -> redis::RedisResult<()> {
        let timed_out = |what: &str| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what} in {CALL_TIMEOUT:?}"),
            ))
        };
        let pubsub = tokio::time::timeout(CALL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out("no pub/sub connection"))??;
        let (mut live, mut messages) = pubsub.split();
        tokio::time::timeout(CALL_TIMEOUT, live.subscribe(&self.channel))
            .await
            .map_err(|_| timed_out("SUBSCRIBE went unanswered"))??;
        let generation = self.connections.fetch_add(1, Ordering::Relaxed);
        let (routes, current) = (Arc::clone(&self.routes), Arc::clone(&self.sink));
        let subscribed = Arc::clone(&self.subscribed);
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                deliver(&routes, message.get_payload_bytes());
            }
            {
                let mut sink = current.lock().await;
                if sink.as_ref().is_some_and(|(g, _)| *g == generation) {
                    *sink = None;
                    subscribed.store(false, Ordering::Release);
                }
            }
            // Messages may have been lost: every waiter asks the store.
            for route in lock(&routes).values() {
                route.notify.notify_one();
            }
        });
        *sink = Some((generation, live));
        self.subscribed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Hands `TOKEN GEN MEMBER` to the route of MEMBER, if it still waits.
fn deliver(routes: &Mutex<HashMap<String, Arc<Route>>>, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let mut parts = text.splitn(3, ' ');
    let (Some(token), Some(gen), Some(member)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(token), Ok(gen)) = (token.parse::<u64>(), gen.parse::<u64>()) else {
        return;
    };
    let route = lock(routes).get(member).cloned();
    if let Some(route) = route {
        *lock(&route.grant) = Some((token, gen));
        route.notify.notify_one();
    }
}

/// A waiting acquire's place among the routes; dropping it leaves.
pub(crate) struct Arrival {
    hub: Arc<Hub>,
    member: String,
    route: Arc<Route>,
}

impl Arrival {
    /// Waits for a hand-over or a broken subscriber connection (after which
    /// the waiter asks the store).
    pub(crate) async fn woken(&self) {
        self.route.notify.notified().await;
    }

    /// The hand-over that came, if one did: its token and generation.
    pub(crate) fn take(&self) -> Option<(u64, u64)> {
        lock(&self.route.grant).take()
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        let mut routes = lock(&self.hub.routes);
        if routes
            .get(&self.member)
            .is_some_and(|route| Arc::ptr_eq(route, &self.route))
        {
            routes.remove(&self.member);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reaches_only_the_member_it_names() {
        let routes: Routes = Arc::default();
        let (a, b) = (Arc::new(Route::default()), Arc::new(Route::default()));
        lock(&routes).insert("s|1|0".into(), Arc::clone(&a));
        lock(&routes).insert("s|2|0".into(), Arc::clone(&b));
        deliver(&routes, b"7 3 s|2|0");
        deliver(&routes, b"garbled");
        deliver(&routes, b"x 3 s|1|0");
        assert_eq!(*lock(&a.grant), None);
        assert_eq!(*lock(&b.grant), Some((7, 3)));
    }
}
