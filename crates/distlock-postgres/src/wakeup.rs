//! Waking the waiters of the lease table: a connection of the store
//! LISTENs for releases and wakes the waiters of the released key; a
//! broken listening connection is made again, and wakes every waiter.

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
        let listen = client.batch_execute("LISTEN distlock_released");
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
