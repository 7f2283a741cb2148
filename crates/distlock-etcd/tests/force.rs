//! Forced release on etcd: every holder of a key is ended (readers and
//! semaphore permits too), the waiter behind is granted with a higher
//! token, the old holders are told before their next renewal would have
//! come, and their own releases touch nothing of anyone else's.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::StatusQuery;
use distlock_core::store::{AcquireRequest, HeldLock, LockStore, SessionOptions};
use distlock_core::{Client, ErrorKind, Guard, Mode, Session};
use distlock_etcd::EtcdStore;
use distlock_testkit::servers::Etcd;
use distlock_testkit::with_waiters;
use tokio::time::timeout;

/// A lease whose renewals come every 30 s: an old holder told well before
/// that was told by the watch on its own entry, not by a renewal.
const LONG_LEASE: Duration = Duration::from_secs(90);

/// Generous, yet half the time to the first renewal at [`LONG_LEASE`].
const TOLD_WITHIN: Duration = Duration::from_secs(15);

async fn store() -> EtcdStore {
    EtcdStore::connect(&Etcd::shared().url())
        .await
        .expect("connect to the test's etcd")
}

async fn session(client: &Client, owner: &str) -> Session {
    client
        .session()
        .ttl(LONG_LEASE)
        .owner(owner)
        .open()
        .await
        .expect("open")
}

fn key(name: &str) -> String {
    format!("force/{name}/{:08x}", rand::random::<u32>())
}

/// Ends the holds of `held` on `key` while `waiter` waits behind them; the
/// waiter's grant, once the old holders were told.
async fn force_past(client: &Client, key: &str, held: Vec<Guard>, waiter: Session) -> Guard {
    let mode = held[0].mode();
    let waiting = {
        let key = key.to_owned();
        tokio::spawn(async move {
            waiter
                .lock(key)
                .wait(Duration::from_secs(30))
                .await
                .expect("granted once the holders are gone")
        })
    };
    with_waiters(client, key, 1).await;
    let ended = client.force_release(key).await.expect("force release");
    let mut tokens: Vec<Option<u64>> = ended.iter().map(|h| h.token).collect();
    tokens.sort_unstable();
    let held_tokens: Vec<Option<u64>> = held.iter().map(|g| Some(g.token())).collect();
    assert_eq!(tokens, held_tokens, "every hold ended, by token: {ended:?}");
    assert!(ended.iter().all(|h| h.mode == mode), "{ended:?}");
    assert!(
        ended.iter().all(|h| h.owner.starts_with("old")),
        "{ended:?}"
    );
    let granted = waiting.await.expect("waiter");
    for old in held {
        assert!(granted.token() > old.token(), "the next token is higher");
        timeout(TOLD_WITHIN, old.lost())
            .await
            .expect("the old holder is told before its next renewal");
        let refused = old.release().await.expect_err("no longer held");
        assert_eq!(refused.kind(), ErrorKind::NotHeld, "{refused}");
    }
    let now = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status");
    assert_eq!(now.keys[0].holders.len(), 1, "{now:?}");
    assert_eq!(now.keys[0].holders[0].token, Some(granted.token()));
    granted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reader_is_ended_and_the_writer_behind_is_granted() {
    let client = Client::new(Arc::new(store().await));
    let key = key("readers");
    let mut held = Vec::new();
    for owner in ["old reader a", "old reader b"] {
        let reader = session(&client, owner).await;
        held.push(reader.read(&key).await.expect("read"));
    }
    let writer = session(&client, "writer").await;
    let granted = force_past(&client, &key, held, writer.clone()).await;
    granted.release().await.expect("release");
    writer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permit_is_ended_and_the_next_one_is_granted() {
    let client = Client::new(Arc::new(store().await));
    let key = key("permits");
    let mut held = Vec::new();
    for n in 0..3 {
        let holder = session(&client, &format!("old permit {n}")).await;
        held.push(holder.semaphore(&key, 3).await.expect("permit"));
    }
    // The waiter asks for the lock in the same mode: `lock` is exclusive,
    // so it waits behind all three permits.
    let next = session(&client, "next").await;
    let granted = force_past(&client, &key, held, next.clone()).await;
    granted.release().await.expect("release");
    next.close().await.expect("close");
}

/// More holders than one request may delete: every one of them is
/// ended, and the waiter granted behind them meanwhile is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_holders_than_one_request_ends_are_all_ended() {
    let client = Client::new(Arc::new(store().await));
    let key = key("many");
    let (mut sessions, mut tokens) = (Vec::new(), Vec::new());
    for n in 0..130 {
        let holder = session(&client, &format!("old permit {n}")).await;
        let guard = holder.semaphore(&key, 200).await.expect("permit");
        tokens.push(Some(guard.token()));
        sessions.push((holder, guard));
    }
    let writer = session(&client, "writer").await;
    let waiting = {
        let (writer, key) = (writer.clone(), key.clone());
        tokio::spawn(async move { writer.lock(key).wait(Duration::from_secs(30)).await })
    };
    with_waiters(&client, &key, 1).await;
    let ended = client.force_release(&key).await.expect("force release");
    let mut ended_tokens: Vec<Option<u64>> = ended.iter().map(|h| h.token).collect();
    ended_tokens.sort_unstable();
    assert_eq!(ended_tokens, tokens, "every permit ended, and only those");
    let granted = waiting.await.expect("waiter").expect("granted");
    let status = client
        .status(&StatusQuery::Key(key.clone()))
        .await
        .expect("status");
    let holders: Vec<Option<u64>> = status.keys[0].holders.iter().map(|h| h.token).collect();
    assert_eq!(holders, [Some(granted.token())], "the writer holds on");
    granted.release().await.expect("release");
    writer.close().await.expect("close");
    for (holder, _) in sessions {
        holder.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_holders_release_is_refused_and_deletes_nothing() {
    let store = store().await;
    let key = key("stale");
    let options = SessionOptions::new(LONG_LEASE, Duration::ZERO);
    let old = store.open_session(&options).await.expect("open");
    let request = AcquireRequest::new(&key, Mode::Exclusive);
    let grant = old.acquire(&request).await.expect("acquire").expect("free");
    let ended = store.force_release(&key, "test").await.expect("force");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].token, Some(grant.token));
    timeout(TOLD_WITHIN, old.renewal_wanted())
        .await
        .expect("the old holder's session is asked to renew");

    let new = store.open_session(&options).await.expect("open");
    let next = new.acquire(&request).await.expect("acquire").expect("free");
    assert!(
        next.token > grant.token,
        "{} after {}",
        next.token,
        grant.token
    );
    let stale = HeldLock {
        key: key.clone(),
        mode: Mode::Exclusive,
        token: grant.token,
    };
    let refused = old.release(&stale).await.expect_err("not held");
    assert_eq!(refused.kind(), ErrorKind::NotHeld, "{refused}");
    let report = old
        .renew(std::slice::from_ref(&stale))
        .await
        .expect("renew");
    assert_eq!(
        report.lost_keys,
        [key.as_str()],
        "the renewal reports it lost"
    );
    let status = store
        .status(&StatusQuery::Key(key.clone()))
        .await
        .expect("status");
    let holders: Vec<Option<u64>> = status.keys[0].holders.iter().map(|h| h.token).collect();
    assert_eq!(holders, [Some(next.token)], "the new holder's entry stays");

    // A session's own release is no news to it.
    let mine = HeldLock {
        token: next.token,
        ..stale
    };
    new.release(&mine).await.expect("release");
    // Past the second after the grant at which a hold's watch starts: a
    // watch the release did not call off would start then, and report
    // the release's own deletion.
    assert!(
        timeout(Duration::from_secs(2), new.renewal_wanted())
            .await
            .is_err(),
        "a release of the session's own asks for no renewal"
    );
    old.close().await.expect("close");
    new.close().await.expect("close");
}

/// A renewal that read its snapshot of held locks before the session
/// released a key and took it again (the same queue key, a new life) must
/// not end the new life: reported or not, the new hold stays held, and
/// the next renewal with the current snapshot keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_of_an_earlier_life_leaves_the_new_one_held() {
    let store = store().await;
    let key = key("relife");
    let options = SessionOptions::new(LONG_LEASE, Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    let request = AcquireRequest::new(&key, Mode::Exclusive);
    let first = session
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    let earlier = HeldLock {
        key: key.clone(),
        mode: Mode::Exclusive,
        token: first.token,
    };
    session.release(&earlier).await.expect("release");
    let second = session
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    assert!(second.token > first.token);
    let current = HeldLock {
        token: second.token,
        ..earlier.clone()
    };
    // The snapshot taken before the release.
    let _ = session
        .renew(std::slice::from_ref(&earlier))
        .await
        .expect("renew");
    let report = session
        .renew(std::slice::from_ref(&current))
        .await
        .expect("renew");
    assert!(
        report.lost_keys.is_empty(),
        "the new life reported lost: {report:?}"
    );
    let refused = session.release(&earlier).await.expect_err("an old life");
    assert_eq!(refused.kind(), ErrorKind::NotHeld, "{refused}");
    session
        .release(&current)
        .await
        .expect("the new life is held");
    session.close().await.expect("close");
}

/// Each hold of a session gets a watch of its own on the session's one
/// stream: a forced release of the second of two holds (its watch started
/// after the first's) is told as soon as the first's would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_of_two_holds_of_a_session_is_watched() {
    let store = store().await;
    let options = SessionOptions::new(LONG_LEASE, Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    let (first, second) = (key("two-a"), key("two-b"));
    for key in [&first, &second] {
        let request = AcquireRequest::new(key, Mode::Exclusive);
        session
            .acquire(&request)
            .await
            .expect("acquire")
            .expect("free");
        // Past the second after which a hold's watch starts (`WATCH_AFTER`
        // of `session/holds.rs`), so the two watches start one after the
        // other.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let ended = store.force_release(&second, "test").await.expect("force");
    assert_eq!(ended.len(), 1, "{ended:?}");
    timeout(TOLD_WITHIN, session.renewal_wanted())
        .await
        .expect("the session is asked to renew, told by the second hold's watch");
    session.close().await.expect("close");
}

/// A release of a life of the lock that is over (released already, or
/// found lost by a renewal) while the same session waits for the lock
/// again, with the same queue key: refused, and the wait goes on to its
/// grant.
async fn stale_release_beside_own_wait(
    store: &EtcdStore,
    session: &dyn distlock_core::store::StoreSession,
    stale: &HeldLock,
) {
    let options = SessionOptions::new(LONG_LEASE, Duration::ZERO);
    let other = store.open_session(&options).await.expect("open");
    let request = AcquireRequest::new(&stale.key, Mode::Exclusive);
    let theirs = other
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    let mut waiting = request.clone();
    waiting.wait_until = Some(tokio::time::Instant::now() + Duration::from_secs(30));
    let meanwhile = async {
        let queued = async {
            loop {
                let status = store
                    .status(&StatusQuery::Key(stale.key.clone()))
                    .await
                    .expect("status");
                if status.keys.first().is_some_and(|k| k.waiters.len() == 1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        timeout(Duration::from_secs(20), queued)
            .await
            .expect("the session waits again, behind the other");
        let refused = session.release(stale).await.expect_err("an old life");
        assert_eq!(refused.kind(), ErrorKind::NotHeld, "{refused}");
        let theirs = HeldLock {
            token: theirs.token,
            ..stale.clone()
        };
        other.release(&theirs).await.expect("release");
    };
    let (granted, ()) = tokio::join!(session.acquire(&waiting), meanwhile);
    let granted = granted
        .expect("the wait goes on past the stale release")
        .expect("granted");
    assert!(granted.token > theirs.token);
    other.close().await.expect("close");
}

/// A session of its own holding lock `name` (a key of its own), and that
/// hold.
async fn holding(
    store: &EtcdStore,
    name: &str,
) -> (Box<dyn distlock_core::store::StoreSession>, HeldLock) {
    let options = SessionOptions::new(LONG_LEASE, Duration::ZERO);
    let session = store.open_session(&options).await.expect("open");
    let key = key(name);
    let request = AcquireRequest::new(&key, Mode::Exclusive);
    let grant = session
        .acquire(&request)
        .await
        .expect("acquire")
        .expect("free");
    let held = HeldLock {
        key,
        mode: Mode::Exclusive,
        token: grant.token,
    };
    (session, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_release_leaves_the_sessions_new_wait_in_place() {
    let store = store().await;
    let (session, stale) = holding(&store, "again").await;
    session.release(&stale).await.expect("release");
    stale_release_beside_own_wait(&store, session.as_ref(), &stale).await;
    session.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_a_hold_found_lost_leaves_the_sessions_new_wait_in_place() {
    let store = store().await;
    let (session, stale) = holding(&store, "lost-again").await;
    store
        .force_release(&stale.key, "test")
        .await
        .expect("force");
    let report = session
        .renew(std::slice::from_ref(&stale))
        .await
        .expect("renew");
    assert_eq!(report.lost_keys, [stale.key.as_str()]);
    stale_release_beside_own_wait(&store, session.as_ref(), &stale).await;
    session.close().await.expect("close");
}
