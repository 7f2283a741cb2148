//! What the table can say about itself: `check`, `status`, counters, and
//! the signals of watched keys.

use tokio::time::Instant;

use super::LockTable;
use crate::status::{Counters, HolderStatus, KeyStatus, StatusQuery, WaiterStatus};
use crate::store::{KeyWatch, KeyWatcher};

impl LockTable {
    /// Whether `token` is the token of a current holder of `key` (Chubby's
    /// CheckSequencer): a resource can ask before it accepts a write.
    pub fn check(&mut self, key: &str, token: u64) -> bool {
        self.purge(Instant::now());
        self.keys
            .get(key)
            .is_some_and(|state| state.holders.iter().any(|h| h.token == token))
    }

    /// The keys that are held or waited for and match `query`, sorted by
    /// key.
    pub fn status(&mut self, query: &StatusQuery) -> Vec<KeyStatus> {
        let now = Instant::now();
        self.purge(now);
        let owner = |session| {
            self.sessions
                .get(&session)
                .map(|s| s.spec.owner.clone())
                .unwrap_or_default()
        };
        let mut keys: Vec<KeyStatus> = self
            .keys
            .iter()
            .filter(|(key, _)| query.matches(key))
            .map(|(key, state)| KeyStatus {
                key: key.clone(),
                holders: state
                    .holders
                    .iter()
                    .map(|h| {
                        let lease = self.sessions.get(&h.session).map(|s| s.expires_at);
                        let ends = lease.into_iter().chain(h.until).min().unwrap_or(now);
                        HolderStatus {
                            session: h.session.to_string(),
                            owner: owner(h.session),
                            mode: h.mode,
                            token: Some(h.token),
                            held_for: Some(now - h.acquired_at),
                            lease_left: Some(ends.saturating_duration_since(now)),
                        }
                    })
                    .collect(),
                waiters: state
                    .queue
                    .iter()
                    .map(|w| WaiterStatus {
                        session: w.session.to_string(),
                        owner: owner(w.session),
                        mode: w.mode,
                        waiting_for: Some(now - w.since),
                    })
                    .collect(),
                last_token: Some(state.last_token),
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        keys
    }

    /// The counters, with the sizes counted now.
    pub fn counters(&mut self) -> Counters {
        self.purge(Instant::now());
        let (held, waiters) = self.keys.values().fold((0, 0), |(held, waiters), state| {
            (
                held + state.holders.len() as u64,
                waiters + state.queue.len() as u64,
            )
        });
        Counters {
            sessions: self.sessions.len() as u64,
            held,
            waiters,
            ..self.counters.clone()
        }
    }

    /// A signal on every change of `key`'s holders from now on, until the
    /// receiver is dropped.
    pub fn watch_key(&mut self, key: &str) -> KeyWatch {
        let (watcher, watch) = KeyWatcher::new();
        // Watchers of keys nobody changes are forgotten too, now and then.
        self.watches_made += 1;
        if self.watches_made.is_multiple_of(1024) {
            self.watchers.retain(|_, watchers| {
                watchers.retain(|watcher| !watcher.is_closed());
                !watchers.is_empty()
            });
        }
        let watchers = self.watchers.entry(key.to_owned()).or_default();
        watchers.retain(|watcher| !watcher.is_closed());
        watchers.push(watcher);
        watch
    }

    /// Signals `key`'s watchers, forgetting those that left.
    pub(super) fn notify(&mut self, key: &str) {
        if let Some(watchers) = self.watchers.get_mut(key) {
            watchers.retain(KeyWatcher::signal);
            if watchers.is_empty() {
                self.watchers.remove(key);
            }
        }
    }
}
