//! The table alone, on paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{advance, Instant};

use super::*;
use crate::status::StatusQuery;

pub(super) const SECOND: Duration = Duration::from_secs(1);

pub(super) fn spec(ttl: Duration) -> SessionSpec {
    SessionSpec {
        owner: String::new(),
        ttl,
        lock_delay: Duration::ZERO,
        max_hold: None,
    }
}

pub(super) fn granted(attempt: Attempt) -> u64 {
    match attempt {
        Attempt::Granted(token) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn max_hold_ends_a_hold_and_blocks_for_lock_delay() {
    let mut table = LockTable::default();
    let holder = table
        .open_session(SessionSpec {
            owner: String::new(),
            ttl: 60 * SECOND,
            lock_delay: 2 * SECOND,
            max_hold: Some(5 * SECOND),
        })
        .expect("open");
    let other = table.open_session(spec(60 * SECOND)).expect("open");
    granted(table.acquire(holder, "k", Mode::Exclusive, false));
    advance(5 * SECOND).await;
    table.renew(holder);
    assert!(!table.holds(holder, "k"), "max_hold ended the hold");
    assert!(
        matches!(
            table.acquire(other, "k", Mode::Exclusive, false),
            Attempt::Busy
        ),
        "lock-delay"
    );
    advance(2 * SECOND).await;
    granted(table.acquire(other, "k", Mode::Exclusive, false));
    assert_eq!(table.counters().holds_expired, 1);
}

#[tokio::test(start_paused = true)]
async fn check_and_status_describe_holders_and_waiters_in_order() {
    let mut table = LockTable::default();
    let ids: Vec<SessionId> = (0..3)
        .map(|_| table.open_session(spec(10 * SECOND)).expect("open"))
        .collect();
    let token = granted(table.acquire(ids[0], "jobs/a", Mode::Exclusive, false));
    let _first = table.acquire(ids[1], "jobs/a", Mode::Shared, true);
    let _second = table.acquire(ids[2], "jobs/a", Mode::Exclusive, true);
    granted(table.acquire(ids[1], "other", Mode::Exclusive, false));
    advance(3 * SECOND).await;
    assert!(table.check("jobs/a", token));
    assert!(!table.check("jobs/a", token + 1));
    let status = table.status(&StatusQuery::Prefix("jobs/".into()));
    assert_eq!(status.len(), 1, "prefix filter");
    assert_eq!(table.status(&StatusQuery::Key("jobs".into())).len(), 0);
    let key = &status[0];
    assert_eq!(key.holders[0].token, Some(token));
    assert_eq!(key.holders[0].held_for, Some(3 * SECOND));
    assert_eq!(key.holders[0].lease_left, Some(7 * SECOND));
    let order: Vec<String> = key.waiters.iter().map(|w| w.session.clone()).collect();
    assert_eq!(order, vec![ids[1].to_string(), ids[2].to_string()]);
    let counters = table.counters();
    assert_eq!(
        (counters.sessions, counters.held, counters.waiters),
        (3, 2, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn limits_refuse_extra_sessions_and_waiters() {
    let limits = Limits {
        max_sessions: 3,
        max_waiters_per_key: 1,
    };
    let mut table = LockTable::new(limits, Box::new(InMemoryTokens));
    let a = table.open_session(spec(SECOND)).expect("first");
    let b = table.open_session(spec(SECOND)).expect("second");
    let c = table.open_session(spec(SECOND)).expect("third");
    assert_eq!(table.open_session(spec(SECOND)), Err(TooManySessions(3)));
    granted(table.acquire(a, "k", Mode::Exclusive, false));
    assert!(matches!(
        table.acquire(b, "k", Mode::Exclusive, true),
        Attempt::Queued(..)
    ));
    assert!(matches!(
        table.acquire(c, "k", Mode::Shared, true),
        Attempt::QueueFull
    ));
    table.end_session(b, None);
    table
        .open_session(spec(SECOND))
        .expect("a closed session makes room");
}

#[tokio::test(start_paused = true)]
async fn no_grant_before_the_restart_wait_out() {
    let mut table = LockTable::default();
    table.block_grants_until(Instant::now() + 3 * SECOND);
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    assert!(matches!(
        table.acquire(id, "k", Mode::Exclusive, false),
        Attempt::Busy
    ));
    advance(3 * SECOND).await;
    granted(table.acquire(id, "k", Mode::Exclusive, false));
}

/// Tokens in a window that a durable epoch vouches for; raising moves it.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) base: u64,
    pub(super) ceiling: u64,
    pub(super) raises: u32,
    pub(super) refuse: bool,
}

impl TokenRange for Window {
    fn base(&self) -> u64 {
        self.base
    }
    fn ceiling(&self) -> u64 {
        self.ceiling
    }
    fn raise(&mut self, needed: u64) -> bool {
        if self.refuse {
            return false;
        }
        self.raises += 1;
        self.ceiling = needed + 2;
        true
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_start_above_the_base_and_raise_the_ceiling_when_reached() {
    let window = Window {
        base: 1000,
        ceiling: 1003,
        raises: 0,
        refuse: false,
    };
    let mut table = LockTable::new(Limits::default(), Box::new(window));
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(granted(table.acquire(id, "k", Mode::Exclusive, false)));
        assert!(table.release(id, "k", None));
    }
    assert_eq!(tokens, vec![1001, 1002, 1003, 1004, 1005]);
    assert!(format!("{table:?}").contains("raises: 2"), "{table:?}");
}

#[tokio::test(start_paused = true)]
async fn no_grant_when_the_ceiling_cannot_be_raised() {
    let window = Window {
        base: 0,
        ceiling: 2,
        raises: 0,
        refuse: true,
    };
    let mut table = LockTable::new(Limits::default(), Box::new(window));
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    granted(table.acquire(id, "k", Mode::Exclusive, false));
    assert!(table.release(id, "k", None));
    assert!(matches!(
        table.acquire(id, "k", Mode::Exclusive, false),
        Attempt::NoTokens
    ));
    assert!(!table.holds(id, "k"));
}

#[tokio::test(start_paused = true)]
async fn a_session_takes_a_key_once_and_releases_by_token() {
    let mut table = LockTable::default();
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let token = granted(table.acquire(id, "k", Mode::Shared, false));
    assert!(matches!(
        table.acquire(id, "k", Mode::Shared, true),
        Attempt::AlreadyHeld
    ));
    assert!(
        !table.release(id, "k", Some(token + 1)),
        "another grant's token frees nothing"
    );
    assert!(table.holds(id, "k"));
    assert!(table.release(id, "k", Some(token)));
}

#[tokio::test(start_paused = true)]
async fn purge_never_grants_to_a_session_that_is_due_to_end() {
    let mut table = LockTable::default();
    let holder = table.open_session(spec(SECOND)).expect("open");
    let waiter = table.open_session(spec(SECOND)).expect("open");
    granted(table.acquire(holder, "k", Mode::Exclusive, false));
    let Attempt::Queued(_, mut grant) = table.acquire(waiter, "k", Mode::Exclusive, true) else {
        panic!("the waiter should queue");
    };
    let grants = table.counters().grants;
    advance(2 * SECOND).await;
    table.purge(Instant::now());
    assert!(
        grant.try_recv().is_err(),
        "granted to a session already due to end"
    );
    assert_eq!(table.counters().grants, grants);
    assert_eq!(table.counters().sessions, 0);
}

/// A session `resumed` waiting for "k", which `holder` holds, in a table
/// shared as the server shares it: the holder's token and the wait's ticket.
fn a_wait_behind_a_holder(
    table: &SharedTable,
    resumed: SessionId,
    holder: SessionId,
) -> (u64, Ticket) {
    let mut locked = lock_table(table);
    let token = granted(locked.acquire(holder, "k", Mode::Exclusive, false));
    let Attempt::Queued(waiter, grant) = locked.acquire(resumed, "k", Mode::Exclusive, true) else {
        panic!("the waiter should queue");
    };
    drop(locked);
    let ticket = Ticket::new(Arc::clone(table), resumed, "k".to_owned(), waiter, grant);
    (token, ticket)
}

#[tokio::test(start_paused = true)]
async fn a_wait_polled_after_a_resume_settled_the_holds_takes_no_grant() {
    let table: SharedTable = Arc::new(std::sync::Mutex::new(LockTable::default()));
    let resumed = lock_table(&table)
        .open_session(spec(60 * SECOND))
        .expect("open");
    let holder = lock_table(&table)
        .open_session(spec(60 * SECOND))
        .expect("open");
    let (token, old_wait) = a_wait_behind_a_holder(&table, resumed, holder);
    // The resume settles the holds; the old stream's wait has not yet seen
    // its abort when the key is released.
    lock_table(&table).keep_only(resumed, &[]);
    assert!(lock_table(&table).release(holder, "k", Some(token)));
    let waited = old_wait.wait(Instant::now() + SECOND).await;
    assert_eq!(
        waited,
        Waited::SessionGone,
        "the withdrawn wait ends ungranted"
    );
    assert!(
        !lock_table(&table).holds(resumed, "k"),
        "the session holds nothing its client was not told of"
    );
    granted(lock_table(&table).acquire(holder, "k", Mode::Exclusive, false));
}

#[tokio::test(start_paused = true)]
async fn a_withdrawn_wait_that_leaves_late_leaves_the_new_wait_alone() {
    let table: SharedTable = Arc::new(std::sync::Mutex::new(LockTable::default()));
    let resumed = lock_table(&table)
        .open_session(spec(60 * SECOND))
        .expect("open");
    let holder = lock_table(&table)
        .open_session(spec(60 * SECOND))
        .expect("open");
    let (token, old_wait) = a_wait_behind_a_holder(&table, resumed, holder);
    lock_table(&table).keep_only(resumed, &[]);
    // The resumed stream asks again before the old stream's wait is dropped.
    let Attempt::Queued(waiter, grant) =
        lock_table(&table).acquire(resumed, "k", Mode::Exclusive, true)
    else {
        panic!("the session waits for the key again");
    };
    let new_wait = Ticket::new(Arc::clone(&table), resumed, "k".to_owned(), waiter, grant);
    drop(old_wait);
    assert!(
        matches!(
            lock_table(&table).acquire(resumed, "k", Mode::Exclusive, true),
            Attempt::AlreadyHeld
        ),
        "the session still waits for the key"
    );
    assert!(lock_table(&table).release(holder, "k", Some(token)));
    let waited = new_wait.wait(Instant::now() + SECOND).await;
    assert!(matches!(waited, Waited::Granted(_)), "{waited:?}");
    assert!(lock_table(&table).holds(resumed, "k"));
}

fn both(a: &str, b: &str) -> Vec<(String, Mode)> {
    vec![(a.into(), Mode::Exclusive), (b.into(), Mode::Exclusive)]
}

#[tokio::test(start_paused = true)]
async fn a_multi_key_request_is_granted_all_at_once_and_single_keys_queue_behind_it() {
    let mut table = LockTable::default();
    let [holder, group, single] =
        [0; 3].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let held_b = granted(table.acquire(holder, "b", Mode::Exclusive, false));
    let AttemptAll::Queued(_, mut tokens) = table.acquire_all(group, &both("a", "b"), true) else {
        panic!("b is held: the request must queue");
    };
    assert!(!table.holds(group, "a"), "nothing is held while it waits");
    // a is free, but the multi-key request waits for it first.
    let Attempt::Queued(_, mut single_a) = table.acquire(single, "a", Mode::Exclusive, true) else {
        panic!("a single request for a must queue behind the multi-key one");
    };
    assert!(table.release(holder, "b", Some(held_b)));
    let tokens = tokens.try_recv().expect("granted with b's release");
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|token| *token > held_b));
    assert!(table.holds(group, "a") && table.holds(group, "b"));
    assert!(single_a.try_recv().is_err(), "a is the group's");
    assert!(table.release(group, "a", Some(tokens[0])));
    let token = single_a
        .try_recv()
        .expect("a goes on to the single request");
    assert!(token > tokens[1]);
}

#[tokio::test(start_paused = true)]
async fn a_free_multi_key_request_is_granted_at_once_and_a_busy_try_takes_nothing() {
    let mut table = LockTable::default();
    let [first, second] = [0; 2].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let AttemptAll::Granted(tokens) = table.acquire_all(first, &both("a", "b"), false) else {
        panic!("both free");
    };
    assert!(tokens[0] < tokens[1], "one token per key, in order");
    assert!(matches!(
        table.acquire_all(second, &both("c", "b"), false),
        AttemptAll::Busy
    ));
    assert!(
        table.status(&StatusQuery::Key("c".into())).is_empty(),
        "a busy try leaves c untouched"
    );
    assert!(matches!(
        table.acquire_all(first, &both("a", "c"), true),
        AttemptAll::AlreadyHeld
    ));
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_or_ended_multi_key_waiter_leaves_every_queue() {
    let table: SharedTable = SharedTable::default();
    let (holder, waiter, other) = {
        let mut t = lock_table(&table);
        let ids = [0; 3].map(|_| t.open_session(spec(60 * SECOND)).expect("open"));
        granted(t.acquire(ids[0], "b", Mode::Exclusive, false));
        (ids[0], ids[1], ids[2])
    };
    let keys = both("a", "b");
    let AttemptAll::Queued(id, grant) = lock_table(&table).acquire_all(waiter, &keys, true) else {
        panic!("queued");
    };
    let ticket = GroupTicket::new(Arc::clone(&table), waiter, keys.clone(), id, grant);
    assert_eq!(
        ticket.wait(Instant::now() + SECOND).await,
        WaitedAll::TimedOut
    );
    granted(lock_table(&table).acquire(other, "a", Mode::Exclusive, false));
    let AttemptAll::Queued(_, mut ended) =
        lock_table(&table).acquire_all(waiter, &both("c", "b"), true)
    else {
        panic!("queued");
    };
    lock_table(&table).end_session(waiter, None);
    assert_eq!(
        ended.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed),
        "the ended session's wait is over"
    );
    let left = lock_table(&table).status(&StatusQuery::Prefix(String::new()));
    assert!(
        left.iter().all(|key| key.waiters.is_empty()),
        "waiters left behind: {left:?}"
    );
    assert!(lock_table(&table).holds(holder, "b"));
}

/// A session that holds `a` and asks for `b` (keys in byte order, one by
/// one) is not made to wait for a request for {a, b} that waits for `a`:
/// that request has not reached `b` yet.
#[tokio::test(start_paused = true)]
async fn a_multi_key_request_waiting_for_an_earlier_key_does_not_block_a_later_one() {
    let mut table = LockTable::default();
    let [holder, group, late] =
        [0; 3].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let held_a = granted(table.acquire(holder, "a", Mode::Exclusive, false));
    let AttemptAll::Queued(_, mut both) = table.acquire_all(group, &both("b", "a"), true) else {
        panic!("a is held: the request must queue");
    };
    let held_b = granted(table.acquire(holder, "b", Mode::Exclusive, true));
    assert!(table.release(holder, "b", Some(held_b)));
    // Once it heads a (free now), it reaches b: later requests for b wait.
    assert!(table.release(holder, "a", Some(held_a)));
    let tokens = both.try_recv().expect("both free: granted");
    assert!(tokens[0] > held_b && tokens[1] > held_b, "{tokens:?}");
    let Attempt::Queued(_, _) = table.acquire(late, "b", Mode::Exclusive, true) else {
        panic!("b is the request's now");
    };
}

/// A request that has reached `a` (it heads it) while it waits for `b`
/// keeps `a` from requests that came later.
#[tokio::test(start_paused = true)]
async fn a_multi_key_request_that_reached_a_key_keeps_it_from_later_requests() {
    let mut table = LockTable::default();
    let [holder, group, late] =
        [0; 3].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let held_b = granted(table.acquire(holder, "b", Mode::Exclusive, false));
    let AttemptAll::Queued(_, mut both) = table.acquire_all(group, &both("a", "b"), true) else {
        panic!("b is held: the request must queue");
    };
    assert!(
        matches!(
            table.acquire(late, "a", Mode::Exclusive, false),
            Attempt::Busy
        ),
        "a later try for a overtook the request that reached a"
    );
    assert!(table.release(holder, "b", Some(held_b)));
    assert_eq!(both.try_recv().expect("granted").len(), 2);
}

/// A request for {a, b, c} waiting for c has reached b: a later try for
/// b is busy. Before it reached a, it was passed over on b and c.
#[tokio::test(start_paused = true)]
async fn a_multi_key_request_blocks_the_keys_it_reached_and_only_those() {
    let mut table = LockTable::default();
    let [holder, group, late] =
        [0; 3].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let held_a = granted(table.acquire(holder, "a", Mode::Exclusive, false));
    let held_c = granted(table.acquire(holder, "c", Mode::Exclusive, false));
    let keys: Vec<(String, Mode)> = ["c", "a", "b"]
        .iter()
        .map(|key| ((*key).to_owned(), Mode::Exclusive))
        .collect();
    let AttemptAll::Queued(_, mut all) = table.acquire_all(group, &keys, true) else {
        panic!("a and c are held");
    };
    // Waiting for a: b is passed over.
    let held_b = granted(table.acquire(late, "b", Mode::Exclusive, false));
    assert!(table.release(late, "b", Some(held_b)));
    assert!(table.release(holder, "a", Some(held_a)));
    // It heads a (free) and b (free): it has reached c, and keeps b.
    assert!(
        matches!(
            table.acquire(late, "b", Mode::Exclusive, false),
            Attempt::Busy
        ),
        "a later try took b from the request that reached it"
    );
    assert!(table.release(holder, "c", Some(held_c)));
    let tokens = all.try_recv().expect("granted");
    assert_eq!(tokens.len(), 3);
    assert!(tokens[0] > held_c, "tokens in the order asked: {tokens:?}");
}

/// Single-key waiters keep their order around a multi-key request that is
/// passed over, and one behind it is granted when the key comes free.
#[tokio::test(start_paused = true)]
async fn single_waiters_keep_their_order_around_a_passed_over_request() {
    let mut table = LockTable::default();
    let [holder, group, first, second] =
        [0; 4].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let held_a = granted(table.acquire(holder, "a", Mode::Exclusive, false));
    let held_b = granted(table.acquire(holder, "b", Mode::Exclusive, false));
    let Attempt::Queued(_, mut first_b) = table.acquire(first, "b", Mode::Exclusive, true) else {
        panic!("b is held");
    };
    let AttemptAll::Queued(_, _all) = table.acquire_all(group, &both("a", "b"), true) else {
        panic!("queued");
    };
    let Attempt::Queued(_, mut second_b) = table.acquire(second, "b", Mode::Exclusive, true) else {
        panic!("b is held");
    };
    assert!(table.release(holder, "b", Some(held_b)));
    let token = first_b.try_recv().expect("the first single waiter first");
    assert!(second_b.try_recv().is_err());
    assert!(table.release(first, "b", Some(token)));
    // The request for {a, b} still waits for a: passed over on b.
    second_b
        .try_recv()
        .expect("the second single waiter, past the request");
    assert!(table.release(holder, "a", Some(held_a)));
}

/// Forty keys, the last one held: queueing and granting stay cheap (a
/// head is worked out once per key, not once per path to it).
#[tokio::test(start_paused = true)]
async fn a_request_for_many_keys_is_queued_and_granted_cheaply() {
    let mut table = LockTable::default();
    let [holder, group] = [0; 2].map(|_| table.open_session(spec(60 * SECOND)).expect("open"));
    let keys: Vec<(String, Mode)> = (0..40)
        .map(|i| (format!("k{i:02}"), Mode::Exclusive))
        .collect();
    let held = granted(table.acquire(holder, "k39", Mode::Exclusive, false));
    let started = std::time::Instant::now();
    let AttemptAll::Queued(_, mut all) = table.acquire_all(group, &keys, true) else {
        panic!("k39 is held");
    };
    assert!(table.release(holder, "k39", Some(held)));
    assert_eq!(all.try_recv().expect("granted").len(), 40);
    // Generous: the exponential version took minutes at 40 keys.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
