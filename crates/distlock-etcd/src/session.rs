//! A session: an etcd lease, and the queue keys of its locks.

use std::collections::HashMap;
use std::future::Future;

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
    /// The queue keys of the locks held, by lock name: each attempt has a
    /// key of its own, so that nothing left of one attempt is ever taken
    /// for another.
    held: std::sync::Mutex<HashMap<String, String>>,
}

/// The most operations etcd takes in one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// The longest one watch is trusted before the queue is read again (a
/// member cut off from its cluster may keep a watch open and silent).
const WATCH_SLICE: std::time::Duration = std::time::Duration::from_secs(5);

/// What blocks a waiter: one key (its predecessor, or the last earlier
/// writer), or, for a semaphore, any of the lock's keys.
enum Blocker {
    Key(Vec<u8>),
    Any,
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
            held: std::sync::Mutex::new(HashMap::new()),
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

    /// A new queue key for an attempt on lock `name`: the session's lease
    /// and a nonce.
    fn new_key(&self, name: &str) -> String {
        format!(
            "{}{:016x}-{:016x}",
            lock_prefix(name),
            self.lease,
            rand::random::<u64>()
        )
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
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
}

/// Takes an attempt's key out of the queue, in the background, when the
/// attempt is dropped or fails before it is done. The key is the attempt's
/// own, so deleting it by name touches nothing else; a failed delete is
/// tried again for a while (etcd may be restarting), and the key goes with
/// the lease in any case.
struct Leave {
    client: Client,
    key: String,
    armed: bool,
}

impl Drop for Leave {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (mut client, key) = (self.client.clone(), std::mem::take(&mut self.key));
        runtime.spawn(async move {
            for attempt in 0..30u64 {
                let deleted = tokio::time::timeout(CALL_TIMEOUT, client.delete(key.as_str(), None));
                if matches!(deleted.await, Ok(Ok(_))) {
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
        let me = self.new_key(&request.key);
        let mode = mode_value(request.mode);
        let mut leave = Leave {
            client: self.client.clone(),
            key: me.clone(),
            armed: true,
        };
        let queue_options = || {
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
        };
        // Join the queue, at its tail, and read it, in one round trip.
        let join = Txn::new().and_then([
            TxnOp::put(
                me.as_str(),
                mode.as_str(),
                Some(etcd_client::PutOptions::new().with_lease(self.lease)),
            ),
            TxnOp::get(prefix.as_str(), Some(queue_options())),
        ]);
        let joined = match self.call(self.client.clone().txn(join)).await {
            Ok(joined) => joined,
            Err(err) => return Err(self.failure(&err).unwrap_or(err)),
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
                    // The queue, and beside it (so that a grant costs no
                    // further round trip) whether the lease still lives:
                    // etcd issue 11456.
                    let (mut kv, mut lease) = (self.client.clone(), self.client.clone());
                    let (queue, alive) = tokio::try_join!(
                        self.call(kv.get(prefix.as_str(), Some(queue_options()))),
                        self.call(lease.lease_time_to_live(self.lease, None)),
                    )?;
                    if alive.ttl() <= 0 {
                        leave.armed = false;
                        return Err(self.lost("ran out while it waited"));
                    }
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
                Mode::Exclusive => earlier.last().map(|kv| Blocker::Key(kv.key().to_vec())),
                Mode::Shared => earlier
                    .iter()
                    .rev()
                    .find(|kv| kv.value() != b"s")
                    .map(|kv| Blocker::Key(kv.key().to_vec())),
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
            let Some(until) = request.wait_until else {
                leave.armed = false;
                self.call(self.client.clone().delete(me.as_str(), None))
                    .await?;
                return Ok(None);
            };
            if Instant::now() >= until {
                leave.armed = false;
                self.call(self.client.clone().delete(me.as_str(), None))
                    .await?;
                return Ok(None);
            }
            // Watch the blocker for its deletion from now, not from the
            // revision read: etcd serves a watch that starts in the past
            // from a loop that runs every 100 ms, which would add up to
            // 100 ms to every hand-over. A deletion between the read and
            // the watch is found by asking once more (below).
            let mut watch_options = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
            // What is watched, and how many keys the check below must still
            // find there for the wait to be needed: the blocker, or for a
            // semaphore as many keys before this one as were read.
            let (watched, check, expected) = match blocker {
                Blocker::Key(key) => (key, GetOptions::new(), 1),
                Blocker::Any => {
                    watch_options = watch_options.with_prefix();
                    let before_me = GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(mine.create_revision() - 1);
                    let expected = i64::try_from(earlier.len()).unwrap_or(i64::MAX);
                    (prefix.clone().into_bytes(), before_me, expected)
                }
            };
            let mut stream = self
                .call(
                    self.client
                        .clone()
                        .watch(watched.clone(), Some(watch_options)),
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
            if created_at > read_at {
                // The queue changed between the read and the watch: the
                // blocker may have gone in between.
                let now = self
                    .call(
                        self.client
                            .clone()
                            .get(watched, Some(check.with_count_only())),
                    )
                    .await?;
                if now.count() < expected {
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
        let mut client = self.client.clone();
        let released = self
            .call(EtcdSession::leave(&mut client, &me, revision))
            .await?;
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
