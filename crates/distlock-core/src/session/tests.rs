//! What the shared suite exercises only through timing, or not at all: the
//! margin taken off a lease, a lease's deadline, "no deadline", and what a
//! session and its holds say of their leases.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{drift_margin, far_future, lease_deadline};
use crate::store::{Capabilities, SessionModel};
use crate::{Client, ErrorKind, MemoryStore, Mode, Session};

fn memory() -> Client {
    Client::new(Arc::new(MemoryStore::new()))
}

/// Whether `session` can take `key` now (what it took goes back as the
/// guard drops).
async fn takes(session: &Session, key: &str) -> bool {
    session.lock(key).try_lock().await.expect("try").is_some()
}

#[test]
fn the_drift_margin_is_a_hundredth_of_the_ttl_and_two_milliseconds() {
    assert_eq!(drift_margin(Duration::ZERO), Duration::from_millis(2));
    assert_eq!(
        drift_margin(Duration::from_secs(10)),
        Duration::from_millis(102)
    );
}

#[test]
fn a_lease_ends_a_ttl_less_the_margin_after_it_was_sent() {
    let sent = Instant::now();
    let ttl = Duration::from_secs(10);
    let lease = Capabilities::minimal("lease");
    assert_eq!(
        lease_deadline(&lease, ttl, sent),
        Some(sent + Duration::from_millis(9_898))
    );
    let mut connection = Capabilities::minimal("connection");
    connection.session = SessionModel::Connection;
    assert_eq!(
        lease_deadline(&connection, ttl, sent),
        Some(sent + Duration::from_millis(9_898)),
        "a connection's session still renews, so it has a lease"
    );
    let mut process = Capabilities::minimal("process");
    process.session = SessionModel::Process;
    assert_eq!(lease_deadline(&process, ttl, sent), None);
}

#[test]
fn no_deadline_is_three_decades_away() {
    let ahead = far_future() - Instant::now();
    let year = Duration::from_secs(365 * 24 * 60 * 60);
    assert!(ahead > year * 29 && ahead <= year * 30, "{ahead:?}");
}

/// Renewals keep a hold past several leases, with its deadline and the
/// session's moving on; the session says its TTL, and is not lost.
#[tokio::test]
async fn renewals_move_the_deadlines_on() {
    let client = memory();
    let ttl = Duration::from_millis(300);
    let session = client.session().ttl(ttl).open().await.expect("open");
    assert_eq!(session.ttl(), ttl);
    let shown = format!("{session:?}");
    assert!(
        shown.contains("memory") && shown.contains("300ms"),
        "{shown}"
    );
    let guard = session.lock("k").await.expect("free");
    let (first, lease) = (guard.expires_at(), session.lease_deadline());
    let first = first.expect("the memory store has leases");
    let lease = lease.expect("the memory store has leases");
    assert!(first > Instant::now() && first <= Instant::now() + ttl);
    tokio::time::sleep(ttl * 3).await;
    assert!(guard.is_held() && !session.is_lost());
    let later = guard.expires_at().expect("a lease");
    assert!(later > first + ttl, "the hold's deadline did not move on");
    let renewed = session.lease_deadline().expect("a lease");
    assert!(renewed > lease + ttl, "the session's lease did not move on");
    guard.release().await.expect("release");
}

/// A session whose renewals stop is lost once its lease runs out.
#[cfg(feature = "test-hooks")]
#[tokio::test]
async fn a_frozen_session_is_lost() {
    let client = memory();
    let ttl = Duration::from_millis(200);
    let session = client.session().ttl(ttl).open().await.expect("open");
    let guard = session.lock("k").await.expect("free");
    session.freeze_for_test();
    assert!(!session.is_lost());
    tokio::time::timeout(ttl * 10, guard.lost())
        .await
        .expect("the hold is lost once the lease ran out");
    // The session is marked lost by its renewal task, at the same deadline.
    let lost = async {
        while !session.is_lost() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(ttl * 10, lost)
        .await
        .expect("the session is lost once its lease ran out");
}

/// A semaphore of no permits is refused, alone or among several keys.
#[tokio::test]
async fn a_semaphore_of_no_permits_is_refused() {
    let client = memory();
    let session = client.session().open().await.expect("open");
    let err = session.semaphore("k", 0).await.expect_err("no permits");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let keys = [
        ("a".to_owned(), Mode::Exclusive),
        ("b".to_owned(), Mode::Semaphore { permits: 0 }),
    ];
    let err = session.lock_all(keys).await.expect_err("no permits");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(takes(&session, "a").await);
}

/// A session that holds one of the keys of its `lock_all` holds it once
/// more (reentrantly, with the same token) and takes the others.
#[tokio::test]
async fn lock_all_over_a_key_already_held_is_reentrant() {
    let client = memory();
    let session = client.session().open().await.expect("open");
    let first = session.lock("a").await.expect("free");
    let both = tokio::time::timeout(
        Duration::from_secs(5),
        session.lock_all(["a", "b"]).wait(Duration::from_secs(2)),
    )
    .await
    .expect("no deadlock with itself")
    .expect("both");
    assert_eq!(both.token("a"), Some(first.token()));
    first.release().await.expect("release");
    let other = client.session().open().await.expect("open");
    assert!(
        !takes(&other, "a").await,
        "the lock_all's hold of 'a' went with the first guard"
    );
    both.release().await.expect("release");
    assert!(takes(&other, "a").await);
}

/// Closing a session ends every leadership it won, not only the last, by
/// the time `close` returns.
#[tokio::test]
async fn closing_a_session_ends_each_of_its_leaderships() {
    let client = memory();
    let session = client.session().open().await.expect("open");
    let first = session
        .elect("one")
        .value("v")
        .campaign()
        .await
        .expect("one");
    let second = session
        .elect("two")
        .value("v")
        .campaign()
        .await
        .expect("two");
    session.close().await.expect("close");
    let other = client.session().open().await.expect("open");
    for name in ["one", "two"] {
        assert!(
            takes(&other, name).await,
            "{name} still held after close returned"
        );
    }
    for leadership in [&first, &second] {
        tokio::time::timeout(Duration::from_secs(5), leadership.lost())
            .await
            .expect("a leadership outlived its closed session");
    }
}

/// A key held twice by one session stays held until its last guard goes.
#[tokio::test]
async fn a_reentrant_hold_lasts_until_its_last_guard() {
    let client = memory();
    let session = client.session().open().await.expect("open");
    let other = client.session().open().await.expect("open");
    let first = session.lock("k").await.expect("free");
    let second = session.lock("k").await.expect("reentrant");
    let third = session.lock("k").await.expect("reentrant");
    for guard in [first, second] {
        guard.release().await.expect("release");
        assert!(
            !takes(&other, "k").await,
            "freed while a guard of it was alive"
        );
    }
    third.release().await.expect("release");
    assert!(takes(&other, "k").await);
}

/// What a `MultiGuard` says of its keys: their tokens in the order asked,
/// the earliest deadline, and, once one key is lost, not held and lost.
#[tokio::test]
async fn a_multi_guard_tells_of_its_keys() {
    let client = memory();
    // Short: a forced release is found at the next renewal.
    let ttl = Duration::from_millis(300);
    let session = client.session().ttl(ttl).open().await.expect("open");
    let both = session.lock_all(["b", "a"]).await.expect("free");
    let tokens = both.tokens();
    let keys: Vec<&str> = tokens.iter().map(|(key, _)| *key).collect();
    assert_eq!(keys, ["b", "a"]);
    assert_eq!(both.token("a"), Some(tokens[1].1));
    assert!(tokens.iter().all(|(_, token)| *token > 0), "{tokens:?}");
    assert_eq!(both.guards().len(), 2);
    let earliest = both.guards().iter().filter_map(|g| g.expires_at()).min();
    assert!(earliest.is_some());
    assert_eq!(both.expires_at(), earliest);
    assert!(both.is_held());
    client.force_release("a").await.expect("force");
    tokio::time::timeout(Duration::from_secs(5), both.lost())
        .await
        .expect("lost once a key was ended");
    assert!(!both.is_held());
    let guards = both.into_guards();
    assert_eq!(guards.len(), 2);
    assert!(guards[0].is_held() && !guards[1].is_held());
}
