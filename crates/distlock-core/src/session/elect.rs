//! Leader election on any store: `session.elect(name).value(v).campaign()`.
//!
//! The leader is the holder of one lock, `name`, held by a session of its
//! own whose owner is the leader's value; its token is the leader's term.
//! Anyone reads the leader from the store's status of that key (the
//! holder's owner and token), so every store whose status shows both can
//! tell who leads; the others can still elect.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::guard::Guard;
use super::{Session, SessionConfig};
use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::status::StatusQuery;
use crate::store::{default_owner, lock, validate_owner, Capabilities, Fencing, KeyWatch, Mode};

/// How often [`Observer`] asks the store who leads unless told otherwise.
pub const DEFAULT_OBSERVE_EVERY: Duration = Duration::from_millis(200);

/// The mode an election holds its name in: a one-permit semaphore where
/// the store has semaphores (their holds carry their token in every
/// store's status), else an exclusive lock. Either admits one holder.
pub(crate) fn election_mode(caps: &Capabilities) -> Mode {
    if caps.semaphore {
        Mode::Semaphore { permits: 1 }
    } else {
        Mode::Exclusive
    }
}

/// A candidacy, made by [`Session::elect`]: await
/// [`campaign`](Campaign::campaign) to become leader.
#[derive(Debug)]
#[must_use = "a campaign does nothing until .campaign().await"]
pub struct Campaign {
    session: Session,
    name: String,
    value: Option<String>,
    wait: Option<Duration>,
}

impl Campaign {
    pub(crate) fn new(session: Session, name: String) -> Self {
        Campaign {
            session,
            name,
            value: None,
            wait: None,
        }
    }

    /// What this candidate publishes while it leads (an address, an id):
    /// at most 256 bytes on one line. Default: the session's owner.
    pub fn value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Gives up with [`ErrorKind::Timeout`] if not elected within `wait`.
    /// Default: campaign as long as it takes.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Waits to be elected. Cancel safe: dropping the future withdraws the
    /// candidacy and leaves no trace at the store.
    pub async fn campaign(self) -> Result<Leadership> {
        crate::key::validate_key(&self.name)?;
        let wait = self.wait_until();
        let parent = &self.session.inner;
        let mut config: SessionConfig = parent.config.clone();
        let value = match self.value {
            Some(value) => value,
            None => config.owner.clone().unwrap_or_else(default_owner),
        };
        validate_owner(&value).map_err(|err| {
            Error::new(
                err.kind(),
                format!(
                    "election value refused: {err}; a value is what an owner may be (1 to 256 \
                     bytes on one line): publish more elsewhere, keyed by the term"
                ),
            )
        })?;
        if value.is_empty() {
            return Err(Error::config(
                "election value is empty; give the value the leader publishes (an address, an id)",
            ));
        }
        if parent.ended.is_cancelled() {
            return Err(parent.ended_error());
        }
        if lock(&parent.held).contains_key(&self.name) {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "this session holds '{}' itself, so its campaign would wait for it forever; \
                     release it, or campaign from another session",
                    self.name
                ),
            ));
        }
        config.owner = Some(value.clone());
        // A leader leads until it resigns or is lost: max_hold is for locks.
        config.max_hold = None;
        // The leadership's own session carries the value as its owner; it
        // ends when the campaigning session ends or the leadership goes.
        let session = Session::open(parent.opener.clone(), config).await?;
        {
            let mut elections = lock(&parent.elections);
            elections.retain(|weak| weak.strong_count() > 0);
            elections.push(Arc::downgrade(&session.inner));
        }
        let watch = CancellationToken::new();
        tokio::spawn({
            let (parent_ended, gone) = (parent.ended.clone(), watch.clone());
            let session = session.clone();
            async move {
                tokio::select! {
                    // A leadership detached by into_guard, then its
                    // campaigning session closed: both are ready, and the
                    // leadership must live on.
                    biased;
                    () = gone.cancelled() => {}
                    () = parent_ended.cancelled() => {
                        if let Err(err) = session.close().await {
                            tracing::debug!("closing a leadership whose session ended: {err}");
                        }
                    }
                }
            }
        });
        let closer = watch.clone().drop_guard();
        let mode = election_mode(&session.inner.caps);
        let request = session.inner.acquire(self.name.clone(), mode, wait);
        let guard = match request.await {
            Ok(guard) => guard.expect("a waiting acquire ends with a guard or an error"),
            Err(err) => {
                drop(closer);
                let _ = session.close().await;
                // The campaigning session's end, not its effect on ours.
                if parent.ended.is_cancelled() {
                    return Err(parent.ended_error());
                }
                return Err(err);
            }
        };
        Ok(Leadership {
            name: self.name,
            value,
            guard,
            session,
            campaigner: self.session,
            _closer: closer,
        })
    }

    fn wait_until(&self) -> super::Wait {
        match self.wait {
            Some(wait) => super::Wait::Until(Instant::now() + wait),
            None => super::Wait::Forever,
        }
    }
}

impl IntoFuture for Campaign {
    type Output = Result<Leadership>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Leadership>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.campaign())
    }
}

/// Proof of leading an election, with the term to fence every act of the
/// leader by.
///
/// # Drop
///
/// Dropping it resigns in the background; prefer
/// [`resign`](Leadership::resign).
#[derive(Debug)]
#[must_use = "dropping a leadership resigns it"]
pub struct Leadership {
    name: String,
    value: String,
    guard: Guard,
    session: Session,
    /// Kept open while this leads, as a guard keeps its session.
    campaigner: Session,
    _closer: DropGuard,
}

impl Leadership {
    /// The term: strictly greater than every earlier leader's of this
    /// election (the hold's fencing token), on a store whose tokens are
    /// [`Fencing::Durable`]; elsewhere until the store restarts. Write it
    /// with every act of the leader, as a token.
    pub fn term(&self) -> u64 {
        self.guard.token()
    }

    /// The value this leader publishes.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is still the leader (as [`Guard::is_held`]).
    pub fn is_leader(&self) -> bool {
        self.guard.is_held()
    }

    /// Resolves when this is no longer the leader: before the store could
    /// elect anyone else, as [`Guard::lost`]. Cancel safe.
    pub async fn lost(&self) {
        self.guard.lost().await;
    }

    /// Until when this certainly leads unless renewed, as
    /// [`Guard::expires_at`].
    pub fn expires_at(&self) -> Option<Instant> {
        self.guard.expires_at()
    }

    /// [`lost`](Leadership::lost) as a future that owns what it needs, as
    /// [`Guard::lost_owned`].
    pub fn lost_owned(&self) -> impl Future<Output = ()> + Send + 'static {
        self.guard.lost_owned()
    }

    /// The session that holds the leadership: opened by the campaign with
    /// the campaigning session's lease, and closed with the leadership.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The leadership as the guard of its name's lock (its token is the
    /// term), for code that supervises guards. It leads while the guard
    /// holds; it no longer ends when the campaigning session does.
    pub fn into_guard(self) -> Guard {
        let ours = Arc::downgrade(&self.session.inner);
        lock(&self.campaigner.inner.elections).retain(|weak| !weak.ptr_eq(&ours));
        self.guard
    }

    /// Steps down at once: the next candidate is elected without waiting
    /// for a lease to run out. `NotHeld` if the leadership was already
    /// lost.
    pub async fn resign(self) -> Result<()> {
        let released = self.guard.release().await;
        let closed = self.session.close().await;
        released.and(closed)
    }
}

/// Who leads an election, as [`Client::leader`] and [`Observer`] see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// What the leader publishes ([`Campaign::value`]).
    pub value: String,
    /// Its term ([`Leadership::term`]).
    pub term: u64,
}

impl Client {
    /// The current leader of election `name`, or `None` if nobody leads.
    /// [`ErrorKind::Unsupported`] where the store's status shows no
    /// holder's owner or token.
    pub async fn leader(&self, name: &str) -> Result<Option<Leader>> {
        crate::key::validate_key(name)?;
        let caps = self.capabilities();
        if !caps.tells_leader {
            return Err(cannot_tell(&caps));
        }
        let status = self
            .store()
            .status(&StatusQuery::Key(name.to_owned()))
            .await?;
        let mode = election_mode(&caps);
        // One holder in the election's mode, unless someone took the name
        // as a plain one-permit semaphore: then the latest grant leads.
        let holder = status
            .keys
            .iter()
            .filter(|key| key.key == name)
            .flat_map(|key| key.holders.iter())
            .filter(|holder| holder.mode == mode)
            .max_by_key(|holder| holder.token);
        let Some(holder) = holder else {
            return Ok(None);
        };
        let Some(term) = holder.token else {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the {} store showed the leader of '{name}' without its term; ask again",
                    caps.name
                ),
            ));
        };
        Ok(Some(Leader {
            value: holder.owner.clone(),
            term,
        }))
    }

    /// Every change of election `name`'s leader, in order: see [`Observer`].
    pub fn observe(&self, name: impl Into<String>) -> Observer {
        Observer {
            client: self.clone(),
            name: name.into(),
            every: DEFAULT_OBSERVE_EVERY,
            seen: None,
            highest: 0,
            watch: Watching::NotAsked,
        }
    }
}

fn cannot_tell(caps: &Capabilities) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "the {} store's status cannot show an election's value and term, so it cannot tell \
             who leads (elections still elect); to observe, elect on a store that can: the \
             distlock server, Redis, etcd, ZooKeeper, NATS, or a lease mode (?mode=lease)",
            caps.name
        ),
    )
}

/// The leaders of one election, change by change: from
/// [`Client::observe`].
///
/// The first [`next`](Observer::next) answers who leads now; each later
/// one waits for a change: a leader with a higher term than any seen
/// (`Some`), or nobody leading (`None`). A leader older than one already
/// seen is never answered. Where the store pushes changes
/// ([`Capabilities::watches_keys`]), it is asked again on each change (and
/// at least every second); elsewhere every [`every`](Observer::every)
/// (200 ms by default). Leaders that come and go between two asks are not
/// seen.
///
/// On a store whose tokens start again when it restarts (not
/// [`Fencing::Durable`]), a leader with a lower term than one seen means
/// it restarted: `next` answers an `Unavailable` error saying so once,
/// then goes on from the new terms.
#[derive(Debug)]
pub struct Observer {
    client: Client,
    name: String,
    every: Duration,
    /// What the last `next` answered (`None` before the first).
    seen: Option<Option<Leader>>,
    /// The highest term answered so far.
    highest: u64,
    watch: Watching,
}

/// Whether an observer's store pushes changes.
#[derive(Debug)]
enum Watching {
    NotAsked,
    Pushed(KeyWatch),
    Polled,
    /// The store failed to watch (it may be restarting): asked again at
    /// this instant.
    Failed(Instant),
}

/// How long an observer polls after a store failed to watch, before it
/// asks for a watch again.
const WATCH_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// How often, at least, an observer asks a store that pushes changes
/// anyway (or every [`Observer::every`], if longer): for a change the
/// store finds only when asked (a lease that ran out).
const PUSHED_RECHECK: Duration = Duration::from_secs(1);

impl Observer {
    /// How often to ask the store (at least every 10 ms).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every.max(Duration::from_millis(10));
        self
    }

    /// The next leader, or `None` when nobody leads; see [`Observer`].
    /// Errors from the store are answered as they come; call again to go
    /// on. Cancel safe.
    pub async fn next(&mut self) -> Result<Option<Leader>> {
        crate::key::validate_key(&self.name)?;
        loop {
            // Watched before the read, so no change after it goes unseen.
            let again = matches!(self.watch, Watching::Failed(at) if Instant::now() >= at);
            if matches!(self.watch, Watching::NotAsked) || again {
                self.watch = match self.client.store().watch_key(&self.name).await {
                    Ok(Some(watch)) => Watching::Pushed(watch),
                    Ok(None) => Watching::Polled,
                    Err(err) => {
                        tracing::debug!(name = %self.name, "no pushed changes, polling: {err}");
                        Watching::Failed(Instant::now() + WATCH_AGAIN_AFTER)
                    }
                };
            }
            let now = self.client.leader(&self.name).await?;
            let changed = match (&self.seen, &now) {
                (None, _) => true,
                (Some(seen), None) => seen.is_some(),
                // The same leader again after a vacancy is a change; a
                // lower term is a stale read, or a restart of a store whose
                // tokens do not outlive it.
                (Some(_), Some(leader)) if leader.term < self.highest => {
                    if self.client.capabilities().fencing != Fencing::Durable {
                        let before = std::mem::take(&mut self.highest);
                        self.seen = Some(None);
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the leader of '{}' has term {} after term {before}: the store \
                                 restarted and its terms started again; observing goes on from them",
                                self.name, leader.term
                            ),
                        ));
                    }
                    false
                }
                (Some(seen), Some(leader)) => leader.term > self.highest || seen.is_none(),
            };
            if changed {
                if let Some(leader) = &now {
                    self.highest = self.highest.max(leader.term);
                }
                self.seen = Some(now.clone());
                return Ok(now);
            }
            match &mut self.watch {
                Watching::Pushed(watch) => {
                    tokio::select! {
                        signal = watch.recv() => if signal.is_none() {
                            // The store stopped pushing (a broken stream):
                            // watch again after a pause.
                            self.watch = Watching::NotAsked;
                            sleep(self.every).await;
                        },
                        () = sleep(PUSHED_RECHECK.max(self.every)) => {}
                    }
                }
                Watching::NotAsked | Watching::Polled | Watching::Failed(_) => {
                    sleep(self.every).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::{Client, MemoryStore};

    /// `distlock elect` detaches the leadership, then closes the
    /// campaigning session: the leadership must live on (the watcher that
    /// ends it with its session must not win that race).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_detached_leadership_outlives_its_campaigning_session() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        for round in 0..50 {
            let session = client.session().open().await.expect("open");
            let leading = session.elect("jobs").value("me").await.expect("elected");
            let guard = leading.into_guard();
            session.close().await.expect("close");
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            assert!(
                guard.is_held(),
                "round {round}: the leadership ended with its session"
            );
            guard.release().await.expect("release");
        }
    }

    #[tokio::test]
    async fn an_observer_answers_a_leader_back_after_a_vacancy() {
        let client = Client::new(Arc::new(MemoryStore::new()));
        let session = client.session().open().await.expect("open");
        let mut observer = client
            .observe("jobs")
            .every(std::time::Duration::from_millis(10));
        assert_eq!(observer.next().await.expect("first"), None);
        let leading = session.elect("jobs").value("me").await.expect("elected");
        let first = observer.next().await.expect("leader").expect("someone");
        assert_eq!((first.value.as_str(), first.term), ("me", leading.term()));
        leading.resign().await.expect("resign");
        assert_eq!(observer.next().await.expect("vacancy"), None);
        let again = session.elect("jobs").value("me").await.expect("elected");
        let second = observer.next().await.expect("leader").expect("someone");
        assert!(second.term > first.term);
        again.resign().await.expect("resign");
    }
}
