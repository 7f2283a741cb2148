//! A session: an etcd lease, and the queue keys of its locks.

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
}

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

    fn my_key(&self, name: &str) -> String {
        format!("{}{:016x}", lock_prefix(name), self.lease)
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

/// Takes an acquire's key out of the queue, in the background, when the
/// acquire is dropped before it is done.
struct Leave {
    client: Client,
    key: String,
    revision: Option<i64>,
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
        let (mut client, key, revision) = (self.client.clone(), self.key.clone(), self.revision);
        runtime.spawn(async move {
            let _ = match revision {
                Some(revision) => EtcdSession::leave(&mut client, &key, revision)
                    .await
                    .map(drop),
                // Entered or not: the key is this session's, for this lock.
                None => client.delete(key, None).await.map(drop),
            };
        });
    }
}

#[async_trait]
impl StoreSession for EtcdSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let prefix = lock_prefix(&request.key);
        let me = self.my_key(&request.key);
        let mode = mode_value(request.mode);
        let mut leave = Leave {
            client: self.client.clone(),
            key: me.clone(),
            revision: None,
            armed: true,
        };
        // Join the queue (unless this session's key is there already).
        let join = Txn::new()
            .when([Compare::create_revision(me.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                me.as_str(),
                mode.as_str(),
                Some(etcd_client::PutOptions::new().with_lease(self.lease)),
            )]);
        self.call(self.client.clone().txn(join)).await?;
        loop {
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend);
            let queue = self
                .call(self.client.clone().get(prefix.as_str(), Some(options)))
                .await?;
            let read_at = queue.header().map_or(0, |header| header.revision());
            let kvs = queue.kvs();
            let Some(position) = kvs.iter().position(|kv| kv.key() == me.as_bytes()) else {
                // etcd issue 11456: the lease ended while this waited.
                leave.armed = false;
                return Err(self.lost("ended while waiting for the lock"));
            };
            let mine = &kvs[position];
            leave.revision = Some(mine.create_revision());
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
                // Granted, if the lease still lives (11456 again).
                let alive = self
                    .call(self.client.clone().lease_time_to_live(self.lease, None))
                    .await?;
                if alive.ttl() <= 0 {
                    return Err(self.lost("has run out"));
                }
                leave.armed = false;
                let token = u64::try_from(mine.create_revision()).unwrap_or(0);
                return Ok(Some(Grant::new(token)));
            };
            let Some(until) = request.wait_until else {
                return Ok(None);
            };
            if Instant::now() >= until {
                return Ok(None);
            }
            // Watch the blocker for its deletion, from the revision read, so
            // that a deletion since is seen.
            let watch_options = WatchOptions::new()
                .with_start_revision(read_at + 1)
                .with_filters([WatchFilterType::NoPut]);
            let (watched, watch_options) = match blocker {
                Blocker::Key(key) => (key, watch_options),
                Blocker::Any => (prefix.clone().into_bytes(), watch_options.with_prefix()),
            };
            let mut stream = self
                .call(self.client.clone().watch(watched, Some(watch_options)))
                .await?;
            let deleted = async {
                while let Ok(Some(message)) = stream.message().await {
                    if message
                        .events()
                        .iter()
                        .any(|event| event.event_type() == EventType::Delete)
                    {
                        return;
                    }
                }
                // The watch ended (e.g. etcd restarted): look again.
            };
            if tokio::time::timeout_at(until, deleted).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let me = self.my_key(&held.key);
        let revision = i64::try_from(held.token).unwrap_or(i64::MAX);
        if revision <= 0 {
            // No key has create revision 0: that is "absent" to etcd.
            return Err(Error::not_held(&held.key));
        }
        let mut client = self.client.clone();
        let released = self
            .call(EtcdSession::leave(&mut client, &me, revision))
            .await?;
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
        let reads: Vec<TxnOp> = held
            .iter()
            .map(|lock| TxnOp::get(self.my_key(&lock.key), None))
            .collect();
        let answer = self
            .call(self.client.clone().txn(Txn::new().and_then(reads)))
            .await?;
        let mut lost = Vec::new();
        for (lock, response) in held.iter().zip(answer.op_responses()) {
            let there = match response {
                TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .is_some_and(|kv| u64::try_from(kv.create_revision()).ok() == Some(lock.token)),
                _ => false,
            };
            if !there {
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
