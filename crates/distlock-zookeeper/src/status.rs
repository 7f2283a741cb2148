//! `status`: the queues of the keys asked about, each node's owner read
//! from its data, split into holders and waiters by the core's queue
//! decision.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery, WaiterStatus};
use distlock_core::store::{queue, Mode};
use distlock_core::Result;
use futures::future::try_join_all;
use futures::{StreamExt, TryStreamExt};
use zookeeper_client::{Client, Error as ZkError, Stat};

use crate::session::{key_of, lock_dir, ordered, raw, tag_of};
use crate::{zk_error, ZkStore, BASE};

/// How many queues a status reads at once.
const AT_ONCE: usize = 16;

/// The mode a tag names. A tag that names none blocks like a writer in
/// the queue decision, and is shown as one.
fn mode_of(tag: &str) -> Mode {
    Mode::from_tag(tag).unwrap_or(Mode::Exclusive)
}

impl ZkStore {
    /// Reads the queues `query` names: the lock directories (for a prefix,
    /// the children of `/distlock` whose lock matches), [`AT_ONCE`] at a
    /// time, each with all its nodes at once.
    pub(crate) async fn read_status(&self, query: &StatusQuery) -> Result<Status> {
        let client = self.reader().await?;
        let hosts = self.hosts.as_str();
        // Catch up with the leader first: a server behind it could still
        // show holders that have gone.
        match raw(hosts, client.sync(BASE)).await? {
            Ok(()) | Err(ZkError::NoNode) => {}
            Err(err) => return Err(zk_error(hosts, &err)),
        }
        let keys = match query {
            StatusQuery::Key(key) if key.is_empty() => Vec::new(),
            StatusQuery::Key(key) => vec![key.clone()],
            StatusQuery::Prefix(_) => {
                let names = match raw(hosts, client.list_children(BASE)).await? {
                    Ok(names) => names,
                    Err(ZkError::NoNode) => Vec::new(),
                    Err(err) => return Err(zk_error(hosts, &err)),
                };
                names
                    .iter()
                    .filter_map(|name| key_of(name))
                    .filter(|key| query.matches(key))
                    .collect()
            }
        };
        let read = keys.into_iter().map(|key| read_queue(&client, hosts, key));
        let read: Vec<Option<KeyStatus>> = futures::stream::iter(read)
            .buffer_unordered(AT_ONCE)
            .try_collect()
            .await?;
        let mut keys: Vec<KeyStatus> = read.into_iter().flatten().collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Status {
            keys,
            counters: None,
        })
    }
}

/// One lock's queue as holders and waiters; `None` if nobody holds or
/// waits. A node gone between the listing and its read has left the
/// queue, and is not shown.
async fn read_queue(client: &Client, hosts: &str, key: String) -> Result<Option<KeyStatus>> {
    let dir = lock_dir(&key);
    let children = match raw(hosts, client.list_children(&dir)).await? {
        Ok(children) => children,
        Err(ZkError::NoNode) => return Ok(None),
        Err(err) => return Err(zk_error(hosts, &err)),
    };
    let queue = ordered(&children);
    let reads = queue.iter().map(|(_, name)| {
        let path = format!("{dir}/{name}");
        async move { raw(hosts, client.get_data(&path)).await }
    });
    let mut nodes: Vec<(&str, Vec<u8>, Stat)> = Vec::with_capacity(queue.len());
    for ((_, name), read) in queue.iter().zip(try_join_all(reads).await?) {
        match read {
            Ok((data, stat)) => nodes.push((name, data, stat)),
            Err(ZkError::NoNode) => {}
            Err(err) => return Err(zk_error(hosts, &err)),
        }
    }
    if nodes.is_empty() {
        return Ok(None);
    }
    let tags: Vec<&str> = nodes.iter().map(|(name, _, _)| tag_of(name)).collect();
    let now = now();
    let mut status = KeyStatus {
        key,
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    };
    for ((tag, (_, data, stat)), holds) in tags.iter().zip(&nodes).zip(queue::holders(&tags)) {
        if holds {
            status.holders.push(holder_status(tag, data, stat, now));
        } else {
            status.waiters.push(WaiterStatus {
                session: session_of(stat),
                owner: String::from_utf8_lossy(data).into_owned(),
                mode: mode_of(tag),
                waiting_for: since(stat, now),
            });
        }
    }
    Ok(Some(status))
}

/// The time now, as ZooKeeper's node times count it.
pub(crate) fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The session a node belongs to, as ZooKeeper names it.
fn session_of(stat: &Stat) -> String {
    format!("{:016x}", stat.ephemeral_owner)
}

/// Since the node was made, by ZooKeeper's clock: for a holder that waited,
/// the wait counts too.
fn since(stat: &Stat, now: Duration) -> Option<Duration> {
    u64::try_from(stat.ctime)
        .ok()
        .map(|made| now.saturating_sub(Duration::from_millis(made)))
}

/// A holding node (its tag, data and stat) as `status` shows it.
pub(crate) fn holder_status(tag: &str, data: &[u8], stat: &Stat, now: Duration) -> HolderStatus {
    HolderStatus {
        session: session_of(stat),
        owner: String::from_utf8_lossy(data).into_owned(),
        mode: mode_of(tag),
        token: u64::try_from(stat.czxid).ok(),
        held_for: since(stat, now),
        // Another session's time left is not something ZooKeeper tells.
        lease_left: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_give_their_mode() {
        assert_eq!(mode_of("s"), Mode::Shared);
        assert_eq!(mode_of("p12"), Mode::Semaphore { permits: 12 });
        for odd in ["x", "p0", "p", ""] {
            assert_eq!(mode_of(odd), Mode::Exclusive, "{odd}");
        }
    }
}
