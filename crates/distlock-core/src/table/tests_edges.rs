//! The table's edges that `cargo mutants` found no test for (docs/0012):
//! its counters, token windows met by a whole group, deadlines reached
//! exactly, stale `max_hold` entries, and the forgetting of idle keys.

use std::sync::Arc;

use tokio::time::advance;

use super::tests::{granted, spec, Window, SECOND};
use super::*;
use crate::status::StatusQuery;

#[tokio::test(start_paused = true)]
async fn counters_count_each_event_once() {
    let mut table = LockTable::default();
    let a = table.open_session(spec(60 * SECOND)).expect("open");
    let b = table.open_session(spec(60 * SECOND)).expect("open");
    let short = table.open_session(spec(2 * SECOND)).expect("open");
    // Memory tokens start at 1 (InMemoryTokens' documented range).
    assert_eq!(granted(table.acquire(a, "k1", Mode::Exclusive, false)), 1);
    assert!(table.release(a, "k1", None));
    let forced_token = granted(table.acquire(b, "k2", Mode::Exclusive, false));
    let forced = table.force_release("k2");
    assert_eq!(forced.len(), 1);
    assert_eq!(forced[0].token, Some(forced_token));
    assert_eq!(table.counters().forced_releases, 1);
    assert!(table.force_release("k2").is_empty(), "nothing left to end");
    assert_eq!(
        table.counters().forced_releases,
        1,
        "an empty one is not counted"
    );
    granted(table.acquire(short, "k3", Mode::Exclusive, false));
    advance(3 * SECOND).await;
    let counters = table.counters();
    assert_eq!(
        (
            counters.sessions_opened,
            counters.sessions_expired,
            counters.grants,
            counters.releases,
            counters.forced_releases,
        ),
        (3, 1, 3, 1, 1)
    );
    assert_eq!((counters.sessions, counters.held), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn a_group_takes_no_key_unless_all_its_tokens_are_safe() {
    let window = Window {
        base: 0,
        ceiling: 3,
        raises: 0,
        refuse: true,
    };
    let mut table = LockTable::new(Limits::default(), Box::new(window));
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let keys = |names: &[&str]| -> Vec<(String, Mode)> {
        names
            .iter()
            .map(|name| (name.to_string(), Mode::Exclusive))
            .collect()
    };
    // Tokens 1 and 2 are below the ceiling: granted without a raise.
    match table.acquire_all(id, &keys(&["a"]), false) {
        AttemptAll::Granted(tokens) => assert_eq!(tokens, vec![1]),
        other => panic!("expected a grant, got {other:?}"),
    }
    assert!(table.release(id, "a", None));
    // Tokens 2 and 3 reach the ceiling, which cannot be raised: no key.
    assert!(matches!(
        table.acquire_all(id, &keys(&["a", "b"]), false),
        AttemptAll::NoTokens
    ));
    assert!(!table.holds(id, "a") && !table.holds(id, "b"));
}

#[tokio::test(start_paused = true)]
async fn a_group_raises_the_ceiling_it_reaches() {
    let window = Window {
        base: 0,
        ceiling: 3,
        raises: 0,
        refuse: false,
    };
    let mut table = LockTable::new(Limits::default(), Box::new(window));
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let group = vec![
        ("a".to_owned(), Mode::Exclusive),
        ("b".to_owned(), Mode::Exclusive),
        ("c".to_owned(), Mode::Exclusive),
    ];
    match table.acquire_all(id, &group, false) {
        AttemptAll::Granted(tokens) => assert_eq!(tokens, vec![1, 2, 3]),
        other => panic!("expected a grant, got {other:?}"),
    }
    // One raise, for the group's last token (3), made before any grant.
    assert!(format!("{table:?}").contains("raises: 1"), "{table:?}");
}

#[tokio::test(start_paused = true)]
async fn a_session_lives_while_renewed_and_is_gone_after() {
    let mut table = LockTable::default();
    let id = table.open_session(spec(10 * SECOND)).expect("open");
    assert!(table.has_session(id));
    advance(6 * SECOND).await;
    assert!(table.renew(id));
    advance(6 * SECOND).await;
    // 12 s after opening, 6 s after the renewal: alive.
    assert!(table.renew(id), "a renewal extends the lease from now");
    advance(10 * SECOND).await;
    // Exactly at its deadline the lease has run out.
    table.purge(Instant::now());
    assert!(!table.has_session(id));
    assert!(!table.renew(id));
}

#[tokio::test(start_paused = true)]
async fn max_hold_ends_a_hold_at_its_deadline_not_before() {
    let mut table = LockTable::default();
    let id = table
        .open_session(SessionSpec {
            max_hold: Some(5 * SECOND),
            ..spec(60 * SECOND)
        })
        .expect("open");
    granted(table.acquire(id, "k", Mode::Exclusive, false));
    advance(SECOND).await;
    table.purge(Instant::now());
    assert!(table.holds(id, "k"), "1 s into a 5 s max_hold");
    // Released and taken again at 2 s: the first hold's deadline (5 s) is
    // stale and must not end the second hold (until 7 s).
    assert!(table.release(id, "k", None));
    advance(SECOND).await;
    granted(table.acquire(id, "k", Mode::Exclusive, false));
    advance(3 * SECOND).await;
    table.purge(Instant::now());
    assert!(
        table.holds(id, "k"),
        "the stale deadline ended a later hold"
    );
    advance(2 * SECOND).await;
    table.purge(Instant::now());
    assert!(!table.holds(id, "k"), "the later hold's own deadline");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_granted_when_the_lock_delay_ends() {
    let mut table = LockTable::default();
    let lapsing = table
        .open_session(SessionSpec {
            lock_delay: 3 * SECOND,
            ..spec(2 * SECOND)
        })
        .expect("open");
    let waiter = table.open_session(spec(60 * SECOND)).expect("open");
    granted(table.acquire(lapsing, "k", Mode::Exclusive, false));
    let Attempt::Queued(_, mut grant) = table.acquire(waiter, "k", Mode::Exclusive, true) else {
        panic!("expected to queue");
    };
    advance(2 * SECOND).await;
    table.purge(Instant::now());
    assert!(grant.try_recv().is_err(), "the lock delay blocks the key");
    advance(3 * SECOND).await;
    table.purge(Instant::now());
    assert!(grant.try_recv().is_ok(), "granted as the delay ends");
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_forgotten() {
    let mut table = LockTable::default();
    let all = StatusQuery::Prefix(String::new());
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    granted(table.acquire(id, "k", Mode::Exclusive, false));
    assert!(table.release(id, "k", None));
    assert!(table.status(&all).is_empty(), "a released key is forgotten");
    let lapsing = table
        .open_session(SessionSpec {
            lock_delay: 3 * SECOND,
            ..spec(2 * SECOND)
        })
        .expect("open");
    granted(table.acquire(lapsing, "blocked", Mode::Exclusive, false));
    advance(2 * SECOND).await;
    assert_eq!(table.status(&all).len(), 1, "kept while its delay runs");
    // A refused request must not forget the block it was refused by.
    for _ in 0..2 {
        assert!(matches!(
            table.acquire(id, "blocked", Mode::Exclusive, false),
            Attempt::Busy
        ));
    }
    advance(3 * SECOND).await;
    assert!(
        table.status(&all).is_empty(),
        "forgotten once its delay ended"
    );
    granted(table.acquire(id, "blocked", Mode::Exclusive, false));
}

#[tokio::test(start_paused = true)]
async fn a_resume_keeps_only_the_holds_named_with_their_tokens() {
    let mut table = LockTable::default();
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let other = table.open_session(spec(60 * SECOND)).expect("open");
    let a = granted(table.acquire(id, "a", Mode::Exclusive, false));
    let b = granted(table.acquire(id, "b", Mode::Exclusive, false));
    granted(table.acquire(id, "c", Mode::Exclusive, false));
    granted(table.acquire(other, "g", Mode::Exclusive, false));
    let group = [("g".to_owned(), Mode::Exclusive)];
    let AttemptAll::Queued(..) = table.acquire_all(id, &group, true) else {
        panic!("expected the group to queue behind the holder");
    };
    let third = table.open_session(spec(60 * SECOND)).expect("open");
    let AttemptAll::Queued(_, mut third_grant) = table.acquire_all(third, &group, true) else {
        panic!("expected the group to queue behind the holder");
    };
    // "b" is named with another token: its hold is not the one the client
    // knows of.
    let mut ended = table.keep_only(id, &[("a".to_owned(), a), ("b".to_owned(), b + 100)]);
    ended.sort();
    assert_eq!(ended, ["b", "c"]);
    assert!(table.holds(id, "a"));
    assert!(!table.holds(id, "b") && !table.holds(id, "c"));
    assert!(table.holds(other, "g"), "another session's hold stays");
    assert!(table.release(other, "g", None));
    assert!(!table.holds(id, "g"), "the withdrawn group takes no grant");
    assert!(
        table.holds(third, "g"),
        "another session's group is granted"
    );
    assert!(third_grant.try_recv().is_ok());
}

#[tokio::test(start_paused = true)]
async fn waits_wake_when_the_holders_lease_runs_out() {
    let table: SharedTable = Arc::new(std::sync::Mutex::new(LockTable::default()));
    let (holder, one, all) = {
        let mut locked = lock_table(&table);
        let holder = locked.open_session(spec(2 * SECOND)).expect("open");
        granted(locked.acquire(holder, "a", Mode::Exclusive, false));
        let one = locked.open_session(spec(60 * SECOND)).expect("open");
        let all = locked.open_session(spec(120 * SECOND)).expect("open");
        (holder, one, all)
    };
    let start = Instant::now();
    let until = start + 30 * SECOND;
    // Nothing but the holder's lease ending changes "a": each wait must
    // wake for it by itself, as no release will come.
    let Attempt::Queued(id, grant) = lock_table(&table).acquire(one, "a", Mode::Exclusive, true)
    else {
        panic!("expected to queue");
    };
    let ticket = Ticket::new(Arc::clone(&table), one, "a".to_owned(), id, grant);
    assert_eq!(ticket.key(), "a");
    assert!(matches!(ticket.wait(until).await, Waited::Granted(_)));
    assert_eq!(Instant::now() - start, 2 * SECOND);
    assert!(!lock_table(&table).has_session(holder));
    let keys = vec![
        ("a".to_owned(), Mode::Exclusive),
        ("b".to_owned(), Mode::Exclusive),
    ];
    let AttemptAll::Queued(id, grant) = lock_table(&table).acquire_all(all, &keys, true) else {
        panic!("expected the group to queue behind the new holder");
    };
    // The single waiter's session now holds "a"; it lapses unrenewed at
    // 60 s.
    let ticket = GroupTicket::new(Arc::clone(&table), all, keys, id, grant);
    assert!(matches!(
        ticket.wait(start + 90 * SECOND).await,
        WaitedAll::Granted(_)
    ));
    assert_eq!(Instant::now() - start, 60 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn live_watchers_outlast_the_forgetting_of_dead_ones() {
    let mut table = LockTable::default();
    let id = table.open_session(spec(60 * SECOND)).expect("open");
    let mut first = table.watch_key("x");
    let mut second = table.watch_key("x");
    // Past the 1024th watch, which forgets the watchers that left.
    for _ in 0..1100 {
        drop(table.watch_key("y"));
    }
    granted(table.acquire(id, "x", Mode::Exclusive, false));
    assert!(first.try_recv().is_ok(), "the first watcher was forgotten");
    assert!(
        second.try_recv().is_ok(),
        "the second watcher was forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_wakes_when_the_lock_delay_ends() {
    let table: SharedTable = Arc::new(std::sync::Mutex::new(LockTable::default()));
    let (id, grant, waiter) = {
        let mut locked = lock_table(&table);
        let lapsing = locked
            .open_session(SessionSpec {
                lock_delay: 3 * SECOND,
                ..spec(2 * SECOND)
            })
            .expect("open");
        granted(locked.acquire(lapsing, "k", Mode::Exclusive, false));
        let waiter = locked.open_session(spec(60 * SECOND)).expect("open");
        let Attempt::Queued(id, grant) = locked.acquire(waiter, "k", Mode::Exclusive, true) else {
            panic!("expected to queue");
        };
        (id, grant, waiter)
    };
    let start = Instant::now();
    let ticket = Ticket::new(Arc::clone(&table), waiter, "k".to_owned(), id, grant);
    // The lease ends at 2 s, the delay it leaves at 5 s: the wait wakes
    // for each by itself.
    assert!(matches!(
        ticket.wait(start + 30 * SECOND).await,
        Waited::Granted(_)
    ));
    assert_eq!(Instant::now() - start, 5 * SECOND);
}

#[tokio::test(start_paused = true)]
async fn a_group_that_loses_an_earlier_key_stops_blocking_its_later_ones() {
    let mut table = LockTable::default();
    let holder = table
        .open_session(SessionSpec {
            lock_delay: 5 * SECOND,
            ..spec(60 * SECOND)
        })
        .expect("open");
    let reader = table.open_session(spec(60 * SECOND)).expect("open");
    let group = table.open_session(spec(60 * SECOND)).expect("open");
    let waiter = table.open_session(spec(60 * SECOND)).expect("open");
    granted(table.acquire(holder, "a", Mode::Shared, false));
    granted(table.acquire(reader, "b", Mode::Shared, false));
    // "a" admits the group's shared request, so the group leads "a" and has
    // reached "b", where it waits (exclusive) for the reader to go.
    let keys = vec![
        ("a".to_owned(), Mode::Shared),
        ("b".to_owned(), Mode::Exclusive),
    ];
    let AttemptAll::Queued(_, mut tokens) = table.acquire_all(group, &keys, true) else {
        panic!("expected the group to queue");
    };
    let Attempt::Queued(_, mut grant) = table.acquire(waiter, "b", Mode::Shared, true) else {
        panic!("expected to queue behind the group");
    };
    // The holder of "a" expires: "a" is blocked for its lock-delay, so the
    // group no longer reaches "b", and the reader queued there is next.
    // Only "a" changed: "b" is looked at because the group waits on both.
    table.end_session(holder, Some(Instant::now()));
    assert!(
        grant.try_recv().is_ok(),
        "granted once the group lost \"a\""
    );
    assert!(table.holds(waiter, "b"));
    assert!(tokens.try_recv().is_err(), "the group still waits");
}
