//! The etcd store: `etcd://HOST:PORT[,HOST:PORT…]`.
//!
//! The recipe of etcd's `concurrency.Mutex`, with its traps avoided:
//!
//! - A session is an etcd lease, kept alive by the core's renewals; when it
//!   ends, etcd deletes every key of the session.
//! - A lock is a queue of keys `distlock/NAME/LEASE-SLOT`, put with the
//!   session's lease and its mode as value. The holder is the key of lowest
//!   create revision; readers wait only for earlier writers, a semaphore of
//!   N admits the N lowest. The fencing token is the key's create revision,
//!   which only grows, across holders, modes and restarts of etcd.
//! - A session's attempts on a lock use the same key (slot 0) again: etcd
//!   keeps every key ever made in its index until a compaction, and each
//!   read of a queue walks them all, so a key per attempt would slow every
//!   read down as the lock is used. A key must be new when an attempt puts
//!   it (an old one would jump the queue and repeat a token): one still
//!   there (a release that failed half-way) is taken out first. While a
//!   dropped attempt's key is still being deleted in the background, the
//!   next slot is taken. Every delete names the create revision of the life
//!   of the key it means, so one that lands late never takes a later
//!   attempt's key.
//! - Joining the queue and reading it is one transaction. A waiter watches
//!   only the key that blocks it (its predecessor, or the last earlier
//!   writer), so no herd wakes; semaphore waiters watch the lock's keys.
//!   The watch starts now, not at the revision read: etcd serves watches
//!   that start in the past from a loop that runs every 100 ms. If the queue
//!   moved in between, the waiter asks once more whether its blocker (that
//!   life of the key, by create revision) is still there, so no deletion
//!   goes unseen. That read decides no grant and need only see past the
//!   watch's start, so it is served from what the member has applied.
//! - A second watch of the blocker, on the same stream, starts a few
//!   revisions ahead. etcd registers a watch "from now" at the revision it
//!   read a moment before; a write in between (about one watch in fifty
//!   under load) leaves the watch to the 100 ms loop, and the whole queue
//!   stalls behind it. A watch that starts ahead of etcd is always served
//!   as writes land; the first covers the revisions in between.
//! - Before saying the lock is held, the waiter reads the queue and finds
//!   its own key still there, as etcd's own fix of issue 11456 does (a
//!   waiter whose lease ran out while queued must never be told it holds
//!   the lock). etcd deletes the keys of a lease that ran out a moment
//!   after (it revokes in batches), so a key can outlive its lease briefly;
//!   the core covers that moment, as it refuses a grant that comes after
//!   the session's own lease deadline.
//! - Releases and checks name the key and its create revision, so nothing
//!   touches another session's key. An attempt that ends without the lock
//!   deletes its key; one dropped or failed half-way has it deleted in the
//!   background (tried again while etcd is unreachable), and the key goes
//!   with the session's lease in any case. A watch is trusted five seconds
//!   at a time, then the queue is read again.
//!
//! `lost()` fires when a renewal finds the lease gone or a held key deleted.
//! Not given: lock-delay.

mod session;

use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    Capabilities, Fencing, LockStore, SessionModel, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use etcd_client::{Client, ConnectOptions};

/// How long connecting, and each call, may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the store's keys start.
pub(crate) const PREFIX: &str = "distlock/";

/// A store on one etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

pub(crate) fn unavailable(endpoints: &str, err: &dyn std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("etcd at {endpoints}: {err}; check the endpoints and that etcd runs"),
    )
}

pub(crate) fn timed_out(endpoints: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("etcd at {endpoints} did not answer in {CALL_TIMEOUT:?}"),
    )
}

impl EtcdStore {
    /// Connects to the endpoints an `etcd://H1:P1[,H2:P2…]` URL names.
    pub async fn connect(url: &str) -> Result<Self> {
        let usage = "write etcd://HOST:PORT[,HOST:PORT…]";
        let Some(rest) = url.strip_prefix("etcd://") else {
            return Err(Error::new(
                ErrorKind::Config,
                format!("'{url}' is not an etcd URL; {usage}"),
            ));
        };
        let hosts = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let Some((name, port)) = host.rsplit_once(':') else {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("'{host}' in '{url}' has no port; {usage}"),
                ));
            };
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("'{host}' in '{url}' is not HOST:PORT; {usage}"),
                ));
            }
            endpoints.push(format!("http://{host}"));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // A member cut off from its cluster refuses, rather than serving
            // a silent watch.
            .with_require_leader(true);
        let shown = hosts.to_owned();
        let mut client =
            tokio::time::timeout(CALL_TIMEOUT, Client::connect(&endpoints, Some(options)))
                .await
                .map_err(|_| timed_out(&shown))?
                .map_err(|err| unavailable(&shown, &err))?;
        // A connection alone proves little: ask something.
        tokio::time::timeout(CALL_TIMEOUT, client.status())
            .await
            .map_err(|_| timed_out(&shown))?
            .map_err(|err| unavailable(&shown, &err))?;
        Ok(EtcdStore {
            client,
            endpoints: shown,
        })
    }

    /// What etcd gives.
    pub fn capabilities() -> Capabilities {
        let mut capabilities = Capabilities::minimal("etcd");
        capabilities.fair = true;
        capabilities.shared = true;
        capabilities.writer_preferring = true;
        capabilities.semaphore = true;
        capabilities.push_wakeup = true;
        capabilities.fencing = Fencing::Durable;
        capabilities.lease_expiry = true;
        capabilities.session = SessionModel::Lease;
        capabilities
    }
}

#[async_trait]
impl LockStore for EtcdStore {
    fn capabilities(&self) -> Capabilities {
        EtcdStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(
            session::EtcdSession::open(self.client.clone(), self.endpoints.clone(), options)
                .await?,
        ))
    }
}
