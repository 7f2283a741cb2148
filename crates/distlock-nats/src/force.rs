//! `force_release`: an operator ends every hold of a key by deleting the
//! holders' entries by sequence, with a notice each. Waiters watch the
//! notice of the entry ahead of them, so they wake and are granted as on a
//! release; a grant's token is its entry's stream sequence, which only
//! grows, so the next one is higher. Each old holder's session watches the
//! notices of its own entries, and its renewal checks them: it learns it
//! lost the key.

use std::collections::BTreeSet;

use distlock_core::status::HolderStatus;
use distlock_core::store::{queue, Mode};
use distlock_core::Result;
use futures::future::join_all;

use crate::client::Nats;
use crate::status::leases_left;
use crate::wire::{lock_hash, queue_filter, Entry};

/// Deletes the entries of `key`'s queue that hold it; what they held.
/// Holders are those of the queue as read, among entries of sessions that
/// live: a hold granted after the read (a waiter next in line) is not
/// ended, as it was not stuck.
pub(crate) async fn end_holds(nats: &Nats, key: &str) -> Result<Vec<HolderStatus>> {
    let entries = nats
        .read_entries(&queue_filter(&lock_hash(key)), None)
        .await?;
    let queue: Vec<&Entry> = entries.iter().filter(|entry| entry.key == key).collect();
    let sessions: BTreeSet<&str> = queue.iter().map(|entry| entry.session.as_str()).collect();
    let left = leases_left(nats, &sessions).await?;
    let live: Vec<&Entry> = queue
        .into_iter()
        .filter(|entry| left.contains_key(entry.session.as_str()))
        .collect();
    let tags: Vec<&str> = live.iter().map(|entry| entry.tag.as_str()).collect();
    let holding: Vec<&Entry> = live
        .iter()
        .zip(queue::holders(&tags))
        .filter_map(|(entry, holds)| holds.then_some(*entry))
        .collect();
    let removals = holding
        .iter()
        .map(|entry| nats.remove_entry(&entry.subject, entry.seq));
    let mut ended = Vec::new();
    for (entry, removed) in holding.iter().zip(join_all(removals).await) {
        if removed? {
            ended.push(HolderStatus {
                session: entry.session.clone(),
                owner: entry.owner.clone(),
                mode: Mode::from_tag(&entry.tag).unwrap_or(Mode::Exclusive),
                token: Some(entry.seq),
                held_for: None,
                lease_left: left.get(entry.session.as_str()).copied().flatten(),
            });
        }
    }
    Ok(ended)
}
