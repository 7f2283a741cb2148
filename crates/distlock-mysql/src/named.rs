//! Named-lock sessions: a dedicated connection each, whose `GET_LOCK` locks
//! are the session's locks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, GrantedTokens, Heartbeat, HeldLock, Mode, RenewReport, StoreSession,
};
use distlock_core::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Statement};
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::{oneshot, Mutex, Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::connect::query_error;
use crate::Tokens;

/// The longest lock name the server takes, in characters.
const MAX_NAME: usize = 64;

/// What the name of a key that is its own name starts with.
pub(crate) const NAME_PREFIX: &str = "dl:";

/// The server's name for lock `key`: `dl:KEY` for a short key of printable
/// ASCII, else `dl#HASH#` and the key's first ASCII letters and digits.
/// Servers limit names (64 characters on MySQL, 192 bytes on MariaDB), MySQL
/// takes no 4-byte characters in them and converts them by the connection's
/// character set; an ASCII name avoids all three. MySQL also compares names
/// without case, so `Job` and `job` share a lock there, as do two keys
/// whose hashes collide: one may wait for the other, but two never hold
/// either at once.
pub(crate) fn lock_name(key: &str) -> String {
    let printable = key.bytes().all(|byte| (0x20..0x7f).contains(&byte));
    if printable && key.len() + NAME_PREFIX.len() <= MAX_NAME {
        return format!("{NAME_PREFIX}{key}");
    }
    let hash = distlock_core::key_hash(key);
    let head: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(MAX_NAME - 20)
        .collect();
    format!("dl#{hash:016x}#{head}")
}

/// The longest a wait holds the session's connection at a time (and at
/// most a quarter of the session's TTL).
const WAIT_SLICE: Duration = Duration::from_secs(1);

/// The connection, taken in turns; `None` once it broke.
type Turn = Arc<Mutex<Option<Conn>>>;

pub(crate) struct NamedSession {
    conn: Turn,
    /// Answers on the connection, as proof that it lives.
    heartbeat: Arc<Heartbeat>,
    /// The server's id of the connection, for `KILL QUERY`.
    id: u32,
    pool: Pool,
    target: String,
    tokens: Tokens,
    /// The lock (and token) statement, prepared.
    lock: Statement,
    release: Statement,
    ttl: Duration,
    /// The token of each key held: `RELEASE_LOCK` ends whatever the
    /// connection holds of a name, so a release is checked against it.
    granted: GrantedTokens,
}

impl NamedSession {
    /// Readies a session on its dedicated connection, its statements
    /// prepared once.
    pub(crate) async fn open(
        mut conn: Conn,
        pool: Pool,
        target: String,
        tokens: Tokens,
        ttl: Duration,
    ) -> Result<Self> {
        // With a sequence, the lock and its token are one statement: the
        // token is drawn only if the lock was got. Either way 0 or NULL is
        // "not got".
        let lock = match tokens {
            Tokens::Sequence => "SELECT IF(GET_LOCK(?, ?) = 1, NEXTVAL(distlock_token_seq), 0)",
            Tokens::Table => "SELECT GET_LOCK(?, ?)",
        };
        let failed = |err: mysql_async::Error| query_error(&target, err);
        let lock = conn.prep(lock).await.map_err(failed)?;
        let release = conn.prep("SELECT RELEASE_LOCK(?)").await.map_err(failed)?;
        Ok(NamedSession {
            lock,
            release,
            tokens,
            id: conn.id(),
            conn: Arc::new(Mutex::new(Some(conn))),
            heartbeat: Arc::default(),
            pool,
            target,
            ttl,
            granted: GrantedTokens::default(),
        })
    }

    fn lost(&self) -> Error {
        Error::lost(format!(
            "the connection to MySQL at {} is gone, and with it every lock of the session",
            self.target
        ))
    }

    /// A failed statement; a broken connection is forgotten.
    fn failed(&self, conn: &mut Option<Conn>, err: mysql_async::Error) -> Error {
        if err.is_fatal() {
            conn.take();
            self.lost()
        } else {
            query_error(&self.target, err)
        }
    }
}

/// Takes the lock in a task of its own, so that the query is never dropped
/// half-way (which would break the connection); hands the answer over, or
/// gives the lock back if nobody takes the answer.
async fn get_lock(
    mut turn: OwnedMutexGuard<Option<Conn>>,
    (name, key): (String, String),
    timeout: f64,
    (tokens, target, lock): (Tokens, String, Statement),
    state: Arc<WaitState>,
    heartbeat: Arc<Heartbeat>,
    answer: oneshot::Sender<std::result::Result<Option<u64>, mysql_async::Error>>,
) {
    let Some(conn) = turn.as_mut() else {
        state.finish().await;
        return;
    };
    let got: std::result::Result<Option<Option<u64>>, _> =
        conn.exec_first(lock, (&name, timeout)).await;
    if !got.as_ref().is_err_and(mysql_async::Error::is_fatal) {
        heartbeat.mark();
    }
    // A KILL QUERY on its way must land before the connection moves on.
    state.finish().await;
    let (mut got, mut token) = match got {
        Ok(Some(Some(drawn))) if drawn > 0 => {
            (Ok(true), Some(drawn).filter(|_| tokens == Tokens::Sequence))
        }
        Ok(_) => (Ok(false), None),
        Err(err) => (Err(err), None),
    };
    // The statement failed, perhaps after GET_LOCK took the lock (the draw
    // failed, or a KILL QUERY landed late): give back what it took.
    if let (Err(err), Some(conn)) = (&got, turn.as_mut()) {
        if !err.is_fatal() && holds(conn, &name).await {
            give_back(conn, &name).await;
        }
    }
    // The token, on this connection, before anything else it does, so
    // tokens follow the order of grants (docs/0008-mysql.md).
    if let (Ok(true), Some(conn)) = (&got, turn.as_mut()) {
        match tokens {
            Tokens::Table => match conn.exec_drop(crate::NEXT_TOKEN, (&key,)).await {
                Ok(()) => token = conn.last_insert_id(),
                Err(err) => got = Err(err),
            },
            // Outside a live epoch (the epoch nearly spent): a new one,
            // while the lock is held, and a token of it.
            Tokens::Sequence if !token.is_some_and(crate::tokens::live) => {
                token = None;
                match redraw(conn, &target).await {
                    Ok(drawn) => token = Some(drawn),
                    Err(err) => got = Err(mysql_async::Error::Other(err.to_string().into())),
                }
            }
            Tokens::Sequence => {}
        }
        if got.is_ok() && token.is_none() {
            got = Err(mysql_async::Error::Other("no token was returned".into()));
        }
        if got.is_err() {
            give_back(conn, &name).await;
        }
    }
    if got.as_ref().is_err_and(mysql_async::Error::is_fatal) {
        turn.take();
    }
    let got = got.map(|got| if got { token } else { None });
    if let Err(Ok(Some(_))) = answer.send(got) {
        // Nobody waits for it any more.
        if let Some(conn) = turn.as_mut() {
            give_back(conn, &name).await;
        }
    }
}

/// Whether this connection holds the named lock `name`.
async fn holds(conn: &mut Conn, name: &str) -> bool {
    let owner: std::result::Result<Option<Option<i64>>, _> = conn
        .exec_first("SELECT IS_USED_LOCK(?) = CONNECTION_ID()", (name,))
        .await;
    matches!(owner, Ok(Some(Some(1))))
}

/// A token of a new epoch, for a draw that fell outside a live one.
async fn redraw(conn: &mut Conn, target: &str) -> Result<u64> {
    crate::tokens::ensure_epoch(conn, target, true).await?;
    let drawn: Option<u64> = conn
        .query_first("SELECT NEXTVAL(distlock_token_seq)")
        .await
        .map_err(|err| query_error(target, err))?;
    drawn
        .filter(|drawn| crate::tokens::live(*drawn))
        .ok_or_else(|| {
            Error::store(format!(
                "MariaDB at {target}: distlock_token_seq gave no token of a live epoch"
            ))
        })
}

/// Releases `name` once, again if a KILL QUERY interrupted the release.
async fn give_back(conn: &mut Conn, name: &str) {
    for _ in 0..3 {
        let released: std::result::Result<Option<Option<i64>>, _> =
            conn.exec_first("SELECT RELEASE_LOCK(?)", (name,)).await;
        match released {
            Err(mysql_async::Error::Server(err)) if err.code == 1317 => continue,
            _ => return,
        }
    }
}

/// Where a lock query stands, between the task that runs it and the
/// acquire that may be dropped: a kill is sent only while the query waits,
/// and the query's task holds the connection until the kill has landed.
struct WaitState {
    /// 0: waiting; 1: answered; 2: being killed.
    state: AtomicU8,
    killed: Notify,
}

impl WaitState {
    fn new() -> Arc<Self> {
        Arc::new(WaitState {
            state: AtomicU8::new(0),
            killed: Notify::new(),
        })
    }

    /// The query answered; waits for a kill under way to land.
    async fn finish(&self) {
        if self
            .state
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            let _ = tokio::time::timeout(Duration::from_secs(10), self.killed.notified()).await;
        }
    }

    /// Claims the right to kill: only while the query still waits.
    fn start_kill(&self) -> bool {
        self.state
            .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// An acquire under way. Dropped before it is done, it stops the wait
/// (`KILL QUERY` while the lock is still awaited) and gives back the lock
/// if it came.
struct Pending {
    answer: oneshot::Receiver<std::result::Result<Option<u64>, mysql_async::Error>>,
    state: Arc<WaitState>,
    done: bool,
    conn: Turn,
    pool: Pool,
    id: u32,
    name: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.state.start_kill() {
            let (pool, id, state) = (self.pool.clone(), self.id, Arc::clone(&self.state));
            runtime.spawn(async move {
                if let Ok(mut killer) = pool.get_conn().await {
                    let _ = killer.query_drop(format!("KILL QUERY {id}")).await;
                }
                state.killed.notify_one();
            });
        }
        self.answer.close();
        let came = matches!(self.answer.try_recv(), Ok(Ok(Some(_))));
        if came {
            // Named locks count per connection: releasing once undoes this
            // grant even if a later acquire took the name again.
            let (conn, name) = (Arc::clone(&self.conn), std::mem::take(&mut self.name));
            runtime.spawn(async move {
                let mut turn = conn.lock().await;
                if let Some(conn) = turn.as_mut() {
                    give_back(conn, &name).await;
                }
            });
        }
    }
}

#[async_trait]
impl StoreSession for NamedSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        if request.mode != Mode::Exclusive {
            return Err(Error::unsupported(
                "MySQL named locks are exclusive only; use a mysql://…?mode=lease URL for \
                 shared locks and semaphores",
            ));
        }
        let name = lock_name(&request.key);
        let timeout = match request.wait_until {
            None => 0.0,
            Some(until) => {
                // Whole milliseconds, rounded up, so that the wait never ends
                // early; in slices, so that the session's releases and
                // renewals get their turn on the connection in between (the
                // core asks again until its deadline).
                let left = until.saturating_duration_since(Instant::now());
                let slice = (self.ttl / 4).clamp(Duration::from_millis(10), WAIT_SLICE);
                (left.as_millis() + 1).min(slice.as_millis()) as f64 / 1000.0
            }
        };
        let turn = Arc::clone(&self.conn).lock_owned().await;
        if turn.is_none() {
            return Err(self.lost());
        }
        let (answer, answered) = oneshot::channel();
        let state = WaitState::new();
        tokio::spawn(get_lock(
            turn,
            (name.clone(), request.key.clone()),
            timeout,
            (self.tokens, self.target.clone(), self.lock.clone()),
            Arc::clone(&state),
            Arc::clone(&self.heartbeat),
            answer,
        ));
        let mut pending = Pending {
            answer: answered,
            state,
            done: false,
            conn: Arc::clone(&self.conn),
            pool: self.pool.clone(),
            id: self.id,
            name,
        };
        let answer = (&mut pending.answer).await;
        pending.done = true;
        match answer {
            Ok(Ok(got)) => {
                if let Some(token) = got {
                    self.granted.granted(&request.key, token);
                }
                Ok(got.map(Grant::new))
            }
            Ok(Err(err)) if !err.is_fatal() => Err(query_error(&self.target, err)),
            Ok(Err(_)) | Err(_) => Err(self.lost()),
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        if !self.granted.holds(&held.key, held.token) {
            return Err(Error::not_held(&held.key));
        }
        let mut turn = self.conn.lock().await;
        let Some(conn) = turn.as_mut() else {
            return Err(self.lost());
        };
        let released: std::result::Result<Option<Option<i64>>, _> = conn
            .exec_first(&self.release, (lock_name(&held.key),))
            .await;
        if released.is_ok() {
            self.granted.ended(&held.key, held.token);
        }
        match released {
            Ok(Some(Some(1))) => Ok(()),
            Ok(_) => Err(Error::not_held(&held.key)),
            Err(err) => Err(self.failed(&mut turn, err)),
        }
    }

    async fn renew(&self, _held: &[HeldLock]) -> Result<RenewReport> {
        // A ping on the connection's turn (waits take it for a slice at
        // most); without an answer in time the locks are not counted as
        // renewed.
        let no_answer =
            || Error::unavailable(format!("MySQL at {} did not answer a ping", self.target));
        // Or, while waits keep the connection busy, an answer to one of
        // them that came after this renewal began.
        let start = Instant::now();
        let deadline = start + self.ttl / 3;
        let mut turn = tokio::select! {
            turn = tokio::time::timeout_at(deadline, self.conn.lock()) => {
                turn.map_err(|_| no_answer())?
            }
            alive = self.heartbeat.answered_since(start, deadline) => {
                return if alive { Ok(RenewReport::all_held()) } else { Err(no_answer()) };
            }
        };
        let Some(conn) = turn.as_mut() else {
            return Err(self.lost());
        };
        match tokio::time::timeout_at(deadline, conn.ping()).await {
            Ok(Ok(())) => {
                self.heartbeat.mark();
                Ok(RenewReport::all_held())
            }
            Ok(Err(err)) => Err(self.failed(&mut turn, err)),
            Err(_) => Err(no_answer()),
        }
    }

    async fn close(&self) -> Result<()> {
        let mut turn = self.conn.lock().await;
        if let Some(conn) = turn.as_mut() {
            let _ = conn.query_drop("SELECT RELEASE_ALL_LOCKS()").await;
        }
        Ok(())
    }
}
