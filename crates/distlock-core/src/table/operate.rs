//! What operators and resumed sessions ask of the table: a forced release,
//! and keeping only the holds a resuming client knows of.

use tokio::time::Instant;

use super::{LockTable, SessionId};
use crate::status::{HolderStatus, StatusQuery};

impl LockTable {
    /// Ends every hold on `key` (an operator's forced release) and grants it
    /// on: the next holder's token is above every ended one's, and each
    /// ended holder's next renewal reports the key lost. What was held.
    pub fn force_release(&mut self, key: &str) -> Vec<HolderStatus> {
        let now = Instant::now();
        self.purge(now);
        let query = StatusQuery::Key(key.to_owned());
        let held = self
            .status(&query)
            .pop()
            .map(|status| status.holders)
            .unwrap_or_default();
        let sessions: Vec<SessionId> = self
            .keys
            .get(key)
            .map(|state| state.holders.iter().map(|h| h.session).collect())
            .unwrap_or_default();
        for id in sessions {
            self.remove_holder(id, key, None);
        }
        if !held.is_empty() {
            self.counters.forced_releases += 1;
        }
        self.pump(key, now);
        self.tidy(key, now);
        held
    }

    /// Ends every queued wait of session `id`, then every hold but those
    /// named in `keep` (key and token): a resumed session keeps only what its
    /// client knows it holds. The keys whose holds it ended.
    ///
    /// The waits go in the same step, first: a wait of the replaced stream
    /// could otherwise take a grant made after the holds were settled, and
    /// the session would hold a key its client never learns of.
    pub fn keep_only(&mut self, id: SessionId, keep: &[(String, u64)]) -> Vec<String> {
        let now = Instant::now();
        self.purge(now);
        let (waiting, holding): (Vec<String>, Vec<String>) = match self.sessions.get_mut(&id) {
            Some(session) => (
                session.waiting.drain().collect(),
                session.holding.iter().cloned().collect(),
            ),
            None => return Vec::new(),
        };
        self.groups.retain(|_, group| group.session != id);
        for key in &waiting {
            if let Some(state) = self.keys.get_mut(key) {
                // Dropping the waiter's sender ends its wait, ungranted.
                state.queue.retain(|w| w.session != id);
            }
            // The waiters behind it may fit now.
            self.pump(key, now);
        }
        let mut ended = Vec::new();
        for key in holding {
            let tokens: Vec<u64> = self.keys.get(&key).map_or_else(Vec::new, |state| {
                state
                    .holders
                    .iter()
                    .filter(|h| h.session == id)
                    .map(|h| h.token)
                    .collect()
            });
            for token in tokens {
                if !keep.iter().any(|(k, t)| *k == key && *t == token) {
                    self.release(id, &key, Some(token));
                    ended.push(key.clone());
                }
            }
        }
        ended
    }
}
