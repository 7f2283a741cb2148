//! `status`: the queues of the keys asked about, read in one range read and
//! split into holders and waiters by the core's queue decision.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery, WaiterStatus};
use distlock_core::store::queue;
use distlock_core::store::Mode;
use distlock_core::Result;
use etcd_client::KeyValue;
use futures::StreamExt;

use crate::entry::{self, escape, lock_prefix, queue_options};
use crate::{request, EtcdStore, PREFIX};

/// How many leases a status asks about at once.
const AT_ONCE: usize = 32;

/// The mode a tag names. A tag that names none blocks like a writer in
/// the queue decision, and is shown as one.
fn mode_of(tag: &str) -> Mode {
    Mode::from_tag(tag).unwrap_or(Mode::Exclusive)
}

impl EtcdStore {
    /// Reads the queues `query` names, in one range read, and then the time
    /// left of each holder's lease.
    pub(crate) async fn read_status(&self, query: &StatusQuery) -> Result<Status> {
        let range = match query {
            StatusQuery::Key(key) => lock_prefix(key),
            StatusQuery::Prefix(prefix) => format!("{PREFIX}{}", escape(prefix)),
        };
        let read = request(&self.client, &self.endpoints, |mut client| {
            let range = range.clone();
            async move { client.get(range, Some(queue_options())).await }
        })
        .await?;
        // By lock, each queue oldest first; sorted by key.
        let mut queues: BTreeMap<String, Vec<&KeyValue>> = BTreeMap::new();
        for kv in read.kvs() {
            match entry::lock_name(kv.key()) {
                Some(name) if query.matches(&name) => queues.entry(name).or_default().push(kv),
                _ => {}
            }
        }
        let (mut keys, holder_leases): (Vec<KeyStatus>, Vec<Vec<i64>>) = queues
            .into_iter()
            .map(|(key, queue)| key_status(key, &queue))
            .unzip();
        let mut leases: Vec<i64> = holder_leases.iter().flatten().copied().collect();
        leases.sort_unstable();
        leases.dedup();
        let left = self.leases_left(&leases).await?;
        for (key, leases) in keys.iter_mut().zip(&holder_leases) {
            for (holder, lease) in key.holders.iter_mut().zip(leases) {
                holder.lease_left = left.get(lease).copied();
            }
        }
        Ok(Status {
            keys,
            counters: None,
        })
    }

    /// The time left of each lease, asked [`AT_ONCE`] at a time. A lease
    /// etcd no longer knows has none left (its keys go a moment later); a
    /// key without a lease (0) never expires, and a lease that could not be
    /// asked about is left unknown rather than failing the whole status.
    async fn leases_left(&self, leases: &[i64]) -> Result<HashMap<i64, Duration>> {
        // Made first: a stream that maps with a closure would not be `Send`.
        let asked: Vec<_> = leases
            .iter()
            .filter(|&&lease| lease != 0)
            .map(|&lease| async move {
                let answer = request(&self.client, &self.endpoints, |mut client| async move {
                    client.lease_time_to_live(lease, None).await
                })
                .await;
                match answer {
                    Ok(answer) => u64::try_from(answer.ttl()).ok().map(|ttl| (lease, ttl)),
                    Err(err) if err.message().contains("lease not found") => Some((lease, 0)),
                    Err(err) => {
                        tracing::debug!(lease, "status: lease time to live: {err}");
                        None
                    }
                }
            })
            .collect();
        let answers: Vec<Option<(i64, u64)>> = futures::stream::iter(asked)
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        Ok(answers
            .into_iter()
            .flatten()
            .map(|(lease, seconds)| (lease, Duration::from_secs(seconds)))
            .collect())
    }
}

/// One lock's queue, oldest first, as holders and waiters, and the lease of
/// each holder. etcd keeps no time with a key: how long each has held or
/// waited is not known.
fn key_status(key: String, queue: &[&KeyValue]) -> (KeyStatus, Vec<i64>) {
    let tags: Vec<&str> = queue.iter().map(|kv| entry::tag(kv.value())).collect();
    let mut status = KeyStatus {
        key,
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    };
    let mut leases = Vec::new();
    for ((kv, tag), holds) in queue.iter().zip(&tags).zip(queue::holders(&tags)) {
        if holds {
            leases.push(kv.lease());
            status.holders.push(holder_status(kv));
        } else {
            status.waiters.push(WaiterStatus {
                session: session_of(kv),
                owner: entry::owner(kv.value()),
                mode: mode_of(tag),
                waiting_for: None,
            });
        }
    }
    (status, leases)
}

/// The session an entry belongs to: its lease, as etcd shows it.
fn session_of(kv: &KeyValue) -> String {
    format!("{:016x}", kv.lease())
}

/// A holding entry as `status` shows it, without its lease's time left.
pub(crate) fn holder_status(kv: &KeyValue) -> HolderStatus {
    HolderStatus {
        session: session_of(kv),
        owner: entry::owner(kv.value()),
        mode: mode_of(entry::tag(kv.value())),
        token: u64::try_from(kv.create_revision()).ok(),
        held_for: None,
        lease_left: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_give_their_mode() {
        assert_eq!(mode_of("x"), Mode::Exclusive);
        assert_eq!(mode_of("s"), Mode::Shared);
        assert_eq!(mode_of("p12"), Mode::Semaphore { permits: 12 });
        for odd in ["p0", "p", "", "q"] {
            assert_eq!(mode_of(odd), Mode::Exclusive, "{odd}");
        }
    }
}
