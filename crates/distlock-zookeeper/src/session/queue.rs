//! A lock's queue: joining it, deciding from the nodes ahead whether the
//! attempt holds the lock or what it waits for, and leaving it.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::queue::{self, Blocker, WATCH_SLICE};
use distlock_core::store::{spawn_cleanup, AcquireRequest, Grant};
use distlock_core::{Error, ErrorKind, Result};
use tokio::time::Instant;
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkError, OneshotWatcher};

use super::{raw, sequence_of, tag_of, Node, Shared, ZkSession, RECONNECT_PAUSE};
use crate::{zk_error, BASE, CALL_TIMEOUT};

/// Where one look at the queue leaves an attempt.
enum Step {
    Granted(Grant),
    Busy,
    Wait(OneshotWatcher),
    Again,
}

impl ZkSession {
    /// Creates the attempt's node `PREFIX` + sequence, the session's owner
    /// as its data, making the lock's directory (and `/distlock`) if
    /// missing.
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
            // The owner goes in the create that joins: no extra round trip.
            let owner = self.owner.as_bytes();
            match raw(&self.hosts, client.create(prefix, owner, &node)).await? {
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
        Err(Error::store(format!(
            "ZooKeeper at {}: the directory {dir} was deleted five times while a lock was \
             made in it; find who deletes nodes under {BASE}",
            self.hosts
        )))
    }

    /// One attempt: joins the queue and waits for its turn.
    pub(super) async fn attempt(
        &self,
        request: &AcquireRequest,
        leave: &mut Leave,
    ) -> Result<Option<Grant>> {
        if *self.shared.ending.borrow() {
            return Err(self.closed());
        }
        let dir = leave.dir.clone();
        let tag = request.mode.tag();
        let prefix = format!("{dir}/{tag}{}", leave.marker);
        let mut ending = self.shared.ending.subscribe();
        // Join the queue, at its tail.
        let (stat, sequence) = {
            let client = self.client()?;
            self.join(&client, &dir, &prefix).await?
        };
        let me = format!("{tag}{}{sequence}", leave.marker);
        let path = format!("{dir}/{me}");
        leave.path = Some(path.clone());
        let node = Node {
            path,
            czxid: stat.czxid,
            released: Arc::default(),
        };
        loop {
            if *ending.borrow_and_update() {
                // Closing, or frozen: leave the queue while the client is
                // still there.
                return Err(self.closed());
            }
            let client = self.client()?;
            match self.step(&client, request, &node, leave).await {
                Ok(Step::Granted(grant)) => return Ok(Some(grant)),
                Ok(Step::Busy) => return Ok(None),
                Ok(Step::Again) => {}
                Ok(Step::Wait(watcher)) => {
                    // Hold no client while waiting: a frozen session must be
                    // able to let its connection go.
                    drop(client);
                    let until = request.wait_until.unwrap_or_else(Instant::now);
                    let slice_end = until.min(Instant::now() + WATCH_SLICE);
                    tokio::select! {
                        _ = tokio::time::timeout_at(slice_end, watcher.changed()) => {}
                        _ = ending.wait_for(|ending| *ending) => {}
                    }
                }
                // A connection lost while waiting: keep the place in the
                // queue (the node lives as long as the session) and look
                // again once the client has reconnected.
                Err(err)
                    if err.kind() == ErrorKind::Unavailable
                        && request
                            .wait_until
                            .is_some_and(|until| Instant::now() + RECONNECT_PAUSE < until) =>
                {
                    drop(client);
                    tracing::debug!(key = %request.key, "waiting through a lost connection: {err}");
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                        _ = ending.wait_for(|ending| *ending) => {}
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Reads the queue and decides: granted, busy, or what to wait for.
    async fn step(
        &self,
        client: &Client,
        request: &AcquireRequest,
        node: &Node,
        leave: &mut Leave,
    ) -> Result<Step> {
        let dir = &leave.dir;
        let children = match raw(&self.hosts, client.list_children(dir)).await? {
            Ok(children) => children,
            Err(ZkError::NoNode) => Vec::new(),
            Err(err) => return Err(zk_error(&self.hosts, &err)),
        };
        let queue = ordered(&children);
        let me = node.path.rsplit('/').next().unwrap_or_default();
        let Some(position) = queue.iter().position(|(_, name)| *name == me) else {
            // The session expired while this waited, or the node was
            // deleted: never say the lock is held.
            leave.armed = false;
            return Err(self.node_gone(client));
        };
        let earlier = &queue[..position];
        let tags: Vec<&str> = earlier.iter().map(|(_, name)| tag_of(name)).collect();
        let Some(blocker) = queue::blocker(request.mode, &tags) else {
            // Granted, even if read from a server behind its leader
            // (docs/0006-zookeeper.md).
            leave.armed = false;
            self.held().insert(request.key.clone(), node.clone());
            super::holds::watch_held(&self.shared, node);
            let token = u64::try_from(node.czxid).unwrap_or(0);
            return Ok(Step::Granted(Grant::new(token)));
        };
        if request
            .wait_until
            .is_none_or(|until| Instant::now() >= until)
        {
            match raw(&self.hosts, client.delete(&node.path, None)).await? {
                Ok(()) | Err(ZkError::NoNode) => leave.armed = false,
                Err(err) => return Err(zk_error(&self.hosts, &err)),
            }
            return Ok(Step::Busy);
        }
        match blocker {
            Blocker::Entry(index) => {
                let watched = format!("{dir}/{}", earlier[index].1);
                match self.call(client.check_and_watch_stat(&watched)).await? {
                    (Some(_), watcher) => Ok(Step::Wait(watcher)),
                    // Gone already: read the queue again.
                    (None, _) => Ok(Step::Again),
                }
            }
            Blocker::AnyChange => {
                let (now, watcher) = self.call(client.list_and_watch_children(dir)).await?;
                if ordered(&now) == queue {
                    Ok(Step::Wait(watcher))
                } else {
                    Ok(Step::Again)
                }
            }
        }
    }
}

/// The queue nodes among `children`, in the order of their sequence.
pub(crate) fn ordered(children: &[String]) -> Vec<(i64, &str)> {
    let mut queue: Vec<(i64, &str)> = children
        .iter()
        .filter_map(|name| Some((sequence_of(name)?, name.as_str())))
        .collect();
    queue.sort_unstable();
    queue
}

/// Takes an attempt's node out of its queue when the attempt is dropped or
/// fails before it is done (in the background if dropped). The node is the
/// attempt's own (found by its nonce if the create's answer never came), so
/// deleting it touches nothing else; a failed delete is tried again while
/// the session's client lives, and the node goes with the session in any
/// case.
pub(super) struct Leave {
    pub(super) shared: Arc<Shared>,
    pub(super) dir: String,
    pub(super) marker: String,
    pub(super) path: Option<String>,
    pub(super) armed: bool,
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
            None => {
                // The create's answer never came. If the connection broke,
                // the client may now talk to a server that has not seen the
                // create yet: catch it up with the leader first.
                match client.sync(dir).await {
                    Ok(()) | Err(ZkError::NoNode) => {}
                    Err(err) => return Err(err),
                }
                match client.list_children(dir).await {
                    Ok(children) => match children.into_iter().find(|name| name.contains(marker)) {
                        Some(name) => format!("{dir}/{name}"),
                        None => return Ok(()),
                    },
                    Err(ZkError::NoNode) => return Ok(()),
                    Err(err) => return Err(err),
                }
            }
        };
        match client.delete(&path, None).await {
            Ok(()) | Err(ZkError::NoNode) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// One try; `true` once nothing is left to do. Once the client is gone
    /// (the session closed, or frozen), the node goes with the session.
    async fn once(shared: &Shared, dir: &str, marker: &str, path: Option<&str>) -> bool {
        let Some(client) = shared.client() else {
            return true;
        };
        let deleted = tokio::time::timeout(CALL_TIMEOUT, Leave::delete(&client, dir, marker, path));
        matches!(
            deleted.await,
            Ok(Ok(()) | Err(ZkError::SessionExpired | ZkError::ClientClosed))
        )
    }

    /// Leaves now, or, failing that, in the background.
    pub(super) async fn now(mut self) {
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
        let shared = Arc::clone(&self.shared);
        let (dir, marker, path) = (
            std::mem::take(&mut self.dir),
            std::mem::take(&mut self.marker),
            self.path.take(),
        );
        spawn_cleanup(async move {
            let mut pause = Duration::from_millis(100);
            while !Leave::once(&shared, &dir, &marker, path.as_deref()).await {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
    }
}
