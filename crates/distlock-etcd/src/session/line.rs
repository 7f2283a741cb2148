//! A wait for the entry just ahead that can end in a grant without a read:
//! once a read shows only that entry P ahead of the waiter, one watch
//! covers P and the waiter's own key. Entries ahead only go (later ones
//! come later), and etcd reports one watch's events in order, none left
//! out; so when that watch, started no later than the read, reports P
//! deleted and nothing of the waiter's key before, the waiter's key is
//! first and still there (its lease lived). Until then the wait watches P
//! and the entry before P, whose going is when it reads: off the path of
//! the hand-over, while P holds. See docs/0005-etcd.md.

use distlock_core::store::queue::WATCH_SLICE;
use distlock_core::Result;
use etcd_client::{
    EventType, GetResponse, KeyValue, ResponseHeader, WatchFilterType, WatchOptions, WatchStream,
};
use tokio::time::Instant;

use super::EtcdSession;

/// How a wait in line ended.
pub(super) enum Woken {
    /// The waiter's key was first, and there, at this revision: it holds.
    Holds(i64),
    /// The queue as read during the wait, at this revision, was not as
    /// before: decide from it.
    Read(GetResponse, i64),
    /// Something went, or a slice ended: read the queue again.
    Again,
}

/// The watches of a waiter's stream, by id: P from now and from ahead, the
/// entry before P, and later the pair of P and the waiter's key.
const FIRST: i64 = 1;
const AHEAD: i64 = 2;
const BEFORE: i64 = 3;
const PAIR: i64 = 4;

/// How long a report of P's going, from a watch that cannot tell alone,
/// waits for the watch that can: etcd sends both in one pass.
const TELLING_LAG: std::time::Duration = std::time::Duration::from_millis(1);

/// A watch on a waiter's stream.
#[derive(Clone, Copy, Default)]
struct Watched {
    /// The first revision it reports (0: not created yet).
    start: i64,
    /// Whether it covers the waiter's own key as well as P.
    pair: bool,
}

impl Watched {
    /// A watch "from now" that etcd created at revision `created_at`: it
    /// reports every event after it.
    fn from_now(created_at: i64, pair: bool) -> Watched {
        Watched {
            start: created_at + 1,
            pair,
        }
    }

    /// Whether this watch alone can tell the waiter it holds: it covers
    /// P and the waiter, and started no later than a read (at `second_at`)
    /// that showed P alone ahead, so it reports every change since.
    fn tells(&self, second_at: Option<i64>) -> bool {
        self.pair && second_at.is_some_and(|read| read >= self.start - 1)
    }
}

/// A header's revision; 0 without one (not expected).
pub(super) fn revision(header: Option<&ResponseHeader>) -> i64 {
    header.map_or(0, ResponseHeader::revision)
}

/// Deletions only, of `from`'s key or, with `to`, of the keys from one to
/// the other (whichever is first) inclusive, as watch `id`.
fn deletions(from: &[u8], to: Option<&[u8]>, id: i64) -> (Vec<u8>, WatchOptions) {
    let options = WatchOptions::new()
        .with_filters([WatchFilterType::NoPut])
        .with_watch_id(id);
    match to {
        None => (from.to_vec(), options),
        Some(to) => {
            let (low, high) = if from <= to { (from, to) } else { (to, from) };
            let mut end = high.to_vec();
            end.push(0);
            (low.to_vec(), options.with_range(end))
        }
    }
}

/// A queue entry as a read gives it: its key, and which life of the key.
trait Entry {
    fn key(&self) -> &[u8];
    fn created(&self) -> i64;
}

impl Entry for KeyValue {
    fn key(&self) -> &[u8] {
        KeyValue::key(self)
    }
    fn created(&self) -> i64 {
        self.create_revision()
    }
}

/// Whether the queue read as `now` (oldest first) holds the same entries,
/// as the same lives, up to and including the waiter's key `mine` as
/// `earlier` and `mine` do.
fn same_line<E: Entry>(now: &[E], earlier: &[E], mine: &E) -> bool {
    now.len() > earlier.len()
        && earlier
            .iter()
            .chain([mine])
            .zip(now)
            .all(|(was, is)| was.key() == is.key() && was.created() == is.created())
}

/// Whether the queue read as `now` still holds the entries a wait watches
/// (`watched`, the last of those ahead) and then `mine`, as the same lives,
/// whatever went ahead of them: the wait's watches still cover what it
/// waits for.
fn same_tail<E: Entry>(now: &[E], watched: &[E], mine: &E) -> bool {
    let first = watched.first().unwrap_or(mine);
    now.iter()
        .position(|is| is.key() == first.key() && is.created() == first.created())
        .is_some_and(|at| same_line(&now[at..], watched, mine))
}

impl EtcdSession {
    /// Waits, until `until` or a slice at most, for P (the last of
    /// `earlier`) to go, for the waiter whose key read as `mine` in the
    /// queue under `prefix` at revision `read_at`.
    pub(super) async fn wait_in_line(
        &self,
        prefix: &str,
        earlier: &[KeyValue],
        mine: &KeyValue,
        read_at: i64,
        until: Instant,
    ) -> Result<Woken> {
        let Some(before_me) = earlier.last() else {
            return Ok(Woken::Again);
        };
        let before_that = earlier.len().checked_sub(2).map(|at| &earlier[at]);
        let mut watched = [Watched::default(); 5];
        // The revision of a read that showed only P before the waiter.
        let mut second_at = before_that.is_none().then_some(read_at);
        let pair = before_that.is_none().then_some(mine.key());
        let (first, options) = deletions(before_me.key(), pair, FIRST);
        let Some((mut stream, created_at)) =
            self.open_watch(first.clone(), options.clone()).await?
        else {
            return Ok(Woken::Again);
        };
        watched[FIRST as usize] = Watched::from_now(created_at, pair.is_some());
        // The same watch again, from ahead, in case etcd registered the
        // first late. If the stream broke, the wait below finds out.
        let ahead = super::queue::ahead_of(created_at, read_at);
        watched[AHEAD as usize] = Watched {
            start: ahead,
            pair: pair.is_some(),
        };
        let ahead = options.with_watch_id(AHEAD).with_start_revision(ahead);
        let _ = stream.watch(first, Some(ahead)).await;
        if let Some(before_that) = before_that {
            let (key, options) = deletions(before_that.key(), None, BEFORE);
            let _ = stream.watch(key, Some(options)).await;
        }
        // The queue moved between the read and the watch: P may have gone
        // unseen (and the entry before it: one write can delete both).
        // Entries going ahead of those two change nothing here: in a busy
        // queue the head goes about once a round trip, and a new wait for
        // each would cost a stream and a read again.
        if created_at > read_at {
            let (now, now_at) = self.read_queue_since(prefix, created_at).await?;
            // With P alone ahead this read may end in a grant (below):
            // the whole line is checked.
            let still = match before_that {
                None => same_line(now.kvs(), earlier, mine),
                Some(_) => same_tail(now.kvs(), &earlier[earlier.len() - 2..], mine),
            };
            if !still {
                return Ok(Woken::Read(now, now_at));
            }
            second_at = second_at.map(|_| now_at);
        }
        let slice_end = until.min(Instant::now() + WATCH_SLICE);
        let mut before_gone = None;
        // P's going as reported by a watch that cannot tell alone, while
        // one that can will report it too: the moment it is waited for.
        let mut reported: Option<Instant> = None;
        loop {
            let wake = reported.map_or(slice_end, |by| by.min(slice_end));
            let message = match tokio::time::timeout_at(wake, stream.message()).await {
                Err(_) => return Ok(Woken::Again),
                Ok(Ok(Some(message))) if !message.canceled() => message,
                // The watch ended (etcd restarting?): not at once again.
                Ok(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    return Ok(Woken::Again);
                }
            };
            let id = message.watch_id();
            let watch = usize::try_from(id).ok().and_then(|id| watched.get_mut(id));
            if message.created() {
                if let (Some(watch), true, Some(header)) = (watch, id == PAIR, message.header()) {
                    // P may be first now: read past the entry before it
                    // going and past this watch's start. (Without a header
                    // the start is not known: the watch cannot tell.)
                    let created_at = header.revision();
                    *watch = Watched::from_now(created_at, true);
                    let since = before_gone.unwrap_or(0).max(created_at);
                    let (now, now_at) = self.read_queue_since(prefix, since).await?;
                    if !same_line(now.kvs(), &earlier[earlier.len() - 1..], mine) {
                        return Ok(Woken::Read(now, now_at));
                    }
                    second_at = Some(now_at);
                }
                continue;
            }
            let watch = watch.map_or(Watched::default(), |watch| *watch);
            let tells = |watch: &Watched| watch.tells(second_at);
            // The end of the life of a key that was read, not of an earlier
            // one (a lagging member may report from before).
            let ends = |kv: &KeyValue, gone: &KeyValue| {
                kv.key() == gone.key() && gone.mod_revision() > kv.create_revision()
            };
            let deleted = || {
                message
                    .events()
                    .iter()
                    .filter(|event| event.event_type() == EventType::Delete)
                    .filter_map(|event| event.kv())
            };
            // Checked for the whole message first: one revision may delete
            // P and the waiter's key both (a lease revoked, a range deleted),
            // and etcd reports that revision's events in one message.
            if deleted().any(|gone| ends(mine, gone)) {
                return Ok(Woken::Again);
            }
            for gone in deleted() {
                let at = gone.mod_revision();
                if ends(before_me, gone) {
                    if tells(&watch) {
                        return Ok(Woken::Holds(at));
                    }
                    if !watched.iter().any(tells) {
                        return Ok(Woken::Again);
                    }
                    // One that tells reports from the same pass of etcd's,
                    // unless it lags (a "from now" watch registered late).
                    reported.get_or_insert(Instant::now() + TELLING_LAG);
                }
                if before_that.is_some_and(|kv| ends(kv, gone)) && before_gone.is_none() {
                    before_gone = Some(at);
                    let (key, options) = deletions(before_me.key(), Some(mine.key()), PAIR);
                    let _ = stream.watch(key, Some(options)).await;
                }
            }
        }
    }

    /// Opens a watch stream with one watch, and the revision etcd created
    /// it at; `None` if etcd refused or ended it at once (restarting?) or
    /// did not say the revision, after a pause, so that it is not asked
    /// again at once.
    pub(super) async fn open_watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<Option<(WatchStream, i64)>> {
        let mut stream = self
            .watch_request(|mut watcher| {
                let (key, options) = (key.clone(), options.clone());
                async move { watcher.watch(key, Some(options)).await }
            })
            .await?;
        match self.call(stream.message()).await {
            Ok(Some(created)) if !created.canceled() && created.header().is_some() => {
                Ok(Some((stream, revision(created.header()))))
            }
            _ => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Entry for (&'static str, i64) {
        fn key(&self) -> &[u8] {
            self.0.as_bytes()
        }
        fn created(&self) -> i64 {
            self.1
        }
    }

    #[test]
    fn the_same_line_is_the_same_lives_up_to_the_waiter() {
        let (b, p, me, later) = (("b", 3), ("p", 5), ("me", 7), ("z", 9));
        assert!(same_line(&[b, p, me], &[b, p], &me));
        assert!(
            same_line(&[b, p, me, later], &[b, p], &me),
            "later keys do not count"
        );
        assert!(same_line(&[p, me], &[p], &me));
        assert!(!same_line(&[p, me], &[b, p], &me), "one ahead went");
        assert!(!same_line(&[b, p], &[b, p], &me), "the waiter's key went");
        assert!(
            !same_line(&[b, p], &[b, p, me], &later),
            "nothing at the waiter's place"
        );
        assert!(
            !same_line(&[b, ("p", 6), me], &[b, p], &me),
            "another life of P"
        );
        assert!(
            !same_line(&[b, p, ("me", 8)], &[b, p], &me),
            "another life of the waiter's key"
        );
        assert!(!same_line(&[b, ("q", 5), me], &[b, p], &me), "another key");
    }

    #[test]
    fn the_same_tail_is_the_watched_lives_then_the_waiter() {
        let (a, b, p, me, later) = (("a", 1), ("b", 3), ("p", 5), ("me", 7), ("z", 9));
        assert!(same_tail(&[a, b, p, me], &[b, p], &me));
        assert!(same_tail(&[b, p, me], &[b, p], &me), "the one ahead went");
        assert!(
            same_tail(&[a, b, p, me, later], &[b, p], &me),
            "later keys do not count"
        );
        assert!(same_tail(&[p, me], &[p], &me));
        assert!(
            same_tail(&[("c", 3), b, p, me], &[b, p], &me),
            "found by key and life together (one transaction can create two keys)"
        );
        assert!(!same_tail(&[a, p, me], &[b, p], &me), "a watched one went");
        assert!(
            !same_tail(&[a, b, ("p", 6), me], &[b, p], &me),
            "another life of P"
        );
        assert!(
            !same_tail(&[b, ("q", 4), p, me], &[b, p], &me),
            "another key between the watched ones"
        );
        assert!(!same_tail(&[a, b, me], &[b, p], &me), "P went");
        assert!(
            !same_tail(&[a, b, p], &[b, p], &me),
            "the waiter's key went"
        );
        assert!(
            !same_tail(&[a, ("b", 4), p, me], &[b, p], &me),
            "another life of the entry before P"
        );
        assert!(
            !same_tail(&[b, p, ("me", 8)], &[b, p], &me),
            "another life of the waiter's key"
        );
    }

    #[test]
    fn a_pair_watch_covers_both_keys_from_the_lower() {
        assert_eq!(deletions(b"p", Some(b"me"), PAIR).0, b"me");
        assert_eq!(deletions(b"me", Some(b"p"), PAIR).0, b"me");
        assert_eq!(deletions(b"p", None, FIRST).0, b"p");
    }

    #[test]
    fn only_a_pair_watch_started_by_the_read_tells() {
        let pair = Watched::from_now(10, true);
        assert_eq!(
            pair.start, 11,
            "a watch from now reports after its creation"
        );
        assert!(pair.tells(Some(10)), "read as the watch started");
        assert!(pair.tells(Some(12)), "read after");
        assert!(
            !pair.tells(Some(9)),
            "read before: a change in between is not reported"
        );
        assert!(!pair.tells(None), "no read showed P alone");
        assert!(
            !Watched::from_now(10, false).tells(Some(10)),
            "P's key alone"
        );
    }
}
