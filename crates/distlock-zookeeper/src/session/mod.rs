//! A session: a ZooKeeper session, and the queue nodes of its locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::lock;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use tokio::sync::watch;
use zookeeper_client::{
    Acls, Client, CreateMode, Error as ZkError, MultiWriteError, SessionInfo, SessionState,
};

use crate::{timed_out, zk_error, BASE, CALL_TIMEOUT};

mod holds;
mod queue;

pub(crate) use queue::ordered;
use queue::Leave;

/// How many nodes one renewal checks in one transaction (their paths must
/// fit ZooKeeper's 1 MiB request limit: 3 KiB each at most).
const RENEW_BATCH: usize = 128;

/// How long a waiter whose connection broke waits before it looks again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// The directory of lock `name`'s queue: the name with `%`, `/` and the
/// characters ZooKeeper refuses in a node name escaped, so that every name
/// has a directory of its own.
pub fn lock_dir(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        // ZooKeeper checks names as Java strings: characters beyond
        // U+FFFF are surrogate pairs there, which it refuses.
        let refused = c == '%'
            || c == '/'
            || c.is_control()
            || ('\u{e000}'..='\u{f8ff}').contains(&c)
            || c >= '\u{fff0}';
        if refused {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                escaped.push_str(&format!("%{byte:02X}"));
            }
        } else {
            escaped.push(c);
        }
    }
    match escaped.as_str() {
        "." => escaped = "%2E".to_owned(),
        ".." => escaped = "%2E%2E".to_owned(),
        _ => {}
    }
    format!("{BASE}/{escaped}")
}

/// The lock whose directory is `BASE/name`; `None` for a node the store
/// did not make.
pub(crate) fn key_of(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('%') {
        bytes.extend_from_slice(&rest.as_bytes()[..at]);
        let hex = rest.get(at + 1..at + 3)?;
        bytes.push(u8::from_str_radix(hex, 16).ok()?);
        rest = &rest[at + 3..];
    }
    bytes.extend_from_slice(rest.as_bytes());
    let key = String::from_utf8(bytes).ok()?;
    // Only the one spelling `lock_dir` writes (`%41` is not `A`'s).
    let dir = lock_dir(&key);
    (dir.strip_prefix(BASE)?.strip_prefix('/')? == name).then_some(key)
}

/// A queue node's name is `TAG-NONCE-SEQUENCE`.
pub(crate) fn tag_of(name: &str) -> &str {
    name.split('-').next().unwrap_or_default()
}

fn sequence_of(name: &str) -> Option<i64> {
    name.rsplit('-').next()?.parse().ok()
}

/// A held lock's node.
#[derive(Debug, Clone)]
struct Node {
    path: String,
    czxid: i64,
    /// Set before the session deletes the node itself: its watch then
    /// takes the deletion for no news.
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    fn is(&self, lock: &HeldLock) -> bool {
        u64::try_from(self.czxid).ok() == Some(lock.token)
    }
}

/// What a session's attempts share, also after the attempt is gone.
struct Shared {
    /// The client: `None` once the session is closed or frozen, so that
    /// nothing keeps a frozen session's connection alive.
    client: Mutex<Option<Client>>,
    /// The connect string (hosts and chroot).
    connect: String,
    /// The session, to attach to it again and close it.
    info: SessionInfo,
    /// The session timeout ZooKeeper granted.
    timeout: Duration,
    /// Set when the session ends (closed, or frozen by the test hook): wakes
    /// the waiters, which leave their queues while the client is still
    /// there.
    ending: watch::Sender<bool>,
    /// How many attempts are under way.
    attempts: watch::Sender<usize>,
    /// Frozen by the test hook: the session is lost, not closed.
    frozen: std::sync::atomic::AtomicBool,
    /// Told when someone else deleted a held node (a forced release).
    renewal_wanted: tokio::sync::Notify,
}

impl Shared {
    fn client(&self) -> Option<Client> {
        lock(&self.client).clone()
    }

    /// Ends the session's use of its client: wakes the waiters, gives them
    /// a moment to leave their queues, then takes the client away.
    async fn end(&self) -> Option<Client> {
        self.ending.send_replace(true);
        let mut attempts = self.attempts.subscribe();
        let _ = tokio::time::timeout(CALL_TIMEOUT, attempts.wait_for(|n| *n == 0)).await;
        lock(&self.client).take()
    }
}

/// Counts an attempt while it is under way.
struct Attempt<'a>(&'a Shared);

impl<'a> Attempt<'a> {
    fn start(shared: &'a Shared) -> Self {
        shared.attempts.send_modify(|n| *n += 1);
        Attempt(shared)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.0.attempts.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub(crate) struct ZkSession {
    shared: Arc<Shared>,
    hosts: String,
    /// Who the session says it is: the data of each of its queue nodes.
    owner: String,
    /// The nodes of the locks held, by lock name: each attempt has a node of
    /// its own, so that nothing left of one attempt is ever taken for
    /// another.
    held: Mutex<HashMap<String, Node>>,
}

/// A call's outcome with ZooKeeper's own error kept, to tell apart the
/// errors that are answers (`NoNode`, `NodeExists`).
pub(crate) async fn raw<T, E>(
    hosts: &str,
    call: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<std::result::Result<T, E>> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| timed_out(hosts))
}

impl ZkSession {
    pub(crate) async fn open(connect: &str, hosts: &str, options: &SessionOptions) -> Result<Self> {
        // Detached: a frozen session (the test hook) drops its connection
        // without closing the session, which then expires at ZooKeeper as
        // a stopped process's would. `close` closes it for real.
        let client = tokio::time::timeout(
            CALL_TIMEOUT,
            Client::connector()
                .with_session_timeout(options.ttl)
                .with_detached()
                .with_fail_eagerly()
                .connect(connect),
        )
        .await
        .map_err(|_| timed_out(hosts))?
        .map_err(|err| zk_error(hosts, &err))?;
        let session = ZkSession {
            shared: Arc::new(Shared {
                info: client.session().clone(),
                timeout: client.session_timeout(),
                client: Mutex::new(Some(client)),
                connect: connect.to_owned(),
                ending: watch::Sender::new(false),
                attempts: watch::Sender::new(0),
                frozen: std::sync::atomic::AtomicBool::new(false),
                renewal_wanted: tokio::sync::Notify::new(),
            }),
            hosts: hosts.to_owned(),
            owner: options.owner.clone(),
            held: Mutex::new(HashMap::new()),
        };
        // ZooKeeper rounds to milliseconds.
        if session.shared.timeout + Duration::from_millis(1) < options.ttl {
            let granted = session.shared.timeout;
            if let Err(err) = session.close().await {
                tracing::debug!("closing a refused session: {err}");
            }
            return Err(Error::config(format!(
                "ZooKeeper at {hosts} grants sessions of at most {granted:?} \
                 (its maxSessionTimeout), less than the TTL of {:?}: it would drop \
                 the session before its lease ran out; use a TTL of at most \
                 {granted:?}, or raise maxSessionTimeout",
                options.ttl
            )));
        }
        Ok(session)
    }

    fn client(&self) -> Result<Client> {
        self.shared.client().ok_or_else(|| self.closed())
    }

    fn closed(&self) -> Error {
        if self.shared.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            return Error::lost(format!(
                "ZooKeeper at {}: the session stopped answering; open a new session",
                self.hosts
            ));
        }
        Error::new(
            ErrorKind::Closed,
            format!(
                "ZooKeeper at {}: the session was closed; open a new session",
                self.hosts
            ),
        )
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Node>> {
        lock(&self.held)
    }

    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = std::result::Result<T, ZkError>>,
    ) -> Result<T> {
        crate::call(&self.hosts, call).await
    }

    /// Why a waiter's node is gone from its queue.
    fn node_gone(&self, client: &Client) -> Error {
        if client.state() == SessionState::Expired {
            return Error::lost(format!(
                "ZooKeeper at {}: the session expired while it waited; open a new session",
                self.hosts
            ));
        }
        Error::store(format!(
            "ZooKeeper at {}: the waiter's queue node was deleted from outside while it \
             waited; ask again, and find who deletes nodes under {BASE}",
            self.hosts
        ))
    }
}

#[async_trait]
impl StoreSession for ZkSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let attempt = Attempt::start(&self.shared);
        let nonce: u64 = rand::random();
        let mut leave = Leave {
            shared: Arc::clone(&self.shared),
            dir: lock_dir(&request.key),
            marker: format!("-{nonce:016x}-"),
            path: None,
            armed: true,
        };
        let outcome = self.attempt(request, &mut leave).await;
        if leave.armed {
            leave.now().await;
        }
        drop(attempt);
        outcome
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(node) = self
            .held()
            .get(&held.key)
            .filter(|node| node.is(held))
            .cloned()
        else {
            return Err(Error::not_held(&held.key));
        };
        let client = self.client()?;
        node.released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deleted = raw(&self.hosts, client.delete(&node.path, None)).await?;
        let outcome = match deleted {
            Ok(()) => Ok(()),
            Err(ZkError::NoNode | ZkError::SessionExpired | ZkError::ClientClosed) => {
                Err(Error::not_held(&held.key))
            }
            // Perhaps not deleted: still held, to be released again.
            Err(err) => return Err(zk_error(&self.hosts, &err)),
        };
        let mut map = self.held();
        if map.get(&held.key).is_some_and(|now| now.path == node.path) {
            map.remove(&held.key);
        }
        outcome
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let client = self.client()?;
        // Check-only transactions, through the leader: a read could come
        // from a server that is behind (docs/0006-zookeeper.md).
        let mut nodes: Vec<(String, Node)> = {
            let map = self.held();
            held.iter()
                .filter_map(|lock| {
                    let node = map.get(&lock.key).filter(|node| node.is(lock))?;
                    Some((lock.key.clone(), node.clone()))
                })
                .collect()
        };
        let mut lost: Vec<String> = held
            .iter()
            .filter(|lock| !nodes.iter().any(|(key, _)| *key == lock.key))
            .map(|lock| lock.key.clone())
            .collect();
        if nodes.is_empty() {
            let mut check = client.new_multi_writer();
            check
                .add_check_version(BASE, -1)
                .map_err(|err| zk_error(&self.hosts, &err))?;
            match raw(&self.hosts, check.commit()).await? {
                Ok(_) => {}
                // `/distlock` was deleted by hand: making it again proves
                // the session as well.
                Err(MultiWriteError::OperationFailed {
                    source: ZkError::NoNode,
                    ..
                }) => {
                    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
                    self.call(client.mkdir(BASE, &persistent)).await?;
                }
                Err(err) => return Err(zk_error(&self.hosts, &err.into())),
            }
        }
        let mut start = 0;
        while start < nodes.len() {
            let end = (start + RENEW_BATCH).min(nodes.len());
            let mut check = client.new_multi_writer();
            for (_, node) in &nodes[start..end] {
                check
                    .add_check_version(&node.path, -1)
                    .map_err(|err| zk_error(&self.hosts, &err))?;
            }
            match raw(&self.hosts, check.commit()).await? {
                Ok(_) => start = end,
                // One node is gone: note it, and check the rest again.
                Err(MultiWriteError::OperationFailed {
                    index,
                    source: ZkError::NoNode,
                }) if start + index < end => {
                    let (key, node) = nodes.remove(start + index);
                    let mut map = self.held();
                    if map.get(&key).is_some_and(|now| now.path == node.path) {
                        map.remove(&key);
                    }
                    lost.push(key);
                }
                Err(err) => return Err(zk_error(&self.hosts, &err.into())),
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn renewal_wanted(&self) {
        self.shared.renewal_wanted.notified().await;
    }

    async fn close(&self) -> Result<()> {
        // A frozen session is left to expire.
        let Some(client) = self.shared.end().await else {
            return Ok(());
        };
        drop(client);
        // The session is detached: attach to it again with a client that
        // closes it when dropped, which deletes every node of the session.
        // The server may still be letting the old connection go: try again
        // a few times.
        let mut tries = 0;
        loop {
            tries += 1;
            let closer = raw(
                &self.hosts,
                Client::connector()
                    .with_session(self.shared.info.clone())
                    .with_session_timeout(self.shared.timeout)
                    .with_fail_eagerly()
                    .connect(&self.shared.connect),
            )
            .await;
            match closer {
                Ok(Ok(closer)) => {
                    let mut state = closer.state_watcher();
                    drop(closer);
                    let closed = async { while !state.changed().await.is_terminated() {} };
                    return tokio::time::timeout(CALL_TIMEOUT, closed)
                        .await
                        .map_err(|_| timed_out(&self.hosts));
                }
                // Gone already: nothing is left to close.
                Ok(Err(ZkError::SessionExpired)) => return Ok(()),
                Ok(Err(err)) if tries >= 3 => return Err(zk_error(&self.hosts, &err)),
                Err(err) if tries >= 3 => return Err(err),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    distlock_core::test_hook! {
        fn freeze_for_test(&self) {
            // The connection goes without closing the session: ZooKeeper
            // expires it after its timeout, as if the process had stopped.
            // Waiters leave their queues first, as a dead session's must.
            let shared = Arc::clone(&self.shared);
            shared
                .frozen
                .store(true, std::sync::atomic::Ordering::SeqCst);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move { drop(shared.end().await) });
                }
                Err(_) => drop(lock(&shared.client).take()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_directory_of_its_own() {
        assert_eq!(lock_dir("a/b"), "/distlock/a%2Fb");
        assert_eq!(lock_dir("a%2Fb"), "/distlock/a%252Fb");
        assert_eq!(lock_dir("."), "/distlock/%2E");
        assert_eq!(lock_dir(".."), "/distlock/%2E%2E");
        assert_eq!(lock_dir("%2E"), "/distlock/%252E");
        assert_eq!(lock_dir("x\ny"), "/distlock/x%0Ay");
        assert_eq!(lock_dir("ü"), "/distlock/ü");
        assert_eq!(lock_dir("🔒"), "/distlock/%F0%9F%94%92");
    }

    #[test]
    fn directories_give_their_lock_back() {
        for key in ["a/b", "a%2Fb", ".", "..", "%2E", "x\ny", "ü", "🔒", "a b-c"] {
            let dir = lock_dir(key);
            let name = dir.strip_prefix("/distlock/").expect("under /distlock");
            assert_eq!(key_of(name).as_deref(), Some(key), "{dir}");
        }
        for foreign in ["%41", "%2e", "%2", "%zz", "a/b", "%FF"] {
            assert_eq!(key_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn node_names_give_their_mode_and_sequence() {
        assert_eq!(tag_of("p3-00ff-0000000012"), "p3");
        assert_eq!(sequence_of("p3-00ff-0000000012"), Some(12));
        assert_eq!(sequence_of("garbage"), None);
    }
}
