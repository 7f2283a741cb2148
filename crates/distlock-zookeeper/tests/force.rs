//! Forced release on ZooKeeper: every holder of a key is ended (readers and
//! semaphore permits too), the waiter behind is granted with a higher
//! token, the old holders are told before their next renewal would have
//! come, and their own releases touch nothing of anyone else's. A holder
//! the store's client may not delete is refused, saying why.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::StatusQuery;
use distlock_core::store::{AcquireRequest, HeldLock, LockStore, SessionOptions};
use distlock_core::{Client, ErrorKind, Guard, Mode, Session};
use distlock_testkit::servers::ZooKeeper;
use distlock_testkit::with_waiters;
use distlock_zookeeper::{lock_dir, ZkStore};
use tokio::time::timeout;
use zookeeper_client::{Acl, Acls, AuthId, CreateMode, Permission};

/// A lease whose renewals come every 30 s: an old holder told well before
/// that was told by the watch on its own node, not by a renewal.
const LONG_LEASE: Duration = Duration::from_secs(90);

/// Generous, yet half the time to the first renewal at [`LONG_LEASE`].
const TOLD_WITHIN: Duration = Duration::from_secs(15);

const CHROOT: &str = "/force";

async fn store() -> ZkStore {
    ZkStore::connect(&format!("{}{CHROOT}", ZooKeeper::shared().url()))
        .await
        .expect("connect to the test's ZooKeeper")
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

/// A lock directory made by hand with `permission` for anyone, by a plain
/// client of its own that removes it at the end.
struct HandMade {
    plain: zookeeper_client::Client,
    dir: String,
}

impl HandMade {
    async fn dir(key: &str, permission: Permission) -> HandMade {
        let dir = lock_dir(key);
        let plain =
            zookeeper_client::Client::connect(&format!("{}{CHROOT}", ZooKeeper::shared().hosts()))
                .await
                .expect("a plain ZooKeeper client");
        let acl = [Acl::new(permission, AuthId::anyone())];
        let options = CreateMode::Persistent.with_acls(Acls::new(&acl));
        plain
            .create(&dir, b"", &options)
            .await
            .expect("make the directory");
        HandMade { plain, dir }
    }

    async fn remove(self) {
        self.plain
            .delete(&self.dir, None)
            .await
            .expect("remove the directory");
    }
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
    assert_eq!(holders, [Some(next.token)], "the new holder's node stays");

    // A session's own release is no news to it.
    let mine = HeldLock {
        token: next.token,
        ..stale
    };
    new.release(&mine).await.expect("release");
    assert!(
        timeout(Duration::from_secs(1), new.renewal_wanted())
            .await
            .is_err(),
        "a release of the session's own asks for no renewal"
    );
    old.close().await.expect("close");
    new.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_the_store_may_not_delete_is_refused_saying_why() {
    let client = Client::new(Arc::new(store().await));
    let key = key("acl");
    // Without the DELETE permission: sessions may join the queue, nobody
    // may take a node out of it.
    let all_but_delete =
        Permission::READ | Permission::WRITE | Permission::CREATE | Permission::ADMIN;
    let made = HandMade::dir(&key, all_but_delete).await;
    let dir = made.dir.clone();
    let holder = session(&client, "holder").await;
    let held = holder.lock(&key).await.expect("lock");

    let refused = client.force_release(&key).await.expect_err("not allowed");
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    let message = refused.to_string();
    assert!(
        message.contains("DELETE") && message.contains(&dir),
        "says which permission is missing, and where: {message}"
    );
    assert!(held.is_held(), "nothing was ended");
    let status = client
        .status(&StatusQuery::Key(key.clone()))
        .await
        .expect("status");
    let tokens: Vec<Option<u64>> = status.keys[0].holders.iter().map(|h| h.token).collect();
    assert_eq!(tokens, [Some(held.token())], "the holder's node stays");

    // Its own release is refused by the same ACL: closing the session
    // takes its node.
    drop(held);
    holder.close().await.expect("close");
    made.remove().await;
}

/// A queue the store's client may not read is refused, saying which
/// permission is missing and where, not as a bare ACL error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_the_store_may_not_read_is_refused_saying_why() {
    let client = Client::new(Arc::new(store().await));
    let key = key("unreadable");
    let all_but_read =
        Permission::WRITE | Permission::CREATE | Permission::DELETE | Permission::ADMIN;
    let made = HandMade::dir(&key, all_but_read).await;
    let dir = made.dir.clone();

    let refused = client.force_release(&key).await.expect_err("not allowed");
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    let message = refused.to_string();
    assert!(
        message.contains("READ") && message.contains(&dir),
        "says which permission is missing, and where: {message}"
    );
    made.remove().await;
}

/// A lock directory with no node in it (emptied, and not yet removed by
/// ZooKeeper) has no holders to end: nothing is ended, and nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_queue_has_nothing_to_end() {
    let client = Client::new(Arc::new(store().await));
    let key = key("empty");
    let made = HandMade::dir(&key, Permission::ALL).await;
    let ended = client.force_release(&key).await.expect("force release");
    assert!(ended.is_empty(), "{ended:?}");
    made.remove().await;
}

/// A session holding many locks, some of them ended from outside, is told
/// of exactly those: the renewal that finds them checks the rest again
/// and reports each lost one by its own key, wherever it sits in the
/// session's batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_reports_exactly_the_holds_that_were_ended() {
    let client = Client::new(Arc::new(store().await));
    let holder = session(&client, "many").await;
    let keys: Vec<String> = (0..8).map(|n| key(&format!("many-{n}"))).collect();
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(holder.lock(key).await.expect("lock"));
    }
    // Three of eight: whatever order the session checks them in, at least
    // one is not first in its batch (unless they happen to lead it).
    for key in &keys[2..5] {
        assert_eq!(client.force_release(key).await.expect("force").len(), 1);
    }
    let started = std::time::Instant::now();
    while guards[2..5].iter().any(Guard::is_held) {
        assert!(
            started.elapsed() < TOLD_WITHIN,
            "an ended hold was not reported lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (n, guard) in guards.iter().enumerate() {
        let ended = (2..5).contains(&n);
        assert_eq!(
            guard.is_held(),
            !ended,
            "{}: held {}",
            keys[n],
            guard.is_held()
        );
    }
    holder.close().await.expect("close");
}
