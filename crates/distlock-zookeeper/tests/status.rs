//! `status` on ZooKeeper: the queue in order with each entry's owner, and
//! prefixes that list exactly the keys under them.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::{Client, Mode, Session};
use distlock_testkit::servers::ZooKeeper;
use distlock_testkit::with_waiters;
use distlock_zookeeper::ZkStore;

async fn client() -> Client {
    let store = ZkStore::connect(&format!("{}/status", ZooKeeper::shared().url()))
        .await
        .expect("connect to the test's ZooKeeper");
    Client::new(Arc::new(store))
}

async fn session(client: &Client, owner: &str) -> Session {
    client
        .session()
        .ttl(Duration::from_secs(10))
        .owner(owner)
        .open()
        .await
        .expect("open")
}

async fn status(client: &Client, query: StatusQuery) -> Vec<KeyStatus> {
    client.status(&query).await.expect("status").keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_listed_in_queue_order_with_their_owners() {
    let client = client().await;
    let key = format!("status/queue/{:08x}", rand::random::<u32>());
    let holder = session(&client, "holder@a pid 1 (status)").await;
    let held = holder.lock(&key).await.expect("lock");
    let locked_at = std::time::Instant::now();
    let wanted = [
        ("first@b pid 2 (status)", Mode::Exclusive),
        ("second@c pid 3 (status)", Mode::Shared),
        ("third@d pid 4 (status)", Mode::Shared),
    ];
    let mut waiting = Vec::new();
    for (queued, (owner, mode)) in wanted.iter().enumerate() {
        let waiter = session(&client, owner).await;
        let (wanted_key, mode) = (key.clone(), *mode);
        waiting.push(tokio::spawn(async move {
            let request = match mode {
                Mode::Shared => waiter.read(wanted_key),
                _ => waiter.lock(wanted_key),
            };
            let guard = request
                .wait(Duration::from_secs(30))
                .await
                .expect("granted");
            (waiter, guard)
        }));
        // One at a time, so that the queue order is known.
        with_waiters(&client, &key, queued + 1).await;
    }

    // Held for at least this long by the time status reads the node (its
    // ctime is from before the grant, on this machine's clock).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held_at_least = locked_at.elapsed();
    let queued = with_waiters(&client, &key, wanted.len()).await;
    assert_eq!(queued.holders.len(), 1, "{queued:?}");
    let first = &queued.holders[0];
    assert_eq!(first.owner, "holder@a pid 1 (status)");
    assert_eq!(first.token, Some(held.token()));
    assert_eq!(first.mode, Mode::Exclusive);
    assert_eq!(first.lease_left, None, "ZooKeeper does not tell it");
    let held_for = first.held_for.expect("ZooKeeper keeps a node's ctime");
    assert!(
        held_for + Duration::from_millis(5) >= held_at_least && held_for <= Duration::from_secs(60),
        "held for {held_for:?}, at least {held_at_least:?}"
    );
    // Each joined after the one before it: none has waited longer.
    let waited: Vec<Duration> = queued
        .waiters
        .iter()
        .map(|w| w.waiting_for.expect("ZooKeeper keeps a node's ctime"))
        .collect();
    assert!(
        waited.windows(2).all(|w| w[0] >= w[1]) && waited[0] <= held_for,
        "held for {held_for:?}, waited {waited:?}"
    );
    let shown: Vec<(&str, Mode)> = queued
        .waiters
        .iter()
        .map(|w| (w.owner.as_str(), w.mode))
        .collect();
    assert_eq!(shown, wanted, "waiters in queue order");
    let mut sessions: Vec<&str> = queued.waiters.iter().map(|w| w.session.as_str()).collect();
    sessions.push(first.session.as_str());
    sessions.sort_unstable();
    sessions.dedup();
    assert_eq!(sessions.len(), 4, "each entry names its own session");

    // Handed on: the first waiter holds, the two readers wait behind it.
    held.release().await.expect("release");
    let first_waiter = waiting.remove(0).await.expect("first waiter");
    let moved = with_waiters(&client, &key, 2).await;
    assert_eq!(moved.holders.len(), 1, "{moved:?}");
    assert_eq!(moved.holders[0].owner, wanted[0].0);
    assert_eq!(moved.holders[0].token, Some(first_waiter.1.token()));
    first_waiter.1.release().await.expect("release");
    for reader in waiting {
        let (_, guard) = reader.await.expect("reader");
        guard.release().await.expect("release");
    }
    let after = status(&client, StatusQuery::Key(key.clone())).await;
    assert!(after.is_empty(), "an idle key is not listed: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_lists_only_the_keys_under_it() {
    let client = client().await;
    let base = format!("status/prefix/{:08x}", rand::random::<u32>());
    let session = session(&client, "prefix@e pid 5 (status)").await;
    // Beside `jobs/a/`: its parent's other child, the parent itself, and a
    // name whose escaped form starts like the prefix's.
    let names = ["jobs/a/1", "jobs/a/2", "jobs/a", "jobs/b", "jobs/a%2F3"];
    let mut guards = Vec::new();
    for name in names {
        guards.push(session.lock(format!("{base}/{name}")).await.expect("lock"));
    }
    let listed = |keys: Vec<KeyStatus>| -> Vec<String> {
        keys.into_iter()
            .map(|k| k.key[base.len() + 1..].to_owned())
            .collect()
    };
    let under = status(&client, StatusQuery::Prefix(format!("{base}/jobs/a/"))).await;
    assert_eq!(listed(under), ["jobs/a/1", "jobs/a/2"]);
    let starting = status(&client, StatusQuery::Prefix(format!("{base}/jobs/a"))).await;
    assert_eq!(
        listed(starting),
        ["jobs/a", "jobs/a%2F3", "jobs/a/1", "jobs/a/2"],
        "every key that starts with the prefix, sorted"
    );
    let one = status(&client, StatusQuery::Key(format!("{base}/jobs/a"))).await;
    assert_eq!(listed(one.clone()), ["jobs/a"]);
    assert_eq!(one[0].holders[0].owner, "prefix@e pid 5 (status)");
    for guard in guards {
        guard.release().await.expect("release");
    }
    session.close().await.expect("close");
}
