//! The Redis and Redlock stores.
//!
//! - `redis://[:PASSWORD@]HOST[:PORT][/DB]`, or `rediss://…[?ca=PATH]` for
//!   TLS (the server's certificate checked against the CA in PATH, else the
//!   system's roots): one Redis server.
//! - `redlock://[:PASSWORD@]H1:P1,H2:P2,H3:P3[,…][/DB]`: the Redlock
//!   algorithm on three or more independent Redis servers (not replicas of
//!   each other).
//!
//! # What it gives
//!
//! - Exclusive, shared and semaphore modes, all served in arrival order: a
//!   reader that comes after a waiting writer waits behind it. A freed lock
//!   is handed to the head of the queue with one message to that waiter; no
//!   other waiter wakes, and nobody polls.
//! - Leases and lock-delay: a hold ends with its lease unless renewed (one
//!   renewal extends every lock of a session), and a key whose holder
//!   vanished is granted to nobody until its lock-delay is over too.
//! - Release and renewal are owner-checked: a stale holder never releases
//!   or extends the hold of the one after it.
//! - Fencing tokens rise with every grant of a key, from a counter that
//!   never expires; on Redlock, from a majority of the instances, so each
//!   exclusive grant's token is above every token before it. Two *shared* or *semaphore* holders
//!   granted at the same moment on different majorities may get the same
//!   token.
//! - `lost()` fires when a renewal finds the hold gone (deleted, expired,
//!   or taken over), and in any case when the lease runs out unrenewed.
//! - All keys of one lock share the hash tag `{KEY}`, so a lock lives in
//!   one slot; renewing many locks in one call needs them on one node (a
//!   single server, or each Redlock instance).
//! - `status` lists a lock's holders and its waiters in queue order, each
//!   with its session's owner (written once per session, in `dl:o:SESSION`,
//!   not with every hold), its lease left, and its token where Redis keeps
//!   it; on Redlock, what a majority of the instances lists.
//! - `force_release` ends every hold on a key (on Redlock, on a majority of
//!   the instances at least, else it fails and says to run it again) and
//!   hands the key to its waiters; the next token is higher, and each ended
//!   holder finds out at its next renewal, within a third of its lease.
//!
//! # What this does not protect against
//!
//! - **A single Redis that loses its data.** Without persistence, a restart
//!   forgets every lock (a second holder can then be granted at once) and
//!   every fencing counter (tokens start again from 1). With `appendonly yes`
//!   and `appendfsync always`, both survive a restart; with `appendfsync
//!   everysec` the last second may be lost.
//! - **Failover to a replica.** Replication is asynchronous: a replica
//!   promoted after a crash may not have the latest grant, and grants the
//!   lock again. Use Redlock on independent servers instead, and fence every
//!   write with the token.
//! - **A Redlock instance restarted without its data.** One is enough: a
//!   lock held on exactly a majority that includes it can be granted again
//!   to a new majority of the empty instance and one that never had it.
//!   Restart an instance only after the longest TTL in use has passed
//!   (delayed restart), or run each with `appendfsync always`.
//! - **Eviction.** Under `maxmemory` with an eviction policy, Redis may evict
//!   a lock or its counter. Run with `maxmemory-policy noeviction`. Fencing
//!   counters never expire, so they take memory for every key ever locked.
//! - **Clock jumps on the Redis servers.** Leases are measured by each
//!   server's clock; a server whose clock jumps forward expires leases
//!   early.
//!
//! In each of these, a resource that remembers the highest token it has
//! seen and refuses lower ones turns away the stale holder's writes, except
//! where tokens themselves went back (data lost on a single server, or on
//! more Redlock instances than the outvoting allows). Needs Redis 6.2 or
//! later.
//!
//! See `docs/0003-redis-queue.md` for how a lock is kept, and why.

mod force;
mod instance;
mod owner;
mod scripts;
mod session;
mod status;
mod wake;

use std::sync::Arc;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    Capabilities, Fencing, KeyWatch, KeyWatcher, LockStore, SessionModel, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use url::Url;

use instance::{Failures, Instance};

/// Where the store's keys start.
pub(crate) const KEY_PREFIX: &str = "dl:";

/// The port Redis listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 6379;

/// What the instances of one store share.
pub(crate) struct Shared {
    pub(crate) instances: Vec<Instance>,
    /// How many instances must agree.
    pub(crate) quorum: usize,
}

/// A store on one Redis server, or on several with Redlock.
pub struct RedisStore {
    name: &'static str,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .shared
            .instances
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        f.debug_struct("RedisStore")
            .field("name", &self.name)
            .field("instances", &names)
            .finish()
    }
}

impl RedisStore {
    /// Connects to the Redis server (`redis://`, `rediss://`) or the Redlock
    /// instances (`redlock://`) a URL names. A single server must answer; of
    /// Redlock instances a majority must.
    pub async fn connect(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        // Hand-overs to this store's waiters are published here.
        let channel = format!("{KEY_PREFIX}c:{:032x}", rand::random::<u128>());
        let (name, instances) = match scheme {
            "redis" | "rediss" => {
                let parsed = Url::parse(url).map_err(|err| {
                    Error::config(format!(
                        "cannot parse '{url}': {err}; write redis://[:PASSWORD@]HOST[:PORT][/DB]"
                    ))
                })?;
                ("redis", vec![single(&parsed, &channel)?])
            }
            "redlock" => ("redlock", redlock(url, &channel)?),
            _ => {
                return Err(Error::config(format!(
                    "'{url}' is not a Redis URL; use redis://, rediss:// or redlock://"
                )))
            }
        };
        let quorum = instances.len() / 2 + 1;
        let store = RedisStore {
            name,
            shared: Arc::new(Shared { instances, quorum }),
        };
        store.check_reachable().await?;
        Ok(store)
    }

    /// Connects to every instance now, so that a wrong address is known at
    /// once: a single server must answer, and a majority of Redlock's.
    async fn check_reachable(&self) -> Result<()> {
        let instances = &self.shared.instances;
        let results = join_all(instances.iter().map(|instance| async move {
            let mut connection = instance.connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        }))
        .await;
        let mut failures = Failures::default();
        for (instance, result) in instances.iter().zip(results) {
            if let Err(err) = result {
                failures.push(instance, err);
            }
        }
        let answered = instances.len() - failures.len();
        if answered >= self.shared.quorum {
            return Ok(());
        }
        let message = if instances.len() == 1 {
            failures.on_single(
                "check the URL and that redis-server runs there",
                "; check the user, password and database in the URL",
            )
        } else {
            format!(
                "only {answered} of {} Redlock instances answered ({} needed): {failures}",
                instances.len(),
                self.shared.quorum,
            )
        };
        // A refused login is the URL's to mend, not Redis's.
        let kind = if failures.all(|err| err.kind() == redis::ErrorKind::AuthenticationFailed) {
            ErrorKind::Config
        } else {
            ErrorKind::Unavailable
        };
        Err(failures.source_of(Error::new(kind, message)))
    }

    /// What a single Redis gives.
    pub fn capabilities() -> Capabilities {
        Self::capabilities_of("redis")
    }

    /// What Redlock gives: the same.
    pub fn redlock_capabilities() -> Capabilities {
        Self::capabilities_of("redlock")
    }

    fn capabilities_of(name: &'static str) -> Capabilities {
        let mut capabilities = Capabilities::minimal(name);
        capabilities.shared = true;
        capabilities.fair = true;
        capabilities.writer_preferring = true;
        capabilities.semaphore = true;
        capabilities.push_wakeup = true;
        // Tokens survive a restart only with `appendfsync always`; the
        // declaration does not assume it.
        capabilities.fencing = Fencing::InProcess;
        capabilities.lease_expiry = true;
        capabilities.lock_delay = true;
        capabilities.session = SessionModel::Lease;
        capabilities.status = true;
        capabilities.keeps_owner = true;
        capabilities.force_release = true;
        // Redlock's instances may list a hold with tokens that differ.
        capabilities.tells_leader = name == "redis";
        // Where the server publishes keyspace events (see watch_key).
        capabilities.watches_keys = name == "redis";
        capabilities
    }
}

/// The instance of a `redis://` or `rediss://` URL. `rediss://…?ca=PATH`
/// trusts the CA certificate in PATH (PEM) instead of the system's roots.
fn single(url: &Url, channel: &str) -> Result<Instance> {
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| {
            Error::config(format!("'{url}' names no host; write redis://HOST[:PORT]"))
        })?;
    let name = format!("{host}:{}", url.port().unwrap_or(DEFAULT_PORT));
    let (plain, ca) = distlock_core::store::take_url_param(url, "ca");
    let unusable = |err: redis::RedisError| {
        Error::config(format!("'{url}' is not a usable Redis URL: {err}")).with_source(err)
    };
    let client = match ca {
        Some(path) if url.scheme() == "rediss" => {
            let pem = std::fs::read(&path).map_err(|err| {
                Error::config(format!(
                    "cannot read the CA certificate {path} named in the URL: {err}"
                ))
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(plain.as_str(), certificates).map_err(unusable)?
        }
        Some(_) => {
            return Err(Error::config(format!(
                "'{url}' names a CA certificate but not TLS; write rediss:// to use it"
            )))
        }
        None => redis::Client::open(plain.as_str()).map_err(unusable)?,
    };
    Ok(Instance::new(name, client, channel))
}

/// The instances of a `redlock://H1:P1,H2:P2,…[/DB]` URL.
fn redlock(url: &str, channel: &str) -> Result<Vec<Instance>> {
    let usage = "write redlock://H1:P1,H2:P2,H3:P3 (three or more independent Redis servers)";
    let rest = url.trim_start_matches("redlock://");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (password, hosts) = match authority.rsplit_once('@') {
        Some((user_info, hosts)) => (
            Some(user_info.split_once(':').map_or(user_info, |(_, p)| p)),
            hosts,
        ),
        None => (None, authority),
    };
    let db = path.split(['?', '#']).next().unwrap_or_default();
    if !db.is_empty() && db.parse::<u32>().is_err() {
        return Err(Error::config(format!(
            "'{db}' in '{url}' is not a database number; {usage}"
        )));
    }
    let mut instances = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err(Error::config(format!("'{url}' has an empty host; {usage}")));
        }
        let address = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:{DEFAULT_PORT}")
        };
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let one = format!("redis://{auth}{address}/{db}");
        let client = redis::Client::open(one.as_str()).map_err(|err| {
            Error::config(format!(
                "'{host}' in '{url}' is not a usable address: {err}; {usage}"
            ))
        })?;
        instances.push(Instance::new(address, client, channel));
    }
    if instances.len() < 3 {
        return Err(Error::config(format!(
            "'{url}' names {} instance(s); Redlock needs at least three, and for one \
             server use redis://HOST:PORT",
            instances.len()
        )));
    }
    Ok(instances)
}

#[async_trait]
impl LockStore for RedisStore {
    fn capabilities(&self) -> Capabilities {
        Self::capabilities_of(self.name)
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(session::RedisSession::new(
            Arc::clone(&self.shared),
            options,
        )))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        status::read(&self.shared, query).await
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        force::force_release(&self.shared, key, requested_by).await
    }

    /// The keyspace events of the lock's main key and its holders' set:
    /// a fast grant's SET, a release's DEL, a lease's expiry, a queued
    /// grant or release. Only where the server publishes them
    /// (`notify-keyspace-events` with `K` and `$gxz`, or `KA`); elsewhere,
    /// and on Redlock, `None`: observers poll. A broken subscription ends
    /// the signals.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let [instance] = &self.shared.instances[..] else {
            return Ok(None);
        };
        let keys = scripts::LockKeys::new(KEY_PREFIX, key);
        let subscribed = instance
            .keyspace_events(&[&keys.main, &keys.holders])
            .await
            .map_err(|err| {
                Error::unavailable(format!("Redis at {}: {err}", instance.name)).with_source(err)
            })?;
        let Some((sink, mut events)) = subscribed else {
            tracing::debug!(
                "Redis at {} publishes no keyspace events; observers poll (add K$gxz to \
                 its notify-keyspace-events to push)",
                instance.name
            );
            return Ok(None);
        };
        let (signals, watch) = KeyWatcher::new();
        tokio::spawn(async move {
            // Kept: the subscription lives as long as its sink.
            let _sink = sink;
            loop {
                tokio::select! {
                    event = futures::StreamExt::next(&mut events) => {
                        if event.is_none() || !signals.signal() {
                            return;
                        }
                    }
                    () = signals.closed() => return,
                }
            }
        });
        Ok(Some(watch))
    }
}
