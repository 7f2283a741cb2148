//! A waiter's view of its lock's queue: how it is read, and what blocks the
//! waiter.

use distlock_core::store::Mode;
use etcd_client::{GetOptions, GetResponse, KeyValue, SortOrder, SortTarget};

use super::mode_value;

/// How a waiter in `mode` reads its lock's queue. Keys after its own
/// (create revision `mine`, once known) never block it; an exclusive waiter
/// needs its own key and the two before it, the last three by creation.
/// (etcd reads the whole prefix either way; the limit keeps the answer small.)
pub(super) fn read_options(mode: Mode, mine: Option<i64>) -> GetOptions {
    let options = GetOptions::new().with_prefix();
    let options = match mine {
        Some(mine) => options.with_max_create_revision(mine),
        None => options,
    };
    match mode {
        Mode::Exclusive => options
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(3),
        Mode::Shared | Mode::Semaphore { .. } => {
            options.with_sort(SortTarget::Create, SortOrder::Ascend)
        }
    }
}

/// The queue as read, oldest first, and where the waiter's key is in it.
pub(super) struct Place {
    queue: Vec<KeyValue>,
    position: usize,
}

/// What blocks a waiter: one key (its predecessor, or the last earlier
/// writer), or, for a semaphore, any of the lock's keys.
pub(super) enum Blocker {
    /// A key, and its create revision.
    Key(Vec<u8>, i64),
    Any,
}

impl Blocker {
    fn key(kv: &KeyValue) -> Blocker {
        Blocker::Key(kv.key().to_vec(), kv.create_revision())
    }
}

/// How a wait ended.
pub(super) enum Woken {
    /// Something before the waiter went at this revision: the queue is to
    /// be read at or after it.
    Since(i64),
    /// A slice, the deadline or the watch ended: nothing is known.
    Unsure,
    /// The queue as read during the wait, changed.
    Read(GetResponse),
    /// The exclusive waiter holds the lock: its watch saw it come first.
    Holds,
}

impl Place {
    /// Where key `me` is in `queue`; `None` if it is not there.
    pub(super) fn of(mut queue: Vec<KeyValue>, me: &[u8]) -> Option<Place> {
        queue.sort_unstable_by_key(KeyValue::create_revision);
        let position = queue.iter().position(|kv| kv.key() == me)?;
        Some(Place { queue, position })
    }

    /// The waiter's own key, as read.
    pub(super) fn mine(&self) -> &KeyValue {
        &self.queue[self.position]
    }

    pub(super) fn earlier(&self) -> &[KeyValue] {
        &self.queue[..self.position]
    }

    /// Whether `other` has the same keys, as the same lives, before the
    /// waiter's key, and that key too (of reads with the same options).
    pub(super) fn same_as(&self, other: &Place) -> bool {
        let (mine, theirs) = (
            &self.queue[..=self.position],
            &other.queue[..=other.position],
        );
        mine.len() == theirs.len()
            && mine
                .iter()
                .zip(theirs)
                .all(|(a, b)| a.key() == b.key() && a.create_revision() == b.create_revision())
    }

    /// What keeps a waiter in `mode` from the lock; `None` if nothing does.
    /// Readers wait only for earlier writers; a semaphore of N admits the N
    /// lowest, all of its own number of permits.
    pub(super) fn blocker(&self, mode: Mode) -> Option<Blocker> {
        let earlier = self.earlier();
        match mode {
            Mode::Exclusive => earlier.last().map(Blocker::key),
            Mode::Shared => earlier
                .iter()
                .rev()
                .find(|kv| kv.value() != b"s")
                .map(Blocker::key),
            Mode::Semaphore { permits } => {
                let value = mode_value(mode);
                let fits = earlier.len() < permits as usize
                    && earlier.iter().all(|kv| kv.value() == value.as_bytes());
                (!fits).then_some(Blocker::Any)
            }
        }
    }
}
