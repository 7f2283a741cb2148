//! `status` on PostgreSQL where the conformance suite does not reach:
//! advisory locks (one key at a time, from `pg_locks`), the lease table's
//! waiters and observers, and a lease table made by an older version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::status::{KeyStatus, StatusQuery};
use distlock_core::{Client, ErrorKind, Mode, Session};
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;

async fn client(url: &str) -> Client {
    Client::new(Arc::new(
        PostgresStore::connect(url).await.expect("connect"),
    ))
}

async fn session(client: &Client, owner: &str) -> Session {
    client.session().owner(owner).open().await.expect("open")
}

async fn key_status(client: &Client, key: &str) -> Option<KeyStatus> {
    let status = client
        .status(&StatusQuery::Key(key.to_owned()))
        .await
        .expect("status of one key");
    assert!(status.keys.len() <= 1, "one key asked: {status:?}");
    status.keys.into_iter().next()
}

/// Asks until `done` holds for the key's status (a waiter is seen only
/// while its wait is in the server), for at most 20 s.
async fn until(client: &Client, key: &str, done: impl Fn(&KeyStatus) -> bool) -> KeyStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = key_status(client, key).await {
            if done(&status) {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never seen: {status:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_status_shows_the_holder_and_waiter_of_one_key() {
    let client = client(&Postgres::shared().url()).await;
    let key = "status/advisory/one";
    let (a, b) = (
        session(&client, "status-test a").await,
        session(&client, "status-test b").await,
    );
    let held = a.lock(key).await.expect("lock");
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.lock(key).wait(Duration::from_secs(30)).await })
    };
    let seen = until(&client, key, |status| status.waiters.len() == 1).await;
    assert_eq!(seen.key, key);
    assert_eq!(seen.holders.len(), 1, "{seen:?}");
    let holder = &seen.holders[0];
    assert_eq!(holder.owner, "status-test a");
    assert_eq!(holder.mode, Mode::Exclusive);
    assert!(holder.session.starts_with("pid "), "{holder:?}");
    assert_eq!((holder.token, holder.lease_left), (None, None));
    let waiter = &seen.waiters[0];
    assert_eq!(waiter.owner, "status-test b");
    assert_eq!(waiter.mode, Mode::Exclusive);
    assert_ne!(waiter.session, holder.session);
    assert!(waiter.waiting_for.is_some(), "{waiter:?}");

    held.release().await.expect("release");
    let granted = waiting.await.expect("waiter").expect("granted");
    let now = until(&client, key, |status| status.waiters.is_empty()).await;
    assert_eq!(now.holders[0].owner, "status-test b");
    granted.release().await.expect("release");

    let readers = [
        a.read(key).await.expect("read"),
        b.read(key).await.expect("read"),
    ];
    let shared = until(&client, key, |_| true).await;
    assert_eq!(shared.holders.len(), 2, "{shared:?}");
    assert!(shared.holders.iter().all(|h| h.mode == Mode::Shared));
    for reader in readers {
        reader.release().await.expect("release");
    }
    assert_eq!(key_status(&client, key).await, None, "released, not listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_status_refuses_a_prefix_and_says_what_to_do() {
    let client = client(&Postgres::shared().url()).await;
    let err = client
        .status(&StatusQuery::Prefix("status/".to_owned()))
        .await
        .expect_err("advisory locks cannot be listed by prefix");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    let message = err.to_string();
    assert!(message.contains("one key"), "{message}");
    assert!(message.contains("mode=lease"), "{message}");
}

/// PostgreSQL keeps 63 bytes of `application_name`: a longer owner shows
/// cut, which is why advisory mode does not claim to keep owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_status_shows_an_owner_cut_to_63_bytes() {
    let client = client(&Postgres::shared().url()).await;
    let key = "status/advisory/long-owner";
    let owner = format!("{}@host pid 1 (a long program name)", "u".repeat(80));
    let holder = session(&client, &owner).await;
    let held = holder.lock(key).await.expect("lock");
    let seen = key_status(&client, key).await.expect("held");
    assert_eq!(seen.holders[0].owner, owner[..63]);
    held.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_status_shows_waiters_and_forgets_one_that_gave_up() {
    let client = client(&format!("{}?mode=lease", Postgres::shared().url())).await;
    let key = "status/lease/waiter";
    let (a, b) = (
        session(&client, "lease a").await,
        session(&client, "lease b").await,
    );
    let held = a.lock(key).await.expect("lock");
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.semaphore(key, 2).wait(Duration::from_secs(30)).await })
    };
    let seen = until(&client, key, |status| status.waiters.len() == 1).await;
    let waiter = &seen.waiters[0];
    assert_eq!(waiter.owner, "lease b");
    assert_eq!(waiter.mode, Mode::Semaphore { permits: 2 });
    assert_ne!(waiter.session, seen.holders[0].session);
    assert!(waiter.waiting_for.is_some(), "{waiter:?}");
    assert!(seen.holders[0].held_for.is_some(), "{seen:?}");

    // Given up long before its deadline: its record goes with it.
    waiting.abort();
    let _ = waiting.await;
    let after = until(&client, key, |status| status.waiters.is_empty()).await;
    assert_eq!(after.holders.len(), 1);
    held.release().await.expect("release");
    assert_eq!(key_status(&client, key).await, None);
}

/// An observer's record (lease mode) is no waiter in `status`, and is gone
/// from the table soon after its watch is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_observer_is_no_waiter_and_leaves_no_record() {
    let server = Postgres::shared();
    let client = client(&format!("{}?mode=lease", server.url())).await;
    let key = "status/lease/observed";
    let records = || {
        server.psql(&format!(
            "SELECT count(*) FROM distlock_waiters WHERE key = '{key}'"
        ))
    };
    let watch = client
        .store()
        .watch_key(key)
        .await
        .expect("watch")
        .expect("lease mode pushes changes");
    assert_eq!(
        records(),
        "1",
        "the observer's record is made before the watch"
    );
    assert_eq!(key_status(&client, key).await, None, "an observer alone");

    let (a, b) = (
        session(&client, "observed a").await,
        session(&client, "observed b").await,
    );
    let held = a.lock(key).await.expect("lock");
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.lock(key).wait(Duration::from_secs(30)).await })
    };
    let seen = until(&client, key, |status| !status.waiters.is_empty()).await;
    assert_eq!(
        seen.waiters.len(),
        1,
        "the observer shown as a waiter: {seen:?}"
    );
    assert_eq!(seen.waiters[0].owner, "observed b");
    held.release().await.expect("release");
    let handed = waiting.await.expect("task").expect("handed over");
    handed.release().await.expect("release");

    drop(watch);
    let start = Instant::now();
    while records() != "0" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the observer's record stayed after its watch was dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When the store's connection that listens for changes breaks, an
/// observer's watch ends (its reader then polls) rather than going silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_observers_watch_ends_when_listening_breaks() {
    let server = Postgres::start();
    let client = client(&format!("{}?mode=lease", server.url())).await;
    let mut watch = client
        .store()
        .watch_key("status/lease/listening")
        .await
        .expect("watch")
        .expect("lease mode pushes changes");
    let ended = server.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%'",
    );
    assert_eq!(ended, "1", "one listening connection");
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        while watch.recv().await.is_some() {}
    });
    assert!(
        drained.await.is_ok(),
        "the watch went on after its listening connection broke"
    );
}

/// A lease table made by the version before owners: the store adds the
/// columns, honours the old rows and shows them with what they keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_table_of_the_previous_version_gets_the_new_columns() {
    let server = Postgres::start();
    server.psql(
        "CREATE UNLOGGED TABLE distlock_leases_v2 (
             key text NOT NULL, holder text NOT NULL, mode text NOT NULL,
             expires_at timestamptz NOT NULL, PRIMARY KEY (key, holder));
         CREATE UNLOGGED TABLE distlock_waiters (
             key text NOT NULL, waiter text NOT NULL, until timestamptz NOT NULL,
             PRIMARY KEY (key, waiter));
         INSERT INTO distlock_leases_v2
             VALUES ('old/held', 'oldsession|1', 'x', now() + interval '1 minute');
         INSERT INTO distlock_waiters
             VALUES ('old/held', 'oldwaiter', now() + interval '1 minute');",
    );
    let client = client(&format!("{}?mode=lease", server.url())).await;
    assert_eq!(
        server.psql(
            "SELECT string_agg(attname, ',' ORDER BY attname) FROM pg_attribute \
             WHERE attrelid IN ('distlock_leases_v2'::regclass, 'distlock_waiters'::regclass) \
             AND attname IN ('owner', 'token', 'granted_at', 'mode', 'since')"
        ),
        "granted_at,mode,mode,owner,owner,since,token"
    );
    let old = key_status(&client, "old/held").await.expect("the old row");
    let holder = &old.holders[0];
    assert_eq!(holder.session, "oldsession");
    assert_eq!(holder.owner, "");
    assert_eq!((holder.token, holder.held_for), (None, None));
    assert!(holder.lease_left.is_some());
    assert!(old.waiters.is_empty(), "an old waiter keeps no mode");

    let session = session(&client, "upgraded").await;
    assert!(
        session
            .lock("old/held")
            .try_lock()
            .await
            .expect("try")
            .is_none(),
        "the old hold still counts"
    );
    let guard = session.lock("new/held").await.expect("lock");
    let status = client
        .status(&StatusQuery::Prefix(String::new()))
        .await
        .expect("status");
    let keys: Vec<&str> = status.keys.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["new/held", "old/held"]);
    let new = &status.keys[0].holders[0];
    assert_eq!(new.owner, "upgraded");
    assert_eq!(new.token, Some(guard.token()));
    assert!(new.held_for.is_some());
    guard.release().await.expect("release");
}
