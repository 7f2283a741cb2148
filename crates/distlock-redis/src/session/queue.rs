//! The queued path of an acquire: join the key's queue on every instance,
//! then wait for the hand-over message (one per instance), asking the
//! instances again only to refresh the place (every third of the TTL), when
//! a lease or lock-delay ends, or when a subscriber connection broke.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::store::{AcquireRequest, Grant};
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use tokio::time::{sleep_until, Instant};

use super::RedisSession;
use crate::instance::{Attempt, Failures};
use crate::owner::OwnerWrite;
use crate::scripts::LockKeys;
use crate::wake::Arrival;

/// The least of the longest pause before joining again after a split
/// vote (see `queue_for`).
const SPLIT_PAUSE: Duration = Duration::from_millis(50);

/// What an acquire knows of each instance.
struct Tally {
    /// The grant of each instance: token and generation.
    grants: Vec<Option<(u64, u64)>>,
    /// Who held the key on each instance that was busy at the last ask.
    holders: Vec<String>,
    /// When each call (generation) was sent.
    sent_of: Vec<Instant>,
    /// Whether the acquire had to wait (the key was not free at once).
    waited: bool,
    /// Whether a forced release was at work on an instance since the last
    /// ask (a message said so): a hand-over counted from any instance may
    /// have been ended since.
    forced: bool,
}

impl Tally {
    fn granted(&self) -> usize {
        self.grants.iter().flatten().count()
    }

    /// When the lease of a grant of generation `gen` started, at the latest
    /// (the send time of the call that refreshed the place it came from).
    fn sent(&self, gen: u64) -> Instant {
        let first = self.sent_of.first().copied().unwrap_or_else(Instant::now);
        usize::try_from(gen)
            .ok()
            .and_then(|gen| self.sent_of.get(gen).copied())
            .unwrap_or(first)
    }

    /// Takes what came by message: hand-overs, and the ends of hand-overs
    /// that a forced release made.
    fn collect(&mut self, arrivals: &[Arrival]) {
        for (grant, arrival) in self.grants.iter_mut().zip(arrivals) {
            let news = arrival.take();
            if news.ended {
                *grant = None;
            }
            if grant.is_none() {
                *grant = news.grant;
            }
            self.forced |= news.forced;
        }
    }
}

/// Wakes on a message to any of `arrivals`, or at `at`; `true` if woken by
/// a message (a hand-over, or a subscriber connection that broke).
async fn wait(arrivals: &[Arrival], at: Instant) -> bool {
    if arrivals.is_empty() {
        sleep_until(at).await;
        return false;
    }
    let woken = futures::future::select_all(arrivals.iter().map(|a| Box::pin(a.woken())));
    tokio::select! {
        _ = woken => true,
        () = sleep_until(at) => false,
    }
}

impl RedisSession {
    /// Joins the queue on every instance and waits up to the request's
    /// deadline for a majority to hand the key over; also says whether it
    /// had to wait. Takes back what it made if it ends without a grant;
    /// dropped midway, it leaves that to the acquire's clean-up, to which
    /// every member it joined as past `member` is added (`more`).
    pub(super) async fn acquire_queued(
        &self,
        request: &AcquireRequest,
        keys: &Arc<LockKeys>,
        member: &str,
        more: &mut Vec<String>,
    ) -> (Result<Option<Grant>>, bool) {
        let mut tally = Tally {
            grants: vec![None; self.instances().len()],
            holders: vec![String::new(); self.instances().len()],
            sent_of: Vec::new(),
            waited: false,
            forced: false,
        };
        let result = self
            .queue_for(request, keys, member.to_owned(), more, &mut tally)
            .await;
        (result, tally.waited)
    }

    async fn queue_for(
        &self,
        request: &AcquireRequest,
        keys: &Arc<LockKeys>,
        mut member: String,
        more: &mut Vec<String>,
        tally: &mut Tally,
    ) -> Result<Option<Grant>> {
        let instances = self.instances();
        let until = request.wait_until;
        // Expect the messages before subscribing, and both before joining
        // any queue, so that no message can come unseen.
        let expect = |member: &str| -> Vec<Arrival> {
            match until {
                Some(_) => instances.iter().map(|i| i.hub.expect(member)).collect(),
                None => Vec::new(),
            }
        };
        let mut arrivals = expect(&member);
        // Splits so far in this acquire.
        let mut splits = 0u32;
        loop {
            let retry = match self.ask(request, keys, &member, tally).await {
                Ok(retry) => retry,
                Err(err) => {
                    self.abandon_all(keys, &member, more).await;
                    return Err(err);
                }
            };
            if let Some(decided) = self.decide(request, keys, &member, tally).await {
                return decided;
            }
            tally.waited = true;
            let Some(until) = until else {
                if tally.granted() > 0 || instances.len() > 1 {
                    self.abandon_all(keys, &member, more).await;
                }
                return Ok(None);
            };
            // Wait for messages until the place needs refreshing or the
            // store may have changed without one.
            let refresh_at = Instant::now() + retry.min(self.ttl / 3);
            // Some instances handed the key over, not yet a majority: the
            // others follow, unless the vote split (instances that queued
            // contenders in different orders, so that nobody can have a
            // majority). That is looked into past this instant.
            let mut split_at: Option<Instant> = None;
            // How many had granted it when that was last looked into: it is
            // looked into again only when that changes, not on a timer.
            let mut looked_at = 0;
            loop {
                let now = Instant::now();
                if now >= until {
                    self.abandon_all(keys, &member, more).await;
                    return Ok(None);
                }
                if tally.granted() > 0 && tally.granted() != looked_at && split_at.is_none() {
                    split_at = Some(now + Duration::from_millis(rand::random_range(20..100)));
                }
                let wake_at = split_at.map_or(refresh_at, |at| at.min(refresh_at));
                let woken = wait(&arrivals, wake_at.min(until)).await;
                tally.collect(&arrivals);
                if let Err(err) = self.confirm(request, keys, &member, tally).await {
                    self.abandon_all(keys, &member, more).await;
                    return Err(err);
                }
                if let Some(decided) = self.decide(request, keys, &member, tally).await {
                    return decided;
                }
                let now = Instant::now();
                if split_at.is_some_and(|at| now >= at) {
                    split_at = None;
                    // Ask again, to learn who holds the other instances.
                    let asked = Instant::now();
                    if let Err(err) = self.ask(request, keys, &member, tally).await {
                        self.abandon_all(keys, &member, more).await;
                        return Err(err);
                    }
                    let round_trip = asked.elapsed();
                    if let Some(decided) = self.decide(request, keys, &member, tally).await {
                        return decided;
                    }
                    if self.someone_else_has_a_majority(tally, &member) {
                        looked_at = tally.granted();
                        continue;
                    }
                    // A split: every grant and place is given back, and the
                    // acquire joins again at the tails, as a new member (a
                    // late answer about the old one can then change nothing
                    // the new one counts), after a random pause.
                    RedisSession::abandon(&self.shared, keys, std::slice::from_ref(&member)).await;
                    more.push(std::mem::replace(&mut member, self.new_member()));
                    arrivals = expect(&member);
                    // The old member's routes went with its arrivals: a
                    // hand-over to it can no longer be counted.
                    tally.grants.iter_mut().for_each(|grant| *grant = None);
                    // A split repeats while each contender is nearer one
                    // instance than the others are: the pauses must come to
                    // differ by more than that. Up to the ask's round trip
                    // (at least 50 ms), doubled with each split of this
                    // acquire, and never past a third of the lease (when
                    // the place would be refreshed anyway).
                    let longest = round_trip.max(SPLIT_PAUSE) * (1 << splits.min(5));
                    splits += 1;
                    let pause = longest.min(self.ttl / 3).mul_f64(rand::random::<f64>());
                    let left = until.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(left)).await;
                    break;
                }
                if !woken || now >= refresh_at {
                    break;
                }
                if tally.granted() == 0 {
                    // Woken with no hand-over: a subscriber connection
                    // broke, and messages may be lost. Ask (subscribing
                    // again first).
                    break;
                }
            }
        }
    }

    /// Asks every instance again before a majority is counted where a
    /// forced release was at work since the last ask (on Redlock). It runs
    /// on every instance at once, so its `ended` message on one can come
    /// after a hand-over it made on another: the hand-overs counted must be
    /// asked about. The ask renews a hand-over still held and drops one
    /// that is not, for every instance in one round trip. A single instance
    /// needs none: its one grant is the majority. See `docs/0003`.
    async fn confirm(
        &self,
        request: &AcquireRequest,
        keys: &LockKeys,
        member: &str,
        tally: &mut Tally,
    ) -> Result<()> {
        if !tally.forced || self.instances().len() == 1 || tally.granted() < self.quorum() {
            return Ok(());
        }
        self.ask(request, keys, member, tally).await.map(|_| ())
    }

    /// Takes back what this acquire made as `member` and as every member
    /// before it.
    async fn abandon_all(&self, keys: &LockKeys, member: &str, more: &[String]) {
        let mut members = more.to_vec();
        members.push(member.to_owned());
        RedisSession::abandon(&self.shared, keys, &members).await;
    }

    /// Whether the instances that have not granted `member` the key hold it
    /// for one other member on a majority: then it is no split, and that
    /// holder's release will hand the key on.
    fn someone_else_has_a_majority(&self, tally: &Tally, member: &str) -> bool {
        let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (grant, holder) in tally.grants.iter().zip(&tally.holders) {
            if grant.is_none() && !holder.is_empty() && holder != member {
                *counts.entry(holder.as_str()).or_default() += 1;
            }
        }
        counts.values().any(|count| *count >= self.quorum())
    }

    /// Asks every instance that has not granted the key (joining or
    /// refreshing the place there); how long until asking again is worth
    /// it at the latest.
    async fn ask(
        &self,
        request: &AcquireRequest,
        keys: &LockKeys,
        member: &str,
        tally: &mut Tally,
    ) -> Result<Duration> {
        let waits = request.wait_until.is_some();
        if waits {
            // Subscribed before the place is refreshed (at once when it
            // already is; a failing instance is tried again only after a
            // pause): without it, the refreshes alone move the waiter on.
            join_all(self.instances().iter().map(|i| i.hub.subscribe())).await;
        }
        let gen = tally.sent_of.len() as u64;
        tally.sent_of.push(Instant::now());
        tally.forced = false;
        let call = self.call(request, keys, member, gen);
        // Every instance, those that granted too: the ask renews a grant
        // from this generation, so that one held while the others follow
        // does not run out.
        for holder in &mut tally.holders {
            holder.clear();
        }
        let owner_write = self.owner.due();
        let owner = owner_write.as_ref().map(OwnerWrite::command);
        let results = join_all(
            self.instances()
                .iter()
                .map(|instance| instance.acquire(&call, instance.hub.channel(), owner)),
        )
        .await;
        if let Some(write) = owner_write {
            write.finish(results.iter().any(Result::is_err));
        }
        let mut retry = self.ttl;
        let mut busy = 0;
        for grant in &mut tally.grants {
            *grant = None;
        }
        let mut failures = Failures::default();
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(Attempt::Granted { token, gen }) => tally.grants[index] = Some((token, gen)),
                Ok(Attempt::Busy(after, holder)) => {
                    busy += 1;
                    retry = retry.min(after);
                    tally.holders[index] = holder;
                }
                Ok(Attempt::Conflict(message)) => {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("cannot lock '{}' as asked: {message}", request.key),
                    ));
                }
                Err(err) => failures.push(&self.instances()[index], err),
            }
        }
        let answered = tally.granted() + busy;
        if answered < self.quorum() {
            return Err(self.unavailable(answered, &failures));
        }
        Ok(retry)
    }

    /// The acquire's outcome once a majority granted the key: the grant,
    /// or an error if it came too late to use. `None` while there is no
    /// majority.
    async fn decide(
        &self,
        request: &AcquireRequest,
        keys: &Arc<LockKeys>,
        member: &str,
        tally: &Tally,
    ) -> Option<Result<Option<Grant>>> {
        if tally.granted() < self.quorum() {
            return None;
        }
        let tokens: Vec<(usize, u64)> = tally
            .grants
            .iter()
            .enumerate()
            .filter_map(|(index, grant)| grant.map(|(token, _)| (index, token)))
            .collect();
        let lease_from = tally
            .grants
            .iter()
            .flatten()
            .map(|(_, gen)| tally.sent(*gen))
            .min()
            .unwrap_or_else(Instant::now);
        let token = self.settle_token(keys, &tokens).await;
        match token {
            Some(token) if self.valid(lease_from) => Some(Ok(Some(self.granted(
                &request.key,
                token,
                member.to_owned(),
                Arc::clone(keys),
                lease_from,
            )))),
            _ => {
                RedisSession::abandon(&self.shared, keys, &[member.to_owned()]).await;
                Some(Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "Redis granted '{}' but the grant came too late to use (or its token \
                         could not be written to a majority); ask again",
                        request.key
                    ),
                )))
            }
        }
    }
}
