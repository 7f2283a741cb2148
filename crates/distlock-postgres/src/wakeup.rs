//! Waking the waiters and observers of the lease table: a connection of
//! the store LISTENs for releases and grants, wakes the waiter a release
//! names (on the store's own channel) or every waiter of a released key,
//! and signals the observers of a changed one; a broken listening
//! connection wakes every waiter, ends every observer's watch, and is made
//! again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use distlock_core::store::lock as guard;
use distlock_core::store::KeyWatcher;
use distlock_core::{Error, Result};
use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::connect::query_error;

/// The channel of releases that wake every waiter of the key (a waiter of
/// an older client or an observer is there, or the waiter next in line may
/// share the key; a forced release): wakes waiters and observers.
const RELEASED: &str = "distlock_released";

/// Wakes every waiter and observer of the key given as `$1`.
pub(crate) const NOTIFY_RELEASED: &str = "SELECT pg_notify('distlock_released', $1)";

/// Passes a turn nobody took on to every waiter of the key `$1`, unless
/// the key is held again (its holder's release wakes someone then).
pub(crate) const PASS_ON: &str = "SELECT pg_notify('distlock_released', $1) \
    WHERE NOT EXISTS (SELECT 1 FROM distlock_leases_v2 \
        WHERE key = $1 AND expires_at > clock_timestamp())";

/// The channel of grants of an observed key: observers only.
const CHANGED: &str = "distlock_changed";

/// The channel a store's waiters are woken on one at a time: a release
/// sends it the name of the waiter it wakes.
pub(crate) fn turn_channel() -> String {
    format!("distlock_turn_{:016x}", rand::random::<u64>())
}

/// The acquires waiting in this store: what wakes each, by key and by the
/// waiter's name.
#[derive(Default)]
struct Waiters {
    by_key: HashMap<String, HashMap<String, Arc<Notify>>>,
    by_name: HashMap<String, Arc<Notify>>,
}

/// Who is woken by the notifications of the listening connection.
pub(crate) struct Waiting {
    waiters: Mutex<Waiters>,
    /// Where the keys of turns nobody here took go, to be passed on from
    /// the statement connection (the listening one may be what broke).
    passed_on: std::sync::OnceLock<mpsc::UnboundedSender<String>>,
    /// The observers of each key, by name: signalled on each notification
    /// of the key, on either channel.
    observers: Mutex<HashMap<String, HashMap<String, KeyWatcher>>>,
    /// Whether the connection listens now. Observers are listed only while
    /// it does, and are all dropped when it breaks, so that their watches
    /// end (and their readers poll) rather than go silent.
    listening: tokio::sync::watch::Sender<bool>,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            waiters: Mutex::default(),
            passed_on: std::sync::OnceLock::new(),
            observers: Mutex::default(),
            listening: tokio::sync::watch::Sender::new(true),
        }
    }
}

impl Waiting {
    /// Delivers a notification on `channel`: of a key on [`RELEASED`] and
    /// [`CHANGED`], of a waiter's name and its key on the store's own
    /// channel. A key returned is a turn for a waiter whose acquire has
    /// ended: it must be passed on to every waiter of the key.
    fn deliver(&self, channel: &str, payload: &str) -> Option<String> {
        if channel != RELEASED && channel != CHANGED {
            let (waiter, key) = payload.split_once(' ').unwrap_or((payload, ""));
            return match guard(&self.waiters).by_name.get(waiter) {
                Some(notify) => {
                    notify.notify_waiters();
                    None
                }
                None => Some(key.to_owned()).filter(|key| !key.is_empty()),
            };
        }
        let key = payload;
        if channel == RELEASED {
            if let Some(of_key) = guard(&self.waiters).by_key.get(key) {
                for notify in of_key.values() {
                    notify.notify_waiters();
                }
            }
        }
        if let Some(observers) = guard(&self.observers).get(key) {
            for watcher in observers.values() {
                watcher.signal();
            }
        }
        None
    }

    /// The connection broke: wakes every waiter, and ends every observer's
    /// watch. Until it listens again, waiters register with no channel of
    /// their own, so that releases wake every waiter (and the others are
    /// not passed a turn this store cannot hear).
    fn broke(&self) {
        self.listening.send_replace(false);
        guard(&self.observers).clear();
        self.wake_all();
    }

    /// It listens again: wakes every waiter, which may have been passed a
    /// turn while it did not, and now registers with its channel again.
    fn listens_again(&self) {
        self.listening.send_replace(true);
        self.wake_all();
    }

    fn wake_all(&self) {
        for notify in guard(&self.waiters).by_name.values() {
            notify.notify_waiters();
        }
    }

    /// Whether the connection listens, now and from now on.
    pub(crate) fn listening(&self) -> tokio::sync::watch::Receiver<bool> {
        self.listening.subscribe()
    }

    /// Whether the connection listens now.
    pub(crate) fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Sends the keys of turns nobody here took to `keys`.
    pub(crate) fn pass_turns_to(&self, keys: mpsc::UnboundedSender<String>) {
        let _ = self.passed_on.set(keys);
    }

    /// Signals `watcher` on each notification of `key`, until
    /// [`unobserve`](Waiting::unobserve)d by the same `name` or the
    /// connection breaks; `false`, listing nothing, while it is broken.
    pub(crate) fn observe(&self, key: &str, name: &str, watcher: KeyWatcher) -> bool {
        let mut observers = guard(&self.observers);
        // Read under the lock that `broke` clears the list under.
        if !*self.listening.borrow() {
            return false;
        }
        observers
            .entry(key.to_owned())
            .or_default()
            .insert(name.to_owned(), watcher);
        true
    }

    pub(crate) fn unobserve(&self, key: &str, name: &str) {
        let mut observers = guard(&self.observers);
        if let Some(of_key) = observers.get_mut(key) {
            of_key.remove(name);
            if of_key.is_empty() {
                observers.remove(key);
            }
        }
    }
}

/// [`Waiting`], shared with the listener.
pub(crate) type Listeners = Arc<Waiting>;

/// A connection that listens for releases: its client (which keeps it
/// open) and the connection itself, whose messages the listener reads.
pub(crate) type Listening = (
    Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
);

/// Opens a connection and LISTENs on it for releases and grants, and on
/// the store's own `channel` for its waiters' turns.
pub(crate) async fn listen(config: &Config, target: &str, channel: &str) -> Result<Listening> {
    let connecting = tokio::time::timeout(crate::CONNECT_TIMEOUT, config.connect(NoTls));
    let (client, mut connection) = connecting
        .await
        .map_err(|_| {
            Error::unavailable(format!("PostgreSQL at {target} did not finish connecting"))
        })?
        .map_err(|err| query_error(target, err))?;
    // The connection must be driven for LISTEN to be answered.
    {
        let statement = format!("LISTEN {RELEASED}; LISTEN {CHANGED}; LISTEN {channel}");
        let listen = client.batch_execute(&statement);
        tokio::pin!(listen);
        loop {
            tokio::select! {
                done = &mut listen => {
                    done.map_err(|err| query_error(target, err))?;
                    break;
                }
                message = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                    if !matches!(message, Some(Ok(_))) {
                        return Err(Error::unavailable(format!(
                            "PostgreSQL at {target} closed the listening connection"
                        )));
                    }
                }
            }
        }
    }
    Ok((client, connection))
}

/// Hands out notifications until the store is dropped, listening again
/// (after a pause) whenever the connection breaks; every break wakes every
/// waiter, so that none sleeps through a release it missed, and ends every
/// observer's watch.
pub(crate) async fn keep_listening(
    config: Config,
    target: String,
    channel: String,
    listeners: std::sync::Weak<Waiting>,
    first: Listening,
) {
    let mut listening = Some(first);
    loop {
        if let Some((_client, mut connection)) = listening.take() {
            loop {
                let message = tokio::select! {
                    message = std::future::poll_fn(|cx| connection.poll_message(cx)) => message,
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                        if listeners.strong_count() == 0 {
                            return;
                        }
                        continue;
                    }
                };
                let Some(delivered) = listeners.upgrade() else {
                    return;
                };
                match message {
                    Some(Ok(AsyncMessage::Notification(note))) => {
                        if let Some(key) = delivered.deliver(note.channel(), note.payload()) {
                            if let Some(keys) = delivered.passed_on.get() {
                                let _ = keys.send(key);
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            let Some(delivered) = listeners.upgrade() else {
                return;
            };
            tracing::warn!(
                "the PostgreSQL listening connection to {target} broke; listening again"
            );
            delivered.broke();
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if listeners.strong_count() == 0 {
            return;
        }
        listening = listen(&config, &target, &channel).await.ok();
        if let (Some(_), Some(delivered)) = (&listening, listeners.upgrade()) {
            delivered.listens_again();
        }
    }
}

/// A waiter's registration for the wake-ups of one key, undone when
/// dropped.
pub(crate) struct Watch {
    listeners: Listeners,
    key: String,
    waiter: String,
    /// Woken on each release of the key that wakes every waiter, on each
    /// that names this waiter, and when the listener broke.
    pub(crate) notify: Arc<Notify>,
}

impl Watch {
    /// Registers `waiter` (unique in the store) as waiting on `key`.
    pub(crate) fn new(listeners: &Listeners, key: &str, waiter: &str) -> Watch {
        let notify = Arc::new(Notify::new());
        let mut waiting = guard(&listeners.waiters);
        waiting
            .by_key
            .entry(key.to_owned())
            .or_default()
            .insert(waiter.to_owned(), Arc::clone(&notify));
        waiting
            .by_name
            .insert(waiter.to_owned(), Arc::clone(&notify));
        drop(waiting);
        Watch {
            listeners: Arc::clone(listeners),
            key: key.to_owned(),
            waiter: waiter.to_owned(),
            notify,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiting = guard(&self.listeners.waiters);
        waiting.by_name.remove(&self.waiter);
        if let Some(of_key) = waiting.by_key.get_mut(&self.key) {
            of_key.remove(&self.waiter);
            if of_key.is_empty() {
                waiting.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `notified` was woken since it was enabled.
    fn woken(notified: &mut std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>>) -> bool {
        use std::future::Future;
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        notified.as_mut().poll(&mut context).is_ready()
    }

    fn enabled(watch: &Watch) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut notified = Box::pin(watch.notify.notified());
        notified.as_mut().enable();
        notified
    }

    /// A turn wakes the waiter it names and no other; a release on the
    /// shared channel wakes every waiter of its key, and only of its key.
    #[test]
    fn a_turn_wakes_one_waiter_and_a_release_all_of_its_key() {
        let waiting: Listeners = Arc::default();
        let (a, b) = (
            Watch::new(&waiting, "k", "a"),
            Watch::new(&waiting, "k", "b"),
        );
        let other = Watch::new(&waiting, "other", "c");
        let (mut a_woken, mut b_woken, mut other_woken) =
            (enabled(&a), enabled(&b), enabled(&other));
        assert_eq!(waiting.deliver("distlock_turn_1", "b k"), None);
        assert!(!woken(&mut a_woken), "a turn for b woke a");
        assert!(woken(&mut b_woken), "b missed its turn");
        // A turn for a waiter whose acquire has ended is to be passed on.
        assert_eq!(
            waiting.deliver("distlock_turn_1", "gone k"),
            Some("k".to_owned())
        );
        assert!(!woken(&mut a_woken), "a turn for another woke a");
        let mut b_woken = enabled(&b);
        waiting.deliver(RELEASED, "k");
        assert!(woken(&mut a_woken) && woken(&mut b_woken));
        assert!(
            !woken(&mut other_woken),
            "a release of k woke a waiter of another key"
        );
        // A grant's notice is for observers only.
        let mut a_woken = enabled(&a);
        waiting.deliver(CHANGED, "k");
        assert!(!woken(&mut a_woken), "a grant woke a waiter");
    }

    /// The last watch of a key dropped takes the key's entry with it.
    #[test]
    fn the_last_watch_of_a_key_takes_its_entry_away() {
        let listeners: Listeners = Arc::default();
        let (a, b) = (
            Watch::new(&listeners, "k", "a"),
            Watch::new(&listeners, "k", "b"),
        );
        drop(a);
        assert_eq!(
            guard(&listeners.waiters).by_key.get("k").map(HashMap::len),
            Some(1)
        );
        drop(b);
        let waiting = guard(&listeners.waiters);
        assert!(waiting.by_key.is_empty() && waiting.by_name.is_empty());
    }

    /// An observer taken back is no longer signalled, and leaves no entry;
    /// the key's other observers stay.
    #[test]
    fn an_observer_taken_back_leaves_nothing() {
        let waiting = Waiting::default();
        let (first, mut first_watch) = KeyWatcher::new();
        let (second, mut second_watch) = KeyWatcher::new();
        assert!(waiting.observe("k", "first", first));
        assert!(waiting.observe("k", "second", second));
        waiting.unobserve("k", "first");
        waiting.deliver(RELEASED, "k");
        assert!(first_watch.try_recv().is_err(), "signalled after unobserve");
        assert!(
            second_watch.try_recv().is_ok(),
            "the other observer missed it"
        );
        waiting.unobserve("k", "second");
        assert!(guard(&waiting.observers).is_empty());
    }
}
