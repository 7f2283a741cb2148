//! Waking the waiters of the lease table: a connection of the store
//! LISTENs for releases (and, for observers, every grant and release of a
//! key someone observes) and wakes the waiters of the key; a broken
//! listening connection is made again, and wakes every waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use distlock_core::store::lock as guard;
use distlock_core::{Error, Result};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::connect::query_error;

/// The keys waited on, with how many wait and what wakes them.
pub(crate) type Waiting = Mutex<HashMap<String, (usize, Arc<Notify>)>>;

/// [`Waiting`], shared with the listener.
pub(crate) type Listeners = Arc<Waiting>;

/// A connection that listens for releases: its client (which keeps it
/// open) and the connection itself, whose messages the listener reads.
pub(crate) type Listening = (
    Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
);

/// Opens a connection and LISTENs on it for releases.
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
        let listen = client.batch_execute("LISTEN distlock_released; LISTEN distlock_changed");
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

/// Hands out release notifications until the store is dropped, listening
/// again (after a pause) whenever the connection breaks; every break wakes
/// every waiter, so that none sleeps through a release it missed.
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
                        let notify = guard(&delivered)
                            .get(note.payload())
                            .map(|(_, notify)| Arc::clone(notify));
                        if let Some(notify) = notify {
                            notify.notify_waiters();
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
            for (_, notify) in guard(&delivered).values() {
                notify.notify_waiters();
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if listeners.strong_count() == 0 {
            return;
        }
        listening = listen(&config, &target).await.ok();
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
            let mut waiting = guard(listeners);
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
        let mut listeners = guard(&self.listeners);
        if let Some(entry) = listeners.get_mut(&self.key) {
            entry.0 -= 1;
            if entry.0 == 0 {
                listeners.remove(&self.key);
            }
        }
    }
}

/// How long an observer's row says it observes; renewed at a third of it.
const OBSERVED_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Pushes the changes of `key`'s holders to a [`KeyWatch`]: a row in
/// `distlock_observers` makes the lease functions notify
/// `distlock_changed` on each grant and release of the key, which the
/// store's listener routes here, as it routes releases to waiters. The
/// row is renewed while the watch lives and deleted when it ends.
pub(crate) async fn watch_key(
    leases: std::sync::Arc<crate::lease::Leases>,
    key: &str,
) -> Result<distlock_core::store::KeyWatch> {
    use distlock_core::store::KeyWatcher;
    let observer = format!("{:032x}", rand::random::<u128>());
    let watch = Watch::new(&leases.listeners, key);
    // The listener's wake-ups count from here: the row below comes after.
    let mut next = Box::pin(Arc::clone(&watch.notify).notified_owned());
    next.as_mut().enable();
    observe(&leases, key, &observer).await?;
    let (signals, receiver) = KeyWatcher::new();
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut renew = tokio::time::interval(OBSERVED_FOR / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                () = &mut next => {
                    // Armed again before the signal: nothing after the
                    // reader's next read is missed.
                    next = Box::pin(Arc::clone(&watch.notify).notified_owned());
                    next.as_mut().enable();
                    if !signals.signal() {
                        break;
                    }
                }
                _ = renew.tick() => {
                    if observe(&leases, &key, &observer).await.is_err() {
                        break;
                    }
                }
                () = signals.closed() => break,
            }
        }
        if let Ok(client) = leases.client().await {
            let gone = "DELETE FROM distlock_observers WHERE key = $1 AND observer = $2";
            let _ = client.execute(gone, &[&key, &observer]).await;
        }
    });
    Ok(receiver)
}

/// Writes (or renews) `observer`'s row for `key`.
async fn observe(leases: &crate::lease::Leases, key: &str, observer: &str) -> Result<()> {
    let client = leases.client().await?;
    let until = i64::try_from(OBSERVED_FOR.as_millis()).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO distlock_observers (key, observer, until) \
             VALUES ($1, $2, clock_timestamp() + $3::bigint * interval '1 millisecond') \
             ON CONFLICT (key, observer) DO UPDATE SET until = excluded.until",
            &[&key, &observer, &until],
        )
        .await
        .map_err(|err| query_error(leases.target(), err))?;
    Ok(())
}
