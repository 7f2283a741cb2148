//! Multi-key requests: several keys granted in one step, or none.
//!
//! A queued multi-key request has a waiter (one id) in the queue of each of
//! its keys, put there in one step. It goes through its keys in byte
//! order, as a client locking them one by one in that order would, but
//! holding none: its waiter on a key blocks the waiters behind it only once
//! the request has *reached* that key, that is, heads and is admitted by
//! every key of it that sorts before. Until then its place is kept and
//! passed over. So:
//!
//! - nobody who locks keys in byte order (one by one, or this way) waits
//!   for it in a cycle: a session holding `a` that asks for `b` passes a
//!   request for {a, b} that waits for `a`;
//! - a request that has reached a key keeps it from later arrivals, so a
//!   stream of requests for `a` cannot starve a request for {a, b};
//! - it is granted when it heads every one of its keys and each admits it:
//!   every key at once.

use tokio::sync::oneshot;
use tokio::time::Instant;

use std::collections::{BTreeSet, HashMap};

use super::{KeyState, LockTable, SessionId, Waiter, WaiterId};

/// The heads of keys, as worked out so far in one look at the table.
type Heads = HashMap<String, Option<(usize, WaiterId)>>;

/// The keys still to pump, smallest first: a key's head depends only on
/// smaller keys, so each is pumped once per change.
pub(super) type Pending = BTreeSet<String>;
use crate::store::Mode;

/// A queued multi-key request.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) session: SessionId,
    /// Its keys in byte order, each with its place in the request.
    keys: Vec<(String, Mode, usize)>,
    /// Told the tokens, one per key in the order of the request.
    grant: oneshot::Sender<Vec<u64>>,
}

/// What a fresh multi-key acquire found.
#[derive(Debug)]
pub enum AttemptAll {
    /// Every key granted at once: its tokens, in the order asked.
    Granted(Vec<u64>),
    /// Some key is held (or blocked) and the caller did not want to wait.
    Busy,
    /// Queued: the tokens arrive on the receiver (wait with a
    /// [`GroupTicket`](super::GroupTicket)).
    Queued(WaiterId, oneshot::Receiver<Vec<u64>>),
    /// The session is unknown or has expired.
    SessionGone,
    /// The session already holds or waits for one of the keys.
    AlreadyHeld,
    /// One of the keys already has its limit of waiters.
    QueueFull,
    /// No token could be made safe to hand out.
    NoTokens,
}

impl LockTable {
    /// A fresh request for every key of `keys` (distinct) at once: granted
    /// now only if each is free and nobody waits for it, else queued in
    /// every key's queue (if `queue`) and granted all together later.
    pub fn acquire_all(
        &mut self,
        id: SessionId,
        keys: &[(String, Mode)],
        queue: bool,
    ) -> AttemptAll {
        let now = Instant::now();
        self.purge(now);
        for (key, _) in keys {
            self.pump(key, now);
        }
        let Some(session) = self.sessions.get(&id) else {
            return AttemptAll::SessionGone;
        };
        if keys
            .iter()
            .any(|(key, _)| session.holding.contains(key) || session.waiting.contains(key))
        {
            return AttemptAll::AlreadyHeld;
        }
        debug_assert!(
            {
                let mut names: Vec<&str> = keys.iter().map(|(key, _)| key.as_str()).collect();
                names.sort_unstable();
                names.windows(2).all(|pair| pair[0] != pair[1])
            },
            "acquire_all takes distinct keys"
        );
        let idle = KeyState::default();
        let free = keys.iter().all(|(key, mode)| {
            let state = self.keys.get(key).unwrap_or(&idle);
            self.head(key, now).is_none() && state.admits(*mode) && !self.grants_blocked(state, now)
        });
        if free {
            if !self.tokens_for(keys.len()) {
                return AttemptAll::NoTokens;
            }
            let tokens = keys
                .iter()
                .map(|(key, mode)| {
                    self.add_holder(id, key, *mode, now)
                        .expect("tokens were made safe above")
                })
                .collect();
            return AttemptAll::Granted(tokens);
        }
        if !queue {
            return AttemptAll::Busy;
        }
        let full = keys.iter().any(|(key, _)| {
            self.keys
                .get(key)
                .is_some_and(|state| state.queue.len() >= self.limits.max_waiters_per_key)
        });
        if full {
            return AttemptAll::QueueFull;
        }
        let waiter = self.next_id();
        let (grant, receiver) = oneshot::channel();
        for (key, mode) in keys {
            self.keys
                .entry(key.clone())
                .or_default()
                .queue
                .push_back(Waiter {
                    id: waiter,
                    session: id,
                    mode: *mode,
                    since: now,
                    grant: None,
                });
        }
        if let Some(session) = self.sessions.get_mut(&id) {
            session
                .waiting
                .extend(keys.iter().map(|(key, _)| key.clone()));
        }
        let mut sorted: Vec<(String, Mode, usize)> = keys
            .iter()
            .enumerate()
            .map(|(place, (key, mode))| (key.clone(), *mode, place))
            .collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        self.groups.insert(
            waiter,
            Group {
                session: id,
                keys: sorted,
                grant,
            },
        );
        AttemptAll::Queued(waiter, receiver)
    }

    /// The waiter of `key` that comes first: the first in its queue that
    /// blocks those behind it (every single-key waiter; a multi-key
    /// request's once it has reached the key), as its place and id.
    pub(super) fn head(&self, key: &str, now: Instant) -> Option<(usize, WaiterId)> {
        self.head_in(key, now, &mut Heads::new())
    }

    /// [`head`](LockTable::head), each key's worked out once per `heads`:
    /// a key's head depends only on the heads of smaller keys, so the
    /// recursion ends, and with the memo costs one pass over the queues.
    fn head_in(&self, key: &str, now: Instant, heads: &mut Heads) -> Option<(usize, WaiterId)> {
        if let Some(known) = heads.get(key) {
            return *known;
        }
        let found = self.keys.get(key).and_then(|state| {
            state.queue.iter().enumerate().find_map(|(place, waiter)| {
                let blocks = waiter.grant.is_some() || self.reached(waiter.id, key, now, heads);
                blocks.then_some((place, waiter.id))
            })
        });
        heads.insert(key.to_owned(), found);
        found
    }

    /// Whether multi-key request `id` leads each of its keys that sorts
    /// before `key`.
    fn reached(&self, id: WaiterId, key: &str, now: Instant, heads: &mut Heads) -> bool {
        let Some(group) = self.groups.get(&id) else {
            return false;
        };
        group
            .keys
            .iter()
            .take_while(|(other, _, _)| other.as_str() < key)
            .all(|(other, mode, _)| self.leads(id, other, *mode, now, heads))
    }

    /// Whether multi-key request `id` heads `key`, which admits it now.
    fn leads(&self, id: WaiterId, key: &str, mode: Mode, now: Instant, heads: &mut Heads) -> bool {
        self.keys.get(key).is_some_and(|state| {
            !self.grants_blocked(state, now)
                && state.admits(mode)
                && self
                    .head_in(key, now, heads)
                    .is_some_and(|(_, head)| head == id)
        })
    }

    /// The later keys of the multi-key requests waiting on `key`: which of
    /// them these requests have reached may have changed with `key`.
    pub(super) fn later_keys(&self, key: &str) -> Vec<String> {
        let Some(state) = self.keys.get(key) else {
            return Vec::new();
        };
        state
            .queue
            .iter()
            .filter(|waiter| waiter.grant.is_none())
            .filter_map(|waiter| self.groups.get(&waiter.id))
            .flat_map(|group| group.keys.iter())
            .filter(|(other, _, _)| other.as_str() > key)
            .map(|(other, _, _)| other.clone())
            .collect()
    }

    /// Grants the multi-key request `id` if it heads every one of its
    /// queues and every key admits it; its keys go on `pending`.
    pub(super) fn grant_group(
        &mut self,
        id: WaiterId,
        now: Instant,
        pending: &mut Pending,
    ) -> bool {
        let Some(group) = self.groups.get(&id) else {
            return false;
        };
        let mut heads = Heads::new();
        let ready = group
            .keys
            .iter()
            .all(|(key, mode, _)| self.leads(id, key, *mode, now, &mut heads));
        if !ready || !self.tokens_for(group.keys.len()) {
            return false;
        }
        let group = self.groups.remove(&id).expect("looked up above");
        let mut tokens = vec![0; group.keys.len()];
        for (key, mode, place) in &group.keys {
            let state = self.keys.get_mut(key).expect("checked above");
            state.blocked_until = None;
            state.queue.retain(|waiter| waiter.id != id);
            tokens[*place] = self
                .add_holder(group.session, key, *mode, now)
                .expect("tokens were made safe above");
            pending.insert(key.clone());
        }
        if group.grant.send(tokens.clone()).is_err() {
            // The waiter went away as we granted: take them all back.
            for (key, _, place) in &group.keys {
                self.remove_holder(group.session, key, Some(tokens[*place]));
            }
        }
        true
    }

    /// A multi-key waiter gave up: it leaves every queue, or gives back
    /// the grants (`granted`, in the order of `keys`) that raced with its
    /// leaving.
    pub fn abandon_all(
        &mut self,
        id: SessionId,
        keys: &[(String, Mode)],
        waiter: WaiterId,
        granted: Option<Vec<u64>>,
    ) {
        let now = Instant::now();
        self.purge(now);
        if let Some(tokens) = granted {
            for ((key, _), token) in keys.iter().zip(tokens) {
                self.remove_holder(id, key, Some(token));
            }
        } else if self.groups.remove(&waiter).is_some() {
            for (key, _) in keys {
                if let Some(state) = self.keys.get_mut(key) {
                    state.queue.retain(|w| w.id != waiter);
                }
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.waiting.remove(key);
                }
            }
        }
        for (key, _) in keys {
            self.pump(key, now);
        }
    }

    /// When the multi-key waiter of `id` on `keys` should look again: the
    /// earliest of its keys' [`next_event`](LockTable::next_event)s.
    pub fn next_event_all(&mut self, id: SessionId, keys: &[(String, Mode)]) -> Option<Instant> {
        keys.iter()
            .filter_map(|(key, _)| self.next_event(id, key))
            .min()
    }
}
