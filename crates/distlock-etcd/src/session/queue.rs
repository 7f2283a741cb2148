//! An acquire in steps: join the lock's queue, decide from the keys ahead
//! (`distlock_core::store::queue`), and wait for the blocker to go.

use std::sync::Arc;

use distlock_core::store::queue::{self, Blocker, WATCH_SLICE};
use distlock_core::store::{lock, AcquireRequest, Grant};
use distlock_core::{Error, Result};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, GetResponse, KeyValue, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::time::Instant;

use super::line::{revision, Woken};
use super::{lock_prefix, EtcdSession, Leave, MAX_SLOTS};
use crate::entry::{self, queue_options};
use crate::unavailable;

/// How long a waiting acquire pauses when etcd did not answer it.
const RIDE_OUT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// What a waiter watches for deletions, and a read that tells whether the
/// wait is still needed: it must find `expected` keys.
struct Watch {
    watched: Vec<u8>,
    options: WatchOptions,
    check: GetOptions,
    expected: usize,
}

impl Watch {
    /// The blocker, or for a semaphore as many keys before `mine` as were
    /// read. (A key's create revision tells which of its lives was read: a
    /// session's keys are used again by its later attempts. And etcd counts
    /// a range before it filters it, so the keys are fetched.)
    fn of(blocker: Blocker, earlier: &[KeyValue], mine: &KeyValue, prefix: &str) -> Watch {
        let options = WatchOptions::new().with_filters([WatchFilterType::NoPut]);
        match blocker {
            Blocker::Entry(index) => {
                let created = earlier[index].create_revision();
                Watch {
                    watched: earlier[index].key().to_vec(),
                    options,
                    check: GetOptions::new()
                        .with_keys_only()
                        .with_min_create_revision(created)
                        .with_max_create_revision(created),
                    expected: 1,
                }
            }
            Blocker::AnyChange => Watch {
                watched: prefix.as_bytes().to_vec(),
                options: options.with_prefix(),
                check: GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_max_create_revision(mine.create_revision() - 1),
                expected: earlier.len(),
            },
        }
    }
}

/// Where a second watch of a wait starts, ahead of the first, created at
/// `created_at` after a read at `read_at`: etcd registers a watch "from
/// now" at the revision it read just before, and a write in between leaves
/// it to a loop that runs every 100 ms. A watch that starts where etcd has
/// not reached yet is served as writes land.
pub(super) fn ahead_of(created_at: i64, read_at: i64) -> i64 {
    created_at.saturating_add(4 + 2 * (created_at - read_at).clamp(0, 30))
}

impl EtcdSession {
    /// Joins the queue, at its tail, and reads it, in one round trip.
    pub(super) async fn acquire_in_queue(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let prefix = lock_prefix(&request.key);
        // Not tried again: a join whose answer never came may still land
        // later, and a second one would queue behind it.
        let (me, mut leave, joined) = self.join(request, &prefix).await?;
        let read_at = revision(joined.header());
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
                // The join's read (the put with the lease went through in
                // the same transaction: the lease lived when the queue was
                // read), or a wait's, which finds this key only if the
                // lease lived at that read.
                Some(read) => read,
                // This key is in the queue read only if the lease lived at
                // that read (etcd issue 11456; checked below).
                None => match self.read_queue(&prefix).await {
                    Ok(read) => read,
                    Err(err) => {
                        self.ride_out(err, request.wait_until).await?;
                        continue;
                    }
                },
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
            let tags: Vec<&str> = earlier.iter().map(|kv| entry::tag(kv.value())).collect();
            let Some(blocker) = queue::blocker(request.mode, &tags) else {
                leave.armed = false;
                return Ok(Some(self.granted(&request.key, me, mine, read_at)));
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
            let woken = match blocker {
                // Waiting for the entry just ahead.
                Blocker::Entry(index) if index + 1 == position => {
                    self.wait_in_line(&prefix, earlier, mine, read_at, until)
                        .await
                }
                _ => {
                    let watch = Watch::of(blocker, earlier, mine, &prefix);
                    self.wait(watch, read_at, until)
                        .await
                        .map(|()| Woken::Again)
                }
            };
            match woken {
                Ok(Woken::Holds(at)) => {
                    leave.armed = false;
                    return Ok(Some(self.granted(&request.key, me, mine, at)));
                }
                Ok(Woken::Read(now, now_at)) => first = Some((now, now_at)),
                Ok(Woken::Again) => {}
                Err(err) => self.ride_out(err, Some(until)).await?,
            }
        }
    }

    /// Records lock `key` as held through queue key `me` (`mine` as read),
    /// found first at revision `at`: watched from then, so a deletion since
    /// is not missed. Its token is its create revision.
    fn granted(&self, key: &str, me: String, mine: &KeyValue, at: i64) -> Grant {
        self.watch.watch(&me, at);
        let token = u64::try_from(mine.create_revision()).unwrap_or(0);
        self.held().insert(key.to_owned(), (me, token));
        Grant::new(token)
    }

    /// A waiting acquire's answer to a failed read or watch: etcd may be
    /// electing a leader, which takes seconds, so a wait goes on (after a
    /// pause) until its deadline; anything else, or a failure at the
    /// deadline, ends the acquire (its key is then taken out).
    async fn ride_out(&self, err: Error, until: Option<Instant>) -> Result<()> {
        let until = match until {
            Some(until) if crate::passing(&err) && Instant::now() < until => until,
            _ => return Err(self.failure(&err).unwrap_or(err)),
        };
        tracing::warn!("etcd did not answer a waiting acquire, asking again: {err}");
        tokio::time::sleep_until(until.min(Instant::now() + RIDE_OUT_PAUSE)).await;
        Ok(())
    }

    /// Puts a new key of this session at the queue's tail and reads the
    /// queue, in one transaction. The key must be new: one left in place (a
    /// release that failed half-way) has an old create revision, so it
    /// would jump the queue and repeat a token. Such a key is taken out
    /// first (that life of it only), and the join tried again.
    async fn join(
        &self,
        request: &AcquireRequest,
        prefix: &str,
    ) -> Result<(String, Leave, TxnResponse)> {
        // The owner goes in the put that joins: no extra round trip.
        let value = entry::value(request.mode, &self.owner);
        self.take_out_retired(prefix).await;
        let mut strays = 0;
        loop {
            let me = self.new_key(&request.key, prefix)?;
            let mut leave = Leave {
                client: self.kv.clone(),
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
                        value.as_str(),
                        Some(etcd_client::PutOptions::new().with_lease(self.lease)),
                    ),
                    TxnOp::get(prefix, Some(queue_options())),
                ])
                .or_else([TxnOp::get(me.as_str(), None)]);
            let joined = self.kv_request(|mut kv| {
                let join = join.clone();
                async move { kv.txn(join).await }
            });
            let joined = match joined.await {
                Ok(joined) => joined,
                Err(err) => return Err(self.failure(&err).unwrap_or(err)),
            };
            if joined.succeeded() {
                leave.revision = joined.header().map(|header| header.revision());
                return Ok((me, leave, joined));
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
        }
    }

    /// Takes out the lives of this lock's retired keys that may still be
    /// there (their background clean-up gave up, or is under way), by
    /// their create revisions: such a life would hold the lock, or stand
    /// in its queue, until the session ends. Left for the next join if
    /// etcd does not answer.
    async fn take_out_retired(&self, prefix: &str) {
        let lives: Vec<(String, i64)> = lock(&self.retired)
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .filter_map(|(key, life)| life.map(|revision| (key.clone(), revision)))
            .collect();
        for (key, revision) in lives {
            if self.leave_now(&key, revision).await.is_ok() {
                if let Some(life) = lock(&self.retired).get_mut(&key) {
                    *life = None;
                }
            }
        }
    }

    /// The queue, and the revision it was read at.
    async fn read_queue(&self, prefix: &str) -> Result<(GetResponse, i64)> {
        let queue = self
            .kv_request(|mut kv| async move { kv.get(prefix, Some(queue_options())).await })
            .await?;
        let read_at = revision(queue.header());
        Ok((queue, read_at))
    }

    /// The queue as read at revision `since` or later, and that revision:
    /// served by the member from what it has applied if that is far
    /// enough, else linearizable. A wait reads past its watch's start, so
    /// that the watch reports every change after the read; a grant decided
    /// from an older snapshot is as safe as one read a moment earlier
    /// (entries ahead only go; the core ends a grant that comes after the
    /// session's lease).
    pub(super) async fn read_queue_since(
        &self,
        prefix: &str,
        since: i64,
    ) -> Result<(GetResponse, i64)> {
        let local = self
            .kv_request(|mut kv| async move {
                let options = queue_options().with_serializable();
                kv.get(prefix, Some(options)).await
            })
            .await?;
        let local_at = revision(local.header());
        if local_at >= since {
            return Ok((local, local_at));
        }
        self.read_queue(prefix).await
    }

    /// Waits until what `watch` watches may have gone (or `until`, or a
    /// slice of [`WATCH_SLICE`]): then the queue is read again.
    ///
    /// The watch starts from now, not from the revision read: etcd serves a
    /// watch that starts in the past from a loop that runs every 100 ms,
    /// which would add up to 100 ms to every hand-over. A deletion between
    /// the read and the watch is found by asking once more.
    async fn wait(&self, watch: Watch, read_at: i64, until: Instant) -> Result<()> {
        let Watch {
            watched,
            options,
            check,
            expected,
        } = watch;
        let Some((mut stream, created_at)) =
            self.open_watch(watched.clone(), options.clone()).await?
        else {
            // Refused or ended at once (etcd restarting?): read again.
            return Ok(());
        };
        // A second watch starts ahead of etcd, so it is served as writes
        // land, never by the 100 ms loop (docs/0005-etcd.md).
        let ahead = options.with_start_revision(ahead_of(created_at, read_at));
        // If the stream broke, the wait below finds out.
        let _ = stream.watch(watched.clone(), Some(ahead)).await;
        if created_at > read_at {
            // The blocker may have gone between the read and the watch. This
            // read decides no grant: serializable will do (docs/0005-etcd.md).
            let mut now = self
                .kv_request(|mut kv| {
                    let (watched, check) = (watched.clone(), check.clone().with_serializable());
                    async move { kv.get(watched, Some(check)).await }
                })
                .await?;
            if now.header().map_or(0, |header| header.revision()) < created_at {
                now = self
                    .kv_request(|mut kv| {
                        let (watched, check) = (watched.clone(), check.clone());
                        async move { kv.get(watched, Some(check)).await }
                    })
                    .await?;
            }
            if now.kvs().len() < expected {
                return Ok(());
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
        Ok(())
    }
}
