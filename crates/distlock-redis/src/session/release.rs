//! Giving holds back: a release on every instance, decided by majority,
//! and the take-back of what a lost hold left on a minority.

use std::sync::Arc;

use distlock_core::store::{spawn_cleanup, HeldLock};
use distlock_core::{Error, Result};
use futures::future::{join_all, BoxFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};

use super::RedisSession;
use crate::instance::Failures;
use crate::scripts::LockKeys;

impl RedisSession {
    /// Releases `lock` everywhere. `NotHeld` where a majority of the
    /// instances say they do not hold it, even if a minority did: that is
    /// what is left of a hold that was lost (ended by a forced release that
    /// missed an instance, say), and it is given back all the same.
    /// `Unavailable` where none released it and too few answered to say
    /// that it was not held: the hold is then kept, so that the core's
    /// retry of the release can still name it.
    pub(super) async fn release_held(&self, lock: &HeldLock) -> Result<()> {
        let Some((member, keys)) = self.member_of(lock) else {
            return Err(Error::not_held(&lock.key));
        };
        let (released, failures) = self.release_everywhere(&keys, &member).await;
        let total = self.instances().len();
        // Below a majority released, every instance answered or failed.
        let not_held = total - failures.len() - released;
        if released >= self.quorum() || (released > 0 && not_held < self.quorum()) {
            self.forget(lock);
            return Ok(());
        }
        if not_held >= self.quorum() {
            self.forget(lock);
            return Err(Error::not_held(&lock.key));
        }
        Err(self.unavailable(total - failures.len(), &failures))
    }

    /// Takes back, in the background and on every instance, the hold
    /// written `member` that renewal found on too few of them to be held.
    ///
    /// As a release, not as the clean-up of an acquire: only where the hold
    /// is still live. Where its lease is over, what is left stands for its
    /// lock-delay (a fast key past its lease, a `:h` entry past its score
    /// that the next script turns into a block), and the key must not be
    /// granted again before that delay ends; the hold was reported lost,
    /// not released.
    pub(super) fn take_back(&self, keys: &Arc<LockKeys>, member: &str) {
        let (shared, keys) = (Arc::clone(&self.shared), Arc::clone(keys));
        let (member, delay) = (member.to_owned(), self.lock_delay);
        spawn_cleanup(async move {
            let releases = shared
                .instances
                .iter()
                .map(|instance| instance.release(&keys, &member, delay));
            join_all(releases).await;
        });
    }

    /// Releases the hold written `member` on every instance; how many did
    /// hold it, and the instances that failed.
    pub(super) async fn release_everywhere(
        &self,
        keys: &Arc<LockKeys>,
        member: &str,
    ) -> (usize, Failures) {
        if let [single] = self.instances() {
            return match single.release(keys, member, self.lock_delay).await {
                Ok(released) => (usize::from(released), Failures::default()),
                Err(err) => {
                    let mut failures = Failures::default();
                    failures.push(single, err);
                    (0, failures)
                }
            };
        }
        // The answer is given once a majority released: a slow or cut-off
        // instance delays nobody. What is left runs to its end in a task
        // (a hold there would otherwise stay until its lease ran out).
        let mut releases: FuturesUnordered<BoxFuture<'static, _>> = (0..self.instances().len())
            .map(|index| {
                let (shared, keys) = (Arc::clone(&self.shared), Arc::clone(keys));
                let (member, delay) = (member.to_owned(), self.lock_delay);
                let release = async move {
                    let instance = &shared.instances[index];
                    (index, instance.release(&keys, &member, delay).await)
                };
                release.boxed()
            })
            .collect();
        let mut released = 0;
        let mut failures = Failures::default();
        while let Some((index, result)) = releases.next().await {
            match result {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(err) => failures.push(&self.instances()[index], err),
            }
            if released >= self.quorum() {
                break;
            }
        }
        if !releases.is_empty() {
            tokio::spawn(async move { while releases.next().await.is_some() {} });
        }
        (released, failures)
    }
}
