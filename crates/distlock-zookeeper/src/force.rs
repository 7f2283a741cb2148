//! `force_release`: an operator ends every hold of a key by deleting the
//! holders' queue nodes, in one multi that also proves the first waiter
//! still there (so nobody behind it came to hold meanwhile). Waiters watch
//! the node ahead of them, so they wake and are granted as on a release; a
//! grant's token is its node's czxid, and zxids only grow, so the next one
//! is higher. Each old holder's session watches its own nodes, and its
//! renewal checks them: it learns it lost the key.
//!
//! A multi cannot check that no node joined a directory, so with nobody
//! waiting, a reader or permit that joins between the read and the multi
//! keeps its hold, as if it came just after the forced release.

use distlock_core::status::HolderStatus;
use distlock_core::store::queue;
use distlock_core::{Error, Result};
use futures::future::try_join_all;
use zookeeper_client::{Client, Error as ZkError, MultiWriteError, Stat};

use crate::session::{lock_dir, ordered, raw, tag_of};
use crate::status::{holder_status, now};
use crate::{zk_error, ZkStore};

/// The most nodes one multi deletes (their paths must fit ZooKeeper's
/// 1 MiB request limit: 3 KiB each at most).
const AT_ONCE: usize = 127;

/// How often the holders may change between a read and its delete before
/// a forced release gives up.
const TRIES: usize = 16;

/// A holding node as read: its name, data and stat.
type Holder = (String, Vec<u8>, Stat);

/// What one look at the queue found.
enum Read {
    /// Nothing (more) to end.
    Done,
    /// The queue changed under the read.
    Changed,
    /// Holders to end now.
    Holders {
        batch: Vec<Holder>,
        /// The first waiter, to check in the same multi (first round only).
        first_waiter: Option<String>,
        /// The czxid of the last holder, when more hold than one batch ends.
        more_up_to: Option<i64>,
    },
}

impl ZkStore {
    /// Deletes the nodes of `key`'s queue that hold it; what they held.
    pub(crate) async fn end_holds(&self, key: &str) -> Result<Vec<HolderStatus>> {
        let client = self.reader().await?;
        let dir = lock_dir(key);
        let mut ended = Vec::new();
        // Once some holds are ended, the rest of that read's holders are the
        // nodes made up to the last of them (by czxid): the waiters granted
        // since are the next holders, not ones to end.
        let mut last_holder: Option<i64> = None;
        let mut changed = 0;
        loop {
            let (batch, first_waiter, more_up_to) =
                match self.read_holders(&client, &dir, last_holder).await? {
                    Read::Done => return Ok(ended),
                    Read::Changed => {
                        changed += 1;
                        self.give_up_after(changed, key, ended.len())?;
                        continue;
                    }
                    Read::Holders {
                        batch,
                        first_waiter,
                        more_up_to,
                    } => (batch, first_waiter, more_up_to),
                };
            let mut multi = client.new_multi_writer();
            for (name, _, _) in &batch {
                multi
                    .add_delete(&format!("{dir}/{name}"), None)
                    .map_err(|err| zk_error(&self.hosts, &err))?;
            }
            if let Some(waiter) = &first_waiter {
                multi
                    .add_check_version(&format!("{dir}/{waiter}"), -1)
                    .map_err(|err| zk_error(&self.hosts, &err))?;
            }
            match raw(&self.hosts, multi.commit()).await? {
                Ok(_) => {
                    let now = now();
                    ended.extend(
                        batch
                            .iter()
                            .map(|(name, data, stat)| holder_status(tag_of(name), data, stat, now)),
                    );
                    match (last_holder, more_up_to) {
                        (None, None) => return Ok(ended),
                        (None, Some(last)) => last_holder = Some(last),
                        // Later rounds go on until a read finds none left.
                        (Some(_), _) => {}
                    }
                }
                // A holder released, or the first waiter left: read again.
                Err(MultiWriteError::OperationFailed {
                    source: ZkError::NoNode,
                    ..
                }) => {
                    changed += 1;
                    self.give_up_after(changed, key, ended.len())?;
                }
                Err(MultiWriteError::OperationFailed {
                    source: ZkError::NoAuth,
                    ..
                }) => return Err(self.no_delete(&dir, key)),
                Err(err) => return Err(zk_error(&self.hosts, &err.into())),
            }
        }
    }

    /// The holders at the head of the queue (at most [`AT_ONCE`]), each with
    /// its data; with `last_holder`, the nodes made up to it.
    async fn read_holders(
        &self,
        client: &Client,
        dir: &str,
        last_holder: Option<i64>,
    ) -> Result<Read> {
        let hosts = self.hosts.as_str();
        // Catch up with the leader first: a server behind it could still
        // list holders that have gone, and miss the first waiter.
        match raw(hosts, client.sync(dir)).await? {
            Ok(()) | Err(ZkError::NoNode) => {}
            Err(err) => return Err(zk_error(hosts, &err)),
        }
        let children = match raw(hosts, client.list_children(dir)).await? {
            Ok(children) => children,
            Err(ZkError::NoNode) => return Ok(Read::Done),
            Err(err) => return Err(self.refused(dir, err)),
        };
        let queue = ordered(&children);
        // The holders are always the head of the queue: a node holds only
        // when every node ahead of it does (`queue::blocker`).
        let holding = match last_holder {
            None => {
                let tags: Vec<&str> = queue.iter().map(|(_, name)| tag_of(name)).collect();
                queue::holders(&tags).iter().take_while(|h| **h).count()
            }
            Some(_) => queue.len().min(AT_ONCE),
        };
        let mut wanted: Vec<&str> = queue[..holding.min(AT_ONCE)]
            .iter()
            .map(|(_, name)| *name)
            .collect();
        // More hold than one multi ends: the last of them marks where the
        // holds to end stop.
        let beyond = last_holder.is_none() && holding > AT_ONCE;
        if beyond {
            wanted.push(queue[holding - 1].1);
        }
        let reads = wanted.iter().map(|name| {
            let path = format!("{dir}/{name}");
            async move { raw(hosts, client.get_data(&path)).await }
        });
        let mut batch = Vec::with_capacity(wanted.len());
        for (name, read) in wanted.iter().zip(try_join_all(reads).await?) {
            match read {
                Ok((data, stat)) => batch.push(((*name).to_owned(), data, stat)),
                Err(ZkError::NoNode) => return Ok(Read::Changed),
                Err(err) => return Err(self.refused(dir, err)),
            }
        }
        let more_up_to = match beyond {
            true => batch.pop().map(|(_, _, stat)| stat.czxid),
            false => None,
        };
        if let Some(last) = last_holder {
            // In queue order, so in czxid order: later nodes are waiters
            // granted since.
            let up_to = batch.iter().take_while(|(_, _, stat)| stat.czxid <= last);
            let kept = up_to.count();
            batch.truncate(kept);
        }
        if batch.is_empty() {
            return Ok(Read::Done);
        }
        let first_waiter = match last_holder {
            None => queue.get(holding).map(|(_, name)| (*name).to_owned()),
            Some(_) => None,
        };
        Ok(Read::Holders {
            batch,
            first_waiter,
            more_up_to,
        })
    }

    /// Gives up once the holders changed under [`TRIES`] reads.
    fn give_up_after(&self, changed: usize, key: &str, ended: usize) -> Result<()> {
        if changed < TRIES {
            return Ok(());
        }
        Err(Error::unavailable(format!(
            "ZooKeeper at {}: the holders of '{key}' changed at each of {TRIES} tries to \
             end them (ended {ended} so far); try again",
            self.hosts
        )))
    }

    /// ZooKeeper refused to delete a holder's node: its directory's ACL.
    fn no_delete(&self, dir: &str, key: &str) -> Error {
        Error::config(format!(
            "ZooKeeper at {}: not allowed to delete the holders of '{key}': deleting a node \
             takes the DELETE permission on its parent, {dir}, and the ACL there does not \
             give it to this store's client; grant it (or end the holders' sessions instead)",
            self.hosts
        ))
        .with_source(ZkError::NoAuth)
    }

    /// A read's error, saying which permission is missing if it is one.
    fn refused(&self, dir: &str, err: ZkError) -> Error {
        if err != ZkError::NoAuth {
            return zk_error(&self.hosts, &err);
        }
        Error::config(format!(
            "ZooKeeper at {}: not allowed to read {dir} or the nodes in it; grant this \
             store's client the READ permission there",
            self.hosts
        ))
        .with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_release_gives_up_at_the_last_try_saying_so() {
        let store = ZkStore {
            connect: "h:2181".to_owned(),
            hosts: "h:2181".to_owned(),
            reader: std::sync::Arc::default(),
        };
        for changed in 0..TRIES {
            assert!(store.give_up_after(changed, "k", 0).is_ok(), "{changed}");
        }
        let err = store.give_up_after(TRIES, "k", 3).expect_err("gives up");
        assert_eq!(err.kind(), distlock_core::ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("ended 3 so far"), "{err}");
    }
}
