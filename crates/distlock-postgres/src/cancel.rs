//! Cancelling the wait of a dropped acquire such that the cancel can only
//! hit that wait, never a later statement of the session.
//!
//! `pg_cancel_backend` signals the backend before it answers, so once the
//! answer is in, the signal is waiting in the backend: it lands on what runs
//! now, or finds the backend idle, where PostgreSQL ignores it. The cancel
//! protocol of tokio-postgres gives no such bound (it does not wait for the
//! postmaster to act), and a late cancel fails whatever runs when it lands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::lock;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, SimpleQueryMessage};

/// How long a cancel may take before its outcome counts as unknown.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store stops trying to connect after a failed connect.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// A backend (server process): its pid, and when it started in microseconds
/// since 1970, so that a pid the server reused, or the same pid on another
/// server, is never taken for it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backend {
    pid: i32,
    started: i64,
}

const BACKEND_START: &str = "(extract(epoch FROM backend_start) * 1000000)::int8";

impl Backend {
    /// Who `client`'s backend is; `None` if this user may not read
    /// `pg_stat_activity` (then dropped waits end at their `lock_timeout`).
    pub(crate) async fn of(client: &Client, target: &str) -> Option<Backend> {
        let query = format!(
            "SELECT pid, {BACKEND_START} FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        );
        let answers = match client.simple_query(&query).await {
            Ok(answers) => answers,
            Err(err) => {
                tracing::warn!(
                    "PostgreSQL at {target}: cannot read pg_stat_activity ({err}); a dropped \
                     acquire will hold its session's connection until its wait times out"
                );
                return None;
            }
        };
        answers.iter().find_map(|answer| match answer {
            SimpleQueryMessage::Row(row) => Some(Backend {
                pid: row.get(0)?.parse().ok()?,
                started: row.get(1)?.parse().ok()?,
            }),
            _ => None,
        })
    }
}

/// Whether a late signal can still come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// Signalled or not, nothing of this cancel is on its way any more.
    Settled,
    /// The request may have reached the server without its answer coming
    /// back: it may still signal the backend.
    Unknown,
}

#[derive(Default)]
struct State {
    client: Option<Arc<Client>>,
    /// No connect before this, after a failed one.
    down_until: Option<Instant>,
}

/// Cancels the waits of dropped acquires, from a connection of the store's
/// opened on first use. Cancels run side by side on it; a failed connect
/// makes the following cancels fall back to the wait's `lock_timeout` for
/// a while, instead of each paying for a connect.
pub(crate) struct Canceller {
    config: Config,
    target: String,
    state: std::sync::Mutex<State>,
    connecting: tokio::sync::Mutex<()>,
    warned: AtomicBool,
}

impl Canceller {
    pub(crate) fn new(config: Config, target: String) -> Arc<Self> {
        Arc::new(Canceller {
            config,
            target,
            state: std::sync::Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
            warned: AtomicBool::new(false),
        })
    }

    /// Cancels what `backend` runs, if anything.
    pub(crate) async fn cancel(&self, backend: Backend) -> Cancelled {
        let Some(client) = self.client().await else {
            return Cancelled::Settled;
        };
        let query = format!(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = $1 \
             AND {BACKEND_START} = $2"
        );
        let answer = tokio::time::timeout(
            CANCEL_TIMEOUT,
            client.query_opt(&query, &[&backend.pid, &backend.started]),
        )
        .await;
        match answer {
            Ok(Ok(Some(_))) => Cancelled::Settled,
            Ok(Ok(None)) => {
                self.warn_once(
                    "its connection for cancels reaches another server than the sessions'",
                );
                Cancelled::Settled
            }
            // A server's error comes after whatever the statement did.
            Ok(Err(err)) if err.as_db_error().is_some() => {
                self.warn_once(&format!("pg_cancel_backend failed: {err}"));
                Cancelled::Settled
            }
            Ok(Err(_)) | Err(_) => Cancelled::Unknown,
        }
    }

    /// The store's connection for cancels: the one there is, or a new one;
    /// `None` while connecting fails, or while another cancel connects.
    async fn client(&self) -> Option<Arc<Client>> {
        {
            let state = lock(&self.state);
            if let Some(client) = state.client.as_ref().filter(|client| !client.is_closed()) {
                return Some(Arc::clone(client));
            }
            if state.down_until.is_some_and(|until| Instant::now() < until) {
                return None;
            }
        }
        let _connecting = self.connecting.try_lock().ok()?;
        match crate::connect::open(&self.config, &self.target).await {
            Ok(client) => {
                let client = Arc::new(client);
                lock(&self.state).client = Some(Arc::clone(&client));
                Some(client)
            }
            Err(err) => {
                self.warn_once(&format!("cannot connect: {err}"));
                lock(&self.state).down_until = Some(Instant::now() + DOWN_FOR);
                None
            }
        }
    }

    fn warn_once(&self, why: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "PostgreSQL at {}: cannot cancel the waits of dropped acquires ({why}); such an \
                 acquire holds its session's connection until its wait times out",
                self.target
            );
        }
    }
}
