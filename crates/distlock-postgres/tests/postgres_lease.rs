//! The conformance suite against a real PostgreSQL, lease-table mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::{Client, ErrorKind, Session};
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;
use distlock_testkit::with_waiters;

async fn connect() -> Client {
    let url = format!("{}?mode=lease", Postgres::shared().url());
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

distlock_testkit::conformance_suite!(connect);

/// A session of a lease-mode store on a server of the test's own.
async fn lease_session(server: &Postgres) -> Session {
    let url = format!("{}?mode=lease", server.url());
    let store = PostgresStore::connect(&url).await.expect("connect");
    Client::new(Arc::new(store))
        .session()
        .open()
        .await
        .expect("open")
}

/// The first grants on a new database, many at once, start the first epoch
/// without taking it for a reset (which would refuse leases for a while):
/// a second caller that comes between the first's epoch commit and its
/// move of the sequence waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_first_grants_at_once_are_not_a_reset() {
    let server = Postgres::start();
    let url = format!("{}?mode=lease", server.url());
    let mut tries = Vec::new();
    for i in 0..16 {
        let url = url.clone();
        tries.push(tokio::spawn(async move {
            let store = PostgresStore::connect(&url).await.expect("connect");
            let session = Client::new(Arc::new(store))
                .session()
                .open()
                .await
                .expect("open");
            let held = session.lock(format!("first/{i}")).try_lock().await;
            held.expect("try").is_some()
        }));
    }
    for (i, granted) in tries.into_iter().enumerate() {
        assert!(
            granted.await.expect("task"),
            "first/{i} was refused on a free key"
        );
    }
    assert_eq!(
        server.psql("SELECT reset_at IS NULL FROM distlock_epoch"),
        "t",
        "a new database's first epoch was taken for a reset"
    );
}

/// A grant reads what it needs after taking a lock, which needs READ
/// COMMITTED: a connection whose transactions run at another level is
/// refused at connect, in either mode, saying what to change.
#[tokio::test]
async fn another_isolation_is_refused_at_connect_with_what_to_change() {
    for mode in ["advisory", "lease"] {
        let url = format!(
            "{}?mode={mode}&options=-c%20default_transaction_isolation%3Dserializable",
            Postgres::shared().url()
        );
        let err = PostgresStore::connect(&url)
            .await
            .expect_err("connected under SERIALIZABLE");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("read committed") && text.contains("default_transaction_isolation"),
            "{text}"
        );
    }
}

/// An acquire dropped after its statement was sent, whose statement then
/// grants, gives that hold back: the key is free again long before its
/// lease would run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_lands_after_its_acquire_was_dropped_is_given_back() {
    let server = Postgres::shared();
    let key = "undo/late-grant";
    let client = connect().await;
    let session = client
        .session()
        .ttl(Duration::from_secs(120))
        .open()
        .await
        .expect("open");
    // A first grant of this TTL, so that the late one is not refused as
    // longer than any before. (It raises the shared server's longest lease
    // to 120 s, which only matters after a reset, never staged on it.)
    let warm = session.lock("undo/warm-up").try_lock().await.expect("try");
    warm.expect("a free key").release().await.expect("release");
    // The key's transaction lock, which every grant takes first, held for
    // 6 s by another connection (time enough to see it under load).
    let blocker = tokio::task::spawn_blocking(move || {
        server.psql(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('distlock:{key}', 0)); \
             SELECT pg_sleep(6); COMMIT"
        ))
    });
    let sleeping = "SELECT count(*) FROM pg_stat_activity \
        WHERE query LIKE '%pg_sleep(6)%' AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()";
    let started = Instant::now();
    while server.psql(sleeping) != "1" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the blocker never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped =
        tokio::time::timeout(Duration::from_millis(500), session.lock(key).try_lock()).await;
    assert!(
        dropped.is_err(),
        "the grant did not wait for the key's lock"
    );
    blocker.await.expect("blocker");

    let other = client.session().open().await.expect("open");
    let started = Instant::now();
    loop {
        if let Some(held) = other.lock(key).try_lock().await.expect("try") {
            held.release().await.expect("release");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the late grant was kept: the key stayed held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A forced release wakes the key's waiters at once: they do not sleep
/// until their next look, half their lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_release_wakes_the_waiters_at_once() {
    let key = "force/wakes";
    let client = connect().await;
    let ttl = Duration::from_secs(60);
    let holder = client.session().ttl(ttl).open().await.expect("open");
    let waiter = client.session().ttl(ttl).open().await.expect("open");
    let _held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    let waiting = tokio::spawn(async move { waiter.lock(key).wait(Duration::from_secs(50)).await });
    // Registered (so not granted on its first try), and past its first
    // look (10 ms): it now sleeps until a release wakes it, or for half
    // its lease.
    with_waiters(&client, key, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ended = client.force_release(key).await.expect("force release");
    assert_eq!(ended.len(), 1, "{ended:?}");
    let granted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter slept through the forced release")
        .expect("task");
    granted.expect("wait").release().await.expect("release");
}

/// The grant function changed under a live store (another version made it
/// again with other result types): the prepared statement is stale, and
/// costs at most one failed acquire before the store prepares it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_function_made_again_costs_at_most_one_failed_acquire() {
    let server = Postgres::start();
    let session = lease_session(&server).await;
    let held = session.lock("stale/a").try_lock().await.expect("try");
    held.expect("a free key").release().await.expect("release");

    let setup = include_str!("../src/lease.sql");
    let start = setup
        .find("CREATE OR REPLACE FUNCTION distlock_acquire_v4(")
        .expect("the grant function");
    let end = start + setup[start..].find("$fn$;").expect("its end") + "$fn$;".len();
    let changed = setup[start..end].replace("OUT conflict text)", "OUT conflict varchar)");
    assert_ne!(
        changed,
        setup[start..end],
        "the result type was not changed"
    );
    server.psql(&format!(
        "DROP FUNCTION distlock_acquire_v4(text, text, text, text, int, bigint, bigint, text, text); \
         {changed}"
    ));

    let first = session.lock("stale/b").try_lock().await;
    if let Ok(held) = first {
        held.expect("a free key").release().await.expect("release");
    }
    let second = session.lock("stale/c").try_lock().await;
    second
        .expect("a second acquire on the stale statement")
        .expect("a free key")
        .release()
        .await
        .expect("release");
}

/// An error of the grant statement that is not one it knows how to answer
/// (here, the function dropped) fails the acquire; it does not ask again
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_error_of_the_grant_fails_the_acquire() {
    let server = Postgres::start();
    let session = lease_session(&server).await;
    server.psql(
        "DROP FUNCTION distlock_acquire_v4(text, text, text, text, int, bigint, bigint, text, text)",
    );
    let tried = tokio::time::timeout(
        Duration::from_secs(30),
        session.lock("dropped/function").try_lock(),
    )
    .await
    .expect("the acquire answers");
    let Err(err) = tried else {
        panic!("an acquire without its function did not fail");
    };
    assert!(err.to_string().contains("distlock_acquire_v4"), "{err}");
}
