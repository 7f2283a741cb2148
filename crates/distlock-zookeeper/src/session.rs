//! A session: a ZooKeeper session, and the queue nodes of its locks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, Mode, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use tokio::time::Instant;
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkError, SessionInfo, SessionState};

use crate::{timed_out, zk_error, BASE, CALL_TIMEOUT};

/// The longest one watch is trusted before the queue is read again.
const WATCH_SLICE: Duration = Duration::from_secs(5);

/// How many nodes one renewal checks at once.
const RENEW_BATCH: usize = 1024;

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

/// The first part of a queue node's name: what the attempt wants.
fn mode_tag(mode: Mode) -> String {
    match mode {
        Mode::Exclusive => "x".to_owned(),
        Mode::Shared => "s".to_owned(),
        Mode::Semaphore { permits } => format!("p{permits}"),
    }
}

/// A queue node's name is `TAG-NONCE-SEQUENCE`.
fn tag_of(name: &str) -> &str {
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
}

/// What a session's attempts share, also after the attempt is gone.
struct Shared {
    /// The client: `None` once the session is closed or frozen, so that
    /// nothing keeps a frozen session's connection alive.
    client: Mutex<Option<Client>>,
    /// The connect string (hosts and chroot) and the hosts, for messages.
    connect: String,
    hosts: String,
    /// The session, to attach to it again.
    info: SessionInfo,
    /// The session timeout ZooKeeper granted.
    timeout: Duration,
    /// Set when the client goes: wakes the waiters.
    ended: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn client(&self) -> Option<Client> {
        lock(&self.client).clone()
    }

    /// Takes the client away, waking every waiter.
    fn end(&self) -> Option<Client> {
        let client = lock(&self.client).take();
        self.ended.send_replace(true);
        client
    }

    /// Attaches to the session again on a connection of its own, to tidy
    /// up after the client went: `detached` keeps the session open when the
    /// returned client is dropped, as a frozen process would.
    async fn attach(&self, detached: bool) -> Result<std::result::Result<Client, ZkError>> {
        let mut connector = Client::connector();
        connector = connector
            .with_session(self.info.clone())
            .with_session_timeout(self.timeout)
            .with_fail_eagerly();
        if detached {
            connector = connector.with_detached();
        }
        raw(&self.hosts, connector.connect(&self.connect)).await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) struct ZkSession {
    shared: Arc<Shared>,
    hosts: String,
    session_id: i64,

    /// The nodes of the locks held, by lock name: each attempt has a node of
    /// its own, so that nothing left of one attempt is ever taken for
    /// another.
    held: Mutex<HashMap<String, Node>>,
}

/// What blocks a waiter: one node (its predecessor, or the last earlier
/// writer), or, for a semaphore, any change to the queue.
enum Blocker {
    Node(String),
    Any,
}

/// A call's outcome with ZooKeeper's own error kept, to tell apart the
/// errors that are answers (`NoNode`, `NodeExists`).
async fn raw<T>(
    hosts: &str,
    call: impl std::future::Future<Output = std::result::Result<T, ZkError>>,
) -> Result<std::result::Result<T, ZkError>> {
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
            session_id: client.session_id().0,
            shared: Arc::new(Shared {
                info: client.session().clone(),
                timeout: client.session_timeout(),
                client: Mutex::new(Some(client)),
                connect: connect.to_owned(),
                hosts: hosts.to_owned(),
                ended: tokio::sync::watch::Sender::new(false),
            }),
            hosts: hosts.to_owned(),
            held: Mutex::new(HashMap::new()),
        };
        // ZooKeeper rounds to milliseconds.
        if session.shared.timeout + Duration::from_millis(1) < options.ttl {
            let granted = session.shared.timeout;
            session.close().await?;
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "ZooKeeper at {hosts} grants sessions of at most {granted:?} \
                     (its maxSessionTimeout), less than the TTL of {:?}: it would drop \
                     the session before its lease ran out; use a TTL of at most \
                     {granted:?}, or raise maxSessionTimeout",
                    options.ttl
                ),
            ));
        }
        Ok(session)
    }

    fn client(&self) -> Result<Client> {
        self.shared.client().ok_or_else(|| {
            Error::new(
                ErrorKind::Lost,
                format!(
                    "ZooKeeper at {}: the session was closed; open a new session",
                    self.hosts
                ),
            )
        })
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
        let why = if client.state() == SessionState::Expired {
            "the session expired while it waited"
        } else {
            "its queue node was deleted while it waited (from outside, or with an expired session)"
        };
        Error::new(
            ErrorKind::Lost,
            format!("ZooKeeper at {}: {why}; open a new session", self.hosts),
        )
    }

    /// Creates the attempt's node `PREFIX` + sequence, making the lock's
    /// directory (and `/distlock`) if missing.
    async fn join(
        &self,
        client: &Client,
        dir: &str,
        prefix: &str,
    ) -> Result<(zookeeper_client::Stat, zookeeper_client::CreateSequence)> {
        let node = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
        let container = CreateMode::Container.with_acls(Acls::anyone_all());
        let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
        for _ in 0..5 {
            match raw(&self.hosts, client.create(prefix, b"", &node)).await? {
                Ok(made) => return Ok(made),
                // The directory is missing: the lock's first use, or its
                // empty container was reaped.
                Err(ZkError::NoNode) => {}
                Err(err) => return Err(zk_error(&self.hosts, &err)),
            }
            match raw(&self.hosts, client.create(dir, b"", &container)).await? {
                Ok(_) | Err(ZkError::NodeExists) => {}
                // `/distlock` itself is gone (deleted by hand).
                Err(ZkError::NoNode) => self.call(client.mkdir(BASE, &persistent)).await?,
                Err(err) => return Err(zk_error(&self.hosts, &err)),
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "ZooKeeper at {}: the directory {dir} kept vanishing while a lock was created in it",
                self.hosts
            ),
        ))
    }
}

/// Takes an attempt's node out of its queue when the attempt is dropped or
/// fails before it is done (in the background if dropped). The node is the
/// attempt's own (found by its nonce if the create's answer never came), so
/// deleting it touches nothing else; a failed delete is tried again for a
/// while, and the node goes with the session in any case.
struct Leave {
    shared: Arc<Shared>,
    dir: String,
    marker: String,
    path: Option<String>,
    armed: bool,
}

impl Leave {
    async fn delete(
        client: &Client,
        dir: &str,
        marker: &str,
        path: Option<&str>,
    ) -> std::result::Result<(), ZkError> {
        let path = match path {
            Some(path) => path.to_owned(),
            // Requests of a session are answered in order: the create, if it
            // was sent, is seen by this read.
            None => match client.list_children(dir).await {
                Ok(children) => match children.into_iter().find(|name| name.contains(marker)) {
                    Some(name) => format!("{dir}/{name}"),
                    None => return Ok(()),
                },
                Err(ZkError::NoNode) => return Ok(()),
                Err(err) => return Err(err),
            },
        };
        match client.delete(&path, None).await {
            Ok(()) | Err(ZkError::NoNode) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// One try; `true` once nothing is left to do. A session whose client
    /// went (closed, or frozen by the test hook) is attached to again, so
    /// its waiters leave the queue at once, as waiters of a dead session
    /// must; the session itself is left to expire.
    async fn once(shared: &Shared, dir: &str, marker: &str, path: Option<&str>) -> bool {
        let client = match shared.client() {
            Some(client) => client,
            None => match shared.attach(true).await {
                Ok(Ok(client)) => client,
                Ok(Err(ZkError::SessionExpired)) => return true,
                _ => return false,
            },
        };
        let deleted = tokio::time::timeout(CALL_TIMEOUT, Leave::delete(&client, dir, marker, path));
        matches!(
            deleted.await,
            Ok(Ok(()) | Err(ZkError::SessionExpired | ZkError::ClientClosed))
        )
    }

    /// Leaves now, or, failing that, in the background.
    async fn now(mut self) {
        if Leave::once(&self.shared, &self.dir, &self.marker, self.path.as_deref()).await {
            self.armed = false;
        }
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let (dir, marker, path) = (
            std::mem::take(&mut self.dir),
            std::mem::take(&mut self.marker),
            self.path.take(),
        );
        runtime.spawn(async move {
            for attempt in 0..30u64 {
                if Leave::once(&shared, &dir, &marker, path.as_deref()).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        });
    }
}

impl ZkSession {
    /// One attempt: joins the queue and waits for its turn.
    async fn attempt(&self, request: &AcquireRequest, leave: &mut Leave) -> Result<Option<Grant>> {
        let dir = leave.dir.clone();
        let tag = mode_tag(request.mode);
        let prefix = format!("{dir}/{tag}{}", leave.marker);
        let mut ended = self.shared.ended.subscribe();
        // Join the queue, at its tail.
        let (stat, sequence) = {
            let client = self.client()?;
            self.join(&client, &dir, &prefix).await?
        };
        let me = format!("{tag}{}{sequence}", leave.marker);
        let path = format!("{dir}/{me}");
        leave.path = Some(path.clone());
        loop {
            let client = self.client()?;
            let children = match raw(&self.hosts, client.list_children(&dir)).await? {
                Ok(children) => children,
                Err(ZkError::NoNode) => Vec::new(),
                Err(err) => return Err(zk_error(&self.hosts, &err)),
            };
            let mut queue: Vec<(i64, &str)> = children
                .iter()
                .filter_map(|name| Some((sequence_of(name)?, name.as_str())))
                .collect();
            queue.sort_unstable();
            let Some(position) = queue.iter().position(|(_, name)| *name == me) else {
                // The session expired while this waited, or the node was
                // deleted: never say the lock is held.
                leave.armed = false;
                return Err(self.node_gone(&client));
            };
            let earlier = &queue[..position];
            let blocker = match request.mode {
                Mode::Exclusive => earlier
                    .last()
                    .map(|(_, name)| Blocker::Node((*name).to_owned())),
                Mode::Shared => earlier
                    .iter()
                    .rev()
                    .find(|(_, name)| tag_of(name) != "s")
                    .map(|(_, name)| Blocker::Node((*name).to_owned())),
                Mode::Semaphore { permits } => {
                    let fits = earlier.len() < permits as usize
                        && earlier.iter().all(|(_, name)| tag_of(name) == tag);
                    (!fits).then_some(Blocker::Any)
                }
            };
            let Some(blocker) = blocker else {
                // Granted: the read above saw this session's node, so the
                // session lived when ZooKeeper answered.
                leave.armed = false;
                self.held().insert(
                    request.key.clone(),
                    Node {
                        path,
                        czxid: stat.czxid,
                    },
                );
                let token = u64::try_from(stat.czxid).unwrap_or(0);
                return Ok(Some(Grant::new(token)));
            };
            let until = match request.wait_until {
                Some(until) if Instant::now() < until => until,
                _ => {
                    match raw(&self.hosts, client.delete(&path, None)).await? {
                        Ok(()) | Err(ZkError::NoNode) => leave.armed = false,
                        Err(err) => return Err(zk_error(&self.hosts, &err)),
                    }
                    return Ok(None);
                }
            };
            let watcher = match blocker {
                Blocker::Node(name) => {
                    let watched = format!("{dir}/{name}");
                    match self.call(client.check_and_watch_stat(&watched)).await? {
                        (Some(_), watcher) => watcher,
                        // Gone already: read the queue again.
                        (None, _) => continue,
                    }
                }
                Blocker::Any => {
                    let (now, watcher) = self.call(client.list_and_watch_children(&dir)).await?;
                    let mut now: Vec<&str> = now.iter().map(String::as_str).collect();
                    let mut then: Vec<&str> = queue.iter().map(|(_, name)| *name).collect();
                    now.sort_unstable();
                    then.sort_unstable();
                    if now != then {
                        continue;
                    }
                    watcher
                }
            };
            // Hold no client while waiting: a frozen session must be able to
            // let its connection go.
            drop(client);
            let slice_end = until.min(Instant::now() + WATCH_SLICE);
            tokio::select! {
                _ = tokio::time::timeout_at(slice_end, watcher.changed()) => {}
                // The session closed or froze: leave the queue now.
                _ = ended.wait_for(|ended| *ended) => {}
            }
        }
    }
}

#[async_trait]
impl StoreSession for ZkSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
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
        outcome
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(node) = self.held().get(&held.key).cloned() else {
            return Err(Error::not_held(&held.key));
        };
        if u64::try_from(node.czxid).ok() != Some(held.token) {
            return Err(Error::not_held(&held.key));
        }
        let client = self.client()?;
        let deleted = raw(&self.hosts, client.delete(&node.path, None)).await?;
        {
            let mut map = self.held();
            if map.get(&held.key).is_some_and(|now| now.path == node.path) {
                map.remove(&held.key);
            }
        }
        match deleted {
            Ok(()) => Ok(()),
            Err(ZkError::NoNode) => Err(Error::not_held(&held.key)),
            Err(err) => Err(zk_error(&self.hosts, &err)),
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let client = self.client()?;
        // ZooKeeper keeps the session alive itself (the client pings it);
        // a renewal asks something, to prove the session lives, and checks
        // that each held node is still there, as created, and this
        // session's.
        self.call(client.check_stat(BASE)).await?;
        let nodes: Vec<Option<Node>> = {
            let map = self.held();
            held.iter()
                .map(|lock| map.get(&lock.key).cloned())
                .collect()
        };
        let mut lost = Vec::new();
        for (locks, nodes) in held.chunks(RENEW_BATCH).zip(nodes.chunks(RENEW_BATCH)) {
            let checks = nodes.iter().map(|node| {
                let client = &client;
                async move {
                    match node {
                        Some(node) => client.check_stat(&node.path).await,
                        None => Ok(None),
                    }
                }
            });
            let stats = self.call(futures::future::try_join_all(checks)).await?;
            for ((lock, node), stat) in locks.iter().zip(nodes).zip(stats) {
                let there = node.as_ref().zip(stat).is_some_and(|(node, stat)| {
                    stat.czxid == node.czxid
                        && stat.ephemeral_owner == self.session_id
                        && u64::try_from(node.czxid).ok() == Some(lock.token)
                });
                if !there {
                    let mut map = self.held();
                    let same = map
                        .get(&lock.key)
                        .zip(node.as_ref())
                        .is_some_and(|(now, node)| now.path == node.path);
                    if same {
                        map.remove(&lock.key);
                    }
                    lost.push(lock.key.clone());
                }
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        // A frozen session is left to expire.
        let Some(client) = self.shared.end() else {
            return Ok(());
        };
        drop(client);
        // The session is detached: attach to it again with a client that
        // closes it when dropped, which deletes every node of the session.
        match self.shared.attach(false).await? {
            Ok(closer) => {
                let mut state = closer.state_watcher();
                drop(closer);
                let closed = async { while !state.changed().await.is_terminated() {} };
                tokio::time::timeout(CALL_TIMEOUT, closed)
                    .await
                    .map_err(|_| timed_out(&self.hosts))
            }
            // Gone already: nothing is left to close.
            Err(ZkError::SessionExpired) => Ok(()),
            Err(err) => Err(zk_error(&self.hosts, &err)),
        }
    }

    fn freeze_for_test(&self) {
        // The connection goes without closing the session: ZooKeeper
        // expires it after its timeout, as if the process had stopped.
        self.shared.end();
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
    fn node_names_give_their_mode_and_sequence() {
        assert_eq!(tag_of("p3-00ff-0000000012"), "p3");
        assert_eq!(sequence_of("p3-00ff-0000000012"), Some(12));
        assert_eq!(sequence_of("garbage"), None);
    }
}
