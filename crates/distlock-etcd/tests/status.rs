//! `status` on etcd: the queue in order with each entry's owner, and
//! prefixes that list exactly the keys under them.

use std::sync::Arc;
use std::time::Duration;

use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::{Client, Mode, Session};
use distlock_etcd::EtcdStore;
use distlock_testkit::servers::Etcd;
use distlock_testkit::with_waiters;

async fn client() -> Client {
    let store = EtcdStore::connect(&Etcd::shared().url())
        .await
        .expect("connect to the test's etcd");
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

    let queued = with_waiters(&client, &key, wanted.len()).await;
    assert_eq!(queued.holders.len(), 1, "{queued:?}");
    let first = &queued.holders[0];
    assert_eq!(first.owner, "holder@a pid 1 (status)");
    assert_eq!(first.token, Some(held.token()));
    assert_eq!(first.mode, Mode::Exclusive);
    let left = first.lease_left.expect("etcd tells a lease's time left");
    assert!(left <= Duration::from_secs(10), "{left:?}");
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

/// A store in a log line names its endpoints, and nothing of the client
/// it holds (eight service clients with their channels).
#[tokio::test]
async fn a_store_shows_its_endpoints_and_nothing_of_its_client() {
    let url = Etcd::shared().url();
    let store = EtcdStore::connect(&url).await.expect("connect");
    let endpoints = url.strip_prefix("etcd://").expect("an etcd URL");
    assert_eq!(
        format!("{store:?}"),
        format!("EtcdStore {{ endpoints: {endpoints:?} }}")
    );
}
