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
    /// Busy; worth asking again after this long at the latest.
    Busy(Duration),
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
        let mut connection = self.connection().await?;
        let result = tokio::time::timeout(CALL_TIMEOUT, invocation.invoke_async(&mut connection))
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
        let (status, value): (i64, Value) = self.invoke(&invocation).await?;
        Ok(match status {
            1 => Attempt::Granted(redis::from_redis_value(value)?),
            0 => Attempt::Busy(Duration::from_millis(redis::from_redis_value(value)?)),
            _ => Attempt::Conflict(redis::from_redis_value(value)?),
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

    /// Takes away whatever `session` holds of the key or waits for.
    pub(crate) async fn abandon(&self, keys: &LockKeys, session: &str) -> redis::RedisResult<()> {
        let mut invocation = scripts::abandon().prepare_invoke();
        invocation
            .key(&keys.holders)
            .key(&keys.writers)
            .arg(session)
            .arg(&keys.channel);
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
