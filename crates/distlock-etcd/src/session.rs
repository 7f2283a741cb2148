//! A session: an etcd lease, and the queue keys of its locks.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, Mode, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use tokio::time::Instant;

use crate::{timed_out, unavailable, CALL_TIMEOUT, PREFIX};

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
    client: Client,
    endpoints: String,
    lease: i64,
    keeper: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
    /// The queue keys of the locks held, by lock name.
    held: Mutex<HashMap<String, String>>,
    /// Queue keys whose deletion in the background is still under way (an
    /// attempt dropped or failed half-way): no attempt uses them until they
    /// are gone.
    leaving: Arc<Mutex<HashSet<String>>>,
}

/// The most operations etcd takes in one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// The longest one watch is trusted before the queue is read again (a
/// member cut off from its cluster may keep a watch open and silent).
const WATCH_SLICE: std::time::Duration = std::time::Duration::from_secs(5);

/// The most keys one session may have in one lock's queue at once: its
/// attempt's, and those of earlier attempts whose deletion is under way.
const MAX_SLOTS: usize = 16;

/// What blocks a waiter: one key (its predecessor, or the last earlier
/// writer), or, for a semaphore, any of the lock's keys.
enum Blocker {
    /// A key, and its create revision.
    Key(Vec<u8>, i64),
    Any,
}

impl Blocker {
    fn key(kv: &etcd_client::KeyValue) -> Blocker {
        Blocker::Key(kv.key().to_vec(), kv.create_revision())
    }
}

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
            client,
            endpoints,
            lease: 0,
            keeper: tokio::sync::Mutex::new(None),
            held: Mutex::new(HashMap::new()),
            leaving: Arc::new(Mutex::new(HashSet::new())),
        };
        let granted = session
            .call(session.client.clone().lease_grant(ttl, None))
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
    fn new_key(&self, name: &str) -> Result<String> {
        let leaving = lock(&self.leaving);
        (0..MAX_SLOTS)
            .map(|slot| format!("{}{:016x}-{slot}", lock_prefix(name), self.lease))
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
        client: &mut Client,
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
        let mut client = self.client.clone();
        self.call(EtcdSession::leave(&mut client, key, revision))
            .await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes `key` out of its queue if it is still the life of it created at
/// `revision`; when that is not known (a join whose answer never came),
/// whatever life of it is there now. Done either way once the call went
/// through. Never a delete by name alone: keys are used again, and a
/// delete that lands late must not take a later attempt's key.
async fn take_out(
    client: &mut Client,
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
    client: Client,
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
        let (mut client, key) = (self.client.clone(), std::mem::take(&mut self.key));
        lock(&self.leaving).insert(key.clone());
        let (leaving, revision) = (Arc::clone(&self.leaving), self.revision);
        runtime.spawn(async move {
            for attempt in 0..30u64 {
                let deleted =
                    tokio::time::timeout(CALL_TIMEOUT, take_out(&mut client, &key, revision));
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
        let mode = mode_value(request.mode);
        let queue_options = || {
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
        };
        // Join the queue, at its tail, and read it, in one round trip. The
        // key must be new: one left in place (a release that failed half-way)
        // has an old create revision, so it would jump the queue and repeat a
        // token. Such a key is taken out first (that life of it only), and
        // the join tried again.
        let mut strays = 0;
        let (me, mut leave, joined) = loop {
            let me = self.new_key(&request.key)?;
            let mut leave = Leave {
                client: self.client.clone(),
                key: me.clone(),
                revision: None,
                leaving: Arc::clone(&self.leaving),
                armed: true,
            };
            let join = Txn::new()
                .when([Compare::create_revision(me.as_str(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        me.as_str(),
                        mode.as_str(),
                        Some(etcd_client::PutOptions::new().with_lease(self.lease)),
                    ),
                    TxnOp::get(prefix.as_str(), Some(queue_options())),
                ])
                .or_else([TxnOp::get(me.as_str(), None)]);
            let joined = match self.call(self.client.clone().txn(join)).await {
                Ok(joined) => joined,
                Err(err) => return Err(self.failure(&err).unwrap_or(err)),
            };
            if joined.succeeded() {
                leave.revision = joined.header().map(|header| header.revision());
                break (me, leave, joined);
            }
            leave.revision = joined
                .op_responses()
                .into_iter()
                .find_map(|found| match found {
                    TxnOpResponse::Get(found) => found.kvs().first().map(|kv| kv.create_revision()),
                    _ => None,
                });
            strays += 1;
            if strays > MAX_SLOTS {
                // Something puts the key back as fast as it goes.
                return Err(unavailable(
                    &self.endpoints,
                    &format!(
                        "this session's key of lock '{}' keeps coming back",
                        request.key
                    ),
                ));
            }
            if let Some(revision) = leave.revision {
                self.leave_now(&me, revision).await?;
            }
            leave.armed = false;
        };
        let read_at = joined.header().map_or(0, |header| header.revision());
        let mut first = joined
            .op_responses()
            .into_iter()
            .find_map(|response| match response {
                TxnOpResponse::Get(queue) => Some(queue),
                _ => None,
            })
            .map(|queue| (queue, read_at));
        loop {
            let (queue, read_at) = match first.take() {
                // The put with the lease went through in the same
                // transaction: the lease lived when the queue was read.
                Some(read) => read,
                None => {
                    // This key is in the queue read only if the lease lived
                    // at that read (etcd issue 11456; checked below).
                    let queue = self
                        .call(
                            self.client
                                .clone()
                                .get(prefix.as_str(), Some(queue_options())),
                        )
                        .await?;
                    let read_at = queue.header().map_or(0, |header| header.revision());
                    (queue, read_at)
                }
            };
            let kvs = queue.kvs();
            let Some(position) = kvs.iter().position(|kv| kv.key() == me.as_bytes()) else {
                // etcd issue 11456: the lease ended while this waited (or the
                // key was deleted from outside).
                leave.armed = false;
                return Err(self.lost("ended, or its queue key was deleted, while it waited"));
            };
            let mine = &kvs[position];
            let earlier = &kvs[..position];
            let blocker = match request.mode {
                Mode::Exclusive => earlier.last().map(Blocker::key),
                Mode::Shared => earlier
                    .iter()
                    .rev()
                    .find(|kv| kv.value() != b"s")
                    .map(Blocker::key),
                Mode::Semaphore { permits } => {
                    let fits = earlier.len() < permits as usize
                        && earlier.iter().all(|kv| kv.value() == mode.as_bytes());
                    (!fits).then_some(Blocker::Any)
                }
            };
            let Some(blocker) = blocker else {
                leave.armed = false;
                self.held().insert(request.key.clone(), me);
                let token = u64::try_from(mine.create_revision()).unwrap_or(0);
                return Ok(Some(Grant::new(token)));
            };
            let until = match request.wait_until {
                Some(until) if Instant::now() < until => until,
                // Busy, and no (more) waiting: out of the queue. If that
                // fails, the key is taken out in the background.
                _ => {
                    self.leave_now(&me, mine.create_revision()).await?;
                    leave.armed = false;
                    return Ok(None);
                }
            };
            // Watch the blocker for its deletion from now, not from the
            // revision read: etcd serves a watch that starts in the past
            // from a loop that runs every 100 ms, which would add up to
            // 100 ms to every hand-over. A deletion between the read and
            // the watch is found by asking once more (below).
            let mut watch_options = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
            // What is watched, and how many keys the check below must still
            // find there for the wait to be needed: the blocker, or for a
            // semaphore as many keys before this one as were read.
            // (A key's create revision tells which of its lives was read: a
            // session's keys are used again by its later attempts. And etcd
            // counts a range before it filters it, so the keys are fetched.)
            let (watched, check, expected) = match blocker {
                Blocker::Key(key, created) => {
                    let that_one = GetOptions::new()
                        .with_keys_only()
                        .with_min_create_revision(created)
                        .with_max_create_revision(created);
                    (key, that_one, 1)
                }
                Blocker::Any => {
                    watch_options = watch_options.with_prefix();
                    let before_me = GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_max_create_revision(mine.create_revision() - 1);
                    (prefix.clone().into_bytes(), before_me, earlier.len())
                }
            };
            let mut stream = self
                .call(
                    self.client
                        .clone()
                        .watch(watched.clone(), Some(watch_options.clone())),
                )
                .await?;
            let created_at = match self.call(stream.message()).await {
                Ok(Some(created)) if !created.canceled() => created
                    .header()
                    .map_or(i64::MAX, |header| header.revision()),
                // Refused or ended at once (etcd restarting?): not at once
                // again, then read again.
                _ => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            // etcd starts a watch "from now" at the revision it read just
            // before it registers the watch; a write landing in between
            // leaves the watch behind, to be served by the same 100 ms loop.
            // Under load that is about one watch in fifty, and when it is the
            // next holder's, the whole queue stalls behind it. So a second
            // watch of the key, on the same stream, starts a few revisions
            // ahead: far enough that etcd has not reached that revision when
            // it registers the watch, so the watch is served as writes land.
            // The first watch covers the revisions in between.
            let ahead = 4 + 2 * (created_at - read_at).clamp(0, 30);
            let ahead = watch_options.with_start_revision(created_at.saturating_add(ahead));
            // If the stream broke, the wait below finds out.
            let _ = stream.watch(watched.clone(), Some(ahead)).await;
            if created_at > read_at {
                // The queue changed between the read and the watch: the
                // blocker may have gone in between. This read decides no
                // grant; it need only see past the watch's start, so the
                // member answers from what it has applied when that is far
                // enough, without a round of consensus.
                let mut now = self
                    .call(
                        self.client
                            .clone()
                            .get(watched.clone(), Some(check.clone().with_serializable())),
                    )
                    .await?;
                if now.header().map_or(0, |header| header.revision()) < created_at {
                    now = self
                        .call(self.client.clone().get(watched.clone(), Some(check)))
                        .await?;
                }
                if now.kvs().len() < expected {
                    continue;
                }
            }
            let deleted = async {
                while let Ok(Some(message)) = stream.message().await {
                    if message.canceled() {
                        return;
                    }
                    if message
                        .events()
                        .iter()
                        .any(|event| event.event_type() == EventType::Delete)
                    {
                        return;
                    }
                }
                // The watch ended (etcd restarting?): not at once again.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            // In slices: a silent watch is read past, not trusted forever.
            let slice_end = until.min(Instant::now() + WATCH_SLICE);
            let _ = tokio::time::timeout_at(slice_end, deleted).await;
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
        let released = self.leave_now(&me, revision).await?;
        {
            let mut map = self.held();
            if map.get(&held.key) == Some(&me) {
                map.remove(&held.key);
            }
        }
        if released {
            Ok(())
        } else {
            Err(Error::not_held(&held.key))
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        let ttl = {
            let mut keeper = self.keeper.lock().await;
            if keeper.is_none() {
                *keeper = Some(
                    self.call(self.client.clone().lease_keep_alive(self.lease))
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
                .call(self.client.clone().txn(Txn::new().and_then(reads)))
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
        self.call(self.client.clone().lease_revoke(self.lease))
            .await?;
        Ok(())
    }
}
