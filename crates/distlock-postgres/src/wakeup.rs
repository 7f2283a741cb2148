//! Waking the waiters and observers of the lease table: a connection of
//! the store LISTENs for releases and grants, wakes the waiters of a
//! released key and signals the observers of a changed one; a broken
//! listening connection wakes every waiter, ends every observer's watch,
//! and is made again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use distlock_core::store::lock as guard;
use distlock_core::store::KeyWatcher;
use distlock_core::{Error, Result};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::connect::query_error;

/// The channel of releases (`distlock_release_v2`, a forced release):
/// wakes waiters and observers.
const RELEASED: &str = "distlock_released";

/// The channel of grants of an observed key: observers only.
const CHANGED: &str = "distlock_changed";

/// Who is woken by the notifications of the listening connection.
pub(crate) struct Waiting {
    /// The keys waited on, with how many wait and what wakes them.
    waiters: Mutex<HashMap<String, (usize, Arc<Notify>)>>,
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
            observers: Mutex::default(),
            listening: tokio::sync::watch::Sender::new(true),
        }
    }
}

impl Waiting {
    /// Delivers a notification of `key` on `channel`.
    fn deliver(&self, channel: &str, key: &str) {
        if channel == RELEASED {
            let notify = guard(&self.waiters)
                .get(key)
                .map(|(_, notify)| Arc::clone(notify));
            if let Some(notify) = notify {
                notify.notify_waiters();
            }
        }
        if let Some(observers) = guard(&self.observers).get(key) {
            for watcher in observers.values() {
                watcher.signal();
            }
        }
    }

    /// The connection broke: wakes every waiter, and ends every observer's
    /// watch.
    fn broke(&self) {
        self.listening.send_replace(false);
        guard(&self.observers).clear();
        for (_, notify) in guard(&self.waiters).values() {
            notify.notify_waiters();
        }
    }

    /// Whether the connection listens, now and from now on.
    pub(crate) fn listening(&self) -> tokio::sync::watch::Receiver<bool> {
        self.listening.subscribe()
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

/// Opens a connection and LISTENs on it for releases and grants.
pub(crate) async fn listen(config: &Config, target: &str) -> Result<Listening> {
    let connecting = tokio::time::timeout(crate::CONNECT_TIMEOUT, config.connect(NoTls));
    let (client, mut connection) = connecting
        .await
        .map_err(|_| {
            Error::unavailable(format!("PostgreSQL at {target} did not finish connecting"))
        })?
        .map_err(|err| query_error(target, err))?;
    // The connection must be driven for LISTEN to be answered.
    {
        let statement = format!("LISTEN {RELEASED}; LISTEN {CHANGED}");
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
                        delivered.deliver(note.channel(), note.payload());
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
        listening = listen(&config, &target).await.ok();
        if let (Some(_), Some(delivered)) = (&listening, listeners.upgrade()) {
            delivered.listening.send_replace(true);
        }
    }
}

/// A waiter's registration for the wake-ups of one key, undone when
/// dropped.
pub(crate) struct Watch {
    listeners: Listeners,
    key: String,
    /// Woken on each release of the key, and when the listener broke.
    pub(crate) notify: Arc<Notify>,
}

impl Watch {
    pub(crate) fn new(listeners: &Listeners, key: &str) -> Watch {
        let notify = {
            let mut waiting = guard(&listeners.waiters);
            let entry = waiting
                .entry(key.to_owned())
                .or_insert_with(|| (0, Arc::new(Notify::new())));
            entry.0 += 1;
            Arc::clone(&entry.1)
        };
        Watch {
            listeners: Arc::clone(listeners),
            key: key.to_owned(),
            notify,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut listeners = guard(&self.listeners.waiters);
        if let Some(entry) = listeners.get_mut(&self.key) {
            entry.0 -= 1;
            if entry.0 == 0 {
                listeners.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each watch of a key counts once, and the last one dropped takes the
    /// key's entry with it.
    #[test]
    fn the_last_watch_of_a_key_takes_its_entry_away() {
        let listeners: Listeners = Arc::default();
        let (a, b) = (Watch::new(&listeners, "k"), Watch::new(&listeners, "k"));
        assert!(Arc::ptr_eq(&a.notify, &b.notify), "one Notify per key");
        drop(a);
        assert_eq!(
            guard(&listeners.waiters).get("k").map(|entry| entry.0),
            Some(1)
        );
        drop(b);
        assert!(guard(&listeners.waiters).is_empty());
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
