//! An acquire in steps: join the lock's queue, decide from the entries
//! ahead (`distlock_core::store::queue`), take out entries of sessions that
//! ended, and wait for what blocks the request to go.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use distlock_core::store::queue::{self, Blocker};
use distlock_core::store::{AcquireRequest, Grant};
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use tokio::time::Instant;

use super::leave::settle;
use super::wait::{wait, Watch};
use super::{HeldEntry, Leave, NatsSession};
use crate::client::Published;
use crate::wire::{entry_headers, entry_subject, lock_hash, queue_filter, Entry};

/// How long a waiting acquire pauses when NATS did not answer it.
const RIDE_OUT_PAUSE: Duration = Duration::from_millis(250);

/// How long a waiting acquire rides out failures in a row: an election
/// takes at most 9 s, and calls during it time out in 5 s. Past this the
/// failure is taken as lasting (a refused permission, a limit) and ends
/// the acquire, however long it may wait.
const RIDE_OUT_LIMIT: Duration = Duration::from_secs(60);

impl NatsSession {
    /// Joins the queue at its tail, then reads it until the request holds
    /// the lock, or gives up.
    pub(super) async fn acquire_in_queue(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        let hash = lock_hash(&request.key);
        let (subject, seq, mut leave) = self.join(request, &hash).await?;
        // Since when calls have failed in a row, while riding them out.
        let mut failing = None;
        loop {
            let queue = match self
                .nats
                .read_entries(&queue_filter(&hash), Some(seq))
                .await
            {
                Ok(queue) => queue,
                Err(err) => {
                    ride_out(&mut failing, err, request.wait_until).await?;
                    continue;
                }
            };
            if !queue.iter().any(|entry| entry.seq == seq) {
                // A replica that lags may not have it yet: the leader knows.
                match self.nats.stored(seq, &subject).await {
                    Ok(true) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Ok(false) => {}
                    Err(err) => {
                        ride_out(&mut failing, err, request.wait_until).await?;
                        continue;
                    }
                }
                leave.armed = false;
                return Err(self.lost(
                    "had its entry for this lock deleted while it waited (a forced release, \
                     or its lease ran out)",
                ));
            }
            let ahead: Vec<&Entry> = queue
                .iter()
                .filter(|entry| entry.seq < seq && entry.key == request.key)
                .collect();
            let tags: Vec<&str> = ahead.iter().map(|entry| entry.tag.as_str()).collect();
            let Some(blocker) = queue::blocker(request.mode, &tags) else {
                leave.armed = false;
                self.held()
                    .insert(request.key.clone(), HeldEntry { subject, seq });
                return Ok(Some(Grant::new(seq)));
            };
            let blocking: Vec<&Entry> = match blocker {
                Blocker::Entry(index) => vec![ahead[index]],
                Blocker::AnyChange => ahead.clone(),
            };
            match self.take_out_ended(&blocking, &ahead).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(err) => {
                    ride_out(&mut failing, err, request.wait_until).await?;
                    continue;
                }
            }
            let until = match request.wait_until {
                Some(until) if Instant::now() < until => until,
                // Busy, and no (more) waiting: out of the queue. If that
                // fails, the entry is taken out in the background.
                _ => {
                    self.nats.remove_entry(&subject, seq).await?;
                    leave.armed = false;
                    return Ok(None);
                }
            };
            let watch = Watch::of(&hash, blocker, &blocking);
            match wait(&self.nats, &watch, seq, until).await {
                // A whole round went through.
                Ok(()) => failing = None,
                Err(err) => ride_out(&mut failing, err, Some(until)).await?,
            }
        }
    }

    /// Publishes a new entry of this session at the tail of the queue
    /// `hash`: its subject, its sequence, and what takes it out if the
    /// attempt ends without the lock. The owner and mode go in the publish:
    /// no extra round trip. The subject is new, so the publish expects it
    /// empty. A publish whose answer a lost connection took is settled (found,
    /// or kept from landing) before anything else.
    async fn join(&self, request: &AcquireRequest, hash: &str) -> Result<(String, u64, Leave)> {
        for _ in 0..3 {
            let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
            let subject = entry_subject(hash, &self.id, slot);
            let mut leave = Leave {
                nats: Arc::clone(&self.nats),
                subject: subject.clone(),
                seq: None,
                frozen: Arc::clone(&self.frozen),
                armed: true,
            };
            let joined = self
                .nats
                .publish(
                    subject.clone(),
                    entry_headers(&request.mode.tag(), &self.owner),
                    Bytes::from(request.key.clone()),
                )
                .await?;
            let seq = match joined {
                Published::At(seq) => seq,
                Published::WrongLast => {
                    leave.armed = false;
                    return Err(Error::unavailable(format!(
                        "NATS at {}: the new entry's subject {subject} was taken; try again",
                        self.nats.servers
                    )));
                }
                Published::Unknown => match settle(&self.nats, &subject).await? {
                    Some(seq) => seq,
                    None => {
                        leave.armed = false;
                        continue;
                    }
                },
            };
            leave.seq = Some(seq);
            return Ok((subject, seq, leave));
        }
        Err(Error::unavailable(format!(
            "NATS at {}: the connection kept dropping while joining the queue of '{}'",
            self.nats.servers, request.key
        )))
    }

    /// Takes out every entry `ahead` of a session that ended among those of
    /// `blocking`, and every entry `ahead` of this session (an earlier
    /// attempt's, whose removal has not landed yet: the core makes one
    /// attempt per key at a time). Whether any went: the queue is then read
    /// again. Sessions are asked of the stream's leader, as a replica that
    /// lags could miss one that lives.
    async fn take_out_ended(&self, blocking: &[&Entry], ahead: &[&Entry]) -> Result<bool> {
        let sessions: BTreeSet<&str> = blocking
            .iter()
            .map(|entry| entry.session.as_str())
            .filter(|session| *session != self.id)
            .collect();
        let alive = join_all(
            sessions
                .iter()
                .map(|session| self.nats.session_alive(session)),
        )
        .await;
        let mut ended: HashSet<&str> = HashSet::from([self.id.as_str()]);
        for (session, alive) in sessions.iter().zip(alive) {
            if !alive? {
                ended.insert(session);
            }
        }
        let gone: Vec<&&Entry> = ahead
            .iter()
            .filter(|entry| ended.contains(entry.session.as_str()))
            .collect();
        if gone.is_empty() {
            return Ok(false);
        }
        tracing::debug!(entries = gone.len(), "taking out entries of ended sessions");
        let removals = gone
            .iter()
            .map(|entry| self.nats.remove_entry(&entry.subject, entry.seq));
        for removed in join_all(removals).await {
            removed?;
        }
        Ok(true)
    }
}

/// A waiting acquire's answer to a failed call: a cluster may be electing
/// the stream's leader, which takes seconds, so while the store is
/// unavailable a wait goes on (after a pause) until its deadline, for at
/// most [`RIDE_OUT_LIMIT`] of failures in a row (`failing` says since
/// when). Anything else, or a failure past either, ends the acquire (its
/// entry is then taken out).
async fn ride_out(failing: &mut Option<Instant>, err: Error, until: Option<Instant>) -> Result<()> {
    let now = Instant::now();
    let since = *failing.get_or_insert(now);
    let until = match until {
        Some(until)
            if err.kind() == ErrorKind::Unavailable
                && now < until
                && now.duration_since(since) < RIDE_OUT_LIMIT =>
        {
            until
        }
        _ => return Err(err),
    };
    if since == now {
        tracing::warn!("NATS did not answer a waiting acquire; asking again for up to {RIDE_OUT_LIMIT:?}: {err}");
    } else {
        tracing::debug!("NATS still does not answer a waiting acquire: {err}");
    }
    tokio::time::sleep_until(until.min(now + RIDE_OUT_PAUSE)).await;
    Ok(())
}
