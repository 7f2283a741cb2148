//! Advisory-lock sessions: a dedicated connection each, whose advisory
//! locks are the session's locks. Waits happen in the server, bounded by
//! `lock_timeout`; the locks go when the connection goes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    release_outcome, spawn_cleanup, AcquireRequest, ContendedKeys, Grant, GrantedTokens, Heartbeat,
    HeldLock, Mode, RenewReport, StoreSession,
};
use distlock_core::{Error, Result};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::cancel::{Backend, Cancelled, Canceller};
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

/// The session's statements, prepared once on its connection so that each
/// call is one round trip.
struct Statements {
    /// A try for an advisory lock and, if it got it, a token: exclusive,
    /// shared.
    try_lock: [Statement; 2],
    /// A wait for an advisory lock of at most `$2` (`lock_timeout`), then a
    /// token: exclusive, shared.
    lock: [Statement; 2],
    unlock: [Statement; 2],
}

/// The statements, `{}` standing for the lock function's suffix. Each is
/// one round trip; the subqueries fence the order: timeout, lock, token.
const TRY_LOCK: &str = "SELECT CASE WHEN pg_try_advisory_lock{}($1) \
    THEN nextval('distlock_token_seq') END";
/// The timeout is lifted again before the token is drawn, so that a
/// `lock_not_available` error always means the lock was not taken.
const LOCK: &str = "SELECT nextval('distlock_token_seq') FROM \
    (SELECT set_config('lock_timeout', '0', true) FROM \
        (SELECT pg_advisory_lock{}($1) FROM \
            (SELECT set_config('lock_timeout', $2, true)) AS timeout OFFSET 0) AS locked \
        OFFSET 0) AS lifted OFFSET 0";
const UNLOCK: &str = "SELECT pg_advisory_unlock{}($1)";

pub(crate) struct AdvisorySession {
    client: Arc<Client>,
    backend: Option<Backend>,
    canceller: Arc<Canceller>,
    statements: Statements,
    contended: ContendedKeys,
    /// Answers on the connection, as proof that it lives.
    heartbeat: Heartbeat,
    /// One command at a time: a wait holds the connection, and a dropped
    /// wait keeps it until its clean-up has run.
    turn: Arc<Mutex<()>>,
    target: String,
    /// How long a keep-alive query may take.
    ttl: Duration,
    /// The token of each key held: `pg_advisory_unlock` ends whatever the
    /// connection holds of a key, so a release is checked against it.
    granted: GrantedTokens,
}

impl AdvisorySession {
    /// Readies a session on its connection: no statement timeout (a
    /// server-wide one would end long waits as errors), and its statements
    /// prepared.
    pub(crate) async fn open(
        client: Client,
        canceller: Arc<Canceller>,
        target: String,
        ttl: Duration,
    ) -> Result<Self> {
        let error = |err: tokio_postgres::Error| query_error(&target, err);
        let texts: Vec<String> = [TRY_LOCK, LOCK, UNLOCK]
            .iter()
            .flat_map(|text| ["", "_shared"].map(|suffix| text.replace("{}", suffix)))
            .collect();
        let (timeout, backend) = tokio::join!(
            client.batch_execute("SET statement_timeout = 0"),
            Backend::of(&client, &target)
        );
        timeout.map_err(error)?;
        let mut prepared = Vec::with_capacity(texts.len());
        for text in &texts {
            prepared.push(client.prepare(text).await.map_err(error)?);
        }
        let mut prepared = prepared.into_iter();
        let mut next = || prepared.next().expect("six statements");
        let statements = Statements {
            try_lock: [next(), next()],
            lock: [next(), next()],
            unlock: [next(), next()],
        };
        Ok(AdvisorySession {
            client: Arc::new(client),
            backend,
            canceller,
            statements,
            contended: ContendedKeys::default(),
            heartbeat: Heartbeat::default(),
            turn: Arc::new(Mutex::new(())),
            target,
            ttl,
            granted: GrantedTokens::default(),
        })
    }

    /// The lock statement: a try, or a wait of at most `timeout`.
    async fn lock_query(
        &self,
        index: usize,
        id: i64,
        timeout: Option<&str>,
    ) -> std::result::Result<tokio_postgres::Row, tokio_postgres::Error> {
        match timeout {
            None => {
                self.client
                    .query_one(&self.statements.try_lock[index], &[&id])
                    .await
            }
            Some(timeout) => {
                self.client
                    .query_one(&self.statements.lock[index], &[&id, &timeout])
                    .await
            }
        }
    }

    /// 0 for exclusive, 1 for shared: the statements' order.
    fn mode_index(mode: Mode) -> Result<usize> {
        match mode {
            Mode::Exclusive => Ok(0),
            Mode::Shared => Ok(1),
            Mode::Semaphore { .. } => Err(Error::unsupported(
                "advisory locks have no semaphores; use a postgres://…?mode=lease URL",
            )),
        }
    }

    fn lost(&self) -> Error {
        Error::lost(format!(
            "the connection to PostgreSQL at {} is gone, and with it every lock of the session",
            self.target
        ))
    }
}

/// How long a session's connection waits for a cancel whose answer never
/// came (the store's connection broke) before it takes another statement.
const LATE_CANCEL: Duration = Duration::from_secs(5);

/// Undoes, in the background, an acquire dropped while its query ran: the
/// query is cancelled, and the lock released in case it came first. The
/// connection stays taken until then, so no later command overtakes it.
struct Cleanup {
    turn: Option<OwnedMutexGuard<()>>,
    client: Arc<Client>,
    backend: Option<Backend>,
    canceller: Arc<Canceller>,
    unlock: Statement,
    id: i64,
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
        let (client, backend, canceller, unlock, id) = (
            Arc::clone(&self.client),
            self.backend,
            Arc::clone(&self.canceller),
            self.unlock.clone(),
            self.id,
        );
        spawn_cleanup(async move {
            let cancelled = match backend {
                Some(backend) if !client.is_closed() => canceller.cancel(backend).await,
                _ => Cancelled::Settled,
            };
            if cancelled == Cancelled::Unknown {
                // The cancel may still land: the connection waits, so that it
                // lands on nothing or on the unlock (which then runs again).
                tracing::warn!("a cancel's answer did not come; its session waits {LATE_CANCEL:?}");
                tokio::time::sleep(LATE_CANCEL).await;
            }
            // The unlock runs after the cancelled statement's end.
            for _ in 0..3 {
                match client.query_one(&unlock, &[&id]).await {
                    Err(err) if err.code() == Some(&SqlState::QUERY_CANCELED) => continue,
                    Err(err) if !err.is_closed() => {
                        tracing::warn!(
                            "could not unlock after a dropped acquire ({err}); the lock stays \
                             held until its session ends"
                        );
                        break;
                    }
                    _ => break,
                }
            }
            drop(turn);
        });
    }
}

#[async_trait]
impl StoreSession for AdvisorySession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let index = Self::mode_index(request.mode)?;
        let unlock = self.statements.unlock[index].clone();
        let id = lock_id(&request.key);
        let turn = Arc::clone(&self.turn).lock_owned().await;
        if self.client.is_closed() {
            return Err(self.lost());
        }
        // A wait takes at most a slice of time on the connection, so that the
        // session's releases, renewals and other acquires get their turn in
        // between; the core asks again until its deadline.
        let timeout = request.wait_until.map(|until| {
            let left = until.saturating_duration_since(Instant::now());
            let slice = (self.ttl / 4).clamp(Duration::from_millis(10), WAIT_SLICE);
            // Rounded up, so that a wait never ends early.
            format!("{}ms", (left.as_millis() + 1).min(slice.as_millis()))
        });
        // Armed before the statement is sent: it may take the lock and then
        // fail (or be dropped) before its token comes back.
        let cleanup = Cleanup {
            turn: Some(turn),
            client: Arc::clone(&self.client),
            backend: self.backend,
            canceller: Arc::clone(&self.canceller),
            unlock,
            id,
        };
        // The lock and its token in one statement, so tokens follow the
        // order of grants; a wait tries first unless the key was taken the
        // last time (docs/0007-postgres.md).
        let wait = timeout
            .as_deref()
            .filter(|_| self.contended.contains(&request.key));
        let mut answer = self.lock_query(index, id, wait).await;
        let mut waited = wait.is_some();
        if let (Some(timeout), None, Ok(row)) = (&timeout, &wait, &answer) {
            if row.get::<_, Option<i64>>(0).is_none() {
                self.contended.record(&request.key, true);
                answer = self.lock_query(index, id, Some(timeout)).await;
                waited = true;
            }
        } else if wait.is_some() && rand::random::<u8>() < 16 {
            // Now and then a contended key is tried first again.
            self.contended.record(&request.key, false);
        }
        if answer
            .as_ref()
            .map_or_else(|err| !err.is_closed(), |_| true)
        {
            self.heartbeat.mark();
        }
        match answer {
            Ok(row) => {
                let Some(drawn) = row.get::<_, Option<i64>>(0) else {
                    cleanup.disarm();
                    return Ok(None);
                };
                // A token of a reset sequence is replaced while the lock is
                // held; if that fails, the clean-up gives the lock back.
                let token = tokens::settle(&self.client, &self.target, drawn).await?;
                cleanup.disarm();
                self.granted.granted(&request.key, token);
                Ok(Some(Grant::new(token)))
            }
            // The wait timed out: not taken.
            Err(err) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) && waited => {
                cleanup.disarm();
                Ok(None)
            }
            // Whatever the statement did, the clean-up undoes it.
            Err(err) => Err(query_error(&self.target, err)),
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        if !self.granted.holds(&held.key, held.token) {
            return Err(Error::not_held(&held.key));
        }
        let unlock = &self.statements.unlock[Self::mode_index(held.mode)?];
        let _turn = self.turn.lock().await;
        let row = self
            .client
            .query_one(unlock, &[&lock_id(&held.key)])
            .await
            .map_err(|err| {
                if err.is_closed() {
                    self.lost()
                } else {
                    query_error(&self.target, err)
                }
            })?;
        let released: bool = row.get(0);
        // Not unlocked (another mode named): the hold stays, and so does
        // its token.
        if released {
            self.granted.ended(&held.key, held.token);
        }
        release_outcome(released, &held.key)
    }

    async fn renew(&self, _held: &[HeldLock]) -> Result<RenewReport> {
        if self.client.is_closed() {
            return Err(self.lost());
        }
        // A keep-alive query, on the connection's turn: waits take it for a
        // second at most. Without an answer in time the locks are not
        // counted as renewed (the core asks again until the lease ends).
        let no_answer = || {
            Error::unavailable(format!(
                "PostgreSQL at {} did not answer a keep-alive",
                self.target
            ))
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
            Ok(Err(err)) => return Err(query_error(&self.target, err)),
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
