//! One Redis instance: a multiplexed connection, made again after it fails
//! (at once, so that a dead instance costs a refused connection, not a
//! back-off), the pub/sub hub, and the scripts as calls.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use redis::Value;

use crate::scripts::{self, LockKeys};
use crate::wake::{Hub, Watch};

/// What an acquire script answered.
pub(crate) enum Attempt {
    Granted(u64),
    /// Busy; worth asking again after this long at the latest. With the
    /// key's fencing counter as it stands.
    Busy(Duration, u64),
    /// The request cannot be granted as asked (e.g. other permits).
    Conflict(String),
}

pub(crate) struct Instance {
    /// `host:port`, for messages.
    pub(crate) name: String,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    pub(crate) hub: Arc<Hub>,
}

/// How long one call to one instance may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn timed_out(name: &str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{name} did not answer in {CALL_TIMEOUT:?}"),
    ))
}

impl Instance {
    pub(crate) fn new(name: String, client: redis::Client) -> Self {
        Instance {
            name,
            hub: Hub::new(client.clone()),
            client,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection, made on first use (so that a store of several
    /// instances can start while some are down).
    pub(crate) async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut connection = self.connection.lock().await;
        if let Some(live) = connection.as_ref() {
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
        .map_err(|_| timed_out(&self.name))??;
        *connection = Some(made.clone());
        Ok(made)
    }

    /// Forgets a connection that failed, so that the next call makes one.
    async fn broken(&self, err: &redis::RedisError) {
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_timeout()
            || err.is_unrecoverable_error()
        {
            self.connection.lock().await.take();
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        self.invoke_within(invocation, CALL_TIMEOUT).await
    }

    /// Runs a script, giving up after `limit`.
    async fn invoke_within<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
        limit: Duration,
    ) -> redis::RedisResult<T> {
        let call = async {
            let mut connection = self.connection().await?;
            invocation.invoke_async(&mut connection).await
        };
        let result = tokio::time::timeout(limit.min(CALL_TIMEOUT), call)
            .await
            .unwrap_or_else(|_| Err(timed_out(&self.name)));
        if let Err(err) = &result {
            self.broken(err).await;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn acquire(
        &self,
        keys: &LockKeys,
        session: &str,
        mode: &str,
        permits: u32,
        ttl: Duration,
        lock_delay: Duration,
        waits: bool,
        member: &str,
        limit: Duration,
    ) -> redis::RedisResult<Attempt> {
        let mut invocation = scripts::acquire().prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.mode)
            .key(&keys.fence)
            .key(&keys.writers)
            .key(&keys.delay)
            .arg(session)
            .arg(mode)
            .arg(permits)
            .arg(millis(ttl))
            .arg(millis(lock_delay))
            .arg(if waits { "1" } else { "0" })
            .arg(member);
        let answer: Vec<Value> = self.invoke_within(&invocation, limit).await?;
        let status: i64 = match answer.first() {
            Some(value) => redis::from_redis_value(value.clone())?,
            None => 0,
        };
        let field = |index: usize| answer.get(index).cloned().unwrap_or(Value::Int(0));
        Ok(match status {
            1 => Attempt::Granted(redis::from_redis_value(field(1))?),
            0 => Attempt::Busy(
                Duration::from_millis(redis::from_redis_value(field(1))?),
                redis::from_redis_value(field(2))?,
            ),
            _ => Attempt::Conflict(redis::from_redis_value(field(1))?),
        })
    }

    /// `true` if `member` held the key and now does not.
    pub(crate) async fn release(&self, keys: &LockKeys, member: &str) -> redis::RedisResult<bool> {
        let mut invocation = scripts::release().prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.mode)
            .arg(member)
            .arg(&keys.channel);
        let released: i64 = self.invoke(&invocation).await?;
        Ok(released == 1)
    }

    /// Takes back `members` (holds one acquire made) and the session's
    /// place among the waiting writers; `publish` tells waiters of the
    /// holds taken back.
    pub(crate) async fn abandon(
        &self,
        keys: &LockKeys,
        session: &str,
        publish: bool,
        members: &[String],
    ) -> redis::RedisResult<()> {
        let mut invocation = scripts::abandon().prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.writers)
            .arg(session)
            .arg(&keys.channel)
            .arg(if publish { "1" } else { "0" })
            .arg(members);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// Extends the leases of `held` (keys and members, with their
    /// lock-delays); `true` for each one still held.
    pub(crate) async fn renew(
        &self,
        ttl: Duration,
        held: &[(&LockKeys, String, Duration)],
    ) -> redis::RedisResult<Vec<bool>> {
        let mut invocation = scripts::renew().prepare_invoke();
        invocation.arg(millis(ttl));
        for (keys, member, delay) in held {
            invocation
                .key(&keys.holders)
                .key(&keys.mode)
                .arg(member)
                .arg(millis(*delay));
        }
        let flags: Vec<i64> = self.invoke(&invocation).await?;
        Ok(flags.into_iter().map(|flag| flag == 1).collect())
    }

    /// Raises the key's fencing counter to at least `token`.
    pub(crate) async fn raise(&self, keys: &LockKeys, token: u64) -> redis::RedisResult<()> {
        let mut invocation = scripts::raise().prepare_invoke();
        invocation.key(&keys.fence).arg(token);
        let _: i64 = self.invoke(&invocation).await?;
        Ok(())
    }

    /// Subscribes again to the key's release channel if the subscriber
    /// connection broke since it was watched (bounded in time).
    pub(crate) async fn rewatch(&self, keys: &LockKeys) {
        if self.hub.needs_subscribing(&keys.channel) {
            let _ = tokio::time::timeout(CALL_TIMEOUT, self.hub.subscribe(&keys.channel)).await;
        }
    }

    /// Watches the key's release channel (bounded in time, like any call).
    pub(crate) async fn watch(&self, keys: &LockKeys) -> redis::RedisResult<Watch> {
        tokio::time::timeout(CALL_TIMEOUT, self.hub.watch(&keys.channel))
            .await
            .map_err(|_| timed_out(&self.name))?
    }
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
