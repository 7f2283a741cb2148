//! The lock table: the state machine of a lock service. Sessions with
//! leases, per-key FIFO queues with pushed grants, exclusive, shared
//! (writer-preferring) and semaphore modes, lock-delay, `max_hold`, fencing
//! counters, `check` and `status`.
//!
//! It is synchronous and does no I/O; the memory store and the distlock
//! server each keep one behind a mutex and hold it for each short step.
//! Expiry needs no task of its own: every step first ends what has expired
//! (one ordered queue of deadlines), and a waiter sleeps until the next
//! instant that could change its answer ([`LockTable::next_event`]).

mod group;
mod operate;
mod status;
mod wait;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::status::Counters;
use crate::store::{Capabilities, Fencing, KeyWatcher, Mode};
pub use group::AttemptAll;
pub use wait::{lock_table, GroupTicket, SharedTable, Ticket, Waited, WaitedAll};

/// What a store backed by a lock table supports: everything the table does
/// (FIFO, writer-preferring shared locks, semaphores, pushed grants, leases,
/// lock-delay), with the store's name and the strength of its tokens.
pub fn capabilities(name: &'static str, fencing: Fencing) -> Capabilities {
    let mut caps = crate::store::queue::capabilities(name);
    caps.fencing = fencing;
    caps.lock_delay = true;
    caps.status = true;
    caps.keeps_owner = true;
    caps.force_release = true;
    caps.tells_leader = true;
    caps.atomic_lock_all = true;
    caps.watches_keys = true;
    caps
}

/// A session's number in its table.
pub type SessionId = u64;
/// A queued request's number in its table.
pub type WaiterId = u64;

/// What a session is opened with.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Who the session says it is, for `status`.
    pub owner: String,
    /// The lease.
    pub ttl: Duration,
    /// How long its keys stay blocked if it expires holding them.
    pub lock_delay: Duration,
    /// The longest the table lets it hold one lock, if limited.
    pub max_hold: Option<Duration>,
}

/// Bounds that keep one client from exhausting the table.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open sessions at once.
    pub max_sessions: usize,
    /// Queued requests per key.
    pub max_waiters_per_key: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: usize::MAX,
            max_waiters_per_key: usize::MAX,
        }
    }
}

/// Where fencing tokens start and how high they may go before something
/// durable must say so: the distlock server keeps an epoch on disk so that
/// tokens never go backwards across restarts, without a write per grant.
pub trait TokenRange: Send + std::fmt::Debug {
    /// The first token of a key is above this.
    fn base(&self) -> u64;
    /// Tokens below this may be handed out.
    fn ceiling(&self) -> u64;
    /// Makes tokens up to at least `needed` safe to hand out (e.g. by
    /// writing a higher epoch to disk); `false` if it cannot.
    fn raise(&mut self, needed: u64) -> bool;
}

/// Tokens from 1 up, in memory only: for the memory store.
#[derive(Debug, Default)]
pub struct InMemoryTokens;

impl TokenRange for InMemoryTokens {
    fn base(&self) -> u64 {
        0
    }
    fn ceiling(&self) -> u64 {
        u64::MAX
    }
    fn raise(&mut self, _needed: u64) -> bool {
        true
    }
}

#[derive(Debug)]
struct SessionState {
    spec: SessionSpec,
    expires_at: Instant,
    holding: HashSet<String>,
    waiting: HashSet<String>,
}

#[derive(Debug)]
struct Holder {
    session: SessionId,
    mode: Mode,
    token: u64,
    acquired_at: Instant,
    /// When `max_hold` ends this hold.
    until: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    session: SessionId,
    mode: Mode,
    since: Instant,
    /// `None` for a key of a multi-key request, told through its
    /// [`group::Group`] (with the same id).
    grant: Option<oneshot::Sender<u64>>,
}

#[derive(Debug, Default)]
struct KeyState {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
    blocked_until: Option<Instant>,
    /// The last token granted for the key while it had state, for `status`.
    last_token: u64,
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
#[derive(Debug)]
pub enum Attempt {
    /// Granted at once, with this token.
    Granted(u64),
    /// Held (or blocked) and the caller did not want to wait.
    Busy,
    /// Queued: the token arrives on the receiver (wait for it with a [`Ticket`]).
    Queued(WaiterId, oneshot::Receiver<u64>),
    /// The session is unknown or has expired.
    SessionGone,
    /// The session already holds or waits for the key; a session takes a
    /// key once (reentrancy is the client's business).
    AlreadyHeld,
    /// The key already has [`Limits::max_waiters_per_key`] waiters.
    QueueFull,
    /// No token could be made safe to hand out (the token range could not
    /// be raised).
    NoTokens,
}

/// Why a session could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions(pub usize);

/// The lock table. See the module docs.
#[derive(Debug)]
pub struct LockTable {
    limits: Limits,
    tokens: Box<dyn TokenRange>,
    sessions: HashMap<SessionId, SessionState>,
    /// Session lease ends, in order.
    expiries: BTreeSet<(Instant, SessionId)>,
    /// `max_hold` ends, in order.
    hold_expiries: BTreeSet<(Instant, SessionId, String)>,
    /// Lock-delay ends, in order: the key is granted on or forgotten then.
    block_ends: BTreeSet<(Instant, String)>,
    keys: HashMap<String, KeyState>,
    /// Queued multi-key requests, by waiter id: each has a waiter of that
    /// id in every one of its keys' queues.
    groups: HashMap<WaiterId, group::Group>,
    /// Told of every change of a key's holders (`watch_key`).
    watchers: HashMap<String, Vec<KeyWatcher>>,
    /// Watches made, to sweep `watchers` now and then.
    watches_made: u64,
    /// The last token granted for any key. One counter for the table keeps
    /// every key's tokens strictly increasing without remembering every key
    /// ever locked.
    last_token: u64,
    /// No grant at all before this (a restarted server waits out the
    /// leases of the sessions it forgot).
    grants_blocked_until: Option<Instant>,
    counters: Counters,
    next_id: u64,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable::new(Limits::default(), Box::new(InMemoryTokens))
    }
}

impl LockTable {
    /// An empty table.
    pub fn new(limits: Limits, tokens: Box<dyn TokenRange>) -> Self {
        LockTable {
            limits,
            tokens,
            sessions: HashMap::new(),
            expiries: BTreeSet::new(),
            hold_expiries: BTreeSet::new(),
            block_ends: BTreeSet::new(),
            keys: HashMap::new(),
            groups: HashMap::new(),
            watchers: HashMap::new(),
            watches_made: 0,
            last_token: 0,
            grants_blocked_until: None,
            counters: Counters::default(),
            next_id: 0,
        }
    }

    /// Grants nothing before `until`.
    pub fn block_grants_until(&mut self, until: Instant) {
        self.grants_blocked_until = Some(until);
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Opens a session; its lease starts now.
    pub fn open_session(&mut self, spec: SessionSpec) -> Result<SessionId, TooManySessions> {
        self.purge(Instant::now());
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(TooManySessions(self.limits.max_sessions));
        }
        let id = self.next_id();
        let expires_at = Instant::now() + spec.ttl;
        self.sessions.insert(
            id,
            SessionState {
                spec,
                expires_at,
                holding: HashSet::new(),
                waiting: HashSet::new(),
            },
        );
        self.expiries.insert((expires_at, id));
        self.counters.sessions_opened += 1;
        Ok(id)
    }

    /// Extends the lease; `false` if the session is gone.
    pub fn renew(&mut self, id: SessionId) -> bool {
        self.purge(Instant::now());
        let Some(session) = self.sessions.get_mut(&id) else {
            return false;
        };
        self.expiries.remove(&(session.expires_at, id));
        session.expires_at = Instant::now() + session.spec.ttl;
        self.expiries.insert((session.expires_at, id));
        true
    }

    /// Whether session `id` is open (its lease may have run out since the
    /// last purge).
    pub fn has_session(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Whether the session holds `key`.
    pub fn holds(&self, id: SessionId, key: &str) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|session| session.holding.contains(key))
    }

    /// Ends expired sessions and holds past `max_hold`: their keys stay
    /// blocked for the session's lock-delay, their waiters leave.
    ///
    /// Everything due is ended before anything is granted, so no grant goes
    /// to a session that is itself due to end.
    pub fn purge(&mut self, now: Instant) {
        let mut freed = Vec::new();
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            self.counters.sessions_expired += 1;
            freed.extend(self.detach_session(id, Some(now)));
        }
        while let Some((at, _, _)) = self.hold_expiries.first() {
            if *at > now {
                break;
            }
            let (at, id, key) = self.hold_expiries.pop_first().expect("first exists");
            let still_held = self.keys.get(&key).is_some_and(|state| {
                state
                    .holders
                    .iter()
                    .any(|h| h.session == id && h.until == Some(at))
            });
            if still_held {
                self.counters.holds_expired += 1;
                self.remove_holder(id, &key, None);
                let delay = self.sessions.get(&id).map(|s| s.spec.lock_delay);
                self.block_key(&key, delay.unwrap_or_default(), now);
                freed.push(key);
            }
        }
        while self.block_ends.first().is_some_and(|(at, _)| *at <= now) {
            let (_, key) = self.block_ends.pop_first().expect("first exists");
            freed.push(key);
        }
        for key in freed {
            self.pump(&key, now);
        }
    }

    /// Blocks new grants of `key` for `delay` from `now`.
    fn block_key(&mut self, key: &str, delay: Duration, now: Instant) {
        if let Some(state) = self.keys.get_mut(key).filter(|_| !delay.is_zero()) {
            let until = now + delay;
            state.blocked_until = Some(state.blocked_until.map_or(until, |b| b.max(until)));
            // So that the key is looked at when the block ends, touched or not.
            self.block_ends.insert((until, key.to_owned()));
        }
    }

    /// Removes a session and everything it holds or waits for. With
    /// `expired_at`, its keys are blocked for its lock-delay.
    pub fn end_session(&mut self, id: SessionId, expired_at: Option<Instant>) {
        let now = Instant::now();
        self.purge(now);
        for key in self.detach_session(id, expired_at) {
            self.pump(&key, now);
        }
    }

    /// Removes a session's state; returns the keys that may now be granted.
    fn detach_session(&mut self, id: SessionId, expired_at: Option<Instant>) -> Vec<String> {
        let Some(session) = self.sessions.remove(&id) else {
            return Vec::new();
        };
        self.expiries.remove(&(session.expires_at, id));
        // Dropping a group's sender tells its waiter the session is gone.
        self.groups.retain(|_, group| group.session != id);
        for key in &session.waiting {
            if let Some(state) = self.keys.get_mut(key) {
                // Dropping the waiter's sender tells it the session is gone.
                state.queue.retain(|w| w.session != id);
            }
        }
        for key in &session.holding {
            self.remove_holder(id, key, None);
            if let Some(now) = expired_at {
                self.block_key(key, session.spec.lock_delay, now);
            }
        }
        session.waiting.into_iter().chain(session.holding).collect()
    }

    /// Whether the next `n` tokens can be made safe to hand out.
    fn tokens_for(&mut self, n: usize) -> bool {
        let last = self.last_token.max(self.tokens.base()) + n as u64;
        last < self.tokens.ceiling() || self.tokens.raise(last)
    }

    /// The next token, if one can be made safe to hand out.
    fn next_token(&mut self) -> Option<u64> {
        let token = self.last_token.max(self.tokens.base()) + 1;
        if token >= self.tokens.ceiling() && !self.tokens.raise(token) {
            return None;
        }
        self.last_token = token;
        self.counters.grants += 1;
        Some(token)
    }

    /// Records `session` as a holder of `key` with a fresh token.
    fn add_holder(&mut self, id: SessionId, key: &str, mode: Mode, now: Instant) -> Option<u64> {
        let token = self.next_token()?;
        // Callers only grant to live sessions (ended ones leave every queue).
        let Some(session) = self.sessions.get_mut(&id) else {
            return Some(token);
        };
        session.waiting.remove(key);
        session.holding.insert(key.to_owned());
        let until = session.spec.max_hold.map(|max| now + max);
        if let Some(until) = until {
            self.hold_expiries.insert((until, id, key.to_owned()));
        }
        let state = self.keys.entry(key.to_owned()).or_default();
        state.last_token = token;
        let holders = &mut state.holders;
        // Most keys have one holder; a Vec's first push would make room for 4.
        holders.reserve_exact(1);
        holders.push(Holder {
            session: id,
            mode,
            token,
            acquired_at: now,
            until,
        });
        self.notify(key);
        Some(token)
    }

    fn grants_blocked(&self, state: &KeyState, now: Instant) -> bool {
        let blocked = |until: Option<Instant>| until.is_some_and(|until| until > now);
        blocked(self.grants_blocked_until) || blocked(state.blocked_until)
    }

    /// A fresh request. Granted at once only if nobody waits ahead of it,
    /// so that queued waiters (writers included) are never overtaken.
    pub fn acquire(&mut self, id: SessionId, key: &str, mode: Mode, queue: bool) -> Attempt {
        let now = Instant::now();
        self.purge(now);
        // Waiters first: a lock-delay may have just ended.
        self.pump(key, now);
        let Some(session) = self.sessions.get(&id) else {
            return Attempt::SessionGone;
        };
        if session.holding.contains(key) || session.waiting.contains(key) {
            return Attempt::AlreadyHeld;
        }
        let free = self.head(key, now).is_none()
            && self.keys.entry(key.to_owned()).or_default().admits(mode);
        let blocked = self.grants_blocked(&self.keys[key], now);
        if free && !blocked {
            return match self.add_holder(id, key, mode, now) {
                Some(token) => Attempt::Granted(token),
                None => {
                    self.tidy(key, now);
                    Attempt::NoTokens
                }
            };
        }
        let state = self.keys.get_mut(key).expect("entry made above");
        if !queue {
            self.tidy(key, now);
            return Attempt::Busy;
        }
        if state.queue.len() >= self.limits.max_waiters_per_key {
            self.tidy(key, now);
            return Attempt::QueueFull;
        }
        self.next_id += 1;
        let waiter = self.next_id;
        let (grant, receiver) = oneshot::channel();
        state.queue.push_back(Waiter {
            id: waiter,
            session: id,
            mode,
            since: now,
            grant: Some(grant),
        });
        if let Some(session) = self.sessions.get_mut(&id) {
            session.waiting.insert(key.to_owned());
        }
        Attempt::Queued(waiter, receiver)
    }

    /// Grants queued waiters at the head of `key`'s queue while they fit,
    /// and of the other keys of the multi-key requests that granting frees.
    fn pump(&mut self, key: &str, now: Instant) {
        let mut pending = group::Pending::from([key.to_owned()]);
        while let Some(key) = pending.pop_first() {
            self.pump_one(&key, now, &mut pending);
        }
    }

    /// Grants the head of `key`'s queue while it fits; a multi-key request
    /// at the head is granted only with all its keys, and the queue waits
    /// until then (so that it is never starved). Keys whose queues a
    /// multi-key grant moved go on `pending`.
    fn pump_one(&mut self, key: &str, now: Instant, pending: &mut group::Pending) {
        // The requests waiting here may have reached, or lost, later keys
        // with whatever changed: those keys are looked at after this one.
        pending.extend(self.later_keys(key));
        loop {
            let Some(state) = self.keys.get(key) else {
                return;
            };
            if self.grants_blocked(state, now) {
                return;
            }
            let Some((place, id)) = self.head(key, now) else {
                break;
            };
            let front = &state.queue[place];
            if !state.admits(front.mode) {
                break;
            }
            if front.grant.is_none() {
                if !self.grant_group(id, now, pending) {
                    break;
                }
                continue;
            }
            let state = self.keys.get_mut(key).expect("checked above");
            state.blocked_until = None;
            let mut waiter = state.queue.remove(place).expect("the head is in the queue");
            let Some(token) = self.add_holder(waiter.session, key, waiter.mode, now) else {
                // No safe token: put it back and grant nothing for now.
                let state = self.keys.get_mut(key).expect("checked above");
                state.queue.insert(place, waiter);
                return;
            };
            let told = waiter
                .grant
                .take()
                .is_some_and(|grant| grant.send(token).is_ok());
            if !told {
                // The waiter went away as we granted: take it back.
                self.remove_holder(waiter.session, key, Some(token));
            }
        }
        pending.extend(self.later_keys(key));
        self.tidy(key, now);
    }

    /// Removes the session's hold of `key` (only the grant with `token`,
    /// if given).
    fn remove_holder(&mut self, id: SessionId, key: &str, token: Option<u64>) -> bool {
        let Some(state) = self.keys.get_mut(key) else {
            return false;
        };
        let matches = |h: &Holder| h.session == id && token.is_none_or(|token| h.token == token);
        let Some(index) = state.holders.iter().position(matches) else {
            return false;
        };
        let holder = state.holders.swap_remove(index);
        if let Some(until) = holder.until {
            self.hold_expiries.remove(&(until, id, key.to_owned()));
        }
        self.notify(key);
        if let Some(session) = self.sessions.get_mut(&id) {
            session.holding.remove(key);
        }
        true
    }

    fn tidy(&mut self, key: &str, now: Instant) {
        if self.keys.get(key).is_some_and(|state| state.is_idle(now)) {
            self.keys.remove(key);
        }
    }

    /// Owner-checked release (of the grant with `token` only, if given);
    /// `false` if the session did not hold it.
    pub fn release(&mut self, id: SessionId, key: &str, token: Option<u64>) -> bool {
        let now = Instant::now();
        self.purge(now);
        let released = self.remove_holder(id, key, token);
        if released {
            self.counters.releases += 1;
        }
        self.pump(key, now);
        released
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_edges;
