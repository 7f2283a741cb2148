//! Lease-table sessions (`?mode=lease`): a lock is a row per holder, with
//! the time its lease ends by the server's clock. Every change is one
//! statement (a function made at setup), so it works through a pooler in
//! transaction mode; waiters are woken by LISTEN/NOTIFY and retry at the
//! earliest holder's lease end in any case.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{Status, StatusQuery};
use distlock_core::store::lock as guard;
use distlock_core::store::{
    release_outcome, spawn_cleanup, AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, Statement};

use crate::connect::{open, query_error};
use crate::tokens;
use crate::wakeup::{keep_listening, listen, turn_channel, Listeners, Watch, PASS_ON};

/// The table, and the functions that change it, each one statement. The
/// table is UNLOGGED: no change to it waits for a disk flush. PostgreSQL
/// empties it exactly when it resets the token sequence (crash recovery, a
/// standby's promotion); the grant that finds the sequence reset starts a
/// new epoch, which marks the reset, and no lease is granted until the
/// longest lease ever granted (`max_ttl_ms`, raised durably before a longer
/// one is granted) has run out since: every lease lost with the table has
/// ended by then.
pub(crate) const SETUP: &str = include_str!("lease.sql");

/// How soon a waiter looks again after it was first registered.
const FIRST_LOOK: Duration = Duration::from_millis(10);

/// Raises the longest lease granted, durably, before a longer one is.
const LONGER: &str = "BEGIN;
SET LOCAL synchronous_commit = on;
UPDATE distlock_epoch SET max_ttl_ms = greatest(max_ttl_ms, {}) WHERE id = 1;
COMMIT;";

/// Keeps every hold of `holders` still unexpired for `ttl_ms` more; the
/// keys of those kept.
const RENEW: &str = "UPDATE distlock_leases_v2
    SET expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
    WHERE holder = ANY($1) AND expires_at > clock_timestamp()
    RETURNING key";

/// The statements every grant and release runs, prepared once per
/// connection: each then takes one round trip and no parse.
const ACQUIRE: &str = "SELECT granted, fence, retry_ms, conflict \
     FROM distlock_acquire_v4($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const RELEASE: &str = "SELECT distlock_release_v3($1, $2)";

/// The statement connection and its prepared statements.
pub(crate) struct Conn {
    client: Client,
    acquire: Statement,
    release: Statement,
    /// [`FORGET_WAITER`], run for each wait that ends without the lock.
    forget: Statement,
    /// [`PASS_ON`], run for each turn that reached this store too late.
    pass_on: Statement,
    /// Set when the server no longer takes a prepared statement (a newer
    /// client made the function again with other result types, or a
    /// pooler lost it): the connection is then made again.
    stale: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// Connects and prepares; the functions must exist (made by [`SETUP`]).
    async fn open(config: &Config, target: &str) -> Result<Conn> {
        Conn::prepared(open(config, target).await?, target).await
    }

    async fn prepared(client: Client, target: &str) -> Result<Conn> {
        let prepare = async {
            Ok::<_, tokio_postgres::Error>((
                client.prepare(ACQUIRE).await?,
                client.prepare(RELEASE).await?,
                client.prepare(FORGET_WAITER).await?,
                client.prepare(PASS_ON).await?,
            ))
        };
        let (acquire, release, forget, pass_on) =
            prepare.await.map_err(|err| query_error(target, err))?;
        Ok(Conn {
            client,
            acquire,
            release,
            forget,
            pass_on,
            stale: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Notes an error of one of its statements: one that says the
    /// statement is stale (`0A000` cached plan changed, `26000` unknown
    /// statement) has the connection made again for the next call.
    fn note(&self, err: &tokio_postgres::Error) {
        let code = err.code().map(SqlState::code);
        if matches!(code, Some("0A000" | "26000")) {
            self.stale.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// What lease sessions of one store share: a connection for statements
/// (each one its own transaction, so one connection serves every session)
/// and the listener of releases and grants.
pub(crate) struct Leases {
    config: Config,
    /// Made again when it breaks (e.g. its backend was terminated): the
    /// leases live in the table, not in a connection.
    client: tokio::sync::Mutex<Arc<Conn>>,
    target: String,
    listeners: Listeners,
    /// The channel this store's waiters are woken on one at a time.
    channel: String,
}

impl Leases {
    /// Connects, and makes the table and its functions if they are not
    /// there.
    pub(crate) async fn connect(config: &Config, target: &str) -> Result<Arc<Leases>> {
        let client = open(config, target).await?;
        client
            .batch_execute(SETUP)
            .await
            .map_err(|err| query_error(target, err))?;
        let client = Conn::prepared(client, target).await?;
        let listeners: Listeners = Arc::default();
        let channel = turn_channel();
        // The first listening connection is made here, so that a store
        // whose LISTEN fails does not start; later ones by the listener.
        let listening = listen(config, target, &channel).await?;
        tokio::spawn(keep_listening(
            config.clone(),
            target.to_owned(),
            channel.clone(),
            Arc::downgrade(&listeners),
            listening,
        ));
        let (passed_on, turns) = tokio::sync::mpsc::unbounded_channel();
        listeners.pass_turns_to(passed_on);
        let leases = Arc::new(Leases {
            config: config.clone(),
            client: tokio::sync::Mutex::new(Arc::new(client)),
            target: target.to_owned(),
            listeners,
            channel,
        });
        tokio::spawn(pass_turns_on(Arc::downgrade(&leases), turns));
        Ok(leases)
    }

    /// The statement connection, connecting again if it broke.
    pub(crate) async fn client(&self) -> Result<Arc<Conn>> {
        let mut client = self.client.lock().await;
        if client.is_closed() || client.stale.load(std::sync::atomic::Ordering::Relaxed) {
            *client = Arc::new(Conn::open(&self.config, &self.target).await?);
        }
        Ok(Arc::clone(&client))
    }

    /// Who holds and who waits, from the table.
    pub(crate) async fn status(&self, query: &StatusQuery) -> Result<Status> {
        crate::status::leases(&*self.client().await?, &self.target, query).await
    }

    pub(crate) fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    fn watch(&self, key: &str, waiter: &str) -> Watch {
        Watch::new(&self.listeners, key, waiter)
    }
}

pub(crate) struct LeaseSession {
    leases: Arc<Leases>,
    id: String,
    ttl: Duration,
    /// Written with each hold and each wait, for `status`.
    owner: String,
    /// The holds of this session, by key: token and holder name.
    held: Mutex<HashMap<String, (u64, String)>>,
}

impl LeaseSession {
    pub(crate) fn new(leases: Arc<Leases>, options: &SessionOptions) -> Self {
        LeaseSession {
            leases,
            id: format!("{:016x}", rand::random::<u64>()),
            ttl: options.ttl,
            owner: options.owner.clone(),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn error(&self, err: tokio_postgres::Error) -> Error {
        query_error(&self.leases.target, err)
    }

    fn holder_of(&self, lock: &HeldLock) -> Option<String> {
        guard(&self.held)
            .get(&lock.key)
            .filter(|(token, _)| *token == lock.token)
            .map(|(_, holder)| holder.clone())
    }

    fn forget(&self, lock: &HeldLock) {
        let mut held = guard(&self.held);
        if held
            .get(&lock.key)
            .is_some_and(|(token, _)| *token == lock.token)
        {
            held.remove(&lock.key);
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl StoreSession for LeaseSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let (mode, permits) = (request.mode.tag(), request.mode.permits());
        let permits = i32::try_from(permits).unwrap_or(i32::MAX);
        // This acquire's own name as a waiter, so that giving up removes
        // its record and no other, and a release can wake it alone; armed
        // from the first statement on, which may register it even if its
        // answer never comes.
        let mut registered = Registered {
            leases: Arc::clone(&self.leases),
            key: request.key.clone(),
            waiter: format!("{}|{:016x}", self.id, rand::random::<u64>()),
            armed: request.wait_until.is_some(),
        };
        let watch = request
            .wait_until
            .map(|_| self.leases.watch(&request.key, &registered.waiter));
        let mut first_look = true;
        loop {
            let mut woken: Option<Pin<Box<Notified<'_>>>> = watch.as_ref().map(|watch| {
                let mut notified = Box::pin(watch.notify.notified());
                notified.as_mut().enable();
                notified
            });
            let holder = format!("{}|{:016x}", self.id, rand::random::<u64>());
            // Dropped before the answer, the statement may still commit:
            // the hold is given back by name.
            let mut undo = Undo {
                leases: Arc::clone(&self.leases),
                key: request.key.clone(),
                holder: holder.clone(),
                armed: true,
            };
            let sent = Instant::now();
            let client = self.leases.client().await?;
            // Registered as a waiter if not granted: until its deadline, but
            // for two leases at most, as it asks again within half a lease;
            // a waiter that dies (Ctrl-C of a wait "forever") is gone from
            // the record within two leases, not at its deadline.
            let wait_ms = request.wait_until.map_or(0, |until| {
                millis(until.saturating_duration_since(sent).min(self.ttl * 2)).max(1)
            });
            // No channel while the store cannot hear it: releases then wake
            // every waiter of the key.
            let channel = self
                .leases
                .listeners
                .is_listening()
                .then_some(self.leases.channel.as_str());
            let answer = client
                .query_one(
                    &client.acquire,
                    &[
                        &request.key,
                        &holder,
                        &registered.waiter,
                        &mode,
                        &permits,
                        &millis(self.ttl),
                        &wait_ms,
                        &self.owner,
                        &channel,
                    ],
                )
                .await;
            let row = match answer {
                Ok(row) => row,
                // Nothing was granted; what it asks for is done, and the
                // acquire asks again.
                Err(err) if err.code().map(SqlState::code) == Some("DL001") => {
                    undo.armed = false;
                    tokens::settle(&client, &self.leases.target, 0).await?;
                    continue;
                }
                Err(err) if err.code().map(SqlState::code) == Some("DL002") => {
                    undo.armed = false;
                    let longer = LONGER.replace("{}", &millis(self.ttl).to_string());
                    if let Err(err) = client.batch_execute(&longer).await {
                        // A shared connection is not left in a failed
                        // transaction block.
                        let _ = client.batch_execute("ROLLBACK").await;
                        return Err(self.error(err));
                    }
                    continue;
                }
                Err(err) => {
                    client.note(&err);
                    return Err(self.error(err));
                }
            };
            let (granted, fence, retry_ms, conflict): (bool, i64, i64, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if let Some(conflict) = conflict {
                undo.armed = false;
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("cannot lock '{}' as asked: {conflict}", request.key),
                ));
            }
            if granted {
                let token = u64::try_from(fence).unwrap_or(0);
                undo.armed = false;
                // The grant removed the record.
                registered.armed = false;
                guard(&self.held).insert(request.key.clone(), (token, holder));
                return Ok(Some(Grant::new(token).with_lease_from(sent)));
            }
            undo.armed = false;
            let Some(until) = request.wait_until else {
                return Ok(None);
            };
            let now = Instant::now();
            if now >= until {
                // The record is removed, so that a turn it was given
                // since its statement is passed on.
                return Ok(None);
            }
            let retry = Duration::from_millis(u64::try_from(retry_ms).unwrap_or(1));
            let mut pause = retry.min(self.ttl / 2).min(until - now);
            if first_look {
                // A release that looked for waiters just before this one
                // was registered sent no notification: look again soon.
                first_look = false;
                pause = pause.min(FIRST_LOOK);
            }
            match woken.take() {
                Some(woken) => {
                    let _ = tokio::time::timeout(pause, woken).await;
                }
                None => tokio::time::sleep(pause).await,
            }
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(holder) = self.holder_of(held) else {
            return Err(Error::not_held(&held.key));
        };
        let client = self.leases.client().await?;
        let row = client
            .query_one(&client.release, &[&held.key, &holder])
            .await
            .map_err(|err| {
                client.note(&err);
                self.error(err)
            })?;
        self.forget(held);
        release_outcome(row.get(0), &held.key)
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        if held.is_empty() {
            return Ok(RenewReport::all_held());
        }
        let holders: Vec<String> = held
            .iter()
            .map(|lock| self.holder_of(lock).unwrap_or_default())
            .collect();
        let rows = self
            .leases
            .client()
            .await?
            .query(RENEW, &[&holders, &millis(self.ttl)])
            .await
            .map_err(|err| self.error(err))?;
        let kept: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        let mut lost = Vec::new();
        for lock in held {
            if !kept.contains(&lock.key) {
                self.forget(lock);
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        let held: Vec<(String, (u64, String))> = guard(&self.held).drain().collect();
        let client = self.leases.client().await?;
        for (key, (_, holder)) in held {
            let _ = client.query_one(&client.release, &[&key, &holder]).await;
        }
        Ok(())
    }
}

/// Passes on, from the statement connection, each turn that reached this
/// store for an acquire it no longer has; ends with the store.
async fn pass_turns_on(
    leases: std::sync::Weak<Leases>,
    mut turns: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    while let Some(key) = turns.recv().await {
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let passed = match leases.client().await {
            Ok(client) => client
                .execute(&client.pass_on, &[&key])
                .await
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = passed {
            tracing::debug!("passing on a turn for '{key}': {err}");
        }
    }
}

/// Removes, in the background, the waiter record of an acquire that ended
/// without the lock (dropped, failed, or at its deadline), if it made one:
/// otherwise it would stay until its end, shown by `status`, making
/// releases notify, and perhaps holding a turn nobody takes. On the
/// statement connection, so after the acquire's own statement.
struct Registered {
    leases: Arc<Leases>,
    key: String,
    waiter: String,
    armed: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (key, waiter) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.waiter),
        );
        forget_waiter(&self.leases, key, waiter);
    }
}

/// Deletes, in the background, the record `waiter` (a waiter's or an
/// observer's) of `key` in `distlock_waiters`.
pub(crate) fn forget_waiter(leases: &Arc<Leases>, key: String, waiter: String) {
    let leases = Arc::clone(leases);
    spawn_cleanup(async move {
        if let Ok(client) = leases.client().await {
            let _ = client.execute(&client.forget, &[&key, &waiter]).await;
        }
    });
}

/// Deletes the record `$2` of key `$1`; if a release had woken it (and the
/// key is free), passes its turn on to every waiter of the key.
const FORGET_WAITER: &str = "WITH gone AS (
        DELETE FROM distlock_waiters WHERE key = $1 AND waiter = $2 RETURNING woken)
    SELECT pg_notify('distlock_released', $1) FROM gone
    WHERE gone.woken AND NOT EXISTS (SELECT 1 FROM distlock_leases_v2
        WHERE key = $1 AND expires_at > clock_timestamp())";

/// Gives back, in the background, a hold whose acquire was dropped or
/// failed after its statement was sent.
struct Undo {
    leases: Arc<Leases>,
    key: String,
    holder: String,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let leases = Arc::clone(&self.leases);
        let (key, holder) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
        );
        spawn_cleanup(async move {
            if let Ok(client) = leases.client().await {
                let _ = client.query_one(&client.release, &[&key, &holder]).await;
            }
        });
    }
}
