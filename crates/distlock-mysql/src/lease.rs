//! Lease-table sessions (`?mode=lease`): a row per holder with the time its
//! lease ends by the server's clock. Each change is a transaction that
//! first locks the key's row in `distlock_keys`, so two acquires of one key
//! take turns; releases and renewals name the holder, so no session touches
//! another's hold. MySQL has no notifications: the core polls a busy key
//! with jittered back-off.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::lock;
use distlock_core::store::{
    release_outcome, spawn_cleanup, AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, TxOpts};
use tokio::time::Instant;

use crate::connect::{pooled, query_error, server_code};
use crate::{Tokens, NEXT_TOKEN};

/// `ER_LOCK_DEADLOCK` (SQLSTATE 40001): the server rolled this transaction
/// back to break a deadlock.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// `ER_LOCK_WAIT_TIMEOUT`: a row stayed locked past `innodb_lock_wait_timeout`.
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

pub(crate) const SETUP: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS distlock_keys (
        key_hash BINARY(32) PRIMARY KEY
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS distlock_leases (
        key_hash BINARY(32) NOT NULL,
        holder VARCHAR(64) NOT NULL,
        mode VARCHAR(16) NOT NULL,
        expires_at DATETIME(6) NOT NULL,
        lock_key VARBINARY(1024) NULL,
        owner VARCHAR(256) CHARACTER SET utf8mb4 NULL,
        token BIGINT UNSIGNED NULL,
        granted_at DATETIME(6) NULL,
        PRIMARY KEY (key_hash, holder),
        KEY (holder)
    ) ENGINE=InnoDB",
];

/// The columns `status` reads, which a table made by an older version
/// lacks (its rows have them NULL): the key itself, the owner, the token
/// and the grant time.
const STATUS_COLUMNS: [(&str, &str); 4] = [
    ("lock_key", "VARBINARY(1024) NULL"),
    ("owner", "VARCHAR(256) CHARACTER SET utf8mb4 NULL"),
    ("token", "BIGINT UNSIGNED NULL"),
    ("granted_at", "DATETIME(6) NULL"),
];

/// `ER_DUP_FIELDNAME`: another client added the column first.
const ER_DUP_FIELDNAME: u16 = 1060;

/// Adds the [`STATUS_COLUMNS`] a table of an older version lacks. Looked up
/// first, since MySQL 8 has no `ADD COLUMN IF NOT EXISTS` and an `ALTER
/// TABLE` takes a metadata lock even when there is nothing to do.
pub(crate) async fn add_status_columns(conn: &mut Conn, target: &str) -> Result<()> {
    let present: Vec<String> = conn
        .query(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'distlock_leases'",
        )
        .await
        .map_err(|err| query_error(target, err))?;
    for (name, definition) in STATUS_COLUMNS {
        if present
            .iter()
            .any(|column| column.eq_ignore_ascii_case(name))
        {
            continue;
        }
        // A metadata lock that waits (a client gone mid-transaction) queues
        // every lease transaction behind it: give up after 2 s and say so.
        // The pool's reset of the connection undoes the setting.
        conn.query_drop("SET SESSION lock_wait_timeout = 2")
            .await
            .map_err(|err| query_error(target, err))?;
        let added = conn
            .query_drop(format!(
                "ALTER TABLE distlock_leases ADD COLUMN {name} {definition}"
            ))
            .await;
        match added {
            Err(mysql_async::Error::Server(err)) if err.code == ER_DUP_FIELDNAME => {}
            other => other.map_err(|err| query_error(target, err))?,
        }
    }
    Ok(())
}

pub(crate) struct LeaseSession {
    pool: Pool,
    target: String,
    tokens: Tokens,
    id: String,
    ttl: Duration,
    /// Written with each hold, for `status`.
    owner: String,
    /// The holds of this session, by key: token and holder name.
    held: Mutex<HashMap<String, (u64, String)>>,
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl LeaseSession {
    pub(crate) fn new(
        pool: Pool,
        target: String,
        tokens: Tokens,
        options: &SessionOptions,
    ) -> Self {
        LeaseSession {
            pool,
            target,
            tokens,
            id: format!("{:016x}", rand::random::<u64>()),
            ttl: options.ttl,
            owner: options.owner.clone(),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, (u64, String)>> {
        lock(&self.held)
    }

    fn error(&self, err: mysql_async::Error) -> Error {
        query_error(&self.target, err)
    }

    fn holder_of(&self, lock: &HeldLock) -> Option<String> {
        self.held()
            .get(&lock.key)
            .filter(|(token, _)| *token == lock.token)
            .map(|(_, holder)| holder.clone())
    }

    fn forget(&self, lock: &HeldLock) {
        let mut held = self.held();
        if held
            .get(&lock.key)
            .is_some_and(|(token, _)| *token == lock.token)
        {
            held.remove(&lock.key);
        }
    }

    /// One try, in one transaction: `Some(token)` if granted.
    async fn try_acquire(
        &self,
        key: &str,
        mode: &str,
        permits: u32,
        holder: &str,
    ) -> Result<Option<u64>> {
        // Read committed, set for the pool's connections.
        let mut conn = pooled(&self.pool, &self.target).await?;
        let mut tx = conn
            .start_transaction(TxOpts::default())
            .await
            .map_err(|err| self.error(err))?;
        let run = async {
            // Locks the key's row at once (an INSERT IGNORE then a SELECT
            // … FOR UPDATE would take a shared lock first, and two acquires
            // upgrading theirs deadlock).
            tx.exec_drop(
                "INSERT INTO distlock_keys (key_hash) VALUES (UNHEX(SHA2(?, 256)))
                 ON DUPLICATE KEY UPDATE key_hash = key_hash",
                (key,),
            )
            .await?;
            tx.exec_drop(
                "DELETE FROM distlock_leases
                 WHERE key_hash = UNHEX(SHA2(?, 256)) AND expires_at <= UTC_TIMESTAMP(6)",
                (key,),
            )
            .await?;
            let holders: Vec<String> = tx
                .exec(
                    "SELECT mode FROM distlock_leases WHERE key_hash = UNHEX(SHA2(?, 256))",
                    (key,),
                )
                .await?;
            Ok::<_, mysql_async::Error>(holders)
        };
        let holders = run.await.map_err(|err| self.error(err))?;
        if let Some(held) = holders.first() {
            if mode.starts_with('p') && held.starts_with('p') && held != mode {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "cannot lock '{key}' as asked: the semaphore is held with {} permits, \
                         not {permits}",
                        &held[1..]
                    ),
                ));
            }
        }
        let free = holders.is_empty()
            || (mode == "s" && holders.iter().all(|held| held == "s"))
            || (mode.starts_with('p')
                && holders.iter().all(|held| held == mode)
                && holders.len() < permits as usize);
        if !free {
            // Dropping the transaction rolls it back.
            return Ok(None);
        }
        // The token first, so that the row keeps it; the key's row lock
        // orders the grants of a key either way.
        let grant = async {
            let token: Option<u64> = match self.tokens {
                Tokens::Sequence => tx.query_first("SELECT NEXTVAL(distlock_token_seq)").await?,
                Tokens::Table => {
                    tx.exec_drop(NEXT_TOKEN, (key,)).await?;
                    tx.last_insert_id()
                }
            };
            let Some(token) = token else {
                return Ok(None);
            };
            tx.exec_drop(
                "INSERT INTO distlock_leases
                 (key_hash, holder, mode, expires_at, lock_key, owner, token, granted_at)
                 VALUES (UNHEX(SHA2(?, 256)), ?, ?, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND,
                         ?, ?, ?, UTC_TIMESTAMP(6))",
                (key, holder, mode, micros(self.ttl), key, &self.owner, token),
            )
            .await?;
            tx.commit().await?;
            Ok::<_, mysql_async::Error>(Some(token))
        };
        let token = grant.await.map_err(|err| self.error(err))?;
        token
            .map(Some)
            .ok_or_else(|| Error::store(format!("MySQL at {} returned no token", self.target)))
    }
}

#[async_trait]
impl StoreSession for LeaseSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (mode, permits) = (request.mode.tag(), request.mode.permits());
        let holder = format!("{}|{:016x}", self.id, rand::random::<u64>());
        // Dropped, or failed, after the commit was sent, the hold may be
        // there: it is given back by its unique name.
        let mut undo = Undo {
            pool: self.pool.clone(),
            holder: holder.clone(),
            armed: true,
        };
        let mut attempts = 0;
        let (sent, granted) = loop {
            let sent = Instant::now();
            match self
                .try_acquire(&request.key, &mode, permits, &holder)
                .await
            {
                Ok(granted) => break (sent, granted),
                // A deadlock the server broke by rolling this one back.
                Err(err) if attempts < 3 && server_code(&err) == Some(ER_LOCK_DEADLOCK) => {
                    attempts += 1
                }
                // The key's row stayed locked (a client gone mid-transaction):
                // busy for now.
                Err(err) if server_code(&err) == Some(ER_LOCK_WAIT_TIMEOUT) => {
                    undo.armed = false;
                    return Ok(None);
                }
                Err(err) => return Err(err),
            }
        };
        undo.armed = false;
        Ok(granted.map(|token| {
            self.held().insert(request.key.clone(), (token, holder));
            Grant::new(token).with_lease_from(sent)
        }))
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(holder) = self.holder_of(held) else {
            return Err(Error::not_held(&held.key));
        };
        let mut conn = pooled(&self.pool, &self.target).await?;
        conn.exec_drop(
            "DELETE FROM distlock_leases
             WHERE key_hash = UNHEX(SHA2(?, 256)) AND holder = ? AND expires_at > UTC_TIMESTAMP(6)",
            (&held.key, &holder),
        )
        .await
        .map_err(|err| self.error(err))?;
        let released = conn.affected_rows() == 1;
        self.forget(held);
        release_outcome(released, &held.key)
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        if held.is_empty() {
            return Ok(RenewReport::all_held());
        }
        let holders: Vec<(String, String)> = held
            .iter()
            .map(|lock| (lock.key.clone(), self.holder_of(lock).unwrap_or_default()))
            .collect();
        let list = vec!["?"; holders.len()].join(", ");
        let names: Vec<mysql_async::Value> = holders
            .iter()
            .map(|(_, holder)| holder.clone().into())
            .collect();
        let mut conn = pooled(&self.pool, &self.target).await?;
        let mut extend = vec![mysql_async::Value::from(micros(self.ttl))];
        extend.extend(names.iter().cloned());
        conn.exec_drop(
            format!(
                "UPDATE distlock_leases SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND
                 WHERE holder IN ({list}) AND expires_at > UTC_TIMESTAMP(6)"
            ),
            mysql_async::Params::Positional(extend),
        )
        .await
        .map_err(|err| self.error(err))?;
        let kept: Vec<String> = conn
            .exec(
                format!(
                    "SELECT holder FROM distlock_leases
                     WHERE holder IN ({list}) AND expires_at > UTC_TIMESTAMP(6)"
                ),
                mysql_async::Params::Positional(names),
            )
            .await
            .map_err(|err| self.error(err))?;
        let mut lost = Vec::new();
        for (lock, (_, holder)) in held.iter().zip(&holders) {
            if !kept.contains(holder) {
                self.forget(lock);
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        let holders: Vec<String> = self.held().drain().map(|(_, (_, holder))| holder).collect();
        if holders.is_empty() {
            return Ok(());
        }
        let list = vec!["?"; holders.len()].join(", ");
        let names: Vec<mysql_async::Value> = holders.into_iter().map(Into::into).collect();
        let mut conn = pooled(&self.pool, &self.target).await?;
        conn.exec_drop(
            format!("DELETE FROM distlock_leases WHERE holder IN ({list})"),
            mysql_async::Params::Positional(names),
        )
        .await
        .map_err(|err| self.error(err))?;
        Ok(())
    }
}

/// Gives back, in the background, a hold whose acquire was dropped or
/// failed after it may have committed.
struct Undo {
    pool: Pool,
    holder: String,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (pool, holder) = (self.pool.clone(), std::mem::take(&mut self.holder));
        spawn_cleanup(async move {
            if let Ok(mut conn) = pool.get_conn().await {
                let _ = conn
                    .exec_drop("DELETE FROM distlock_leases WHERE holder = ?", (holder,))
                    .await;
            }
        });
    }
}
