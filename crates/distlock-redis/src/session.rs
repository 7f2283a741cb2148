//! A session: an id, the locks it holds, and the Redlock rules for each
//! call (a majority of the instances, within the validity time).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::{
    AcquireRequest, Grant, HeldLock, Mode, RenewReport, SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::instance::{Attempt, Instance};
use crate::scripts::LockKeys;
use crate::Shared;

/// A lock this session holds.
struct Held {
    token: u64,
    /// How the hold is written in Redis.
    member: String,
}

pub(crate) struct RedisSession {
    shared: Arc<Shared>,
    id: String,
    ttl: Duration,
    lock_delay: Duration,
    /// The locks held, by key: their tokens and how they are written.
    held: Mutex<HashMap<String, Held>>,
}

impl RedisSession {
    pub(crate) fn new(shared: Arc<Shared>, options: &SessionOptions) -> Self {
        RedisSession {
            shared,
            id: format!("{:032x}", rand::random::<u128>()),
            ttl: options.ttl,
            lock_delay: options.lock_delay,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets `lock`, if this session still knows it by that token.
    fn forget(&self, lock: &HeldLock) {
        let mut held = self.held();
        if held
            .get(&lock.key)
            .is_some_and(|held| held.token == lock.token)
        {
            held.remove(&lock.key);
        }
    }

    /// How a new hold of this session is written in Redis: its id, a nonce
    /// of this grant, and its lock-delay.
    fn new_member(&self) -> String {
        format!(
            "{}|{:016x}|{}",
            self.id,
            rand::random::<u64>(),
            self.lock_delay.as_millis()
        )
    }

    /// How the hold of `lock` is written, if this session holds it.
    fn member_of(&self, lock: &HeldLock) -> Option<String> {
        self.held()
            .get(&lock.key)
            .filter(|held| held.token == lock.token)
            .map(|held| held.member.clone())
    }

    /// The margin kept for clock drift between client and Redis: as in the
    /// Redlock algorithm, 1% of the TTL plus 2 ms.
    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }

    fn keys(&self, key: &str) -> LockKeys {
        LockKeys::new(crate::KEY_PREFIX, key)
    }

    fn instances(&self) -> &[Instance] {
        &self.shared.instances
    }

    /// "Only 1 of 3 Redis instances answered (2 needed): …".
    fn unavailable(&self, answered: usize, failures: &[String]) -> Error {
        let total = self.instances().len();
        let message = if total == 1 {
            format!(
                "cannot reach Redis at {}; check that redis-server runs there",
                failures.join("; ")
            )
        } else {
            format!(
                "only {answered} of {total} Redis instances answered ({} needed): {}",
                self.shared.quorum,
                failures.join("; ")
            )
        };
        Error::new(ErrorKind::Unavailable, message)
    }

    /// Takes back the holds an acquire made (`members`, one per try) and
    /// its place among the waiting writers, on every instance.
    async fn abandon(
        shared: &Shared,
        keys: &LockKeys,
        session: &str,
        publish: bool,
        members: &[String],
    ) {
        join_all(
            shared
                .instances
                .iter()
                .map(|instance| instance.abandon(keys, session, publish, members)),
        )
        .await;
    }

    /// Releases the hold written `member` on every instance; how many did
    /// hold it, and the instances that failed.
    async fn release_everywhere(&self, keys: &LockKeys, member: &str) -> (usize, Vec<String>) {
        let results = join_all(
            self.instances()
                .iter()
                .map(|instance| instance.release(keys, member)),
        )
        .await;
        let mut released = 0;
        let mut failures = Vec::new();
        for (instance, result) in self.instances().iter().zip(results) {
            match result {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(err) => failures.push(format!("{}: {err}", instance.name)),
            }
        }
        (released, failures)
    }
}

/// Takes back, in the background, what an acquire dropped half-way may
/// have left: a hold whose answer never came, or its place among the
/// waiting writers. Only that acquire's own holds (by nonce): a later
/// acquire of the session is never touched.
struct Cleanup<'a> {
    session: &'a RedisSession,
    key: &'a str,
    /// The holds this acquire may have made, one per try.
    members: Vec<String>,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = Arc::clone(&self.session.shared);
        let keys = self.session.keys(self.key);
        let id = self.session.id.clone();
        let members = std::mem::take(&mut self.members);
        runtime.spawn(async move {
            RedisSession::abandon(&shared, &keys, &id, true, &members).await;
        });
    }
}

fn mode_args(mode: Mode) -> (&'static str, u32) {
    match mode {
        Mode::Exclusive => ("x", 0),
        Mode::Shared => ("s", 0),
        Mode::Semaphore { permits } => ("p", permits),
    }
}

#[async_trait]
impl StoreSession for RedisSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let keys = self.keys(&request.key);
        let (mode, permits) = mode_args(request.mode);
        let waits = request.wait_until.is_some();
        let quorum = self.shared.quorum;
        let mut cleanup = Cleanup {
            session: self,
            key: &request.key,
            members: Vec::new(),
            armed: true,
        };
        // The release channels are watched from the first try that finds
        // the key busy on, and that try is made again at once, so that no
        // release between a try and the sleep after it goes unseen.
        let mut watches: Vec<crate::wake::Watch> = Vec::new();
        let mut watching = false;
        loop {
            let member = self.new_member();
            cleanup.members.push(member.clone());
            let mut woken: Vec<Pin<Box<Notified<'_>>>> = watches
                .iter()
                .map(|watch| {
                    let mut notified = Box::pin(watch.notify().notified());
                    notified.as_mut().enable();
                    notified
                })
                .collect();
            let sent = Instant::now();
            // No answer is worth waiting for past the validity time.
            let limit = self.ttl.saturating_sub(self.drift());
            let results = join_all(self.instances().iter().map(|instance| {
                instance.acquire(
                    &keys,
                    &self.id,
                    mode,
                    permits,
                    self.ttl,
                    self.lock_delay,
                    waits,
                    &member,
                    limit,
                )
            }))
            .await;
            let mut granted = Vec::new();
            let mut busy = 0;
            let mut counters = Vec::new();
            let mut retry: Option<Duration> = None;
            let mut conflict = None;
            let mut failures = Vec::new();
            for (instance, result) in self.instances().iter().zip(results) {
                match result {
                    Ok(Attempt::Granted(token)) => granted.push(token),
                    Ok(Attempt::Busy(after, counter)) => {
                        busy += 1;
                        counters.push(counter);
                        retry = Some(retry.map_or(after, |r| r.min(after)));
                    }
                    Ok(Attempt::Conflict(message)) => conflict = Some(message),
                    Err(err) => failures.push(format!("{}: {err}", instance.name)),
                }
            }
            let valid = |from: Instant| from.elapsed() + self.drift() < self.ttl;
            let mut late = false;
            if granted.len() >= quorum {
                // The quorum register: the highest count of every instance
                // that answered (a majority at least, which meets the
                // majority that saw the last token), written back to a
                // majority before it is used.
                let token = granted.iter().chain(&counters).copied().max().unwrap_or(0);
                let raised = if self.instances().len() > 1 {
                    join_all(self.instances().iter().map(|i| i.raise(&keys, token)))
                        .await
                        .iter()
                        .filter(|raised| raised.is_ok())
                        .count()
                } else {
                    quorum
                };
                if raised >= quorum && valid(sent) {
                    cleanup.armed = false;
                    self.held()
                        .insert(request.key.clone(), Held { token, member });
                    return Ok(Some(Grant::new(token).with_lease_from(sent)));
                }
                late = raised >= quorum;
            }
            // Not ours: take back what some instances granted (quietly:
            // nobody waits on a hold this short) and any answer that never
            // came.
            if !granted.is_empty() || !failures.is_empty() {
                RedisSession::abandon(&self.shared, &keys, &self.id, false, &cleanup.members).await;
                cleanup.members.clear();
            }
            if let Some(message) = conflict {
                cleanup.armed = false;
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("cannot lock '{}' as asked: {message}", request.key),
                ));
            }
            let answered = self.instances().len() - failures.len();
            if answered < quorum {
                return Err(self.unavailable(answered, &failures));
            }
            if late {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "Redis granted '{}' but took longer than the lease to; the instances \
                         are too slow for a TTL of {:?}",
                        request.key, self.ttl
                    ),
                ));
            }
            let Some(until) = request.wait_until else {
                cleanup.armed = !failures.is_empty();
                return Ok(None);
            };
            let now = Instant::now();
            if now >= until {
                // Leave the waiting writers, and tell the readers behind.
                cleanup.armed = false;
                RedisSession::abandon(&self.shared, &keys, &self.id, false, &[]).await;
                return Ok(None);
            }
            if !watching {
                drop(woken);
                watching = true;
                watches = join_all(
                    self.instances()
                        .iter()
                        .map(|instance| instance.watch(&keys)),
                )
                .await
                .into_iter()
                .filter_map(|watch| watch.ok())
                .collect();
                continue;
            }
            for instance in self.instances() {
                // A subscriber connection that broke is made again.
                instance.rewatch(&keys).await;
            }
            let pause = retry.unwrap_or(self.ttl).min(self.ttl / 2).min(until - now);
            if busy < quorum {
                // Nobody holds a majority: a split vote among contenders, or
                // instances just back. Try again after a random pause, so
                // that contenders do not split again.
                let jitter = Duration::from_millis(rand::random_range(1..=50));
                tokio::time::sleep(pause.min(jitter)).await;
            } else if woken.is_empty() {
                tokio::time::sleep(pause).await;
            } else {
                let _ =
                    tokio::time::timeout(pause, futures::future::select_all(woken.drain(..))).await;
            }
        }
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        let keys = self.keys(&lock.key);
        let Some(member) = self.member_of(lock) else {
            return Err(Error::not_held(&lock.key));
        };
        let (released, failures) = self.release_everywhere(&keys, &member).await;
        {
            let mut held = self.held();
            if held
                .get(&lock.key)
                .is_some_and(|held| held.token == lock.token)
            {
                held.remove(&lock.key);
            }
        }
        if released > 0 {
            return Ok(());
        }
        if failures.len() == self.instances().len() {
            return Err(self.unavailable(0, &failures));
        }
        Err(Error::not_held(&lock.key))
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        if held.is_empty() {
            // A session is nothing in Redis until it holds a lock.
            return Ok(RenewReport::all_held());
        }
        let keys: Vec<LockKeys> = held.iter().map(|lock| self.keys(&lock.key)).collect();
        // A lock this session does not know as held is renewed nowhere
        // (and so reported lost).
        let members: Vec<(&LockKeys, String, Duration)> = held
            .iter()
            .zip(&keys)
            .map(|(lock, keys)| {
                let member = self.member_of(lock).unwrap_or_default();
                (keys, member, self.lock_delay)
            })
            .collect();
        let sent = Instant::now();
        let results = join_all(
            self.instances()
                .iter()
                .map(|instance| instance.renew(self.ttl, &members)),
        )
        .await;
        let mut kept = vec![0usize; held.len()];
        let mut failures = Vec::new();
        for (instance, result) in self.instances().iter().zip(results) {
            match result {
                Ok(flags) => {
                    for (count, flag) in kept.iter_mut().zip(flags) {
                        *count += usize::from(flag);
                    }
                }
                Err(err) => failures.push(format!("{}: {err}", instance.name)),
            }
        }
        let answered = self.instances().len() - failures.len();
        if answered < self.shared.quorum {
            return Err(self.unavailable(answered, &failures));
        }
        if sent.elapsed() + self.drift() >= self.ttl {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "renewing took longer than the lease; the locks are not counted as renewed",
            ));
        }
        let quorum = self.shared.quorum;
        if kept
            .iter()
            .any(|count| *count < quorum && count + failures.len() >= quorum)
        {
            // The instances that did not answer may still hold it: not
            // renewed, not lost either; the core asks again.
            return Err(self.unavailable(answered, &failures));
        }
        let mut lost = Vec::new();
        for (lock, count) in held.iter().zip(kept) {
            if count < quorum {
                self.forget(lock);
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        let held: Vec<(String, Held)> = self.held().drain().collect();
        for (key, held) in held {
            self.release_everywhere(&self.keys(&key), &held.member)
                .await;
        }
        Ok(())
    }
}
