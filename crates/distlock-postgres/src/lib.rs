//! The PostgreSQL store: `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, in
//! one of two modes. The two do not exclude each other: use one mode per
//! key.
//!
//! # Advisory locks (the default, `?mode=advisory`)
//!
//! Each session is a dedicated connection, and its locks are advisory
//! locks of that connection, exclusive or shared, on a 64-bit key hashed
//! from the lock name (see [`advisory_key`]). Names whose hashes collide
//! share one lock: one may wait for the other, but exclusion is never
//! broken. Waits happen in the server, and an acquire dropped while it
//! waits leaves no trace (its cancel needs read access to
//! `pg_stat_activity`; without it the wait ends at its `lock_timeout`, at
//! most a second later). Losing the connection is losing the locks, and
//! `lost()` fires.
//!
//! Not given: semaphores, FIFO order, leases (a frozen client keeps its
//! locks as long as its connection lives), lock-delay. It does not work
//! through a pooler in transaction mode, such as PgBouncer. Like lease
//! mode, it needs READ COMMITTED (the default), which the connect checks:
//! a new epoch of the tokens reads after taking a lock.
//!
//! `status` answers for one key, from `pg_locks`: its holders and waiters
//! (the waiters in the order their current wait began), each with its
//! session's owner as `application_name`, which PostgreSQL cuts to 63
//! bytes; no tokens or times held. A prefix cannot be listed: the locks
//! are numbers.
//!
//! # A lease table (`?mode=lease`)
//!
//! A lock is a row per holder in `distlock_leases_v2`, with the time its
//! lease ends by the server's clock; a lease outlives its connection.
//! Exclusive, shared and semaphore modes; waiters are woken by
//! LISTEN/NOTIFY. A release that frees the key wakes the earliest waiter
//! not woken yet alone, on its store's own channel, if that waiter wants
//! the key alone; otherwise, and while an observer, an older client's
//! waiter or a waiter of a store that cannot hear its channel is there,
//! every waiter of the key. Not given: FIFO order, writer preference,
//! lock-delay.
//! `status` lists holders (owner, token, time held, lease left) and
//! waiters (owner, mode, time waited) by key or prefix, from the rows.
//! Observers of a key (`Client::observe`) are pushed its grants and
//! releases by NOTIFY, through a record of theirs in `distlock_waiters`;
//! a grant or release of a key nobody waits on or observes notifies
//! nobody. Needs READ COMMITTED (the default) and, on first connect, the right to
//! create tables and functions. Through a pooler in transaction mode it
//! works if the pooler keeps prepared statements (PgBouncer 1.21 or later
//! with `max_prepared_statements`); LISTEN may then not be delivered, and
//! waiters rely on their timers. After a crash or a standby's promotion no
//! lease is granted until the longest lease ever granted has run out, by
//! the new server's clock.
//!
//! # Fencing tokens
//!
//! In both modes a token is `epoch << 40 | n`, drawn in the same statement
//! as the grant, with no disk flush per grant. Tokens rise per key (and
//! across keys) through restarts, crashes and a failover to a streaming
//! replica that had the latest epoch. What could make them go back,
//! plainly: a failover to an asynchronous replica that missed more than 15
//! epoch bumps, a point-in-time recovery to before a bump, or someone
//! altering, resetting or recreating `distlock_token_seq` by hand. Needs
//! PostgreSQL 15 or later (unlogged sequences). Older clients counted tokens per key in
//! `distlock_tokens`, below `1 << 40`: stop them all before the first
//! client with these tokens starts, or their tokens will be lower.
//!
//! See `docs/0007-postgres.md` for the reasoning, and
//! `docs/0004-sql-tokens.md` for the tokens.

mod advisory;
mod cancel;
mod connect;
mod lease;
mod observe;
mod status;
mod tokens;
mod wakeup;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    take_url_param, Capabilities, Fencing, KeyWatch, LockStore, SessionModel, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, Result};
use url::Url;

/// The advisory-lock key of a lock name, as `pg_locks` shows it
/// (`classid` is its high 32 bits, `objid` its low 32 bits, `objsubid` 1).
pub fn advisory_key(name: &str) -> i64 {
    advisory::lock_id(name)
}

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A store on one PostgreSQL database.
pub struct PostgresStore {
    config: tokio_postgres::Config,
    target: String,

    /// Set in lease mode.
    leases: Option<Arc<lease::Leases>>,
    /// Advisory mode: cancels the waits of dropped acquires.
    canceller: Arc<cancel::Canceller>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish()
    }
}

impl PostgresStore {
    /// Connects to the database a `postgres://` or `postgresql://` URL
    /// names, and makes the token sequence, its epoch table and procedure
    /// if they are not there.
    pub async fn connect(url: &str) -> Result<Self> {
        let usage = "write postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
        let parsed = Url::parse(url)
            .map_err(|err| Error::config(format!("cannot parse '{url}': {err}; {usage}")))?;
        let host = parsed
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| Error::config(format!("'{url}' names no host; {usage}")))?;
        let (plain, mode) = take_url_param(&parsed, "mode");
        let lease_mode = match mode.as_deref() {
            None | Some("advisory") => false,
            Some("lease") => true,
            Some(other) => {
                return Err(Error::config(format!(
                    "'{url}' asks for mode '{other}'; write mode=advisory (the default) or \
                     mode=lease"
                )))
            }
        };
        let mut config = tokio_postgres::Config::from_str(plain.as_str()).map_err(|err| {
            Error::config(format!("'{url}' is not a usable PostgreSQL URL: {err}"))
        })?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            // Unacknowledged data gives up after this, not TCP's 15 minutes.
            .tcp_user_timeout(Duration::from_secs(15))
            .application_name("distlock");
        let database = parsed.path().trim_start_matches('/');
        let target = format!("{host}:{}/{database}", parsed.port().unwrap_or(5432));
        let no_answer = |_| {
            Error::unavailable(format!(
                "PostgreSQL at {target} did not answer in {:?}",
                CONNECT_TIMEOUT * 2
            ))
        };
        let create = tokens::create_table(config.clone(), target.clone());
        tokio::time::timeout(CONNECT_TIMEOUT * 2, create)
            .await
            .map_err(no_answer)??;
        let leases = if lease_mode {
            let setup = lease::Leases::connect(&config, &target);
            let setup = tokio::time::timeout(CONNECT_TIMEOUT * 2, setup).await;
            Some(setup.map_err(no_answer)??)
        } else {
            None
        };
        Ok(PostgresStore {
            canceller: cancel::Canceller::new(config.clone(), target.clone()),
            config,
            target,
            leases,
        })
    }

    /// What the lease table gives (`?mode=lease`).
    pub fn lease_capabilities() -> Capabilities {
        let mut capabilities = Capabilities::minimal("postgres");
        capabilities.shared = true;
        capabilities.semaphore = true;
        capabilities.push_wakeup = true;
        capabilities.fencing = Fencing::Durable;
        capabilities.lease_expiry = true;
        capabilities.session = SessionModel::Lease;
        capabilities.status = true;
        capabilities.keeps_owner = true;
        capabilities.force_release = true;
        capabilities.tells_leader = true;
        capabilities.watches_keys = true;
        capabilities
    }

    /// What advisory locks give. `status` answers for one key only (a
    /// prefix cannot be listed), so it is not claimed.
    pub fn capabilities() -> Capabilities {
        let mut capabilities = Capabilities::minimal("postgres");
        capabilities.shared = true;
        capabilities.writer_preferring = true;
        capabilities.push_wakeup = true;
        capabilities.fencing = Fencing::Durable;
        capabilities.session = SessionModel::Connection;
        capabilities
    }
}

#[async_trait]
impl LockStore for PostgresStore {
    fn capabilities(&self) -> Capabilities {
        match self.leases {
            Some(_) => PostgresStore::lease_capabilities(),
            None => PostgresStore::capabilities(),
        }
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        if let Some(leases) = &self.leases {
            return Ok(Box::new(lease::LeaseSession::new(
                Arc::clone(leases),
                options,
            )));
        }
        // Who the session is, where `pg_stat_activity` (and `status`)
        // shows it; in the start-up message, so it costs no round trip.
        let mut config = self.config.clone();
        config.application_name(&options.owner);
        let client = connect::open(&config, &self.target).await?;
        Ok(Box::new(
            advisory::AdvisorySession::open(
                client,
                Arc::clone(&self.canceller),
                self.target.clone(),
                options.ttl,
            )
            .await?,
        ))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        if let Some(leases) = &self.leases {
            return leases.status(query).await;
        }
        let StatusQuery::Key(key) = query else {
            return status::advisory_prefix();
        };
        let client = connect::open(&self.config, &self.target).await?;
        status::advisory(&client, &self.target, key).await
    }

    /// Lease mode: each grant and release of the key, notified to the
    /// store's listening connection (`observe.rs`). Advisory locks cannot
    /// tell a leader, so are never observed.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        match &self.leases {
            Some(leases) => observe::watch_key(leases, key).await.map(Some),
            None => Ok(None),
        }
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let Some(leases) = &self.leases else {
            return Err(Error::unsupported(
                "a PostgreSQL advisory lock ends only with its holder's connection: end that \
                 (pg_terminate_backend of the pid distlock status shows), or use a \
                 postgres://…?mode=lease URL, whose holds can be ended",
            ));
        };
        let client = leases.client().await?;
        let ended = status::force_release_lease(&client, &self.target, key).await?;
        tracing::warn!(key, requested_by, ended = ended.len(), "forced release");
        Ok(ended)
    }
}
