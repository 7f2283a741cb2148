//! The conformance suite against a real PostgreSQL, advisory-lock mode,
//! and what only this mode does: waits in the server, and tokens drawn in
//! the lock's own statement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock_core::{Client, ErrorKind};
use distlock_postgres::PostgresStore;
use distlock_testkit::servers::Postgres;
use tokio::time::timeout;
use tokio_postgres::error::SqlState;

mod common;
use common::lock_of;

async fn connect_to(url: &str) -> Client {
    let store = PostgresStore::connect(url)
        .await
        .expect("connect to the test's PostgreSQL");
    Client::new(Arc::new(store))
}

async fn connect() -> Client {
    connect_to(&Postgres::shared().url()).await
}

distlock_testkit::conformance_suite!(connect);

/// How many backends hold (`granted`) or wait for (`NOT granted`) the
/// advisory lock of any of `names`.
fn backends(server: &Postgres, granted: &str, names: &[&str]) -> String {
    let terms: Vec<String> = names
        .iter()
        .map(|name| format!("({})", lock_of(name)))
        .collect();
    server.psql(&format!(
        "SELECT count(*) FROM pg_locks WHERE {granted} AND ({})",
        terms.join(" OR ")
    ))
}

/// Asks `server` until `backends` (of `granted`, `names`) is `count`.
async fn until_backends(server: &Postgres, granted: &str, names: &[&str], count: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backends(server, granted, names) != count {
        assert!(
            Instant::now() < deadline,
            "{granted} backends of {names:?} did not come to {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SQLSTATE of the driver's error under `err`.
fn sqlstate(err: &distlock_core::Error) -> Option<SqlState> {
    std::error::Error::source(err)?
        .downcast_ref::<tokio_postgres::Error>()?
        .code()
        .cloned()
}

/// A grant whose token cannot be drawn (the sequence at its maximum) fails
/// as a store error, and its lock is given back, whether the grant came
/// from a try of a free key or from a wait in the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_a_token_fails_and_gives_the_lock_back() {
    let server = Postgres::start();
    let client = connect_to(&server.url()).await;
    let (free, waited) = ("no-token/free", "no-token/waited");
    let holder = client.session().open().await.expect("open");
    let waiter = client.session().open().await.expect("open");
    let held = holder
        .lock(waited)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    // The waiter's session outlives its wait: closing it would give back
    // whatever its connection still held.
    let waiting = tokio::spawn(async move {
        let answer = waiter.lock(waited).wait(Duration::from_secs(10)).await;
        (answer.map(|guard| guard.token()), waiter)
    });
    // The waiter's grant must come from its wait in the server.
    until_backends(&server, "NOT granted", &[waited], "1").await;
    server.psql("SELECT setval('distlock_token_seq', 9223372036854775807)");
    let tried = holder.lock(free).try_lock().await;
    let err = tried
        .map(|guard| guard.map(|guard| guard.token()))
        .expect_err("no token to draw");
    let limit = Some(SqlState::SEQUENCE_GENERATOR_LIMIT_EXCEEDED);
    assert_eq!(err.kind(), ErrorKind::Store, "{err}");
    assert_eq!(sqlstate(&err), limit, "{err}");
    held.release().await.expect("release");
    let (waited_for, _waiter) = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the wait ends")
        .expect("waiter task");
    let err = waited_for.expect_err("no token to draw");
    assert_eq!(err.kind(), ErrorKind::Store, "{err}");
    assert_eq!(sqlstate(&err), limit, "{err}");
    // Given back in the background.
    until_backends(&server, "granted", &[free, waited], "0").await;
}

/// A dropped wait's clean-up (a cancel, then an unlock) frees its
/// session at once: the session's next call does not sit out the pause
/// meant for a cancel whose answer never came (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_wait_frees_its_session_at_once() {
    let client = connect().await;
    let key = "dropped-wait/held";
    let holder = client.session().open().await.expect("open");
    let quitter = client.session().open().await.expect("open");
    let held = holder
        .lock(key)
        .try_lock()
        .await
        .expect("try")
        .expect("free");
    // The first cancel opens the canceller's connection; the second, timed,
    // only uses it.
    for timed in [false, true] {
        let gave_up = timeout(
            Duration::from_millis(300),
            quitter.lock(key).wait(Duration::from_secs(30)),
        )
        .await;
        assert!(gave_up.is_err(), "the waiter was granted: {gave_up:?}");
        let dropped = Instant::now();
        let other = quitter
            .lock("dropped-wait/other")
            .try_lock()
            .await
            .expect("try")
            .expect("free");
        let after = dropped.elapsed();
        assert!(
            !timed || after < Duration::from_secs(4),
            "the next call waited {after:?}"
        );
        other.release().await.expect("release");
    }
    held.release().await.expect("release");
}
