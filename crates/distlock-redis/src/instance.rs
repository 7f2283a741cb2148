//! One Redis instance: a multiplexed connection, made again after it fails
//! (at once, so that a dead instance costs a refused connection, not a
//! back-off), the pub/sub hub, and the scripts as calls.

use distlock_core::store::lock;
use distlock_core::Error;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use redis::{Cmd, Script, ServerErrorKind, Value};

use crate::scripts::{self, LockKeys};
use crate::wake::Hub;

/// What an acquire script answered.
pub(crate) enum Attempt {
    /// Held, with this token, for the lease that the call of generation
    /// `gen` started (or refreshed, for a waiter handed the key).
    Granted { token: u64, gen: u64 },
    /// Busy; worth asking again after this long at the latest. With the
    /// first live holder's member (empty if none).
    Busy(Duration, String),
    /// The request cannot be granted as asked (e.g. other permits).
    Conflict(String),
}

/// What one acquire asks of an instance's acquire script.
pub(crate) struct AcquireCall<'a> {
    pub(crate) keys: &'a LockKeys,
    pub(crate) member: &'a str,
    pub(crate) mode: &'a str,
    pub(crate) permits: u32,
    pub(crate) ttl: Duration,
    pub(crate) waits: bool,
    /// Which call of the acquire this is; a grant names the one whose
    /// refresh its lease comes from.
    pub(crate) gen: u64,
    /// No answer is worth waiting for past this.
    pub(crate) limit: Duration,
}

pub(crate) struct Instance {
    /// `host:port`, for messages.
    pub(crate) name: String,
    client: redis::Client,
    /// The live connection, once made; `None` again after it failed.
    live: std::sync::Mutex<Option<MultiplexedConnection>>,
    /// Held while a connection is being made, so that only one is.
    connecting: tokio::sync::Mutex<()>,
    pub(crate) hub: Arc<Hub>,
}

/// How long one call to one instance may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn timed_out(name: &str, limit: Duration) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{name} did not answer in {limit:?}"),
    ))
}

/// Whether Redis answered with `err` (an error code of its own, or a
/// refused login), rather than not answering, or answering as something
/// else than Redis would.
pub(crate) fn answered(err: &redis::RedisError) -> bool {
    err.code().is_some() || err.kind() == redis::ErrorKind::AuthenticationFailed
}

/// The instances that failed a call, each with its error.
#[derive(Default)]
pub(crate) struct Failures(Vec<(String, redis::RedisError)>);

impl Failures {
    pub(crate) fn push(&mut self, instance: &Instance, err: redis::RedisError) {
        self.0.push((instance.name.clone(), err));
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// What went wrong with a single Redis, and what to do: `reach` where
    /// it could not be reached, `refused` where it answered every call with
    /// an error of its own (a refused script, an ACL, no memory left).
    pub(crate) fn on_single(&self, reach: &str, refused: &str) -> String {
        if self.all(answered) {
            format!("Redis refused: {self}{refused}")
        } else {
            format!("cannot reach Redis at {self}; {reach}")
        }
    }

    /// Whether there are failures, and `test` holds for each.
    pub(crate) fn all(&self, test: fn(&redis::RedisError) -> bool) -> bool {
        !self.0.is_empty() && self.0.iter().all(|(_, err)| test(err))
    }

    /// `error` with the first failure's error as its source; the message
    /// names every failure already (through [`Display`](std::fmt::Display)).
    pub(crate) fn source_of(&self, error: Error) -> Error {
        match self.0.first() {
            Some((_, err)) => error.with_source(err.clone()),
            None => error,
        }
    }
}

/// `NAME: ERROR; NAME: ERROR`, for messages.
impl std::fmt::Display for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (name, err)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{name}: {err}")?;
        }
        Ok(())
    }
}

impl Instance {
    /// An instance whose hand-overs to this store's waiters come on
    /// `channel`.
    pub(crate) fn new(name: String, client: redis::Client, channel: &str) -> Self {
        Instance {
            name,
            hub: Hub::new(client.clone(), channel.to_owned()),
            client,
            live: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        lock(&self.live)
    }

    /// The keyspace events of `keys` (each change of them), where the
    /// server publishes them: `notify-keyspace-events` has `K` and the
    /// classes the lock's commands fall in (`$` SET, `g` DEL, `x` expiry,
    /// `z` the holders' set; `A` for all). `None` where it does not. The
    /// sink keeps the subscription: drop both to end it.
    pub(crate) async fn keyspace_events(
        &self,
        keys: &[&str],
    ) -> redis::RedisResult<Option<(redis::aio::PubSubSink, redis::aio::PubSubStream)>> {
        let mut conn = self.connection().await?;
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("notify-keyspace-events");
        let config: Vec<String> = match self.within(CALL_TIMEOUT, get.query_async(&mut conn)).await
        {
            Ok(config) => config,
            // A server that answers but refuses CONFIG (a managed Redis, an
            // ACL): no telling whether it publishes; observers poll.
            Err(err) if matches!(err.kind(), redis::ErrorKind::Server(_)) => {
                tracing::debug!("{}: CONFIG GET refused ({err}); observers poll", self.name);
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let flags = config.get(1).map(String::as_str).unwrap_or_default();
        let classes = flags.contains('A') || "$gxz".chars().all(|c| flags.contains(c));
        if !(flags.contains('K') && classes) {
            return Ok(None);
        }
        let db = self.client.get_connection_info().redis_settings().db();
        let pubsub = tokio::time::timeout(CALL_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out(&self.name, CALL_TIMEOUT))??;
        let (mut sink, events) = pubsub.split();
        for key in keys {
            let channel = format!("__keyspace@{db}__:{key}");
            tokio::time::timeout(CALL_TIMEOUT, sink.subscribe(channel))
                .await
                .map_err(|_| timed_out(&self.name, CALL_TIMEOUT))??;
        }
        Ok(Some((sink, events)))
    }

    /// The connection, made on first use (so that a store of several
    /// instances can start while some are down).
    pub(crate) async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(live) = self.live().as_ref() {
            return Ok(live.clone());
        }
        let _connecting = self.connecting.lock().await;
        if let Some(live) = self.live().as_ref() {
            return Ok(live.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT));
        let made = tokio::time::timeout(
            CALL_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| timed_out(&self.name, CALL_TIMEOUT))??;
        *self.live() = Some(made.clone());
        Ok(made)
    }

    /// Runs `call` on the connection, giving up after `limit`; forgets a
    /// connection that failed, so that the next call makes one.
    pub(crate) async fn within<T, F>(&self, limit: Duration, call: F) -> redis::RedisResult<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // The connection gives every answer up after CALL_TIMEOUT itself;
        // only a shorter limit needs a timer of its own.
        let result = if limit < CALL_TIMEOUT {
            tokio::time::timeout(limit, call)
                .await
                .unwrap_or_else(|_| Err(timed_out(&self.name, limit)))
        } else {
            call.await
        };
        // Drops and timeouts are I/O errors; the other unrecoverable ones
        // (a reply the client cannot read, a refused login) want a new
        // connection too. One that timed out may be half-open (its peer gone
        // without a reset) and never answer again.
        if let Err(err) = &result {
            if err.is_io_error() || err.is_unrecoverable_error() {
                self.live().take();
            }
        }
        result
    }

    /// Runs an [`evalsha`] command, loading its script on NOSCRIPT, giving
    /// up after `limit`; with `owner`, the session's owner write goes in the
    /// same round trip, before it.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        cmd: &Cmd,
        limit: Duration,
        owner: Option<&Cmd>,
    ) -> redis::RedisResult<T> {
        self.within(limit, async {
            let mut connection = self.connection().await?;
            match query(&mut connection, cmd, owner).await {
                Err(err) if err.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                    script.load_async(&mut connection).await?;
                    query(&mut connection, cmd, owner).await
                }
                other => other,
            }
        })
        .await
    }

    /// Runs one plain command, such as the delete of a session's owner.
    pub(crate) async fn send(&self, cmd: &Cmd) -> redis::RedisResult<()> {
        self.within(CALL_TIMEOUT, async {
            let mut connection = self.connection().await?;
            cmd.query_async(&mut connection).await
        })
        .await
    }

    /// The fast path of an exclusive acquire: `SET NX PX` of the main key
    /// and `INCR` of the fencing counter, in one `MULTI`/`EXEC` and one
    /// round trip. `Some(token)` if the key was free (nobody holding or
    /// waiting).
    ///
    /// The transaction keeps every command of other clients out from
    /// between the two: pipelined alone, a forced release and another
    /// client's whole take could run there, and the hold that the force
    /// ended would get a token above the new holder's.
    ///
    /// `owner`, the session's owner write if due, rides in the same round
    /// trip, outside the transaction: its failure (an out-of-memory or ACL
    /// refusal) is not the acquire's.
    pub(crate) async fn fast_acquire(
        &self,
        keys: &LockKeys,
        member: &str,
        ttl_and_delay: Duration,
        limit: Duration,
        owner: Option<&Cmd>,
    ) -> redis::RedisResult<Option<u64>> {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI")
            .ignore()
            .cmd("SET")
            .arg(&keys.main)
            .arg(member)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl_and_delay))
            .ignore()
            .cmd("INCR")
            .arg(&keys.fence)
            .ignore()
            .cmd("EXEC");
        if let Some(owner) = owner {
            pipe.add_command(owner.clone()).ignore();
        }
        // Each answer is read on its own: `QUEUED`s and the owner write's
        // are dropped; a command refused while queued aborts the `EXEC`.
        pipe.ignore_errors();
        let (set, token) = self
            .within(limit, async {
                let mut connection = self.connection().await?;
                let (exec,) = pipe
                    .query_async::<(redis::RedisResult<(Option<redis::Value>, u64)>,)>(
                        &mut connection,
                    )
                    .await?;
                exec
            })
            .await?;
        Ok(set.map(|_| token))
    }

    pub(crate) async fn acquire(
        &self,
        call: &AcquireCall<'_>,
        channel: &str,
        owner: Option<&Cmd>,
    ) -> redis::RedisResult<Attempt> {
        let mut cmd = evalsha(scripts::acquire(), &call.keys.all());
        cmd.arg(call.member)
            .arg(call.mode)
            .arg(call.permits)
            .arg(millis(call.ttl))
            .arg(if call.waits { "1" } else { "0" })
            .arg(call.gen)
            .arg(channel);
        let answer: Vec<Value> = self
            .eval(scripts::acquire(), &cmd, call.limit, owner)
            .await?;
        let status: i64 = match answer.first() {
            Some(value) => redis::from_redis_value(value.clone())?,
            None => 0,
        };
        let field = |index: usize| answer.get(index).cloned().unwrap_or(Value::Int(0));
        Ok(match status {
            1 => Attempt::Granted {
                token: redis::from_redis_value(field(1))?,
                gen: redis::from_redis_value(field(2))?,
            },
            0 => Attempt::Busy(
                Duration::from_millis(redis::from_redis_value(field(1))?),
                match answer.get(2) {
                    Some(holder) => redis::from_redis_value(holder.clone())?,
                    None => String::new(),
                },
            ),
            _ => Attempt::Conflict(redis::from_redis_value(field(1))?),
        })
    }

    /// `true` if `member` held the key and now does not; the key goes to
    /// the next waiter.
    pub(crate) async fn release(
        &self,
        keys: &LockKeys,
        member: &str,
        lock_delay: Duration,
    ) -> redis::RedisResult<bool> {
        let mut cmd = evalsha(scripts::release(), &keys.all());
        cmd.arg(member).arg(millis(lock_delay));
        let released: i64 = self
            .eval(scripts::release(), &cmd, CALL_TIMEOUT, None)
            .await?;
        Ok(released == 1)
    }

    /// Takes back what the acquire of `members` made: a hold, a place in
    /// the queue.
    pub(crate) async fn abandon(
        &self,
        keys: &LockKeys,
        members: &[String],
    ) -> redis::RedisResult<()> {
        let mut cmd = evalsha(scripts::abandon(), &keys.all());
        cmd.arg(members);
        let _: i64 = self
            .eval(scripts::abandon(), &cmd, CALL_TIMEOUT, None)
            .await?;
        Ok(())
    }

    /// Extends the leases of `held` (keys and members, with their
    /// lock-delays); `true` for each one still held. `owner`, the session's
    /// owner write if due, rides in the same round trip.
    pub(crate) async fn renew(
        &self,
        ttl: Duration,
        held: &[(&LockKeys, &str, Duration)],
        owner: Option<&Cmd>,
    ) -> redis::RedisResult<Vec<bool>> {
        let all: Vec<&str> = held.iter().flat_map(|(keys, _, _)| keys.all()).collect();
        let mut cmd = evalsha(scripts::renew(), &all);
        cmd.arg(millis(ttl));
        for (_, member, delay) in held {
            cmd.arg(*member).arg(millis(*delay));
        }
        let flags: Vec<i64> = self
            .eval(scripts::renew(), &cmd, CALL_TIMEOUT, owner)
            .await?;
        Ok(flags.into_iter().map(|flag| flag == 1).collect())
    }

    /// Ends every live hold on the key and hands it on (a forced release);
    /// each ended hold as `(member, mode tag, token or "", lease left ms)`.
    pub(crate) async fn force_release(
        &self,
        keys: &LockKeys,
    ) -> redis::RedisResult<Vec<(String, String, String, i64)>> {
        let cmd = evalsha(scripts::force(), &keys.all());
        self.eval(scripts::force(), &cmd, CALL_TIMEOUT, None).await
    }

    /// Raises the key's fencing counter to at least `token`.
    pub(crate) async fn raise(&self, keys: &LockKeys, token: u64) -> redis::RedisResult<()> {
        let mut cmd = evalsha(scripts::raise(), &[&keys.fence]);
        cmd.arg(token);
        let _: i64 = self
            .eval(scripts::raise(), &cmd, CALL_TIMEOUT, None)
            .await?;
        Ok(())
    }
}

/// Runs `cmd`, after `owner` in the same round trip if given.
async fn query<T: redis::FromRedisValue>(
    connection: &mut MultiplexedConnection,
    cmd: &Cmd,
    owner: Option<&Cmd>,
) -> redis::RedisResult<T> {
    let Some(owner) = owner else {
        return cmd.query_async(connection).await;
    };
    // The owner write's failure (an out-of-memory or ACL refusal) is not
    // the call's: each command's answer is read on its own.
    let mut pipe = redis::pipe();
    pipe.add_command(owner.clone())
        .ignore()
        .add_command(cmd.clone())
        .ignore_errors();
    let (answer,): (redis::RedisResult<T>,) = pipe.query_async(connection).await?;
    answer
}

/// An EVALSHA of `script` with `keys`, its arguments to be added: built in
/// one buffer (a `ScriptInvocation` copies every argument twice).
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let size = keys.iter().map(|key| key.len() + 16).sum::<usize>() + 256;
    let mut cmd = Cmd::with_capacity(3 + keys.len() + 8, size);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
