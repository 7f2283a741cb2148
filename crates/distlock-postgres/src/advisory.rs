//! Advisory-lock sessions: a dedicated connection each, whose advisory
//! locks are the session's locks. Waits happen in the server, bounded by
//! `lock_timeout`; the locks go when the connection goes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, Heartbeat, HeldLock, Mode, RenewReport, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, NoTls};

use crate::connect::query_error;
use crate::tokens;

/// The 64-bit advisory-lock key of a lock name: FNV-1a, stable across
/// versions and hosts. Two names with the same hash share one lock, which
/// can make one wait for the other but never lets two hold either at once.
pub(crate) fn lock_id(name: &str) -> i64 {
    i64::from_ne_bytes(distlock_core::key_hash(name).to_ne_bytes())
}

/// The longest a wait holds the session's connection at a time (and at
/// most a quarter of the session's TTL, so that renewals get their turn).
const WAIT_SLICE: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) struct AdvisorySession {
    client: Arc<Client>,
    /// Answers on the connection, as proof that it lives.
    heartbeat: Heartbeat,
    /// One command at a time: a wait holds the connection, and a dropped
    /// wait keeps it until its clean-up has run.
    turn: Arc<Mutex<()>>,
    target: String,
    /// How long a keep-alive query may take.
    ttl: Duration,
}

impl AdvisorySession {
    /// Readies a session's connection: no statement timeout (a server-wide
    /// one would end long waits as errors).
    pub(crate) async fn prepare(client: &Client, target: &str) -> Result<()> {
        client
            .batch_execute("SET statement_timeout = 0")
            .await
            .map_err(|err| query_error(target, &err))
    }

    pub(crate) fn new(client: Client, target: String, ttl: Duration) -> Self {
        AdvisorySession {
            client: Arc::new(client),
            heartbeat: Heartbeat::default(),
            turn: Arc::new(Mutex::new(())),
            target,
            ttl,
        }
    }

    fn lost(&self) -> Error {
        Error::new(
            ErrorKind::Lost,
            format!(
                "the connection to PostgreSQL at {} is gone, and with it every lock of the session",
                self.target
            ),
        )
    }
}

fn functions(mode: Mode) -> Result<(&'static str, &'static str, &'static str)> {
    match mode {
        Mode::Exclusive => Ok((
            "SELECT pg_try_advisory_lock($1)",
            "SELECT pg_advisory_lock($1)",
            "SELECT pg_advisory_unlock($1)",
        )),
        Mode::Shared => Ok((
            "SELECT pg_try_advisory_lock_shared($1)",
            "SELECT pg_advisory_lock_shared($1)",
            "SELECT pg_advisory_unlock_shared($1)",
        )),
        Mode::Semaphore { .. } => Err(Error::new(
            ErrorKind::Unsupported,
            "advisory locks have no semaphores; use a postgres://…?mode=lease URL",
        )),
    }
}

/// Undoes, in the background, an acquire dropped while its query ran: the
/// query is cancelled, and the lock released in case it came first. The
/// connection stays taken until then, so no later command overtakes it.
struct Cleanup {
    turn: Option<OwnedMutexGuard<()>>,
    client: Arc<Client>,
    cancel: CancelToken,
    unlock: &'static str,
    id: i64,
    /// The lock query has not answered yet.
    pending: bool,
}

impl Cleanup {
    fn disarm(mut self) {
        self.turn.take();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(turn) = self.turn.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, cancel, unlock, id) = (
            Arc::clone(&self.client),
            self.cancel.clone(),
            self.unlock,
            self.id,
        );
        runtime.spawn(async move {
            let _ = cancel.cancel_query(NoTls).await;
            let _ = client.query_one(unlock, &[&id]).await;
            drop(turn);
        });
    }
}

#[async_trait]
impl StoreSession for AdvisorySession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (try_lock, lock, unlock) = functions(request.mode)?;
        let id = lock_id(&request.key);
        let turn = Arc::clone(&self.turn).lock_owned().await;
        if self.client.is_closed() {
            return Err(self.lost());
        }
        // A wait takes at most a slice of time on the connection, so that the
        // session's releases, renewals and other acquires get their turn in
        // between; the core asks again until its deadline.
        let lock_query = match request.wait_until {
            None => try_lock,
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                // Rounded up, so that a wait never ends early.
                let slice = (self.ttl / 4).clamp(Duration::from_millis(10), WAIT_SLICE);
                let ms = (left.as_millis() + 1).min(slice.as_millis());
                self.client
                    .query_one(
                        "SELECT set_config('lock_timeout', $1, false)",
                        &[&format!("{ms}ms")],
                    )
                    .await
                    .map_err(|err| query_error(&self.target, &err))?;
                lock
            }
        };
        // Armed only now: an unlock without a lock query could release a
        // hold of this session under a colliding name.
        let mut cleanup = Cleanup {
            turn: Some(turn),
            client: Arc::clone(&self.client),
            cancel: self.client.cancel_token(),
            unlock,
            id,
            pending: true,
        };
        let answer = self.client.query_one(lock_query, &[&id]).await;
        cleanup.pending = false;
        if answer
            .as_ref()
            .map_or_else(|err| !err.is_closed(), |_| true)
        {
            self.heartbeat.mark();
        }
        let got = match answer {
            Ok(row) if lock_query == try_lock => row.get::<_, bool>(0),
            Ok(_) => true,
            Err(err) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => false,
            Err(err) => {
                // Whatever the query did, the clean-up undoes it.
                return Err(query_error(&self.target, &err));
            }
        };
        if !got {
            cleanup.disarm();
            return Ok(None);
        }
        // The token on this session's connection, while it holds the lock:
        // the lock passes on only once this connection lets it go, after
        // the token is committed, so tokens follow the order of grants even
        // if this connection dies right now.
        match tokens::next_on(&self.client, &self.target, &request.key).await {
            Ok(token) => {
                cleanup.disarm();
                Ok(Some(Grant::new(token)))
            }
            // The clean-up gives the lock back.
            Err(err) => Err(err),
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let (_, _, unlock) = functions(held.mode)?;
        let _turn = self.turn.lock().await;
        let row = self
            .client
            .query_one(unlock, &[&lock_id(&held.key)])
            .await
            .map_err(|err| {
                if err.is_closed() {
                    self.lost()
                } else {
                    query_error(&self.target, &err)
                }
            })?;
        if row.get::<_, bool>(0) {
            Ok(())
        } else {
            Err(Error::not_held(&held.key))
        }
    }

    async fn renew(&self, _held: &[HeldLock]) -> Result<RenewReport> {
        if self.client.is_closed() {
            return Err(self.lost());
        }
        // A keep-alive query, on the connection's turn: waits take it for a
        // second at most. Without an answer in time the locks are not
        // counted as renewed (the core asks again until the lease ends).
        let no_answer = || {
            Error::new(
                ErrorKind::Unavailable,
                format!("PostgreSQL at {} did not answer a keep-alive", self.target),
            )
        };
        // Or, while waits keep the connection busy, an answer to one of
        // them that came after this renewal began.
        let start = Instant::now();
        let deadline = start + self.ttl / 3;
        let _turn = tokio::select! {
            turn = tokio::time::timeout_at(deadline, self.turn.lock()) => {
                turn.map_err(|_| no_answer())?
            }
            alive = self.heartbeat.answered_since(start, deadline) => {
                if !alive {
                    return Err(no_answer());
                }
                if self.client.is_closed() {
                    return Err(self.lost());
                }
                return Ok(RenewReport::all_held());
            }
        };
        match tokio::time::timeout_at(deadline, self.client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => self.heartbeat.mark(),
            Ok(Err(err)) if err.is_closed() => return Err(self.lost()),
            Ok(Err(err)) => return Err(query_error(&self.target, &err)),
            Err(_) => return Err(no_answer()),
        }
        if self.client.is_closed() {
            return Err(self.lost());
        }
        Ok(RenewReport::all_held())
    }

    async fn close(&self) -> Result<()> {
        let _turn = self.turn.lock().await;
        // Ending the backend's session releases all its advisory locks.
        let _ = self
            .client
            .simple_query("SELECT pg_advisory_unlock_all()")
            .await;
        Ok(())
    }
}
