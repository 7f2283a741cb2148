//! A session: an etcd lease, and the queue keys of its locks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use distlock_core::store::lock;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, Mode, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, KvClient, LeaseClient,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchClient,
};
use tokio::time::Instant;

use crate::{timed_out, unavailable, CALL_TIMEOUT, PREFIX};

mod queue;
mod wait;

use queue::{Place, Woken};

/// The keys of one lock start with this: the name with `%` and `/` escaped,
/// so that no lock's prefix is another's.
fn lock_prefix(name: &str) -> String {
    format!("{PREFIX}{}/", name.replace('%', "%25").replace('/', "%2F"))
}

fn mode_value(mode: Mode) -> String {
    match mode {
        Mode::Exclusive => "x".to_owned(),
        Mode::Shared => "s".to_owned(),
        Mode::Semaphore { permits } => format!("p{permits}"),
    }
}

pub(crate) struct EtcdSession {
    /// The parts of the store's client this uses: each call clones only its
    /// own (a whole `Client` is eighteen gRPC handles).
    kv: KvClient,
    watcher: WatchClient,
    leases: LeaseClient,
    endpoints: String,
    lease: i64,
    keeper: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
    /// The queue keys of the locks held, by lock name.
    held: Mutex<HashMap<String, String>>,
    /// Queue keys whose deletion in the background is still under way (an
    /// attempt dropped or failed half-way): no attempt uses them until they
    /// are gone. A key whose release went unanswered stays for good.
    leaving: Arc<Mutex<HashSet<String>>>,
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
        let session = EtcdSession {
            kv: client.kv_client(),
            watcher: client.watch_client(),
            leases: client.lease_client(),
            endpoints,
            lease: 0,
            keeper: tokio::sync::Mutex::new(None),
            held: Mutex::new(HashMap::new()),
            leaving: Arc::new(Mutex::new(HashSet::new())),
        };
        let granted = session
            .call(session.leases.clone().grant(ttl, None))
            .await?;
        Ok(EtcdSession {
            lease: granted.id(),
            ..session
        })
    }

    /// A call bounded in time, its error explained.
    async fn call<T>(
        &self,
        call: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| timed_out(&self.endpoints))?
            .map_err(|err| unavailable(&self.endpoints, &err))
    }

    /// The queue key for an attempt on lock `name`: the session's lease and
    /// the first slot whose key is not still being deleted. The same few
    /// keys serve every attempt: etcd keeps each key ever made in its index
    /// until a compaction, and every read of the queue walks them, so a key
    /// per attempt would slow each read down as the lock is used.
    fn new_key(&self, name: &str, prefix: &str) -> Result<String> {
        let leaving = lock(&self.leaving);
        (0..MAX_SLOTS)
            .map(|slot| format!("{prefix}{:016x}-{slot}", self.lease))
            .find(|key| !leaving.contains(key))
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

    fn held(&self) -> MutexGuard<'_, HashMap<String, String>> {
        lock(&self.held)
    }

    /// A call's error, as `Lost` when it says the lease is gone.
    fn failure(&self, err: &Error) -> Option<Error> {
        err.message()
            .contains("lease not found")
            .then(|| self.lost("is gone"))
    }

    fn lost(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::Lost,
            format!(
                "etcd at {}: the session's lease {why}; open a new session",
                self.endpoints
            ),
        )
    }

    /// Takes `key` out of its queue, if it is the one created at `revision`.
    async fn leave(
        kv: &mut KvClient,
        key: &str,
        revision: i64,
    ) -> std::result::Result<bool, etcd_client::Error> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(kv.txn(txn).await?.succeeded())
    }

    /// [`EtcdSession::leave`] now, bounded in time, its error explained.
    async fn leave_now(&self, key: &str, revision: i64) -> Result<bool> {
        self.call(EtcdSession::leave(&mut self.kv.clone(), key, revision))
            .await
    }

    /// Reads `key` as `options` say: from what the member has applied when
    /// that reaches revision `since` (a read that must see past an event),
    /// with a round of consensus when it does not or there is no `since`.
    async fn read(
        &self,
        key: &[u8],
        options: GetOptions,
        since: Option<i64>,
    ) -> Result<GetResponse> {
        if let Some(since) = since {
            let local = options.clone().with_serializable();
            let read = self.call(self.kv.clone().get(key, Some(local))).await?;
            if revision(read.header()) >= since {
                return Ok(read);
            }
        }
        self.call(self.kv.clone().get(key, Some(options))).await
    }

    /// Joins lock `name`'s queue (under `prefix`) at its tail and reads it,
    /// in one transaction: the attempt's key, its clean-up if the attempt
    /// is dropped, and the queue as read.
    async fn join(
        &self,
        name: &str,
        prefix: &str,
        mode: Mode,
    ) -> Result<(String, Leave, GetResponse)> {
        let value = mode_value(mode);
        let put = PutOptions::new().with_lease(self.lease).with_prev_key();
        for _ in 0..=MAX_SLOTS {
            let me = self.new_key(name, prefix)?;
            let mut leave = Leave {
                kv: self.kv.clone(),
                key: me.clone(),
                revision: None,
                leaving: Arc::clone(&self.leaving),
                armed: true,
            };
            // No compare (and no read of the key on its failure): the
            // request then fits one frame, and a put that finds the key
            // there says so.
            let join = Txn::new().and_then([
                TxnOp::put(me.as_str(), value.as_str(), Some(put.clone())),
                TxnOp::get(prefix, Some(queue::read_options(mode, None))),
            ]);
            let joined = match self.call(self.kv.clone().txn(join)).await {
                Ok(joined) => joined,
                Err(err) => return Err(self.failure(&err).unwrap_or(err)),
            };
            let (mut found, mut read) = (None, None);
            for response in joined.op_responses() {
                match response {
                    TxnOpResponse::Put(put) => found = Some(put.prev_key().cloned()),
                    TxnOpResponse::Get(got) => read = Some(got),
                    _ => {}
                }
            }
            let (Some(found), Some(read)) = (found, read) else {
                return Err(unavailable(
                    &self.endpoints,
                    &"a join came back without its answers",
                ));
            };
            let Some(left) = found else {
                leave.revision = Some(revision(joined.header()));
                return Ok((me, leave, read));
            };
            // The key was there (left behind, or put back by hand): the put
            // kept its old create revision, so it would jump the queue and
            // repeat a token. That life goes, and the join is tried again.
            leave.revision = Some(left.create_revision());
            self.leave_now(&me, left.create_revision()).await?;
            leave.armed = false;
        }
        // Something puts the key back as fast as it goes.
        Err(unavailable(
            &self.endpoints,
            &format!("this session's key of lock '{name}' keeps coming back"),
        ))
    }

    /// The grant of lock `name` to the attempt with key `me`, at `place`.
    fn granted(&self, name: &str, me: String, leave: &mut Leave, place: &Place) -> Grant {
        leave.armed = false;
        self.held().insert(name.to_owned(), me);
        Grant::new(u64::try_from(place.mine().create_revision()).unwrap_or(0))
    }
}

/// The revision a response was served at (0 if it does not say).
fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |header| header.revision())
}

/// Takes `key` out of its queue if it is still the life of it created at
/// `revision`; when that is not known (a join whose answer never came),
/// whatever life of it is there now. Done either way once the call went
/// through. Never a delete by name alone: keys are used again, and a
/// delete that lands late must not take a later attempt's key.
async fn take_out(
    kv: &mut KvClient,
    key: &str,
    revision: Option<i64>,
) -> std::result::Result<(), etcd_client::Error> {
    let revision = match revision {
        Some(revision) => revision,
        None => match kv.get(key, None).await?.kvs().first() {
            Some(there) => there.create_revision(),
            None => return Ok(()),
        },
    };
    EtcdSession::leave(kv, key, revision).await?;
    Ok(())
}

/// Takes an attempt's key out of the queue, in the background, when the
/// attempt is dropped or fails before it is done. No attempt uses the key
/// until it is gone (see `leaving`), and only its own life of the key is
/// deleted (`take_out`); a failed call is tried again for a while (etcd may
/// be restarting), and the key goes with the lease in any case.
struct Leave {
    kv: KvClient,
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
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to delete it with: the key stays out of use, and
            // goes with the lease.
            lock(&self.leaving).insert(std::mem::take(&mut self.key));
            return;
        };
        let (mut kv, key) = (self.kv.clone(), std::mem::take(&mut self.key));
        lock(&self.leaving).insert(key.clone());
        let (leaving, revision) = (Arc::clone(&self.leaving), self.revision);
        runtime.spawn(async move {
            for attempt in 0..30u64 {
                let deleted = tokio::time::timeout(CALL_TIMEOUT, take_out(&mut kv, &key, revision));
                if matches!(deleted.await, Ok(Ok(()))) {
                    lock(&leaving).remove(&key);
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100 * (attempt + 1))).await;
            }
        });
    }
}

#[async_trait]
impl StoreSession for EtcdSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let prefix = lock_prefix(&request.key);
        let (me, mut leave, mut read) = self.join(&request.key, &prefix, request.mode).await?;
        // The join's put is in the queue it read: the lease lived then.
        let mut woken = None;
        loop {
            // Keys before this one only go (later keys come later), so a read
            // at or after the wake-up that finds none still holds; finding its
            // own key there, its lease lived then (etcd issue 11456), and
            // `lost()` covers after.
            if let Some(woken) = woken.take() {
                let options = queue::read_options(request.mode, leave.revision);
                read = match woken {
                    Woken::Read(now) => now,
                    Woken::Since(since) => {
                        self.read(prefix.as_bytes(), options, Some(since)).await?
                    }
                    Woken::Unsure | Woken::Holds => {
                        self.read(prefix.as_bytes(), options, None).await?
                    }
                };
            }
            let Some(place) = Place::of(read.take_kvs(), me.as_bytes()) else {
                // etcd issue 11456: the lease ended while this waited (or the
                // key was deleted from outside).
                leave.armed = false;
                return Err(self.lost("ended, or its queue key was deleted, while it waited"));
            };
            let Some(blocker) = place.blocker(request.mode) else {
                return Ok(Some(self.granted(&request.key, me, &mut leave, &place)));
            };
            let until = match request.wait_until {
                Some(until) if Instant::now() < until => until,
                // Busy, and no (more) waiting: out of the queue. If that
                // fails, the key is taken out in the background.
                _ => {
                    self.leave_now(&me, place.mine().create_revision()).await?;
                    leave.armed = false;
                    return Ok(None);
                }
            };
            let read_at = revision(read.header());
            let wait = match request.mode {
                Mode::Exclusive => self.wait_in_line(&prefix, &place, read_at, until).await?,
                _ => {
                    self.wait_for(&prefix, &place, blocker, read_at, until)
                        .await?
                }
            };
            if let Woken::Holds = wait {
                return Ok(Some(self.granted(&request.key, me, &mut leave, &place)));
            }
            woken = Some(wait);
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(me) = self.held().get(&held.key).cloned() else {
            return Err(Error::not_held(&held.key));
        };
        let revision = i64::try_from(held.token).unwrap_or(i64::MAX);
        if revision <= 0 {
            // No key has create revision 0: that is "absent" to etcd.
            return Err(Error::not_held(&held.key));
        }
        // A delete by name, not a transaction: etcd 3.4 copies its unsaved
        // writes for every transaction's compares, on the path of every write.
        // Only this session makes lives of `me`, none while the core holds
        // the lock's gate for this release, and none until this delete is
        // answered (a dropped or failed one may land late: the key retires).
        lock(&self.leaving).insert(me.clone());
        let mut kv = self.kv.clone();
        let delete = kv.delete(me.as_str(), Some(DeleteOptions::new().with_prev_key()));
        let deleted = self.call(delete).await?;
        lock(&self.leaving).remove(&me);
        {
            let mut map = self.held();
            if map.get(&held.key) == Some(&me) {
                map.remove(&held.key);
            }
        }
        // Any other life of the key was a stray: gone too, and not held.
        match deleted.prev_kvs().first() {
            Some(gone) if gone.create_revision() == revision => Ok(()),
            _ => Err(Error::not_held(&held.key)),
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let ttl = {
            let mut keeper = self.keeper.lock().await;
            if keeper.is_none() {
                *keeper = Some(
                    self.call(self.leases.clone().keep_alive(self.lease))
                        .await?,
                );
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
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("etcd at {} did not renew the lease", self.endpoints),
                    ));
                }
            }
        };
        if ttl <= 0 {
            return Err(self.lost("has run out"));
        }
        if held.is_empty() {
            return Ok(RenewReport::all_held());
        }
        // Each held key must still be there, as created when granted.
        let keys: Vec<String> = {
            let map = self.held();
            held.iter()
                .map(|lock| map.get(&lock.key).cloned().unwrap_or_default())
                .collect()
        };
        let mut responses = Vec::with_capacity(held.len());
        for batch in keys.chunks(MAX_TXN_OPS) {
            let reads: Vec<TxnOp> = batch
                .iter()
                .map(|key| TxnOp::get(key.as_str(), None))
                .collect();
            let answer = self
                .call(self.kv.clone().txn(Txn::new().and_then(reads)))
                .await?;
            responses.extend(answer.op_responses());
        }
        let mut lost = Vec::new();
        for (lock, response) in held.iter().zip(responses) {
            let there = match response {
                TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .is_some_and(|kv| u64::try_from(kv.create_revision()).ok() == Some(lock.token)),
                _ => false,
            };
            if !there {
                let mut map = self.held();
                if map.contains_key(&lock.key) {
                    map.remove(&lock.key);
                }
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        // Revoking the lease deletes every key of the session.
        self.call(self.leases.clone().revoke(self.lease)).await?;
        Ok(())
    }
}
