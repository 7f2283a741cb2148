//! `force_release`: an operator ends every hold of a key by deleting the
//! holders' queue entries, in a transaction that also proves the holders
//! unchanged since the read. Waiters watch the entry ahead of them, so they
//! wake and are granted as on a release; a grant's token is its entry's
//! create revision, which etcd never hands out twice, so the next one is
//! higher. Each old holder's session watches its own entries, and its
//! renewal reads them: it learns it lost the key.

use distlock_core::status::HolderStatus;
use distlock_core::store::queue;
use distlock_core::{Error, Result};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};

use crate::entry::{self, lock_prefix, queue_options};
use crate::status::holder_status;
use crate::{request, EtcdStore};

/// The most entries one transaction deletes: etcd takes 128 compares a
/// transaction (`--max-txn-ops`), and one more pins the queue behind them.
const AT_ONCE: usize = 127;

/// How often the holders may change between a read and its delete before
/// a forced release gives up.
const TRIES: usize = 16;

impl EtcdStore {
    /// Deletes the entries of `key`'s queue that hold it; what they held.
    pub(crate) async fn end_holds(&self, key: &str) -> Result<Vec<HolderStatus>> {
        let prefix = lock_prefix(key);
        let mut ended = Vec::new();
        // Once some holds are ended, the rest of that read's holders are the
        // entries created up to the last of them: the waiters granted since
        // are the next holders, not ones to end.
        let mut last_holder: Option<i64> = None;
        let mut changed = 0;
        loop {
            let read = request(&self.client, &self.endpoints, |mut client| {
                let prefix = prefix.clone();
                async move { client.get(prefix, Some(queue_options())).await }
            })
            .await?;
            let read_at = read.header().map_or(0, |header| header.revision());
            let kvs = read.kvs();
            let holding = match last_holder {
                None => holding(kvs),
                Some(last) => kvs
                    .iter()
                    .take_while(|kv| kv.create_revision() <= last)
                    .count(),
            };
            if holding == 0 {
                return Ok(ended);
            }
            let batch = &kvs[..holding.min(AT_ONCE)];
            let mut compares: Vec<Compare> = batch.iter().map(still_there).collect();
            if last_holder.is_none() {
                compares.push(match kvs.get(holding) {
                    // Nothing behind the first waiter can hold while it
                    // waits.
                    Some(first_waiter) => still_there(first_waiter),
                    // No waiter: no entry may have joined (it would hold).
                    None => Compare::create_revision(prefix.as_str(), CompareOp::Less, read_at + 1)
                        .with_prefix(),
                });
            }
            let deletes: Vec<TxnOp> = batch
                .iter()
                .map(|kv| TxnOp::delete(kv.key(), None))
                .collect();
            let txn = Txn::new().when(compares).and_then(deletes);
            let done = request(&self.client, &self.endpoints, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
            if done.succeeded() {
                ended.extend(batch.iter().map(holder_status));
                if holding == batch.len() {
                    return Ok(ended);
                }
                last_holder.get_or_insert(kvs[holding - 1].create_revision());
                continue;
            }
            changed += 1;
            give_up_after(&self.endpoints, changed, key, ended.len())?;
        }
    }
}

/// Gives up once the holders changed under [`TRIES`] reads.
fn give_up_after(endpoints: &str, changed: usize, key: &str, ended: usize) -> Result<()> {
    if changed < TRIES {
        return Ok(());
    }
    Err(Error::unavailable(format!(
        "etcd at {endpoints}: the holders of '{key}' changed at each of {TRIES} tries to \
         end them (ended {ended} so far); try again"
    )))
}

/// How many entries at the head of a queue (oldest first) hold the lock.
/// The holders are always the head: an entry holds only when every entry
/// ahead of it does (`queue::blocker`).
fn holding(kvs: &[KeyValue]) -> usize {
    let tags: Vec<&str> = kvs.iter().map(|kv| entry::tag(kv.value())).collect();
    queue::holders(&tags)
        .iter()
        .take_while(|holds| **holds)
        .count()
}

/// The entry is still the life of its key that was read.
fn still_there(kv: &KeyValue) -> Compare {
    Compare::create_revision(kv.key(), CompareOp::Equal, kv.create_revision())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_release_gives_up_at_the_last_try_saying_so() {
        for changed in 0..TRIES {
            assert!(
                give_up_after("h:2379", changed, "k", 0).is_ok(),
                "{changed}"
            );
        }
        let err = give_up_after("h:2379", TRIES, "k", 3).expect_err("gives up");
        assert_eq!(err.kind(), distlock_core::ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("ended 3 so far"), "{err}");
    }
}
