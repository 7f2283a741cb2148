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
use distlock_core::store::{lock, Backoff};
use distlock_core::store::{
    release_outcome, spawn_cleanup, AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::connect::{pooled, query_error, server_code};
use crate::{tokens, Tokens};

/// `ER_LOCK_DEADLOCK` (SQLSTATE 40001): the server rolled this transaction
/// back to break a deadlock.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// `ER_LOCK_WAIT_TIMEOUT`: a row stayed locked past `innodb_lock_wait_timeout`.
pub(crate) const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;

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

/// The grant: one `CALL` per try. `/*NAME*/` becomes its name, and
/// `/*TOKEN*/` the statements that set `t` to the next token, both by where
/// the tokens come from.
const ACQUIRE_PROCEDURE: &str = include_str!("lease_acquire.sql");

/// The name [`ACQUIRE_PROCEDURE`] has for a store whose tokens come from
/// `tokens`, and how to call it.
fn procedure(tokens: Tokens) -> (&'static str, &'static str) {
    match tokens {
        Tokens::Run => (
            "distlock_lease_acquire_run_v2",
            "CALL distlock_lease_acquire_run_v2(?, ?, ?, ?, ?, ?)",
        ),
        Tokens::Table => (
            "distlock_lease_acquire_tbl_v1",
            "CALL distlock_lease_acquire_tbl_v1(?, ?, ?, ?, ?, ?)",
        ),
    }
}

/// The token of a grant in the server's run, as [`tokens::Run::token`]
/// reckons it (`/*SERVER*/` is [`tokens::SERVER`], `/*END*/` the draws a
/// run has).
const RUN_TOKEN: &str = "BEGIN
            DECLARE e, b, u BIGINT UNSIGNED;
            -- One row, found or not (no warning when not).
            SELECT MAX(epoch), MAX(base) INTO e, b
                FROM distlock_runs WHERE server = /*SERVER*/;
            SET u = UUID_SHORT();
            IF e IS NULL OR e = 0 OR e >= 16777216 OR u < b OR u >= b + /*END*/ THEN
                SIGNAL SQLSTATE '45000' SET MYSQL_ERRNO = 30001,
                    MESSAGE_TEXT = 'distlock: this server has no live token run';
            END IF;
            SET t = e << 40 | (u - b);
        END;";

/// [`ACQUIRE_PROCEDURE`] for a store whose tokens come from `tokens`.
pub(crate) fn acquire_procedure(tokens: Tokens) -> String {
    let run = RUN_TOKEN
        .replace("/*SERVER*/", tokens::SERVER)
        .replace("/*END*/", &tokens::RUN_END.to_string());
    let token = match tokens {
        // The server's run, if live (`tokens::run` reads it the same way);
        // if not, the client begins one and tries again.
        Tokens::Run => run.as_str(),
        Tokens::Table => {
            "INSERT INTO distlock_tokens (key_hash, token) VALUES (kh, LAST_INSERT_ID(1))
                ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1);
            SET t = LAST_INSERT_ID();"
        }
    };
    ACQUIRE_PROCEDURE
        .replace("/*NAME*/", procedure(tokens).0)
        .replace("/*TOKEN*/", token)
}

/// The server's codes for a privilege the user lacks (database, table,
/// global, routine).
const ACCESS_DENIED: [u16; 4] = [1044, 1142, 1227, 1370];

/// `ER_SP_ALREADY_EXISTS`: another client made the procedure first.
const ER_SP_ALREADY_EXISTS: u16 = 1304;

/// Makes the grant's procedure if the database lacks it. Looked up first:
/// making it needs the `CREATE ROUTINE` privilege, which a user that only
/// runs locks need not have once it exists. The look-up finds it only for
/// a user with `EXECUTE`, `ALTER ROUTINE` or `CREATE ROUTINE` on it; one
/// with the last two but not `EXECUTE` is refused at its first `CALL`.
pub(crate) async fn create_procedure(conn: &mut Conn, target: &str, tokens: Tokens) -> Result<()> {
    let (name, _) = procedure(tokens);
    let exists: Option<u8> = conn
        .exec_first(
            "SELECT 1 FROM information_schema.ROUTINES \
             WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = ?",
            (name,),
        )
        .await
        .map_err(|err| query_error(target, err))?;
    if exists.is_some() {
        return Ok(());
    }
    // Not `IF NOT EXISTS`, which MySQL before 8.0.29 lacks.
    match conn.query_drop(acquire_procedure(tokens)).await {
        Ok(()) => Ok(()),
        Err(mysql_async::Error::Server(err)) if err.code == ER_SP_ALREADY_EXISTS => Ok(()),
        Err(mysql_async::Error::Server(err)) if ACCESS_DENIED.contains(&err.code) => {
            Err(Error::config(format!(
                "MySQL at {target}: mode=lease needs the procedure {name}, which this user \
                 does not see (it is missing, or the user has none of EXECUTE, ALTER ROUTINE \
                 and CREATE ROUTINE on the database) and may not create ({}); grant it \
                 EXECUTE, and CREATE ROUTINE unless a user who may connects once with \
                 mode=lease first",
                err.message
            )))
        }
        Err(err) => Err(query_error(target, err)),
    }
}

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
    /// The grant's `CALL` statement.
    call: &'static str,
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
            call: procedure(tokens).1,
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
}

/// One acquire: what its tries need, owned, so that they run in a task of
/// their own (a `CALL` once sent runs to its end at the server, even if the
/// acquire is dropped, and a grant it makes must then be given back).
struct Attempt {
    pool: Pool,
    target: String,
    call: &'static str,
    key: String,
    holder: String,
    mode: String,
    permits: u32,
    ttl_us: u64,
    owner: String,
}

impl Attempt {
    /// Tries until an answer that is not a deadlock the server broke by
    /// rolling this try back (at most 4 tries); with the send time of the
    /// last, and what became of its `CALL`.
    async fn run(&self) -> (Instant, Result<Option<u64>>, Call) {
        let mut attempts = 0;
        loop {
            let sent = Instant::now();
            match self.once().await {
                (Err(err), _) if attempts < 3 && server_code(&err) == Some(ER_LOCK_DEADLOCK) => {
                    attempts += 1;
                }
                // Rolled back: no hold was added. The run begins, and the
                // grant is tried again.
                (Err(err), call) if attempts < 3 && server_code(&err) == Some(tokens::NO_RUN) => {
                    attempts += 1;
                    let begun = match pooled(&self.pool, &self.target).await {
                        Ok(mut conn) => tokens::run(&mut conn, &self.target, None).await,
                        Err(err) => Err(err),
                    };
                    if let Err(err) = begun {
                        return (sent, Err(err), call);
                    }
                }
                (result, call) => return (sent, result, call),
            }
        }
    }

    /// Runs the tries, hands their outcome to the acquire, and gives the
    /// hold back by name if the acquire is gone, or if a `CALL` that was
    /// sent failed: at once, and again once a `CALL` whose connection broke
    /// can no longer commit ([`SETTLED_AFTER`]).
    async fn run_and_settle(self, answer: oneshot::Sender<(Instant, Result<Option<u64>>)>) {
        let (sent, result, call) = self.run().await;
        let failed = result.is_err();
        let give_back = match answer.send((sent, result)) {
            Err((_, result)) => !matches!(result, Ok(None)),
            Ok(()) => failed && call != Call::NotSent,
        };
        if give_back {
            delete_holder(&self.pool, &self.holder).await;
            if call == Call::Cut {
                tokio::time::sleep(SETTLED_AFTER).await;
                delete_holder(&self.pool, &self.holder).await;
            }
        }
    }

    /// One try, in one transaction and one round trip
    /// ([`ACQUIRE_PROCEDURE`]): `Some(token)` if granted; with what became
    /// of its `CALL`.
    async fn once(&self) -> (Result<Option<u64>>, Call) {
        // Read committed, set for the pool's connections.
        let mut conn = match pooled(&self.pool, &self.target).await {
            Ok(conn) => conn,
            Err(err) => return (Err(err), Call::NotSent),
        };
        let params = (
            &self.key,
            &self.holder,
            &self.mode,
            self.permits,
            self.ttl_us,
            &self.owner,
        );
        let answer: Option<(Option<u64>, Option<String>)> =
            match conn.exec_first(self.call, params).await {
                Ok(answer) => answer,
                Err(err) => {
                    let call = if err.is_fatal() {
                        Call::Cut
                    } else {
                        Call::Answered
                    };
                    // A `KILL QUERY` ends the procedure without its handler's
                    // rollback; the pool does not reset its connections.
                    let _ = conn.query_drop("ROLLBACK").await;
                    return (Err(call_error(&self.target, err)), call);
                }
            };
        (self.answer(answer), Call::Answered)
    }

    /// What the procedure's answer row means.
    fn answer(&self, answer: Option<(Option<u64>, Option<String>)>) -> Result<Option<u64>> {
        let (key, mode, permits) = (&self.key, &self.mode, self.permits);
        match answer {
            Some((Some(token), _)) => Ok(Some(token)),
            Some((None, Some(held)))
                if mode.starts_with('p') && held.starts_with('p') && held != *mode =>
            {
                Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "cannot lock '{key}' as asked: the semaphore is held with {} permits, \
                         not {permits}",
                        &held[1..]
                    ),
                ))
            }
            Some((None, _)) => Ok(None),
            None => Err(Error::store(format!(
                "MySQL at {} answered an acquire with no row",
                self.target
            ))),
        }
    }
}

/// `ER_PROCACCESS_DENIED_ERROR`: the user may not run the procedure.
const ER_PROCACCESS_DENIED: u16 = 1370;

fn call_error(target: &str, err: mysql_async::Error) -> Error {
    match &err {
        mysql_async::Error::Server(server) if server.code == ER_PROCACCESS_DENIED => {
            Error::config(format!(
                "MySQL at {target}: this user may not run distlock's acquire procedure ({}); \
                 grant it EXECUTE on the database",
                server.message
            ))
            .with_source(err)
        }
        _ => query_error(target, err),
    }
}

#[async_trait]
impl StoreSession for LeaseSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let holder = format!("{}|{:016x}", self.id, rand::random::<u64>());
        let attempt = Attempt {
            pool: self.pool.clone(),
            target: self.target.clone(),
            call: self.call,
            key: request.key.clone(),
            holder: holder.clone(),
            mode: request.mode.tag(),
            permits: request.mode.permits(),
            ttl_us: micros(self.ttl),
            owner: self.owner.clone(),
        };
        // The task gives the hold back if the tries fail, or if this
        // acquire is dropped before their outcome is sent; `undo`, if it is
        // dropped while waiting for it (needed once it was sent: a grant
        // committed before; harmless before).
        let mut undo = Undo {
            pool: self.pool.clone(),
            holder: holder.clone(),
            armed: true,
        };
        let (answer, answered) = oneshot::channel();
        tokio::spawn(attempt.run_and_settle(answer));
        let (sent, granted) = answered
            .await
            .map_err(|_| Error::store("an acquire's task ended without an answer"))?;
        undo.armed = false;
        let granted = match granted {
            Ok(granted) => granted,
            // The key's row stayed locked (a client gone mid-transaction):
            // busy for now.
            Err(err) if server_code(&err) == Some(ER_LOCK_WAIT_TIMEOUT) => None,
            Err(err) => return Err(err),
        };
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

/// Deletes the hold named `holder`, if there is one: asked up to 5 times
/// over about 6 s, then left to run out with its lease, with a warning.
async fn delete_holder(pool: &Pool, holder: &str) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    for _ in 0..5 {
        let deleted = async {
            let mut conn = pool.get_conn().await?;
            conn.exec_drop("DELETE FROM distlock_leases WHERE holder = ?", (holder,))
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), deleted).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => tracing::debug!(holder, "giving back a hold: {err}"),
            Err(_) => tracing::debug!(holder, "giving back a hold: no answer in 5 s"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    tracing::warn!(holder, "could not give back a hold; it ends with its lease");
}

/// What became of a try's `CALL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Never sent (no connection): it holds nothing.
    NotSent,
    /// The server answered: it has ended.
    Answered,
    /// Its connection broke: the server may still be running it, and may
    /// commit a hold after a give-back.
    Cut,
}

/// How long a `CALL` whose connection broke may still run at the server:
/// its waits for the key's row (`innodb_lock_wait_timeout`) and for a
/// table's metadata lock (`lock_wait_timeout`), both set on the lease
/// pool's connections, and a margin for the rest.
const SETTLED_AFTER: Duration = Duration::from_secs(ROW_LOCK_WAIT_S + TABLE_LOCK_WAIT_S + 2);

/// `innodb_lock_wait_timeout` of the lease pool's connections, in seconds.
pub(crate) const ROW_LOCK_WAIT_S: u64 = 1;

/// `lock_wait_timeout` of the lease pool's connections, in seconds.
pub(crate) const TABLE_LOCK_WAIT_S: u64 = 2;

/// Gives back, in the background, the hold of an acquire dropped while
/// its outcome waited to be read: its row (if any) is deleted by name.
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
        spawn_cleanup(async move { delete_holder(&pool, &holder).await });
    }
}

#[cfg(test)]
mod tests {
    use mysql_async::prelude::Queryable;

    use super::{create_procedure, procedure};
    use crate::{MysqlStore, Tokens};

    /// One `CALL` of the table-token procedure: (token, a held mode).
    async fn try_as(
        conn: &mut mysql_async::Conn,
        key: &str,
        holder: &str,
        mode: &str,
    ) -> (Option<u64>, Option<String>) {
        let call = procedure(Tokens::Table).1;
        let permits = u32::from(mode == "p2") * 2;
        conn.exec_first(call, (key, holder, mode, permits, 5_000_000_u64, "test"))
            .await
            .expect("call")
            .expect("a row")
    }

    /// The test server is a MariaDB, so the suite runs the `run` body;
    /// this runs the other one (MySQL's, and Galera's) on the same tables.
    #[tokio::test]
    async fn the_token_table_procedure_grants_with_rising_tokens() {
        let url = distlock_testkit::servers::Mariadb::shared().url();
        MysqlStore::connect(&format!("{url}?mode=lease"))
            .await
            .expect("connect, making the tables");
        let opts = mysql_async::Opts::from_url(&url).expect("url");
        let mut conn = mysql_async::Conn::new(opts).await.expect("connect");
        create_procedure(&mut conn, "test", Tokens::Table)
            .await
            .expect("make the procedure");
        // Again, as a second client would: it is there.
        create_procedure(&mut conn, "test", Tokens::Table)
            .await
            .expect("find the procedure");
        let key = format!("tbl-{:x}", rand::random::<u64>());
        let (first, _) = try_as(&mut conn, &key, "a", "x").await;
        let first = first.expect("granted");
        assert_eq!(
            try_as(&mut conn, &key, "b", "x").await,
            (None, Some("x".to_owned())),
            "busy"
        );
        let (_, held) = try_as(&mut conn, &key, "c", "p2").await;
        assert_eq!(held.as_deref(), Some("x"), "busy, held exclusively");
        conn.exec_drop("DELETE FROM distlock_leases WHERE holder = 'a'", ())
            .await
            .expect("release");
        let (second, _) = try_as(&mut conn, &key, "b", "x").await;
        assert!(second.expect("granted") > first, "tokens did not rise");
    }
}

/// The clean-up of a failed acquire runs to its end: it must not panic
/// (as one that polled its finished task again did).
#[cfg(test)]
mod cleanup {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use distlock_core::{Client, ErrorKind};

    use crate::MysqlStore;

    static PANICS: AtomicUsize = AtomicUsize::new(0);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_acquire_gives_back_without_a_panic() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        let url = distlock_testkit::servers::Mariadb::shared().url();
        let store = MysqlStore::connect(&format!("{url}?mode=lease"))
            .await
            .expect("connect");
        let client = Client::new(Arc::new(store));
        let (a, b) = (
            client.session().open().await.expect("open"),
            client.session().open().await.expect("open"),
        );
        let key = format!("cleanup-{:x}", rand::random::<u64>());
        let _held = a.semaphore(&key, 2).await.expect("free");
        let refused = b.semaphore(&key, 3).try_lock().await;
        assert_eq!(
            refused.expect_err("other permits").kind(),
            ErrorKind::Conflict
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let panics = PANICS.load(Ordering::SeqCst);
        // The default hook again, for the tests after this one.
        drop(std::panic::take_hook());
        assert_eq!(panics, 0, "a clean-up task panicked");
    }
}
