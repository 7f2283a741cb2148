//! Waiting for what blocks a waiter to go, by watch.

use distlock_core::store::Mode;
use distlock_core::Result;
use etcd_client::{EventType, GetOptions, KeyValue, WatchFilterType, WatchOptions, WatchStream};
use tokio::time::Instant;

use super::queue::{read_options, Blocker, Place, Woken};
use super::{revision, EtcdSession};

/// The longest one watch is trusted before the queue is read again (a
/// member cut off from its cluster may keep a watch open and silent).
const WATCH_SLICE: std::time::Duration = std::time::Duration::from_secs(5);

/// The watches of an exclusive waiter's stream, by id: its predecessor from
/// now and from ahead, the key before that, and later the pair of its
/// predecessor and itself.
const FIRST: i64 = 1;
const AHEAD: i64 = 2;
const BEFORE: i64 = 3;
const PAIR: i64 = 4;

/// How long a report of the predecessor's going, from a watch that cannot
/// tell alone, waits for the watch that can: etcd sends both in one pass.
const TELLING_LAG: std::time::Duration = std::time::Duration::from_millis(1);

/// A watch on a waiter's stream.
#[derive(Clone, Copy, Default)]
struct Watched {
    /// The first revision it reports (0: not created yet).
    start: i64,
    /// Whether it covers the waiter's own key as well as its predecessor's.
    pair: bool,
}

/// A watch's options: deletions only, of `from`'s key or, with `to`, of the
/// keys from one to the other (whichever is first) inclusive.
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

/// The revision a watch that starts "from now" reports from, ahead of it:
/// etcd starts such a watch at the revision it read just before it
/// registers it; a write in between (one watch in fifty under load) leaves
/// the watch to a loop that runs every 100 ms. A watch that starts where
/// etcd has not reached yet is served as writes land.
fn ahead_of(created_at: i64, read_at: i64) -> i64 {
    created_at.saturating_add(4 + 2 * (created_at - read_at).clamp(0, 30))
}

impl EtcdSession {
    /// Opens a watch stream with one watch; the revision etcd created it at.
    /// `None` if etcd refused or ended it at once (restarting?).
    async fn open_watch(
        &self,
        key: Vec<u8>,
        options: WatchOptions,
    ) -> Result<Option<(WatchStream, i64)>> {
        let mut watcher = self.watcher.clone();
        let mut stream = self.call(watcher.watch(key, Some(options))).await?;
        match self.call(stream.message()).await {
            Ok(Some(created)) if !created.canceled() => {
                Ok(Some((stream, revision(created.header()))))
            }
            _ => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Ok(None)
            }
        }
    }

    /// Waits, until `until` or a slice at most, for `blocker` of a waiter
    /// at `place` in the queue under `prefix` (read at revision `read_at`)
    /// to go. Watched from now, not from the revision read: etcd serves a
    /// watch that starts in the past from its 100 ms loop; a deletion in
    /// between is found by asking once more.
    pub(super) async fn wait_for(
        &self,
        prefix: &str,
        place: &Place,
        blocker: Blocker,
        read_at: i64,
        until: Instant,
    ) -> Result<Woken> {
        // What is watched, and how many keys the check must still find for
        // the wait to be needed. A key's create revision tells which life of
        // it was read (keys are used again); etcd counts a range before it
        // filters it, so the keys are fetched.
        let (watched, options, check, expected) = match blocker {
            Blocker::Key(key, created) => {
                let (key, options) = deletions(&key, None, FIRST);
                let that_one = GetOptions::new()
                    .with_keys_only()
                    .with_min_create_revision(created)
                    .with_max_create_revision(created);
                (key, options, that_one, 1)
            }
            Blocker::Any => {
                let (key, options) = deletions(prefix.as_bytes(), None, FIRST);
                let before_me = GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_max_create_revision(place.mine().create_revision() - 1);
                (key, options.with_prefix(), before_me, place.earlier().len())
            }
        };
        let Some((mut stream, created_at)) =
            self.open_watch(watched.clone(), options.clone()).await?
        else {
            return Ok(Woken::Unsure);
        };
        let ahead = options
            .with_watch_id(AHEAD)
            .with_start_revision(ahead_of(created_at, read_at));
        // If the stream broke, the wait below finds out.
        let _ = stream.watch(watched.clone(), Some(ahead)).await;
        if created_at > read_at {
            let now = self.read(&watched, check, Some(created_at)).await?;
            if now.kvs().len() < expected {
                return Ok(Woken::Since(revision(now.header())));
            }
        }
        let deleted = async {
            while let Ok(Some(message)) = stream.message().await {
                if message.canceled() {
                    break;
                }
                let gone = message
                    .events()
                    .iter()
                    .filter(|event| event.event_type() == EventType::Delete)
                    .filter_map(|event| event.kv().map(KeyValue::mod_revision))
                    .max();
                if let Some(gone) = gone {
                    return Woken::Since(gone);
                }
            }
            // The watch ended (etcd restarting?): not at once again.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Woken::Unsure
        };
        // In slices: a silent watch is read past, not trusted forever.
        let slice_end = until.min(Instant::now() + WATCH_SLICE);
        Ok(tokio::time::timeout_at(slice_end, deleted)
            .await
            .unwrap_or(Woken::Unsure))
    }

    /// [`EtcdSession::wait_for`] for an exclusive waiter, which can be
    /// told it holds the lock without a read: once a read shows only its
    /// predecessor P before it, the waiter watches P and itself with one
    /// watch. Keys before P only go (later keys come later), and etcd
    /// reports one watch's events in order, none left out: so when that
    /// watch, started by the read, reports P deleted and nothing of the
    /// waiter's own key before, the waiter's key is first and still there
    /// (its lease lived). Until then it watches P and the key before P,
    /// whose going is when it reads (off the hand-over's path).
    pub(super) async fn wait_in_line(
        &self,
        prefix: &str,
        place: &Place,
        read_at: i64,
        until: Instant,
    ) -> Result<Woken> {
        let (me, earlier) = (place.mine(), place.earlier());
        let Some(before_me) = earlier.last() else {
            return Ok(Woken::Unsure);
        };
        let before_that = earlier.len().checked_sub(2).map(|at| &earlier[at]);
        let mut watched = [Watched::default(); 5];
        // The revision of a read that showed only P before the waiter.
        let mut second_at = before_that.is_none().then_some(read_at);
        let pair = before_that.is_none().then_some(me.key());
        let (first, options) = deletions(before_me.key(), pair, FIRST);
        let Some((mut stream, created_at)) =
            self.open_watch(first.clone(), options.clone()).await?
        else {
            return Ok(Woken::Unsure);
        };
        watched[FIRST as usize] = Watched {
            start: created_at + 1,
            pair: pair.is_some(),
        };
        // The same watch again, from ahead, in case etcd registered the
        // first late. If the stream broke, the wait below finds out.
        let ahead = ahead_of(created_at, read_at);
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
        let options = read_options(Mode::Exclusive, Some(me.create_revision()));
        let key = prefix.as_bytes();
        // The queue moved between the read and the watch. With P first, P
        // may have gone unseen; else it takes two writes for P and the key
        // before it to go (one alone only costs the waiter its read-free
        // hand-over: it still watches what blocks it).
        let moved = created_at - read_at;
        if moved > 0 && (before_that.is_none() || moved >= 2) {
            let now = self.read(key, options.clone(), Some(created_at)).await?;
            if !Place::of(now.kvs().to_vec(), me.key()).is_some_and(|now| now.same_as(place)) {
                return Ok(Woken::Read(now));
            }
            second_at = second_at.map(|_| revision(now.header()));
        }
        let slice_end = until.min(Instant::now() + WATCH_SLICE);
        let mut before_gone = None;
        // P's going as reported by a watch that cannot tell alone, while one
        // that can will report it too: the moment it is waited for.
        let mut reported: Option<(i64, Instant)> = None;
        loop {
            let wake = reported.map_or(slice_end, |(_, by)| by.min(slice_end));
            let message = match tokio::time::timeout_at(wake, stream.message()).await {
                Err(_) => {
                    return Ok(reported.map_or(Woken::Unsure, |(at, _)| Woken::Since(at)));
                }
                Ok(Ok(Some(message))) if !message.canceled() => message,
                // The watch ended (etcd restarting?): not at once again.
                Ok(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    return Ok(Woken::Unsure);
                }
            };
            let id = message.watch_id();
            let watch = usize::try_from(id).ok().and_then(|id| watched.get_mut(id));
            if message.created() {
                if let (Some(watch), true) = (watch, id == PAIR) {
                    // P may be first now: read past the key before it going
                    // and past this watch's start.
                    let created_at = revision(message.header());
                    *watch = Watched {
                        start: created_at + 1,
                        pair: true,
                    };
                    let since = before_gone.unwrap_or(0).max(created_at);
                    let now = self.read(key, options.clone(), Some(since)).await?;
                    let Some(place) = Place::of(now.kvs().to_vec(), me.key()) else {
                        return Ok(Woken::Read(now));
                    };
                    match place.earlier() {
                        [only]
                            if only.key() == before_me.key()
                                && only.create_revision() == before_me.create_revision() =>
                        {
                            second_at = Some(revision(now.header()));
                        }
                        _ => return Ok(Woken::Read(now)),
                    }
                }
                continue;
            }
            let watch = watch.map_or(Watched::default(), |watch| *watch);
            let tells = |watch: &Watched| {
                watch.pair && second_at.is_some_and(|read| read >= watch.start - 1)
            };
            for event in message.events() {
                let Some(gone) = event
                    .kv()
                    .filter(|_| event.event_type() == EventType::Delete)
                else {
                    continue;
                };
                // The end of the life of a key that was read, not of an
                // earlier one (a lagging member may report from before).
                let at = gone.mod_revision();
                let ends = |kv: &KeyValue| kv.key() == gone.key() && at > kv.create_revision();
                if ends(me) {
                    return Ok(Woken::Since(at));
                }
                if ends(before_me) {
                    if tells(&watch) {
                        return Ok(Woken::Holds);
                    }
                    if !watched.iter().any(tells) {
                        return Ok(Woken::Since(at));
                    }
                    // One that tells reports from the same pass of etcd's,
                    // unless it lags (a "from now" watch registered late).
                    reported.get_or_insert((at, Instant::now() + TELLING_LAG));
                }
                if before_that.is_some_and(ends) && before_gone.is_none() {
                    before_gone = Some(at);
                    let (key, options) = deletions(before_me.key(), Some(me.key()), PAIR);
                    let _ = stream.watch(key, Some(options)).await;
                }
            }
        }
    }
}
