//! The ZooKeeper store: `zk://HOST[:PORT][,HOST[:PORT]…][/CHROOT]`.
//!
//! - A session is a ZooKeeper session of its own, with the session's TTL as
//!   its timeout. Opening fails if ZooKeeper grants less (its
//!   `maxSessionTimeout`); granted more, a dead holder's locks are freed
//!   later than the TTL says, never sooner.
//! - A lock is a queue of ephemeral sequential nodes under `/distlock/NAME`,
//!   in order of sequence: FIFO. Exclusive, shared (readers wait only for
//!   earlier writers) and semaphore (N permits admit the N lowest) modes.
//! - The fencing token is the node's creation zxid (`czxid`), which only
//!   grows, across holders, modes and restarts of ZooKeeper. Readers or
//!   semaphore holders that hold at once may see their grants in another
//!   order than their tokens.
//! - A waiter watches only the node that blocks it: no herd wakes, nobody
//!   polls. A waiter whose session expired while queued is told its session
//!   is lost, never that it holds the lock.
//! - Releases and renewals name the attempt's own node, so nothing touches
//!   another session's node. An attempt that ends without the lock deletes
//!   its node (in the background if it was dropped); the session takes it
//!   in any case.
//!
//! - Each queue node's data is its session's owner, written by the create
//!   that joins the queue. `status` reads the queues (for a prefix, the lock
//!   directories whose names decode to a key under it) and splits them with
//!   the same decision: holders (token, time since their node was made),
//!   then waiters in queue order. Another session's time left is not known.
//!
//! - `force_release` deletes the nodes that hold the key, in one multi that
//!   also checks the first waiter still there; waiters wake as on a
//!   release, and the next token (a later czxid) is higher. The store's
//!   client needs the DELETE permission on the lock's directory.
//!
//! `lost()` fires when a renewal finds the session expired or a held node
//! gone; while the connection is down the session is lost at its deadline,
//! no later than ZooKeeper's own expiry. Each held node is watched, so one
//! deleted by someone else (a forced release) asks for that renewal at once.
//! Not given: lock-delay.
//!
//! See `docs/0006-zookeeper.md` for the reasoning.

mod force;
mod session;
mod status;

pub use session::lock_dir;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::status::{HolderStatus, Status, StatusQuery};
use distlock_core::store::{
    Capabilities, KeyWatch, KeyWatcher, LockStore, SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkError};

/// How long connecting, and each call, may take.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the store's nodes live, under the chroot.
pub(crate) const BASE: &str = "/distlock";

/// A store on one ZooKeeper ensemble.
#[derive(Clone)]
pub struct ZkStore {
    /// The connect string, hosts and chroot, as the ZooKeeper client takes it.
    connect: String,
    /// The hosts, for messages.
    hosts: String,
    /// The client `status` and `force_release` use: made at its first use,
    /// and again once its session has ended.
    reader: Arc<tokio::sync::Mutex<Option<Client>>>,
}

impl std::fmt::Debug for ZkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkStore")
            .field("connect", &self.connect)
            .finish()
    }
}

/// A ZooKeeper error, explained: `Lost` when it says the session is gone.
/// The client's error is the source.
pub(crate) fn zk_error(hosts: &str, err: &zookeeper_client::Error) -> Error {
    use zookeeper_client::Error as Zk;
    let error = match err {
        Zk::SessionExpired => Error::lost(format!(
            "ZooKeeper at {hosts}: the session expired; open a new session"
        )),
        Zk::ClientClosed => Error::lost(format!(
            "ZooKeeper at {hosts}: the session was closed; open a new session"
        )),
        Zk::NoAuth | Zk::AuthFailed => Error::config(format!(
            "ZooKeeper at {hosts}: {err}; check the ACLs of the chroot and /distlock"
        )),
        Zk::Unimplemented => Error::unsupported(format!(
            "ZooKeeper at {hosts} does not know a request of the lock recipe ({err}); \
             use ZooKeeper 3.5.3 or later (container nodes, create2)"
        )),
        Zk::NoHosts | Zk::Timeout | Zk::ConnectionLoss | Zk::Throttled => unavailable(hosts, err),
        _ => Error::store(format!(
            "ZooKeeper at {hosts}: {err}, which the lock recipe did not expect; \
             was something under {BASE} changed by hand?"
        )),
    };
    error.with_source(err.clone())
}

pub(crate) fn unavailable(hosts: &str, err: &dyn std::fmt::Display) -> Error {
    Error::unavailable(format!(
        "ZooKeeper at {hosts}: {err}; check the hosts and that ZooKeeper runs"
    ))
}

pub(crate) fn timed_out(hosts: &str) -> Error {
    Error::unavailable(format!(
        "ZooKeeper at {hosts} did not answer in {CALL_TIMEOUT:?}; check that it runs, \
         that it is reachable from here, and that the ensemble has a quorum"
    ))
}

/// A call bounded in time, its error explained.
pub(crate) async fn call<T>(
    hosts: &str,
    call: impl std::future::Future<Output = std::result::Result<T, ZkError>>,
) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| timed_out(hosts))?
        .map_err(|err| zk_error(hosts, &err))
}

const USAGE: &str = "write zk://HOST[:PORT][,HOST[:PORT]…][/CHROOT]";

/// Splits `zk://…` into hosts (with ports, 2181 by default) and chroot.
fn parse(url: &str) -> Result<(Vec<String>, String)> {
    let Some(rest) = url.strip_prefix("zk://") else {
        return Err(Error::config(format!(
            "'{url}' is not a ZooKeeper URL; {USAGE}"
        )));
    };
    if rest.contains(['?', '#']) {
        return Err(Error::config(format!(
            "'{url}' has a query or fragment, which the ZooKeeper store does not take; {USAGE}"
        )));
    }
    let (hosts, chroot) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, port),
            None => (host, "2181"),
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
        if !valid_name || port.parse::<u16>().map_or(true, |port| port == 0) {
            return Err(Error::config(format!(
                "'{host}' in '{url}' is not HOST[:PORT]; {USAGE}"
            )));
        }
        endpoints.push(format!("{name}:{port}"));
    }
    let chroot = chroot.strip_suffix('/').unwrap_or(chroot);
    if !chroot.is_empty() {
        for segment in chroot[1..].split('/') {
            if segment.is_empty()
                || segment == "."
                || segment == ".."
                || segment.chars().any(char::is_control)
            {
                return Err(Error::config(format!(
                    "the chroot '{chroot}' in '{url}' is not a ZooKeeper path: it has an \
                     empty, '.', '..' or control-character segment; {USAGE}"
                )));
            }
        }
        if chroot == "/zookeeper" || chroot.starts_with("/zookeeper/") {
            return Err(Error::config(format!(
                "the chroot '{chroot}' in '{url}' is under /zookeeper, which ZooKeeper \
                 keeps for itself; choose another path"
            )));
        }
    }
    Ok((endpoints, chroot.to_owned()))
}

impl ZkStore {
    /// Connects to the ensemble a `zk://H1[:P1][,H2[:P2]…][/CHROOT]` URL
    /// names, and creates the chroot and `/distlock` under it if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let (endpoints, chroot) = parse(url)?;
        let hosts = endpoints.join(",");
        let client = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connector()
                .with_session_timeout(CALL_TIMEOUT)
                .with_fail_eagerly()
                .connect(&hosts),
        )
        .await
        .map_err(|_| timed_out(&hosts))?
        .map_err(|err| zk_error(&hosts, &err))?;
        let base = format!("{chroot}{BASE}");
        let options = CreateMode::Persistent.with_acls(Acls::anyone_all());
        call(&hosts, client.mkdir(&base, &options)).await?;
        Ok(ZkStore {
            connect: format!("{hosts}{chroot}"),
            hosts,
            reader: Arc::default(),
        })
    }

    /// What ZooKeeper gives: what every store with a queue per key does,
    /// `status` with each node's owner, and forced release.
    pub fn capabilities() -> Capabilities {
        let mut caps = distlock_core::store::queue::capabilities("zookeeper");
        caps.status = true;
        caps.keeps_owner = true;
        caps.tells_leader = true;
        caps.force_release = true;
        caps.watches_keys = true;
        caps
    }

    /// The client `status` and `force_release` use.
    async fn reader(&self) -> Result<Client> {
        let mut reader = self.reader.lock().await;
        if let Some(client) = reader.as_ref() {
            if !client.state().is_terminated() {
                return Ok(client.clone());
            }
        }
        let client = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connector()
                .with_session_timeout(CALL_TIMEOUT)
                .with_fail_eagerly()
                .connect(&self.connect),
        )
        .await
        .map_err(|_| timed_out(&self.hosts))?
        .map_err(|err| zk_error(&self.hosts, &err))?;
        *reader = Some(client.clone());
        Ok(client)
    }
}

#[async_trait]
impl LockStore for ZkStore {
    fn capabilities(&self) -> Capabilities {
        ZkStore::capabilities()
    }

    async fn open_session(&self, options: &SessionOptions) -> Result<Box<dyn StoreSession>> {
        Ok(Box::new(
            session::ZkSession::open(&self.connect, &self.hosts, options).await?,
        ))
    }

    async fn status(&self, query: &StatusQuery) -> Result<Status> {
        self.read_status(query).await
    }

    /// A watch of the lock's queue: the children of its directory (a join,
    /// a release, an expiry), or, while it has none, the directory's
    /// creation. Set before this returns, and after each change set again
    /// before the signal, so no change after the reader's read goes
    /// unseen. A failed call ends the signals; the observer then polls.
    async fn watch_key(&self, key: &str) -> Result<Option<KeyWatch>> {
        let client = self.reader().await?;
        let dir = lock_dir(key);
        let mut watcher = arm(&client, &dir)
            .await
            .map_err(|err| zk_error(&self.hosts, &err))?;
        let (signals, watch) = KeyWatcher::new();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = watcher.changed() => {}
                    () = signals.closed() => return,
                }
                watcher = match arm(&client, &dir).await {
                    Ok(watcher) => watcher,
                    Err(_) => return,
                };
                if !signals.signal() {
                    return;
                }
            }
        });
        Ok(Some(watch))
    }

    async fn force_release(&self, key: &str, requested_by: &str) -> Result<Vec<HolderStatus>> {
        let ended = self.end_holds(key).await?;
        tracing::warn!(key, requested_by, ended = ended.len(), "forced release");
        Ok(ended)
    }
}

/// A one-time watch of `dir`'s children, or of its creation while it does
/// not exist.
async fn arm(
    client: &Client,
    dir: &str,
) -> std::result::Result<zookeeper_client::OneshotWatcher, ZkError> {
    loop {
        let watched = tokio::time::timeout(CALL_TIMEOUT, async {
            match client.list_and_watch_children(dir).await {
                Ok((_, watcher)) => Ok(Some(watcher)),
                Err(ZkError::NoNode) => match client.check_and_watch_stat(dir).await? {
                    (None, watcher) => Ok(Some(watcher)),
                    // Made meanwhile: watch its children.
                    (Some(_), _) => Ok(None),
                },
                Err(err) => Err(err),
            }
        });
        match watched.await {
            Ok(Ok(Some(watcher))) => return Ok(watcher),
            Ok(Ok(None)) => continue,
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(ZkError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distlock_core::ErrorKind;

    #[test]
    fn urls_parse_into_hosts_and_chroot() {
        let (hosts, chroot) = parse("zk://a:1,b,c:3/x/y").expect("valid");
        assert_eq!(hosts, ["a:1", "b:2181", "c:3"]);
        assert_eq!(chroot, "/x/y");
        assert_eq!(parse("zk://a/").expect("valid").1, "");
        for bad in [
            "zk://",
            "zk://a:0",
            "zk://a:x",
            "zk://a,,b",
            "zk://a//b",
            "zk://a/b/../c",
            "zk://a/zookeeper/x",
            "zk://a/b?x=1",
            "http://a:1",
        ] {
            let err = parse(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
        }
    }

    #[test]
    fn each_zookeeper_error_gets_the_kind_that_says_what_to_do() {
        use zookeeper_client::Error as Zk;
        for (err, kind) in [
            (Zk::SessionExpired, ErrorKind::Lost),
            (Zk::ClientClosed, ErrorKind::Lost),
            (Zk::NoAuth, ErrorKind::Config),
            (Zk::AuthFailed, ErrorKind::Config),
            (Zk::Unimplemented, ErrorKind::Unsupported),
            (Zk::ConnectionLoss, ErrorKind::Unavailable),
            (Zk::Timeout, ErrorKind::Unavailable),
            (Zk::NoNode, ErrorKind::Store),
        ] {
            let error = zk_error("h:2181", &err);
            assert_eq!(error.kind(), kind, "{err}: {error}");
            assert!(error.to_string().contains("h:2181"), "{error}");
        }
    }

    #[test]
    fn a_store_shows_where_it_connects_and_nothing_of_its_client() {
        let store = ZkStore {
            connect: "a:1,b:2/x".to_owned(),
            hosts: "a:1,b:2".to_owned(),
            reader: Arc::default(),
        };
        assert_eq!(format!("{store:?}"), r#"ZkStore { connect: "a:1,b:2/x" }"#);
    }
}
