//! A session: an id, the locks it holds, and the Redlock rules for each
//! call (a majority of the instances, within the validity time).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use distlock_core::store::lock;
use distlock_core::store::{
    spawn_cleanup, AcquireRequest, ContendedKeys, Grant, HeldLock, Mode, RenewReport,
    SessionOptions, StoreSession,
};
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::instance::{AcquireCall, Failures, Instance};
use crate::owner::{Owner, OwnerWrite};
use crate::scripts::LockKeys;
use crate::Shared;

mod queue;
mod release;

/// A lock this session holds.
struct Held {
    token: u64,
    /// How the hold is written in Redis.
    member: String,
    keys: Arc<LockKeys>,
}

pub(crate) struct RedisSession {
    shared: Arc<Shared>,
    /// `ID|`, the start of every member of this session.
    prefix: String,
    /// The keys of the lock acquired last: a session that takes one key
    /// again and again names it once.
    last_keys: Mutex<Option<Arc<LockKeys>>>,
    ttl: Duration,
    lock_delay: Duration,
    /// The locks held, by key: their tokens and how they are written.
    held: Mutex<HashMap<String, Held>>,
    /// Keys whose last acquire found them taken: the next one goes
    /// straight to the queue, without the fast path's try.
    contended: ContendedKeys,
    /// Who the session is, written beside its holds for `status`.
    owner: Owner,
}

impl RedisSession {
    pub(crate) fn new(shared: Arc<Shared>, options: &SessionOptions) -> Self {
        let id = format!("{:032x}", rand::random::<u128>());
        RedisSession {
            shared,
            prefix: format!("{id}|"),
            last_keys: Mutex::new(None),
            ttl: options.ttl,
            lock_delay: options.lock_delay,
            held: Mutex::new(HashMap::new()),
            contended: ContendedKeys::default(),
            owner: Owner::new(&id, &options.owner, options.ttl),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        lock(&self.held)
    }

    /// Forgets `lock`, if this session still knows it by that token.
    fn forget(&self, lock: &HeldLock) -> Option<Held> {
        let mut held = self.held();
        if held
            .get(&lock.key)
            .is_some_and(|held| held.token == lock.token)
        {
            return held.remove(&lock.key);
        }
        None
    }

    /// How a new acquire of this session is written in Redis: its id, a
    /// nonce of this acquire, and its lock-delay.
    fn new_member(&self) -> String {
        use std::fmt::Write;
        let mut member = String::with_capacity(self.prefix.len() + 24);
        member.push_str(&self.prefix);
        let _ = write!(
            member,
            "{:016x}|{}",
            rand::random::<u64>(),
            self.lock_delay.as_millis()
        );
        member
    }

    /// How the hold of `lock` is written, if this session holds it.
    fn member_of(&self, lock: &HeldLock) -> Option<(String, Arc<LockKeys>)> {
        self.held()
            .get(&lock.key)
            .filter(|held| held.token == lock.token)
            .map(|held| (held.member.clone(), Arc::clone(&held.keys)))
    }

    /// Records a grant and hands it to the core.
    fn granted(
        &self,
        key: &str,
        token: u64,
        member: String,
        keys: Arc<LockKeys>,
        lease_from: Instant,
    ) -> Grant {
        self.held().insert(
            key.to_owned(),
            Held {
                token,
                member,
                keys,
            },
        );
        Grant::new(token).with_lease_from(lease_from)
    }

    /// The margin kept for clock drift between client and Redis: as in the
    /// Redlock algorithm, 1% of the TTL plus 2 ms.
    fn drift(&self) -> Duration {
        self.ttl / 100 + Duration::from_millis(2)
    }

    /// Whether a lease that started when a request was sent at `from` is
    /// still valid (Redlock's validity time).
    fn valid(&self, from: Instant) -> bool {
        from.elapsed() + self.drift() < self.ttl
    }

    fn keys(&self, key: &str) -> Arc<LockKeys> {
        let mut last = lock(&self.last_keys);
        match last.as_ref() {
            Some(keys) if keys.key == key => Arc::clone(keys),
            _ => {
                let keys = Arc::new(LockKeys::new(crate::KEY_PREFIX, key));
                *last = Some(Arc::clone(&keys));
                keys
            }
        }
    }

    fn instances(&self) -> &[Instance] {
        &self.shared.instances
    }

    fn quorum(&self) -> usize {
        self.shared.quorum
    }

    /// "Only 1 of 3 Redis instances answered (2 needed): …".
    fn unavailable(&self, answered: usize, failures: &Failures) -> Error {
        let total = self.instances().len();
        let message = if total == 1 {
            failures.on_single("check that redis-server runs there", "")
        } else {
            format!(
                "only {answered} of {total} Redis instances answered ({} needed): {failures}",
                self.quorum(),
            )
        };
        failures.source_of(Error::new(ErrorKind::Unavailable, message))
    }

    /// Takes back what the acquire of `members` made, on every instance.
    async fn abandon(shared: &Shared, keys: &LockKeys, members: &[String]) {
        join_all(
            shared
                .instances
                .iter()
                .map(|instance| instance.abandon(keys, members)),
        )
        .await;
    }

    /// The token of a grant by a majority that answered `tokens`: the
    /// quorum register's read (the highest of them). Where the majority
    /// disagrees, the lower ones are raised to it first, so that a majority
    /// holds a counter at least this high: any later majority meets it, and
    /// every later token is above this one. `None` if too few could be
    /// raised.
    async fn settle_token(&self, keys: &LockKeys, tokens: &[(usize, u64)]) -> Option<u64> {
        let token = tokens.iter().map(|(_, token)| *token).max()?;
        let behind: Vec<usize> = tokens
            .iter()
            .filter(|(_, t)| *t < token)
            .map(|(index, _)| *index)
            .collect();
        if behind.is_empty() {
            return Some(token);
        }
        let raised = join_all(
            behind
                .iter()
                .map(|&index| self.instances()[index].raise(keys, token)),
        )
        .await
        .iter()
        .filter(|raised| raised.is_ok())
        .count();
        (tokens.len() - behind.len() + raised >= self.quorum()).then_some(token)
    }

    /// The fast path of an exclusive acquire: the key taken with `SET NX`
    /// on every instance at once, decided as soon as a majority granted it.
    /// `Ok(None)` if it was not free (held, queued for, or split); what a
    /// minority granted is taken back first.
    async fn acquire_fast(
        &self,
        request: &AcquireRequest,
        keys: &Arc<LockKeys>,
        member: &str,
    ) -> Result<Option<Grant>> {
        let sent = Instant::now();
        let limit = self.ttl.saturating_sub(self.drift());
        let hold_for = self.ttl + self.lock_delay;
        let owner_write = self.owner.due();
        let owner = owner_write.as_ref().map(OwnerWrite::command);
        let mut granted = Vec::new();
        let mut failures = Failures::default();
        let mut tally = |index: usize, result: redis::RedisResult<Option<u64>>| match result {
            Ok(Some(token)) => granted.push((index, token)),
            Ok(None) => {}
            Err(err) => failures.push(&self.instances()[index], err),
        };
        if let [single] = self.instances() {
            let answer = single
                .fast_acquire(keys, member, hold_for, limit, owner)
                .await;
            tally(0, answer);
        } else {
            // Decided as soon as a majority granted: the others' answers
            // change nothing (a late grant there is released with the rest).
            let mut calls: FuturesUnordered<_> = self
                .instances()
                .iter()
                .enumerate()
                .map(|(index, instance)| async move {
                    (
                        index,
                        instance
                            .fast_acquire(keys, member, hold_for, limit, owner)
                            .await,
                    )
                })
                .collect();
            let quorum = self.quorum();
            let mut grants = 0;
            while let Some((index, result)) = calls.next().await {
                grants += usize::from(matches!(result, Ok(Some(_))));
                tally(index, result);
                if grants >= quorum {
                    break;
                }
            }
        }
        if let Some(write) = owner_write {
            write.finish(failures.len() > 0);
        }
        let mut settled = None;
        if granted.len() >= self.quorum() {
            settled = self.settle_token(keys, &granted).await;
            if let Some(token) = settled.filter(|_| self.valid(sent)) {
                let grant = self.granted(
                    &request.key,
                    token,
                    member.to_owned(),
                    Arc::clone(keys),
                    sent,
                );
                return Ok(Some(grant));
            }
        }
        let answered = self.instances().len() - failures.len();
        if !granted.is_empty() || answered < self.instances().len() {
            RedisSession::abandon(&self.shared, keys, &[member.to_owned()]).await;
        }
        if answered < self.quorum() {
            return Err(self.unavailable(answered, &failures));
        }
        if granted.len() >= self.quorum() {
            let why = match settled {
                Some(_) => format!(
                    "took longer than the lease to; the instances are too slow for a TTL of {:?}",
                    self.ttl
                ),
                None => "its token could not be written to a majority".to_owned(),
            };
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("Redis granted '{}' but {why}; ask again", request.key),
            ));
        }
        Ok(None)
    }
}

/// Takes back, in the background, what an acquire dropped half-way may
/// have left: a hold whose answer never came, or its place in a queue.
/// Only that acquire's own (by member): a later acquire of the session is
/// never touched.
struct Cleanup<'a> {
    shared: &'a Arc<Shared>,
    keys: &'a Arc<LockKeys>,
    member: &'a str,
    /// The members the acquire joined as after `member` (Redlock's
    /// rounds).
    more: Vec<String>,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let shared = Arc::clone(self.shared);
        let keys = Arc::clone(self.keys);
        let mut members = std::mem::take(&mut self.more);
        members.push(self.member.to_owned());
        spawn_cleanup(async move {
            RedisSession::abandon(&shared, &keys, &members).await;
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
        let member = self.new_member();
        let mut cleanup = Cleanup {
            shared: &self.shared,
            keys: &keys,
            member: &member,
            more: Vec::new(),
            armed: true,
        };
        let contended = self.contended.contains(&request.key);
        if request.mode == Mode::Exclusive && !contended {
            let fast = self.acquire_fast(request, &keys, &member).await;
            if !matches!(fast, Ok(None)) {
                // Granted, or failed with what it made taken back.
                cleanup.armed = false;
                return fast;
            }
            self.contended.record(&request.key, true);
        }
        // Redlock joins as a new member: a late answer to the fast path's
        // try (or to its give-back) can then change nothing the queue
        // counts.
        let queued_as = if self.instances().len() > 1 && !contended {
            let fresh = self.new_member();
            // The fast try's member too: its SET may land late.
            cleanup.more.push(member.clone());
            cleanup.more.push(fresh.clone());
            fresh
        } else {
            member.clone()
        };
        // Takes back itself what it leaves when it ends; only a drop midway
        // leaves it to the clean-up.
        let (result, waited) = self
            .acquire_queued(request, &keys, &queued_as, &mut cleanup.more)
            .await;
        cleanup.armed = false;
        if contended && !waited {
            self.contended.record(&request.key, false);
        }
        result
    }

    async fn release(&self, lock: &HeldLock) -> Result<()> {
        self.release_held(lock).await
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        if held.is_empty() {
            // A session is nothing in Redis until it holds a lock.
            return Ok(RenewReport::all_held());
        }
        // A lock this session does not know as held is renewed nowhere
        // (and so reported lost).
        let written: Vec<(Arc<LockKeys>, String)> = held
            .iter()
            .map(|lock| {
                self.member_of(lock)
                    .map(|(member, keys)| (keys, member))
                    .unwrap_or_else(|| (self.keys(&lock.key), String::new()))
            })
            .collect();
        let members: Vec<(&LockKeys, &str, Duration)> = written
            .iter()
            .map(|(keys, member)| (&**keys, member.as_str(), self.lock_delay))
            .collect();
        let sent = Instant::now();
        // Decided once a majority renewed every lock: a slow or cut-off
        // instance does not hold the renewal up.
        let members = &members;
        let owner_write = self.owner.due();
        let owner = owner_write.as_ref().map(OwnerWrite::command);
        let mut renewals: FuturesUnordered<_> = self
            .instances()
            .iter()
            .enumerate()
            .map(|(index, instance)| async move {
                (index, instance.renew(self.ttl, members, owner).await)
            })
            .collect();
        let mut kept = vec![0usize; held.len()];
        let mut failures = Failures::default();
        let mut answers = 0;
        while let Some((index, result)) = renewals.next().await {
            answers += 1;
            match result {
                Ok(flags) => {
                    for (count, flag) in kept.iter_mut().zip(flags) {
                        *count += usize::from(flag);
                    }
                }
                Err(err) => failures.push(&self.instances()[index], err),
            }
            if kept.iter().all(|count| *count >= self.quorum()) {
                break;
            }
        }
        drop(renewals);
        if let Some(write) = owner_write {
            write.finish(failures.len() > 0);
        }
        let answered = answers - failures.len();
        if answered < self.quorum() {
            return Err(self.unavailable(answered, &failures));
        }
        if !self.valid(sent) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "renewing took longer than the lease; the locks are not counted as renewed",
            ));
        }
        let quorum = self.quorum();
        if kept
            .iter()
            .any(|count| *count < quorum && count + failures.len() >= quorum)
        {
            // The instances that did not answer may still hold it: not
            // renewed, not lost either; the core asks again.
            return Err(self.unavailable(answered, &failures));
        }
        let mut lost = Vec::new();
        for ((lock, count), (keys, member)) in held.iter().zip(kept).zip(&written) {
            if count < quorum {
                self.forget(lock);
                lost.push(lock.key.clone());
                if count > 0 {
                    self.take_back(keys, member);
                }
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn close(&self) -> Result<()> {
        let held: Vec<(String, Held)> = self.held().drain().collect();
        for (_, held) in held {
            self.release_everywhere(&held.keys, &held.member).await;
        }
        if let Some(delete) = self.owner.delete() {
            // In the background, as a slow instance must not hold the close
            // up; left to expire where it fails: it names nothing held.
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                join_all(shared.instances.iter().map(|i| i.send(&delete))).await;
            });
        }
        Ok(())
    }
}

impl RedisSession {
    /// Builds the call that asks one instance for `request` as `member`.
    fn call<'a>(
        &self,
        request: &AcquireRequest,
        keys: &'a LockKeys,
        member: &'a str,
        gen: u64,
    ) -> AcquireCall<'a> {
        let (mode, permits) = mode_args(request.mode);
        AcquireCall {
            keys,
            member,
            mode,
            permits,
            ttl: self.ttl,
            waits: request.wait_until.is_some(),
            gen,
            limit: self.ttl.saturating_sub(self.drift()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session on one instance that is never asked anything.
    fn session(ttl: Duration) -> RedisSession {
        let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
        let instance = Instance::new("127.0.0.1:1".to_owned(), client, "unused");
        let shared = Arc::new(Shared {
            instances: vec![instance],
            quorum: 1,
        });
        RedisSession::new(shared, &SessionOptions::new(ttl, Duration::ZERO))
    }

    /// The margin is Redlock's: 1% of the TTL plus 2 ms. A call is given
    /// up that much before its lease ends, and a grant that came later
    /// is not used.
    #[test]
    fn the_drift_margin_is_one_percent_and_two_ms() {
        for (ttl, drift) in [(10_000, 102), (1_000, 12), (100, 3)] {
            let session = session(Duration::from_millis(ttl));
            assert_eq!(session.drift(), Duration::from_millis(drift), "{ttl} ms");
        }
    }
}
