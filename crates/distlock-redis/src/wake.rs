//! Hand-over messages: one subscriber connection per Redis instance and
//! store, subscribed to the store's own channel, on which a release that
//! hands a key to one of this store's waiters publishes `TOKEN GEN MEMBER`.
//! The message goes to the waiting acquire of that member only: no waiter
//! is woken by a hand-over to another. A forced release marks the
//! hand-overs it makes (`forced TOKEN GEN MEMBER`) and tells each waiter
//! whose hand-over it ended (`ended MEMBER`).

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
    /// What came since the acquire last looked.
    news: Mutex<News>,
}

/// What the messages to one waiting acquire said since it last looked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct News {
    /// The token and generation of the last hand-over, if one came after
    /// any end.
    pub(crate) grant: Option<(u64, u64)>,
    /// A forced release ended a hand-over to it: what it counted from this
    /// instance before may no longer hold.
    pub(crate) ended: bool,
    /// A forced release was at work here (it ended or made a hand-over):
    /// the other instances may have been changed by it too.
    pub(crate) forced: bool,
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

/// Hands `[forced ]TOKEN GEN MEMBER` or `ended MEMBER` to the route of
/// MEMBER, if it still waits.
fn deliver(routes: &Mutex<HashMap<String, Arc<Route>>>, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let (member, grant, forced) = if let Some(member) = text.strip_prefix("ended ") {
        (member, None, true)
    } else {
        let (forced, rest) = match text.strip_prefix("forced ") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let mut parts = rest.splitn(3, ' ');
        let (Some(token), Some(gen), Some(member)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Ok(token), Ok(gen)) = (token.parse::<u64>(), gen.parse::<u64>()) else {
            return;
        };
        (member, Some((token, gen)), forced)
    };
    let route = lock(routes).get(member).cloned();
    if let Some(route) = route {
        {
            let mut news = lock(&route.news);
            // In the order published by one instance: an end drops the
            // hand-over before it, a hand-over after an end stands.
            news.ended |= grant.is_none();
            news.grant = grant;
            news.forced |= forced;
        }
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

    /// What came since the last look.
    pub(crate) fn take(&self) -> News {
        std::mem::take(&mut *lock(&self.route.news))
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
        assert_eq!(*lock(&a.news), News::default());
        let b_news = News {
            grant: Some((7, 3)),
            ..News::default()
        };
        assert_eq!(*lock(&b.news), b_news);
    }

    #[test]
    fn a_forced_release_s_messages_end_and_mark_hand_overs() {
        let routes: Routes = Arc::default();
        let a = Arc::new(Route::default());
        lock(&routes).insert("s|1|0".into(), Arc::clone(&a));
        deliver(&routes, b"7 3 s|1|0");
        deliver(&routes, b"ended s|1|0");
        let ended = News {
            grant: None,
            ended: true,
            forced: true,
        };
        assert_eq!(*lock(&a.news), ended);
        deliver(&routes, b"forced 9 4 s|1|0");
        let handed_again = News {
            grant: Some((9, 4)),
            ..ended
        };
        assert_eq!(std::mem::take(&mut *lock(&a.news)), handed_again);
        deliver(&routes, b"forced 10 5 s|1|0");
        assert_eq!(
            *lock(&a.news),
            News {
                grant: Some((10, 5)),
                ended: false,
                forced: true
            }
        );
    }
}
