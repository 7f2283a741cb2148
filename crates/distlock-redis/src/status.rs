//! `status`: who holds and who waits, read from every instance, each lock
//! in one `MULTI` (a consistent picture of its keys), and on Redlock
//! combined by majority.
//!
//! - A **holder** is listed if a majority of the instances list its hold
//!   as live (on a single server: if the server does). Its lease left is
//!   the longest that a majority still gives it; its token is shown only
//!   where Redis keeps it (a hold granted from the queue, not one taken on
//!   the fast path) and every instance lists the hold with that same token,
//!   as a Redlock grant's token is the highest of those that granted it.
//! - A **waiter** is listed if it holds or waits on a majority and is no
//!   listed holder; waiters come in order of their mean place in the
//!   queues (one order where the instances agree). A place whose record's
//!   deadline passed is a waiter that died, and is skipped.
//! - `last_token` is the highest fencing counter: every token granted is at
//!   or below it (a failed fast try takes a number too).
//! - The owner is read from each session's `dl:o:SESSION` (see `owner.rs`);
//!   empty where it has expired or was never written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use distlock_core::status::{HolderStatus, KeyStatus, Status, StatusQuery, WaiterStatus};
use distlock_core::store::Mode;
use distlock_core::{Error, ErrorKind, Result};
use futures::future::join_all;
use futures::stream::{self, StreamExt, TryStreamExt};
use redis::aio::MultiplexedConnection;

use crate::instance::{Failures, Instance, CALL_TIMEOUT};
use crate::owner::owner_key;
use crate::scripts::LockKeys;
use crate::{Shared, KEY_PREFIX};

/// How many locks one instance is asked about at once.
const READS_AT_ONCE: usize = 32;

/// How many keys one `SCAN` step looks at.
const SCAN_COUNT: u32 = 1000;

/// A live hold, as one instance has it (or had it, for a forced release).
pub(crate) struct Hold {
    pub(crate) member: String,
    pub(crate) mode: Mode,
    pub(crate) token: Option<u64>,
    pub(crate) lease_left: Duration,
}

/// A live place in one instance's queue.
struct Place {
    member: String,
    mode: Mode,
}

/// One lock, as one instance has it.
#[derive(Default)]
pub(crate) struct LockView {
    holds: Vec<Hold>,
    /// In queue order.
    places: Vec<Place>,
    counter: Option<u64>,
}

impl LockView {
    /// A lock with these holds and nothing else known.
    pub(crate) fn of_holds(holds: Vec<Hold>) -> Self {
        LockView {
            holds,
            ..LockView::default()
        }
    }
}

/// What one instance answered.
#[derive(Default)]
struct InstanceView {
    /// The locks held or waited for, by key.
    locks: BTreeMap<String, LockView>,
    /// Owners, by session id.
    owners: HashMap<String, String>,
}

/// The keys of one lock as one `MULTI` reads them: the server's `TIME`, the
/// main key and its `PTTL`, the fencing counter, the holders with their
/// lease ends, the queue, and the records.
type RawLock = (
    (u64, u64),
    Option<String>,
    i64,
    Option<u64>,
    Vec<(String, f64)>,
    Vec<String>,
    HashMap<String, String>,
);

/// Who holds and who waits for the locks `query` names, on the instances
/// of `shared`.
pub(crate) async fn read(shared: &Shared, query: &StatusQuery) -> Result<Status> {
    let instances = &shared.instances;
    let answers = join_all(instances.iter().map(|instance| instance.status(query))).await;
    let mut views = Vec::new();
    let mut failures = Failures::default();
    for (instance, answer) in instances.iter().zip(answers) {
        match answer {
            Ok(view) => views.push(view),
            Err(err) => failures.push(instance, err),
        }
    }
    if views.len() < shared.quorum {
        let message = if instances.len() == 1 {
            let why = failures.on_single("is redis-server running?", "");
            format!("cannot read the locks: {why}")
        } else {
            format!(
                "only {} of {} Redlock instances answered ({} needed): {failures}",
                views.len(),
                instances.len(),
                shared.quorum
            )
        };
        return Err(failures.source_of(Error::new(ErrorKind::Unavailable, message)));
    }
    Ok(Status {
        keys: combine(&views, instances.len(), shared.quorum),
        counters: None,
    })
}

impl Instance {
    /// The locks `query` names that anybody holds or waits for here, and
    /// the owners of their sessions.
    async fn status(&self, query: &StatusQuery) -> redis::RedisResult<InstanceView> {
        self.within(CALL_TIMEOUT, async {
            let mut connection = self.connection().await?;
            let keys = match query {
                StatusQuery::Key(key) => vec![key.clone()],
                StatusQuery::Prefix(prefix) => scan(&mut connection, prefix).await?,
            };
            let locks: Vec<(String, LockView)> = stream::iter(keys)
                .map(|key| {
                    let mut connection = connection.clone();
                    async move {
                        let raw = read_lock(&mut connection, &key).await?;
                        Ok::<_, redis::RedisError>((key, view(raw)))
                    }
                })
                .buffered(READS_AT_ONCE)
                .try_collect()
                .await?;
            let locks: BTreeMap<String, LockView> = locks
                .into_iter()
                .filter(|(_, lock)| !lock.holds.is_empty() || !lock.places.is_empty())
                .collect();
            let owners = owners(&mut connection, &locks).await?;
            Ok(InstanceView { locks, owners })
        })
        .await
    }
}

/// The locks whose keys start with `prefix`, found with `SCAN` over their
/// main keys (`dl:{KEY}`).
async fn scan(
    connection: &mut MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<String>> {
    let pattern = format!("{KEY_PREFIX}{{{}*", glob_escape(prefix));
    let mut found = BTreeSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, names): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(connection)
            .await?;
        found.extend(
            names
                .iter()
                .filter_map(|name| lock_of(name))
                .filter(|key| key.starts_with(prefix)),
        );
        if next == 0 {
            return Ok(found.into_iter().collect());
        }
        cursor = next;
    }
}

/// `text` with Redis's glob characters escaped, to match itself only.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// The lock whose main key is `name`, `dl:{KEY}`; `None` for a lock's
/// other keys (`dl:{KEY}:f` and the rest end otherwise) and anything else.
fn lock_of(name: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(name).ok()?;
    let key = name.strip_prefix(KEY_PREFIX)?.strip_prefix('{')?;
    key.strip_suffix('}').map(str::to_owned)
}

/// Reads the keys of lock `key` in one `MULTI`.
async fn read_lock(
    connection: &mut MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<RawLock> {
    let keys = LockKeys::new(KEY_PREFIX, key);
    redis::pipe()
        .atomic()
        .cmd("TIME")
        .cmd("GET")
        .arg(&keys.main)
        .cmd("PTTL")
        .arg(&keys.main)
        .cmd("GET")
        .arg(&keys.fence)
        .cmd("ZRANGE")
        .arg(&keys.holders)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .cmd("ZRANGE")
        .arg(&keys.queue)
        .arg(0)
        .arg(-1)
        .cmd("HGETALL")
        .arg(&keys.info)
        .query_async(connection)
        .await
}

/// The owners of the sessions that hold or wait for `locks`.
async fn owners(
    connection: &mut MultiplexedConnection,
    locks: &BTreeMap<String, LockView>,
) -> redis::RedisResult<HashMap<String, String>> {
    let members: Vec<&str> = locks
        .values()
        .flat_map(|lock| {
            let holds = lock.holds.iter().map(|hold| hold.member.as_str());
            holds.chain(lock.places.iter().map(|place| place.member.as_str()))
        })
        .collect();
    owners_of(connection, &members).await
}

/// The owners of the sessions of `members`, by session id; a session whose
/// owner key expired or was never written is left out.
pub(crate) async fn owners_of(
    connection: &mut MultiplexedConnection,
    members: &[&str],
) -> redis::RedisResult<HashMap<String, String>> {
    let sessions: BTreeSet<&str> = members.iter().map(|member| session_of(member)).collect();
    if sessions.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<String> = sessions.iter().map(|id| owner_key(id)).collect();
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&names)
        .query_async(connection)
        .await?;
    Ok(sessions
        .into_iter()
        .zip(values)
        .filter_map(|(id, owner)| Some((id.to_owned(), owner?)))
        .collect())
}

/// The session of a member, `SESSION|NONCE|DELAY`.
pub(crate) fn session_of(member: &str) -> &str {
    member.split('|').next().unwrap_or_default()
}

/// The lock-delay of a member, in ms.
fn delay_of(member: &str) -> i64 {
    member
        .rsplit('|')
        .next()
        .and_then(|delay| delay.parse().ok())
        .unwrap_or(0)
}

/// What one instance's keys of a lock say, by the rules of `scripts.rs`.
fn view(raw: RawLock) -> LockView {
    let ((seconds, micros), main, pttl, counter, holders, queue, records) = raw;
    let now = seconds * 1000 + micros / 1000;
    let mut lock = LockView {
        counter,
        ..LockView::default()
    };
    let Some(main) = main else {
        return lock;
    };
    let Some(state) = main.strip_prefix('*') else {
        // Fast: one exclusive hold, whose lease ends where its lock-delay
        // begins. Its token is known to its client only.
        let lease_left = pttl - delay_of(&main);
        if let Ok(left @ 1..) = u64::try_from(lease_left) {
            lock.holds.push(Hold {
                member: main,
                mode: Mode::Exclusive,
                token: None,
                lease_left: Duration::from_millis(left),
            });
        }
        return lock;
    };
    let record = |member: &str| records.get(&format!("w{member}"));
    let held = state.split('/').next().unwrap_or_default();
    if let Some(mode) = Mode::from_tag(held) {
        for (member, ends) in holders {
            // Scores are whole ms since the epoch, exact in an f64.
            let ends = ends as u64;
            if ends <= now {
                continue;
            }
            // `H|TOKEN|GEN|CHANNEL` for a hold handed over from the queue; a fast
            // hold moved here keeps none.
            let token = record(&member)
                .and_then(|r| r.strip_prefix("H|"))
                .and_then(|r| r.split('|').next())
                .and_then(|token| token.parse().ok());
            lock.holds.push(Hold {
                member,
                mode,
                token,
                lease_left: Duration::from_millis(ends - now),
            });
        }
    }
    for member in queue {
        if let Some(mode) = record(&member).and_then(|r| waiting_mode(r, now)) {
            lock.places.push(Place { member, mode });
        }
    }
    lock
}

/// The mode a waiter's record `DEADLINE|MODE|PERMITS|GEN|CHANNEL` asks for,
/// if its deadline is after `now`.
fn waiting_mode(record: &str, now: u64) -> Option<Mode> {
    let mut fields = record.splitn(4, '|');
    let deadline: u64 = fields.next()?.parse().ok()?;
    let (mode, permits) = (fields.next()?, fields.next()?);
    if deadline <= now {
        return None;
    }
    match mode {
        "p" => Mode::from_tag(&format!("p{permits}")),
        other => Mode::from_tag(other),
    }
}

/// The instances' views made one, by the rules in this module's header:
/// the keys with a holder or a waiter, sorted.
fn combine(views: &[InstanceView], instances: usize, quorum: usize) -> Vec<KeyStatus> {
    let keys: BTreeSet<&String> = views.iter().flat_map(|view| view.locks.keys()).collect();
    let owner = |member: &str| {
        let session = session_of(member);
        views
            .iter()
            .find_map(|view| view.owners.get(session))
            .cloned()
            .unwrap_or_default()
    };
    let mut statuses = Vec::new();
    for key in keys {
        let locks: Vec<&LockView> = views.iter().filter_map(|v| v.locks.get(key)).collect();
        let holders = holders_of(&locks, instances, quorum, quorum);
        let listed: BTreeSet<&str> = holders.iter().map(|(member, _)| *member).collect();
        let waiters = waiters_of(&locks, quorum, &listed);
        if holders.is_empty() && waiters.is_empty() {
            continue;
        }
        statuses.push(KeyStatus {
            key: key.clone(),
            holders: holders
                .into_iter()
                .map(|(member, mut holder)| {
                    holder.owner = owner(member);
                    holder
                })
                .collect(),
            waiters: waiters
                .into_iter()
                .map(|(member, mut waiter)| {
                    waiter.owner = owner(member);
                    waiter
                })
                .collect(),
            last_token: locks.iter().filter_map(|lock| lock.counter).max(),
        });
    }
    statuses
}

/// The holds that at least `listed` instances list, in the order first
/// seen, by member. Each one's lease left is the longest that a majority
/// (or every instance listing it, if fewer) gives it.
pub(crate) fn holders_of<'a>(
    locks: &[&'a LockView],
    instances: usize,
    quorum: usize,
    listed: usize,
) -> Vec<(&'a str, HolderStatus)> {
    let mut seen: Vec<(&str, Vec<&Hold>)> = Vec::new();
    for hold in locks.iter().flat_map(|lock| &lock.holds) {
        match seen.iter_mut().find(|(member, _)| *member == hold.member) {
            Some((_, holds)) => holds.push(hold),
            None => seen.push((&hold.member, vec![hold])),
        }
    }
    seen.into_iter()
        .filter(|(_, holds)| holds.len() >= listed)
        .map(|(member, holds)| {
            let mut leases: Vec<Duration> = holds.iter().map(|hold| hold.lease_left).collect();
            leases.sort_unstable_by(|a, b| b.cmp(a));
            let first = holds[0].token;
            let agreed = holds.len() == instances && holds.iter().all(|h| h.token == first);
            let holder = HolderStatus {
                session: session_of(member).to_owned(),
                owner: String::new(),
                mode: holds[0].mode,
                token: first.filter(|_| agreed),
                held_for: None,
                lease_left: Some(leases[quorum.min(leases.len()) - 1]),
            };
            (member, holder)
        })
        .collect()
}

/// The members that hold or wait on a majority and are no listed holder,
/// by their mean place in the queues.
fn waiters_of<'a>(
    locks: &[&'a LockView],
    quorum: usize,
    holders: &BTreeSet<&str>,
) -> Vec<(&'a str, WaiterStatus)> {
    // Per member: its mode, how many instances list it, and the sum and
    // number of its places.
    let mut seen: BTreeMap<&str, (Mode, usize, usize, usize)> = BTreeMap::new();
    for lock in locks {
        for (place, waiting) in lock.places.iter().enumerate() {
            let entry = seen
                .entry(&waiting.member)
                .or_insert((waiting.mode, 0, 0, 0));
            entry.1 += 1;
            entry.2 += place;
            entry.3 += 1;
        }
    }
    for hold in locks.iter().flat_map(|lock| &lock.holds) {
        if let Some(entry) = seen.get_mut(hold.member.as_str()) {
            entry.1 += 1;
        }
    }
    let mut waiters: Vec<(f64, &str, Mode)> = seen
        .into_iter()
        .filter(|(member, (_, listed, _, _))| *listed >= quorum && !holders.contains(member))
        .map(|(member, (mode, _, sum, places))| (sum as f64 / places as f64, member, mode))
        .collect();
    waiters.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
    waiters
        .into_iter()
        .map(|(_, member, mode)| {
            let waiter = WaiterStatus {
                session: session_of(member).to_owned(),
                owner: String::new(),
                mode,
                waiting_for: None,
            };
            (member, waiter)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's `TIME` of 1,000.999 s (1,000,999 ms), and a lock's keys as
    /// `read_lock` reads them.
    fn raw(
        main: &str,
        holders: &[(&str, u64)],
        queue: &[&str],
        records: &[(&str, &str)],
    ) -> RawLock {
        (
            (1_000, 999_000),
            Some(main.to_owned()),
            -1,
            Some(7),
            holders
                .iter()
                .map(|(member, ends)| ((*member).to_owned(), *ends as f64))
                .collect(),
            queue.iter().map(|member| (*member).to_owned()).collect(),
            records
                .iter()
                .map(|(field, record)| ((*field).to_owned(), (*record).to_owned()))
                .collect(),
        )
    }

    /// Leases are read against Redis's clock to the ms; a hold whose lease
    /// ends now is over; a hold handed over from the queue shows its token.
    #[test]
    fn a_holds_lease_is_read_against_redis_time_to_the_ms() {
        let lock = view(raw(
            "*x/",
            &[("a|1|0", 1_005_999), ("b|1|0", 1_000_999)],
            &[],
            &[("wa|1|0", "H|41|1|channel")],
        ));
        assert_eq!(lock.counter, Some(7));
        assert_eq!(lock.holds.len(), 1, "the lease that ends now is over");
        assert_eq!(lock.holds[0].member, "a|1|0");
        assert_eq!(lock.holds[0].lease_left, Duration::from_millis(5_000));
        assert_eq!(lock.holds[0].token, Some(41));
    }

    fn hold(member: &str, token: Option<u64>) -> Hold {
        Hold {
            member: member.to_owned(),
            mode: Mode::Exclusive,
            token,
            lease_left: Duration::from_secs(1),
        }
    }

    /// One instance's lock with `holds`, and `places` in queue order.
    fn lock(holds: Vec<Hold>, places: &[&str]) -> LockView {
        LockView {
            holds,
            places: places
                .iter()
                .map(|member| Place {
                    member: (*member).to_owned(),
                    mode: Mode::Exclusive,
                })
                .collect(),
            counter: None,
        }
    }

    /// A holder's token is shown only where every instance lists the hold,
    /// with that token: one that did not answer may have granted another.
    #[test]
    fn a_token_is_shown_only_where_every_instance_agrees() {
        let (a, b) = (
            lock(vec![hold("m|1|0", Some(5))], &[]),
            lock(vec![hold("m|1|0", Some(5))], &[]),
        );
        let shown = holders_of(&[&a, &b], 2, 2, 2);
        assert_eq!(shown[0].1.token, Some(5));
        let shown = holders_of(&[&a, &b], 3, 2, 2);
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].1.token, None, "two of three answered");
        let c = lock(vec![hold("m|1|0", Some(6))], &[]);
        let shown = holders_of(&[&a, &c], 2, 2, 2);
        assert_eq!(shown[0].1.token, None, "the instances disagree");
    }

    /// Waiters are members listed on a majority, as a place or a hold (a
    /// hold on a minority is a wait still), in order of their mean place.
    #[test]
    fn waiters_are_listed_on_a_majority_in_order_of_their_mean_place() {
        let none = BTreeSet::new();
        let names = |waiters: Vec<(&str, WaiterStatus)>| -> Vec<String> {
            waiters
                .into_iter()
                .map(|(member, _)| member.to_owned())
                .collect()
        };
        // `m` holds on one instance and waits on another; `n` waits on one.
        let (a, b) = (
            lock(vec![], &["m|1|0", "n|1|0"]),
            lock(vec![hold("m|1|0", None)], &[]),
        );
        assert_eq!(names(waiters_of(&[&a, &b], 2, &none)), ["m|1|0"]);
        // `p` at 0, 0 and 3 (mean 1) comes before `q` at 1 and 2, then `x`
        // at 1 and 2 (both a mean of 1.5, in the order of their names).
        let a = lock(vec![], &["p|1|0", "q|1|0"]);
        let b = lock(vec![], &["p|1|0", "x|1|0", "q|1|0"]);
        let c = lock(vec![], &["y|1|0", "z|1|0", "x|1|0", "p|1|0"]);
        assert_eq!(
            names(waiters_of(&[&a, &b, &c], 2, &none)),
            ["p|1|0", "q|1|0", "x|1|0"]
        );
    }
}
