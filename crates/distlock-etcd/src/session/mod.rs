//! A session: an etcd lease, and the queue keys of its locks.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use distlock_core::store::{
    lock, release_outcome, spawn_cleanup, AcquireRequest, Grant, HeldLock, RenewReport,
    SessionOptions, StoreSession,
};
use distlock_core::{Error, Result};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, KvClient, LeaseKeepAliveStream, LeaseKeeper, Txn,
    TxnOp, TxnOpResponse, WatchClient,
};

use crate::entry::lock_prefix;
use crate::{unavailable, CALL_TIMEOUT};

mod holds;
mod line;
mod queue;

use holds::HeldWatch;

pub(crate) struct EtcdSession {
    client: Client,
    /// The client's KV and watch services, for the calls of every acquire
    /// and release: one of them is cheaper to copy per call than `client`.
    kv: KvClient,
    watcher: WatchClient,
    endpoints: String,
    lease: i64,
    /// Who the session says it is: written into each of its queue entries.
    owner: String,
    keeper: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
    /// The queue key and token (its create revision) of each lock held, by
    /// lock name: a key name serves several lives, the token tells which.
    held: Mutex<HashMap<String, (String, u64)>>,
    /// Watches the held queue keys: every key in `held` is watched until
    /// the session releases it or learns it lost it.
    watch: HeldWatch,
    /// Queue keys whose deletion in the background is still under way (an
    /// attempt dropped or failed half-way): no attempt uses them until they
    /// are gone.
    leaving: Arc<Mutex<HashSet<String>>>,
    /// Queue keys a release deleted by name without (yet) hearing back:
    /// that delete may still land, on whatever life of the key is there,
    /// so the session does not put them again. With each, the create
    /// revision of its life until that life is known to be gone: the next
    /// join of the lock takes it out, should the background clean-up not.
    retired: Mutex<HashMap<String, Option<i64>>>,
}

/// The most operations etcd takes in one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// The most keys one session may have in one lock's queue at once: its
/// attempt's, and those of earlier attempts whose deletion is under way.
const MAX_SLOTS: usize = 16;

impl EtcdSession {
    pub(crate) async fn open(
        client: Client,
        endpoints: String,
        options: &SessionOptions,
    ) -> Result<Self> {
        let ttl = i64::try_from(options.ttl.as_secs_f64().ceil() as u64)
            .unwrap_or(i64::MAX)
            .max(1);
        let granted = crate::request(&client, &endpoints, |mut client| async move {
            client.lease_grant(ttl, None).await
        })
        .await?;
        Ok(EtcdSession {
            watch: HeldWatch::start(client.clone()),
            kv: client.kv_client(),
            watcher: client.watch_client(),
            client,
            endpoints,
            lease: granted.id(),
            owner: options.owner.clone(),
            keeper: tokio::sync::Mutex::new(None),
            held: Mutex::new(HashMap::new()),
            leaving: Arc::new(Mutex::new(HashSet::new())),
            retired: Mutex::new(HashMap::new()),
        })
    }

    /// A call bounded in time, its error explained.
    async fn call<T>(
        &self,
        call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        crate::call(&self.endpoints, call).await
    }

    /// A request, sent again if it never left (see [`crate::request`]).
    async fn request<T, F>(&self, send: impl FnMut(Client) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        crate::request(&self.client, &self.endpoints, send).await
    }

    /// [`EtcdSession::request`] to the KV service.
    async fn kv_request<T, F>(&self, send: impl FnMut(KvClient) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        crate::request_on(&self.client, &self.kv, &self.endpoints, send).await
    }

    /// [`EtcdSession::request`] to the watch service.
    async fn watch_request<T, F>(&self, send: impl FnMut(WatchClient) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        crate::request_on(&self.client, &self.watcher, &self.endpoints, send).await
    }

    /// The queue key for an attempt on lock `name`: the session's lease and
    /// the first slot whose key is neither still being deleted nor retired.
    /// The same few keys serve every attempt: etcd keeps each key ever made
    /// in its index until a compaction, and every read of the queue walks
    /// them, so a key per attempt would slow each read down as the lock is
    /// used. Retired keys add slots: they are few (one per release that
    /// went unanswered), and never come back.
    fn new_key(&self, name: &str, prefix: &str) -> Result<String> {
        let leaving = lock(&self.leaving);
        let retired = lock(&self.retired);
        let retired_here = retired.keys().filter(|key| key.starts_with(prefix)).count();
        (0..MAX_SLOTS + retired_here)
            .map(|slot| format!("{prefix}{:016x}-{slot}", self.lease))
            .find(|key| !leaving.contains(key) && !retired.contains_key(key))
            .ok_or_else(|| {
                unavailable(
                    &self.endpoints,
                    &format!(
                        "{MAX_SLOTS} earlier keys of lock '{name}' in this session are still to be \
                         deleted; try again once etcd answers, or open a new session"
                    ),
                )
            })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, (String, u64)>> {
        lock(&self.held)
    }

    /// A call's error, as `Lost` when it says the lease is gone.
    fn failure(&self, err: &Error) -> Option<Error> {
        err.message()
            .contains("lease not found")
            .then(|| self.lost("is gone"))
    }

    fn lost(&self, why: &str) -> Error {
        Error::lost(format!(
            "etcd at {}: the session's lease {why}; open a new session",
            self.endpoints
        ))
    }

    /// Takes `key` out of its queue, if it is the one created at `revision`.
    async fn leave(
        client: &mut KvClient,
        key: &str,
        revision: i64,
    ) -> std::result::Result<bool, etcd_client::Error> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(client.txn(txn).await?.succeeded())
    }

    /// [`EtcdSession::leave`] now, bounded in time, its error explained.
    async fn leave_now(&self, key: &str, revision: i64) -> Result<bool> {
        self.kv_request(|mut kv| async move { EtcdSession::leave(&mut kv, key, revision).await })
            .await
    }
}

/// Takes `key` out of its queue if it is still the life of it created at
/// `revision`; when that is not known (a join whose answer never came),
/// whatever life of it is there now. Done either way once the call went
/// through. Never a delete by name alone: keys are used again, and a
/// delete that lands late must not take a later attempt's key.
async fn take_out(
    client: &mut KvClient,
    key: &str,
    revision: Option<i64>,
) -> std::result::Result<(), etcd_client::Error> {
    let revision = match revision {
        Some(revision) => revision,
        None => match client.get(key, None).await?.kvs().first() {
            Some(there) => there.create_revision(),
            None => return Ok(()),
        },
    };
    EtcdSession::leave(client, key, revision).await?;
    Ok(())
}

/// Takes an attempt's key out of the queue, in the background, when the
/// attempt is dropped or fails before it is done. No attempt uses the key
/// until it is gone (see `leaving`), and only its own life of the key is
/// deleted (`take_out`); a failed call is tried again for a while (etcd may
/// be restarting), and the key goes with the lease in any case.
struct Leave {
    client: KvClient,
    key: String,
    /// The key's create revision, once known.
    revision: Option<i64>,
    leaving: Arc<Mutex<HashSet<String>>>,
    armed: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Out of use until deleted; without a runtime to delete it with, it
        // stays out of use, and goes with the lease.
        let (mut client, key) = (self.client.clone(), std::mem::take(&mut self.key));
        lock(&self.leaving).insert(key.clone());
        let (leaving, revision) = (Arc::clone(&self.leaving), self.revision);
        spawn_cleanup(async move {
            for attempt in 0..30u64 {
                let deleted =
                    tokio::time::timeout(CALL_TIMEOUT, take_out(&mut client, &key, revision));
                if matches!(deleted.await, Ok(Ok(()))) {
                    lock(&leaving).remove(&key);
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
            }
            // Given up: the slot is free again. A join that finds the key
            // still there takes that life out first, so it is never reused
            // as it is.
            lock(&leaving).remove(&key);
        });
    }
}

#[async_trait]
impl StoreSession for EtcdSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        self.acquire_in_queue(request).await
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let me = match self.held().get(&held.key) {
            Some((me, token)) if *token == held.token => me.clone(),
            // Another life of the lock, or none.
            _ => return Err(Error::not_held(&held.key)),
        };
        let revision = i64::try_from(held.token).unwrap_or(i64::MAX);
        if revision <= 0 {
            // No key has create revision 0: that is "absent" to etcd.
            return Err(Error::not_held(&held.key));
        }
        // Unwatched before the delete is sent: the task then never takes
        // this session's own delete for someone else's.
        self.watch.unwatch(&me);
        // A plain delete by name, which costs etcd less than a transaction,
        // and returns the life it deleted. The key is retired while the
        // delete is out: should its answer never come (an error, or this
        // call dropped), the delete may still land, and no later life of
        // the key may be there for it to find; and that life is taken out
        // in the background, by its create revision (docs/0005-etcd.md).
        let retiring = match lock(&self.retired).entry(me.clone()) {
            Entry::Vacant(vacant) => {
                vacant.insert(Some(revision));
                true
            }
            Entry::Occupied(_) => false,
        };
        // A retry of a release already retired leaves the clean-up to the
        // first one's.
        let mut leave = Leave {
            client: self.kv.clone(),
            key: me.clone(),
            revision: Some(revision),
            leaving: Arc::clone(&self.leaving),
            armed: retiring,
        };
        let deleted = self
            .kv_request(|mut kv| {
                let me = me.as_str();
                async move {
                    kv.delete(me, Some(DeleteOptions::new().with_prev_key()))
                        .await
                }
            })
            .await
            .map_err(|err| self.failure(&err).unwrap_or(err))?;
        // Answered: this delete has landed. A key retired by an earlier
        // release whose answer never came stays retired, its life gone.
        leave.armed = false;
        let mut retired = lock(&self.retired);
        if retiring {
            retired.remove(&me);
        } else if let Some(life) = retired.get_mut(&me) {
            *life = None;
        }
        drop(retired);
        let released = deleted
            .prev_kvs()
            .first()
            .is_some_and(|gone| gone.create_revision() == revision);
        {
            let mut map = self.held();
            if map.get(&held.key) == Some(&(me, held.token)) {
                map.remove(&held.key);
            }
        }
        release_outcome(released, &held.key)
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let ttl = {
            let mut keeper = self.keeper.lock().await;
            if keeper.is_none() {
                // A lease that ran out is "not found": the session is lost.
                let opened = self
                    .request(|mut client| async move { client.lease_keep_alive(self.lease).await })
                    .await
                    .map_err(|err| self.failure(&err).unwrap_or(err))?;
                *keeper = Some(opened);
            }
            let (sender, answers) = keeper.as_mut().expect("made above");
            let sent = async {
                sender.keep_alive().await?;
                answers.message().await
            };
            match self.call(sent).await {
                Ok(Some(answer)) => answer.ttl(),
                Ok(None) | Err(_) => {
                    // The stream broke: a new one next time.
                    keeper.take();
                    return Err(Error::unavailable(format!(
                        "etcd at {} did not renew the lease",
                        self.endpoints
                    )));
                }
            }
        };
        if ttl <= 0 {
            return Err(self.lost("has run out"));
        }
        if held.is_empty() {
            return Ok(RenewReport::all_held());
        }
        // Each held key must still be there, as created when granted. A lock
        // without a key here was released or found lost already: no key to
        // read (etcd refuses an empty one), and lost all the same.
        let mut lost = Vec::new();
        let known: Vec<(&HeldLock, String)> = {
            let map = self.held();
            held.iter()
                .filter_map(|lock| match map.get(&lock.key) {
                    Some((key, token)) if *token == lock.token => Some((lock, key.clone())),
                    // Released, found lost, or taken again since the
                    // snapshot: that life is over, the map is left as is.
                    _ => {
                        lost.push(lock.key.clone());
                        None
                    }
                })
                .collect()
        };
        let mut responses = Vec::with_capacity(known.len());
        for batch in known.chunks(MAX_TXN_OPS) {
            let reads: Vec<TxnOp> = batch
                .iter()
                .map(|(_, key)| TxnOp::get(key.as_str(), None))
                .collect();
            let answer = self
                .kv_request(|mut kv| {
                    let reads = reads.clone();
                    async move { kv.txn(Txn::new().and_then(reads)).await }
                })
                .await?;
            responses.extend(answer.op_responses());
        }
        for ((lock, _), response) in known.iter().zip(responses) {
            let there = match response {
                TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .is_some_and(|kv| u64::try_from(kv.create_revision()).ok() == Some(lock.token)),
                _ => false,
            };
            if !there {
                let mut map = self.held();
                if map
                    .get(&lock.key)
                    .is_some_and(|(_, token)| *token == lock.token)
                {
                    if let Some((key, _)) = map.remove(&lock.key) {
                        self.watch.unwatch(&key);
                    }
                }
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn renewal_wanted(&self) {
        self.watch.wanted().await;
    }

    async fn close(&self) -> Result<()> {
        // Revoking the lease deletes every key of the session.
        self.request(|mut client| async move { client.lease_revoke(self.lease).await })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use distlock_testkit::servers::Etcd;

    use super::*;

    /// A leave names the life of the key it joined as: one that lands
    /// after the key was made again (a retried release, a clean-up whose
    /// answer was lost) leaves the new life alone. The shared suite cannot
    /// stage this: the store refuses a release of a token it does not
    /// hold before it asks etcd.
    #[tokio::test]
    async fn a_late_leave_does_not_take_a_later_life_of_its_key() {
        let server = Etcd::start();
        let endpoint = format!("127.0.0.1:{}", server.port());
        let client = etcd_client::Client::connect([endpoint], None)
            .await
            .expect("connect");
        let mut kv = client.kv_client();
        let key = "leave/late";
        let life = |kv: KvClient| async move {
            let mut kv = kv;
            let found = kv.get(key, None).await.expect("get");
            found.kvs().first().map(|there| there.create_revision())
        };
        kv.put(key, "first", None).await.expect("put");
        let first = life(kv.clone()).await.expect("made");
        kv.delete(key, None).await.expect("delete");
        kv.put(key, "second", None).await.expect("put");
        let second = life(kv.clone()).await.expect("made again");
        let left = EtcdSession::leave(&mut kv, key, first)
            .await
            .expect("leave");
        assert!(!left, "the first life's leave took the second");
        assert_eq!(life(kv.clone()).await, Some(second));
        let left = EtcdSession::leave(&mut kv, key, second)
            .await
            .expect("leave");
        assert!(left);
        assert_eq!(life(kv.clone()).await, None);
    }
}
