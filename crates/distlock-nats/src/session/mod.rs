//! A session: a message with a TTL on `distlock.s.SESSION`, renewed by
//! publishing it again, and the queue entries of its locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use distlock_core::store::{
    lock, release_outcome, AcquireRequest, Grant, HeldLock, RenewReport, SessionOptions,
    StoreSession,
};
use distlock_core::{Error, Result};
use futures::future::join_all;

use crate::client::{Nats, Published};
use crate::wire::{self, expecting, session_subject, CLOSED};

mod holds;
mod leave;
mod queue;
mod wait;

use holds::HoldsWatch;
use leave::Leave;

/// A held lock's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldEntry {
    subject: String,
    seq: u64,
}

pub(crate) struct NatsSession {
    nats: Arc<Nats>,
    /// The session's name in subjects: 16 hex digits, random.
    id: String,
    /// Who the session says it is: the value of its message and a header of
    /// each of its entries.
    owner: String,
    /// The lease at the server, in whole seconds (NATS keeps no less).
    ttl_secs: u64,
    /// The sequence of the session's message: a renewal must find it there.
    revision: Mutex<u64>,
    /// Numbers the session's entries: each attempt has a subject of its own.
    next_slot: AtomicU64,
    /// The entries of the locks held, by lock key.
    held: Arc<Mutex<HashMap<String, HeldEntry>>>,
    /// Watches the notices of the session's entries: an entry in `held`
    /// that someone else deletes asks for a renewal.
    holds: HoldsWatch,
    /// Set by the test hook: the session does nothing more, as a frozen
    /// process would not.
    frozen: Arc<AtomicBool>,
}

impl NatsSession {
    pub(crate) async fn open(nats: Arc<Nats>, options: &SessionOptions) -> Result<Self> {
        // Rounded up: the server must never give up a lease before the
        // client does.
        let ttl_secs = options.ttl.as_millis().div_ceil(1000).max(1);
        let ttl_secs = u64::try_from(ttl_secs).unwrap_or(u64::MAX);
        let id = format!("{:016x}", rand::random::<u64>());
        let revision = open_session(&nats, &id, ttl_secs, &options.owner).await?;
        let held = Arc::new(Mutex::new(HashMap::new()));
        Ok(NatsSession {
            holds: HoldsWatch::start(Arc::clone(&nats), &id, revision, Arc::clone(&held)),
            nats,
            id,
            owner: options.owner.clone(),
            ttl_secs,
            revision: Mutex::new(revision),
            next_slot: AtomicU64::new(0),
            held,
            frozen: Arc::new(AtomicBool::new(false)),
        })
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, HeldEntry>> {
        lock(&self.held)
    }

    fn lost(&self, why: &str) -> Error {
        Error::lost(format!(
            "NATS at {}: the session {why}; open a new session",
            self.nats.servers
        ))
    }

    fn frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Publishes the session's message again, expecting the last one
    /// written. A message of this session found instead (a renewal whose
    /// answer was lost) is taken as the last one: only this session writes
    /// it, and only after its own last one, so a marker (the message
    /// expired) or nothing at all means the session ended.
    async fn renew_session(&self) -> Result<()> {
        let subject = session_subject(&self.id);
        for _ in 0..2 {
            let expected = *lock(&self.revision);
            let renewed = self
                .nats
                .publish(
                    subject.clone(),
                    expecting(expected, Some(self.ttl_secs)),
                    Bytes::from(self.owner.clone()),
                )
                .await?;
            match renewed {
                Published::At(revision) => {
                    *lock(&self.revision) = revision;
                    return Ok(());
                }
                // Refused, or its answer lost: the leader says which.
                Published::WrongLast | Published::Unknown => {
                    match self.nats.leader_last(&subject).await? {
                        Some(last) if wire::session_is_live(&last.headers) => {
                            *lock(&self.revision) = last.sequence;
                        }
                        _ => return Err(self.lost("expired at the server")),
                    }
                }
            }
        }
        // Still alive, as far as is known: the core tries again.
        Err(Error::unavailable(format!(
            "NATS at {}: the session's renewal was cut short twice",
            self.nats.servers
        )))
    }
}

/// Publishes a new session's message; its sequence. The name is 64 random
/// bits: a message found on it after an answer was lost is this one.
async fn open_session(nats: &Nats, id: &str, ttl_secs: u64, owner: &str) -> Result<u64> {
    for _ in 0..3 {
        let opened = nats
            .publish(
                session_subject(id),
                expecting(0, Some(ttl_secs)),
                Bytes::from(owner.to_owned()),
            )
            .await?;
        match opened {
            Published::At(revision) => return Ok(revision),
            Published::WrongLast => match nats.leader_last(&session_subject(id)).await? {
                Some(there) if wire::session_is_live(&there.headers) => return Ok(there.sequence),
                _ => break,
            },
            Published::Unknown => continue,
        }
    }
    Err(Error::unavailable(format!(
        "NATS at {}: a new session could not be opened (the connection kept dropping); try \
         again",
        nats.servers
    )))
}

#[async_trait]
impl StoreSession for NatsSession {
    async fn acquire(&self, request: &AcquireRequest) -> Result<Option<Grant>> {
        self.acquire_in_queue(request).await
    }

    async fn release(&self, held: &HeldLock) -> Result<()> {
        let Some(mine) = self.held().get(&held.key).cloned() else {
            return Err(Error::not_held(&held.key));
        };
        if mine.seq != held.token {
            return Err(Error::not_held(&held.key));
        }
        // Out of the map first: the notice of this delete is then no news to
        // the holds watch. Back in if the delete's fate is unknown, so that
        // the core's retry finds it.
        self.held().remove(&held.key);
        match self.nats.remove_entry(&mine.subject, mine.seq).await {
            Ok(removed) => release_outcome(removed, &held.key),
            Err(err) => {
                self.held().entry(held.key.clone()).or_insert(mine);
                Err(err)
            }
        }
    }

    async fn renew(&self, held: &[HeldLock]) -> Result<RenewReport> {
        if self.frozen() {
            return Err(Error::unavailable("the session is frozen (test hook)"));
        }
        self.renew_session().await?;
        // Each held entry must still be stored, at the sequence granted. The
        // leader answers: a replica that lags might not have a new one yet.
        let known: Vec<(&HeldLock, Option<HeldEntry>)> = {
            let map = self.held();
            held.iter()
                .map(|lock| {
                    let entry = map.get(&lock.key).filter(|entry| entry.seq == lock.token);
                    (lock, entry.cloned())
                })
                .collect()
        };
        let checks = known.iter().map(|(_, entry)| async move {
            match entry {
                Some(entry) => self.nats.stored(entry.seq, &entry.subject).await,
                None => Ok(false),
            }
        });
        let mut lost = Vec::new();
        for ((lock, entry), stored) in known.iter().zip(join_all(checks).await) {
            if !stored? {
                if let Some(entry) = entry {
                    let mut map = self.held();
                    if map.get(&lock.key) == Some(entry) {
                        map.remove(&lock.key);
                    }
                }
                lost.push(lock.key.clone());
            }
        }
        Ok(RenewReport::lost(lost))
    }

    async fn renewal_wanted(&self) {
        self.holds.wanted().await;
    }

    async fn close(&self) -> Result<()> {
        self.holds.stop();
        if self.frozen() {
            // A frozen session is left to expire.
            return Ok(());
        }
        // The end first, in one publish: every entry of the session stops
        // counting at once, for everyone. Then its held entries go, so that
        // their waiters wake now.
        let expected = *lock(&self.revision);
        let mut headers = expecting(expected, Some(1));
        headers.insert(CLOSED, "1");
        let ended = self
            .nats
            .publish(session_subject(&self.id), headers, Bytes::new())
            .await?;
        if let Published::WrongLast = ended {
            tracing::debug!(session = self.id, "closing a session that had expired");
        }
        let held: Vec<HeldEntry> = self.held().drain().map(|(_, entry)| entry).collect();
        let removals = held
            .iter()
            .map(|entry| self.nats.remove_entry(&entry.subject, entry.seq));
        for removed in join_all(removals).await {
            // An entry left behind belongs to an ended session: whoever
            // finds it takes it out.
            if let Err(err) = removed {
                tracing::debug!(session = self.id, "closing: {err}");
            }
        }
        Ok(())
    }

    distlock_core::test_hook! {
        fn freeze_for_test(&self) {
            self.frozen.store(true, Ordering::SeqCst);
            self.holds.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use distlock_core::store::{lock, SessionOptions, StoreSession};
    use distlock_core::ErrorKind;
    use distlock_testkit::servers;

    use super::NatsSession;
    use crate::client::Published;
    use crate::wire::{self, expecting, session_subject};
    use crate::NatsStore;

    async fn opened(server: &servers::Nats, ttl: Duration) -> (NatsStore, NatsSession) {
        let store = NatsStore::connect(&server.url()).await.expect("connect");
        let options = SessionOptions::new(ttl, Duration::ZERO);
        let session = NatsSession::open(Arc::clone(&store.nats), &options)
            .await
            .expect("open");
        (store, session)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_whose_answer_was_lost_goes_on_from_the_sessions_own_message() {
        let server = servers::Nats::start();
        let (store, session) = opened(&server, Duration::from_secs(10)).await;
        // What a renewal whose answer was lost leaves: the session's own
        // message, past the revision the session knows.
        let known = *lock(&session.revision);
        let published = store.nats.publish(
            session_subject(&session.id),
            expecting(known, Some(session.ttl_secs)),
            Bytes::from(session.owner.clone()),
        );
        let Published::At(seq) = published.await.expect("publish") else {
            panic!("not stored");
        };
        session.renew(&[]).await.expect("the session lives on");
        assert!(*lock(&session.revision) > seq);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_that_finds_the_servers_delete_marker_is_lost() {
        let server = servers::Nats::start();
        let (store, session) = opened(&server, Duration::from_secs(1)).await;
        let subject = session_subject(&session.id);
        // Not renewed: the server expires the session's message and leaves
        // a marker on its subject for a second.
        let mut marked = false;
        for _ in 0..100 {
            let last = store.nats.leader_last(&subject).await.expect("read");
            if last.is_some_and(|last| !wire::session_is_live(&last.headers)) {
                marked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(marked, "no delete marker within 5 s");
        let err = session
            .renew(&[])
            .await
            .expect_err("the marker is not the session");
        assert_eq!(err.kind(), ErrorKind::Lost, "{err}");
    }
}
