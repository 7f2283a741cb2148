//! Leader election: one leader at a time, rising terms, observers that see
//! every change in order, resignation that hands over at once, and a lost
//! leader that knows before the next is elected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use distlock_core::{Client, ErrorKind, Leader};
use futures::FutureExt;
use tokio::time::{sleep, Instant};

use super::{Kit, Outcome, PATIENCE, SETTLE};

/// How often observers ask the store in these behaviours.
const OBSERVE_EVERY: Duration = Duration::from_millis(50);

/// How long each leader leads, and each vacancy lasts, while an observer
/// watches: many of its asks, and longer than the 1 s within which an
/// observer of a pushing store asks again anyway, so that it cannot miss
/// one whatever the push does.
const STEADY: Duration = Duration::from_millis(1_200);

/// Whether the store can tell who leads: it says so, and `leader()`
/// answers; a store that does not say so must refuse clearly.
async fn tells_the_leader(client: &Client, name: &str) -> bool {
    match client.leader(name).await {
        Ok(_) if client.capabilities().tells_leader => true,
        Err(err) if !client.capabilities().tells_leader => {
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
            false
        }
        answer => panic!("leader({name}) answered {answer:?}"),
    }
}

/// Three candidates campaign, lead and resign twenty times each: never two
/// leaders at once, every term above the last, and `leader()` (where the
/// store can tell) names the leader with its term while it leads.
pub async fn one_leader_at_a_time_with_rising_terms(kit: Kit) -> Outcome {
    let name = kit.key("leader");
    let tells = tells_the_leader(kit.client(), &name).await;
    let inside = Arc::new(AtomicBool::new(false));
    let last_term = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for candidate in 0..3 {
        let session = kit.session().await;
        let client = kit.client().clone();
        let (name, inside, last_term) = (name.clone(), inside.clone(), last_term.clone());
        tasks.push(tokio::spawn(async move {
            let value = format!("candidate-{candidate}");
            for _ in 0..20 {
                let leading = session
                    .elect(&name)
                    .value(&value)
                    .wait(PATIENCE)
                    .campaign()
                    .await
                    .expect("elected");
                assert!(!inside.swap(true, Ordering::SeqCst), "two leaders at once");
                let term = leading.term();
                let before = last_term.swap(term, Ordering::SeqCst);
                assert!(term > before, "term {term} after {before}");
                assert_eq!(leading.value(), value);
                if tells {
                    let seen = client.leader(&name).await.expect("leader");
                    assert_eq!(
                        seen,
                        Some(Leader {
                            value: value.clone(),
                            term
                        }),
                        "leader() while {value} leads"
                    );
                }
                sleep(Duration::from_millis(2)).await;
                assert!(
                    leading.is_leader(),
                    "{value} lost its leadership while leading"
                );
                inside.store(false, Ordering::SeqCst);
                leading.resign().await.expect("resign");
            }
            session.close().await.expect("close");
        }));
    }
    for task in tasks {
        task.await.expect("a candidate");
    }
    if tells {
        assert_eq!(kit.client().leader(&name).await.expect("leader"), None);
    }
    Outcome::Passed
}

/// An observer started before the first leader sees nobody, then each of
/// three leaders in turn with a vacancy between, then two leaders that
/// hand over without one: every change, in order, terms rising.
pub async fn observers_see_every_leader_in_order(kit: Kit) -> Outcome {
    let name = kit.key("observed");
    require!(
        tells_the_leader(kit.client(), &name).await,
        "the store's status cannot tell who leads"
    );
    let mut observer = kit.client().observe(&name).every(OBSERVE_EVERY);
    assert_eq!(observer.next().await.expect("first"), None, "nobody yet");
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        // Until nobody leads after the last leader ("second"); a vacancy
        // between the two that hand over may be seen or not.
        loop {
            let now = observer.next().await.expect("next");
            let last = now.is_none()
                && seen.last().is_some_and(|s: &Option<Leader>| {
                    s.as_ref().is_some_and(|l| l.value == "second")
                });
            seen.push(now);
            if last {
                return seen;
            }
        }
    });
    let session = kit.session().await;
    let mut expected = Vec::new();
    for i in 0..3 {
        let value = format!("leader-{i}");
        let leading = session.elect(&name).value(&value).await.expect("elected");
        expected.push(Some(Leader {
            value,
            term: leading.term(),
        }));
        sleep(STEADY).await;
        leading.resign().await.expect("resign");
        expected.push(None);
        sleep(STEADY).await;
    }
    let first = session.elect(&name).value("first").await.expect("elected");
    let other = kit.session().await;
    let second = tokio::spawn({
        let name = name.clone();
        async move {
            let leading = other.elect(&name).value("second").await.expect("elected");
            sleep(STEADY).await;
            let term = leading.term();
            leading.resign().await.expect("resign");
            term
        }
    });
    sleep(STEADY).await;
    let first_term = first.term();
    first.resign().await.expect("resign");
    let second_term = second.await.expect("second");
    let seen = tokio::time::timeout(PATIENCE, seen)
        .await
        .expect("the observer saw every change")
        .expect("observer");
    assert_eq!(&seen[..6], &expected[..], "each leader, then nobody");
    let rest: Vec<_> = seen[6..].iter().filter(|s| s.is_some()).cloned().collect();
    assert_eq!(
        rest,
        [
            Some(Leader {
                value: "first".into(),
                term: first_term
            }),
            Some(Leader {
                value: "second".into(),
                term: second_term
            }),
        ],
        "the hand-over, in order: {seen:?}"
    );
    Outcome::Passed
}

/// A leader that resigns hands over at once: the waiting candidate is
/// elected long before the leader's lease would have run out, with a
/// higher term. A campaign dropped while it waited leaves no trace.
pub async fn resign_hands_over_at_once(kit: Kit) -> Outcome {
    let name = kit.key("resign");
    let ttl = Duration::from_secs(10);
    let leader = kit.session_with(ttl, Duration::ZERO).await;
    let leading = leader.elect(&name).await.expect("elected");
    let term = leading.term();
    let dropped = kit.session().await;
    let gave_up = tokio::spawn({
        let name = name.clone();
        async move { dropped.elect(&name).value("gave-up").await }
    });
    sleep(SETTLE).await;
    gave_up.abort();
    assert!(gave_up.await.is_err_and(|err| err.is_cancelled()));
    let candidate = kit.session().await;
    let waiting = tokio::spawn({
        let name = name.clone();
        async move {
            let next = candidate.elect(&name).wait(PATIENCE).await.expect("next");
            (Instant::now(), next)
        }
    });
    sleep(SETTLE).await;
    assert!(!waiting.is_finished(), "elected while another led");
    let resigned = Instant::now();
    leading.resign().await.expect("resign");
    let (elected, next) = waiting.await.expect("candidate");
    assert!(
        elected - resigned < ttl / 2,
        "elected {:?} after the resignation",
        elected - resigned
    );
    assert!(next.term() > term, "term {} after {term}", next.term());
    next.resign().await.expect("resign");
    if kit.caps().tells_leader {
        assert_eq!(kit.client().leader(&name).await.expect("leader"), None);
    }
    let last = kit.session().await;
    let again = last
        .elect(&name)
        .wait(ttl / 2)
        .await
        .expect("nobody left holding after the dropped campaign");
    again.resign().await.expect("resign");
    Outcome::Passed
}

/// Closing the campaigning session ends its leadership before `close`
/// returns: the waiting candidate is elected at once, and the old
/// leadership says it is lost.
pub async fn closing_the_session_ends_its_leadership(kit: Kit) -> Outcome {
    let name = kit.key("closed");
    let ttl = Duration::from_secs(10);
    let leader = kit.session_with(ttl, Duration::ZERO).await;
    let leading = leader.elect(&name).await.expect("elected");
    let candidate = kit.session().await;
    let waiting = tokio::spawn({
        let name = name.clone();
        async move {
            let next = candidate.elect(&name).wait(PATIENCE).await.expect("next");
            (Instant::now(), next)
        }
    });
    sleep(SETTLE).await;
    let closed = Instant::now();
    leader.close().await.expect("close");
    assert!(!leading.is_leader(), "still leading after close");
    let (elected, next) = waiting.await.expect("candidate");
    assert!(
        elected - closed < ttl / 2,
        "elected {:?} after the close",
        elected - closed
    );
    assert!(next.term() > leading.term());
    assert!(
        matches!(leading.resign().await, Err(err) if err.kind() == ErrorKind::NotHeld),
        "resigning a closed leadership is NotHeld"
    );
    next.resign().await.expect("resign");
    Outcome::Passed
}

/// A leader whose session lapses (it stops renewing) sees `lost()` before
/// the next candidate is elected, and the next term is higher.
pub async fn a_lost_leader_knows_before_the_next_is_elected(kit: Kit) -> Outcome {
    require!(
        kit.caps().lease_expiry,
        "store sessions have no lease to expire"
    );
    let name = kit.key("lapsed");
    let frozen = kit
        .session_with(Duration::from_millis(900), Duration::ZERO)
        .await;
    let old = frozen.elect(&name).await.expect("elected");
    let candidate = kit.session().await;
    old.session().freeze_for_test();
    let next = candidate
        .elect(&name)
        .wait(PATIENCE)
        .await
        .expect("elected after the lapse");
    assert!(
        !old.is_leader(),
        "the old leader still claims to lead after the next was elected"
    );
    assert!(
        old.lost().now_or_never().is_some(),
        "lost() had not fired when the next leader was elected"
    );
    assert!(
        next.term() > old.term(),
        "term {} after {}",
        next.term(),
        old.term()
    );
    next.resign().await.expect("resign");
    Outcome::Passed
}

/// On a store that pushes the changes of a key's holders: a watch of the
/// key is signalled when a lock on it is granted and when it is released,
/// each signal coming after the change is there to read, with nobody
/// polling; and it stays quiet while nothing changes.
pub async fn a_watched_key_signals_each_change(kit: Kit) -> Outcome {
    require!(
        kit.caps().watches_keys,
        "the store does not push the changes of a key"
    );
    let key = kit.key("watched");
    let mut watch = kit
        .client()
        .store()
        .watch_key(&key)
        .await
        .expect("watch")
        .expect("a store that watches keys gives a watch");
    let session = kit.session().await;
    // At once: a watch that is set up late misses this grant.
    let guard = session.lock(&key).await.expect("free");
    signalled_until(kit.client(), &key, &mut watch, true, "the grant").await;
    // A hand-over to a waiter, then its release.
    let waiter = kit.session().await;
    let waiting = tokio::spawn({
        let key = key.clone();
        async move { waiter.lock(&key).wait(PATIENCE).await }
    });
    sleep(SETTLE).await;
    guard.release().await.expect("release");
    let handed = waiting.await.expect("waiter").expect("handed over");
    handed.release().await.expect("release");
    signalled_until(kit.client(), &key, &mut watch, false, "the releases").await;
    // An election's hold (a one-permit semaphore where the store has them,
    // which on some stores takes another path).
    let leading = session.elect(&key).value("watched").await.expect("elected");
    signalled_until(kit.client(), &key, &mut watch, true, "the election").await;
    leading.resign().await.expect("resign");
    signalled_until(kit.client(), &key, &mut watch, false, "the resignation").await;
    // Nothing changes now (once a store's follow-ups of the last change
    // are in): a store that signals on a timer is not pushing.
    sleep(SETTLE).await;
    while watch.try_recv().is_ok() {}
    let quiet = tokio::time::timeout(10 * SETTLE, watch.recv()).await;
    assert!(quiet.is_err(), "a signal with nothing changed: {quiet:?}");
    Outcome::Passed
}

/// Waits for signals on `watch` until `status` shows `key` held (or not,
/// as `held` says); fails if a signal does not come while it does not.
async fn signalled_until(
    client: &Client,
    key: &str,
    watch: &mut distlock_core::store::KeyWatch,
    held: bool,
    what: &str,
) {
    loop {
        let signal = tokio::time::timeout(PATIENCE, watch.recv()).await;
        assert!(
            matches!(signal, Ok(Some(()))),
            "no signal of {what}: {signal:?}"
        );
        let status = client
            .status(&distlock_core::status::StatusQuery::Key(key.to_owned()))
            .await
            .expect("status");
        let shown = status.keys.iter().any(|k| !k.holders.is_empty());
        if shown == held {
            return;
        }
    }
}
