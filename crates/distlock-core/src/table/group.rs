//! Multi-key requests: several keys granted in one step, or none.
//!
//! A queued multi-key request has a waiter (one id) in the queue of each of
//! its keys, put there in one step, so any two requests sit in the same
//! order in every queue they share: the earliest waits for nobody queued
//! after it, and no two wait for each other. It is granted when it is at
//! the head of every one of its queues and every key admits it; until
//! then those queues wait behind it, so a stream of single-key requests
//! cannot starve it.

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{KeyState, LockTable, SessionId, Waiter, WaiterId};
use crate::store::Mode;

/// A queued multi-key request.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) session: SessionId,
    keys: Vec<(String, Mode)>,
    /// Told the tokens, one per key in the order of `keys`.
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
        let idle = KeyState::default();
        let free = keys.iter().all(|(key, mode)| {
            let state = self.keys.get(key).unwrap_or(&idle);
            state.queue.is_empty() && state.admits(*mode) && !self.grants_blocked(state, now)
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
        self.groups.insert(
            waiter,
            Group {
                session: id,
                keys: keys.to_vec(),
                grant,
            },
        );
        AttemptAll::Queued(waiter, receiver)
    }

    /// Grants the multi-key request `id` if it heads every one of its
    /// queues and every key admits it; the other keys go on `pending`.
    pub(super) fn grant_group(
        &mut self,
        id: WaiterId,
        now: Instant,
        pending: &mut Vec<String>,
    ) -> bool {
        let Some(group) = self.groups.get(&id) else {
            return false;
        };
        let ready = group.keys.iter().all(|(key, mode)| {
            self.keys.get(key).is_some_and(|state| {
                !self.grants_blocked(state, now)
                    && state.queue.front().is_some_and(|w| w.id == id)
                    && state.admits(*mode)
            })
        });
        if !ready || !self.tokens_for(group.keys.len()) {
            return false;
        }
        let group = self.groups.remove(&id).expect("looked up above");
        let mut tokens = Vec::with_capacity(group.keys.len());
        for (key, mode) in &group.keys {
            let state = self.keys.get_mut(key).expect("checked above");
            state.blocked_until = None;
            state.queue.pop_front();
            let token = self
                .add_holder(group.session, key, *mode, now)
                .expect("tokens were made safe above");
            tokens.push(token);
            pending.push(key.clone());
        }
        if group.grant.send(tokens.clone()).is_err() {
            // The waiter went away as we granted: take them all back.
            for ((key, _), token) in group.keys.iter().zip(tokens) {
                self.remove_holder(group.session, key, Some(token));
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
