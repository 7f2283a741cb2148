//! Leader election on any store: `session.elect(name).value(v).campaign()`.
//!
//! The leader is the holder of one lock, `name`, held by a session of its
//! own whose owner is the leader's value; its token is the leader's term.
//! Anyone reads the leader from the store's status of that key (the
//! holder's owner and token), so every store whose status shows both can
//! tell who leads; the others can still elect.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::guard::Guard;
use super::{Session, SessionConfig};
use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::status::StatusQuery;
use crate::store::{default_owner, validate_owner, Capabilities, Mode};

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
                format!("election value refused: {err}; publish a longer value elsewhere, keyed by the term"),
            )
        })?;
        if parent.ended.is_cancelled() {
            return Err(parent.ended_error());
        }
        config.owner = Some(value.clone());
        // The leadership's own session carries the value as its owner; it
        // ends when the campaigning session ends or the leadership goes.
        let session = Session::open(parent.opener.clone(), config).await?;
        let watch = CancellationToken::new();
        tokio::spawn({
            let (parent_ended, gone) = (parent.ended.clone(), watch.clone());
            let session = session.clone();
            async move {
                tokio::select! {
                    () = parent_ended.cancelled() => {
                        if let Err(err) = session.close().await {
                            tracing::debug!("closing a leadership whose session ended: {err}");
                        }
                    }
                    () = gone.cancelled() => {}
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
                return Err(err);
            }
        };
        Ok(Leadership {
            name: self.name,
            value,
            guard,
            session,
            _campaigner: self.session,
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
    _campaigner: Session,
    _closer: DropGuard,
}

impl Leadership {
    /// The term: strictly greater than every earlier leader's of this
    /// election (the hold's fencing token). Write it with every act of the
    /// leader, as a token.
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

    /// The session that holds the leadership: opened by the campaign with
    /// the campaigning session's lease, and closed with the leadership.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The leadership as the guard of its name's lock (its token is the
    /// term), for code that supervises guards. It leads while the guard
    /// holds; it no longer ends when the campaigning session does.
    pub fn into_guard(self) -> Guard {
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
        let holder = status
            .keys
            .iter()
            .filter(|key| key.key == name)
            .flat_map(|key| key.holders.iter())
            .find(|holder| holder.mode == mode);
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
/// seen is never answered. The store is asked every
/// [`every`](Observer::every) (200 ms by default); leaders that come and
/// go between two asks are not seen.
#[derive(Debug)]
pub struct Observer {
    client: Client,
    name: String,
    every: Duration,
    /// What the last `next` answered (`None` before the first).
    seen: Option<Option<Leader>>,
    /// The highest term answered so far.
    highest: u64,
}

impl Observer {
    /// How often to ask the store.
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// The next leader, or `None` when nobody leads; see [`Observer`].
    /// Errors from the store are answered as they come; call again to go
    /// on. Cancel safe.
    pub async fn next(&mut self) -> Result<Option<Leader>> {
        loop {
            let now = self.client.leader(&self.name).await?;
            let changed = match (&self.seen, &now) {
                (None, _) => true,
                (Some(Some(_)), None) => true,
                (Some(_), Some(leader)) => leader.term > self.highest,
                (Some(None), None) => false,
            };
            if changed {
                if let Some(leader) = &now {
                    self.highest = self.highest.max(leader.term);
                }
                self.seen = Some(now.clone());
                return Ok(now);
            }
            sleep(self.every).await;
        }
    }
}
