//! Named-lock sessions: a dedicated connection each, whose `GET_LOCK` locks
//! are the session's locks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::lock as guard;
use distlock_core::store::{
    AcquireRequest, ContendedKeys, Grant, GrantedTokens, Heartbeat, HeldLock, Mode, RenewReport,
    StoreSession,
};
use distlock_core::{Error, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, Statement};
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::connect::query_error;
use crate::tokens::Run;

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
        // Not `format!`: this runs twice per lock, and costs as much as the
        // rest of the store's own work per grant.
        let mut name = String::with_capacity(NAME_PREFIX.len() + key.len());
        name.push_str(NAME_PREFIX);
        name.push_str(key);
        return name;
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
    target: Arc<str>,
    /// The server's run that tokens are drawn in; `None`: from the table.
    run: Option<Arc<std::sync::Mutex<Run>>>,
    /// The lock (and token) statement, prepared.
    lock: Statement,
    release: Statement,
    ttl: Duration,
    /// The token of each key held: `RELEASE_LOCK` ends whatever the
    /// connection holds of a name, so a release is checked against it.
    granted: GrantedTokens,
    /// Keys found taken: a wait for one of them skips the try.
    contended: ContendedKeys,
}

impl NamedSession {
    /// Readies a session on its dedicated connection, its statements
    /// prepared once.
    pub(crate) async fn open(
        mut conn: Conn,
        pool: Pool,
        target: String,
        run: Option<Run>,
        ttl: Duration,
    ) -> Result<Self> {
        // In a run, the lock and its draw are one statement: the draw is
        // made only if the lock was got, and NULL is "not got". From the
        // table, 0 or NULL is.
        let lock = match run {
            Some(_) => "SELECT IF(GET_LOCK(?, ?) = 1, UUID_SHORT(), NULL)",
            None => "SELECT GET_LOCK(?, ?)",
        };
        let failed = |err: mysql_async::Error| query_error(&target, err);
        let lock = conn.prep(lock).await.map_err(failed)?;
        let release = conn.prep("SELECT RELEASE_LOCK(?)").await.map_err(failed)?;
        Ok(NamedSession {
            lock,
            release,
            run: run.map(|run| Arc::new(std::sync::Mutex::new(run))),
            id: conn.id(),
            conn: Arc::new(Mutex::new(Some(conn))),
            heartbeat: Arc::default(),
            pool,
            target: target.into(),
            ttl,
            granted: GrantedTokens::default(),
            contended: ContendedKeys::default(),
        })
    }

    /// One lock query: a try, or a wait until `wait` at most.
    async fn lock_query(
        &self,
        request: &AcquireRequest,
        wait: Option<Instant>,
    ) -> Result<Option<u64>> {
        let turn = Arc::clone(&self.conn).lock_owned().await;
        if turn.is_none() {
            return Err(self.lost());
        }
        // Reckoned once the turn is ours. Whole milliseconds, rounded up, so
        // that a wait never ends early; in slices, so that the session's
        // releases and renewals get their turn on the connection in between
        // (the core asks again until its deadline).
        let wait = wait.map(|until| {
            let left = until.saturating_duration_since(Instant::now());
            let slice = (self.ttl / 4).clamp(Duration::from_millis(10), WAIT_SLICE);
            (left.as_millis() + 1).min(slice.as_millis()) as f64 / 1000.0
        });
        let query = LockQuery {
            name: lock_name(&request.key),
            key: self.run.is_none().then(|| request.key.clone()),
            timeout: wait.unwrap_or(0.0),
            run: self.run.clone(),
            target: Arc::clone(&self.target),
            lock: self.lock.clone(),
            state: WaitState::new(),
            heartbeat: Arc::clone(&self.heartbeat),
        };
        let state = Arc::clone(&query.state);
        let query = get_lock(turn, query);
        let running = match wait {
            None => Running::InPlace(Box::pin(query)),
            Some(_) => Running::Spawned(tokio::spawn(query)),
        };
        let mut pending = Pending {
            running: Some(running),
            state,
            session: self,
            runtime: tokio::runtime::Handle::current(),
        };
        let Some((turn, _, answer)) = pending.answer().await else {
            return Err(self.lost());
        };
        drop(turn);
        match answer {
            Ok(got) => Ok(got),
            Err(err) if !err.is_fatal() => Err(query_error(&self.target, err)),
            Err(_) => Err(self.lost()),
        }
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

/// One lock query: what it asks, and what it needs to finish on its own.
struct LockQuery {
    name: String,
    /// The key, for a token from the table.
    key: Option<String>,
    timeout: f64,
    run: Option<Arc<std::sync::Mutex<Run>>>,
    target: Arc<str>,
    lock: Statement,
    state: Arc<WaitState>,
    heartbeat: Arc<Heartbeat>,
}

/// What a lock query answers: the token if the lock was got, with the
/// connection's turn, still taken, and the lock's name.
type LockAnswer = (
    OwnedMutexGuard<Option<Conn>>,
    String,
    std::result::Result<Option<u64>, mysql_async::Error>,
);

/// The lock query, with its token. It must never be dropped half-way (that
/// would break the connection): see [`Pending`].
async fn get_lock(mut turn: OwnedMutexGuard<Option<Conn>>, query: LockQuery) -> LockAnswer {
    let got = lock_on(&mut turn, &query).await;
    (turn, query.name, got)
}

async fn lock_on(
    turn: &mut Option<Conn>,
    query: &LockQuery,
) -> std::result::Result<Option<u64>, mysql_async::Error> {
    let LockQuery {
        ref name,
        ref key,
        timeout,
        ref run,
        ref target,
        ref lock,
        ref state,
        ref heartbeat,
    } = *query;
    let Some(conn) = turn.as_mut() else {
        state.finish().await;
        return Err(mysql_async::Error::Other("the connection is gone".into()));
    };
    let got: std::result::Result<Option<Option<u64>>, _> =
        conn.exec_first(lock, (name.as_str(), timeout)).await;
    if !got.as_ref().is_err_and(mysql_async::Error::is_fatal) {
        heartbeat.mark();
    }
    // A KILL QUERY on its way must land before the connection moves on.
    state.finish().await;
    let (mut got, mut token) = match (got, run) {
        (Ok(Some(Some(drawn))), Some(run)) => (Ok(true), guard(run).token(drawn)),
        (Ok(Some(Some(got))), None) if got > 0 => (Ok(true), None),
        (Ok(_), _) => (Ok(false), None),
        (Err(err), _) => (Err(err), None),
    };
    // The statement failed, perhaps after GET_LOCK took the lock (the draw
    // failed, or a KILL QUERY landed late): give back what it took.
    if let (Err(err), Some(conn)) = (&got, turn.as_mut()) {
        if !err.is_fatal() && holds(conn, name).await {
            give_back(conn, name).await;
        }
    }
    // The token, on this connection, before anything else it does, so
    // tokens follow the order of grants (docs/0008-mysql.md).
    if let (Ok(true), Some(conn)) = (&got, turn.as_mut()) {
        match run {
            None => match conn.exec_drop(crate::NEXT_TOKEN, (key.as_deref(),)).await {
                Ok(()) => token = conn.last_insert_id(),
                Err(err) => got = Err(err),
            },
            // Past the end of the session's run: the next run, while the
            // lock is held, and a token of it.
            Some(run) if token.is_none() => match redraw(conn, target, run).await {
                Ok(drawn) => token = Some(drawn),
                Err(err) => got = Err(mysql_async::Error::Other(err.to_string().into())),
            },
            Some(_) => {}
        }
        if got.is_ok() && token.is_none() {
            got = Err(mysql_async::Error::Other("no token was returned".into()));
        }
        if got.is_err() {
            give_back(conn, name).await;
        }
    }
    if got.as_ref().is_err_and(mysql_async::Error::is_fatal) {
        turn.take();
    }
    got.map(|got| if got { token } else { None })
}

/// Whether this connection holds the named lock `name`.
async fn holds(conn: &mut Conn, name: &str) -> bool {
    let owner: std::result::Result<Option<Option<i64>>, _> = conn
        .exec_first("SELECT IS_USED_LOCK(?) = CONNECTION_ID()", (name,))
        .await;
    matches!(owner, Ok(Some(Some(1))))
}

/// A token of the server's live run, for a draw that fell outside the
/// session's run, which the live one then replaces.
async fn redraw(conn: &mut Conn, target: &str, run: &std::sync::Mutex<Run>) -> Result<u64> {
    let stale = *guard(run);
    let live = crate::tokens::run(conn, target, Some(stale)).await?;
    *guard(run) = live;
    let drawn: Option<u64> = conn
        .query_first("SELECT UUID_SHORT()")
        .await
        .map_err(|err| query_error(target, err))?;
    drawn.and_then(|drawn| live.token(drawn)).ok_or_else(|| {
        Error::store(format!(
            "MariaDB at {target}: UUID_SHORT() gave no token of the run just begun"
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

/// Where a lock query stands, between the query and the acquire that may
/// be dropped: a kill is sent only while the query waits,
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

/// Where a lock query runs: a try (answered at once) in place, a wait in a
/// task of its own, so that its answer is read, and the connection's turn
/// given back, even while nobody polls the acquire.
enum Running {
    InPlace(std::pin::Pin<Box<dyn std::future::Future<Output = LockAnswer> + Send>>),
    Spawned(tokio::task::JoinHandle<LockAnswer>),
}

/// An acquire under way. Dropped before its query is done, it stops the
/// wait (`KILL QUERY` while the lock is still awaited) and lets the query
/// finish in a task, which gives back the lock if it came, on the query's
/// own turn of the connection.
struct Pending<'a> {
    running: Option<Running>,
    state: Arc<WaitState>,
    session: &'a NamedSession,
    /// The runtime the acquire runs on, for the clean-up: a query must never
    /// be dropped half-way.
    runtime: tokio::runtime::Handle,
}

impl Pending<'_> {
    /// The query's answer; a query that panicked (or whose task was
    /// dropped) answers as a broken connection.
    async fn answer(&mut self) -> Option<LockAnswer> {
        let answer = match self.running.as_mut()? {
            Running::InPlace(query) => Some(query.as_mut().await),
            Running::Spawned(task) => task.await.ok(),
        };
        self.running = None;
        answer
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        if self.state.start_kill() {
            let (pool, id, state) = (
                self.session.pool.clone(),
                self.session.id,
                Arc::clone(&self.state),
            );
            self.runtime.spawn(async move {
                if let Ok(mut killer) = pool.get_conn().await {
                    let _ = killer.query_drop(format!("KILL QUERY {id}")).await;
                }
                state.killed.notify_one();
            });
        }
        self.runtime.spawn(async move {
            let answer = match running {
                Running::InPlace(query) => Some(query.await),
                Running::Spawned(task) => task.await.ok(),
            };
            // Still this query's turn: nothing else of the session ran on
            // the connection since the grant.
            if let Some((mut turn, name, Ok(Some(_)))) = answer {
                if let Some(conn) = turn.as_mut() {
                    give_back(conn, &name).await;
                }
            }
        });
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
        let wait = request.wait_until;
        // A try costs a round trip and runs in place; a wait tries first,
        // unless the key was taken the last time.
        let known_taken = wait.is_some() && self.contended.contains(&request.key);
        let mut got = self
            .lock_query(request, if known_taken { wait } else { None })
            .await?;
        if let (Some(wait), false, None) = (wait, known_taken, got) {
            self.contended.record(&request.key, true);
            got = self.lock_query(request, Some(wait)).await?;
        } else if known_taken && rand::random::<u8>() < 16 {
            // Now and then a contended key is tried first again.
            self.contended.record(&request.key, false);
        }
        if let Some(token) = got {
            self.granted.granted(&request.key, token);
        }
        Ok(got.map(Grant::new))
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

#[cfg(test)]
#[path = "named_tests.rs"]
pub(crate) mod tests;
