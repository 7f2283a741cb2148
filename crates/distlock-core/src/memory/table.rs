//! The memory store's lock table: sessions with leases, per-key FIFO queues
//! with pushed grants, lock-delay and fencing counters. Synchronous; the
//! caller holds the one mutex around it for each short step.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::store::Mode;

pub(super) type SessionId = u64;
pub(super) type WaiterId = u64;

#[derive(Debug)]
struct SessionState {
    ttl: Duration,
    lock_delay: Duration,
    expires_at: Instant,
    holding: HashSet<String>,
    waiting: HashSet<String>,
}

#[derive(Debug)]
struct Holder {
    session: SessionId,
    mode: Mode,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    session: SessionId,
    mode: Mode,
    grant: oneshot::Sender<u64>,
}

#[derive(Debug, Default)]
struct KeyState {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
    blocked_until: Option<Instant>,
}

impl KeyState {
    /// Whether `mode` may join the current holders.
    fn admits(&self, mode: Mode) -> bool {
        let holders = &self.holders;
        match mode {
            _ if holders.is_empty() => true,
            Mode::Exclusive => false,
            Mode::Shared => holders.iter().all(|h| h.mode == Mode::Shared),
            Mode::Semaphore { permits } => {
                holders
                    .iter()
                    .all(|h| matches!(h.mode, Mode::Semaphore { .. }))
                    && holders.len() < permits as usize
            }
        }
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.holders.is_empty()
            && self.queue.is_empty()
            && self.blocked_until.is_none_or(|until| until <= now)
    }
}

/// What a fresh acquire found.
pub(super) enum Attempt {
    Granted(u64),
    Busy,
    Queued(WaiterId, oneshot::Receiver<u64>),
    SessionGone,
}

/// The whole in-memory lock table.
#[derive(Debug, Default)]
pub(super) struct Table {
    sessions: HashMap<SessionId, SessionState>,
    expiries: BTreeSet<(Instant, SessionId)>,
    keys: HashMap<String, KeyState>,
    /// Fencing counters; never removed, so tokens never go backwards.
    tokens: HashMap<String, u64>,
    next_id: u64,
}

impl Table {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn open_session(&mut self, ttl: Duration, lock_delay: Duration) -> SessionId {
        let id = self.next_id();
        let expires_at = Instant::now() + ttl;
        self.sessions.insert(
            id,
            SessionState {
                ttl,
                lock_delay,
                expires_at,
                holding: HashSet::new(),
                waiting: HashSet::new(),
            },
        );
        self.expiries.insert((expires_at, id));
        id
    }

    /// Extends the lease; `false` if the session is gone.
    pub(super) fn renew(&mut self, id: SessionId) -> bool {
        self.purge(Instant::now());
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        self.expiries.remove(&(session.expires_at, id));
        session.expires_at = Instant::now() + session.ttl;
        self.expiries.insert((session.expires_at, id));
        true
    }

    /// Whether the session holds `key`.
    pub(super) fn holds(&self, id: SessionId, key: &str) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|session| session.holding.contains(key))
    }

    /// Ends expired sessions: their locks are freed (the keys then stay
    /// blocked for the session's lock-delay) and their waiters leave.
    pub(super) fn purge(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            self.end_session(id, Some(now));
        }
    }

    /// Removes a session and everything it holds or waits for. With
    /// `expired_at`, its keys are blocked for its lock-delay.
    pub(super) fn end_session(&mut self, id: SessionId, expired_at: Option<Instant>) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        self.expiries.remove(&(session.expires_at, id));
        for key in &session.waiting {
            if let Some(state) = self.keys.get_mut(key) {
                // Dropping the waiter's sender tells it the session is gone.
                state.queue.retain(|w| w.session != id);
            }
        }
        for key in &session.holding {
            if let Some(state) = self.keys.get_mut(key) {
                state.holders.retain(|h| h.session != id);
                if let Some(now) = expired_at.filter(|_| !session.lock_delay.is_zero()) {
                    let until = now + session.lock_delay;
                    state.blocked_until = Some(state.blocked_until.map_or(until, |b| b.max(until)));
                }
            }
        }
        let now = Instant::now();
        for key in session.waiting.iter().chain(&session.holding) {
            self.pump(key, now);
        }
    }

    fn grant_token(&mut self, key: &str) -> u64 {
        let counter = self.tokens.entry(key.to_owned()).or_insert(0);
        *counter += 1;
        *counter
    }

    /// A fresh request. Granted at once only if nobody waits ahead of it,
    /// so that queued waiters (writers included) are never overtaken.
    pub(super) fn acquire(&mut self, id: SessionId, key: &str, mode: Mode, queue: bool) -> Attempt {
        let now = Instant::now();
        self.purge(now);
        if !self.sessions.contains_key(&id) {
            return Attempt::SessionGone;
        }
        let state = self.keys.entry(key.to_owned()).or_default();
        let blocked = state.blocked_until.is_some_and(|until| until > now);
        if !blocked && state.queue.is_empty() && state.admits(mode) {
            state.holders.push(Holder { session: id, mode });
            self.add_holding(id, key);
            return Attempt::Granted(self.grant_token(key));
        }
        if !queue {
            self.tidy(key, now);
            return Attempt::Busy;
        }
        let waiter = self.next_id();
        let (grant, receiver) = oneshot::channel();
        let state = self.keys.get_mut(key).expect("entry made above");
        state.queue.push_back(Waiter {
            id: waiter,
            session: id,
            mode,
            grant,
        });
        if let Some(session) = self.sessions.get_mut(&id) {
            session.waiting.insert(key.to_owned());
        }
        Attempt::Queued(waiter, receiver)
    }

    fn add_holding(&mut self, id: SessionId, key: &str) {
        if let Some(session) = self.sessions.get_mut(&id) {
            session.holding.insert(key.to_owned());
        }
    }

    /// Grants queued waiters at the head of `key`'s queue while they fit.
    fn pump(&mut self, key: &str, now: Instant) {
        loop {
            let Some(state) = self.keys.get_mut(key) else {
                return;
            };
            match state.blocked_until {
                Some(until) if until > now => return,
                Some(_) => state.blocked_until = None,
                None => {}
            }
            let Some(front) = state.queue.front() else {
                break;
            };
            if !state.admits(front.mode) {
                break;
            }
            let waiter = state.queue.pop_front().expect("front exists");
            state.holders.push(Holder {
                session: waiter.session,
                mode: waiter.mode,
            });
            if let Some(session) = self.sessions.get_mut(&waiter.session) {
                session.waiting.remove(key);
                session.holding.insert(key.to_owned());
            }
            let token = self.grant_token(key);
            if waiter.grant.send(token).is_err() {
                // The waiter went away as we granted: take it back.
                self.remove_holder(waiter.session, key);
            }
        }
        self.tidy(key, now);
    }

    fn remove_holder(&mut self, id: SessionId, key: &str) -> bool {
        let Some(state) = self.keys.get_mut(key) else {
            return false;
        };
        let before = state.holders.len();
        state.holders.retain(|h| h.session != id);
        let removed = state.holders.len() != before;
        if let Some(session) = self.sessions.get_mut(&id) {
            session.holding.remove(key);
        }
        removed
    }

    fn tidy(&mut self, key: &str, now: Instant) {
        if self.keys.get(key).is_some_and(|state| state.is_idle(now)) {
            self.keys.remove(key);
        }
    }

    /// Owner-checked release; `false` if the session did not hold `key`.
    pub(super) fn release(&mut self, id: SessionId, key: &str) -> bool {
        let now = Instant::now();
        self.purge(now);
        let released = self.remove_holder(id, key);
        self.pump(key, now);
        released
    }

    /// A waiter gave up (timeout or dropped future): it leaves the queue, or
    /// gives back the grant that raced with its leaving.
    pub(super) fn abandon(&mut self, id: SessionId, key: &str, waiter: WaiterId, granted: bool) {
        let now = Instant::now();
        if granted {
            self.remove_holder(id, key);
        } else if let Some(state) = self.keys.get_mut(key) {
            state.queue.retain(|w| w.id != waiter);
            if let Some(session) = self.sessions.get_mut(&id) {
                session.waiting.remove(key);
            }
        }
        self.pump(key, now);
    }

    /// Runs expiries due now, grants what they free, and says when the
    /// waiter of `id` on `key` should look again: the earliest of the key's
    /// lock-delay, its holders' lease ends, and the waiter's own lease end.
    pub(super) fn next_event(&mut self, id: SessionId, key: &str) -> Option<Instant> {
        let now = Instant::now();
        self.purge(now);
        self.pump(key, now);
        let own = self.sessions.get(&id).map(|s| s.expires_at);
        let state = self.keys.get(key)?;
        let holders = state
            .holders
            .iter()
            .filter_map(|h| self.sessions.get(&h.session).map(|s| s.expires_at));
        let blocked = state.blocked_until.filter(|until| *until > now);
        blocked.into_iter().chain(holders).chain(own).min()
    }
}
