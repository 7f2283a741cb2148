//! The session paths the memory store never takes, on [`Shaped`]: polled
//! waits, `lock_all` one key at a time, refused modes, late grants, a lock's
//! own lease, failed releases and renewals, and observers of a store that
//! cannot watch or that restarted.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use super::shaped::Shaped;
use crate::{Client, ErrorKind, Mode, Session};

async fn open(store: &Arc<Shaped>, ttl: Duration) -> Session {
    let client = Client::new(Arc::clone(store) as _);
    client.session().ttl(ttl).open().await.expect("open")
}

const TTL: Duration = Duration::from_secs(5);

/// Whether `session` can take `key` now (what it took goes back as the
/// guard drops).
async fn takes(session: &Session, key: &str) -> bool {
    session.lock(key).try_lock().await.expect("try").is_some()
}

#[tokio::test]
async fn a_store_without_shared_locks_or_semaphores_refuses_them() {
    let store = Shaped::new(|caps| {
        caps.shared = false;
        caps.semaphore = false;
    });
    let session = open(&store, TTL).await;
    let read = session.read("k").try_lock().await.expect_err("no reads");
    assert_eq!(read.kind(), ErrorKind::Unsupported);
    assert!(read.to_string().contains("shared (read) locks"), "{read}");
    let permits = session.semaphore("s", 2).try_lock().await;
    let permits = permits.expect_err("no semaphores");
    assert_eq!(permits.kind(), ErrorKind::Unsupported);
    assert!(permits.to_string().contains("semaphores"), "{permits}");
}

/// Releases `guard` after 100 ms, in a task of its own.
fn release_soon(guard: crate::Guard) {
    tokio::spawn(async move {
        sleep(Duration::from_millis(100)).await;
        guard.release().await.expect("release");
    });
}

#[tokio::test]
async fn a_polled_wait_asks_again_until_the_key_is_free() {
    let store = Shaped::new(|caps| caps.push_wakeup = false);
    let (holder, waiter) = (open(&store, TTL).await, open(&store, TTL).await);
    release_soon(holder.lock("k").await.expect("free"));
    let started = Instant::now();
    let guard = waiter.lock("k").wait(Duration::from_secs(5)).await;
    assert!(guard.expect("granted once the holder released").is_held());
    assert!(started.elapsed() >= Duration::from_millis(90));
}

#[tokio::test]
async fn a_polled_lock_all_asks_again_until_every_key_is_free() {
    let store = Shaped::new(|caps| caps.push_wakeup = false);
    let (holder, waiter) = (open(&store, TTL).await, open(&store, TTL).await);
    release_soon(holder.lock("b").await.expect("free"));
    let both = waiter
        .lock_all(["a", "b"])
        .wait(Duration::from_secs(5))
        .await;
    assert!(both.expect("granted once b was free").is_held());
    assert!(store.calls().acquire_all >= 2, "asked once, not again");
}

#[tokio::test]
async fn lock_all_takes_one_key_at_a_time_where_the_store_says_unsupported() {
    let store = Shaped::new(|_| {});
    let session = open(&store, TTL).await;
    store.script().acquire_all_fails = Some(ErrorKind::Unsupported);
    let both = session
        .lock_all(["a", "b"])
        .try_lock()
        .await
        .expect("taken");
    let both = both.expect("both free");
    assert_eq!(both.tokens().len(), 2);
    assert_eq!(store.calls().acquire_all, 1, "not asked for both at once");
    both.release().await.expect("release");

    // Any other failure is the answer.
    store.script().acquire_all_fails = Some(ErrorKind::Unavailable);
    let failed = session.lock_all(["a", "b"]).try_lock().await;
    assert_eq!(failed.expect_err("failed").kind(), ErrorKind::Unavailable);
    let other = open(&store, TTL).await;
    assert!(takes(&other, "a").await && takes(&other, "b").await);
}

/// As applications test: under a paused clock, a wait that the store ends
/// at its deadline ends there, and is not asked again forever.
#[tokio::test(start_paused = true)]
async fn a_wait_under_a_paused_clock_times_out_at_its_deadline() {
    let store = Shaped::new(|_| {});
    let (holder, waiter) = (open(&store, TTL).await, open(&store, TTL).await);
    let _k = holder.lock("k").await.expect("free");
    let wait = Duration::from_millis(100);
    let started = Instant::now();
    let one = waiter.lock("k").wait(wait).await.expect_err("k is held");
    assert_eq!((one.kind(), started.elapsed()), (ErrorKind::Timeout, wait));
    let both = waiter.lock_all(["j", "k"]).wait(wait).await;
    assert_eq!(both.expect_err("k is held").kind(), ErrorKind::Timeout);
    // One key is a plain acquire, which names it.
    let single = waiter.lock_all(["k"]).wait(wait).await;
    let single = single.expect_err("k is held").to_string();
    assert!(single.contains("'k', one of the 1 keys"), "{single}");
    assert_eq!(store.calls().acquire_all, 1);
}

#[tokio::test]
async fn lock_all_one_at_a_time_says_which_key_failed_and_holds_none() {
    let store = Shaped::new(|caps| {
        caps.atomic_lock_all = false;
        caps.shared = false;
    });
    let (holder, session) = (open(&store, TTL).await, open(&store, TTL).await);
    let _b = holder.lock("b").await.expect("free");
    let timed_out = session
        .lock_all(["a", "b"])
        .wait(Duration::from_millis(100))
        .await
        .expect_err("b is held");
    assert_eq!(timed_out.kind(), ErrorKind::Timeout);
    let said = timed_out.to_string();
    assert!(said.contains("'b', one of the 2 keys asked for"), "{said}");
    // Not a timeout, and not called one.
    let refused = session
        .lock_all([("a", Mode::Exclusive), ("c", Mode::Shared)])
        .try_lock()
        .await
        .expect_err("no reads");
    assert_eq!(refused.kind(), ErrorKind::Unsupported);
    assert!(takes(&holder, "a").await);
    assert_eq!(
        store.calls().acquire_all,
        0,
        "a store without it is never asked"
    );
}

#[tokio::test]
async fn an_incomplete_lock_all_gives_its_keys_back_before_it_answers() {
    let store = Shaped::new(|caps| caps.atomic_lock_all = false);
    let (holder, session) = (open(&store, TTL).await, open(&store, TTL).await);
    let _b = holder.lock("b").await.expect("free");
    store.script().release_delay = Duration::from_millis(200);
    assert!(session
        .lock_all(["a", "b"])
        .try_lock()
        .await
        .expect("asked")
        .is_none());
    let a = holder.lock("a").try_lock().await.expect("asked");
    assert!(a.is_some(), "'a' was still held after lock_all answered");
}

#[tokio::test(start_paused = true)]
async fn a_grant_that_arrives_after_its_lease_is_refused_and_given_back() {
    let store = Shaped::new(|_| {});
    let ttl = Duration::from_millis(200);
    let session = open(&store, ttl).await;
    {
        let mut script = store.script();
        script.late = ttl + Duration::from_millis(100);
        script.lease_from_ago = Some(Duration::ZERO);
    }
    let late = session.lock("k").try_lock().await.expect_err("too late");
    assert_eq!(late.kind(), ErrorKind::Unavailable);
    assert!(
        late.to_string().contains("arrived after its lease"),
        "{late}"
    );
    store.script().late = Duration::ZERO;
    let other = open(&store, ttl).await;
    assert!(takes(&other, "k").await);
}

/// A store with a TTL per lock: a grant's own lease can end before the
/// session's, and then the hold ends with it.
#[tokio::test]
async fn a_grants_own_lease_bounds_its_hold() {
    let store = Shaped::new(|_| {});
    let session = open(&store, Duration::from_secs(1)).await;
    store.script().lease_from_ago = Some(Duration::from_millis(600));
    let guard = session.lock("k").await.expect("free");
    let until = guard.expires_at().expect("a lease");
    assert!(
        until < Instant::now() + Duration::from_millis(400),
        "the session's lease, not the grant's"
    );
    assert!(until < session.lease_deadline().expect("a lease"));
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_at_its_deadline_exactly() {
    let store = Shaped::new(|_| {});
    let ttl = Duration::from_secs(1);
    let session = open(&store, ttl).await;
    // The grant's lease ends 5 ms after it was asked for.
    store.script().lease_from_ago = Some(ttl - super::drift_margin(ttl) - Duration::from_millis(5));
    let guard = session.lock("k").await.expect("free");
    let until = guard.expires_at().expect("a lease");
    assert!(guard.is_held());
    tokio::time::advance(until - Instant::now()).await;
    assert_eq!(Instant::now(), until);
    assert!(!guard.is_held(), "held at its deadline");
}

#[tokio::test(start_paused = true)]
async fn renewals_move_each_holds_own_lease_on() {
    let store = Shaped::new(|_| {});
    let ttl = Duration::from_millis(300);
    let session = open(&store, ttl).await;
    store.script().lease_from_ago = Some(Duration::ZERO);
    let guard = session.lock("k").await.expect("free");
    let first = guard.expires_at().expect("a lease");
    sleep(ttl * 3).await;
    assert!(guard.is_held(), "the hold ended with its first lease");
    assert!(guard.expires_at().expect("a lease") > first + ttl);
    let shown = format!("{guard:?}");
    let token = format!("token: {}", guard.token());
    assert!(
        shown.contains("\"k\"") && shown.contains(&token) && shown.contains("held: true"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_failed_release_is_asked_again_until_the_store_answers() {
    let store = Shaped::new(|_| {});
    let (session, other) = (open(&store, TTL).await, open(&store, TTL).await);
    let guard = session.lock("k").await.expect("free");
    store.script().release_fails = [ErrorKind::Unavailable; 2].into();
    let failed = guard.release().await.expect_err("scripted");
    assert_eq!(failed.kind(), ErrorKind::Unavailable);
    let released = other.lock("k").wait(Duration::from_secs(3)).await;
    assert!(released.expect("released on the third ask").is_held());
    assert_eq!(store.calls().release, 3);
}

#[tokio::test]
async fn a_release_the_store_calls_not_held_is_not_asked_again() {
    let store = Shaped::new(|_| {});
    let session = open(&store, TTL).await;
    let guard = session.lock("k").await.expect("free");
    store.script().release_fails = [ErrorKind::NotHeld].into();
    let failed = guard.release().await.expect_err("scripted");
    assert_eq!(failed.kind(), ErrorKind::NotHeld);
    sleep(Duration::from_millis(500)).await;
    assert_eq!(store.calls().release, 1, "asked again");

    // Nor when the store says so to a release asked again.
    let guard = session.lock("j").await.expect("free");
    store.script().release_fails = [ErrorKind::Unavailable, ErrorKind::NotHeld].into();
    guard.release().await.expect_err("scripted");
    sleep(Duration::from_secs(1)).await;
    assert_eq!(store.calls().release, 3, "asked a third time");
}

// Under a paused clock (as the rest below): the counts are exact. A
// renewal loop that never sleeps would stop the clock, and the test hang.
#[tokio::test(start_paused = true)]
async fn renewals_come_every_third_of_the_ttl() {
    let store = Shaped::new(|_| {});
    let _session = open(&store, Duration::from_millis(600)).await;
    sleep(Duration::from_millis(199)).await;
    assert_eq!(store.calls().renew, 0, "renewed before a third of the TTL");
    sleep(Duration::from_millis(2)).await;
    assert_eq!(store.calls().renew, 1, "not renewed at a third of the TTL");
    sleep(Duration::from_millis(800)).await;
    assert_eq!(store.calls().renew, 5, "renewals in 1,001 ms");
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_is_retried_after_a_tenth_of_the_ttl() {
    let store = Shaped::new(|_| {});
    let session = open(&store, Duration::from_millis(600)).await;
    let guard = session.lock("k").await.expect("free");
    store.script().renew_fails = Some(ErrorKind::Unavailable);
    // Renewals at 200 ms, then every 60 ms: 260, 320, …
    sleep(Duration::from_millis(300)).await;
    assert_eq!(store.calls().renew, 2, "renewals asked by 300 ms");
    assert!(!session.is_lost(), "a failed renewal is not a loss");
    store.script().renew_fails = None;
    sleep(Duration::from_millis(500)).await;
    assert!(guard.is_held() && !session.is_lost(), "not renewed in time");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_that_says_lost_ends_the_session_at_once() {
    let store = Shaped::new(|_| {});
    let session = open(&store, Duration::from_secs(3)).await;
    let opened = Instant::now();
    let guard = session.lock("k").await.expect("free");
    store.script().renew_fails = Some(ErrorKind::Lost);
    // The first renewal, at 1 s, says so; the lease would last to 2.97 s.
    guard.lost().await;
    assert_eq!(
        opened.elapsed(),
        Duration::from_secs(1),
        "lost, but not at the renewal"
    );
    assert!(session.is_lost());
    let after = session.lock("j").try_lock().await.expect_err("lost");
    assert!(after.to_string().contains("a scripted failure"), "{after}");
}

#[tokio::test]
async fn max_hold_ends_a_hold_and_gives_the_key_back() {
    let store = Shaped::new(|_| {});
    let client = Client::new(Arc::clone(&store) as _);
    let session = client
        .session()
        .max_hold(Duration::from_millis(200))
        .open()
        .await;
    let guard = session.expect("open").lock("k").await.expect("free");
    timeout(Duration::from_secs(2), guard.lost())
        .await
        .expect("lost at max_hold");
    let other = open(&store, TTL).await;
    let given_back = other.lock("k").wait(Duration::from_secs(2)).await;
    assert!(given_back.expect("given back").is_held());
}

#[tokio::test]
async fn dropping_an_open_session_ends_it_at_the_store_once() {
    let store = Shaped::new(|_| {});
    drop(open(&store, TTL).await);
    sleep(Duration::from_millis(50)).await;
    assert_eq!(store.calls().close, 1, "a dropped session was not ended");
    let closed = open(&store, TTL).await;
    closed.close().await.expect("close");
    drop(closed);
    sleep(Duration::from_millis(50)).await;
    assert_eq!(store.calls().close, 2, "a closed session was ended again");
}

#[tokio::test]
async fn a_leadership_says_its_name_deadline_and_loss() {
    let store = Shaped::new(|_| {});
    let client = Client::new(Arc::clone(&store) as _);
    let session = open(&store, Duration::from_secs(1)).await;
    let leading = session.elect("jobs").value("me").await.expect("elected");
    assert_eq!(leading.name(), "jobs");
    assert!(leading.expires_at().is_some_and(|at| at > Instant::now()));
    assert!(timeout(Duration::from_millis(50), leading.lost())
        .await
        .is_err());
    client.force_release("jobs").await.expect("forced");
    timeout(Duration::from_secs(2), leading.lost())
        .await
        .expect("lost");
}

/// Runs an election in `session` after 100 ms, and leads until the test
/// ends.
fn elect_soon(session: Session) {
    tokio::spawn(async move {
        sleep(Duration::from_millis(100)).await;
        let _leading = session.elect("jobs").value("me").await.expect("elected");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn an_observer_is_told_of_a_change_without_polling() {
    let store = Shaped::new(|_| {});
    let client = Client::new(Arc::clone(&store) as _);
    let mut observer = client.observe("jobs").every(Duration::from_secs(60));
    assert_eq!(observer.next().await.expect("read"), None);
    elect_soon(open(&store, TTL).await);
    let told = timeout(Duration::from_secs(5), observer.next()).await;
    assert!(told.expect("pushed").expect("read").is_some());
}

#[tokio::test]
async fn an_observer_whose_watch_failed_polls_without_asking_again() {
    let store = Shaped::new(|_| {});
    store.script().watch_fails = true;
    let client = Client::new(Arc::clone(&store) as _);
    let mut observer = client.observe("jobs").every(Duration::from_millis(10));
    assert_eq!(observer.next().await.expect("read"), None);
    elect_soon(open(&store, TTL).await);
    assert!(observer.next().await.expect("read").is_some());
    assert_eq!(
        store.calls().watch,
        1,
        "asked for a watch again before 30 s"
    );
}

#[tokio::test]
async fn an_observer_says_when_terms_start_again_after_a_restart() {
    let store = Shaped::new(|_| {});
    let client = Client::new(Arc::clone(&store) as _);
    let session = open(&store, TTL).await;
    for _ in 0..3 {
        session
            .lock("jobs")
            .await
            .expect("free")
            .release()
            .await
            .expect("release");
    }
    let leading = session.elect("jobs").value("me").await.expect("elected");
    let mut observer = client.observe("jobs").every(Duration::from_millis(10));
    let first = observer.next().await.expect("read").expect("a leader");
    assert_eq!(first.term, leading.term());
    store.restart();
    assert_eq!(
        observer.next().await.expect("read"),
        None,
        "the restart's vacancy"
    );
    let restarted = open(&store, TTL).await;
    let again = restarted.elect("jobs").value("me").await.expect("elected");
    assert!(again.term() < first.term);
    let told = timeout(Duration::from_secs(5), observer.next()).await;
    let told = told
        .expect("no word of the restart")
        .expect_err("terms started again");
    assert_eq!(told.kind(), ErrorKind::Unavailable);
    assert!(told.to_string().contains("started again"), "{told}");
}
