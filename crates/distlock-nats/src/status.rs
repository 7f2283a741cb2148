//! `status`: the queues asked about, split into holders and waiters by the
//! core's queue decision, with the entries of ended sessions left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery, WaiterStatus};
use distlock_core::store::queue;
use distlock_core::store::Mode;
use distlock_core::Result;
use futures::StreamExt;

use crate::client::Nats;
use crate::wire::{self, lock_hash, queue_filter, session_subject, Entry, ALL_QUEUES};

/// How many sessions a status asks about at once.
const AT_ONCE: usize = 32;

/// The mode a tag names. A tag that names none blocks like a writer in
/// the queue decision, and is shown as one.
fn mode_of(tag: &str) -> Mode {
    Mode::from_tag(tag).unwrap_or(Mode::Exclusive)
}

/// Reads the queues `query` names (a prefix reads every queue: keys are
/// hashed into subjects), then the session of each entry.
pub(crate) async fn read_status(nats: &Nats, query: &StatusQuery) -> Result<Status> {
    let filter = match query {
        StatusQuery::Key(key) => queue_filter(&lock_hash(key)),
        StatusQuery::Prefix(_) => ALL_QUEUES.to_owned(),
    };
    let entries = nats.read_entries(&filter, None).await?;
    let sessions: BTreeSet<&str> = entries
        .iter()
        .filter(|entry| query.matches(&entry.key))
        .map(|entry| entry.session.as_str())
        .collect();
    let left = leases_left(nats, &sessions).await?;
    // By key, each queue oldest first; only entries of sessions that live.
    let mut queues: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for entry in &entries {
        if query.matches(&entry.key) && left.contains_key(entry.session.as_str()) {
            queues.entry(entry.key.as_str()).or_default().push(entry);
        }
    }
    let keys = queues
        .into_iter()
        .map(|(key, queue)| key_status(key, &queue, &left))
        .collect();
    Ok(Status {
        keys,
        counters: None,
    })
}

/// The time left of each session that lives, by its last message's time
/// and TTL (as this host's clock reads the server's: an estimate). A
/// session whose time cannot be read counts as alive, its time unknown.
pub(crate) async fn leases_left<'a>(
    nats: &Nats,
    sessions: &BTreeSet<&'a str>,
) -> Result<HashMap<&'a str, Option<Duration>>> {
    let asked: Vec<_> = sessions
        .iter()
        .map(|&session| async move {
            let last = nats.leader_last(&session_subject(session)).await;
            (session, last)
        })
        .collect();
    let answers: Vec<_> = futures::stream::iter(asked)
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut left = HashMap::new();
    for (session, last) in answers {
        let Some(message) = last? else { continue };
        if !wire::session_is_live(&message.headers) {
            continue;
        }
        let ttl = message
            .headers
            .get(wire::TTL)
            .and_then(|ttl| ttl.as_str().parse::<u64>().ok());
        let written = SystemTime::UNIX_EPOCH
            + Duration::from_nanos(
                u64::try_from(message.time.unix_timestamp_nanos()).unwrap_or_default(),
            );
        let ends = ttl.map(|ttl| written + Duration::from_secs(ttl));
        let remaining = ends.map(|ends| {
            ends.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        left.insert(session, remaining);
    }
    Ok(left)
}

/// One lock's queue, oldest first, as holders and waiters.
fn key_status(key: &str, queue: &[&Entry], left: &HashMap<&str, Option<Duration>>) -> KeyStatus {
    let tags: Vec<&str> = queue.iter().map(|entry| entry.tag.as_str()).collect();
    let mut status = KeyStatus {
        key: key.to_owned(),
        holders: Vec::new(),
        waiters: Vec::new(),
        last_token: None,
    };
    for (entry, holds) in queue.iter().zip(queue::holders(&tags)) {
        if holds {
            status.holders.push(HolderStatus {
                session: entry.session.clone(),
                owner: entry.owner.clone(),
                mode: mode_of(&entry.tag),
                token: Some(entry.seq),
                held_for: None,
                lease_left: left.get(entry.session.as_str()).copied().flatten(),
            });
        } else {
            status.waiters.push(WaiterStatus {
                session: entry.session.clone(),
                owner: entry.owner.clone(),
                mode: mode_of(&entry.tag),
                waiting_for: None,
            });
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_give_their_mode() {
        assert_eq!(mode_of("x"), Mode::Exclusive);
        assert_eq!(mode_of("s"), Mode::Shared);
        assert_eq!(mode_of("p12"), Mode::Semaphore { permits: 12 });
        for odd in ["p0", "p", "", "q"] {
            assert_eq!(mode_of(odd), Mode::Exclusive, "{odd}");
        }
    }
}
