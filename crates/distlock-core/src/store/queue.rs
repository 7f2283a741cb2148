//! The decision of a FIFO lock queue, for stores that keep one (etcd and
//! ZooKeeper): from the modes of the entries ahead of a request, whether it
//! holds the lock, and if not, what it waits for. Like Curator's
//! `getsTheLock`: pure, and tested here once.

use std::time::Duration;

use super::{Capabilities, Fencing, Mode};

/// What a store with a FIFO queue per key gives (etcd, ZooKeeper): fair,
/// writer-preferring shared locks and semaphores, pushed grants, durable
/// tokens, lease sessions.
pub fn capabilities(name: &'static str) -> Capabilities {
    let mut caps = Capabilities::minimal(name);
    caps.fair = true;
    caps.shared = true;
    caps.writer_preferring = true;
    caps.semaphore = true;
    caps.push_wakeup = true;
    caps.fencing = Fencing::Durable;
    caps.lease_expiry = true;
    caps
}

/// The longest a waiter trusts one watch before it reads the queue again:
/// a member cut off from its cluster may keep a watch open and silent.
pub const WATCH_SLICE: Duration = Duration::from_secs(5);

impl Mode {
    /// The mode as stores keep it in text: `x`, `s`, or `p` and the number
    /// of permits. Equal tags mean equal modes.
    pub fn tag(self) -> String {
        match self {
            Mode::Exclusive => "x".to_owned(),
            Mode::Shared => "s".to_owned(),
            Mode::Semaphore { permits } => format!("p{permits}"),
        }
    }

    /// The mode a [`tag`](Mode::tag) names; `None` for any other text (a
    /// semaphore of 0 permits too).
    pub fn from_tag(tag: &str) -> Option<Mode> {
        match tag {
            "x" => Some(Mode::Exclusive),
            "s" => Some(Mode::Shared),
            _ => match tag.strip_prefix('p')?.parse() {
                Ok(0) | Err(_) => None,
                Ok(permits) => Some(Mode::Semaphore { permits }),
            },
        }
    }

    /// How many holders the mode admits together: a semaphore's permits,
    /// else 0 (one writer, or any number of readers).
    pub fn permits(self) -> u32 {
        match self {
            Mode::Semaphore { permits } => permits,
            Mode::Exclusive | Mode::Shared => 0,
        }
    }
}

/// What keeps a request in a queue from holding the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocker {
    /// The entry at this index of those ahead: the request holds the lock
    /// once that entry is gone (and the queue is read again).
    Entry(usize),
    /// A semaphore that does not fit beside the entries ahead: any change
    /// to the queue may let it in.
    AnyChange,
}

/// Decides for a request in `mode` whose queue entry comes after the
/// entries tagged `ahead` (with [`Mode::tag`], oldest first): `None` if it
/// holds the lock now.
///
/// - Exclusive: held when nothing is ahead; else it waits for the entry
///   just ahead.
/// - Shared: held when only readers are ahead; else it waits for the last
///   entry ahead that is not a reader, so a reader never overtakes a
///   writer that came first.
/// - Semaphore of N permits: held when fewer than N entries are ahead, all
///   of the same semaphore; else any change may let it in.
///
/// A tag that is not a mode's blocks like a writer.
pub fn blocker<T: AsRef<str>>(mode: Mode, ahead: &[T]) -> Option<Blocker> {
    match mode {
        Mode::Exclusive => ahead.len().checked_sub(1).map(Blocker::Entry),
        Mode::Shared => ahead
            .iter()
            .rposition(|tag| tag.as_ref() != "s")
            .map(Blocker::Entry),
        Mode::Semaphore { permits } => {
            let tag = mode.tag();
            let fits = ahead.len() < permits as usize && ahead.iter().all(|t| t.as_ref() == tag);
            (!fits).then_some(Blocker::AnyChange)
        }
    }
}

/// Which entries of a queue (by their tags, oldest first) hold the lock
/// now by [`blocker`]: the rest wait. A tag that names no mode counts as a
/// writer, as it blocks like one.
pub fn holders<T: AsRef<str>>(tags: &[T]) -> Vec<bool> {
    let mode = |tag: &str| Mode::from_tag(tag).unwrap_or(Mode::Exclusive);
    (0..tags.len())
        .map(|at| blocker(mode(tags[at].as_ref()), &tags[..at]).is_none())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_what_the_decision_grants() {
        assert_eq!(holders(&["x", "x", "s"]), [true, false, false]);
        assert_eq!(holders(&["s", "s", "x", "s"]), [true, true, false, false]);
        assert_eq!(holders(&["p2", "p2", "p2"]), [true, true, false]);
        assert_eq!(holders(&["garbage", "s"]), [true, false]);
        let none: [&str; 0] = [];
        assert!(holders(&none).is_empty());
    }

    const P2: Mode = Mode::Semaphore { permits: 2 };

    #[test]
    fn tags_name_the_mode_and_its_permits() {
        let tags = [
            Mode::Exclusive,
            Mode::Shared,
            P2,
            Mode::Semaphore { permits: 100 },
        ]
        .map(Mode::tag);
        assert_eq!(tags, ["x", "s", "p2", "p100"]);
        for tag in tags {
            assert_eq!(Mode::from_tag(&tag).map(Mode::tag).as_deref(), Some(&*tag));
        }
        for bad in ["", "p", "p0", "px", "X", "p-1"] {
            assert_eq!(Mode::from_tag(bad), None, "{bad:?}");
        }
        assert_eq!((Mode::Exclusive.permits(), P2.permits()), (0, 2));
    }

    #[test]
    fn exclusive_waits_for_the_entry_just_ahead() {
        let none: [&str; 0] = [];
        assert_eq!(blocker(Mode::Exclusive, &none), None);
        assert_eq!(blocker(Mode::Exclusive, &["s"]), Some(Blocker::Entry(0)));
        assert_eq!(
            blocker(Mode::Exclusive, &["x", "s", "s"]),
            Some(Blocker::Entry(2))
        );
    }

    #[test]
    fn readers_share_but_never_pass_a_writer() {
        assert_eq!(blocker(Mode::Shared, &["s", "s"]), None);
        assert_eq!(
            blocker(Mode::Shared, &["s", "x", "s"]),
            Some(Blocker::Entry(1))
        );
        assert_eq!(blocker(Mode::Shared, &["p2"]), Some(Blocker::Entry(0)));
        assert_eq!(
            blocker(Mode::Shared, &["garbage", "s"]),
            Some(Blocker::Entry(0))
        );
    }

    #[test]
    fn a_semaphore_admits_its_permits_of_its_own_kind() {
        let none: [&str; 0] = [];
        assert_eq!(blocker(P2, &none), None);
        assert_eq!(blocker(P2, &["p2"]), None);
        assert_eq!(blocker(P2, &["p2", "p2"]), Some(Blocker::AnyChange));
        assert_eq!(blocker(P2, &["p3"]), Some(Blocker::AnyChange));
        assert_eq!(blocker(P2, &["s"]), Some(Blocker::AnyChange));
    }
}
